"""`cancelproc find TEXT`: the clients, services and requests a support person is asked
about, by domain, email, name or the billing system's id (of a client, service or
request; an add-on's or an invoice's finds its service).

Two passes per kind. First the exact matches (any case), which the indexes answer at
once: the external ids (unique), lower(domain) and lower(email) (migration 0006). Then,
unless --exact, the partial matches (any case, anywhere in the text): LIKE '%text%',
which no b-tree index can answer, so it reads the table; README's Performance section
gives what that costs on a million services. A client's services and a service's
requests come with it, so an email finds the requests of its client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import click
from sqlalchemy import ColumnElement, Select, func, or_, select
from sqlalchemy.orm import Session, joinedload

from processor.cli.app import App, cli, pass_app
from processor.cli.arguments import FreeTextType
from processor.cli.output import echo_json, echo_table
from processor.cli.records import service_row
from processor.cli.requests import listed_request
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


def _matches(session: Session, query: Select[Any], exact: ColumnElement[bool], partial: ColumnElement[bool] | None,
             limit: int, order: Any) -> tuple[list[Any], bool]:
    """Up to `limit` rows: the exact matches, then (with `partial`) the others; and whether
    there are more."""
    found = list(session.scalars(query.where(exact).order_by(order).limit(limit + 1)).unique())
    if partial is not None and len(found) <= limit:
        clauses = [partial, order.notin_([row.id for row in found])] if found else [partial]
        more = query.where(*clauses).order_by(order).limit(limit + 1 - len(found))
        found += list(session.scalars(more).unique())
    return found[:limit], len(found) > limit


def search(session: Session, text: str, *, exact_only: bool, limit: int,
           request_row: Callable[[CancellationRequest], dict[str, Any]],
           service_row_of: Callable[[Service], dict[str, Any]]) -> dict[str, Any]:
    """What `find` shows: for each kind {"rows": [...], "more": bool}."""
    low = text.lower()
    clients, more_clients = _matches(
        session, select(Client),
        or_(Client.external_id == text, func.lower(Client.email) == low),
        None if exact_only else or_(_contains(Client.email, low), _contains(Client.first_name + " " + Client.last_name,
                                                                            low),
                                    _contains(Client.company_name, low), _contains(Client.external_id, low)),
        limit, Client.id)
    client_ids = [c.id for c in clients]
    services, more_services = _matches(
        session, select(Service).options(joinedload(Service.client), joinedload(Service.product)),
        or_(Service.external_id == text, func.lower(Service.domain) == low, Service.client_id.in_(client_ids),
            # an add-on's or an invoice's id from the billing system finds its service
            Service.id.in_(select(ServiceAddon.service_id).where(ServiceAddon.external_id == text)),
            Service.id.in_(select(Invoice.service_id).where(Invoice.external_id == text))),
        None if exact_only else or_(_contains(Service.domain, low), _contains(Service.external_id, low)),
        limit, Service.id)
    service_ids = [s.id for s in services]
    r = CancellationRequest
    requests, more_requests = _matches(
        session, select(r).options(joinedload(r.service).joinedload(Service.client)),
        or_(r.external_id == text, r.service_id.in_(service_ids)),
        None if exact_only else _contains(r.external_id, low),
        limit, r.id)
    return {"query": text,
            "clients": {"rows": [_client_row(c) for c in clients], "more": more_clients},
            "services": {"rows": [service_row_of(s) for s in services], "more": more_services},
            "requests": {"rows": [request_row(q) for q in requests], "more": more_requests}}


@cli.command("find")
@click.argument("text", type=FreeTextType(MAX_FIND))
@click.option("--exact", is_flag=True,
              help="Only whole matches (any case) of an external id, domain or email: answered by the indexes "
                   "at once, where a partial match reads the tables.")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="At most this many clients, services and requests each.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: query, and clients, services and requests each as rows and more (docs/json.md).")
@pass_app
def find(app: App, text: str, exact: bool, limit: int, as_json: bool) -> None:
    """Clients, services and requests by domain, email, name or external id.

    Any case; partial unless --exact. Exact matches come first; a client's services
    and a service's requests come with it.

    \b
    Examples:
      cancelproc find novak.test
      cancelproc find alice@example.com --json
    """
    text = text.strip()
    if not text:
        raise click.BadParameter("say what to look for", param_hint="'TEXT'")
    zone = app.settings.zone
    with app.database().read_session() as session:
        found = search(session, text, exact_only=exact, limit=limit,
                       request_row=lambda q: listed_request(q, zone), service_row_of=service_row)
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
