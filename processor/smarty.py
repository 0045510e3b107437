"""WHMCS email templates (Smarty) into Jinja, for `cancelproc emails convert`.

A small tokenizer and translator, not a Smarty engine: it knows the part of Smarty that
WHMCS email templates use, `{$var}` with modifiers, `{if}`/`{elseif}`/`{else}`/`{/if}`,
`{foreach}`, `{literal}`, `{ldelim}`/`{rdelim}` and `{* comments *}`, and refuses
anything else with the line and column (SmartyError), so nothing is half converted.

A WHMCS template is one body (usually HTML) from which WHMCS makes the plain-text part
itself. `convert` gives both parts as Jinja: the HTML block as written, and a text block
(tags removed, <br> and </p> as line breaks, entities decoded); a plain-text template
gives the text as written and an HTML block with its lines kept.
"""

from __future__ import annotations

import bisect
import html
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from processor.errors import InputError


class SmartyError(InputError):
    """Something the converter cannot turn into Jinja, at a line and column (1-based)."""

    def __init__(self, line: int, column: int, message: str, part: str = "body") -> None:
        super().__init__(f"line {line}, column {column}: {message}")
        self.line = line
        self.column = column
        self.part = part  # "body" or "subject"


@dataclass(frozen=True)
class Converted:
    html: str  # Jinja for the HTML part
    text: str  # Jinja for the plain-text part
    names: dict[str, tuple[int, int]]  # every merge field named, with where it is first named (line, column)


# --- expressions ---------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<var>\$[A-Za-z_]\w*(?:(?:\.|->)[A-Za-z_]\w*|\.\d+|\[(?:\d+|'[^'\\]*'|"[^"\\$]*")\])*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<number>\d+(?:\.\d+)?)
  | (?P<op>===|!==|==|!=|<>|>=|<=|&&|\|\||[<>!+\-*/%()|:,])
  | (?P<word>[A-Za-z_]\w*)
""", re.VERBOSE)

_WORD_OPERATORS = {"eq": "==", "ne": "!=", "neq": "!=", "gt": ">", "lt": "<", "gte": ">=", "ge": ">=",
                   "lte": "<=", "le": "<=", "and": "and", "or": "or", "not": "not", "mod": "%",
                   "true": "true", "false": "false", "null": "none"}
_SYMBOL_OPERATORS = {"===": "==", "!==": "!=", "==": "==", "!=": "!=", "<>": "!=", "&&": "and", "||": "or",
                     "!": "not", "<": "<", ">": ">", "<=": "<=", ">=": ">=", "+": "+", "-": "-", "*": "*",
                     "/": "/", "%": "%", "(": "(", ")": ")"}

MODIFIERS = ("capitalize", "cat", "count_characters", "date_format", "default", "escape", "lower", "nl2br",
             "replace", "string_format", "strip", "strip_tags", "truncate", "upper")


@dataclass
class _Token:
    kind: str
    text: str
    offset: int  # in the source


def _modifier(name: str, expr: str, args: list[str], html_part: bool) -> str | None:
    """Jinja for `expr|name:args` (None: no equivalent). In the text part, escaping for
    HTML and nl2br do nothing, as WHMCS's own text part shows the value as it is."""
    simple = {"upper": "upper", "lower": "lower", "capitalize": "title", "strip": "trim",
              "strip_tags": "striptags", "count_characters": "length"}
    if name in simple and not args:
        return f"{expr}|{simple[name]}"
    if name == "escape":
        kind = args[0].strip("'\"") if args else "html"
        if kind in ("html", "htmlall"):
            return f"{expr}|e" if html_part else expr
        return f"{expr}|urlencode" if kind == "url" else None
    if name == "nl2br" and not args:
        return f'{expr}|replace("\\n", "<br>\\n"|safe)' if html_part else expr
    if name == "default" and len(args) <= 1:  # Smarty's default also replaces an empty string
        return f'{expr}|default({args[0] if args else chr(34) * 2}, true)'
    if name == "truncate" and len(args) <= 3:
        length, end, killwords = (args + ["80", '"..."', "false"][len(args):])[:3]
        return f"{expr}|truncate({length}, {killwords}, {end}, 0)"
    if name == "string_format" and len(args) == 1:
        return f"({args[0]}|format({expr}))"
    if name == "cat" and len(args) == 1:
        return f"({expr} ~ {args[0]})"
    if name == "replace" and len(args) == 2:
        return f"{expr}|replace({args[0]}, {args[1]})"
    if name == "date_format" and len(args) <= 1:
        return f'{expr}|date_format({args[0] if args else chr(34) + "%b %e, %Y" + chr(34)})'
    return None


