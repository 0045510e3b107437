"""A nightly job that failed before its run began: the record `status` and the metrics read,
and the staff's "Cron Job Attention Needed" email, once per failure streak.

A hook file that does not load, a bad template, an unreachable database: the command
stops before a run record exists, so the runs table cannot tell. The database may be the
thing that is broken, so the record is a small JSON file, `var/cancelproc-attention.json`
under the app root (next to the logs and the metrics file), written atomically (a temp
file renamed). It is removed when a run begins and completes (docs/deploy.md).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import asdict, dataclass
from email.mime.text import MIMEText
from email.utils import formatdate, make_msgid
from pathlib import Path

from processor.files import write_atomically
from processor.mailers import Mailer

STATE_FILE = Path("var") / "cancelproc-attention.json"


@dataclass
class Attention:
    command: str  # what failed: "run", "schedule"
    error: str  # its one-line error
    first_failed_at: str  # ISO 8601 UTC: when this streak of failures began
    last_failed_at: str
    failures: int  # in this streak
    staff_notified: bool  # the attention email went out for this streak

    def line(self) -> str:
        """The one line `status` prints."""
        again = f" ({self.failures} times since {self.first_failed_at})" if self.failures > 1 else ""
        return f"`cancelproc {self.command}` failed before its run began at {self.last_failed_at}{again}: {self.error}"


def state_path(app_root: Path) -> Path:
    return app_root / STATE_FILE


def read(path: Path) -> Attention | None:
    """The record, or None when the last attempt began its run. A file that is not a record
    (cut short, edited) still says something failed."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return Attention("run", f"{path} cannot be read: {exc.strerror}", "?", "?", 1, True)
    try:
        return Attention(**json.loads(text))
    except (ValueError, TypeError):
        return Attention("run", f"{path} is unreadable", "?", "?", 1, True)


def record_failure(path: Path, command: str, error: str, now: dt.datetime) -> Attention:
    """Count one more failure into the streak (a new streak if none is recorded)."""
    at = now.astimezone(dt.UTC).isoformat(timespec="seconds")
    previous = read(path)
    if previous is None:
        attention = Attention(command, error, at, at, 1, False)
    else:
        attention = Attention(command, error, previous.first_failed_at, at, previous.failures + 1,
                              previous.staff_notified)
    write(path, attention)
    return attention


def write(path: Path, attention: Attention) -> None:
    """Atomically: a reader sees the old record or the new, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(asdict(attention)).encode(), temp_prefix=".attention-")


def clear(path: Path) -> None:
    """A run began and completed: the streak is over."""
    path.unlink(missing_ok=True)


def email(attention: Attention, *, from_address: str, to_address: str, host: str) -> MIMEText:
    """WHMCS's "Cron Job Attention Needed", as plain text built here: the templates may be
    the very thing that is broken, and the database (the outbox) too."""
    body = (f"The nightly cancellation job on {host} did not run.\n\n"
            f"{attention.line()}\n\n"
            "No request was touched; the next run catches up once this is fixed.\n"
            "Check it with: cancelproc status\n"
            "You get this email once per streak of failures; `status` shows it until a run completes.\n")
    message = MIMEText(body, "plain", "utf-8")
    message["Subject"] = f"Cron Job Attention Needed - cancelproc {attention.command} on {host}"
    message["From"] = from_address
    message["To"] = to_address
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain=from_address.rpartition("@")[2] or None)
    return message


def notify_staff(mailer: Mailer, attention: Attention, *, from_address: str, to_address: str, host: str) -> None:
    """Send the attention email straight through the mailer (not the outbox: the database
    may be down). Raises what the mailer raises."""
    try:
        mailer.send(email(attention, from_address=from_address, to_address=to_address, host=host),
                    sender=from_address, recipient=to_address,
                    name="attention-" + re.sub(r"\D", "", attention.first_failed_at))
        mailer.flush()
    finally:
        mailer.close()
