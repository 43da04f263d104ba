"""Chapter 9 sweeps: the Reproduce It runs and the investigation as one command, on one machine or a Ray cluster.

The chapter's results are many runs, not one: Reproduce It is 3 seeds of the Experiment Card, the
investigation is Steps 0, 1, 2, 4 and the full-state control. This script runs them on Ray (the engine RL
users already run; its conventions are Ray Tune's), and every run is exactly the
``python scripts/ch09_pixel_push.py train ...`` command a reader could type, followed by its ``eval``, so a
sweep and a hand-made run are interchangeable: same command lines, same artifact names, same files.

The sweeps (each run followed by ``eval`` of its final checkpoint)
| sweep             | runs                                                        | then                          |
|-------------------|-------------------------------------------------------------|-------------------------------|
| ``reproduce``     | the Experiment Card (Step 3), ``--seeds 0 1 2``             | aggregate, the figure         |
| ``investigation`` | Steps 0, 1, 2, 4 and the full-state control at 2M steps     | the figure, CIs over seeds    |
|                   | (``--steps 0 2 4``, ``--seeds 0 1 2`` to choose)            |                               |
| ``--runs FILE``   | one train argument line per line (Exercises 2-4:            | aggregate per configuration   |
|                   | ``--her-n-sampled-goal 4``, ``--no-spatial-softmax``, ...)  |                               |

    python scripts/ch09_sweep.py reproduce --dry-run             # print the commands it would run
    python scripts/ch09_sweep.py reproduce --gpus-per-run 0.33   # three seeds sharing one GPU
    python scripts/ch09_sweep.py investigation --steps 0 2 4 --seeds 0 1 2
    python scripts/ch09_sweep.py --runs exercises.txt --artifact-root /shared/ch09
    python scripts/ch09_sweep.py reproduce --address auto --artifact-root /shared/ch09   # on a cluster

Nothing lost, nothing repeated: a run whose process dies (SIGKILL, the OOM killer, a lost node) is retried
up to ``--max-retries`` times, and a retry continues from the run's latest checkpoint with ``--resume``.
Running the same sweep again skips finished runs (final checkpoint and eval present) and resumes the
others. Ctrl-C stops the sweep; each run saves its checkpoint first.

Progress: a table in the terminal (run, steps, steps/s, ETA, last success rate, state, retries), the same
in ``results/<sweep>_status.json``, each run's output in ``results/<sweep>_logs/<run>.log``.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

try:
    from cli_guard import guard_entry_point, parse_with_one_line_errors, run_guarded
except ModuleNotFoundError:  # the project is not installed in this Python: one sentence, not a traceback
    print("error: this project is not installed in this Python; run `pip install -e .` in the repository, or run "
          "the command through `bash docker/dev.sh python ...`.", file=sys.stderr)
    sys.exit(2)  # a mistake the user can fix, as cli_guard would say it (it is what could not be imported)

guard_entry_point(__name__)  # before the heavy imports: a failing import or an early SIGTERM is one line

import tyro

from ch09.errors import UserError
from ch09.run.artifacts import REPO_ROOT, RunPaths
from ch09.sweep.plan import (
    FIGURE_SCRIPT,
    TRAIN_SCRIPT,
    Run,
    aggregate_args,
    check_address_form,
    disk_state,
    display,
    eval_args,
    figure_args,
    plan_run,
    read_runs_file,
    refuse_checkpoints_of_other_flags,
    refuse_duplicates,
    refuse_mixed_settings,
    train_args,
)

# ======================================================================================================
# The sweeps: the README's commands, as train flags
# ======================================================================================================
EXPERIMENT_CARD = ["--critic-encoder", "--no-drq", "--buffer-size", "500000", "--her-n-sampled-goal", "8",
                   "--total-steps", "5000000", "--checkpoint-freq", "500000"]
"""Step 3, the chapter's winning configuration: the train flags of the README's Reproduce It block."""
INVESTIGATION_STEPS = {
    "0": ["--total-steps", "2000000"],
    "1": ["--encoder", "manip", "--no-drq", "--total-steps", "2000000"],
    "2": ["--critic-encoder", "--no-drq", "--total-steps", "2000000"],
    "4": ["--critic-encoder", "--buffer-size", "500000", "--her-n-sampled-goal", "8", "--total-steps", "2000000"],
    "control": ["--full-state", "--total-steps", "2000000"],
}
"""The investigation's train flags per step (the README's Training table). Step 3 is ``reproduce``: it is
Step 2's configuration trained to 5M steps, and continues Step 2's checkpoints when they exist."""
SWEEPS = ("reproduce", "investigation")
RAY_CLIENT_TIMEOUTS = {"RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S": "3", "RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S": "5"}
"""Ray Client's connection attempts (3 tries, backing off from 3 s to 5 s) instead of its default 5 s to 30 s."""
EVAL_EPISODES = 100
"""Deterministic episodes of the final evaluation of each run (the Reproduce It block's --n-episodes)."""


