"""Text from people and files: what is accepted, each rule once.

Free text (a reason, a note, a name), a value that goes into an email header, an email
address. Checked where it comes in (the CLI, the config, the importer) and again where
it goes out (queueing, delivery), so the database never sees what it would refuse
(PostgreSQL refuses NUL) and an email or a log line never carries what would break it.
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


# Any control character: in a header a line break would let a value add headers of its
# own (Bcc: ...), and the others have no place there either.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NOT_IN_AN_ADDRESS = re.compile(r'[\s,;<>"()]')  # more than one address, a display name, a comment
# The same for a printable address, whose only whitespace can be the space (the fast path).
_NOT_IN_A_PRINTABLE_ADDRESS = frozenset(' ,;<>"()')


def header_problem(value: str) -> str | None:
    """Why this value may not go into an email header, or None. (Kept cheap: this runs twice
    per email, on every email of a run.)"""
    if value.isprintable():  # no control character is printable: the common case, without the regex
        return None
    found = _CONTROL.search(value)
    if found is None:
        return None
    return "contains a line break" if found.group() in "\r\n" else f"contains control character {found.group()!r}"


def address_problem(address: str | None) -> str | None:
    """Why this is not one usable recipient address (name@example.com), or None. The one
    rule for the settings, the importer, queueing and delivery."""
    if not address or not address.strip():
        return "no email address"
    problem = header_problem(address)
    if problem:
        return problem
    local, _, domain = address.partition("@")
    if not local or not domain or "@" in domain or (
            not _NOT_IN_A_PRINTABLE_ADDRESS.isdisjoint(address) if address.isprintable()
            else _NOT_IN_AN_ADDRESS.search(address)):
        return "not a single email address"
    return None
