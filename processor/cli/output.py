"""Printing for the CLI: aligned tables for people, JSON for scripts."""

from __future__ import annotations

import datetime as dt
import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import click
import structlog


def to_jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=to_jsonable, sort_keys=True, ensure_ascii=False)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, default=to_jsonable, sort_keys=True, indent=2, ensure_ascii=False))


# Where the command's business time zone is kept for the tables (click's shared `meta`,
# set by the App once the settings are read): people read times in it, with its
# abbreviation; JSON keeps ISO 8601 with the offset.
ZONE_KEY = "cancelproc.zone"


def local_time(moment: dt.datetime) -> str:
    """A moment as people at the business read it: '2026-11-30 21:20 CET'."""
    ctx = click.get_current_context(silent=True)
    zone = ctx.meta.get(ZONE_KEY) if ctx is not None else None
    return moment.astimezone(zone or dt.UTC).strftime("%Y-%m-%d %H:%M %Z")


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, dt.datetime):
        return local_time(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def echo_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], empty: str = "nothing to show") -> None:
    """Columns aligned to their widest cell; headers from the column names."""
    if not rows:
        click.echo(empty)
        return
    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def echo_fields(pairs: Iterable[tuple[str, Any]]) -> None:
    """A record as 'name: value' lines, names aligned."""
    pairs = list(pairs)
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        click.echo(f"{k.ljust(width)}  {cell(v)}")


def log_report(event: str, data: Mapping[str, Any], *, problem: bool = False) -> None:
    """A command's report as one log event (JSON off a terminal), its values as --json has
    them: what cron's log and the journal get instead of text for people on stdout."""
    log = structlog.get_logger("cancelproc")
    (log.warning if problem else log.info)(event, **json.loads(dumps(dict(data))))
