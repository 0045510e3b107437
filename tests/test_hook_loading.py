"""Hook loading (DESIGN.md "Hooks"): real hook files and a fake installed plugin, loaded for real.

* Run order: lower priority first, then file name, then registration order in the file;
  `cancelproc hooks list` (and --json) shows that order with point, priority, function and
  file:line.
* Which files load: `_`-prefixed and non-.py files are skipped; a missing hooks_dir loads
  nothing; a hooks_dir that is a file is an error.
* add_hook as a decorator and as a call (also with a lambda).
* Keyword arguments: a function gets only the parameters it names; **kwargs gets them all;
  an optional parameter the point does not give keeps its default.
* Load-time errors: one line naming file and line, HookLoadError/HookDefinitionError (both
  InputError, exit code 2); through the CLI a broken hook file stops `run`, `requests create`
  and the other hook-loading commands before anything is written (fail closed).
* Entry points (group `cancelproc.hooks`) from a fake distribution on sys.path.
* CANCELPROC_TRACE_HOOKS=1: every call logged with its arguments and result.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import sqlite3
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from click.testing import CliRunner, Result
from freezegun import freeze_time

from processor.cli import cli
from processor.db import open_database
from processor.errors import InputError
from processor.hooks import (
    POINTS,
    HookDefinitionError,
    HookLoadError,
    HookRegistry,
    add_hook,
    load_hooks,
)
from processor.hooks.loader import load_file
from processor.logs import configure_logging
from processor.models import RequestType
from tests import factories

NOW = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)
PLUGIN_MODULE = "fakeplugin_mod"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """The CLI (and the trace tests) configure structlog globally, onto streams that close."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def hooks_dir(tmp_path: Path) -> Path:
    path = tmp_path / "hooks"
    path.mkdir()
    return path


def write(folder: Path, name: str, source: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(source).lstrip("\n"), encoding="utf-8")
    return path


def line_of(path: Path, marker: str) -> int:
    """The 1-based line of `path` holding `marker` (exactly one)."""
    lines = [n for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if marker in text]
    assert len(lines) == 1, f"{marker!r} found on lines {lines} of {path}"
    return lines[0]


def load(folder: Path | None, **kwargs: Any) -> HookRegistry:
    return load_hooks(folder, entry_points=kwargs.pop("entry_points", False), **kwargs)


def point_params(point: str, **values: Any) -> dict[str, Any]:
    """Every parameter the point gives (a recognisable placeholder unless given), plus `params`."""
    params: dict[str, Any] = {name: f"<{name}>" for name in POINTS[point].params}
    params.update(values)
    params["params"] = params
    return params


def run_order(registry: HookRegistry, point: str) -> list[str]:
    return [impl.fn.__qualname__ for impl in registry.impls(point)]


def load_error(folder: Path, expected: type[Exception] = HookLoadError, **kwargs: Any) -> Exception:
    """Load, expecting `expected`; check it is a one-line InputError (exit code 2)."""
    with pytest.raises(expected) as info:
        load(folder, **kwargs)
    exc = info.value
    assert isinstance(exc, InputError) and exc.exit_code == 2, f"{exc!r} is not an InputError with exit code 2"
    message = str(exc)
    assert "\n" not in message.strip(), f"the error is not one line: {message!r}"
    return exc


# --------------------------------------------------------------------------- run order


def test_lower_priority_runs_first(hooks_dir: Path) -> None:
    write(hooks_dir, "a.py", """
        from processor.hooks import add_hook

        @add_hook("ServiceCancelled", priority=10)
        def ten():
            return 10

        @add_hook("ServiceCancelled", priority=-5)
        def minus_five():
            return -5

        @add_hook("ServiceCancelled")
        def default_zero():
            return 0

        @add_hook("ServiceCancelled", 3)
        def three():
            return 3
    """)
    registry = load(hooks_dir)
    assert run_order(registry, "ServiceCancelled") == ["minus_five", "default_zero", "three", "ten"]
    assert [impl.priority for impl in registry.impls("ServiceCancelled")] == [-5, 0, 3, 10]
    results = [result for _, result in registry.call("ServiceCancelled", point_params("ServiceCancelled"))]
    assert results == [-5, 0, 3, 10], "hooks were not called in priority order"


