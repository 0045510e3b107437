"""Bad input everywhere (issue 6): hypothesis throws wrong values at every argument of every
command, and at every config key, in the file and in the environment.

Each must be refused the same way: exit code 2, one line "error: ..." that says what is
wrong and where, no traceback, the database byte-for-byte as before (its dump compared)
and no file written.

The commands are found by walking the click tree, so a new command or option fails
`test_every_command_and_option_is_covered` until it is given a valid invocation here and
bad values for its options.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from processor.cli import cli
from processor.config import EmailSettings, Settings, SmtpSettings, WhmcsImportSettings, load_settings
from tests.cli_helpers import error_text, ok, process_env
from tests.pg_server import find_bin

# --- values that are wrong for any argument of their kind -------------------------------

MAX_ID = 2**31 - 1  # ids are 32-bit columns (PostgreSQL's integer)
NOT_UTF8 = "caf\udce9"  # b"caf\xe9" (Latin-1) as Python decodes argv bytes that are not UTF-8

very_long = st.integers(70_000, 120_000).map(lambda n: "x" * n)  # past every bound (MAX_REASON is 65,535)
not_utf8 = st.text(max_size=20).map(lambda t: t + NOT_UTF8)
with_nul = st.text(max_size=20).map(lambda t: t + "\x00")
garbage = st.one_of(st.text(min_size=1, max_size=40), very_long, not_utf8, with_nul)


def not_an_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return True
    return False


non_integer = garbage.filter(not_an_int)
huge = st.integers(MAX_ID + 1, 2**200).map(str)
not_positive = st.integers(-(2**70), 0).map(str)
bad_id = st.one_of(non_integer, huge, not_positive)
unknown_id = st.integers(10_000, MAX_ID).map(str)  # well formed, names nothing
bad_count = st.one_of(non_integer, huge, not_positive)  # --limit


def not_a_date(text: str) -> bool:
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        return True
    return False


bad_date = st.one_of(
    garbage.filter(not_a_date),
    st.sampled_from(["2026-02-30", "2026-13-01", "0000-01-01", "10000-01-01", "26-11-2026", "2026/11/26",
                     "tomorrow", "2026-11-26T25:00", " 2026-11-26", "２０２６-１１-２６"]),
)


def not_one_of(choices: list[str]) -> st.SearchStrategy[str]:
    return garbage.filter(lambda t: t not in choices)


def option_values(command: click.Command, name: str) -> list[str]:
    param = next(p for p in command.params if p.name == name)
    return list(param.type.choices)  # type: ignore[attr-defined]


# --- the commands: a valid invocation of each, and bad values for each of its options -------

# A valid invocation (the bad value replaces or joins it). Ids refer to the seeded data.
VALID: dict[str, list[str]] = {
    "db upgrade": [],
    "db find-index": [],
    "init": [],
    "run": [],
    "schedule": ["--at", "02:00"],
    "requests create": ["2", "--reason-code", "too_expensive"],
    "requests list": [],
    "requests show": ["1"],
    "requests withdraw": ["1"],
    "requests retry": ["1"],
    "requests resolve": ["1", "--note", "done by hand"],
    "requests process": ["1"],
    "import": ["rows.csv"],
    "runs list": [],
    "runs show": ["last"],
    "services list": [],
    "services show": ["1"],
    "emails list": [],
    "emails show": ["1"],
    "emails preview": ["cancellation_request_confirmation", "--request", "1"],
    "emails send": [],
    "emails retry": ["1"],
    "emails convert": ["whmcs.tpl", "--template", "new_cancellation_request"],
    "report reasons": [],
    "report runs": [],
    "report html": ["--out", "churn.html"],
    "status": [],
    "hooks list": [],
    "find": ["alice"],
}
FLAGS = {"as_json", "in_grace", "exact", "dry_run", "join", "demo", "ignore_due_date", "raw", "html", "ignore_backoff",
         "all_failed", "force", "debug", "version", "help"}

free_text = st.one_of(very_long, not_utf8, with_nul)
ARGUMENT_IDS = {"service_id", "request_id", "email_id"}


def bad_values(path: str, param: click.Parameter) -> st.SearchStrategy[str]:
    """Values that are wrong for this parameter of this command."""
    name = param.name
    if isinstance(param.type, click.Choice):
        return not_one_of(list(param.type.choices))
    if name in ("as_of",):  # a date; the run also refuses one in the future
        return st.one_of(bad_date, st.sampled_from(["2999-01-01", "9999-12-31"]))
    if name in ("since", "until", "cancel_on", "due_before"):
        return bad_date
    if name in ARGUMENT_IDS and isinstance(param, click.Argument):
        return st.one_of(bad_id, unknown_id)
    if name in ("request_ids", "email_ids", "addon_id"):  # addon_id: `requests create --addon`
        return st.one_of(bad_id, unknown_id)
    if name in ("service_id", "client_id", "request_id", "run_id"):  # filters and --request/--run
        return bad_id
    if name in ("limit", "offset") and path.endswith(" list"):  # 0 is all (--limit), the start (--offset)
        return st.one_of(non_integer, huge, st.integers(-(2**70), -1).map(str))
    if name in ("limit",):
        return bad_count
    if name == "workers":
        return st.one_of(non_integer, huge, not_positive, st.integers(65, 10_000).map(str))
    if name == "max_age_hours":
        return st.one_of(non_integer.filter(lambda t: not _is_float(t)),
                         st.sampled_from(["0", "-1", "nan", "inf", "-inf", "1e400", "NaN"]))
    if name == "times":
        return st.one_of(garbage.filter(lambda t: not _is_hhmm(t)), st.sampled_from(["24:00", "23:60", "7:5", "-1:00"]))
    if name == "reason_code":
        return not_one_of(Settings().reason_codes)
    if name in ("reason", "note", "domain", "text"):
        return free_text
    if name == "run_ref":
        return st.one_of(non_integer.filter(lambda t: t != "last"), huge, unknown_id)
    if name == "language":
        return st.one_of(free_text, st.sampled_from(["../../etc", "de/../..", "", " ", "x" * 40, "en_US.UTF-8/x"]))
    if name == "files":
        return st.sampled_from(["missing.csv", "x" * 300 + ".csv", f"{NOT_UTF8}.csv", "folder", "latin1.csv",
                                "binary.csv", "empty.csv", "no_header.csv", "unknown_columns.csv", "nul.csv",
                                "long_cell.csv"])
    if name == "file":  # emails convert: a WHMCS template
        return st.sampled_from(["missing.tpl", "folder", "latin1.tpl", "binary.csv", "unconvertible.tpl",
                                "unknown_field.tpl", "x" * 300 + ".tpl", f"{NOT_UTF8}.tpl"])
    if name == "subject":
        return st.one_of(free_text, st.sampled_from(["{$no_such_field}", "{if $a}x", "a\nb", "{$a|money}"]))
    if name == "out_path":  # report html --out: a folder, a missing folder, names too long
        return st.sampled_from(["folder", "missing/r.html", "x" * 300 + ".html", "folder/" * 700 + "x.html",
                                "latin1.csv/r.html"])
    if name == "config_path":
        return st.sampled_from(["missing.toml", "folder", "latin1.toml", "binary.toml", "x" * 300 + ".toml",
                                f"{NOT_UTF8}.toml", "folder/" * 700 + "x.toml"])
    raise AssertionError(f"no bad values for {path} {name}: add them to tests/test_bad_input.py")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_hhmm(text: str) -> bool:
    try:
        dt.datetime.strptime(text, "%H:%M")
    except ValueError:
        return False
    return len(text) == 5


def commands(group: click.Group = cli, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            yield from commands(command, f"{path} ")
        else:
            yield path, command


COMMANDS = dict(commands())
# (command, parameter) pairs that take a value, the global --config included.
PARAMS = [(path, p) for path, command in COMMANDS.items() for p in command.params if p.name not in FLAGS] + [
    ("status", next(p for p in cli.params if p.name == "config_path"))]


def test_every_command_and_option_is_covered():
    assert set(VALID) == set(COMMANDS)
    for path, param in PARAMS:
        bad_values(path, param)  # raises for a parameter nobody thought about


def invocation(path: str, param: click.Parameter, value: str) -> list[str]:
    """The command's valid invocation with `value` put in for `param`."""
    args = list(VALID[path])
    if param.name == "config_path":
        return ["--config", value, *path.split(), *args]
    if isinstance(param, click.Argument):
        positional = [i for i, a in enumerate(args)
                      if not a.startswith("-") and (i == 0 or not args[i - 1].startswith("-"))]
        position = [p for p in COMMANDS[path].params if isinstance(p, click.Argument)].index(param)
        if position < len(positional):
            args[positional[position]] = value
        else:
            args.append(value)
    else:
        flag = max(param.opts, key=len)
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return [*path.split(), *args]


