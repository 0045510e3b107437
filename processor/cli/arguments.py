"""What the command line accepts, as click parameter types: each checks its value before
anything touches the database, and says in one line what is wrong and what is allowed."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import click
from click.shell_completion import CompletionItem
from sqlalchemy import select

from processor.cli.app import App
from processor.emails import language_folders
from processor.errors import ConfigError
from processor.models import CancellationRequest, Client, Invoice, Service, ServiceAddon
from processor.text import text_problem


class DateType(click.ParamType):
    name = "DATE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dt.date:
        if isinstance(value, dt.date):
            return value
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is not a date; use YYYY-MM-DD", param, ctx)


DATE = DateType()
# Ids are 32-bit integer columns (PostgreSQL's `integer`): a bigger number names nothing,
# and past 2**63 SQLite's driver cannot even bind it.
MAX_ID = 2**31 - 1
ID = click.IntRange(1, MAX_ID)
COUNT = click.IntRange(1, MAX_ID)  # --limit of what is done (run, emails send)
LIMIT = click.IntRange(0, MAX_ID)  # --limit of a list: 0 means all
OFFSET = click.IntRange(0, MAX_ID)
EXT_PREFIX = "ext:"
MAX_EXTERNAL_ID = 64  # the external_id columns are String(64)
MAX_DOMAIN = 255  # services.domain is String(255)


class RecordRefType(click.ParamType):
    """The id of a client, service, add-on, invoice or request: ours (a number), or the
    billing system's, written `ext:ID` (`services show ext:1003`), looked up here once for
    every command. An external id that names nothing is refused as the value of its
    option or argument, naming both."""

    MODELS: dict[str, Any] = {"client": Client, "service": Service, "add-on": ServiceAddon, "invoice": Invoice,
                              "request": CancellationRequest}

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.model = self.MODELS[kind]
        self.name = f"{kind.upper().replace('-', '')}_ID|ext:ID"

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return self.name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value)
        if text[:len(EXT_PREFIX)].lower() != EXT_PREFIX:
            if text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_ID:
                return int(text)
            self.fail(f"{text!r} is not a {self.kind} id (1 to {MAX_ID}) or ext:ID (the billing system's id)",
                      param, ctx)
        external = text[len(EXT_PREFIX):]
        problem = text_problem(external, MAX_EXTERNAL_ID) or ("is empty" if not external.strip() else None)
        if problem:
            self.fail(f"the external id {problem}", param, ctx)
        found = self._lookup(external, ctx)
        if found is None:
            self.fail(f"no {self.kind} has the external id {external!r}", param, ctx)
        return found

    def _lookup(self, external: str, ctx: click.Context | None) -> int | None:
        app = ctx.find_object(App) if ctx is not None else None
        if app is None:  # pragma: no cover - every cancelproc command has its App
            raise RuntimeError("ext:ID is resolved within a cancelproc command")
        with app.database().read_session() as session:
            return session.scalar(select(self.model.id).where(self.model.external_id == external))


CLIENT = RecordRefType("client")
SERVICE = RecordRefType("service")
ADDON = RecordRefType("add-on")
REQUEST = RecordRefType("request")


class HoursType(click.FloatRange):
    """More than 0 and at most ten years; not nan (which no range check catches)."""

    def __init__(self) -> None:
        super().__init__(min=0, min_open=True, max=24 * 366 * 10)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        hours = super().convert(value, param, ctx)
        if math.isnan(hours):
            self.fail(f"{value!r} is not a number of hours", param, ctx)
        return hours


HOURS = HoursType()


class RunRefType(click.ParamType):
    """A run id, or `last`."""

    name = "run"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if value == "last" or isinstance(value, int):
            return value
        try:
            return ID.convert(value, param, ctx)
        except click.BadParameter:
            self.fail(f"{value!r} is not a run id (1 to {MAX_ID}) or 'last'", param, ctx)


class LanguageType(click.ParamType):
    """A language code as clients have them (de, de_AT, pt-BR)."""

    name = "language"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if not language_folders(value):
            self.fail(f"{value!r} is not a language code (like de or de_AT)", param, ctx)
        return value


class FreeTextType(click.ParamType):
    """Text from a person (a reason, a note): bounded, valid UTF-8, no control characters."""

    name = "text"

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        problem = text_problem(value, self.max_length)
        if problem:
            self.fail(f"the text {problem}", param, ctx)
        return value


class ReasonCodeOption(click.Option):
    """--reason-code: its help lists the codes the config allows (the reason_codes setting,
    read when the help is shown), and the shell completes them."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        codes = _configured_reason_codes(ctx)
        written = self.help
        self.help = " ".join(filter(None, [written, f"Configured: {', '.join(codes)}." if codes is not None
                                           else "(The config does not load now: see its reason_codes.)"]))
        try:
            return super().get_help_record(ctx)
        finally:
            self.help = written

    def shell_complete(self, ctx: click.Context, incomplete: str) -> list[CompletionItem]:
        return [CompletionItem(code) for code in _configured_reason_codes(ctx) or [] if code.startswith(incomplete)]


def _configured_reason_codes(ctx: click.Context) -> list[str] | None:
    """The reason codes of the config the command would use; None if it does not load
    (the help must still come out: the error is for the command itself to report)."""
    # Shell completion parses without running the group's callback: no App yet, so one is
    # made from --config as parsed (else CANCELPROC_CONFIG, else ./config/processor.toml).
    app = ctx.find_object(App) or App(config_path=ctx.find_root().params.get("config_path"), debug=False)
    try:
        return list(app.settings.reason_codes)
    except ConfigError:
        return None
