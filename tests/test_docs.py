"""Docs that cannot drift (issue 11): the pages are checked against the code they describe.

docs/architecture.md, "The modules":
- the table has exactly one row for each module and package of processor/ (a package is one row,
  or one row per module in it), and no row names something that is not there;
- the dependency lines are the real imports between them, read with `ast` from the source
  (tests/import_graph.py, nothing is imported): each arrow is an import, each import is an arrow;
- the imports flow one way: nothing imports `cli`, and no components import each other in a cycle;
- the lines are what cog writes now (they are generated; README, "Development", says how).

README.md and the other pages:
- every command of the click tree has a row in README's command table;
- every command, option and choice that the table, a `cancelproc ...` code span or a
  `cancelproc` command line in a code block (README, docs/, SECURITY.md, crontab.example) names
  exists.

Each failure names what differs and where, and what to do.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from tests.import_graph import (
    PACKAGE,
    REGENERATE,
    ROOT,
    Import,
    components,
    definitions,
    find_cycle,
    import_graph,
    imports,
    is_read,
    modules,
)

ARCHITECTURE = ROOT / "docs" / "architecture.md"
README = ROOT / "README.md"
PAGES = [README, ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND_LINES = [ROOT / "crontab.example"]  # not markdown: every line is a command line
CODE_SPAN = re.compile(r"`([^`]+)`")


def fail_if(problems: list[str], heading: str, advice: str = "") -> None:
    """Fail naming every problem, not only the first."""
    if problems:
        pytest.fail("\n".join([heading, *(f"  {p}" for p in problems), *([advice] if advice else [])]), pytrace=False)


def rel(path: Path) -> str:
    text = path.relative_to(ROOT).as_posix()
    return text + "/" if path.is_dir() else text


def section(page: Path, heading: str) -> list[tuple[int, str]]:
    """The numbered lines of a page's section, from its heading to the next of the same level."""
    lines = page.read_text(encoding="utf-8").splitlines()
    level = heading.split(" ")[0]
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        pytest.fail(f"{rel(page)} has no section {heading!r}")
    found = []
    for number, line in enumerate(lines[start + 1:], start + 2):
        marker = line.split(" ")[0]
        if marker.startswith("#") and set(marker) == {"#"} and len(marker) <= len(level):
            break
        found.append((number, line))
    return found


def cells(row: str) -> list[str]:
    """A markdown table row's cells (`\\|` is a pipe inside a cell, not a border)."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", row.strip().strip("|"))]


def table_rows(lines: list[tuple[int, str]]) -> list[tuple[int, list[str]]]:
    """The first table's body rows."""
    start = next((i for i, (_, line) in enumerate(lines) if line.lstrip().startswith("|")), len(lines))
    table = []
    for number, line in lines[start:]:
        if not line.lstrip().startswith("|"):
            break
        table.append((number, cells(line)))
    return table[2:]  # the header and |---| aside


# --- docs/architecture.md: the module table --------------------------------------------------------------


def module_rows() -> list[tuple[int, str]]:
    rows = []
    for number, row in table_rows(section(ARCHITECTURE, "## The modules")):
        span = CODE_SPAN.search(row[0])
        rows.append((number, span.group(1) if span else row[0]))
    return rows


def test_module_table_has_one_row_for_each_module():
    rows = module_rows()
    assert rows, "docs/architecture.md: no table in 'The modules'"
    named: dict[Path, list[int]] = {}
    problems = []
    packages = {path for path in components().values() if path.is_dir()}
    every_module = {m for path in components().values() for m in modules(path)}
    for number, text in rows:
        target = (ROOT / text).resolve()
        is_package = text.endswith("/") and target in packages
        is_module = text.endswith(".py") and (target in every_module or target.parent == PACKAGE and target.is_file())
        if not (is_package or is_module) or not is_read(target):
            problems.append(f"line {number}: the row `{text}` names no module or package of processor/ "
                            "(moved, renamed or removed?): rename the row or remove it")
        else:
            named.setdefault(target, []).append(number)

    def rows_covering(module: Path) -> list[int]:
        return [n for target, numbers in named.items() for n in numbers if target == module or target in module.parents]

    for name, path in components().items():
        in_it = [n for target, numbers in named.items() for n in numbers if target == path or path in target.parents]
        if not in_it:
            problems.append(f"{rel(path)} has no row: add `| `{rel(path)}` | what it does |` to the table")
            continue
        for module in modules(path):
            covering = rows_covering(module)
            if module.name == "__init__.py" and module.parent != PACKAGE and not covering:
                continue  # a package described module by module
            if not covering:
                problems.append(f"{rel(module)} has no row (nor has its package {name}): add one")
            elif len(covering) > 1:
                problems.append(f"{rel(module)} has {len(covering)} rows (lines {covering}): keep one")
    fail_if(problems, "docs/architecture.md, the module table ('The modules'):")


# --- docs/architecture.md: the dependency lines ------------------------------------------------------------


