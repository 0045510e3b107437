"""Mail backends: how one email leaves (an SMTP server, an .eml file in a folder, the
console), and the message built from an outbox row (headers, parts, Message-ID).

`delivery.py` decides what to send and records what happened; a backend only sends and
says how it went: `SendFailed` (this message; `permanent` when retrying cannot help) or
`MailerDown` (the backend itself: stop, keep the rest queued).

Backends: `smtp` (production), `folder` (an .eml file per email: the embedded default),
`console` (stderr, for development).
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import os
import re
import smtplib
import socket
import ssl
import sys
import time
from collections.abc import Callable, Mapping
from email.charset import QP, Charset
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.parser import BytesHeaderParser
from email.utils import format_datetime, formataddr
from pathlib import Path
from typing import IO, Any, Protocol

import psutil
import structlog
from sqlalchemy import Row

from processor.config import Settings, SmtpSettings
from processor.errors import ConfigError, one_line
from processor.files import write_atomically


class SendFailed(Exception):
    """This email could not be sent. Permanent (a 5xx answer): retrying will not help."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class MailerDown(Exception):
    """The backend cannot send anything now (server unreachable or stalled, login refused,
    folder not writable): delivery stops, the rest stays queued."""


class Mailer(Protocol):
    description: str  # for messages: "smtp mail.example.com:587 (starttls)"
    # True: a send that returned is already for good (an SMTP server's 250), so each is
    # recorded as sent at once. False: `flush` makes a batch durable, then it is recorded.
    durable_at_send: bool

    def start(self) -> None:
        """Called once per delivery by the lease holder, before the first send (the folder
        removes what a killed writer left). Never raises."""

    def send(self, message: Message, *, sender: str, recipient: str, name: str) -> None:
        """Send one message or raise SendFailed / MailerDown. `name` is a file-safe id."""

    def flush(self) -> None:
        """Make what was sent so far durable, or raise MailerDown: called before a batch is
        recorded as sent (an SMTP server's 250 already is)."""

    def close(self) -> None: ...


# --- messages --------------------------------------------------------------------------

def message_id(email_id: int, key: str, created_at: dt.datetime, from_address: str) -> str:
    """Deterministic per outbox row: a resend after a crash carries the same Message-ID, so
    the receiving side can tell it is the same message. The hash of the row's key and time
    keeps ids of two databases (staging, production) apart; short, so the header is not folded."""
    domain = from_address.rpartition("@")[2] or "localhost"
    digest = hashlib.sha256(f"{key}|{created_at.isoformat()}".encode()).hexdigest()[:16]
    return f"<cancelproc.{email_id}.{digest}@{domain}>"


# UTF-8 parts in quoted-printable: readable in an .eml file, 7-bit safe for any SMTP server.
_UTF8 = Charset("utf-8")
_UTF8.body_encoding = QP


def build_message(row: Row[Any] | Any, company_name: str) -> Message:
    """The multipart (text + HTML) message of an outbox row.

    Built with the email.mime classes: the newer EmailMessage API costs three times as
    much per message (it parses every header it is given), which a delivery of a
    hundred thousand emails would feel.
    """
    message = MIMEMultipart("alternative")
    message["From"] = formataddr((company_name, row.from_address), charset="utf-8")
    message["To"] = row.to_address
    # A Header object for a non-ASCII subject (typeshed types header values as str only).
    message["Subject"] = row.subject if row.subject.isascii() else Header(row.subject, "utf-8")  # type: ignore[assignment]
    message["Date"] = format_datetime(row.created_at)
    message["Message-ID"] = message_id(row.id, row.key, row.created_at, row.from_address)
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation auto-replies, please
    # A Charset object (quoted-printable bodies) where typeshed allows only a name.
    message.attach(MIMEText(row.text_body, "plain", _UTF8))  # type: ignore[arg-type]
    message.attach(MIMEText(row.html_body, "html", _UTF8))  # type: ignore[arg-type]
    return message


# --- backends --------------------------------------------------------------------------

# A temp file of ours: ".cancelproc.<host>.<pid>.<8 random chars>.tmp" (mkstemp's random
# part), so the next delivery can tell whose it is; ".<8 random chars>.tmp" is what versions
# before 2026-11-30 wrote (no writer named: removed by age only).
_TEMP = re.compile(r"\.cancelproc\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>[0-9]+)\.[a-z0-9_]{8}\.tmp")
_OLD_TEMP = re.compile(r"\.[a-z0-9_]{8}\.tmp")


