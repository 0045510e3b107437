"""The keys and types of a JSON document, as docs/json.md writes them: one dotted path
per key (`rows[].id`: the key of each element of an array), and its type (`integer`,
`string`, `boolean`, `date`, `datetime`, `decimal`, `array`, `object`; `|null` when it
may be null). Used by tests/test_json_docs.py to compare the documented and the real."""

from __future__ import annotations

import re
from typing import Any

DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?[+-]\d{2}:\d{2}$")
DECIMAL = re.compile(r"^-?\d+\.\d+$")
TYPES = ("integer", "string", "boolean", "date", "datetime", "decimal", "array", "object", "number")


def kind(value: Any) -> str:
    """The documented type a value can be (the most specific one for a string)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    if DATETIME.match(value):
        return "datetime"
    if DATE.match(value):
        return "date"
    if DECIMAL.match(value):
        return "decimal"
    return "string"


def fits(value_kind: str, documented: str) -> bool:
    """Whether a value of `value_kind` is one the documented type allows (a string type
    takes any text, also one that looks like a date)."""
    allowed = documented.split("|")
    if value_kind in allowed:
        return True
    return "string" in allowed and value_kind in ("date", "datetime", "decimal")


def observe(doc: Any, into: dict[str, set[str]], prefix: str = "") -> dict[str, set[str]]:
    """Every path of `doc` with the kinds of value seen there. An array's elements are one
    path (`[]`); an array of scalars is `array` alone."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            path = f"{prefix}.{key}" if prefix else key
            into.setdefault(path, set()).add(kind(value))
            if isinstance(value, dict):
                observe(value, into, path)
            elif isinstance(value, list):
                for element in value:
                    if isinstance(element, dict):
                        observe(element, into, f"{path}[]")
    elif isinstance(doc, list):  # a top-level array (hooks list)
        for element in doc:
            if isinstance(element, dict):
                observe(element, into, "[]")
    return into