class _Expression:
    """One Smarty expression (what follows `{if`, or a whole `{$...}`) as Jinja."""

    def __init__(self, converter: _Converter, source: str, offset: int) -> None:
        self.c = converter
        self.tokens = self._lex(source, offset)
        self.i = 0

    def _lex(self, source: str, offset: int) -> list[_Token]:
        tokens, pos = [], 0
        while pos < len(source):
            match = _TOKEN.match(source, pos)
            if match is None:
                raise self.c.error(offset + pos, f"cannot read {source[pos:pos + 20]!r} here")
            if match.lastgroup != "space":
                tokens.append(_Token(str(match.lastgroup), match.group(), offset + pos))
            pos = match.end()
        return tokens

    def _next(self) -> _Token | None:
        token = self.tokens[self.i] if self.i < len(self.tokens) else None
        self.i += 1
        return token

    def _peek(self, text: str) -> bool:
        return self.i < len(self.tokens) and self.tokens[self.i].text == text

    def translate(self, html_part: bool) -> str:
        self.i = 0
        out: list[str] = []
        while (token := self._next()) is not None:
            if token.kind in ("var", "string", "number"):
                out.append(self._modifiers(self._operand(token), html_part))
            elif token.kind == "word" and token.text.lower() in _WORD_OPERATORS:
                out.append(_WORD_OPERATORS[token.text.lower()])
            elif token.kind == "op" and token.text in _SYMBOL_OPERATORS:
                out.append(_SYMBOL_OPERATORS[token.text])
            elif token.kind == "word" and self._peek("("):
                raise self.c.error(token.offset, f"{token.text}(): PHP functions are not converted")
            else:
                raise self.c.error(token.offset, f"{token.text!r} is not an operator or value the converter knows")
        if not out:
            raise self.c.error(self.tokens[0].offset if self.tokens else 0, "an expression is missing")
        return " ".join(out).replace("( ", "(").replace(" )", ")")

    def _operand(self, token: _Token) -> str:
        if token.kind == "string":
            if token.text.startswith('"') and ("$" in token.text or "`" in token.text):
                raise self.c.error(token.offset, f"{token.text}: variables inside a string are not converted; "
                                                 "use |cat")
            return token.text
        if token.kind == "number":
            return token.text
        return self.c.variable(token)

    def _modifiers(self, expr: str, html_part: bool) -> str:
        while self._peek("|"):
            self.i += 1
            name = self._next()
            if name is None or name.kind != "word":
                raise self.c.error(self.tokens[self.i - 2].offset, "a modifier name must follow '|'")
            args = []
            while self._peek(":"):
                self.i += 1
                arg = self._next()
                if arg is None or arg.kind not in ("var", "string", "number", "word"):
                    raise self.c.error(name.offset, f"|{name.text}: a value must follow ':'")
                if arg.kind == "word":
                    if arg.text.lower() not in ("true", "false", "null"):
                        raise self.c.error(arg.offset, f"|{name.text}: {arg.text!r} is not a value")
                    args.append(_WORD_OPERATORS[arg.text.lower()])
                else:
                    args.append(self._operand(arg))
            converted = _modifier(name.text, expr, args, html_part)
            if converted is None:
                known = ", ".join(MODIFIERS)
                raise self.c.error(name.offset, f"|{name.text}{''.join(':' + a for a in args)}: no Jinja "
                                                f"equivalent the converter knows (it converts {known})")
            expr = converted
        return expr