@dataclass
class SweepConfig:
    """Run the chapter's sweeps (or your own train runs) on Ray: each run is a train command, then its eval."""

    sweep: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="SWEEP", help_behavior_hint="")] = ""
    """reproduce (the Experiment Card, 3 seeds) or investigation (Steps 0, 1, 2, 4, control); or use --runs."""
    runs: Path | None = None
    """A file of train argument lines, one run per line ('#' comments), instead of a named sweep."""
    name: str | None = None
    """Name in results/<name>_status.json and results/<name>_logs/; None: the sweep's, or the --runs file's."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds of reproduce and investigation."""
    steps: list[str] = field(default_factory=lambda: list(INVESTIGATION_STEPS))
    """Investigation steps to run: 0, 1, 2, 4, control."""
    n_episodes: int = EVAL_EPISODES
    """Deterministic episodes of each run's final eval."""
    address: str = "local"
    """local (a new Ray instance here, loopback only), auto (this node's cluster), host:6379, ray://host:10001."""
    num_cpus: int | None = None
    """CPUs of a local Ray instance; None: all of this machine's."""
    cpus_per_run: float = 1.0
    """CPUs each run reserves (Ray num_cpus): 1, or --n-envs + 1 for runs with render workers."""
    gpus_per_run: float | None = None
    """GPUs each run reserves (Ray num_gpus; 0.33: three runs share a card); None: 1 if there is a GPU, else 0."""
    max_retries: int = 3
    """Retries of a run whose process dies; each retry resumes from the run's latest checkpoint."""
    artifact_root: Path = REPO_ROOT
    """Folder for checkpoints/, results/, runs/; on a cluster an absolute path every node mounts (checked per node)."""
    dry_run: bool = False
    """Print the commands the sweep would run (finished ones as '# done:' comments) and exit."""


# ======================================================================================================
# From the config to the list of runs
# ======================================================================================================
def check_inputs(cfg: SweepConfig) -> None:
    """Refuse what can be refused before anything is imported or started, each in one sentence."""
    if cfg.sweep and cfg.runs is not None:
        raise UserError(f"Give either a sweep name ({cfg.sweep!r}) or --runs FILE, not both.")
    if not cfg.sweep and cfg.runs is None:
        raise UserError("Name a sweep (reproduce or investigation) or pass --runs FILE with your own train lines.")
    if cfg.sweep and cfg.sweep not in SWEEPS:
        raise UserError(f"Unknown sweep {cfg.sweep!r}; use reproduce, investigation, or --runs FILE.")
    for step in cfg.steps:
        if step == "3":
            raise UserError("Step 3 is the Experiment Card's 5M-step run of Step 2's configuration: run "
                            "`ch09_sweep.py reproduce` for it (it continues Step 2's checkpoints).")
        if step not in INVESTIGATION_STEPS:
            raise UserError(f"Unknown investigation step {step!r}; choose from {', '.join(INVESTIGATION_STEPS)}.")
    for values, flag in ((cfg.seeds, "--seeds"), (cfg.steps, "--steps")):
        if not values:
            raise UserError(f"{flag} needs at least one value.")
        if len(set(values)) < len(values):
            raise UserError(f"{flag} lists a value twice ({' '.join(map(str, values))}); give each once.")
    if any(seed < 0 for seed in cfg.seeds):
        raise UserError(f"--seeds must be 0 or more, got {' '.join(map(str, cfg.seeds))}.")
    if cfg.n_episodes < 1:
        raise UserError(f"--n-episodes must be at least 1, got {cfg.n_episodes}.")
    if cfg.max_retries < 0:
        raise UserError(f"--max-retries must be 0 or more, got {cfg.max_retries}.")
    if cfg.cpus_per_run <= 0:
        raise UserError(f"--cpus-per-run must be positive, got {cfg.cpus_per_run:g}.")
    gpus = cfg.gpus_per_run
    if gpus is not None and (gpus < 0 or (gpus > 1 and gpus != int(gpus))):
        raise UserError(f"--gpus-per-run must be a fraction in [0, 1] or a whole number of GPUs, got {gpus:g}.")
    if cfg.num_cpus is not None and (cfg.num_cpus < 1 or cfg.address != "local"):
        raise UserError("--num-cpus sizes a local Ray instance: give it at least 1, and only with --address local.")
    if cfg.address != "local" and not cfg.artifact_root.is_absolute():
        raise UserError(f"--artifact-root {cfg.artifact_root} is relative, but on a cluster each node resolves it "
                        "in its own folder; pass an absolute path on a filesystem every node mounts.")
    check_address_form(cfg.address)


