"""Reading an import file: CSV with a header row, or JSON Lines, as numbered rows of raw values."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processor.errors import InputError

CSV_SUFFIXES = frozenset({".csv"})
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json"})


@dataclass
class ParsedFile:
    """A file's rows, not yet validated."""

    columns: list[str]  # CSV header, or the keys of the first JSON object
    rows: list[tuple[int, dict[str, Any]]]  # (line number, column -> value)
    jsonl: bool


def read_file(path: Path) -> ParsedFile:
    """Parse a CSV or JSON Lines file into numbered rows; InputError if it is not readable."""
    text = _read_text(path)
    return _read_jsonl(path, text) if _is_jsonl(path, text) else _read_csv(path, text)


def _column_name(name: str) -> str:
    # Spreadsheets add stray spaces and capitals to headers; the names themselves are fixed.
    return name.strip().lower()


def _read_text(path: Path) -> str:
    """The file as text: UTF-8, with or without a BOM (spreadsheet exports add one)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x}); save the file as UTF-8") from None
    if not text.strip():
        raise InputError(f"{path}: file is empty")
    return text


def _is_jsonl(path: Path, text: str) -> bool:
    """JSON Lines by suffix; with an unknown suffix, by whether the text starts with an object."""
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return False
    if suffix in JSONL_SUFFIXES:
        return True
    return text.lstrip().startswith("{")


def _read_csv(path: Path, text: str) -> ParsedFile:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    rows: list[tuple[int, dict[str, Any]]] = []
    end = 0  # physical line where the previous record ended
    try:
        for record in reader:
            start, end = end + 1, reader.line_num  # a quoted cell may span lines: report the first
            if not any(cell.strip() for cell in record):
                continue  # blank line
            if header is None:
                header = [_column_name(c) for c in record]
                _check_unique(path, start, header)
                continue
            if len(record) != len(header):
                raise InputError(f"{path}:{start}: {len(record)} fields, the header has {len(header)}")
            rows.append((start, dict(zip(header, record, strict=True))))
    except csv.Error as exc:
        raise InputError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None
    assert header is not None  # _read_text refused a blank file
    return ParsedFile(header, rows, jsonl=False)


def _read_jsonl(path: Path, text: str) -> ParsedFile:
    rows: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: malformed JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{number}: expected one JSON object per line, got {type(obj).__name__}")
        keys = [_column_name(k) for k in obj]
        _check_unique(path, number, keys)
        rows.append((number, dict(zip(keys, obj.values(), strict=True))))
    return ParsedFile(list(rows[0][1]), rows, jsonl=True)


def _check_unique(path: Path, line: int, names: list[str]) -> None:
    """Two columns of one name (after trimming and lower-casing) are refused."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InputError(f"{path}:{line}: column {name!r} appears twice")
        seen.add(name)
