"""`cancelproc find TEXT`: the clients, services and requests a support person is asked
about, by domain, email, name or the billing system's id (of a client, service or
request; an add-on's or an invoice's finds its service).

Up to three passes per kind, each adding what the one before did not find. Whole
values (any case), which the indexes answer at once: the external ids (unique),
lower(domain) and lower(email) (migration 0008). Then values that start with TEXT, which
the same lower() indexes answer (`--match start`). Then, by default (`--match part`),
TEXT anywhere in a value, also a name: LIKE '%text%', which no b-tree index can answer;
the trigram index of `find_index` (migration 0009) does, for a TEXT of three characters
or more, where the database has it (else the tables are read; README's Performance
section gives both costs on a million services). A client's services and a service's
requests come with it, so an email finds the requests of its client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import click
from sqlalchemy import ColumnElement, Select, and_, func, literal_column, or_, select
from sqlalchemy.orm import Session, joinedload

from processor.cli.app import App, cli, pass_app
from processor.cli.arguments import FreeTextType
from processor.cli.output import echo_json, echo_table
from processor.cli.records import service_row
from processor.cli.requests import listed_request
from processor.find_index import has_find_index, sqlite_holding
from processor.models import CancellationRequest, Client, Invoice, Service, ServiceAddon

MAX_FIND = 200  # characters of TEXT: longer than any domain, email or name we keep
CLIENT_COLUMNS = ["id", "external_id", "name", "company_name", "email", "language"]
SERVICE_COLUMNS = ["id", "external_id", "client", "product", "domain", "status", "next_due_date"]
REQUEST_COLUMNS = ["id", "external_id", "client", "domain", "type", "due_on", "status", "reason_code"]


def _client_row(c: Client) -> dict[str, Any]:
    return {"id": c.id, "external_id": c.external_id, "name": c.name, "company_name": c.company_name,
            "email": c.email, "language": c.language}


def _contains(column: Any, text: str) -> ColumnElement[bool]:
    return func.lower(column).contains(text, autoescape=True)


def _starts(column: Any, text: str, dialect: str) -> ColumnElement[bool]:
    """lower(column) starts with `text`, in the form its index answers (migration 0006).
    SQLite compares text as bytes (UTF-8): every value starting with `text` lies between
    it and `text` + U+10FFFF, the last code point. PostgreSQL orders text by the
    database's collation, where that does not hold; its index is text_pattern_ops, made
    for LIKE 'text%'."""
    lowered = func.lower(column)
    if dialect == "sqlite":
        return and_(lowered >= text, lowered < text + LAST_CODE_POINT)
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return lowered.like(escaped + "%", escape="\\")


LAST_CODE_POINT = "\U0010ffff"


def _matches(session: Session, query: Select[Any], passes: Sequence[ColumnElement[bool] | None], limit: int,
             order: Any) -> tuple[list[Any], bool]:
    """Up to `limit` rows: those of the first pass (whole values), then of the next ones
    (the start, then any part) not found before; and whether there are more."""
    found: list[Any] = []
    for n, clause in enumerate(passes):
        if clause is None or len(found) > limit:
            continue
        clauses = [clause, order.notin_([row.id for row in found])] if found else [clause]
        # The part pass, ordered by `id + 0`, which no index gives: PostgreSQL cannot tell how few
        # rows a LIKE '%text%' matches and, to find the first ones by id, walks the primary key
        # and filters every row (seconds on a million) instead of asking the trigram index.
        by = order + 0 if n == len(passes) - 1 and session.get_bind().dialect.name == "postgresql" else order
        found += list(session.scalars(query.where(*clauses).order_by(by).limit(limit + 1 - len(found))).unique())
    return found[:limit], len(found) > limit


MATCHES = ("whole", "start", "part")


def search(session: Session, text: str, *, match: str, limit: int,
           request_row: Callable[[CancellationRequest], dict[str, Any]],
           service_row_of: Callable[[Service], dict[str, Any]]) -> dict[str, Any]:
    """What `find` shows: for each kind {"rows": [...], "more": bool}. `match`: how much
    of a value TEXT may be (one of MATCHES); each wider one adds a pass after the others."""
    low = text.lower()
    dialect = session.get_bind().dialect.name
    start, part = match in ("start", "part"), match == "part"
    # SQLite: any part through the FTS5 trigram tables where they are (migration 0009);
    # PostgreSQL's trigram indexes answer the LIKE of `_contains` as it is.
    fts = part and dialect == "sqlite" and has_find_index(session.connection())

    def holding(id_column: Any, kind: str, like: ColumnElement[bool]) -> ColumnElement[bool]:
        indexed = sqlite_holding(id_column, kind, text) if fts else None
        return like if indexed is None else indexed

    def passes(whole: ColumnElement[bool], starts: ColumnElement[bool] | None,
               parts: ColumnElement[bool]) -> list[ColumnElement[bool] | None]:
        return [whole, starts if start else None, parts if part else None]

    clients, more_clients = _matches(session, select(Client), passes(
        or_(Client.external_id == text, func.lower(Client.email) == low),
        _starts(Client.email, low, dialect),
        holding(Client.id, "clients", or_(
            _contains(Client.email, low), _contains(Client.first_name + literal_column("' '") + Client.last_name, low),
            _contains(Client.company_name, low), _contains(Client.external_id, low)))),
        limit, Client.id)
    client_ids = [c.id for c in clients]
    # An add-on's or an invoice's id from the billing system finds its service. Looked up
    # first, so the pass below is an OR of indexed conditions (PostgreSQL reads the whole
    # table for an OR with a subquery in it).
    owners = [*session.scalars(select(ServiceAddon.service_id).where(ServiceAddon.external_id == text)),
              *session.scalars(select(Invoice.service_id).where(Invoice.external_id == text))]
    services, more_services = _matches(
        session, select(Service).options(joinedload(Service.client), joinedload(Service.product)), passes(
            or_(Service.external_id == text, func.lower(Service.domain) == low, Service.client_id.in_(client_ids),
                Service.id.in_(owners)),
            _starts(Service.domain, low, dialect),
            holding(Service.id, "services", or_(
                _contains(Service.domain, low), _contains(Service.external_id, low)))),
        limit, Service.id)
    service_ids = [s.id for s in services]
    r = CancellationRequest
    requests, more_requests = _matches(
        session, select(r).options(joinedload(r.service).joinedload(Service.client)), passes(
            or_(r.external_id == text, r.service_id.in_(service_ids)), None,
            holding(r.id, "cancellation_requests", _contains(r.external_id, low))),
        limit, r.id)
    return {"query": text,
            "clients": {"rows": [_client_row(c) for c in clients], "more": more_clients},
            "services": {"rows": [service_row_of(s) for s in services], "more": more_services},
            "requests": {"rows": [request_row(q) for q in requests], "more": more_requests}}


@cli.command("find")
@click.argument("text", type=FreeTextType(MAX_FIND))
@click.option("--match", type=click.Choice(MATCHES), default="part", show_default=True,
              help="How much of a value TEXT is: the whole of it (an external id, a domain, an email), its start "
                   "(a domain, an email), or any part (also a name). All three are index lookups (any part: from "
                   "three characters, docs/deploy.md).")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="At most this many clients, services and requests each.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: query, and clients, services and requests each as rows and more (docs/json.md).")
@pass_app
def find(app: App, text: str, match: str, limit: int, as_json: bool) -> None:
    """Clients, services and requests by domain, email, name or external id.

    Any case; any part of a value unless --match says otherwise. Whole matches come
    first, then those that start with TEXT, then the others; a client's services and a
    service's requests come with it.

    \b
    Examples:
      cancelproc find novak.test
      cancelproc find alice@example.com --match whole --json
    """
    text = text.strip()
    if not text:
        raise click.BadParameter("say what to look for", param_hint="'TEXT'")
    with app.database().read_session() as session:
        found = search(session, text, match=match, limit=limit,
                       request_row=listed_request, service_row_of=service_row)
    if as_json:
        echo_json(found)
        return
    _echo_found(found, limit)


def _echo_found(found: dict[str, Any], limit: int) -> None:
    if not any(found[kind]["rows"] for kind in ("clients", "services", "requests")):
        click.echo(f"nothing matches {found['query']!r}")
        return
    sections: Sequence[tuple[str, list[str]]] = (("clients", CLIENT_COLUMNS), ("services", SERVICE_COLUMNS),
                                                 ("requests", REQUEST_COLUMNS))
    for kind, columns in sections:
        rows = found[kind]["rows"]
        if not rows:
            continue
        click.echo(f"{kind}:")
        echo_table(rows, columns)
        if found[kind]["more"]:
            click.echo(f"  ... more than {limit} {kind} (--limit, or a longer TEXT)")
