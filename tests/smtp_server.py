"""A real SMTP server for the tests: aiosmtpd on 127.0.0.1, optionally with STARTTLS,
implicit TLS and AUTH (certificates from trustme), recording every message it accepts."""

from __future__ import annotations

import email
import email.policy
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

HOST = "127.0.0.1"
HOLD_LIMIT = 120.0  # a held message is taken after this even if the test never lets it go


def free_port() -> int:
    """A port nothing listens on now, for a test about a server that is not there (yet).
    A server of the tests binds port 0 itself instead (OwnPortController): a port picked
    here and bound later could be taken in between by another pytest-xdist worker."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class OwnPortController(Controller):
    """aiosmtpd's Controller that can listen on port 0 (the kernel picks a free one, no race
    with other workers) and reads the port back before its first connection to itself."""

    def _trigger_server(self) -> None:
        if self.port == 0:
            assert self.server is not None and self.server.sockets
            self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    authenticated_as: str | None
    tls: bool


@dataclass
class Handler:
    """Accepts everything, except recipients listed in `refuse` (address -> SMTP reply)."""

    received: list[Received] = field(default_factory=list)
    refuse: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before accepting each message
    # Hold each message until this is set (at most HOLD_LIMIT): a relay stalled for as long
    # as the test wants, without assuming how long the client takes to give up.
    hold: threading.Event | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay:
            time.sleep(self.delay)  # blocks the server's loop: a slow server, as seen from the client
        if self.hold is not None:
            self.hold.wait(HOLD_LIMIT)  # blocks the loop too
        message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
        with self.lock:
            self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), message,  # type: ignore[arg-type]
                                          login, server.transport.get_extra_info("ssl_object") is not None))
        return "250 Message accepted for delivery"

    def message_ids(self) -> list[str]:
        with self.lock:
            return [r.message["Message-ID"] for r in self.received]


@dataclass
class SmtpServer:
    handler: Handler
    port: int
    ca_file: Path | None = None
    username: str = ""
    password: str = ""

    @property
    def received(self) -> list[Received]:
        return self.handler.received


class Certificates:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost."""

    def __init__(self, folder: Path) -> None:
        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert(HOST, "localhost")
        self.ca_file = folder / "test-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(context)
        return context


@contextmanager
def smtp_server(folder: Path, *, security: str = "none", username: str = "", password: str = "",
                handler: Handler | None = None, port: int | None = None) -> Iterator[SmtpServer]:
    """Run a server for the duration of the block. security: none, starttls or ssl."""
    handler = handler or Handler()
    kwargs: dict[str, Any] = {}
    ca_file = None
    if security != "none":
        certs = Certificates(folder)
        ca_file = certs.ca_file
        if security == "starttls":
            kwargs.update(tls_context=certs.server_context(), require_starttls=True)
        else:
            kwargs.update(ssl_context=certs.server_context())
    if username:
        def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
            ok = (isinstance(auth_data, LoginPassword) and auth_data.login.decode() == username
                  and auth_data.password.decode() == password)
            return AuthResult(success=ok, handled=False, auth_data=auth_data)
        # Implicit TLS is TLS from the first byte; aiosmtpd's own check only knows STARTTLS.
        kwargs.update(authenticator=authenticator, auth_required=True, auth_require_tls=security == "starttls")
    # ready_timeout: how long start() waits for the server's thread; generous, for a loaded machine.
    controller = OwnPortController(handler, hostname=HOST, port=port or 0, server_hostname="localhost",
                                   ready_timeout=60, **kwargs)
    controller.start()
    try:
        yield SmtpServer(handler, controller.port, ca_file, username, password)
    finally:
        controller.stop()


def smtp_settings(server: SmtpServer, security: str = "none") -> dict[str, Any]:
    """The [email] settings that point at this server."""
    return {"delivery": "smtp", "smtp": {"host": HOST, "port": server.port, "security": security,
                                         "username": server.username, "timeout_seconds": 5,
                                         "ca_file": str(server.ca_file) if server.ca_file else ""}}


def smtp_env(port: int, **more: str) -> dict[str, str]:
    """The CANCELPROC_* variables that send to this test's server at 127.0.0.1:port, in the
    clear and without a login; `more` adds or replaces variables."""
    return {"CANCELPROC_EMAIL__DELIVERY": "smtp", "CANCELPROC_EMAIL__SMTP__HOST": HOST,
            "CANCELPROC_EMAIL__SMTP__PORT": str(port), "CANCELPROC_EMAIL__SMTP__SECURITY": "none",
            "CANCELPROC_EMAIL__SMTP__USERNAME": "", **more}
