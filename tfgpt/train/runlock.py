"""One process per run directory.

The lock is an advisory `flock` on `<run>/lock`: the kernel drops it when the
holder exits for any reason (kill -9 included), so it never goes stale. The
file keeps the holder's pid and host for the error message.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path


class RunLocked(RuntimeError):
    pass


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "lock"
        self._file = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise RunLocked(
                f"{self.path.parent} is in use by another training process ({holder}); "
                "wait for it to finish or stop it first"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
