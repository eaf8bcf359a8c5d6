"""The one error a user can fix, and the `main` wrapper every command shares.

A `UserError` is a problem with what the user gave (a flag, the data, the
machine, a run directory): the command prints `prog: error: MESSAGE` on one
line, with no traceback, and exits with the error's `code` (2, as argparse
does for a bad flag, unless the error says otherwise).
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(ValueError):
    """A problem the user can fix, reported as one line."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def run_main(prog: str, main: Callable[[], int | None]) -> int:
    """Runs a command's body; a UserError becomes `prog: error: ...` on stderr
    and its exit code. Returns the body's exit status (0 for None)."""
    try:
        return main() or 0
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.code
