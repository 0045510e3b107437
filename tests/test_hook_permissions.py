"""Hook files are code: a hooks folder or hook file that users other than its owner can
write is refused, as sshd's StrictModes, unless hooks_allow_unsafe_permissions is set."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from processor.hooks import HookLoadError, load_hooks
from tests.cli_helpers import ok, one_line_error

HOOK = "from processor.hooks import add_hook\n@add_hook('PreCronJob')\ndef hello(run_id):\n    pass\n"


@pytest.fixture
def hooks_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "hooks"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    (folder / "hello.py").write_text(HOOK)
    os.chmod(folder / "hello.py", 0o644)
    return folder


def test_owner_only_writable_hooks_load(hooks_dir: Path) -> None:
    assert [i.fn.__name__ for i in load_hooks(hooks_dir, entry_points=False).impls()] == ["hello"]


@pytest.mark.parametrize(("target", "mode", "who"), [
    ("hello.py", 0o664, "its group"), ("hello.py", 0o646, "others"), (".", 0o777, "group and others"),
])
def test_a_file_or_folder_others_can_write_is_refused(hooks_dir: Path, target: str, mode: int, who: str) -> None:
    path = (hooks_dir / target).resolve() if target != "." else hooks_dir
    os.chmod(path, mode)
    with pytest.raises(HookLoadError) as caught:
        load_hooks(hooks_dir, entry_points=False)
    kind = "folder" if target == "." else "file"
    assert str(caught.value) == (f"{path}: hook {kind} refused: writable by {who} (mode {mode:04o}; chmod go-w {path}) "
                                 "(or set hooks_allow_unsafe_permissions = true)")
    assert load_hooks(hooks_dir, entry_points=False, check_permissions=False).impls()  # the setting allows it


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_a_file_owned_by_another_user_is_refused(hooks_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    os.chown(hooks_dir / "hello.py", nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(HookLoadError, match=f"owned by another user \\(uid {nobody.pw_uid}\\)"):
        load_hooks(hooks_dir, entry_points=False)


def test_at_the_cli_one_line_exit_2_and_the_setting(invoke, db, hooks_dir: Path) -> None:
    os.chmod(hooks_dir / "hello.py", 0o666)
    line = one_line_error(invoke("hooks", "list"), "hook file refused: writable by group and others")
    assert str(hooks_dir / "hello.py") in line
    listed = ok(invoke("hooks", "list", env={"CANCELPROC_HOOKS_ALLOW_UNSAFE_PERMISSIONS": "true"})).stdout
    assert "hello" in listed