def _file_safe_host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname()) or "localhost"


def _process_gone(pid: int) -> bool:
    """True when no process `pid` runs on this host (or only its zombie: killed, not reaped)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


class FolderMailer:
    """An .eml file per email, named by outbox id and template. Each file is synced to disk
    before it is renamed to its final name, and the folder before its batch is recorded as
    sent: a power cut after the record must not lose the email (a mail relay may be
    waiting on the folder). A file already there under its final name with this message's
    Message-ID was written by a sender killed before its record: it is not written again.

    `stale_after`: a temp file untouched this long (seconds) is a dead writer's even when
    its process cannot be checked (another host, or the name of an older version). One
    message is written in milliseconds; the default is the delivery lease's length, after
    which any sender that was still at work has lost its lease to the next one."""

    durable_at_send = False

    def __init__(self, folder: Path, *, stale_after: float = 600) -> None:
        self.folder = folder
        self.stale_after = stale_after
        self.description = f"folder {folder}"
        self._host = _file_safe_host()
        self.log = structlog.get_logger("cancelproc.email")

    def start(self) -> None:
        """Remove the temp files a killed writer left (a whole message each, mode 0600)."""
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return  # no folder yet (the first send creates it), or unreadable: the send will say so
        now = time.time()
        for entry in entries:
            if not entry.name.endswith(".tmp") or not self._stale(entry, now):
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                self.log.warning("cannot remove a temp file a killed delivery left", file=entry.path,
                                 error=exc.strerror or str(exc))
                continue
            self.log.info("removed a temp file a killed delivery left", file=entry.path)

    def _stale(self, entry: os.DirEntry[str], now: float) -> bool:
        """Ours, and its writer is gone: dead on this host, or silent for `stale_after`."""
        ours = _TEMP.fullmatch(entry.name)
        if ours is None and _OLD_TEMP.fullmatch(entry.name) is None:
            return False  # not a name we write: not ours to remove
        if ours is not None and ours["host"] == self._host and int(ours["pid"]) != os.getpid() \
                and _process_gone(int(ours["pid"])):
            return True
        try:
            return now - entry.stat(follow_symlinks=False).st_mtime > self.stale_after
        except OSError:
            return False

    def _already_written(self, final: Path, message: Message) -> bool:
        """The file `final` holds this very message (same Message-ID). A file under that name
        from elsewhere (an outbox folder shared with another database) is replaced, as before."""
        try:
            with final.open("rb") as f:
                found = BytesHeaderParser().parse(f)["Message-ID"]
        except FileNotFoundError:
            return False
        if found == message["Message-ID"]:
            self.log.info("email already in the outbox folder (its sender was stopped before recording it): "
                          "recorded as sent, not written again", file=str(final))
            return True
        self.log.warning("replacing a file of another message in the outbox folder", file=str(final),
                         message_id=str(found))
        return False

    def send(self, message: Message, *, sender: str, recipient: str, name: str) -> None:
        final = self.folder / f"{name}.eml"
        try:
            if self._already_written(final, message):
                return
            self.folder.mkdir(parents=True, exist_ok=True)
            # The temp name says whose it is: the next sender removes those a killed one left.
            write_atomically(final, message.as_bytes(), temp_prefix=f".cancelproc.{self._host}.{os.getpid()}.")
        except OSError as exc:
            raise MailerDown(f"{self.description}: cannot write: {exc.strerror or exc}") from None

    def flush(self) -> None:
        """The renames of the batch are entries of the folder: sync it."""
        try:
            fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except FileNotFoundError:
            pass  # nothing was written: the folder is created by the first send
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOTSUP):
                return  # a file system that cannot sync a folder (some network mounts): the files are synced
            raise MailerDown(f"{self.description}: cannot sync: {exc.strerror or exc}") from None

    def close(self) -> None:
        pass


class ConsoleMailer:
    """Prints each email (for development)."""

    description = "console"
    durable_at_send = False

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream

    def send(self, message: Message, *, sender: str, recipient: str, name: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(f"----- email {name} (envelope {sender} -> {recipient}) -----\n")
        stream.write(message.as_string())
        stream.write("\n")
        stream.flush()

    def start(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class SmtpMailer:
    """One connection for a whole delivery, opened at the first email. The server's 250
    after a message means it has it: each is recorded as sent at once."""

    durable_at_send = True

    def __init__(self, settings: SmtpSettings, password: str | None, ca_file: Path | None) -> None:
        self.settings = settings
        self._password = password
        self._ca_file = ca_file
        self._smtp: smtplib.SMTP | None = None
        self.description = f"smtp {settings.host}:{settings.port} ({settings.security})"

    def _connect(self) -> smtplib.SMTP:
        s = self.settings
        context = ssl.create_default_context(cafile=str(self._ca_file) if self._ca_file else None)
        smtp: smtplib.SMTP | None = None
        try:
            if s.security == "ssl":
                smtp = smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout_seconds, context=context)
            else:
                smtp = smtplib.SMTP(s.host, s.port, timeout=s.timeout_seconds)
            smtp.ehlo()
            if s.security == "starttls":
                smtp.starttls(context=context)
                smtp.ehlo()
            if s.username:
                smtp.login(s.username, self._password or "")
            return smtp
        except smtplib.SMTPAuthenticationError as exc:
            _quit(smtp)
            raise MailerDown(f"{self.description}: login as {s.username!r} refused: {_reply(exc)}") from None
        except smtplib.SMTPNotSupportedError as exc:
            _quit(smtp)
            raise MailerDown(f"{self.description}: {exc} (check email.smtp.security)") from None
        except (smtplib.SMTPException, OSError) as exc:
            _quit(smtp)
            raise MailerDown(f"{self.description}: cannot connect: {_describe(exc)}") from None

    def start(self) -> None:
        pass  # connected at the first email: a delivery with nothing to send opens nothing

    def send(self, message: Message, *, sender: str, recipient: str, name: str) -> None:
        if self._smtp is None:
            self._smtp = self._connect()
        try:
            self._smtp.send_message(message, from_addr=sender, to_addrs=[recipient])
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))
            raise SendFailed(f"recipient refused: {code} {_text(text)}", permanent=code >= 500) from None
        except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
            if exc.smtp_code == 421:  # the server is closing the connection
                self.close()
                raise MailerDown(f"{self.description}: {_reply(exc)}") from None
            raise SendFailed(f"refused: {_reply(exc)}", permanent=exc.smtp_code >= 500) from None
        except (smtplib.SMTPException, OSError) as exc:
            self.close()
            raise MailerDown(f"{self.description}: {_describe(exc)}") from None

    def flush(self) -> None:
        pass  # the server's 250 after each message: it has it

    def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        _quit(smtp)


def _quit(smtp: smtplib.SMTP | None) -> None:
    if smtp is None:
        return
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()


def _text(value: bytes | str) -> str:
    return (value.decode("utf-8", "replace") if isinstance(value, bytes) else value).replace("\n", " ").strip()


def _reply(exc: smtplib.SMTPResponseException) -> str:
    return f"{exc.smtp_code} {_text(exc.smtp_error)}"


def _describe(exc: BaseException) -> str:
    # smtplib reports a timeout while reading a reply as a disconnection "...: timed out".
    if isinstance(exc, TimeoutError) or (isinstance(exc, smtplib.SMTPServerDisconnected) and "timed out" in str(exc)):
        return "no answer (timed out; email.smtp.timeout_seconds)"
    if isinstance(exc, smtplib.SMTPResponseException):
        return _reply(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return one_line(exc)


def smtp_password(settings: SmtpSettings, app_path: Callable[[str], Path], environ: Mapping[str, str]) -> str | None:
    """The SMTP password: from the environment variable named by password_env, else from
    password_file. Never logged, never part of a message."""
    if settings.password_env and environ.get(settings.password_env):
        return environ[settings.password_env]
    if settings.password_file:
        path = app_path(settings.password_file)
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"email.smtp.password_file: cannot read {path}: "
                              f"{getattr(exc, 'strerror', None) or exc.__class__.__name__}") from None
    return None


def mailer_from_settings(settings: Settings, environ: Mapping[str, str] | None = None) -> Mailer:
    email = settings.email
    if email.delivery == "folder":
        return FolderMailer(settings.path(email.outbox_dir), stale_after=settings.lease_seconds)
    if email.delivery == "console":
        return ConsoleMailer()
    smtp = email.smtp
    password = smtp_password(smtp, settings.path, os.environ if environ is None else environ)
    if smtp.username and password is None:
        raise ConfigError(f"email.smtp.username is {smtp.username!r} but there is no password: set the environment "
                          f"variable {smtp.password_env or '(email.smtp.password_env)'} or email.smtp.password_file")
    return SmtpMailer(smtp, password, settings.path(smtp.ca_file) if smtp.ca_file else None)
