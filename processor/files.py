"""Files written whole: a reader (a mail client picking up the outbox folder, `status`
reading the failure record) sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, data: bytes, *, temp_prefix: str) -> None:
    """Write `data` under a temporary name in the same folder (`temp_prefix...tmp`), sync
    it, then rename it to `path`. The temp file is removed when anything fails. The
    folder must exist; syncing the folder's entry (the rename) is the caller's choice."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
