"""Setting up and feeding the processor: `db upgrade`, `init`, `import`, `hooks list`."""

from __future__ import annotations

from pathlib import Path

import click
from sqlalchemy import func, select

from processor import db as dbmod
from processor import importer, whmcs_import
from processor.appfolder import make_app_folder
from processor.cli.app import App, cli, echo_error, pass_app, utc_now
from processor.cli.output import echo_json, echo_table
from processor.config import DEFAULT_CONFIG
from processor.demo import load_demo
from processor.errors import (
    DatabaseError,
    InputError,
)
from processor.find_index import create_find_index, drop_find_index
from processor.hooks import POINTS
from processor.models import (
    Client,
)
from processor.terms import terms_of

# --- database ---------------------------------------------------------------------------

@cli.group("db")
def db_group() -> None:
    """Database schema (Alembic migrations).

    \b
    Examples:
      cancelproc db upgrade
    """


@db_group.command("upgrade")
@pass_app
def db_upgrade(app: App) -> None:
    """Create or upgrade the database schema to this version.

    \b
    Examples:
      cancelproc db upgrade
    """
    database = app.database(create=True, migrated=False)
    before = dbmod.current_revision(database)
    dbmod.upgrade(database, business_timezone=app.settings.business_timezone)
    after = dbmod.current_revision(database)
    click.echo(f"database {database.display_url}: schema {before or 'empty'} -> {after}"
               if before != after else f"database {database.display_url}: schema already at {after}")


@db_group.command("find-index")
@pass_app
def db_find_index(app: App) -> None:
    """Build the index behind `find`'s match of any part of a value (again).

    `db upgrade` builds it where the database can have it: SQLite 3.34 or later; PostgreSQL
    where the database user may create the pg_trgm extension. Run this once a superuser has
    run CREATE EXTENSION pg_trgm in the database, or to rebuild it.

    \b
    Examples:
      cancelproc db find-index
    """
    database = app.database()
    with database.engine.begin() as conn:
        drop_find_index(conn)
        why_not = create_find_index(conn)
    if why_not:
        raise DatabaseError(why_not)
    click.echo(f"database {database.display_url}: find's trigram index built")


@cli.command()
@click.option("--demo", is_flag=True, help="Also load a demo company (clients, services, requests).")
@pass_app
def init(app: App, demo: bool) -> None:
    """Make this folder an app folder and create the database, optionally with demo data.

    \b
    Creates what is missing of the app folder (the folder holding config/, else the
    current one): config/processor.toml (every setting, commented out at its default),
    var/ and var/log/, hooks/ (with examples that never load) and templates/ (your
    email templates, used before the built-in ones). Never overwrites a file: running
    it again is safe. Then creates or upgrades the database through the migrations.

    \b
    Examples:
      cancelproc init
      cancelproc init --demo
    """
    settings = app.settings
    root = settings.app_root
    found = settings.config_file
    # config/ here unless the settings came from a file elsewhere (--config /etc/...).
    ours = found is None or found.resolve() == (root / DEFAULT_CONFIG).resolve()
    templates = settings.path(settings.email.templates_dir) if settings.email.templates_dir else None
    items = make_app_folder(root, {"config": root / DEFAULT_CONFIG.parent if ours else None,
                                   "hooks": settings.path(settings.hooks_dir), "templates": templates})
    click.echo(f"app folder {root}:")
    width = max(len(item.shown) for item in items)
    for item in items:
        said = item.purpose if item.created else "already there, left as it was"
        click.echo(f"  {'created' if item.created else 'kept':7} {item.shown:{width}}  {said}".rstrip())
    if found:
        click.echo(f"settings: {found}")
    else:
        click.echo(f"settings: no config file was found, so this init used the defaults (and any CANCELPROC_* "
                   f"variables); {DEFAULT_CONFIG} now lists every setting at its default")
    database = app.database(create=True, migrated=False)
    dbmod.upgrade(database, business_timezone=app.settings.business_timezone)
    click.echo(f"database {database.display_url} ready (schema {dbmod.current_revision(database)})")
    if demo:
        with database.session.begin() as session:
            if session.scalar(select(func.count()).select_from(Client)):
                raise InputError(f"database {database.display_url} already has clients; "
                                 "demo data goes into an empty database")
            counts = load_demo(session, today=app.today(), now=utc_now(), zone=app.settings.zone,
                               terms_of=terms_of(app.settings))
        click.echo("demo data: " + ", ".join(f"{n} {k}" for k, n in counts.items()))


# --- import ------------------------------------------------------------------------------

@cli.command("import")
@click.argument("files", nargs=-1, required=True)
@click.option("--kind", type=click.Choice(importer.KINDS), help="What the rows are (default: from the columns).")
@click.option("--from", "source_format", type=click.Choice(["files", "whmcs"]), default="files", show_default=True,
              help="whmcs: one SOURCE, a folder of WHMCS table exports (tblclients.csv, ...) or a WHMCS "
                   "database URL (mysql+pymysql://user:password@host/whmcs), read only.")
