"""The package as operators install it (issue 12, items 2 and 3): the wheel built from a copy
of this checkout, installed into a fresh virtualenv outside the repository, used from an
unrelated folder with a clean environment (no PYTHONPATH, no CANCELPROC_* variables).

- `init` makes the app folder; `import`, `requests create` and `run` deliver the emails to
  a real SMTP server (aiosmtpd on localhost), rendered from the templates shipped in the
  wheel (English and German) and from an override in the app folder's templates/.
- every line of crontab.example runs verbatim through /bin/sh under `env -i` in a freshly
  initialised folder (only /opt/cancelproc and .venv/bin replaced), as cron runs it.
- the systemd units of docs/deploy.md pass `systemd-analyze verify`, and their ExecStart
  runs in its WorkingDirectory with an empty environment.

The tests reach no network but localhost, so the wheel's dependencies are not downloaded:
the fresh virtualenv sees the test runner's site-packages through one line of a .pth file
(a plain path: the .pth files there, among them the editable install of this checkout, are
not run). cancelproc itself comes only from the wheel, which the fixture checks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from processor.config import Settings, load_settings
from tests.cli_helpers import uncomment_setting
from tests.conftest import REPO
from tests.smtp_server import HOST, SmtpServer, smtp_server

# One pytest-xdist worker runs the whole module (--dist loadgroup in pyproject's addopts):
# the module-scoped wheel and virtualenv are built once, not once per worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("install")]

TIMEOUT = 300  # seconds for one command; generous, for a loaded machine


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    home: Path  # HOME of the commands: outside the repository, empty

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def env(self, **extra: str) -> dict[str, str]:
        """What a login shell of an operator would have: no PYTHONPATH, no CANCELPROC_*."""
        return {"PATH": f"{self.bin}:/usr/bin:/bin", "HOME": str(self.home), "LANG": "C.UTF-8", **extra}

    def cancelproc(self, folder: Path, *args: str, code: int | None = 0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(self.bin / "cancelproc"), *args], cwd=folder, env=self.env(),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT)
        if code is not None:
            assert done.returncode == code, (f"cancelproc {' '.join(args)}: exit {done.returncode} (expected {code})\n"
                                             f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}")
            assert "Traceback" not in done.stdout + done.stderr
        return done


def _source_copy(into: Path) -> Path:
    """The checkout's files as git sees them (tracked, and new ones not ignored): no .venv,
    no build/ or egg-info left by an editable install."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        if (REPO / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, into / name)
    return into


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel, built as `pip wheel` builds it (offline: the build requirements are the
    test extras) and installed into a fresh virtualenv. Once for the module."""
    top = tmp_path_factory.mktemp("install")
    assert REPO not in top.parents, "the virtualenv must lie outside the repository"
    source = _source_copy(top / "source")
    dist = top / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "--wheel-dir", str(dist), str(source)], check=True, capture_output=True,
                   timeout=TIMEOUT)
    (wheel,) = dist.glob("cancelproc-*.whl")
    venv = top / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=TIMEOUT)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--quiet", str(wheel)], check=True, capture_output=True, timeout=TIMEOUT)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_cancelproc_test_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    home = top / "home"
    home.mkdir()
    result = Installed(wheel, venv, home)
    where = subprocess.run([str(python), "-c", "import processor; print(processor.__file__)"], cwd=home,
                           env=result.env(), capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), f"processor imported from {where}, not from the wheel in {site}"
    return result


def test_the_wheel_holds_every_file_of_the_package(installed: Installed) -> None:
    """Code and data: every file of processor/ in the checkout (a template, a new example
    hook) is in the wheel, so package data cannot be forgotten in pyproject.toml."""
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "processor"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    with zipfile.ZipFile(installed.wheel) as wheel:
        packed = {name for name in wheel.namelist() if name.startswith("processor/")}
    assert sorted(set(tracked) - packed) == []
    assert "processor/resources/templates/de/service_cancellation_confirmation.jinja" in packed


def _write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def smtp(tmp_path: Path) -> Iterator[SmtpServer]:
    with smtp_server(tmp_path) as server:
        yield server


def test_the_installed_wheel_inits_imports_runs_and_delivers_by_smtp(installed: Installed, tmp_path: Path,
                                                                     smtp: SmtpServer) -> None:
    app = tmp_path / "billing"  # an unrelated folder, as an operator's /opt/cancelproc
    app.mkdir()
    made = installed.cancelproc(app, "init").stdout
    assert "no config file was found, so this init used the defaults" in made
    for item in ("config/processor.toml", "var/", "var/log/", "hooks/", "hooks/_example_notify.py", "templates/"):
        assert re.search(rf"^  created {re.escape(item)}(\s|$)", made, re.M), f"{item} not reported created:\n{made}"
    assert "ready (schema" in made
    assert (app / "var" / "cancelproc.db").is_file() and (app / "var" / "log").is_dir()
    assert sorted(p.name for p in (app / "hooks").iterdir()) == [
        "README.md", "_example_cancel_subscription.py", "_example_notify.py", "_example_terminate_http.py",
        "_example_veto_balance.py"]
    assert "no hooks loaded" in installed.cancelproc(app, "hooks", "list").stdout  # the examples stay disabled

    config = app / "config" / "processor.toml"
    # The shipped file (tests/test_config.py: every setting, commented out at its default).
    assert config.read_text() == (REPO / "processor" / "resources" / "app" / "config" / "processor.toml").read_text()
    assert load_settings(config).model_dump() == Settings(app_root=app.resolve()).model_dump()
    for key, value in (("company_name", '"Acme Hosting"'), ("delivery", '"smtp"')):
        uncomment_setting(config, "email", key, value)
    for key, value in (("host", f'"{HOST}"'), ("port", str(smtp.port)), ("security", '"none"')):
        uncomment_setting(config, "email.smtp", key, value)
    # The app folder's templates/ comes before the built-in ones, and can extend them.
    _write(app / "templates" / "new_cancellation_request.jinja",
           '{% extends "default:new_cancellation_request.jinja" %}',
           "{% block subject %}Overridden: cancel {{ service_domain }}{% endblock %}")

    data = tmp_path / "export"  # the billing system's export, elsewhere
    data.mkdir()
    files = [
        _write(data / "clients.csv", "external_id,first_name,last_name,email,language",
               "C1,Ann,Lee,ann@example.test,en", "C2,Jonas,Weber,jonas@example.test,de"),
        _write(data / "products.csv", "external_id,name", "P1,VPS 4GB"),
        _write(data / "services.csv", "external_id,client_external_id,product_external_id,status,domain,next_due_date",
               "S1,C1,P1,Active,ann.example.test,2026-01-01", "S2,C2,P1,Active,jonas.example.test,2026-01-01"),
        _write(data / "requests.csv", "external_id,service_external_id,type,reason_code,reason",
               "R1,S1,Immediate,too_expensive,Moving to a smaller plan"),
    ]
    imported = installed.cancelproc(app, "import", *map(str, files)).stdout
    assert "requests.csv (requests): 1 inserted" in imported
    services = json.loads(installed.cancelproc(app, "services", "list", "--json").stdout)["rows"]
    jonas = next(s["id"] for s in services if s["domain"] == "jonas.example.test")
    installed.cancelproc(app, "requests", "create", str(jonas), "--reason-code", "unused",
                         "--type", "immediate")

    run = installed.cancelproc(app, "run", "--trigger", "cron", "--json")
    assert json.loads(run.stdout[run.stdout.index("{"):])["status"] == "completed", run.stdout

    received = {r.message["Subject"]: r for r in smtp.received}
    ann = received["Service Cancellation Confirmation - VPS 4GB (ann.example.test)"]
    assert ann.rcpt_tos == ["ann@example.test"]
    text = ann.message.get_body(("plain",)).get_content()
    assert "Dear Ann," in text and "Reason given: Moving to a smaller plan" in text and "Acme Hosting" in text
    german = received["Bestätigung der Kündigung - VPS 4GB (jonas.example.test)"]  # templates/de/ shipped too
    assert german.rcpt_tos == ["jonas@example.test"]
    assert "Hallo Jonas," in german.message.get_body(("plain",)).get_content()
    confirmation = [r for r in smtp.received if r.rcpt_tos == ["jonas@example.test"] and r is not german]
    assert len(confirmation) == 1, sorted(received)  # Cancellation Request Confirmation, in German
    assert "Overridden: cancel jonas.example.test" in received, sorted(received)  # the app folder's override
    digest = [r for r in smtp.received if r.message["Subject"].startswith("Cron Job Activity")]
    assert len(digest) == 1 and digest[0].rcpt_tos == ["support@example.test"], sorted(received)
    assert {r.message["From"] for r in smtp.received} == {"Acme Hosting <billing@example.test>"}

    # The HTML report from the wheel: its page and the vendored uPlot are package data.
    page = tmp_path / "churn.html"
    report = json.loads(installed.cancelproc(app, "report", "html", "--out", str(page), "--json").stdout)
    assert (report["cancellations"], report["runs"]) == (2, 1)
    html = page.read_text()
    assert "var uPlot=function()" in html and "Permission is hereby granted" in html


# --- crontab.example and the systemd units of docs/deploy.md, in an initialised folder -------------------------

CRON_ENTRY = re.compile(r"#?\s*((?:\S+\s+){5})(cd /opt/cancelproc && .*)$")


def crontab_lines() -> list[tuple[str, str]]:
    """(schedule, command) of each line of crontab.example: the active ones and the
    optional ones commented out directly (`#*/15 ...`), which are pasted as they are."""
    found = []
    for line in (REPO / "crontab.example").read_text().splitlines():
        match = CRON_ENTRY.match(line.strip())
        if match:
            found.append((match.group(1).strip(), match.group(2)))
    return found


def test_crontab_example_has_the_nightly_line() -> None:
    lines = crontab_lines()
    active = [c for c in (REPO / "crontab.example").read_text().splitlines() if c.strip() and not c.startswith("#")]
    assert len(active) == 1 and "run --trigger cron" in active[0]
    assert len(lines) == 2, lines


@pytest.mark.parametrize("entry", crontab_lines(), ids=lambda e: e[1].split("&&")[1].split(">>")[0].strip())
def test_each_crontab_line_runs_as_cron_runs_it_in_a_fresh_folder(installed: Installed, tmp_path: Path,
                                                                    entry: tuple[str, str]) -> None:
    app = tmp_path / "opt" / "cancelproc"
    app.mkdir(parents=True)
    installed.cancelproc(app, "init")
    command = entry[1].replace("/opt/cancelproc", str(app)).replace(".venv/bin/", f"{installed.bin}/")
    # cron: /bin/sh -c, an almost empty environment (env -i leaves none at all), no terminal.
    done = subprocess.run(["env", "-i", "/bin/sh", "-c", command], cwd=tmp_path, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), (command, done)  # 0: all done, as documented
    log = app / "var" / "log" / "cancelproc.log"
    assert log.is_file() and log.stat().st_size > 0, f"{command}: wrote no log"
    assert "Traceback" not in log.read_text()
    if "run --trigger cron" in command:
        last = json.loads(installed.cancelproc(app, "runs", "show", "last", "--json").stdout)
        assert (last["status"], last["trigger"]) == ("completed", "cron"), last


DEPLOY = REPO / "docs" / "deploy.md"
UNIT = re.compile(r"`/etc/systemd/system/([\w.-]+)`:\s*\n+```ini\n(.*?)```", re.S)


def deploy_units() -> dict[str, str]:
    return dict(UNIT.findall(DEPLOY.read_text()))


def test_deploy_md_has_the_service_and_the_timer() -> None:
    assert sorted(deploy_units()) == ["cancelproc.service", "cancelproc.timer"]


def test_the_systemd_units_of_deploy_md_verify_and_their_command_runs(installed: Installed, tmp_path: Path) -> None:
    app = tmp_path / "opt" / "cancelproc"
    app.mkdir(parents=True)
    installed.cancelproc(app, "init")
    units = tmp_path / "units"
    units.mkdir()
    for name, text in deploy_units().items():
        text = text.replace("/opt/cancelproc/.venv/bin/", f"{installed.bin}/").replace("/opt/cancelproc", str(app))
        (units / name).write_text(text)
    service = (units / "cancelproc.service").read_text()
    assert f"WorkingDirectory={app}\n" in service
    exec_start = re.search(r"^ExecStart=(.*)$", service, re.M).group(1)  # type: ignore[union-attr]
    # What systemd runs, where it runs it, with no environment of ours; exit 0 (1 is SuccessExitStatus too).
    done = subprocess.run(["env", "-i", *exec_start.split()], cwd=app, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode in (0, 1) and "Traceback" not in done.stderr, done
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here: the unit files were not verified "
                    "(their ExecStart ran in its WorkingDirectory above)")
    verified = subprocess.run([analyze, "verify", "--man=no", *(str(units / n) for n in sorted(deploy_units()))],
                              capture_output=True, text=True, timeout=TIMEOUT, env={"PATH": os.environ["PATH"]})
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, ""), verified.stdout + verified.stderr