def component_name(text: str) -> str:
    return text.removeprefix("processor/").removeprefix("processor.").removesuffix(".py").rstrip("/")


def page_arrows() -> list[tuple[int, str, str]]:
    """(line, a, b) for each arrow `a` → `b` before the table; a line may be a chain
    (`a` → (`b`, `c`) → `d`: each name of a group imports each of the next)."""
    arrows = []
    for number, line in section(ARCHITECTURE, "## The modules"):
        if line.lstrip().startswith("|"):
            break
        if "→" not in line:
            continue
        groups = [[component_name(n) for n in CODE_SPAN.findall(part)] for part in line.split("→")]
        for left, right in zip(groups, groups[1:], strict=False):
            arrows += [(number, a, b) for a in left for b in right]
    return arrows


def test_dependency_lines_are_the_imports():
    graph = import_graph()
    arrows = page_arrows()
    problems = []
    for number, a, b in arrows:
        for name in (a, b):
            if name not in graph:
                problems.append(f"line {number}: `{name}` is not a module or package of processor/")
        if a in graph and b in graph and b not in graph[a]:
            problems.append(f"line {number}: the page says `{a}` → `{b}`, but nothing in "
                            f"{rel(components()[a])} imports processor.{b}")
    on_page = {(a, b) for _, a, b in arrows}
    missing: dict[tuple[str, str], list[Import]] = {}
    for found in imports():
        if (found.source, found.target) not in on_page:
            missing.setdefault((found.source, found.target), []).append(found)
    for (a, b), where in sorted(missing.items()):
        problems.append(f"`{a}` → `{b}` is not on the page, but {where[0]}"
                        + (f" (and {len(where) - 1} more)" if len(where) > 1 else ""))
    fail_if(problems, "docs/architecture.md, the dependency lines ('The modules'):",
            f"They are generated from the imports: {REGENERATE}")


def test_nothing_imports_the_cli():
    upward = [str(found) for found in imports() if found.target == "cli"]
    fail_if(upward, "processor.cli is the top: only the console script and `python -m processor` import it.",
            "Move what both need out of processor/cli/.")


def test_no_cycle_between_components():
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        first = {(i.source, i.target): i for i in reversed(imports())}
        steps = [str(first[a, b]) for a, b in zip(cycle, cycle[1:], strict=False)]
        fail_if(steps, "the components of processor/ import each other in a cycle, " + " → ".join(cycle) + ":",
                "Each may import only components below it: move what both need down.")


