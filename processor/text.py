"""Free text from people and files (a reason, a note, a name): what is accepted.

Checked where it comes in (the CLI, the importer), so the database never sees what it
would refuse (PostgreSQL refuses NUL) and an email or a log line never carries what
would break it.
"""

from __future__ import annotations

import re

# A client's reason: WHMCS keeps it in a TEXT column (65,535 bytes), so no reason an
# import brings from there is refused; a bound still, for the emails and the logs.
MAX_REASON = 65_535
MAX_NOTE = 1000  # a staff note in the audit log

# Control characters other than tab and line breaks; lone surrogates (bytes that were not
# UTF-8, as Python decodes them from argv).
_UNWANTED = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def text_problem(value: str, max_length: int | None = None) -> str | None:
    """Why `value` is not acceptable free text, or None."""
    if max_length is not None and len(value) > max_length:
        return f"is {len(value)} characters long; at most {max_length} are allowed"
    found = _UNWANTED.search(value)
    if found is None:
        return None
    ch = found.group()
    if "\ud800" <= ch <= "\udfff":
        return "is not valid UTF-8 text"
    return f"contains the control character U+{ord(ch):04X}"