def test_equal_priorities_run_by_file_name_then_registration_order(hooks_dir: Path) -> None:
    # Written in an order that is neither the file-name order nor alphabetical by function.
    write(hooks_dir, "b.py", """
        from processor.hooks import add_hook

        @add_hook("ServiceCancelled", 5)
        def b_zulu():
            return "b_zulu"

        @add_hook("ServiceCancelled", 5)
        def b_alpha():
            return "b_alpha"
    """)
    write(hooks_dir, "a.py", """
        from processor.hooks import add_hook

        def a_defined_first():
            return "a_defined_first"

        @add_hook("ServiceCancelled", 5)
        def a_zulu():
            return "a_zulu"

        add_hook("ServiceCancelled", 5, a_defined_first)  # registered second, although defined first

        @add_hook("ServiceCancelled", 5)
        def a_alpha():
            return "a_alpha"

        @add_hook("ServiceCancelled", 1)
        def a_low():
            return "a_low"
    """)
    write(hooks_dir, "c.py", """
        from processor.hooks import add_hook

        @add_hook("ServiceCancelled", 0)
        def c_zero():
            return "c_zero"
    """)
    registry = load(hooks_dir)
    expected = ["c_zero", "a_low", "a_zulu", "a_defined_first", "a_alpha", "b_zulu", "b_alpha"]
    assert run_order(registry, "ServiceCancelled") == expected
    results = [result for _, result in registry.call("ServiceCancelled", point_params("ServiceCancelled"))]
    assert results == expected
    assert [(i.source, i.seq) for i in registry.impls("ServiceCancelled")] == [
        ("c.py", 0), ("a.py", 3), ("a.py", 0), ("a.py", 1), ("a.py", 2), ("b.py", 0), ("b.py", 1)]


def test_loading_twice_gives_the_same_hooks_not_twice_as_many(hooks_dir: Path) -> None:
    write(hooks_dir, "a.py", """
        from processor.hooks import add_hook

        @add_hook("ServiceCancelled", 1)
        def one():
            return 1
    """)
    first, second = load(hooks_dir), load(hooks_dir)
    assert run_order(first, "ServiceCancelled") == run_order(second, "ServiceCancelled") == ["one"]
    assert first.impls()[0].fn is not second.impls()[0].fn, "each load runs the file in a fresh module"


# --------------------------------------------------------------------------- `cancelproc hooks list`


@pytest.fixture
def cli_env(tmp_path: Path, hooks_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str | None]:
    """A migrated database at tmp_path/x.db (through `cancelproc init`) and the env to reach it."""
    monkeypatch.chdir(tmp_path)  # no ./config/processor.toml from the repo
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CANCELPROC_")}
    env.update(CANCELPROC_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}", CANCELPROC_HOOKS_DIR=str(hooks_dir),
               CANCELPROC_LOG_FORMAT="console")  # the lines a person reads (tests that want JSON say so)
    result = CliRunner().invoke(cli, ["init"], env=env)
    assert result.exit_code == 0, result.output
    return env


def invoke(env: dict[str, str | None], *args: Any, **more_env: str | None) -> Result:
    with freeze_time(NOW):
        return CliRunner().invoke(cli, [str(a) for a in args], env={**env, **more_env})


def ok(result: Result, code: int = 0) -> Result:
    assert result.exit_code == code, (f"exit {result.exit_code} (expected {code})\nstdout: {result.stdout}\n"
                                      f"stderr: {result.stderr}\nexception: {result.exception!r}")
    return result


def test_hooks_list_prints_run_order_with_file_and_line(hooks_dir: Path, cli_env: dict[str, str | None]) -> None:
    b = write(hooks_dir, "b.py", """
        from processor.hooks import add_hook

        @add_hook("ServiceCancelled", 5)  # B5
        def tell_crm(request_id, service):
            pass

        @add_hook("PreModuleTerminate", -1)  # BPRE
        def veto_vip(client):
            pass
    """)
    a = write(hooks_dir, "a.py", """
        from processor.hooks import add_hook

        @add_hook("ServiceCancelled", 5)  # A5
        def log_it(**kwargs):
            pass

        add_hook("ServiceCancelled", 7, lambda: None)  # A7

        @add_hook("ServiceCancelled", 2)  # A2
        def first():
            pass
    """)
    write(hooks_dir, "_disabled.py", "raise RuntimeError('never loaded')\n")
    expected = [
        # Points in their declaration order (PreModuleTerminate before ServiceCancelled), then run order.
        {"point": "PreModuleTerminate", "priority": -1, "function": "veto_vip", "file": f"b.py:{line_of(b, 'BPRE')}",
         "arguments": "client"},
        {"point": "ServiceCancelled", "priority": 2, "function": "first", "file": f"a.py:{line_of(a, 'A2')}",
         "arguments": ""},
        {"point": "ServiceCancelled", "priority": 5, "function": "log_it", "file": f"a.py:{line_of(a, 'A5')}",
         "arguments": "**kwargs"},
        {"point": "ServiceCancelled", "priority": 5, "function": "tell_crm", "file": f"b.py:{line_of(b, 'B5')}",
         "arguments": "request_id, service"},
        {"point": "ServiceCancelled", "priority": 7, "function": "<lambda>", "file": f"a.py:{line_of(a, 'A7')}",
         "arguments": ""},
    ]

    rows = json.loads(ok(invoke(cli_env, "hooks", "list", "--json")).stdout)
    assert rows == expected

    lines = ok(invoke(cli_env, "hooks", "list")).stdout.splitlines()
    assert lines[0].split() == ["POINT", "PRIORITY", "FUNCTION", "FILE", "ARGUMENTS"], lines[0]
    printed = []
    for text in lines[1:]:
        point, priority, function, file, *arguments = text.split(None, 4)
        printed.append({"point": point, "priority": int(priority), "function": function, "file": file,
                        "arguments": arguments[0] if arguments else ""})
    assert printed == expected, "\n".join(lines)


