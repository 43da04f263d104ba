"""The one kind of error a user causes and can fix, and the exit code every entry point gives it.

``UserError`` carries ONE sentence that says what to do (a flag to change, a file to pass, memory to free,
disk space to make). Its ``exit_code`` is what the entry points' top-level guard (``scripts/labs/cli_guard.py``)
recognises: it prints ``error: <sentence>`` on stderr and exits with ``USER_ERROR_EXIT``, the code argparse
and tyro also use for a bad flag. Any other exception is a bug: the guard writes its traceback to a log file
and prints one line saying where.
"""

from __future__ import annotations

USER_ERROR_EXIT = 2
"""Exit code of every mistake a user can fix (bad flag, missing file, too little memory or disk);
the same value as ``cli_guard.USER_ERROR_EXIT`` (this package must import without ``scripts/labs``)."""


class UserError(Exception):
    """A mistake the user can fix; the guard prints its one-sentence message and exits with code 2."""

    exit_code = USER_ERROR_EXIT


class ArtifactWriteError(UserError):
    """Writing an artifact failed (disk full, read-only, I/O error); the temporary is already removed."""

    def __init__(self, message: str, path: str, reason: str, bytes_needed: int, bytes_free: int | None,
                 fix: str) -> None:
        super().__init__(message)
        self.path, self.reason, self.bytes_needed, self.bytes_free = path, reason, bytes_needed, bytes_free
        self.fix = fix  # what to do about it: 'free space there', 'make the folder writable', ...
