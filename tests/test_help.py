"""`--help` for people at the support desk: every command and group shows examples,
every --json says what it prints, --reason-code lists the configured codes, and
click's shell completion works as README says (issue 16). No database needed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from processor.cli import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def every_command(group: click.Group = cli, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from every_command(command, (*path, name))
        else:
            yield (*path, name)


def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str, env: dict[str, str] | None = None) -> Result:
    monkeypatch.chdir(tmp_path)
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CANCELPROC_")}
    clean["CANCELPROC_DATABASE_URL"] = f"sqlite:///{tmp_path / 'never-opened.db'}"
    return CliRunner().invoke(cli, list(args), env={**clean, **(env or {})}, prog_name="cancelproc")


COMMANDS = list(every_command())


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "cancelproc")
def test_every_help_has_examples_and_says_what_json_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       path: tuple[str, ...]) -> None:
    result = run(tmp_path, monkeypatch, *path, "--help")
    assert result.exit_code == 0, result.output
    text = result.stdout
    examples = text[text.index("Examples:"):].splitlines()[1:] if "Examples:" in text else []
    shown = [line.strip() for line in examples if line.startswith("    cancelproc ")]
    assert 1 <= len(shown) <= 3, f"{' '.join(path)}: examples: {shown}"
    assert all(line.split()[1] in cli.commands for line in shown), shown  # real commands
    options = text[text.index("Options:"):]
    if "--json" in options:
        json_help = options[options.index("--json"):].split("\n  -")[0]
        assert "JSON" in json_help, f"{' '.join(path)}: --json without a description: {json_help!r}"
    assert not (tmp_path / "never-opened.db").exists()  # help opens no database


def test_examples_run_what_they_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each example is a command with options it has (not run: --help after it stops click
    once the words before it are parsed, so an option it lacks is still an error)."""
    checked = 0
    for path in COMMANDS:
        text = run(tmp_path, monkeypatch, *path, "--help").stdout
        for line in re.findall(r"^    (cancelproc .*)$", text, re.M):
            checked += 1
            words = [w.strip('"') for w in re.findall(r'"[^"]*"|\S+', line.split("#")[0].split(">")[0])][1:]
            result = run(tmp_path, monkeypatch, *words, "--help")
            assert result.exit_code == 0, f"{line}: {result.output}"
    assert checked >= len(COMMANDS)


def test_reason_code_help_lists_the_configured_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = run(tmp_path, monkeypatch, "requests", "create", "--help").stdout
    assert ("Configured: too_expensive, missing_features, switched_service, unused, customer_service, too_complex, "
            "low_quality, other.") in " ".join(default.split())
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "processor.toml").write_text('reason_codes = ["price", "moving"]\n')
    configured = " ".join(run(tmp_path, monkeypatch, "requests", "create", "--help").stdout.split())
    assert "Configured: price, moving." in configured
    broken = run(tmp_path, monkeypatch, "requests", "create", "--help", env={"CANCELPROC_REASON_CODES": "[1"})
    assert broken.exit_code == 0 and "does not load now" in " ".join(broken.stdout.split())


def test_shell_completion_as_readme_installs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = README.read_text()
    for shell in ("bash", "zsh", "fish"):
        assert f"_CANCELPROC_COMPLETE={shell}_source cancelproc" in readme
        script = run(tmp_path, monkeypatch, env={"_CANCELPROC_COMPLETE": f"{shell}_source"})
        assert script.exit_code == 0 and "_CANCELPROC_COMPLETE" in script.stdout, script.output
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "processor.toml").write_text('reason_codes = ["price", "moving", "privacy"]\n')
    completed = run(tmp_path, monkeypatch, env={"_CANCELPROC_COMPLETE": "bash_complete",
                                                "COMP_WORDS": "cancelproc requests create 1 --reason-code p",
                                                "COMP_CWORD": "5"})
    assert completed.stdout.split() == ["plain,price", "plain,privacy"]
    commands = run(tmp_path, monkeypatch, env={"_CANCELPROC_COMPLETE": "bash_complete", "COMP_WORDS": "cancelproc fi",
                                               "COMP_CWORD": "1"})
    assert commands.stdout.split() == ["plain,find"]