def test_hooks_list_without_hooks(tmp_path: Path, hooks_dir: Path, cli_env: dict[str, str | None]) -> None:
    assert "no hooks loaded" in ok(invoke(cli_env, "hooks", "list")).stdout
    assert json.loads(ok(invoke(cli_env, "hooks", "list", "--json")).stdout) == []
    missing = tmp_path / "no-such-folder"
    assert "no hooks loaded" in ok(invoke(cli_env, "hooks", "list", CANCELPROC_HOOKS_DIR=str(missing))).stdout


# --------------------------------------------------------------------------- which files load


def test_underscore_and_non_py_files_are_skipped(hooks_dir: Path) -> None:
    boom = "raise RuntimeError('this file must not be loaded')\n"
    write(hooks_dir, "_disabled.py", boom)
    write(hooks_dir, "__init__.py", boom)
    write(hooks_dir, "notes.txt", boom)
    write(hooks_dir, "old.py.bak", boom)
    write(hooks_dir, "README.md", boom)
    write(hooks_dir, "compiled.pyc", boom)
    (hooks_dir / "sub").mkdir()
    write(hooks_dir / "sub", "nested.py", boom)  # not recursive
    write(hooks_dir, "real.py", """
        from processor.hooks import add_hook

        @add_hook("ServiceCancelled")
        def real():
            pass
    """)
    registry = load(hooks_dir)
    assert [(i.source, i.fn.__qualname__) for i in registry.impls()] == [("real.py", "real")]


def test_missing_hooks_dir_loads_nothing(tmp_path: Path) -> None:
    assert load(tmp_path / "does-not-exist").impls() == []
    assert load(None).impls() == []


def test_hooks_dir_that_is_a_file_is_an_error(tmp_path: Path, cli_env: dict[str, str | None]) -> None:
    not_a_folder = write(tmp_path, "hooks.py", "")
    exc = load_error(not_a_folder)
    assert str(not_a_folder) in str(exc) and "not a folder" in str(exc)

    result = ok(invoke(cli_env, "hooks", "list", CANCELPROC_HOOKS_DIR=str(not_a_folder)), code=2)
    assert result.stderr.strip().splitlines() == [f"error: {not_a_folder}: hooks_dir is not a folder"]


# --------------------------------------------------------------------------- add_hook forms


def test_add_hook_as_decorator_and_as_call(hooks_dir: Path) -> None:
    path = write(hooks_dir, "forms.py", """
        from processor.hooks import add_hook

        @add_hook("ServiceCancelled", priority=1)  # DECORATOR
        def decorated(request_id):
            return ("decorated", request_id)

        DECORATED_IS_FUNCTION = callable(decorated) and decorated.__name__ == "decorated"

        def plain(request_id):
            return ("plain", request_id)

        RETURNED = add_hook("ServiceCancelled", 5, plain)  # CALL
        RETURNED_IS_FN = RETURNED is plain

        add_hook("ServiceCancelled", 5, lambda request_id: ("lambda", request_id))  # LAMBDA
        add_hook("ServiceCancelled", 9, fn=lambda: "keyword fn")  # KEYWORD

        assert DECORATED_IS_FUNCTION, "the decorator must return the function itself"
        assert RETURNED_IS_FN, "add_hook(point, priority, fn) must return fn"
    """)
    registry = load(hooks_dir)
    impls = registry.impls("ServiceCancelled")
    assert [(i.fn.__qualname__, i.priority, i.line) for i in impls] == [
        ("decorated", 1, line_of(path, "DECORATOR")),
        ("plain", 5, line_of(path, "# CALL")),
        ("<lambda>", 5, line_of(path, "LAMBDA")),
        ("<lambda>", 9, line_of(path, "KEYWORD")),
    ]
    results = [r for _, r in registry.call("ServiceCancelled", point_params("ServiceCancelled", request_id=7))]
    assert results == [("decorated", 7), ("plain", 7), ("lambda", 7), "keyword fn"]


def test_add_hook_outside_loading_registers_nowhere() -> None:
    """Importing a hook module by hand (e.g. to unit-test it) just returns the function."""
    def fn(request_id: int) -> int:
        return request_id

    assert add_hook("ServiceCancelled", 5, fn) is fn
    assert add_hook("ServiceCancelled")(fn) is fn
    with pytest.raises(HookDefinitionError, match="unknown hook point 'Nope'"):
        add_hook("Nope", 0, fn)


# --------------------------------------------------------------------------- keyword arguments


