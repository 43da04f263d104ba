"""What a sweep runs: each run is the ``train`` command a reader could type, then ``eval`` of its checkpoint.

| piece                    | what it does                                                                   |
|--------------------------|--------------------------------------------------------------------------------|
| ``plan_run``             | a ``train`` argument line -> a ``Run``: names and paths from the production     |
|                          | script's own ``config_tag`` / ``run_paths``, never re-derived here              |
| ``read_runs_file``       | ``--runs FILE``: one ``train`` argument line per line                          |
| ``refuse_duplicates`` .. | runs that would write one another's files, or pool other settings in one mean   |
| ``disk_state``           | what is on disk for a run: steps done, finished, evaluated, what to resume      |
| ``train_args`` ...       | the argument lists of train, eval, aggregate and the investigation figure      |
| ``display``              | a command as the README prints it: ``python scripts/ch09_pixel_push.py train ...`` |

A sweep and a hand-made run are interchangeable because both are the same command line: a sweep adds only
``--artifact-root`` (when one is given) and, for a run found half-done on disk, ``--resume`` (or
``--move-old-run`` when an interrupted run left logs but no checkpoint to resume from).
Standard library only at import time; ``plan_run`` imports the production script (torch, SB3) when called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ch09.errors import UserError
from ch09.run.artifacts import CHECKPOINT_FORMAT, EVAL_FORMAT, REPO_ROOT, RunPaths

TRAIN_SCRIPT = REPO_ROOT / "scripts" / "ch09_pixel_push.py"
FIGURE_SCRIPT = REPO_ROOT / "scripts" / "ch09_figures.py"
SWEEP_OWNED_FLAGS = {
    "--resume": "the sweep resumes an unfinished run by itself",
    "--move-old-run": "the sweep moves an interrupted run's logs aside by itself when there is nothing to resume",
    "--artifact-root": "give the sweep's --artifact-root once instead",
}
"""train flags a sweep decides itself, refused in a run's argument line (with the reason)."""
COMMAND_PREFIX = re.compile(r"^(?:bash docker/dev\.sh\s+)?(?:python3?\s+)?(?:\S*ch09_pixel_push\.py\s+)?(?:train\s+)?")
"""What a pasted README command may start with before its train flags."""


@dataclass(frozen=True)
class Run:
    """One run of a sweep: its ``train`` flags and the names the production script gives its artifacts."""

    args: tuple[str, ...]
    """The train flags as a reader types them (without --artifact-root, --resume)."""
    paths: RunPaths
    """checkpoints/, runs/ of this run (from the production script's ``run_paths``)."""
    tag: str
    env_id: str
    seed: int
    total_steps: int
    source: str
    """Where the run was defined: 'reproduce seed 1', 'investigation step 2 seed 0', 'runs.txt line 3'."""
    config: dict[str, Any] = field(default_factory=dict, compare=False)
    """The resolved ``TrainConfig`` as a dict: the runs one aggregate pools must agree on its setting."""

    @property
    def name(self) -> str:
        return self.paths.stem


# ---------------------------------------------------------------------------------------------------------
# From a train argument line to a Run (the production script's own parser, resolver and tag)
# ---------------------------------------------------------------------------------------------------------
def _parse_error(text: str) -> str:
    """The one sentence the production script's parser printed (``error: ...``), without its prefix and its
    pointer to ``--help`` (the sweep's sentence gives that)."""
    for line in text.splitlines():
        if line.startswith("error: "):
            return line.removeprefix("error: ").split("; see ")[0].rstrip(".")
    return "it could not be parsed"


def plan_run(args: Sequence[str], root: Path, source: str) -> Run:
    """Parse ``args`` exactly as ``ch09_pixel_push.py train`` does, and name the run as train will."""
    for flag, reason in SWEEP_OWNED_FLAGS.items():
        if any(arg == flag or arg.startswith(flag + "=") for arg in args):
            raise UserError(f"{source}: drop {flag} from the train flags ({reason}).")
    from ch09 import experiment  # torch and SB3 load only when a sweep is planned

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            cfg = experiment.parse_train_args(args)
    except SystemExit:
        raise UserError(f"{source}: `train {shlex.join(args)}` is not a valid train command "
                        f"({_parse_error(captured.getvalue())}); see `python scripts/ch09_pixel_push.py train "
                        "--help`.") from None
    try:
        cfg = experiment.resolve_config(dataclasses.replace(cfg, artifact_root=root))
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    paths = experiment.run_paths(cfg)
    return Run(tuple(args), paths, experiment.config_tag(cfg), cfg.env, cfg.seed, cfg.total_steps, source,
               dataclasses.asdict(cfg))


