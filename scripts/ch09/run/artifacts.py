"""Where a run's files go, how they are named, and how they are written so a crash never corrupts one.

| piece                                   | what it does                                                     |
|-----------------------------------------|------------------------------------------------------------------|
| ``RunPaths``                            | every artifact name: checkpoints/, runs/, results/ of one run     |
| ``format_steps`` / ``parse_steps``      | 500000 <-> '500K': the step labels of periodic checkpoints        |
| ``atomic_replace``                      | THE atomic write: JSON, model zips, copies and buffer folders     |
| ``clean_interrupted_writes``            | what a killed write left behind: stale temporaries, a ``.old``    |
| ``write_json``                          | a JSON artifact through ``atomic_replace``                        |
| ``package_versions``, ``git_commit``    | what a result was made with, stored next to it                    |

Only the standard library at import time: the figure script uses the step labels and formats without
loading torch, SB3 or MuJoCo.
"""

from __future__ import annotations

import errno
import itertools
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

from ch09.errors import ArtifactWriteError

REPO_ROOT = Path(__file__).resolve().parents[3]
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

INVESTIGATION_TOTAL_STEPS = 2_000_000
"""Env steps of each investigation run: train's default --total-steps. Step 3 of the investigation is Step 2's
configuration trained longer (the Experiment Card), which is how the investigation figure tells them apart."""

PERIODIC_RE = re.compile(r"^(?P<stem>.+)_(?P<steps>\d+(?:\.\d+)?[KM]?)_steps$")
"""A periodic checkpoint's name without .zip: ``<stem>_<500K>_steps``."""


# ---------------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------------
def format_steps(steps: int) -> str:
    """500000 -> '500K', 1000000 -> '1M', 1500000 -> '1.5M', 250 -> '250', 1000002 -> '1000002' (periodic
    checkpoint names): a K or M label only where it names exactly these steps."""
    for scale, unit in ((1_000_000, "M"), (1_000, "K")):
        label = f"{steps / scale:g}{unit}"
        if steps >= scale and parse_steps(label) == steps:
            return label
    return str(steps)


def parse_steps(label: str) -> int:
    """Inverse of ``format_steps``: '1.5M' -> 1500000; raises ValueError for anything else."""
    scale = {"K": 1_000, "M": 1_000_000}.get(label[-1:], 1)
    return int(round(float(label.rstrip("KM")) * scale))


def artifact_root(value: str | Path) -> Path:
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

    def own_result_files(self) -> list[Path]:
        """This run's files in results/: the evaluations of its checkpoints and snapshots, and their videos."""
        results = self.root / "results"
        evaluations = [results / f"{self.stem}_eval.json", *results.glob(f"{self.stem}_*_steps_eval.json")]
        return sorted(p for p in [*evaluations, *self.videos_of(self.root, self.stem)] if p.is_file())

    @staticmethod
    def videos_of(root: Path, stem: str) -> list[Path]:
        """results/videos/<stem>_*.mp4|gif: what ``eval --video`` wrote of the checkpoints of the run ``stem``."""
        return [p for p in (root / "results" / "videos").glob(f"{stem}_*") if p.suffix in (".mp4", ".gif")]

    def has_tensorboard_events(self) -> bool:
        return bool(tensorboard_event_files(self.run_dir))

    # ---- results/: what eval and aggregate write ---------------------------------------------------
    @property
    def eval_result(self) -> Path:
        """results/<stem>_eval.json: ``eval`` of the run's latest model."""
        return self.eval_result_of(self.root, self.checkpoint)

    @staticmethod
    def eval_result_of(root: Path, checkpoint: Path) -> Path:
        """results/<checkpoint name>_eval.json: ``eval`` of any checkpoint (a snapshot, a downloaded one)."""
        return root / "results" / f"{checkpoint.name.removesuffix('.zip')}_eval.json"

    @staticmethod
    def aggregate(root: Path, tag: str, env_id: str) -> Path:
        """results/ch09_<tag>_<env>_aggregate.json: ``aggregate`` over seeds."""
        return root / "results" / f"ch09_{tag}_{env_id}_aggregate.json"

    @staticmethod
    def success_vs_steps(root: Path, tag: str, env_id: str) -> Path:
        """results/ch09_<tag>_<env>_success_vs_steps.json: ``aggregate`` over a run's snapshots."""
        return root / "results" / f"ch09_{tag}_{env_id}_success_vs_steps.json"


# ---------------------------------------------------------------------------------------------------------
# Reading a run's TensorBoard folder
# ---------------------------------------------------------------------------------------------------------
TENSORBOARD_EVENTS = "events.out.tfevents*"
"""The names TensorBoard's writers give event files (a run folder has one per training session)."""


def tensorboard_event_files(folder: Path) -> list[Path]:
    """The event files directly in ``folder``, in name order (their names start with the time they were made)."""
    return sorted(p for p in folder.glob(TENSORBOARD_EVENTS) if p.is_file())


def read_scalar_events(folder: Path) -> dict[str, list[Any]]:
    """Every scalar point of the event files in ``folder``, by tag (sorted), oldest file first: TensorBoard's own
    ``EventAccumulator`` keeping every point; each a ``ScalarEvent(wall_time, step, value)``."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={SCALARS: 0})  # 0: keep every point
    accumulator.Reload()
    return {tag: accumulator.Scalars(tag) for tag in sorted(accumulator.Tags()["scalars"])}


# ---------------------------------------------------------------------------------------------------------
# Writing: one atomic helper for every artifact
# ---------------------------------------------------------------------------------------------------------
def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


TEMPORARY_MARK = ".tmp-"
"""Temporaries are named ``<target>.tmp-<pid>-<n>``: unique per write, and the writer's pid tells a stale one."""
WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}
"""The ``OSError``s of a write that the user fixes (space, permissions, a failing disk), not a bug."""
_write_counter = itertools.count()


