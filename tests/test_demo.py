"""`make demo` itself, from a copy of the repository in a temporary folder."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_make_demo_from_a_clean_copy(tmp_path):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    copy = tmp_path / "app"
    for name in files:
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    result = subprocess.run(["make", "demo"], cwd=copy, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "demo data: 30 clients" in out
    assert "to cancel" in out and "nothing was changed" in out  # the dry run
    assert "status                    completed" in out
    assert "no-op (already closed)    1" in out
    assert "Cancelled" in out
    # The demo is an app folder made by init, as an operator's is.
    demo = copy / "var" / "demo"
    assert "created config/processor.toml" in out and (demo / "config" / "processor.toml").is_file()
    assert (demo / "var" / "cancelproc.db").exists() and (demo / "var" / "log").is_dir()
    assert list((demo / "var" / "outbox").glob("*-cron_job_activity.eml"))
