"""The one top-level guard of every entry point: a sentence for a mistake, a log file for a bug, never a traceback.

| what ends the program                                    | stderr shows                             | exit code |
|----------------------------------------------------------|------------------------------------------|-----------|
| an exception whose class sets ``exit_code`` (a mistake   | ``error: <its one sentence>``            | its code  |
| the user can fix: ``UserError``, mujoco >= 3.12, no EGL) |                                          | (2)       |
| Ctrl-C, or SIGTERM outside a training loop               | one line: what stopped it, what to rerun | 130, 143  |
| any other exception (a bug)                              | one line: where the full traceback went  | 70        |

A command line tyro or argparse rejects is such a mistake too: ``parse_with_one_line_errors`` reduces tyro's box
(or argparse's usage) to ``error: <one sentence with the valid choices>`` and exit code 2.

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

# Only what the guard needs to be installed: the script imports this module before anything else, so every
# millisecond here is one in which a signal still kills the process without a word. The failure paths import
# the rest (traceback, tempfile, datetime, re, io) when they run.
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

ParsedT = TypeVar("ParsedT")

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
    the script), a SIGTERM handler that unwinds like Ctrl-C instead of killing the process silently, and
    Python's own Ctrl-C handler even where SIGINT was inherited ignored (a job started with ``&`` from a
    script): the training loop stops on SIGINT too, so the program answers it the same way at any moment.
    """
    if module_name != "__main__":
        return
    sys.excepthook = _excepthook
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)


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
    import tempfile
    import traceback
    from datetime import datetime

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


# ---------------------------------------------------------------------------------------------------------
# The command line: a rejected one is one sentence and exit 2, like every other mistake
# ---------------------------------------------------------------------------------------------------------
def parse_with_one_line_errors(parse: Callable[[], ParsedT], prog: str | None = None) -> ParsedT:
    """``parse()`` (a ``tyro.cli`` or argparse call), with a rejected command line reduced to ONE line.

    tyro draws a multi-line box for a bad command line; this prints ``error: <one sentence>`` with the
    valid choices where there are some (commands, values, close flags) and raises ``SystemExit(2)``, as
    tyro and argparse do. ``--help`` (exit 0) prints the full help unchanged. The sentence is built from
    the event tyro's parse-error hook reports (``tyro._errors``: private, so requirements.txt pins tyro
    exactly); without one (argparse, an event this version does not know) from the text it printed.
    ``prog``: the command whose ``--help`` the sentence points to (default: the one tyro reports, which for a
    subcommand is the script alone, whose ``--help`` lists the commands but not their flags).
    """
    import io

    events: list[Any] = []
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed), _tyro_parse_errors(events.append), _tyro_docstrings_joined():
            parsed = parse()
    except SystemExit as exit_request:
        if exit_request.code in (0, None):  # --help
            sys.stderr.write(printed.getvalue())
            raise
        sentence = _rejection_sentence(events[0] if events else None, printed.getvalue(), prog)
        print(f"error: {sentence}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None
    sys.stderr.write(printed.getvalue())  # a warning tyro printed while parsing
    return parsed


def parse_args_naming_unknown_flags(parser: Any, argv: Any = None) -> Any:
    """``parser.parse_args(argv)`` of an argparse parser, except that a flag it does not know is named even where
    a required flag is missing too: argparse reports the missing one first, so a misspelled required flag
    (``--chekpoint``) was never named. The unknown flag's closest valid one is offered."""
    import argparse
    import difflib

    parsers = [parser]
    for each in parsers:  # the parser and the parsers of its commands
        parsers.extend(command for action in each._actions if isinstance(action, argparse._SubParsersAction)
                       for command in action.choices.values())
    actions = [action for each in parsers for action in each._actions]
    required = [action.required for action in actions]
    for action in actions:
        action.required = False
    try:
        _, unknown = parser.parse_known_args(argv)
    finally:
        for action, was_required in zip(actions, required):
            action.required = was_required
    flags = [token for token in unknown if token.startswith("-")]
    if flags:
        options = [option for action in actions for option in action.option_strings]
        close = difflib.get_close_matches(flags[0].partition("=")[0], options, n=1)
        parser.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {close[0]}?)" if close else ""))
    return parser.parse_args(argv)


@contextlib.contextmanager
def _tyro_parse_errors(record: Callable[[Any], None]) -> Iterator[None]:
    """Record tyro's parse-error events (tyro then prints its box and exits 2, which is captured)."""
    hook = None
    if "tyro" in sys.modules:  # argparse's command lines have nothing to hook, and no reason to load tyro
        with contextlib.suppress(ImportError):  # a tyro without the hook: the sentence comes from its text
            from tyro._errors import on_parse_error as hook
    if hook is None:
        yield
        return
    with hook(record):
        yield


