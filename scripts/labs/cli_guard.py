"""The one top-level guard of every entry point: a sentence for a mistake, a log file for a bug, never a traceback.

| what ends the program                                    | stderr shows                             | exit code |
|----------------------------------------------------------|------------------------------------------|-----------|
| an exception whose class sets ``exit_code`` (a mistake   | ``error: <its one sentence>``            | its code  |
| the user can fix: ``UserError``, mujoco >= 3.12, no EGL) |                                          | (2)       |
| Ctrl-C, or SIGTERM outside a training loop               | one line: what stopped it, what to rerun | 130, 143  |
| any other exception (a bug)                              | one line: where the full traceback went  | 70        |

A training loop installs its own SIGINT/SIGTERM handler (save a checkpoint, then stop); this guard only
covers the moments before and after, where the default action would kill the process without a word.

Use it in an entry script like this (the first call comes before the heavy imports, so a failing import,
the mujoco-version refusal included, is guarded too):

    from cli_guard import guard_entry_point, run_guarded
    guard_entry_point(__name__)
    ...                                   # torch, SB3, the labs
    def main(argv=None) -> int:
        return run_guarded(lambda: _main(argv), log_dir=...)

Standard library only: importing it starts no torch and no MuJoCo, so light scripts (figures, snippets) can
use it too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import TracebackType

USER_ERROR_EXIT = 2
"""Exit code of a mistake the user can fix (bad flag, missing file, full disk); argparse and tyro use it too."""
BUG_EXIT = 70
"""Exit code of an unexpected exception (``EX_SOFTWARE`` in sysexits.h): a bug to report, not the user's input."""
DEFAULT_LOG_DIR = Path(__file__).resolve().parents[2] / "logs"
"""Where crash logs go when the entry point names no artifact root: the repository's logs/."""
BROKEN_PIPE_EXIT = 128 + signal.SIGPIPE
"""Exit code when the program reading our output closed the pipe early, as a shell reports SIGPIPE."""
REPORT_HOW = "please report it with that file attached (README, 'Reporting a problem')"


class TerminationRequest(BaseException):
    """SIGTERM outside a training loop, raised like KeyboardInterrupt so cleanup (``finally``) still runs."""


def expected_exit_code(exc: BaseException) -> int | None:
    """The exit code an exception's class declares (``exit_code``): set on the errors a user can fix."""
    code = getattr(type(exc), "exit_code", None)
    return code if isinstance(code, int) else None


def _on_sigterm(signum: int, frame: object) -> None:
    raise TerminationRequest(signum)


def guard_entry_point(module_name: str) -> None:
    """Guard the program when ``module_name`` is ``"__main__"`` (a library import changes nothing).

    Installs ``sys.excepthook`` for exceptions raised outside ``run_guarded`` (the imports at the top of
    the script) and a SIGTERM handler that unwinds like Ctrl-C instead of killing the process silently.
    """
    if module_name != "__main__":
        return
    sys.excepthook = _excepthook
    signal.signal(signal.SIGTERM, _on_sigterm)


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    code = _report(exc, DEFAULT_LOG_DIR)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the hook cannot choose the exit code otherwise; nothing has started yet at import time


def run_guarded(main: Callable[[], int], log_dir: Path | None = None,
                interrupted: str = "run the same command again") -> int:
    """``main()``'s exit code, or the code of what ended it, with ONE line on stderr instead of a traceback.

    ``log_dir``: where a bug's full traceback is written (``<artifact root>/logs``; the repository's logs/
    by default, the temp folder if that cannot be written). ``interrupted``: what to do after Ctrl-C or
    SIGTERM. ``SystemExit`` (argparse, tyro) passes through unchanged.
    """
    try:
        return main()
    except (KeyboardInterrupt, TerminationRequest) as exc:
        signum = exc.args[0] if isinstance(exc, TerminationRequest) else signal.SIGINT
        print(f"error: stopped by {signal.Signals(signum).name} before it finished; {interrupted}.", file=sys.stderr)
        return 128 + signum
    except Exception as exc:  # noqa: BLE001 -- the point of the guard
        return _report(exc, log_dir or DEFAULT_LOG_DIR)


def _report(exc: BaseException, log_dir: Path) -> int:
    """Print the one line ``exc`` ends in and return the exit code."""
    code = expected_exit_code(exc)
    if code is not None:
        print(f"error: {exc}", file=sys.stderr)
        return code
    if isinstance(exc, BrokenPipeError):  # the reader of our output left (`... --help | head`): not a bug
        _silence_stdout()
        return BROKEN_PIPE_EXIT
    if isinstance(exc, (KeyboardInterrupt, TerminationRequest)):  # during the imports
        signum = signal.SIGTERM if isinstance(exc, TerminationRequest) else signal.SIGINT
        print(f"error: stopped by {signal.Signals(signum).name} before it started; nothing was written, run the "
              "same command again.", file=sys.stderr)
        return 128 + signum
    summary = " ".join(str(exc).split())[:160]
    log = write_crash_log(exc, log_dir)
    where = f"the full traceback is in {log}" if log else "no log file could be written anywhere"
    print(f"error: unexpected {type(exc).__name__}{f' ({summary})' if summary else ''}, a bug rather than "
          f"your input; {where}: {REPORT_HOW}.", file=sys.stderr)
    return BUG_EXIT


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail on the closed pipe again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def write_crash_log(exc: BaseException, log_dir: Path) -> Path | None:
    """Write the command, the interpreter and ``exc``'s full traceback to ``log_dir/crash-<time>-<pid>.log``.

    Falls back to the temp folder when ``log_dir`` cannot be written (a bad --artifact-root, a full disk).
    """
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    text = (f"command: {' '.join(sys.argv)}\ncwd: {os.getcwd()}\npython: {sys.version.split()[0]} "
            f"({sys.executable})\ntime: {datetime.now().isoformat(timespec='seconds')}\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    for folder in (Path(log_dir), Path(tempfile.gettempdir())):
        path = folder / f"crash-{stamp}-{os.getpid()}.log"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return path
        except OSError:
            continue
    return None