def test_generated_parts_are_current():
    """`cog --check`: what the page holds between its cog markers is what cog writes now."""
    done = subprocess.run([sys.executable, "-m", "cogapp", "--check", "--diff", "-I", ".", rel(ARCHITECTURE)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "[[[cog" in ARCHITECTURE.read_text(encoding="utf-8"), "docs/architecture.md has lost its cog block"
    if done.returncode != 0:
        pytest.fail(f"docs/architecture.md is not what cog generates now; run: {REGENERATE}\n"
                    + done.stdout + done.stderr, pytrace=False)


# --- docs/architecture.md: the names of code in its prose -------------------------------------------------

DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")  # Runner.run, outbox.Composer, emails.EmailTemplates.render
PY_PATH = re.compile(r"[\w./-]+\.py")  # cli/run.py, bench/run_bench.py (a glob such as hooks/*.py is not checked)
OTHER_FILES = {"cfg", "csv", "db", "eml", "html", "ini", "json", "mako", "md", "toml", "txt", "yaml", "yml"}


def py_file_exists(text: str) -> bool:
    if (ROOT / text).is_file() or (ROOT.parent / text).is_file():  # shared/ lies beside the repository
        return True
    if text.startswith("shared/") and not (ROOT.parent / "shared").is_dir():
        return True  # a checkout without shared/ beside it cannot tell
    return any(p.as_posix().endswith("/" + text) for p in PACKAGE.rglob("*.py"))


def test_architecture_names_code_that_exists():
    """`Runner.run`, `outbox.Composer`, `cli/run.py`: each dotted name and file the page gives in
    backquotes is in the code (a module, class, function or attribute of processor/; a file)."""
    known = definitions()
    rows = set(module_rows())  # the module column has its own test
    problems = []
    for number, line in enumerate(ARCHITECTURE.read_text(encoding="utf-8").splitlines(), 1):
        for span in CODE_SPAN.findall(line):
            name = span.removesuffix("()")
            if (number, span) in rows:
                continue
            if PY_PATH.fullmatch(span):
                if not py_file_exists(span):
                    problems.append(f"line {number}: `{span}`: no such file in the repository or in processor/")
            elif DOTTED.fullmatch(name) and name.rsplit(".", 1)[1] not in OTHER_FILES and (
                    missing := known.resolves(name)):
                problems.append(f"line {number}: `{span}`: {missing}")
    fail_if(problems, "docs/architecture.md names code that is not there:",
            "Moved or renamed? Say what the code has now.")


# --- README.md and the other pages: the commands -----------------------------------------------------------


@pytest.fixture(scope="module")
def cli() -> click.Group:
    from processor.cli import cli

    return cli


def leaf_commands(group: click.Group, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from leaf_commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


@dataclass
class Invocation:
    """`cancelproc ...` as a page writes it: a real command line, or a synopsis (`[--as-of DATE]`,
    `--type immediate|on-date`, `reasons|runs`, `ID...`)."""

    where: str  # README.md:52
    text: str

    def tokens(self) -> list[str]:
        words = []
        for word in self.text.replace("\\|", "|").split():
            if word.startswith("#") or any(s in word for s in (">", "&&", ";")):
                break  # a comment, a redirection, the next command
            word = word.strip("[]").removesuffix("...").strip("[]")
            if word and word != "|":
                words.append(word)
        return words


def takes_value(param: click.Parameter) -> bool:
    return isinstance(param, click.Option) and not param.is_flag and not param.count


def is_placeholder(value: str) -> bool:
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_:]*", value))


def resolve(command: click.Command, path: list[str], words: list[str]) -> tuple[list[str], list[str]]:
    """The commands a synopsis reaches (a group's `a|b` reaches both), and what it names wrongly."""
    reached: list[str] = []
    problems: list[str] = []
    pending: click.Parameter | None = None  # the option whose value comes next
    for i, word in enumerate(words):
        pieces = word.split("|")
        values = [p for p in pieces if not p.startswith("-")]
        if pending is not None:
            choices = getattr(pending.type, "choices", None)
            for value in values:
                if choices is not None and not is_placeholder(value) and value not in choices:
                    problems.append(f"`{' '.join(path) or 'cancelproc'} {pending.opts[0]}` takes no "
                                    f"`{value}` (it takes {', '.join(map(str, choices))})")
        elif isinstance(command, click.Group) and values:
            for name in values:
                sub = command.commands.get(name)
                if sub is None:
                    problems.append(f"`{' '.join(path)} {name}` is no command (`{' '.join(path)}` has: "
                                    f"{', '.join(sorted(command.commands))})")
                else:
                    more_reached, more_problems = resolve(sub, [*path, name], words[i + 1:])
                    reached += more_reached
                    problems += more_problems
            return reached, problems
        pending = None
        for piece in pieces:
            if not piece.startswith("-"):
                continue
            param = next((p for p in command.params if piece in (*p.opts, *p.secondary_opts)), None)
            if param is None and piece != "--help":
                options = sorted(o for p in command.params if isinstance(p, click.Option) for o in p.opts)
                problems.append(f"`{' '.join(path)}` has no option {piece} (it has: {', '.join(options) or 'none'})")
            elif param is not None and takes_value(param):
                pending = param
    if not isinstance(command, click.Group):
        reached.append(" ".join(path[1:]))
    return reached, problems


def invocations() -> Iterator[Invocation]:
    """Each `cancelproc ...` the pages name: code spans, lines of code blocks, crontab.example."""
    for page in PAGES:
        fenced = False
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            where = f"{rel(page)}:{number}"
            if fenced:
                if m := re.search(r"(?:^|/)cancelproc (.*)", line.strip()):
                    yield Invocation(where, m.group(1))
                continue
            for span in CODE_SPAN.findall(line.replace("\\|", "\x00")):
                if span.startswith("cancelproc "):
                    yield Invocation(where, span.replace("\x00", "|").removeprefix("cancelproc "))
    for path in COMMAND_LINES:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if m := re.search(r"/cancelproc (.*)", line):
                yield Invocation(f"{rel(path)}:{number}", m.group(1))


def readme_table() -> list[Invocation]:
    """The command column of README's command table: each code span, `cancelproc ` or not."""
    found = []
    for number, row in table_rows(section(README, "## Commands")):
        for span in CODE_SPAN.findall(row[0].replace("\\|", "\x00")):
            found.append(Invocation(f"README.md:{number}", span.replace("\x00", "|").removeprefix("cancelproc ")))
    return found


def test_every_command_has_a_row_in_the_readme(cli):
    table = readme_table()
    assert table, "README.md: no command table under '## Commands'"
    named = {command for invocation in table for command in resolve(cli, ["cancelproc"], invocation.tokens())[0]}
    missing = [f"`cancelproc {path}` ({command.get_short_help_str(200)})"
               for path, command in leaf_commands(cli) if path not in named]
    fail_if(missing, "README.md's command table (under '## Commands') has no row for:",
            "Add a row `| `cancelproc COMMAND [OPTIONS]` | what it does |` for each.")


def test_pages_name_only_commands_and_options_that_exist(cli):
    problems = []
    for invocation in [*readme_table(), *invocations()]:
        problems += [f"{invocation.where}: {problem}"
                     for problem in resolve(cli, ["cancelproc"], invocation.tokens())[1]]
    fail_if(list(dict.fromkeys(problems)), "These name a command, option or value that `cancelproc` does not have:",
            "Renamed or removed? Fix the page (`cancelproc COMMAND --help` shows what there is).")
