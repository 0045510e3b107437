"""The list commands' common part: --limit and --offset, the total, and how a page is
printed (a table with "showing 50 of 312" on stderr when more exist; in JSON
{"total": N, "limit": L, "offset": O, "rows": [...]}, documented in docs/json.md)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import click
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from processor.cli.arguments import LIMIT, OFFSET
from processor.cli.output import echo_json, echo_table


@dataclass(frozen=True)
class Page:
    rows: list[dict[str, Any]]
    total: int
    limit: int  # 0: all
    offset: int

    def as_json(self) -> dict[str, Any]:
        return {"total": self.total, "limit": self.limit, "offset": self.offset, "rows": self.rows}


def page_options(default_limit: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--limit (0: all) and --offset, shared by the list commands."""
    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        command = click.option("--offset", type=OFFSET, default=0, show_default=True,
                               help="Skip this many rows first (with --limit, to page through).")(command)
        return click.option("--limit", type=LIMIT, default=default_limit, show_default=True,
                            help="At most this many rows; 0 for all.")(command)
    return decorate


def fetch_page(session: Session, query: Select[Any], row_of: Callable[[Any], dict[str, Any]], *, limit: int,
               offset: int, options: Sequence[Any] = ()) -> Page:
    """The rows of `query` (ordered, filtered; one entity per row) from `offset`, at most
    `limit` of them, and how many there are in all. The eager loads (`options`) are for the
    rows only: the count needs none of them, nor the ordering."""
    total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery())) or 0
    paged = query.options(*options).offset(offset or None)
    if limit:
        paged = paged.limit(limit)
    return Page([row_of(r) for r in session.scalars(paged)], total, limit, offset)


def showing(page: Page) -> str | None:
    """The line a person reads under a table when it is not all there is (None when it is)."""
    shown = len(page.rows)
    if page.offset == 0 and shown >= page.total:
        return None
    where = f", from row {page.offset + 1}" if page.offset and shown else ""
    return f"showing {shown} of {page.total}{where} (--limit, --offset)"


def echo_page(page: Page, columns: Sequence[str], *, as_json: bool, empty: str) -> None:
    """A list command's output: JSON with the total for scripts; for people a table, and on
    stderr (so a pipe gets the table alone) how many more there are."""
    if as_json:
        echo_json(page.as_json())
        return
    rows: Sequence[Mapping[str, Any]] = page.rows
    echo_table(rows, columns, empty=empty if page.total == 0 else f"no rows from offset {page.offset}")
    line = showing(page)
    if line:
        click.echo(line, err=True)
