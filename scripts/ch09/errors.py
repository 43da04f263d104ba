"""The one kind of error a user causes and can fix, and the exit code every entry point gives it.

``UserError`` carries ONE sentence that says what to do (a flag to change, a file to pass, memory to free).
The entry scripts catch it in ``main()``, print ``error: <sentence>`` on stderr and exit with
``USER_ERROR_EXIT``, the code argparse and tyro also use for a bad flag. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

USER_ERROR_EXIT = 2
"""Exit code of every mistake a user can fix (bad flag, missing file, too little memory)."""


class UserError(Exception):
    """A mistake the user can fix; ``main()`` prints its one-sentence message and exits with code 2."""