# --- the app folder: seeded data, and the state to compare --------------------------------

@pytest.fixture(scope="module")
def app_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An app folder with demo data, a run and some emails: every id in VALID exists."""
    return seeded(tmp_path_factory.mktemp("bad-input"))


@pytest.fixture(scope="module")
def pg_app_root(tmp_path_factory: pytest.TempPathFactory, pg_server) -> Path:
    """The same, with its database on PostgreSQL."""
    root = tmp_path_factory.mktemp("bad-input-pg")
    _URLS[root] = pg_server.new_database()
    return seeded(root)


def seeded(root: Path) -> Path:
    env = _env(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        ok(CliRunner().invoke(cli, ["init", "--demo"], env=env))
        assert CliRunner().invoke(cli, ["run"], env=env).exit_code in (0, 1)  # the demo has a failing request
    finally:
        os.chdir(cwd)
    (root / "folder").mkdir()
    (root / "folder.csv").mkdir()
    (root / "latin1.csv").write_bytes("service_id,reason_code\n1,trop_cher_\xe9\n".encode("latin-1"))
    (root / "binary.csv").write_bytes(os.urandom(64) + b"\x00\xff")
    (root / "empty.csv").write_bytes(b"")
    (root / "no_header.csv").write_text("1,2,3\n")
    (root / "unknown_columns.csv").write_text("colour,size\nred,3\n")
    (root / "long_cell.csv").write_text("external_id,first_name,last_name,email\nC-LONG," + "x" * 3000
                                        + ",Lovelace,ada@example.test\n")
    (root / "nul.csv").write_text("external_id,first_name,last_name,email\nC-NUL,Ada\x00,Lovelace,ada@example.test\n")
    (root / "whmcs.tpl").write_text("<p>Client: {$clientname}</p>\n")
    (root / "latin1.tpl").write_bytes("<p>Soci\xe9t\xe9 {$clientname}</p>\n".encode("latin-1"))
    (root / "unconvertible.tpl").write_text("<p>{include file='header.tpl'}</p>\n")
    (root / "unknown_field.tpl").write_text("<p>{$service_password}</p>\n")
    (root / "latin1.toml").write_bytes('[email]\ncompany_name = "Soci\xe9t\xe9"\n'.encode("latin-1"))
    (root / "binary.toml").write_bytes(os.urandom(64))
    return root


_URLS: dict[Path, str] = {}  # an app folder whose database is not its own SQLite file


def _url(root: Path) -> str:
    return _URLS.get(root, f"sqlite:///{root}/var/cancelproc.db")


def _env(root: Path) -> dict[str, str | None]:
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CANCELPROC_")}
    env["CANCELPROC_DATABASE_URL"] = _url(root)
    return env


def dump(url: str) -> str:
    """The whole database as text: SQLite's .dump, or pg_dump's (schema, rows, sequences)."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(f"file:{url.removeprefix('sqlite:///')}?mode=ro", uri=True) as conn:
            return "\n".join(conn.iterdump())
    pg_dump = find_bin("pg_dump")
    assert pg_dump, "pg_dump not found"
    done = subprocess.run([pg_dump, "--no-owner", "--dbname", url.replace("+psycopg", "")], capture_output=True,
                          text=True, timeout=60, check=True)
    # pg_dump puts a random key in its \restrict lines, a new one each time.
    return "\n".join(line for line in done.stdout.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))