@click.option("--json", "as_json", is_flag=True, help="Print what each file did as one JSON object (docs/json.md).")
@pass_app
def import_command(app: App, files: tuple[str, ...], kind: str | None, source_format: str, as_json: bool) -> int:
    """Import clients, products, services, add-ons, invoices or requests (CSV or JSON Lines),
    or everything from WHMCS (--from whmcs SOURCE).

    \b
    Rows are matched by external_id (the billing system's id); each file is all or
    nothing. Files are imported in the order given (clients before services before
    requests); the first rejected file stops the import. Exit 1 if some rows were
    conflicts (they would undo a cancellation the processor applied; not applied).

    \b
    --from whmcs reads WHMCS's own tables (ids become external ids; docs/whmcs-import.md has
    the mapping) and imports them all in one transaction: every table or none.

    \b
    Examples:
      cancelproc import clients.csv services.csv requests.csv
      cancelproc import services.jsonl --kind services --json
      cancelproc import --from whmcs /srv/exports/whmcs/
    """
    if source_format == "whmcs":
        if len(files) != 1 or kind:
            raise InputError("--from whmcs takes one SOURCE (a folder of table exports, or a database URL) "
                             "and no --kind")
        return _import_whmcs(app, files[0], as_json=as_json)
    database = app.database()
    reports: list[importer.FileReport] = []
    paths = [Path(f) for f in files]
    for position, path in enumerate(paths):
        try:
            report = importer.import_file(database, path, settings=app.settings, now=utc_now(), kind=kind,
                                          actor=f"import:{app.operator}")
        except importer.ImportRejected as exc:
            _echo_row_errors(app, exc)
            skipped = [str(p) for p in paths[position + 1:]]
            raise InputError(f"{path}: rejected, {len(exc.errors)} bad row(s); nothing of it was imported"
                             + (f"; not attempted: {', '.join(skipped)}" if skipped else "")) from None
        reports.append(report)
        if not as_json:
            _echo_report(report)
    if as_json:
        echo_json([_report_json(r) for r in reports])
    return 1 if any(r.conflicts for r in reports) else 0


def _import_whmcs(app: App, source: str, *, as_json: bool) -> int:
    database = app.database()
    try:
        done = whmcs_import.import_whmcs(database, source, settings=app.settings, now=utc_now(),
                                         actor=f"import:{app.operator}")
    except importer.ImportRejected as exc:
        _echo_row_errors(app, exc)
        shown = whmcs_import.shown_source(source)
        raise InputError(f"{shown}: rejected, {len(exc.errors)} bad row(s); nothing was imported") from None
    if as_json:
        echo_json({"source": done.source, "tables": [_report_json(r) for r in done.reports], "notes": done.notes})
    else:
        click.echo(f"WHMCS {done.source}:")
        for report in done.reports:
            _echo_report(report)  # what was left out (done.notes) is in the log, as warnings
    return 1 if any(r.conflicts for r in done.reports) else 0


def _echo_row_errors(app: App, exc: importer.ImportRejected) -> None:
    for error in exc.errors:
        echo_error(f"error: {error}", as_json=app.json_logs)


def _echo_report(report: importer.FileReport) -> None:
    click.echo(f"{report.path} ({report.kind}): {report.inserted} inserted, {report.updated} updated, "
               f"{report.unchanged} unchanged, {len(report.conflicts)} conflict(s)")
    for c in report.conflicts:
        click.echo(f"  conflict {report.path}:{c.line} ({c.external_id}): {c.message}")


def _report_json(r: importer.FileReport) -> dict[str, object]:
    return {"path": str(r.path), "kind": r.kind, "inserted": r.inserted, "updated": r.updated,
            "unchanged": r.unchanged, "conflicts": [vars(c) for c in r.conflicts]}


# --- hooks -------------------------------------------------------------------------------

@cli.group("hooks")
def hooks_group() -> None:
    """Operator hooks (hooks/*.py and installed plugins).

    \b
    Examples:
      cancelproc hooks list
    """


@hooks_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="The hooks as a JSON array, in run order (docs/json.md).")
@pass_app
def hooks_list(app: App, as_json: bool) -> None:
    """Every loaded hook, in the order it runs at each point.

    \b
    Examples:
      cancelproc hooks list
      cancelproc hooks list --json
    """
    rows = [{"point": i.point, "priority": i.priority, "function": i.fn.__qualname__, "file": f"{i.source}:{i.line}",
             "arguments": "**kwargs" if i.wants is None else ", ".join(i.wants)} for i in app.hooks.impls()]
    if as_json:
        echo_json(rows)
    else:
        echo_table(rows, ["point", "priority", "function", "file", "arguments"],
                   empty=f"no hooks loaded (hooks_dir: {app.settings.path(app.settings.hooks_dir)}; "
                         f"points: {', '.join(POINTS)})")