def test_functions_get_only_the_arguments_they_name(hooks_dir: Path) -> None:
    write(hooks_dir, "kw.py", """
        from processor.hooks import add_hook

        @add_hook("ServiceCancelled", 1)
        def two_of_them(request_id, service):
            return ("two_of_them", dict(locals()))

        @add_hook("ServiceCancelled", 2)
        def everything(**kwargs):
            return ("everything", kwargs)

        @add_hook("ServiceCancelled", 3)
        def with_defaults(request_id, note="my default", days_late=-1, *, dry_run=None):
            # note: ServiceCancelled does not give it; days_late and dry_run: it does
            return ("with_defaults", dict(locals()))

        @add_hook("ServiceCancelled", 4)
        def nothing():
            return ("nothing", {})

        @add_hook("ServiceCancelled", 5)
        def whole_params(params, request_id):
            return ("whole_params", {"keys": sorted(params), "request_id": request_id})

        @add_hook("ServiceCancelled", 6)
        def star_args(*args, request_id):
            return ("star_args", {"args": args, "request_id": request_id})
    """)
    registry = load(hooks_dir)
    params = point_params("ServiceCancelled", request_id=42, service={"id": 9}, days_late=3, dry_run=False)
    results = dict(r for _, r in registry.call("ServiceCancelled", params))
    assert results["two_of_them"] == {"request_id": 42, "service": {"id": 9}}
    assert results["everything"] is not params and results["everything"] == params, \
        "**kwargs must get every parameter of the point (and `params`)"
    assert set(results["everything"]) == set(POINTS["ServiceCancelled"].params)
    assert results["with_defaults"] == {"request_id": 42, "note": "my default", "days_late": 3, "dry_run": False}
    assert results["nothing"] == {}
    assert results["whole_params"] == {"keys": sorted(params), "request_id": 42}
    assert results["star_args"] == {"args": (), "request_id": 42}
    wants = {i.fn.__qualname__: i.wants for i in registry.impls("ServiceCancelled")}
    assert wants["everything"] is None
    assert wants["with_defaults"] == ("request_id", "days_late", "dry_run")


# --------------------------------------------------------------------------- load-time errors