def snapshot(root: Path) -> tuple[str, dict[str, int]]:
    """The database's dump and the app folder's files (name and size)."""
    text = dump(_url(root))
    files = {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")
             if p.is_file() and not p.name.endswith(("-wal", "-shm"))}
    return text, files


def refused(root: Path, args: list[str], env: dict[str, str | None] | None = None) -> str:
    """Run the command; it must be refused with one line, exit 2, nothing written."""
    before = snapshot(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = CliRunner().invoke(cli, args, env={**_env(root), **(env or {})})
    finally:
        os.chdir(cwd)
    shown = f"cancelproc {' '.join(a[:80] for a in args)[:400]}"
    assert result.exit_code == 2, (f"{shown}: exit {result.exit_code}\nstdout: {result.stdout[:2000]}\n"
                                   f"stderr: {result.stderr[:2000]}\n{result.exception!r}")
    for line in result.stderr.strip().splitlines():
        line.encode("utf-8")  # printable on a UTF-8 terminal (no lone surrogates)
    # No terminal here: each error line is a JSON object (as in the cron log) holding the
    # line a person would read; that line is checked.
    lines = [error_text(line) for line in result.stderr.strip().splitlines()]
    # `import` names each bad row on a line of its own, then the verdict on the file.
    assert len(lines) == 1 or args[0] == "import", f"{shown}:\n{result.stderr[:2000]}"
    assert all(line.startswith("error: ") for line in lines), f"{shown}:\n{result.stderr[:2000]}"
    assert "Traceback" not in result.output
    for line in lines:
        assert len(line) < 600, f"{shown}: an error line should not echo a whole long value: {line[:700]}"
        line.encode("utf-8")  # printable on a UTF-8 terminal (no lone surrogates)
    lines = lines[-1:]
    assert snapshot(root) == before, f"{shown}: the database or the app folder changed"
    return lines[0]


# --- the tests ----------------------------------------------------------------------------

@pytest.mark.sqlite_only
@pytest.mark.parametrize(("path", "param"), PARAMS, ids=[f"{p}:{q.name}" for p, q in PARAMS])
@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_bad_argument_is_refused_in_one_line_and_changes_nothing(app_root, path, param, data):
    value = data.draw(bad_values(path, param), label=param.name)
    line = refused(app_root, invocation(path, param, value))
    if value.startswith("-") and "No such option" in line:
        return  # `requests show -10`: a value that looks like an option is taken for one (click)
    escaped = "".join(ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode()
                      for ch in value)  # as the error line shows it
    where = [*getattr(param, "opts", []), param.human_readable_name, (param.metavar or "").split("|")[0], param.name,
             escaped[:20]]
    assert any(w and w in line for w in where) or "not found" in line, f"{line!r} does not say where"


@pytest.mark.postgresql_only
@pytest.mark.parametrize(("path", "param"), PARAMS, ids=[f"{p}:{q.name}" for p, q in PARAMS])
@hsettings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
@example(data=None)  # first, a value PostgreSQL itself would refuse (see `refused_by_postgresql`)
def test_on_postgresql_a_bad_argument_is_refused_before_the_database_sees_it(pg_app_root, path, param, data):
    value = refused_by_postgresql(param) if data is None else data.draw(bad_values(path, param), label=param.name)
    refused(pg_app_root, invocation(path, param, value))


def refused_by_postgresql(param: click.Parameter) -> str:
    """A value the database would fail on if it got that far: an id past its integer
    column, text with NUL (PostgreSQL's text cannot hold it)."""
    if param.name in ("reason", "note", "language", "domain", "text"):
        return "a\x00b"
    if param.type in (click.INT,) or isinstance(param.type, click.IntRange) or param.name in ("run_ref",):
        return str(2**31)
    return "x" * 10_000


@pytest.mark.sqlite_only
@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_an_unknown_option_or_an_extra_argument_is_refused(app_root, path):
    line = refused(app_root, [*path.split(), *VALID[path], "--no-such-option"])
    assert "No such option '--no-such-option'" in line
    if not any(p.nargs == -1 for p in COMMANDS[path].params):
        line = refused(app_root, [*path.split(), *VALID[path], "surplus", "arguments"])
        assert "unexpected extra argument" in line


# --- every config key: in the file, and in the environment -------------------------------

def config_keys() -> list[tuple[str, Any]]:
    """(dotted key, pydantic field) of every setting, [email] and [email.smtp] included."""
    keys = []
    for prefix, model in (("", Settings), ("email.", EmailSettings), ("email.smtp.", SmtpSettings),
                          ("whmcs.", WhmcsImportSettings)):
        for name, field in model.model_fields.items():
            if name not in ("app_root", "config_file", "email", "smtp", "whmcs"):
                keys.append((prefix + name, field))
    return keys


CONFIG_KEYS = config_keys()


def _bounds(field: Any) -> tuple[Any, Any]:
    low = high = None
    for m in field.metadata:
        low = getattr(m, "ge", None) if getattr(m, "ge", None) is not None else getattr(m, "gt", low)
        high = getattr(m, "le", None) if getattr(m, "le", None) is not None else getattr(m, "lt", high)
    return low, high


def toml_string(text: str) -> str:
    # A JSON string is a TOML basic string, once DEL (which JSON leaves as it is) is escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


SPECIFIC = {  # keys whose strings mean something: values of the right type that are still wrong
    "database_url": ['"nosuchdb://x"', '"sqlite:///' + "x" * 300 + '/db"', '"sqlite://"', '"postgresql://u:p@[::1"'],
    "business_timezone": ['"Mars/Olympus"', '"../../../etc/passwd"', '""'],
    "whmcs.default_language": ['"english"', '""', '"de-DE"'],
    "reason_codes": ['[""]', '["has space"]', "[]"],
    "schedule_times": ['["25:00"]', '["2:05"]', "[]", '["02:05", "noon"]'],
    "email.from_address": ['"not an address"', '"a@b.test\\r\\nBcc: x@y.test"', '""'],
    "email.staff_address": ['"not an address"', '"a@b.test, c@d.test"'],
    "email.company_name": ['"Acme\\r\\nBcc: x@y.test"'],
    "email.smtp.host": ['"mail\\nhost"'],
    "email.smtp.username": ['"user\\r\\n"'],
    "email.smtp.password_env": ['"NOT VALID NAME"', '"A=B"'],
}
PATHS = {"hooks_dir", "metrics_file", "email.templates_dir", "email.outbox_dir", "email.smtp.password_file",
         "email.smtp.ca_file"}


def bad_literals(key: str, field: Any, env: bool = False) -> st.SearchStrategy[str]:
    """TOML values that are wrong for this key (with `env`, only those that are wrong as
    the text of an environment variable too: there `5` is the string "5")."""
    annotation = field.annotation
    wrong_shapes = ["[1, 2]", "{ a = 1 }"]
    if annotation is bool:
        choices = ['"maybe"', "2", "[true]", "{ a = 1 }"]
    elif annotation in (int, float):
        low, high = _bounds(field)
        choices = ['"many"', *wrong_shapes, "99999999999999999999", "1e999" if annotation is float else "1.5"]
        choices += [str(low - 1)] if low is not None and annotation is int else [str(-abs(low or 1))]
        choices += [str(high + 1) if annotation is int and high is not None else "9223372036854775807"]
        if annotation is float:
            choices += ["nan", "inf", "-inf"]
    elif annotation == dict[str, str]:
        choices = ['"one string"', "[1, 2]", "{ a = 1 }", '{ "" = "other" }', '{ "  " = "other" }',
                   '{ a = "b\\u0007" }']
    elif annotation == list[str]:
        choices = ['"one string"', "[1, 2]", "{ a = 1 }", *SPECIFIC.get(key, [])]
    elif getattr(annotation, "__origin__", None) is not None and str(annotation).startswith("typing.Literal"):
        allowed = annotation.__args__
        return st.one_of(st.sampled_from(["1", "[]"]),
                         st.text(max_size=30).filter(lambda t: t not in allowed).map(toml_string))
    else:  # str
        choices = [] if env else ["5", "true", '["a"]', "{ a = 1 }"]
        choices += ['"a\\u0000b"', '"bell\\u0007"', *SPECIFIC.get(key, [])]
        choices += [toml_string("x" * 5000)]
        if key in PATHS:
            choices += [toml_string("x" * 300), toml_string("/tmp/" + "x" * 300 + "/y")]
    return st.sampled_from(choices)


def _env_value(literal: str) -> str:
    """The value as an environment variable would carry it (strings unquoted)."""
    value = tomllib.loads(f"v = {literal}")["v"]
    return value if isinstance(value, str) else literal


# The config file is in <app root>/config/, so its default database is the seeded one.
FROM_THE_FILE: dict[str, str | None] = {"CANCELPROC_DATABASE_URL": None}
# A staff command: a bad config is refused and nothing is written. (The nightly job's `run`
# and `schedule` also record the failure for `status`: tests/test_failed_before_run.py.)
STAFF_COMMAND = ["requests", "list"]


def write_config(root: Path, key: str, literal: str | bytes) -> Path:
    *tables, name = key.split(".")
    text = (f"[{'.'.join(tables)}]\n" if tables else "").encode() + name.encode() + b" = " + (
        literal if isinstance(literal, bytes) else literal.encode())
    path = root / "config" / "bad.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(text + b"\n")
    return path


@pytest.mark.sqlite_only
@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_bad_config_value_in_the_file_is_refused_in_one_line_naming_file_and_key(app_root, data):
    key, field = data.draw(st.sampled_from(CONFIG_KEYS), label="key")
    literal = data.draw(bad_literals(key, field), label="value")
    path = write_config(app_root, key, literal)
    try:
        tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError:
        valid_toml = False
    else:
        valid_toml = True
    line = refused(app_root, ["--config", str(path), *STAFF_COMMAND], env=FROM_THE_FILE)
    assert line.startswith(f"error: {path}: ")
    if valid_toml:
        assert f": {key}: " in line or f": {key}." in line, line  # reason_codes.0: ...


@pytest.mark.sqlite_only
@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_bad_config_value_in_the_environment_is_refused_naming_the_variable(app_root, data):
    key, field = data.draw(st.sampled_from(CONFIG_KEYS), label="key")
    value = _env_value(data.draw(bad_literals(key, field, env=True), label="value"))
    if "\x00" in value:
        return  # an environment variable cannot hold NUL
    variable = "CANCELPROC_" + key.replace(".", "__").upper()
    line = refused(app_root, STAFF_COMMAND, env={variable: value})
    assert line.startswith(f"error: environment variable {variable}: "), line


@pytest.mark.parametrize(("key", "value"), [
    # The other side of the checks: values operators use must still load.
    ("database_url", "postgres://billing:s3cret@db.example.com:5432/billing"),
    ("database_url", "postgresql+psycopg://billing@localhost/billing?sslmode=require"),
    ("database_url", "sqlite:////var/lib/cancelproc/cancelproc.db"),
    ("email.company_name", "Société Générale d'Hébergement"),
    ("email.signature", "The Billing Team\nExample Hosting\tLtd"),
    ("email.smtp.password_env", ""),
    ("email.smtp.password_env", "SMTP_PASSWORD_2"),
    ("hooks_dir", "/opt/cancelproc/hooks"),
    ("reason_codes", ["too_expensive", "moving-to-cloud", "other"]),
    ("schedule_times", ["02:05", "23:59"]),
    ("lease_seconds", 7 * 24 * 3600),
    ("status_max_age_hours", 0.5),
])
def test_values_operators_use_are_accepted(tmp_path, key, value):
    path = write_config(tmp_path, key, json.dumps(value, ensure_ascii=False))
    settings = load_settings(path)
    got = settings
    for part in key.split("."):
        got = getattr(got, part)
    assert got == value


@pytest.mark.sqlite_only
@pytest.mark.parametrize("key", [k for k, f in CONFIG_KEYS if f.annotation is str])
def test_a_config_file_that_is_not_utf8_is_refused(app_root, key):
    path = write_config(app_root, key, '"Soci\xe9t\xe9"'.encode("latin-1"))
    line = refused(app_root, ["--config", str(path), *STAFF_COMMAND], env=FROM_THE_FILE)
    assert line.startswith(f"error: {path}: cannot be read: 'utf-8' codec can't decode byte 0xe9"), line


@pytest.mark.sqlite_only
@hsettings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.from_regex(r"[a-z_]{1,30}", fullmatch=True).filter(
    lambda n: n not in Settings.model_fields and n not in ("email",)))