def size_on_disk(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (0 if absent)."""
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size if path.exists() else 0
    except OSError:
        return 0


def write_failure(path: Path, exc: OSError, bytes_written: int) -> ArtifactWriteError:
    """The one sentence of a failed write: the folder, the bytes it needs, the bytes free there."""
    folder = path.parent
    needed = max(bytes_written, size_on_disk(path))  # the partial temporary, or the version it would replace
    try:
        free: int | None = shutil.disk_usage(folder).free
    except OSError:
        free = None
    free_text = f"{free:,} bytes are free there" if free is not None else "its free space is unknown"
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "make the folder writable"
    elif exc.errno == errno.EIO:
        fix = "check the disk"
    else:
        fix = "free space there"
    return ArtifactWriteError(
        f"Cannot write {path.name} in {folder} ({reason}): it needs at least {needed:,} bytes and {free_text}; "
        f"the partial file was removed and any earlier {path.name} is intact, so {fix} (or pass another "
        "--artifact-root) and run the command again.",
        str(path), reason, needed, free, fix)


@contextmanager
def atomic_replace(path: Path) -> Iterator[Path]:
    """Let the block write a file or a folder at a temporary path, then put it at ``path`` in one rename.

    A crash (or Ctrl-C) inside the block leaves ``path`` as it was: a reader never finds a half-written
    checkpoint behind the expected name. A file (or each file of a folder) is fsynced before the rename, and the
    folder that holds it after it. A folder (the frame-stack replay buffer) replaces the old one through a
    ``.old`` name, removed once the new one is in place. A full disk or an unwritable folder raises
    ``ArtifactWriteError`` (one sentence), the temporary removed.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno not in WRITE_FAILURES:
            raise
        raise write_failure(path, exc, 0) from None
    tmp = path.with_name(f"{path.name}{TEMPORARY_MARK}{os.getpid()}-{next(_write_counter)}")
    try:
        with writing(path, tmp):
            yield tmp
            _publish(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def writing(path: Path, tmp: Path) -> Iterator[None]:
    """A failed write of ``tmp`` (the temporary of ``path``) raised as ``ArtifactWriteError`` naming ``path``.

    ``atomic_replace`` wraps its block in it; a block that fills several temporaries before one commit (the
    checkpoint: zip, buffer, metadata) wraps each write, so the sentence names the file the failure hit.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno not in WRITE_FAILURES:
            raise
        raise write_failure(path, exc, size_on_disk(tmp)) from None


def sync_folder(folder: Path) -> None:
    """fsync a folder, so the renames in it survive a power cut (a rename lives in the folder, not the file).

    A file system that cannot sync a folder says EINVAL (some network and FUSE mounts); there is nothing more
    to do there. Every other error is raised.
    """
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(descriptor)


def _publish(tmp: Path, path: Path) -> None:
    """Put the finished temporary at ``path``: one rename for a file, two for a folder; then sync the folder
    that holds them, or the rename (which ``.meta.json`` may already record) could be lost to a power cut.
    Before the rename, the file (or every file of the folder, and the folder) is synced to the disk."""
    if tmp.is_dir():
        for file in tmp.rglob("*"):
            if file.is_file():
                _sync_file(file)
        sync_folder(tmp)
        old = path.with_name(path.name + ".old")
        _remove(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        sync_folder(path.parent)
        _remove(old)
        return
    _sync_file(tmp)
    os.replace(tmp, path)
    sync_folder(path.parent)


def _sync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _writer_alive(temporary: Path) -> bool:
    """Whether the process named in ``<target>.tmp-<pid>-<n>`` still runs (and is not this one)."""
    pid_text = temporary.name.rpartition(TEMPORARY_MARK)[2].split("-")[0]
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True


def clean_interrupted_writes(folder: Path, stem: str) -> list[str]:
    """Undo what a killed write of ``stem``'s files left in ``folder``; returns one note per repair.

    Removes temporaries (``<stem>...tmp-<pid>-<n>``, and the older ``.tmp`` names) whose writer is gone;
    a ``.old`` folder is the previous replay buffer when the kill fell between the two renames of
    ``_publish``: it is put back if the new one is missing, removed otherwise.
    """
    if not folder.is_dir():
        return []
    notes = []
    for path in sorted(folder.iterdir()):
        if not path.name.startswith((stem + ".", stem + "_")):  # not seed10's files when this is seed1
            continue
        if (TEMPORARY_MARK in path.name and not _writer_alive(path)) or path.name.endswith(".tmp"):
            _remove(path)
            notes.append(f"removed {path.name}, left by an interrupted write")
        elif path.name.endswith(".old"):
            target = path.with_name(path.name.removesuffix(".old"))
            if target.exists():
                _remove(path)
                notes.append(f"removed {path.name}, left by an interrupted write")
            else:
                os.replace(path, target)
                notes.append(f"restored {target.name} from {path.name} (a write was interrupted between renames)")
    return notes


def json_text(data: dict[str, Any]) -> str:
    """``data`` as the indented JSON every artifact of the project is written in."""
    return json.dumps(data, indent=2, default=str) + "\n"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON at ``path``, atomically."""
    with atomic_replace(path) as tmp:
        tmp.write_text(json_text(data))


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
