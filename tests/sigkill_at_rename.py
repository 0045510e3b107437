"""`python -m tests.sigkill_at_rename N before|after ARGS...`: runs `cancelproc ARGS` in this
process, which sends itself SIGKILL at the Nth rename of a temp file to its final `.eml`
name in the outbox folder: `before` it (the message is written and synced under its temp
name), or `after` it (the file is in place, its row not yet recorded as sent).

A fault hook for tests/test_crash_delivery.py: a real process, killed by a real signal at
an exact point of folder delivery, not after a delay that must be "long enough".
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def main() -> None:
    nth, when, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    if when not in ("before", "after"):
        raise SystemExit(f"usage: python -m tests.sigkill_at_rename N before|after ARGS... (got {when!r})")
    real_replace = os.replace
    renames = 0

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        nonlocal renames
        if not os.fspath(dst).endswith(".eml"):  # not the outbox's final rename
            real_replace(src, dst, **kwargs)
            return
        renames += 1
        if renames == nth and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst, **kwargs)
        if renames == nth and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
    from processor.cli import main as cancelproc

    sys.argv = ["cancelproc", *args]
    cancelproc()


if __name__ == "__main__":
    main()