ERROR_CASES = {
    "syntax error": (HookLoadError, """
        from processor.hooks import add_hook

        def broken(:  # HERE
            pass
    """, "SyntaxError"),
    "raises at import": (HookLoadError, """
        import os

        TOKEN = os.environ.get("CANCELPROC_TEST_NO_SUCH_VARIABLE")
        if TOKEN is None:
            raise RuntimeError("PROXMOX token not set\\nsecond line of the message")  # HERE
    """, "RuntimeError: PROXMOX token not set"),
    "raises in a function called at import": (HookLoadError, """
        def connect():
            return {}["endpoint"]  # HERE

        CLIENT = connect()
    """, "KeyError: 'endpoint'"),
    "missing module": (HookLoadError, """
        from processor.hooks import add_hook
        import cancelproc_test_no_such_module  # HERE
    """, "ModuleNotFoundError: No module named 'cancelproc_test_no_such_module'"),
    "unknown hook point": (HookDefinitionError, """
        from processor.hooks import add_hook

        @add_hook("ServiceTerminated", 1)  # HERE
        def on_terminated(request_id):
            pass
    """, "unknown hook point 'ServiceTerminated'"),
    "unknown hook point, call form": (HookDefinitionError, """
        from processor.hooks import add_hook

        add_hook("AfterCronjob", 1, lambda summary: None)  # HERE
    """, "unknown hook point 'AfterCronjob'"),
    "parameter the point does not give": (HookDefinitionError, """
        from processor.hooks import add_hook

        @add_hook("AfterCronJob")
        def fine(summary):
            pass

        @add_hook("ServiceCancelled", 1)  # HERE
        def wants_summary(request_id, summary):
            pass
    """, "wants_summary asks for 'summary', which ServiceCancelled does not give"),
    "priority as a string": (HookDefinitionError, """
        from processor.hooks import add_hook

        @add_hook("ServiceCancelled", "5")  # HERE
        def f():
            pass
    """, "must be an integer, not '5'"),
    "priority as a float": (HookDefinitionError, """
        from processor.hooks import add_hook

        add_hook("ServiceCancelled", 1.5, lambda: None)  # HERE
    """, "must be an integer, not 1.5"),
    "priority as a bool": (HookDefinitionError, """
        from processor.hooks import add_hook

        @add_hook("ServiceCancelled", priority=True)  # HERE
        def f():
            pass
    """, "must be an integer, not True"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_load_errors_name_file_and_line(hooks_dir: Path, case: str) -> None:
    expected_type, source, fragment = ERROR_CASES[case]
    write(hooks_dir, "a_good.py", """
        from processor.hooks import add_hook

        @add_hook("ServiceCancelled")
        def good():
            pass
    """)
    path = write(hooks_dir, "broken.py", source)
    exc = load_error(hooks_dir, expected_type)
    message = str(exc)
    assert message.startswith(f"{path}:{line_of(path, '# HERE')}: "), \
        f"expected the error to start with {path}:{line_of(path, '# HERE')}: , got {message!r}"
    assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "second line" not in message


def test_load_file_and_first_error_stops_the_load(hooks_dir: Path) -> None:
    """Files load in name order; the first broken one stops everything (no partial registry)."""
    write(hooks_dir, "a.py", "raise ValueError('a is broken')\n")
    write(hooks_dir, "b.py", "raise ValueError('b is broken')\n")
    exc = load_error(hooks_dir)
    assert str(exc).startswith(f"{hooks_dir / 'a.py'}:1: ") and "a is broken" in str(exc)
    registry = HookRegistry()
    with pytest.raises(HookLoadError, match="b is broken"):
        load_file(registry, hooks_dir / "b.py")
    assert registry.impls() == []


def test_hook_with_positional_only_parameter_is_rejected_at_load_time(hooks_dir: Path) -> None:
    """Hooks are called with keyword arguments only, so `def f(request_id, /)` could never be
    called (TypeError on every call: every request would fail at run time). It is a
    HookDefinitionError at load time, naming the file and the line of the hook, so the mistake
    stops the run before any request is touched."""
    path = write(hooks_dir, "posonly.py", """
        from processor.hooks import add_hook

        @add_hook("TerminateAccount")  # HERE
        def terminate(idempotency_key, /):
            pass
    """)
    try:
        load(hooks_dir)
    except HookDefinitionError as exc:
        assert str(exc).startswith(f"{path}:{line_of(path, '# HERE')}: "), str(exc)
    else:
        pytest.fail("a hook with a positional-only parameter loaded without error; hooks are called with "
                    "keyword arguments, so it would fail with TypeError on every call")


# --------------------------------------------------------------------------- fail closed, through the CLI


def table_dump(db_file: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table: compare before and after a command that must write nothing."""
    con = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)
    try:
        names = [n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {n: sorted(con.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr) for n in names}
    finally:
        con.close()


@pytest.fixture
def data(tmp_path: Path, cli_env: dict[str, str | None]) -> dict[str, int]:
    """Two services: one with a pending Immediate request (due), one without a request."""
    database = open_database(str(cli_env["CANCELPROC_DATABASE_URL"]))
    try:
        with database.session.begin() as session:
            with_request = factories.service(session, next_due_date=None, addons=1, unpaid=1)
            request = factories.request(session, with_request, type_=RequestType.IMMEDIATE)
            free = factories.service(session, next_due_date=None)
            ids = {"request": request.id, "service": with_request.id, "free_service": free.id}
    finally:
        database.dispose()
    return ids


BROKEN_FILES = {
    "syntax error": "def broken(:  # HERE\n    pass\n",
    "raises at import": "import os\nraise RuntimeError('no API token')  # HERE\n",
    "unknown point": ("from processor.hooks import add_hook\n"
                      "@add_hook('PreModuleTerminated')  # HERE\ndef veto(client):\n    pass\n"),
    "unknown parameter": ("from processor.hooks import add_hook\n"
                          "@add_hook('PreModuleTerminate')  # HERE\ndef veto(customer):\n    pass\n"),
    "missing module": "import cancelproc_test_no_such_module  # HERE\n",
}

GOOD_HOOK = """
    import os
    from pathlib import Path
    from processor.hooks import add_hook

    CALLS = Path(os.environ["HOOKTEST_CALLS"])

    @add_hook("TerminateAccount")
    def terminate(idempotency_key):
        with CALLS.open("a") as f:
            f.write("TerminateAccount " + idempotency_key + "\\n")

    @add_hook("CancellationRequest")
    def created(request_id):
        with CALLS.open("a") as f:
            f.write("CancellationRequest " + str(request_id) + "\\n")
"""


def commands(ids: dict[str, int]) -> dict[str, list[Any]]:
    return {
        "run": ["run"],
        "run --dry-run": ["run", "--dry-run"],
        "requests create": ["requests", "create", ids["free_service"], "--type", "immediate",
                            "--reason-code", "too_expensive"],
        "requests process": ["requests", "process", ids["request"], "--now"],
        "requests withdraw": ["requests", "withdraw", ids["request"]],
    }


@pytest.mark.parametrize("command", ["run", "run --dry-run", "requests create", "requests process",
                                     "requests withdraw"])
@pytest.mark.parametrize("broken", list(BROKEN_FILES))
def test_broken_hook_file_stops_the_command_before_any_write(
        tmp_path: Path, hooks_dir: Path, cli_env: dict[str, str | None], data: dict[str, int], broken: str,
        command: str) -> None:
    calls = tmp_path / "calls.txt"
    write(hooks_dir, "a_good.py", GOOD_HOOK)  # loads fine (before the broken one), must never be called
    path = write(hooks_dir, "b_broken.py", BROKEN_FILES[broken])
    db_file = tmp_path / "x.db"
    before = table_dump(db_file)
    assert before["cancellation_requests"] and not before["runs"]

    result = invoke(cli_env, *commands(data)[command], HOOKTEST_CALLS=str(calls))
    assert result.exit_code == 2, (f"`{command}` with a broken hook file exited {result.exit_code}, not 2\n"
                                   f"stdout: {result.stdout}\nstderr: {result.stderr}\n{result.exception!r}")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith(f"error: {path}:{line_of(path, '# HERE')}: "), lines[0]
    assert "Traceback" not in result.output
    after = table_dump(db_file)
    assert after == before, "a command stopped by a broken hook file wrote to the database: " + str(
        {t: (before[t], after[t]) for t in before if before[t] != after[t]})
    assert after["runs"] == [] and [r for r in after["cancellation_requests"] if "pending" not in r] == []
    assert not calls.exists(), f"a hook was called although loading failed: {calls.read_text()}"

    # The control: without the broken file the same command writes (or, dry run, reads) and calls hooks.
    path.unlink()
    result = invoke(cli_env, *commands(data)[command], HOOKTEST_CALLS=str(calls))
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    if command != "run --dry-run":
        assert table_dump(db_file) != before
    if command in ("run", "requests process"):
        assert calls.read_text() == f"TerminateAccount {data['request']}\n"
    if command == "requests create":
        assert calls.read_text().startswith("CancellationRequest ")


@pytest.mark.parametrize("exit_call", ["sys.exit('PROXMOX_TOKEN is not set')", "sys.exit(0)"])
def test_hook_file_calling_sys_exit_fails_closed_with_exit_2(
        tmp_path: Path, hooks_dir: Path, cli_env: dict[str, str | None], data: dict[str, int], exit_call: str) -> None:
    """A hook file calling sys.exit() at import (e.g. "token not set"), with a message or with 0,
    still fails closed: `cancelproc run` writes nothing and exits 2 with one line
    'error: <file>:<line>: ...' naming the file and the line. Were SystemExit to escape the
    CLI, cron would see exit 0 (success) or 1 ("some requests failed") and no hint of which
    hook file is broken."""
    path = write(hooks_dir, "exits.py", f"import sys\n\n{exit_call}  # HERE\n")
    before = table_dump(tmp_path / "x.db")
    result = invoke(cli_env, "run")
    assert table_dump(tmp_path / "x.db") == before
    assert result.exit_code == 2, (
        f"a hook file doing `{exit_call}` at import made `cancelproc run` exit {result.exit_code!r} "
        f"(not 2) with stderr {result.stderr!r}; expected one line 'error: {path}:3: ...'")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:3: "), result.stderr


# --------------------------------------------------------------------------- entry points


PLUGIN_SOURCE = """
    from processor.hooks import add_hook

    @add_hook("ServiceCancelled", 3)  # P_FIRST
    def plugin_first(request_id):
        return ("plugin_first", request_id)

    def plugin_second(**kwargs):
        return ("plugin_second", kwargs["request_id"])

    add_hook("ServiceCancelled", 3, plugin_second)  # P_SECOND

    @add_hook("TerminateAccount", -10)  # P_TERMINATE
    def plugin_terminate(idempotency_key):
        return None
"""


@pytest.fixture
def make_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Path]]:
    """make_plugin(module_source, entry=...) -> the module's path: a fake installed distribution
    `fakeplugin` whose entry point (group cancelproc.hooks) names the module."""
    site = tmp_path / "site"

    def make(source: str = PLUGIN_SOURCE, entry: str = f"myplugin = {PLUGIN_MODULE}") -> Path:
        dist = site / "fakeplugin-1.0.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplugin\nVersion: 1.0\n", encoding="utf-8")
        (dist / "entry_points.txt").write_text(f"[cancelproc.hooks]\n{entry}\n", encoding="utf-8")
        module = write(site, f"{PLUGIN_MODULE}.py", source)
        monkeypatch.syspath_prepend(str(site))
        return module

    sys.modules.pop(PLUGIN_MODULE, None)
    yield make
    sys.modules.pop(PLUGIN_MODULE, None)


def described(registry: HookRegistry) -> list[tuple[str, int, str, str, int]]:
    return [(i.point, i.priority, i.fn.__qualname__, i.source, i.line) for i in registry.impls()]


def test_entry_point_hooks_are_loaded(make_plugin: Callable[..., Path]) -> None:
    module = make_plugin()
    assert load(None).impls() == [], "entry_points=False must not load plugins"
    registry = load(None, entry_points=True)
    assert described(registry) == [
        ("TerminateAccount", -10, "plugin_terminate", "entry point myplugin", line_of(module, "P_TERMINATE")),
        ("ServiceCancelled", 3, "plugin_first", "entry point myplugin", line_of(module, "P_FIRST")),
        ("ServiceCancelled", 3, "plugin_second", "entry point myplugin", line_of(module, "P_SECOND")),
    ]
    results = [r for _, r in registry.call("ServiceCancelled", point_params("ServiceCancelled", request_id=5))]
    assert results == [("plugin_first", 5), ("plugin_second", 5)]


def test_entry_point_hooks_are_listed_by_the_cli(make_plugin: Callable[..., Path], hooks_dir: Path,
                                                  cli_env: dict[str, str | None]) -> None:
    module = make_plugin()
    write(hooks_dir, "local.py", """
        from processor.hooks import add_hook

        @add_hook("TerminateAccount", -20)
        def local_first():
            pass
    """)
    rows = json.loads(ok(invoke(cli_env, "hooks", "list", "--json")).stdout)
    assert [(r["point"], r["priority"], r["function"], r["file"]) for r in rows] == [
        ("TerminateAccount", -20, "local_first", "local.py:3"),
        ("TerminateAccount", -10, "plugin_terminate", f"entry point myplugin:{line_of(module, 'P_TERMINATE')}"),
        ("ServiceCancelled", 3, "plugin_first", f"entry point myplugin:{line_of(module, 'P_FIRST')}"),
        ("ServiceCancelled", 3, "plugin_second", f"entry point myplugin:{line_of(module, 'P_SECOND')}"),
    ]


def test_entry_point_loaded_twice_in_one_process_registers_again(make_plugin: Callable[..., Path]) -> None:
    make_plugin()
    first = load(None, entry_points=True)
    assert PLUGIN_MODULE in sys.modules
    second = load(None, entry_points=True)  # the module is not imported again: its marks are used
    assert described(second) == described(first) and len(described(first)) == 3
    assert [i.seq for i in second.impls("ServiceCancelled")] == [i.seq for i in first.impls("ServiceCancelled")]
    third = load(None, entry_points=True)
    assert described(third) == described(first), "each load must register the plugin's hooks once, not more"


def test_entry_point_module_imported_beforehand_still_registers(make_plugin: Callable[..., Path]) -> None:
    """A plugin module imported before any load (by the application, a test, ...)."""
    make_plugin()
    __import__(PLUGIN_MODULE)
    registry = load(None, entry_points=True)
    assert [name for _, _, name, _, _ in described(registry)] == ["plugin_terminate", "plugin_first", "plugin_second"]


def test_entry_point_lambda_hooks_survive_a_second_load(make_plugin: Callable[..., Path]) -> None:
    """A plugin loaded a second time in one process (its module already imported) registers
    exactly the hooks of the first load, including one registered with the call form on a
    lambda (or any function not kept as a module attribute). Otherwise a hook would silently
    go missing from the second load on, e.g. in a long-lived process or a test suite."""
    make_plugin(textwrap.dedent(PLUGIN_SOURCE) + 'add_hook("AfterCronJob", 0, lambda summary: "lambda")  # P_LAMBDA\n')
    first = described(load(None, entry_points=True))
    assert ("AfterCronJob", 0, "<lambda>") in [d[:3] for d in first]
    second = described(load(None, entry_points=True))
    assert second == first, (
        "a plugin's lambda hook (add_hook(point, priority, lambda ...)) was lost, or the hooks changed, "
        f"on the second load in the same process.\n"
        f"first load: {first}\nsecond load: {second}")


def test_hook_file_importing_a_plugin_module_does_not_register_its_hooks_twice(
        make_plugin: Callable[..., Path], hooks_dir: Path) -> None:
    """A hook file that imports an installed plugin's module (to reuse a helper) registers only
    its own hooks; the plugin's hooks are registered once, by its entry point. Otherwise every
    plugin hook, TerminateAccount included, would run twice per request."""
    make_plugin()
    write(hooks_dir, "uses_plugin.py", f"""
        import {PLUGIN_MODULE}

        HELPER = {PLUGIN_MODULE}.plugin_first
    """)
    registry = load(hooks_dir, entry_points=True)
    names = [i.fn.__qualname__ for i in registry.impls("TerminateAccount")]
    assert names == ["plugin_terminate"], (
        "a hook file that imports a plugin module registered the plugin's hooks a second time; "
        f"TerminateAccount hooks: {[(i.fn.__qualname__, i.source) for i in registry.impls('TerminateAccount')]}")


def test_broken_entry_point_is_a_load_error_naming_it(make_plugin: Callable[..., Path]) -> None:
    make_plugin("import os\nraise RuntimeError('plugin cannot reach its API')\n")
    with pytest.raises(HookLoadError) as info:
        load(None, entry_points=True)
    message = str(info.value)
    assert isinstance(info.value, InputError) and info.value.exit_code == 2
    assert message == (f"entry point myplugin ({PLUGIN_MODULE}): "
                       "failed to load: RuntimeError: plugin cannot reach its API")


def test_broken_entry_point_error_is_one_line(make_plugin: Callable[..., Path]) -> None:
    """A broken entry point whose exception has a multi-line message (common: API errors,
    pydantic ValidationError, chained messages) still gives a one-line error, keeping the
    message's first line, as a broken hook file does (DESIGN.md guarantee 6: one line)."""
    make_plugin("import os\nraise RuntimeError('plugin cannot reach its API\\nsecond line')\n")
    with pytest.raises(HookLoadError) as info:
        load(None, entry_points=True)
    message = str(info.value)
    assert "RuntimeError: plugin cannot reach its API" in message
    assert "\n" not in message, (
        f"a broken entry point's error spans several lines (the whole exception text): {message!r}")


def test_entry_point_naming_a_missing_module_is_a_load_error(make_plugin: Callable[..., Path]) -> None:
    make_plugin(entry="ghost = cancelproc_test_no_such_plugin")
    with pytest.raises(HookLoadError, match=r"^entry point ghost \(cancelproc_test_no_such_plugin\): .*"
                                             r"ModuleNotFoundError"):
        load(None, entry_points=True)


def test_entry_point_with_a_bad_hook_is_a_definition_error_naming_file_and_line(
        make_plugin: Callable[..., Path]) -> None:
    module = make_plugin("""
        from processor.hooks import add_hook

        @add_hook("TerminateAccount")  # HERE
        def terminate(hostname):
            pass
    """)
    with pytest.raises(HookDefinitionError) as info:
        load(None, entry_points=True)
    assert str(info.value).startswith(f"{module}:{line_of(module, '# HERE')}: ")
    assert "'hostname'" in str(info.value)


def test_broken_entry_point_stops_the_run(make_plugin: Callable[..., Path], tmp_path: Path,
                                          cli_env: dict[str, str | None], data: dict[str, int]) -> None:
    make_plugin("raise ImportError('plugin is broken')\n")
    before = table_dump(tmp_path / "x.db")
    result = ok(invoke(cli_env, "run"), code=2)
    assert result.stderr.strip().splitlines() == [
        f"error: entry point myplugin ({PLUGIN_MODULE}): failed to load: ImportError: plugin is broken"]
    assert table_dump(tmp_path / "x.db") == before


# --------------------------------------------------------------------------- CANCELPROC_TRACE_HOOKS


TRACED = """
    from processor.hooks import add_hook

    @add_hook("ServiceCancelled", 1)
    def first(request_id, days_late):
        return {"seen": request_id, "late": days_late}

    @add_hook("ServiceCancelled", 2)
    def second(service):
        return None

    @add_hook("AfterCronJob")
    def after(summary):
        return "after " + str(summary["completed"])
"""


def log_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_trace_logs_each_call_with_arguments_and_result(hooks_dir: Path) -> None:
    path = write(hooks_dir, "traced.py", TRACED)
    stream = io.StringIO()
    configure_logging("info", "json", stream)

    quiet = load(hooks_dir)
    quiet.call("ServiceCancelled", point_params("ServiceCancelled", request_id=11, days_late=2))
    assert stream.getvalue() == "", "calls must not be logged without trace"

    registry = load(hooks_dir, trace=True)
    registry.call("ServiceCancelled", point_params("ServiceCancelled", request_id=11, days_late=2,
                                                    service={"id": 4}))
    registry.apply("AfterCronJob", point_params("AfterCronJob", summary={"completed": 3}))
    lines = log_lines(stream)
    assert [(entry["event"], entry["point"], entry["hook"]) for entry in lines] == [
        ("hook called", "ServiceCancelled", f"first (traced.py:{line_of(path, 'def first') - 1})"),
        ("hook called", "ServiceCancelled", f"second (traced.py:{line_of(path, 'def second') - 1})"),
        ("hook called", "AfterCronJob", f"after (traced.py:{line_of(path, 'def after') - 1})"),
    ]
    assert lines[0]["arguments"] == repr({"request_id": 11, "days_late": 2})
    assert lines[0]["result"] == repr({"seen": 11, "late": 2})
    assert lines[1]["arguments"] == repr({"service": {"id": 4}}) and lines[1]["result"] == "None"
    assert lines[2]["arguments"] == repr({"summary": {"completed": 3}}) and lines[2]["result"] == "'after 3'"
    assert all(entry["level"] == "info" for entry in lines)


def test_trace_through_the_cli(tmp_path: Path, hooks_dir: Path, cli_env: dict[str, str | None],
                               data: dict[str, int]) -> None:
    write(hooks_dir, "traced.py", TRACED)
    env = {"CANCELPROC_LOG_FORMAT": "json", "CANCELPROC_LOG_LEVEL": "info"}

    result = ok(invoke(cli_env, "run", "--json", **env, CANCELPROC_TRACE_HOOKS="1"))
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    traced = [entry for entry in lines if entry.get("event") == "hook called"]
    assert [(entry["point"], entry["hook"].split(" ")[0]) for entry in traced] == [
        ("ServiceCancelled", "first"), ("ServiceCancelled", "second"), ("AfterCronJob", "after")], traced
    con = sqlite3.connect(tmp_path / "x.db")
    try:
        (days_late,), = con.execute("SELECT days_late FROM cancellation_requests WHERE id = ?", (data["request"],))
    finally:
        con.close()
    assert traced[0]["arguments"] == repr({"request_id": data["request"], "days_late": days_late})
    assert traced[0]["result"] == repr({"seen": data["request"], "late": days_late})
    assert traced[2]["result"] == "'after 1'"

    # Without the variable, nothing is traced.
    database = open_database(str(cli_env["CANCELPROC_DATABASE_URL"]))
    try:
        with database.session.begin() as session:
            factories.request(session, factories.service(session, next_due_date=None), type_=RequestType.IMMEDIATE)
    finally:
        database.dispose()
    result = ok(invoke(cli_env, "run", "--json", **env))
    assert "hook called" not in result.stderr