def test_an_unknown_config_key_is_refused_with_the_allowed_ones(app_root, name):
    path = write_config(app_root, name, "1")
    line = refused(app_root, ["--config", str(path), *STAFF_COMMAND], env=FROM_THE_FILE)
    assert line.startswith(f"error: {path}: {name}: unknown setting (allowed: business_timezone, ")


@pytest.mark.sqlite_only
@pytest.mark.parametrize("argv", [
    [b"requests", b"show", b"caf\xe9"],
    [b"requests", b"withdraw", b"1", b"--note", b"caf\xe9"],
    [b"requests", b"create", b"2", b"--reason-code", b"too_expensive", b"--reason", b"\xff\xfe"],
    [b"--config", b"caf\xe9.toml", b"status"],
    [b"import", b"caf\xe9.csv"],
    [b"emails", b"preview", b"cancellation_request_confirmation", b"--request", b"1", b"--language", b"d\xe9"],
])
def test_bytes_that_are_not_utf8_in_a_real_process_are_refused_in_one_line(app_root, argv):
    """As the shell passes them: bytes, not text. Python decodes them with surrogates, and
    printing one back on a UTF-8 terminal would raise instead of showing the error."""
    env = process_env(_url(app_root), LC_ALL="C.UTF-8", PYTHONIOENCODING="", CANCELPROC_LOG_FORMAT="console")
    before = snapshot(app_root)
    done = subprocess.run([sys.executable, "-m", "processor", *argv], cwd=app_root, env=env, capture_output=True,
                          timeout=60)
    stderr = done.stderr.decode("utf-8")  # itself valid UTF-8
    assert done.returncode == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: "), stderr
    assert "\\udc" in stderr or "\\x" in stderr or "UTF-8" in stderr, stderr  # the bad byte, shown escaped
    assert snapshot(app_root) == before


@pytest.mark.sqlite_only
def test_an_environment_variable_that_is_not_utf8_is_refused_naming_it(app_root):
    env = {k.encode(): v.encode() for k, v in process_env(_url(app_root), CANCELPROC_LOG_FORMAT="console").items()}
    env[b"CANCELPROC_EMAIL__COMPANY_NAME"] = b"Soci\xe9t\xe9"  # bytes: os.environ cannot hold them as text
    before = snapshot(app_root)
    done = subprocess.run([sys.executable, "-m", "processor", *STAFF_COMMAND], cwd=app_root, env=env,
                          capture_output=True, timeout=60)
    stderr = done.stderr.decode("utf-8")
    assert done.returncode == 2, stderr
    assert stderr.startswith("error: environment variable CANCELPROC_EMAIL__COMPANY_NAME: email.company_name: "
                             "Input should be a valid string, unable to parse raw data as a unicode string "
                             "(got 'Soci\\udce9t\\udce9')"), stderr
    assert snapshot(app_root) == before