def sweep_runs(cfg: SweepConfig, root: Path) -> list[Run]:
    """The runs of the named sweep, or of the --runs file, each named by the production script."""
    if cfg.runs is not None:
        lines = read_runs_file(cfg.runs)
    elif cfg.sweep == "reproduce":
        lines = [(["--seed", str(seed), *EXPERIMENT_CARD], f"reproduce seed {seed}") for seed in cfg.seeds]
    else:
        lines = [(["--seed", str(seed), *INVESTIGATION_STEPS[step]], f"investigation step {step} seed {seed}")
                 for step in cfg.steps for seed in cfg.seeds]
    runs = [plan_run(args, root, source) for args, source in lines]
    refuse_duplicates(runs)
    refuse_mixed_settings(runs)
    refuse_checkpoints_of_other_flags(runs)
    return runs


def dry_run_lines(runs: Sequence[Run], root: Path, n_episodes: int, aggregate: bool, figure: bool) -> list[str]:
    """The commands the sweep would run now, in the order one machine would run them; finished ones commented."""
    lines: list[str] = []
    groups: dict[tuple[str, str], list[Path]] = {}
    for run in runs:
        state = disk_state(run, n_episodes)
        if state.trained:
            lines.append(f"# done: {display(TRAIN_SCRIPT, train_args(run, None))}")
        else:
            lines.append(display(TRAIN_SCRIPT, train_args(run, state)))
        evaluate = display(TRAIN_SCRIPT, eval_args(run, state.eval_checkpoint, n_episodes))
        lines.append(f"# done: {evaluate}" if state.done else evaluate)
        groups.setdefault((run.tag, run.env_id), []).append(RunPaths.eval_result_of(root, state.eval_checkpoint))
    if aggregate:
        lines += [display(TRAIN_SCRIPT, aggregate_args(files, root)) for files in groups.values()]
    if figure:
        lines.append(display(FIGURE_SCRIPT, figure_args(root)))
    return lines


# ======================================================================================================
# Command line
# ======================================================================================================
def run(cfg: SweepConfig) -> int:
    check_inputs(cfg)
    root = cfg.artifact_root.expanduser().resolve()
    name = cfg.name or (cfg.runs.stem if cfg.runs is not None else cfg.sweep)
    runs = sweep_runs(cfg, root)
    aggregate, figure = cfg.sweep != "investigation", cfg.sweep in SWEEPS
    if cfg.dry_run:
        print("\n".join(dry_run_lines(runs, root, cfg.n_episodes, aggregate, figure)))
        return 0
    for variable, seconds in RAY_CLIENT_TIMEOUTS.items():
        os.environ.setdefault(variable, seconds)  # read when ray is imported
    try:
        from ch09.sweep import launch
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "ray":
            raise
        raise UserError("Ray is not installed in this environment; install the pinned version with `pip install "
                        "-r requirements.txt` (ray==2.60.0), or print the commands with --dry-run.") from None
    cluster = launch.connect(cfg.address, cfg.num_cpus)
    try:
        gpus = cfg.gpus_per_run if cfg.gpus_per_run is not None else (1.0 if cluster.gpus > 0 else 0.0)
        launch.check_placement(cfg.cpus_per_run, gpus, root, remote=cfg.address != "local")
        print(f"[sweep] {name}: {len(runs)} run(s) on Ray at {cfg.address} ({cluster.nodes} node(s), "
              f"{cluster.cpus:g} CPUs, {cluster.gpus:g} GPUs); each run reserves {cfg.cpus_per_run:g} CPU(s) and "
              f"{gpus:g} GPU(s), up to {cfg.max_retries} retries; artifacts under {root}", flush=True)
        print(launch.dashboard_line(cluster), flush=True)
        plan = launch.SweepPlan(name, runs, root, cfg.n_episodes, aggregate, figure, cfg.cpus_per_run, gpus,
                                   cfg.max_retries)
        return launch.run_sweep(plan, cluster)
    finally:
        launch.ray.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_with_one_line_errors(lambda: tyro.cli(SweepConfig, args=argv, prog="ch09_sweep.py",
                                              description=__doc__.split("\n")[0]))
    # Ctrl-C during the sweep is run_sweep's (each run saves); one reaching the guard came before any run.
    return run_guarded(functools.partial(run, cfg),
                       interrupted="the sweep had not started its runs, so nothing was run; run the same command again")


if __name__ == "__main__":
    sys.exit(main())
