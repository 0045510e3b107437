"""The nightly job failed before its run began (a hook file that does not load, the
database unreachable): `status` names it (one line), the metrics show it, and staff get
one "Cron Job Attention Needed" email per streak, through a real SMTP server."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from freezegun import freeze_time
from prometheus_client.parser import text_string_to_metric_families

from processor.db import Database
from tests import factories
from tests.cli_helpers import as_json, error_text, ok, uncomment_setting
from tests.smtp_server import HOST, free_port, smtp_server
from tests.smtp_server import smtp_env as smtp_server_env

NIGHT = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)
STATE = Path("var") / "cancelproc-attention.json"


def env_for(port: int) -> dict[str, str]:
    return smtp_server_env(port, CANCELPROC_EMAIL__STAFF_ADDRESS="ops@example.test",
                           CANCELPROC_METRICS_FILE="var/cancelproc.prom")


def gauges(tmp_path: Path) -> dict[str, float]:
    text = (tmp_path / "var" / "cancelproc.prom").read_text()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def problems(stderr: str) -> list[str]:
    return [line.removeprefix("problem: ") for line in stderr.splitlines() if line.startswith("problem: ")]


def attention_emails(server) -> list[str]:
    return [r.message["Subject"] for r in server.received if "Attention Needed" in r.message["Subject"]]


def test_a_hook_file_that_does_not_load_is_reported_until_a_run_completes(invoke, db: Database, tmp_path):
    with db.session.begin() as s:
        factories.request(s, factories.service(s))
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "broken.py").write_text("def oops(:\n")
    with smtp_server(tmp_path) as server:
        env = env_for(server.port)
        for night in (NIGHT, NIGHT + dt.timedelta(days=1)):  # two failures in a row: one email
            with freeze_time(night):
                failed = invoke("run", env=env)
            assert failed.exit_code == 2 and "broken.py" in failed.stderr and "Traceback" not in failed.output
        assert attention_emails(server) == ["Cron Job Attention Needed - cancelproc run on " + os.uname().nodename]
        body = next(r.message for r in server.received).get_body(("plain",)).get_content()
        assert "broken.py" in body and "failed before its run began" in body
        record = json.loads((tmp_path / STATE).read_text())
        assert (record["command"], record["failures"], record["staff_notified"]) == ("run", 2, True)
        assert record["first_failed_at"] == "2026-11-26T02:00:00+00:00"
        assert gauges(tmp_path)["cancelproc_failed_before_run"] == 2
        with freeze_time(NIGHT + dt.timedelta(days=1, minutes=5)):
            result = invoke("status", env=env)
        assert result.exit_code == 1
        named = [p for p in problems(result.stderr) if "failed before its run began" in p]
        assert len(named) == 1 and named[0].startswith(
            "`cancelproc run` failed before its run began at 2026-11-27T02:00:00+00:00 (2 times since "
            "2026-11-26T02:00:00+00:00): ") and "broken.py" in named[0]
        # Fixed: the next run completes and ends the streak; status and the metrics say so.
        (tmp_path / "hooks" / "broken.py").unlink()
        with freeze_time(NIGHT + dt.timedelta(days=2)):
            ok(invoke("run", env=env))
        assert not (tmp_path / STATE).exists()
        assert gauges(tmp_path)["cancelproc_failed_before_run"] == 0
        with freeze_time(NIGHT + dt.timedelta(days=2, minutes=5)):
            health = as_json(invoke("status", "--json", env=env))
        assert health["failed_before_run"] is None and health["healthy"]
        assert len(attention_emails(server)) == 1


@pytest.mark.slow
def test_an_unreachable_database_is_reported_by_status_and_the_metrics(tmp_path):
    """As cron runs it: a process, a database URL nothing listens on."""
    port = free_port()  # nothing listens here
    with smtp_server(tmp_path) as server:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("CANCELPROC_")}
        environ.update(env_for(server.port), CANCELPROC_DATABASE_URL=f"postgresql://cp@{HOST}:{port}/cancelproc")

        def cancelproc(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "processor", *args], cwd=tmp_path, env=environ,
                                  capture_output=True, text=True, timeout=120)

        first = cancelproc("run")
        assert first.returncode == 75, first.stderr  # the server is not there: try again later (EX_TEMPFAIL)
        # No terminal, as under cron: the log and the error line are JSON lines.
        errors = [error_text(line) for line in first.stderr.splitlines() if '"exit_code"' in line]
        assert len(errors) == 1 and errors[0].startswith("error: ") and "Traceback" not in first.stderr
        cancelproc("run")  # the next try: same streak, no second email
        assert len(attention_emails(server)) == 1
    record = json.loads((tmp_path / STATE).read_text())
    assert (record["failures"], record["staff_notified"]) == (2, True)
    metrics = gauges(tmp_path)
    assert (metrics["cancelproc_failed_before_run"], metrics["cancelproc_problems"]) == (2, 1)
    status = cancelproc("status")
    assert status.returncode == 1
    named = problems(status.stderr)
    assert len(named) == 1 and named[0].startswith("`cancelproc run` failed before its run began at ")
    assert "Connection refused" in named[0] and status.stderr.count("\n") == 1  # one line


# --- a config that does not load, under the crontab line --------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def nightly_line(app: Path) -> str:
    """The active line of crontab.example, its paths made this test's."""
    (line,) = [ln for ln in (REPO / "crontab.example").read_text().splitlines() if ln.strip() and ln[0] != "#"]
    command = line.split(None, 5)[5]
    return command.replace("/opt/cancelproc", str(app)).replace(".venv/bin/", f"{Path(sys.executable).parent}/")