# --- the template --------------------------------------------------------------------------------

@dataclass
class _Block:
    kind: str  # "if" or "foreach"
    offset: int
    item: str | None = None  # a foreach's loop variable
    seen_else: bool = False


@dataclass
class _Converter:
    source: str
    html_chunks: list[str] = field(default_factory=list)
    text_chunks: list[str] = field(default_factory=list)
    literal_chunks: list[tuple[int, str]] = field(default_factory=list)  # (index in the chunks, text)
    names: dict[str, tuple[int, int]] = field(default_factory=dict)
    blocks: list[_Block] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", self.source)]

    def where(self, offset: int) -> tuple[int, int]:
        line = bisect.bisect_right(self.line_starts, offset)
        return line, offset - self.line_starts[line - 1] + 1

    def error(self, offset: int, message: str) -> SmartyError:
        return SmartyError(*self.where(offset), message)

    def literal(self, text: str) -> None:
        if not text:
            return
        if self.literal_chunks and self.literal_chunks[-1][0] == len(self.html_chunks) - 1:
            index, before = self.literal_chunks.pop()  # one run of text, so its braces are seen together
            self.literal_chunks.append((index, before + text))
            return
        self.literal_chunks.append((len(self.html_chunks), text))
        self.html_chunks.append("")
        self.text_chunks.append("")

    def code(self, html_code: str, text_code: str | None = None) -> None:
        self.html_chunks.append(html_code)
        self.text_chunks.append(html_code if text_code is None else text_code)

    def variable(self, token: _Token) -> str:
        """`$a.b->c[0]` as Jinja `a.b.c[0]`; a merge field outside any loop is noted."""
        text = token.text[1:]
        name = re.match(r"\w+", text).group()  # type: ignore[union-attr]
        if name == "smarty":
            raise self.error(token.offset, f"${text}: Smarty's own variables are not available")
        if name not in {b.item for b in self.blocks}:
            self.names.setdefault(name, self.where(token.offset))
        jinja = re.sub(r"\.(\d+)", r"[\1]", text).replace("->", ".")
        return jinja

    # The scan: text, then a tag, until the end.
    def run(self) -> None:
        src, pos = self.source, 0
        while pos < len(src):
            start = src.find("{", pos)
            if start < 0:
                self.literal(src[pos:])
                break
            # Smarty's auto-literal: a brace before white space is text (CSS, scripts).
            if start + 1 == len(src) or src[start + 1] in " \t\r\n":
                self.literal(src[pos:start + 1])
                pos = start + 1
                continue
            self.literal(src[pos:start])
            if src.startswith("{*", start):
                end = src.find("*}", start + 2)
                if end < 0:
                    raise self.error(start, "comment {* is not closed with *}")
                pos = end + 2
                continue
            end = self._tag_end(start)
            pos = self._tag(start, src[start + 1:end].strip(), end + 1)
        if self.blocks:
            block = self.blocks[-1]
            raise self.error(block.offset, f"{{{block.kind}}} is not closed with {{/{block.kind}}}")

    def _tag_end(self, start: int) -> int:
        quote = None
        for i in range(start + 1, len(self.source)):
            ch = self.source[i]
            if quote:
                quote = None if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch == "}":
                return i
        raise self.error(start, "'{' is not closed with '}' (a brace of text is written {ldelim} or "
                                "inside {literal}...{/literal})")

    def _tag(self, start: int, inner: str, after: int) -> int:
        """Convert one tag; returns where the scan goes on."""
        offset = start + 1  # a brace before white space is text: the tag starts right after it
        word = re.match(r"/?\w+", inner)
        head = word.group() if word else ""
        rest_offset = offset + len(head)
        rest = inner[len(head):]
        if inner.startswith(("$", '"', "'")):
            expr = _Expression(self, inner, offset)
            self.code("{{ " + expr.translate(True) + " }}", "{{ " + expr.translate(False) + " }}")
        elif head == "literal" and not rest.strip():
            end = self.source.find("{/literal}", after)
            if end < 0:
                raise self.error(start, "{literal} is not closed with {/literal}")
            self.literal(self.source[after:end])
            return end + len("{/literal}")
        elif head in ("ldelim", "rdelim") and not rest.strip():
            self.literal("{" if head == "ldelim" else "}")
        elif head == "if":
            self._condition("{% if ", rest, rest_offset, start)
            self.blocks.append(_Block("if", start))
        elif head in ("elseif", "else") and (head == "elseif" or rest.strip()[:2] == "if"):
            if head == "else":  # {else if ...}
                rest_offset += len(rest) - len(rest.lstrip()) + 2
                rest = rest.lstrip()[2:]
            self._open("if", start, head)
            self._condition("{% elif ", rest, rest_offset, start)
        elif head == "else" and not rest.strip():
            self._open("if", start, "else").seen_else = True
            self.code("{% else %}")
        elif head == "foreach":
            self._foreach(rest, rest_offset, start)
        elif head == "foreachelse" and not rest.strip():
            self._open("foreach", start, "foreachelse").seen_else = True
            self.code("{% else %}")
        elif head in ("/if", "/foreach") and not rest.strip():
            self._open(head[1:], start, head)
            self.blocks.pop()
            self.code("{% endif %}" if head == "/if" else "{% endfor %}")
        else:
            raise self.error(start, f"{{{inner[:40]}}}: not converted (the converter knows {{$var}} with modifiers, "
                                    "if/elseif/else, foreach, literal, ldelim/rdelim and comments)")
        return after

    def _open(self, kind: str, start: int, tag: str) -> _Block:
        if not self.blocks or self.blocks[-1].kind != kind:
            raise self.error(start, f"{{{tag}}} without an open {{{kind}}}")
        if self.blocks[-1].seen_else and not tag.startswith("/"):
            raise self.error(start, f"{{{tag}}} after the {{{kind}}}'s else")
        return self.blocks[-1]

    def _condition(self, opening: str, rest: str, offset: int, start: int) -> None:
        if not rest.strip():
            raise self.error(start, "a condition is missing")
        expr = _Expression(self, rest, offset)
        self.code(opening + expr.translate(True) + " %}", opening + expr.translate(False) + " %}")

    def _foreach(self, rest: str, offset: int, start: int) -> None:
        short = re.fullmatch(r"\s*(\$\S+)\s+as\s+\$(\w+)\s*", rest)
        if short:
            collection, item = short.group(1), short.group(2)
            collection_offset = offset + rest.index(collection)
        else:
            attrs = dict(re.findall(r"(\w+)\s*=\s*(\$[^\s}]+|\"[^\"]*\"|'[^']*'|\w+)", rest))
            unknown = set(attrs) - {"from", "item", "name"}
            if "from" not in attrs or "item" not in attrs or unknown:
                what = f"{', '.join(sorted(unknown))} not converted" if unknown else "needs from= and item="
                raise self.error(start, f"{{foreach{rest[:40]}}}: {what} (write {{foreach from=$list item=x}} or "
                                        "{foreach $list as $x})")
            collection, item = attrs["from"], attrs["item"].strip("'\"").lstrip("$")
            collection_offset = offset + rest.index(collection)
        if not collection.startswith("$"):
            raise self.error(start, f"{{foreach}}: loops over a variable, not {collection}")
        expr = _Expression(self, collection, collection_offset)
        jinja = expr.translate(True)
        self.blocks.append(_Block("foreach", start, item=item))
        self.code(f"{{% for {item} in {jinja} %}}")

    # The two parts from the chunks.
    def parts(self, as_html: bool) -> tuple[str, str]:
        html_chunks, text_chunks = list(self.html_chunks), list(self.text_chunks)
        for index, text in self.literal_chunks:
            if as_html:
                html_chunks[index] = _jinja_text(text)
                text_chunks[index] = _jinja_text(text)
            else:
                html_chunks[index] = _jinja_text(html.escape(text, quote=False)).replace("\n", "<br>\n")
                text_chunks[index] = _jinja_text(text)
        html_part, text_part = "".join(html_chunks), "".join(text_chunks)
        return html_part.strip(), (_html_to_text(text_part) if as_html else text_part.strip())