@contextlib.contextmanager
def _tyro_docstrings_joined() -> Iterator[None]:
    """Field docstrings as ``--help`` paragraphs, not cut where a source line ends.

    tyro joins a docstring's lines (``tyro._strings.remove_single_line_breaks``) before it removes their
    indentation, and keeps a break before any line that starts with something other than a letter: an indented
    second line, or one that starts with ``(`` or a backquote, began a new line of help mid-sentence. Here the
    lines are joined first, for the parse only (tyro is pinned in requirements.txt for this private name).
    """
    strings = sys.modules.get("tyro._strings")
    join = getattr(strings, "remove_single_line_breaks", None)
    if join is None:
        yield
        return
    strings.remove_single_line_breaks = lambda text: join(_joined_lines(text))  # type: ignore[union-attr]
    try:
        yield
    finally:
        strings.remove_single_line_breaks = join  # type: ignore[union-attr]


def _joined_lines(text: str) -> str:
    """The docstring's lines, dedented, each joined to the one before unless it is blank, indented or a list item."""
    import inspect
    import re

    lines: list[str] = []
    for line in inspect.cleandoc(text).split("\n"):
        if lines and lines[-1].strip() and line.strip() and not re.match(r"\s|[-*|] |\d+\. ", line):
            lines[-1] += " " + line
        else:
            lines.append(line)
    return "\n".join(lines)


def _rejection_sentence(event: Any, printed: str, prog: str | None = None) -> str:
    """One sentence for a rejected command line: from tyro's event, else from the text that was printed."""
    import re

    text = _unboxed(printed)
    try:
        sentence = _sentence_of_event(event, text, prog or event.prog) if event is not None else None
    except AttributeError:  # an event whose fields this tyro version names otherwise
        sentence = None
    if sentence:
        return sentence
    argparse_error = re.search(r": error: (.+)$", text, re.MULTILINE)
    if argparse_error:
        return f"{argparse_error[1].rstrip('.')}; add --help for the full usage."
    first = next((line.strip() for line in text.splitlines() if line.strip()), "the command line was refused")
    return f"{first.rstrip('.')}; add --help for the full usage."


def _unboxed(printed: str) -> str:
    """tyro's box without its frame: the text lines only."""
    lines = [line.strip().strip("│╭╰╮╯─").strip() for line in printed.splitlines()]
    return "\n".join(line for line in lines if line.strip("-─"))  # rules too


def _sentence_of_event(event: Any, text: str, prog: str) -> str | None:
    """The sentence for each kind of tyro parse-error event (None: an event this function does not know)."""
    import re

    kind = type(event).__name__
    see = f"see `{prog} --help`"
    if kind == "UnrecognizedArgs":  # the event holds only the tokens: the choices come from tyro's printed text
        commands = re.search(r"^Available subcommands: (.+)$", text, re.MULTILINE)
        if commands and not event.tokens[0].startswith("-"):
            return f"unknown command {event.tokens[0]!r}; use one of: {commands[1]}."
        close = re.findall(r"^(--[a-zA-Z][\w.-]*)", text.partition("Perhaps you meant:")[2], re.MULTILINE)
        guess = f"did you mean {' or '.join(dict.fromkeys(close))}? " if close else ""
        return f"unrecognized {' '.join(event.tokens)!r} for {prog}; {guess}`{prog} --help` lists the valid ones."
    if kind == "MissingSubcommand":
        choices = ", ".join(event.subcommand_spec.parser_from_name)
        found = f"unknown command {event.found_token!r}" if event.found_token else f"{prog} needs a command"
        return f"{found}; use one of: {choices}."
    if kind == "InvalidChoice":
        return (f"{event.value!r} is not a valid {event.argument.display_name()}; use one of: "
                f"{', '.join(event.choices)}.")
    if kind == "BadValue":
        flag = event.argument.display_name()
        if event.reason == "fixed":
            return f"{flag} takes no value here (got {event.offending_value!r}); {see}."
        return f"{flag} needs a value ({event.argument.lowered.metavar}); {see}."
    if kind == "MissingArgs":
        missing = ", ".join(ctx.arg.display_name() for ctx in event.missing_arguments)
        command = " ".join(filter(None, (event.prog, event.missing_arguments[0].source_parser.prog_suffix)))
        return f"{command} needs {missing}; see `{command} --help`."
    if kind == "MissingMutexGroup":
        groups = "; ".join(" or ".join(ctx.arg.display_name() for ctx in group) for group in event.groups)
        return f"{prog} needs one of {groups}; {see}."
    if kind == "MutexConflict":
        return f"{event.first_token} and {event.second_token} cannot be given together; give one of them."
    if kind == "SubcommandConflict":
        return (f"{event.attempted!r} cannot come after {event.trigger_flag} (a flag of {event.already_selected!r}); "
                f"put {event.attempted!r} first.")
    if kind == "InstantiationFailure":
        argument = event.argument
        flag = f"{argument.display_name()} {argument.lowered.metavar or ''}".strip() if argument else prog
        return f"bad value for {flag}: {event.message.rstrip('.')}; {see}."
    return None
