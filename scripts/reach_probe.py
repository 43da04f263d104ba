"""Probe the checkpoints of a FetchReach run: does its critic know the way to the goal, and does its actor take it?

A flat learning curve says that a run fails, not where. On FetchReach the way to the goal is the gripper's own
(from the achieved to the desired goal), so each checkpoint can be asked on one random walk of states: the cosine
of the critic's action gradient dQ/da with that way (``critic -> goal``), the cosine of the actor's deterministic
action with it (``actor -> goal``), and how hard the actor moves (``|action|``). ``ch09/probe.py`` has the
definitions and how to read them. Pixel and ``--full-state`` runs alike; any device.

Run it
------
    python scripts/reach_probe.py runs_root/checkpoints/ch09_manip_noDrQ_criticEnc_FetchReach-v4_seed0_*_steps.zip
    python scripts/reach_probe.py CHECKPOINT... --out results/reach_probe.json --device cuda

It prints one row per checkpoint (sorted by steps) and writes the JSON to ``--out`` when given;
``python scripts/bench_train.py --report FILE`` prints that table again, as it does for every measured JSON.
``scripts/gpu_checks.sh`` probes the snapshots of its learning runs (stage ``probe``).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    from cli_guard import guard_entry_point, parse_with_one_line_errors, run_guarded
except ModuleNotFoundError:  # the project is not installed in this Python: one sentence, not a traceback
    print("error: this project is not installed in this Python; run `pip install -e .` in the repository, or run "
          "the command through `bash docker/dev.sh python ...`.", file=sys.stderr)
    sys.exit(2)  # a mistake the user can fix, as cli_guard would say it (it is what could not be imported)

guard_entry_point(__name__)  # before the heavy imports: a failing import or an early SIGTERM is one line

import tyro  # noqa: E402

from ch09.probe import PROBE_STATES, probe_checkpoints, probe_markdown  # noqa: E402
from ch09.run.artifacts import write_json  # noqa: E402
from ch09.run.validation import check_device  # noqa: E402


@dataclass
class ProbeConfig:
    """Probe the checkpoints of a FetchReach run (see the module docstring for the columns)."""

    checkpoints: tyro.conf.Positional[tuple[Path, ...]] = ()
    """The run's checkpoints (.zip, each with its run's .meta.json beside it), in any order."""
    states: int = PROBE_STATES
    """States of the random walk every checkpoint is asked on."""
    seed: int = 0
    """Seed of the random walk (its resets and actions)."""
    device: str = "cpu"
    """Torch device the checkpoints are loaded on: cpu, cuda, cuda:1."""
    out: Path | None = None
    """Also write the result as JSON here."""


def probe(cfg: ProbeConfig) -> int:
    check_device("device", cfg.device)
    report = probe_checkpoints(cfg.checkpoints, cfg.states, cfg.seed, cfg.device)
    print(probe_markdown(report))
    if cfg.out is not None:
        write_json(cfg.out, report)
        print(f"wrote {cfg.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg = parse_with_one_line_errors(lambda: tyro.cli(ProbeConfig, args=argv, description=__doc__.split("\n")[0]))
    return run_guarded(functools.partial(probe, cfg))


if __name__ == "__main__":
    sys.exit(main())