def read_runs_file(path: Path) -> list[tuple[list[str], str]]:
    """The train argument lines of a ``--runs`` file, each with where it came from ('FILE line N').

    One run per line; ``#`` starts a comment; a line ending in ``\\`` continues on the next; a pasted
    README command (``bash docker/dev.sh python scripts/ch09_pixel_push.py train ...``) is accepted too.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"--runs {path} cannot be read ({exc.strerror or exc}); pass a text file with one "
                        "train argument line per line.") from None
    lines: list[tuple[list[str], str]] = []
    pending, first_line = "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not pending:
            first_line = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical = COMMAND_PREFIX.sub("", (pending + line).strip())
        pending = ""
        try:
            args = shlex.split(logical, comments=True)
        except ValueError as exc:
            raise UserError(f"{path} line {first_line}: {exc}; fix the quoting.") from None
        if args:
            lines.append((args, f"{path.name} line {first_line}"))
    if not lines:
        raise UserError(f"--runs {path} holds no train argument lines; write one per line, e.g. "
                        "`--seed 0 --critic-encoder --no-drq --her-n-sampled-goal 4`.")
    return lines


def refuse_duplicates(runs: Sequence[Run]) -> None:
    """Two runs with the same artifact names would write into each other's checkpoints."""
    seen: dict[str, Run] = {}
    for run in runs:
        if run.name in seen:
            raise UserError(f"{seen[run.name].source} and {run.source} both train {run.name} (flags that are not "
                            "part of the artifact name do not tell runs apart); change the seed, or run one of them "
                            "in another sweep with its own --artifact-root.")
        seen[run.name] = run


def refuse_mixed_settings(runs: Sequence[Run]) -> None:
    """The runs of one tag and env are one configuration to aggregate over seeds (one aggregate file): they must
    be one setting trained as long, or the mean over seeds would pool other experiments without a word."""
    from ch09 import experiment

    first: dict[tuple[str, str], Run] = {}
    for run in runs:
        other = first.setdefault((run.tag, run.env_id), run)
        differing = experiment.differing_flags([other.config, run.config],
                                               (*experiment.SETTING_FIELDS, "total_steps"))
        if differing:
            raise UserError(f"{other.source} and {run.source} both train {run.tag} on {run.env_id}, with different "
                            f"{', '.join(differing)}, and the sweep would aggregate them as one configuration; give "
                            "each setting a sweep of its own, with its own --artifact-root.")


def refuse_checkpoints_of_other_flags(runs: Sequence[Run]) -> None:
    """A run whose checkpoint on disk was trained with other flags (the same tag and seed, another --buffer-size,
    say): the sweep would resume it, which train refuses, or evaluate it as this sweep's run."""
    from ch09 import experiment

    for run in runs:
        meta = read_json(run.paths.meta)
        if meta is None or meta.get("format") != CHECKPOINT_FORMAT or not run.paths.checkpoint.is_file():
            continue
        differing = experiment.changed_experiment_flags(run.config, meta.get("config") or {})
        if differing:
            raise UserError(f"{run.source}: {shown_path(run.paths.checkpoint)} was trained with other flags "
                            f"({'; '.join(differing)}), and the sweep would resume it; move that run aside (its "
                            "train command plus --move-old-run) or give the sweep another --artifact-root.")


def host_port(address: str) -> tuple[str | None, int | None]:
    """'host:6379' or 'ray://host:10001' -> (host, port); (None, None) for anything else."""
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    try:
        return parsed.hostname, parsed.port
    except ValueError:  # a port that is not a number
        return None, None


