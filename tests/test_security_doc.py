"""SECURITY.md names the test behind each guarantee: every one it names must exist."""

from __future__ import annotations

import ast
import re

from tests.conftest import REPO


def test_every_test_security_md_names_exists() -> None:
    text = (REPO / "SECURITY.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?", text)
    assert len(named) > 15
    for path, function in named:
        source = REPO / path
        assert source.is_file(), f"SECURITY.md names {path}, which does not exist"
        if function:
            defined = {n.name for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.FunctionDef)}
            assert function in defined, f"SECURITY.md names {path}::{function}, which does not exist"