def _jinja_text(text: str) -> str:
    """Text that Jinja would read as its own syntax, written so it is printed as it is: a
    brace before another, % or #, or last (a tag may follow: `{ldelim}{$x}`)."""
    return re.sub(r"\{(?=[{%#]|$)", '{{ "{" }}', text)


_JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.DOTALL)
_TAG = re.compile(r"<[A-Za-z/!](?:\{\{.*?\}\}|\{%.*?%\}|[^<>])*?>", re.DOTALL)


def _outside_jinja(text: str, change: Callable[[str], str]) -> str:
    """`change` applied to the text between Jinja's tags, never to an expression."""
    out, pos = [], 0
    for match in _JINJA.finditer(text):
        out += [change(text[pos:match.start()]), match.group()]
        pos = match.end()
    return "".join([*out, change(text[pos:])])


def _html_to_text(jinja: str) -> str:
    """The plain-text part of an HTML body, as WHMCS makes it: tags removed, lines from
    <br>, paragraphs and table rows, entities decoded."""
    text = re.sub(r"<(style|head|script)\b.*?</\1\s*>|<!--.*?-->", "", jinja, flags=re.DOTALL | re.IGNORECASE)
    text = _outside_jinja(text, lambda s: re.sub(r"\s+", " ", s))  # HTML's own line breaks mean nothing
    for pattern, replacement in ((r"<br\s*/?>", "\n"), (r"</?p\b[^>]*>", "\n\n"), (r"<li\b[^>]*>", "\n- "),
                                 (r"</(div|tr|h\d|table|ul|ol)\s*>", "\n"), (r"</t[dh]\s*>", " ")):
        text = re.sub(pattern, replacement, text, flags=re.IGNORECASE)
    text = _TAG.sub("", text)
    text = _outside_jinja(text, lambda s: html.unescape(s).replace("\xa0", " "))
    text = "\n".join(line.strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


_HTML = re.compile(r"<(p|br|div|table|tr|td|html|body|style|span|a|strong|b|em|i|u|ul|ol|li|h\d|hr|img|font|center)\b",
                   re.IGNORECASE)


def convert(source: str) -> Converted:
    """A WHMCS template as Jinja, its HTML and text parts. Raises SmartyError."""
    converter = _Converter(source)
    converter.run()
    html_part, text_part = converter.parts(as_html=bool(_HTML.search(source)))
    return Converted(html_part, text_part, converter.names)


def convert_line(source: str) -> Converted:
    """A subject line: one line of text, no HTML."""
    if "\n" in source.strip():
        raise SmartyError(1, 1, "the subject must be one line", part="subject")
    converter = _Converter(source.strip())
    try:
        converter.run()
    except SmartyError as exc:
        exc.part = "subject"
        raise
    _, text = converter.parts(as_html=False)
    return Converted(text, text, converter.names)


def unknown_fields(converted: Converted, known: Collection[str]) -> list[tuple[str, int, int]]:
    """Merge fields the template names that cancelproc does not have: (name, line, column)."""
    return [(name, *where) for name, where in converted.names.items() if name not in known]
