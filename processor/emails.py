"""Email templates: find, check and render them. Delivery of the outbox comes separately.

A template is one file with three blocks (subject, text, html) extending `_layout.jinja`.
Templates run in Jinja's sandbox (a template cannot reach Python internals), with
StrictUndefined (a misspelt merge field is an error, not an empty string). The html block
is rendered by an autoescaping environment, the subject and text by a plain one.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from jinja2 import (
    BaseLoader,
    Environment,
    ChoiceLoader,
    FileSystemLoader,
    PrefixLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateNotFound,
    TemplateSyntaxError,
)
from jinja2 import nodes
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from processor.errors import InputError

DEFAULT_TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "emails"
SERVICE_CANCELLATION_CONFIRMATION = "service_cancellation_confirmation"
BLOCKS = ("subject", "text", "html")


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


class TemplateProblem(InputError):
    """A template is missing, does not parse, or does not render with the given fields."""


@functools.lru_cache(maxsize=4096)  # a run formats the same few dozen dates thousands of times
def format_date(value: dt.date | None) -> str:
    return f"{value.day} {value:%B %Y}" if value else ""


def _loader(override_dir: Path | None, default_dir: Path) -> BaseLoader:
    # The operator's folder first; "default:name" always reaches the shipped template,
    # so an override can {% extends "default:service_cancellation_confirmation.jinja" %}.
    default = FileSystemLoader(default_dir)
    loaders: list[BaseLoader] = [FileSystemLoader(override_dir)] if override_dir else []
    return ChoiceLoader([*loaders, default, PrefixLoader({"default": default}, delimiter=":")])


BlockFn = Any  # a compiled block: Callable[[Context], Iterator[str]]


def _block_chain(env: Environment, template: Template) -> dict[str, list[BlockFn]]:
    """Every block of the template and the layouts it extends, child first (as Jinja's
    own rendering would collect them), so one block can be rendered on its own."""
    blocks: dict[str, list[BlockFn]] = {}
    current: Template | None = template
    # The name each template was asked for: one reached through "default:" reports its
    # name without the prefix, which names the operator's override again.
    requested = template.name
    while current is not None:
        for name, fn in current.blocks.items():
            blocks.setdefault(name, []).append(fn)
        source, _, _ = env.loader.get_source(env, requested)  # type: ignore[union-attr,arg-type]
        extends = next(iter(env.parse(source, requested).find_all(nodes.Extends)), None)
        if extends is None:
            current = None
        elif isinstance(extends.template, nodes.Const):
            requested = extends.template.value
            current = env.get_template(requested, parent=current.name)
        else:
            raise TemplateProblem(f"{current.filename}:{extends.lineno}: extends needs a fixed template name")
    return blocks


@dataclass(frozen=True)
class _Compiled:
    template: Template
    blocks: dict[str, list[BlockFn]]

    def render_blocks(self, names: tuple[str, ...], fields: Mapping[str, Any]) -> list[str]:
        """Render these blocks in one context. `fields` must include the environment's
        globals (Jinja's new_context would copy them in). The block chain is shared, not copied: block
        functions only read it (the root render function, never called here, would write)."""
        ctx = Context(self.template.environment, fields, self.template.name, {})
        ctx.blocks = self.blocks
        return ["".join(self.blocks[name][0](ctx)) for name in names]


class EmailTemplates:
    """Compiled templates; `check` at start so a broken template stops a run before any write."""

    def __init__(self, override_dir: Path | None = None, default_dir: Path = DEFAULT_TEMPLATES) -> None:
        loader = _loader(override_dir, default_dir)
        common: dict[str, Any] = dict(loader=loader, undefined=StrictUndefined, keep_trailing_newline=False)
        self._plain = ImmutableSandboxedEnvironment(autoescape=False, **common)
        self._html = ImmutableSandboxedEnvironment(autoescape=True, **common)
        self._cache: dict[str, tuple[_Compiled, _Compiled]] = {}

    def _compile(self, env: Environment, filename: str) -> _Compiled:
        template = env.get_template(filename)
        return _Compiled(template, _block_chain(env, template))

    def _load(self, name: str) -> tuple[_Compiled, _Compiled]:
        if name not in self._cache:
            filename = f"{name}.jinja"
            try:
                self._cache[name] = (self._compile(self._plain, filename), self._compile(self._html, filename))
            except TemplateNotFound as exc:
                raise TemplateProblem(f"email template {exc.name} not found") from None
            except TemplateSyntaxError as exc:
                raise TemplateProblem(f"{exc.filename or exc.name}:{exc.lineno}: {exc.message}") from None
        return self._cache[name]

    def check(self, name: str, sample: Mapping[str, Any]) -> None:
        """Parse the template and render it once with sample fields; raise TemplateProblem."""
        self.render(name, sample)

    def render(self, name: str, fields: Mapping[str, Any]) -> RenderedEmail:
        plain, html = self._load(name)
        fields = {**self._plain.globals, **fields}  # both environments have the same globals
        try:
            subject, text = (part.strip() for part in plain.render_blocks(("subject", "text"), fields))
            html_body = html.render_blocks(("html",), fields)[0].strip()
        except KeyError as exc:
            raise TemplateProblem(f"email template {name}.jinja has no block {exc.args[0]!r} (needs {', '.join(BLOCKS)})") from None
        except TemplateError as exc:
            raise TemplateProblem(f"email template {name}.jinja: {exc}") from None
        if "\n" in subject or "\r" in subject:
            raise TemplateProblem(f"email template {name}.jinja: subject renders to more than one line")
        return RenderedEmail(subject, text, html_body)


def sample_fields(company_name: str, signature: str) -> dict[str, Any]:
    """Merge fields with plausible values, to check templates before a run touches anything."""
    return dict(
        client_name="Jane Doe",
        client_first_name="Jane",
        client_email="jane@example.test",
        service_product_name="VPS 4GB",
        service_domain="vps1.example.test",
        service_next_due_date=format_date(dt.date(2026, 12, 1)),
        service_status="Cancelled",
        service_billing_cycle="Monthly",
        service_cancellation_type="End of Billing Period",
        service_cancellation_reason="Too expensive",
        service_is_immediate_cancellation=False,
        company_name=company_name,
        signature=signature,
        date=format_date(dt.date(2026, 12, 1)),
        request_id=1,
    )
