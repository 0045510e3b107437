"""The app folder `cancelproc init` makes: the shipped skeleton (processor/resources/app/:
the commented config file, hooks/ with its disabled examples, templates/ for overrides)
copied in, and var/ and var/log/ (the database, the outbox, the cron line's log file).

Nothing that exists is ever overwritten or changed (an operator's file is theirs; running
init twice is safe): each item is reported as created or kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path

from processor.errors import InputError
from processor.resources import shipped

# Folders init makes that the skeleton cannot ship (a wheel holds no empty folders).
STATE_FOLDERS = ("var", "var/log")

# What each top-level item is for, shown as init reports it.
PURPOSE = {
    "config/processor.toml": "every setting, commented out at its default: uncomment a line to change it",
    "hooks": "hook files; the _example_*.py never load: copy one without the _ to use it",
    "templates": "your email templates, used before the built-in ones (empty: the built-in ones)",
    "var": "the SQLite database and the outbox",
    "var/log": "the log file of the line in crontab.example",
}

# Hook files are code: their folder must not be writable by others, or the hook loader
# refuses it. Files and folders init makes are never group- or world-writable, whatever
# the umask.
FOLDER_MODE = 0o755
FILE_MODE = 0o644


@dataclass(frozen=True)
class Item:
    """One file or folder of the app folder, as init left it."""

    path: Path  # where it is
    shown: str  # how init names it: relative to the app root when inside it ("hooks/")
    created: bool  # False: it was there already and was left as it was
    purpose: str = ""


def make_app_folder(root: Path, places: Mapping[str, Path | None]) -> list[Item]:
    """Create what is missing of the app folder at `root`, and report every item.

    `places` says where a top-level folder of the skeleton goes (the settings may put
    hooks/ or templates/ elsewhere); None leaves it out (config/ when the config file was
    found elsewhere). A folder not named goes under `root` by its own name. Raises
    InputError when something in the way is not what it should be (a file where a folder
    belongs) or cannot be created."""
    items = [_folder(root / name, _shown(root, root / name), PURPOSE.get(name, "")) for name in STATE_FOLDERS]
    for top in sorted(shipped("app").iterdir(), key=lambda t: t.name):
        target = places[top.name] if top.name in places else root / top.name
        if target is not None:
            items.extend(_tree(top, target, root, top.name))
    return items


def _tree(source: Traversable, target: Path, root: Path, name: str) -> Iterator[Item]:
    """The folder, then what is in it (sub-folders after it), in name order. `name`: the
    item's path in the skeleton, which says what it is for."""
    yield _folder(target, _shown(root, target), PURPOSE.get(name, ""))
    for child in sorted(source.iterdir(), key=lambda t: t.name):
        if child.name == "__pycache__":
            continue
        if child.is_dir():
            yield from _tree(child, target / child.name, root, f"{name}/{child.name}")
        else:
            where = target / child.name
            yield _file(child, where, _shown(root, where), PURPOSE.get(f"{name}/{child.name}", ""))


def _shown(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _folder(path: Path, shown: str, purpose: str) -> Item:
    shown += "/"
    if path.is_dir():
        return Item(path, shown, created=False, purpose=purpose)
    if path.exists() or path.is_symlink():
        raise InputError(f"{path}: is in the way of the folder {shown} init makes (it is not a folder); "
                         "move it and run init again")
    try:
        path.mkdir(mode=FOLDER_MODE, parents=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot create the folder: {exc.strerror}") from None
    return Item(path, shown, created=True, purpose=purpose)


def _file(source: Traversable, path: Path, shown: str, purpose: str) -> Item:
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise InputError(f"{path}: is in the way of the file {shown} init writes (it is not a file); "
                             "move it and run init again")
        return Item(path, shown, created=False, purpose=purpose)
    data = source.read_bytes()
    try:
        # O_EXCL: a file that appeared since the check above is still never overwritten.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return Item(path, shown, created=False, purpose=purpose)
    except OSError as exc:
        raise InputError(f"{path}: cannot create the file: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return Item(path, shown, created=True, purpose=purpose)
