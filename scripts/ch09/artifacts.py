"""Where a run's files go, how they are named, and how they are written so a crash never corrupts one.

| piece                                   | what it does                                                     |
|-----------------------------------------|------------------------------------------------------------------|
| ``RunPaths``                            | checkpoints/, runs/ and the replay-buffer path of one run         |
| ``format_steps`` / ``parse_steps``      | 500000 <-> '500K': the step labels of periodic checkpoints        |
| ``atomic_replace``                      | THE atomic write: JSON, model zips, copies and buffer folders     |
| ``write_json``                          | a JSON artifact through ``atomic_replace``                        |
| ``package_versions``, ``git_commit``    | what a result was made with, stored next to it                    |

Only the standard library at import time: the figure script uses the step labels and formats without
loading torch, SB3 or MuJoCo.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The repository root: the default --artifact-root."""

CHECKPOINT_FORMAT = "ch09-checkpoint-v1"
"""The ``format`` field of checkpoints/*.meta.json."""
EVAL_FORMAT = "ch09-eval-v1"
"""The ``format`` field of results/*_eval.json."""
AGGREGATE_FORMAT = "ch09-aggregate-v1"
"""The ``format`` field of results/*_aggregate.json."""
SUCCESS_VS_STEPS_FORMAT = "ch09-success-vs-steps-v1"
"""The ``format`` field of results/*_success_vs_steps.json (``aggregate`` over a run's snapshots)."""

VERSIONED_PACKAGES = ("torch", "stable-baselines3", "gymnasium", "gymnasium-robotics", "mujoco", "numpy",
                      "tensorboard")
"""Packages whose versions every checkpoint and result records."""

PERIODIC_RE = re.compile(r"^(?P<stem>.+)_(?P<steps>\d+(?:\.\d+)?[KM]?)_steps$")
"""A periodic checkpoint's name without .zip: ``<stem>_<500K>_steps``."""


# ---------------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------------
def format_steps(steps: int) -> str:
    """500000 -> '500K', 1000000 -> '1M', 1500000 -> '1.5M', 250 -> '250' (periodic checkpoint names)."""
    if steps >= 1_000_000:
        return f"{steps / 1_000_000:g}M"
    if steps >= 1_000:
        return f"{steps / 1_000:g}K"
    return str(steps)


def parse_steps(label: str) -> int:
    """Inverse of ``format_steps``: '1.5M' -> 1500000; raises ValueError for anything else."""
    scale = {"K": 1_000, "M": 1_000_000}.get(label[-1:], 1)
    return int(round(float(label.rstrip("KM")) * scale))


def artifact_root(value: str) -> Path:
    """The folder that holds checkpoints/, results/ and runs/ ('' means the repository root)."""
    return Path(value).expanduser().resolve() if value else REPO_ROOT


@dataclass(frozen=True)
class RunPaths:
    """Where one (tag, env, seed) run keeps its artifacts."""

    root: Path
    """The artifact root."""
    stem: str
    """``ch09_<tag>_<env>_seed<N>``: the name of every file of this run."""
    run_dir: Path
    """``runs/ch09_<tag>/<env>/seed<N>``: the run's TensorBoard folder, continued on resume."""

    @classmethod
    def for_run(cls, root: Path, tag: str, env_id: str, seed: int) -> RunPaths:
        return cls(root, f"ch09_{tag}_{env_id}_seed{seed}", root / "runs" / f"ch09_{tag}" / env_id / f"seed{seed}")

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def checkpoint(self) -> Path:
        """The latest model, rewritten at every checkpoint."""
        return self.checkpoint_dir / f"{self.stem}.zip"

    @property
    def meta(self) -> Path:
        return self.checkpoint_dir / f"{self.stem}.meta.json"

    def periodic(self, steps: int) -> Path:
        return self.checkpoint_dir / f"{self.stem}_{format_steps(steps)}_steps.zip"

    def replay_buffer(self, replay: str) -> Path:
        """SB3 pickles its buffer into one file; the frame-stack buffer streams its arrays into a folder."""
        suffix = ".pkl" if replay == "sb3" else ""
        return self.checkpoint_dir / f"{self.stem}_replay_buffer{suffix}"

    def own_checkpoint_files(self) -> list[Path]:
        """This run's files in checkpoints/ (and not those of seed10 when this is seed1)."""
        if not self.checkpoint_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoint_dir.iterdir()
                      if (p.name.startswith(self.stem + ".") or p.name.startswith(self.stem + "_"))
                      and not p.name.startswith(self.stem + ".old-"))  # runs moved aside earlier

    def has_tensorboard_events(self) -> bool:
        return self.run_dir.is_dir() and any(self.run_dir.glob("events.out.tfevents*"))


# ---------------------------------------------------------------------------------------------------------
# Writing: one atomic helper for every artifact
# ---------------------------------------------------------------------------------------------------------
def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@contextmanager
def atomic_replace(path: Path) -> Iterator[Path]:
    """Let the block write a file or a folder at a temporary path, then put it at ``path`` in one rename.

    A crash (or Ctrl-C) inside the block leaves ``path`` as it was: a reader never finds a half-written
    checkpoint behind the expected name. A file is fsynced before the rename. A folder (the frame-stack
    replay buffer) replaces the old one through a ``.old`` name, removed once the new folder is in place.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir():
        old = path.with_name(path.name + ".old")
        _remove(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
        return
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON at ``path``, atomically."""
    with atomic_replace(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def copy_file(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target``, atomically."""
    with atomic_replace(target) as tmp:
        shutil.copyfile(source, tmp)


# ---------------------------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------------------------
def package_versions() -> dict[str, str]:
    """Python, the pinned packages, CUDA and the GPU (torch is imported here, not at module import)."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    import torch

    versions["cuda"] = str(torch.version.cuda)
    if torch.cuda.is_available():
        versions["gpu"] = torch.cuda.get_device_name(0)
    return versions


def git_commit() -> dict[str, Any]:
    """The repository's commit and whether tracked files differ from it (None outside a git checkout)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def now_iso() -> str:
    """The current UTC time, e.g. '2026-12-01T10:00:00+00:00'."""
    return datetime.now(UTC).isoformat(timespec="seconds")