def check_address_form(address: str) -> None:
    """--address is local, auto, host:port or ray://host:port (checked before Ray is imported)."""
    if address in ("local", "auto"):
        return
    host, port = host_port(address)
    if not host or port is None:
        raise UserError(f"--address {address!r} is not a Ray address; use local (a Ray instance on this machine), "
                        "auto (the cluster this node belongs to), host:port or ray://host:port.")


# ---------------------------------------------------------------------------------------------------------
# What is on disk
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiskState:
    """A run's artifacts as they are now."""

    steps_done: int
    """steps_done of the run's .meta.json (0 when there is none)."""
    sessions: int
    """Training sessions recorded in the .meta.json."""
    resumable: bool
    """A latest checkpoint and its .meta.json exist: train --resume continues from it."""
    leftovers: bool
    """No resumable checkpoint, but TensorBoard events or checkpoint files of an interrupted start."""
    trained: bool
    """Resumable and steps_done >= the run's --total-steps: nothing to train."""
    eval_checkpoint: Path
    """The checkpoint at the run's budget: the latest one, or (for a run extended past this budget since,
    like Step 2 continued into the Experiment Card's run) the periodic one written at the budget."""
    evaluated: bool
    """An eval JSON of eval_checkpoint with the asked episode count, newer than the checkpoint."""

    @property
    def done(self) -> bool:
        return self.trained and self.evaluated


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def disk_state(run: Run, n_episodes: int) -> DiskState:
    paths = run.paths
    meta = read_json(paths.meta)
    if meta is None or meta.get("format") != CHECKPOINT_FORMAT:
        meta = {}
    steps_done = int(meta.get("steps_done", 0))
    sessions = len(meta.get("sessions", []))
    resumable = paths.checkpoint.is_file() and paths.meta.is_file()
    leftovers = not resumable and (paths.has_tensorboard_events() or bool(paths.own_checkpoint_files()))
    trained = resumable and bool(meta) and steps_done >= run.total_steps

    eval_checkpoint = paths.checkpoint
    at_budget = paths.periodic(run.total_steps)
    if trained and steps_done > run.total_steps and at_budget.is_file():
        eval_checkpoint = at_budget
    evaluated = False
    eval_file = RunPaths.eval_result_of(paths.root, eval_checkpoint)
    result = read_json(eval_file)
    if trained and result is not None and result.get("format") == EVAL_FORMAT:
        try:
            newer = eval_file.stat().st_mtime >= eval_checkpoint.stat().st_mtime
        except OSError:
            newer = False
        evaluated = newer and result.get("n_episodes") == n_episodes
    return DiskState(steps_done, sessions, resumable, leftovers, trained, eval_checkpoint, evaluated)


# ---------------------------------------------------------------------------------------------------------
# The command lines
# ---------------------------------------------------------------------------------------------------------
def shown_path(path: Path) -> str:
    """A path as the commands print it: relative to the repository root (where every command runs) if inside."""
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def root_flag(root: Path) -> list[str]:
    return [] if root == REPO_ROOT else ["--artifact-root", str(root)]


def train_args(run: Run, state: DiskState | None) -> list[str]:
    """``train <flags>`` plus --resume for a run that has a checkpoint, --move-old-run for leftovers."""
    extra = []
    if state is not None and state.resumable:
        extra = ["--resume"]
    elif state is not None and state.leftovers:
        extra = ["--move-old-run"]
    return ["train", *run.args, *root_flag(run.paths.root), *extra]


def eval_args(run: Run, checkpoint: Path, n_episodes: int) -> list[str]:
    return ["eval", "--checkpoint", shown_path(checkpoint), "--n-episodes", str(n_episodes),
            *root_flag(run.paths.root)]


def aggregate_args(eval_files: Sequence[Path], root: Path) -> list[str]:
    return ["aggregate", *(shown_path(path) for path in eval_files), *root_flag(root)]


def figure_args(root: Path) -> list[str]:
    """The investigation figure of everything evaluated under the artifact root."""
    if root == REPO_ROOT:
        return ["investigation", "--results", "results/"]
    return ["investigation", "--results", str(root / "results"), "--out-dir", str(root / "figures")]


def display(script: Path, args: Sequence[str]) -> str:
    """``python scripts/ch09_pixel_push.py train --seed 0 ...``: the line a reader types from the repository root."""
    return shlex.join(["python", shown_path(script), *args])