def cron(app: Path) -> int:
    """Run the nightly line as cron does: /bin/sh, an empty environment, no terminal."""
    return subprocess.run(["env", "-i", "/bin/sh", "-c", nightly_line(app)], stdin=subprocess.DEVNULL,
                          timeout=120).returncode


def cancelproc(app: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CANCELPROC_")}
    return subprocess.run([sys.executable, "-m", "processor", *args], cwd=app, env=environ, capture_output=True,
                          text=True, timeout=120)


def app_folder(tmp_path: Path, smtp_port: int) -> Path:
    """An initialised app folder whose config sends by SMTP, names a staff address and a metrics file."""
    app = tmp_path / "opt" / "cancelproc"
    app.mkdir(parents=True)
    assert cancelproc(app, "init").returncode == 0
    config = app / "config" / "processor.toml"
    uncomment_setting(config, "", "metrics_file", '"var/cancelproc.prom"')
    for key, value in (("delivery", '"smtp"'), ("staff_address", '"ops@example.test"')):
        uncomment_setting(config, "email", key, value)
    for key, value in (("host", f'"{HOST}"'), ("port", str(smtp_port)), ("security", '"none"'), ("username", '""')):
        uncomment_setting(config, "email.smtp", key, value)
    return app


def log_errors(app: Path) -> list[str]:
    """The error lines of the cron log, every line of which must be a JSON object."""
    lines = (app / "var" / "log" / "cancelproc.log").read_text().splitlines()
    return [error_text(line) for line in lines if json.loads(line)["level"] == "error"]


@pytest.mark.slow
def test_a_config_with_a_wrong_value_is_recorded_mailed_and_shown_until_a_run_completes(tmp_path):
    with smtp_server(tmp_path) as server:
        app = app_folder(tmp_path, server.port)
        config = app / "config" / "processor.toml"
        good = config.read_text()
        config.write_text('business_timezone = "Europe/Atlantis"\n' + good)
        assert (cron(app), cron(app)) == (2, 2)  # two nights: one email
        assert attention_emails(server) == ["Cron Job Attention Needed - cancelproc run on " + os.uname().nodename]
        errors = log_errors(app)
        assert len(errors) == 2 and all(e == errors[0] for e in errors)
        assert errors[0].startswith("error: config/processor.toml: business_timezone: ")
        assert "Europe/Atlantis" in errors[0]
        record = json.loads((app / STATE).read_text())
        assert (record["command"], record["failures"], record["staff_notified"]) == ("run", 2, True)
        assert errors[0].endswith(record["error"])
        assert gauges(app)["cancelproc_failed_before_run"] == 2
        # status reads the same config: the same line, refused like any bad config (exit 2).
        status = cancelproc(app, "status")
        assert (status.returncode, status.stdout) == (2, "") and error_text(status.stderr) == errors[0]
        # Fixed: status names last night's failure until a run completes, which ends the streak.
        config.write_text(good)
        status = cancelproc(app, "status")
        assert status.returncode == 1 and any("failed before its run began" in p and "Europe/Atlantis" in p
                                              for p in problems(status.stderr))
        assert cron(app) == 0
        assert not (app / STATE).exists() and gauges(app)["cancelproc_failed_before_run"] == 0


def test_a_config_that_is_not_toml_leaves_the_record_alone(tmp_path):
    """Nothing of the file can be trusted: no metrics file, no email; the record under
    the app root, which status shows once the file is mended."""
    with smtp_server(tmp_path) as server:
        app = app_folder(tmp_path, server.port)
        config = app / "config" / "processor.toml"
        good = config.read_text()
        config.write_text(good + "\n[email\n")
        assert cron(app) == 2
        assert server.received == []
    (error,) = log_errors(app)
    assert error.startswith("error: config/processor.toml: not valid TOML: ")
    assert json.loads((app / STATE).read_text())["failures"] == 1
    assert not (app / "var" / "cancelproc.prom").exists()
    config.write_text(good)
    status = cancelproc(app, "status")
    assert status.returncode == 1 and any("not valid TOML" in p for p in problems(status.stderr))


def test_a_missing_config_file_named_by_the_command_line_records_nothing(tmp_path):
    """No app folder is known: the error line is all there is."""
    done = cancelproc(tmp_path, "--config", str(tmp_path / "config" / "nowhere.toml"), "run")
    assert done.returncode == 2 and "config file not found" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_config_error_found_after_the_config_loaded_is_recorded_too(invoke, db: Database, tmp_path):
    """An SMTP login with no password is found when the run's mailer is made, before the
    run begins: the nightly job is broken, recorded as any other failure before the run."""
    env = {"CANCELPROC_EMAIL__DELIVERY": "smtp", "CANCELPROC_EMAIL__SMTP__USERNAME": "billing",
           "CANCELPROC_EMAIL__STAFF_ADDRESS": ""}
    with freeze_time(NIGHT):
        failed = invoke("run", env=env)
    assert failed.exit_code == 2 and "there is no password" in failed.stderr
    record = json.loads((tmp_path / STATE).read_text())
    assert record["command"] == "run" and "there is no password" in record["error"]
