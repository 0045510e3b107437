"""What the command line accepts, as click parameter types: each checks its value before
anything touches the database, and says in one line what is wrong and what is allowed."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import click

from processor.emails import language_folders
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
COUNT = click.IntRange(1, MAX_ID)  # --limit


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
