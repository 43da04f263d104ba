"""Checkpoints: writing them safely, stopping on a signal, resuming, and loading one back.

| piece                                  | what it does                                                         |
|----------------------------------------|----------------------------------------------------------------------|
| ``Checkpointer``                       | latest model, periodic snapshots, replay buffer, metadata            |
| ``StopRequest``, ``StopTraining``      | SIGINT/SIGTERM end ``learn()`` between two steps, after a checkpoint |
| ``guard_fresh_run``                    | a fresh run never mixes into (or overwrites) an earlier one          |
| ``restore_replay_buffer``              | on resume: the saved buffer, or ``learning_starts`` moved past it     |
| ``load_agent``, ``load_for_acting``    | ``SAC.load`` with its failures turned into one sentence each         |
| ``read_meta``, ``meta_for_checkpoint`` | the ``.meta.json`` beside a checkpoint                               |

Loading a checkpoint yourself
-----------------------------
``SAC.load(path, env=env)`` works for every checkpoint of this project when ``env`` is the env it was
trained on, in any process where the project is installed (``pip install -e .``: the pickled classes import). Without
``env=``, SB3 refuses a model whose replay buffer is a ``HerReplayBuffer`` (all of ours), because it
rebuilds the buffer on load. To act only, ``load_for_acting(path)`` swaps in a one-row plain buffer.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import torch as th
from stable_baselines3 import SAC
from stable_baselines3.common.vec_env import VecEnv

from ch09.engine.framestack_replay import TRUNCATION_WARNING, FrameStackHerReplayBuffer
from ch09.errors import ArtifactWriteError, UserError
from ch09.run.artifacts import (
    CHECKPOINT_FORMAT,
    PERIODIC_RE,
    RunPaths,
    atomic_replace,
    copy_file,
    json_text,
    now_iso,
    size_on_disk,
    write_json,
    writing,
)
from ch09.run.digest import sha256_file
from ch09.run.validation import FieldType, Number, OptionalDict, check_fields, read_json_object

ACT_ONLY_OBJECTS: dict[str, object] = {"replay_buffer_class": None, "replay_buffer_kwargs": {}, "buffer_size": 1,
                                       "learning_starts": 0}
"""``custom_objects`` for a model that only acts: SB3 then builds a one-row plain buffer instead of HER's,
which needs no env and no memory."""


# ---------------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------------
META_FIELDS: dict[str, FieldType] = {
    "format": str, "tag": str, "env_id": str, "seed": int, "config": dict, "steps_done": int, "wall_time_s": Number,
    "sessions": list, "periodic_checkpoints": list, "replay_buffer": OptionalDict}
"""The fields of a .meta.json that eval and --resume read, with their JSON types: checked before any is used."""


def read_meta(path: Path, what: str) -> dict[str, Any]:
    """Load a .meta.json, explaining a missing, damaged or wrongly shaped one (every file read is untrusted)."""
    if not path.is_file():
        raise UserError(f"No metadata file {path} for {what}: this script writes one beside every checkpoint; copy "
                        "it there with the checkpoint (a zip from elsewhere cannot be evaluated or resumed here).")
    fix = "restore it from a backup or start a fresh run"
    meta = read_json_object(path, "The metadata file", fix)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"The metadata file {path} has format {meta.get('format')!r}, not {CHECKPOINT_FORMAT!r} "
                        f"(not this script's); {fix}.")
    check_fields(meta, META_FIELDS, f"The metadata file {path}", fix)
    if meta["replay_buffer"] is not None:
        check_fields(meta["replay_buffer"], {"path": str, "steps": int}, f"The metadata file {path} (replay_buffer)",
                     fix)
    return meta


def meta_for_checkpoint(checkpoint: Path) -> Path:
    """``X.zip`` -> ``X.meta.json``; a periodic ``X_500K_steps.zip`` falls back to its run's ``X.meta.json``."""
    own = checkpoint.with_name(checkpoint.name.removesuffix(".zip") + ".meta.json")
    if own.is_file():
        return own
    match = PERIODIC_RE.match(checkpoint.name.removesuffix(".zip"))
    if match:
        return checkpoint.with_name(match["stem"] + ".meta.json")
    return own


def describe_policy(model: SAC) -> dict[str, str]:
    """What a model actually is (policy, encoder, replay classes), to compare with what metadata claims."""
    return {
        "policy": type(model.policy).__name__,
        "features_extractor": type(model.policy.actor.features_extractor).__name__,
        "replay_buffer": type(model.replay_buffer).__name__ if model.replay_buffer is not None else "None",
    }


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
def load_agent(path: Path, env: VecEnv | None, device: str = "auto",
               custom_objects: dict[str, Any] | None = None, algorithm: type[SAC] = SAC,
               **options: Any) -> SAC:
    """``algorithm.load`` (SAC, or a subclass such as FastSAC with its ``options``) with the ways it can fail
    turned into one sentence each."""
    if not path.is_file():
        raise UserError(f"Checkpoint {path} does not exist; check the path (periodic ones end in _<N>_steps.zip).")
    try:
        model = algorithm.load(path, env=env, device=device, custom_objects=custom_objects, **options)
    except ValueError as exc:
        if "spaces do not match" in str(exc) or "Observation spaces" in str(exc) or "Action spaces" in str(exc):
            raise UserError(f"Checkpoint {path} was trained on other observations than its .meta.json describes "
                            f"(a checkpoint from another config?): {str(exc).splitlines()[0]}") from None
        raise UserError(damaged_checkpoint_message(path, exc)) from None
    except Exception as exc:  # BadZipFile, EOFError, pickle and torch errors all mean: damaged
        raise UserError(damaged_checkpoint_message(path, exc)) from None
    return model


ERROR_DETAIL_CHARS = 200
"""How much of a load error's own message a sentence quotes (a pickle error can hold a whole object)."""


def _error_detail(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error)[:ERROR_DETAIL_CHARS]}"


def damaged_checkpoint_message(path: Path, error: Exception) -> str:
    """The sentence for a checkpoint SB3 cannot load, with the way round it: a periodic snapshot of the run."""
    stem = path.name.removesuffix(".zip")
    match = PERIODIC_RE.match(stem)
    run_stem = match["stem"] if match else stem
    return (f"Checkpoint {path} cannot be loaded ({_error_detail(error)}); it is damaged or not "
            f"an SB3 SAC checkpoint: evaluate a periodic snapshot ({run_stem}_<N>_steps.zip) instead, or copy one "
            f"over {run_stem}.zip to --resume from it.")


def load_for_acting(path: str | Path, env: VecEnv | None = None, device: str = "cpu") -> SAC:
    """A checkpoint loaded to act (``predict``), not to train: no HER buffer, so no env is needed.

    Pass ``env`` to have SB3 check that its spaces are the checkpoint's.
    """
    return load_agent(Path(path), env, device, custom_objects=ACT_ONLY_OBJECTS)


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------
def write_replay_buffer(model: SAC, path: Path) -> None:
    """Write the model's buffer at ``path`` (a temporary of ``atomic_replace``): SB3 pickles its buffer into one
    file; the frame-stack buffer streams its arrays into a folder."""
    assert model.replay_buffer is not None
    if isinstance(model.replay_buffer, FrameStackHerReplayBuffer):
        model.replay_buffer.save(path)
    else:
        with open(path, "wb") as handle:
            model.save_replay_buffer(handle)


class Checkpointer:
    """Writes the latest checkpoint, the periodic snapshots, the replay buffer and the metadata."""

    def __init__(self, paths: RunPaths, meta: dict[str, Any], replay_buffer_path: Path | None) -> None:
        """``replay_buffer_path`` None: checkpoints hold the model only (no --save-replay-buffer)."""
        self.paths, self.meta, self.replay_buffer_path = paths, meta, replay_buffer_path
        self.session_start = time.time()
        self.session_start_steps = 0
        self.previous_wall_time = float(meta.get("wall_time_s", 0.0))

    def start(self, steps: int) -> None:
        self.session_start, self.session_start_steps = time.time(), steps

    def save(self, model: SAC, periodic_steps: int | None = None) -> Path:
        """Write the latest checkpoint (and the ``periodic_steps`` snapshot, the buffer, the metadata).

        A write that fails (a full disk, a folder made read-only) raises ``ArtifactWriteError``: one
        sentence with the folder and the bytes needed; the temporaries are gone and the previous
        checkpoint's files are intact, all of one step (see ``_write``).
        """
        try:
            return self._write(model, periodic_steps)
        except SnapshotWriteError as exc:
            raise ArtifactWriteError(
                f"The checkpoint of step {model.num_timesteps:,} is saved, but not its periodic snapshot: writing "
                f"{Path(exc.path).name} in {Path(exc.path).parent} failed ({exc.reason}; {self._room(exc)}); "
                f"{exc.fix} and continue with the same command plus --resume, which writes the missing snapshot.",
                exc.path, exc.reason, exc.bytes_needed, exc.bytes_free, exc.fix) from None
        except ArtifactWriteError as exc:
            last = int(self.meta.get("steps_done", 0))
            then = (f"the checkpoint files of step {last:,} are intact, so {exc.fix} and continue with the "
                    "same command plus --resume" if last else
                    f"no checkpoint had been written yet, so {exc.fix} and run the same command again")
            raise ArtifactWriteError(
                f"The checkpoint of step {model.num_timesteps:,} was not saved: writing {Path(exc.path).name} in "
                f"{Path(exc.path).parent} failed ({exc.reason}; {self._room(exc)}); the partial files were removed "
                f"and {then}.",
                exc.path, exc.reason, exc.bytes_needed, exc.bytes_free, exc.fix) from None

    @staticmethod
    def _room(exc: ArtifactWriteError) -> str:
        free = f"{exc.bytes_free:,} bytes free" if exc.bytes_free is not None else "free space unknown"
        return f"at least {exc.bytes_needed:,} bytes needed, {free}"

    def write_missed_snapshot(self, model: SAC, freq: int) -> Path | None:
        """On resume: the periodic snapshot of the restored step, if a kill during its copy lost it.

        The latest checkpoint is written before the snapshot is copied from it, so a run killed during the
        copy resumes from exactly that step; the schedule would then go on to the next multiple.
        """
        steps = model.num_timesteps
        periodic = self.paths.periodic(steps)
        if steps == 0 or steps % freq or periodic.exists():
            return None
        try:
            copy_file(self.paths.checkpoint, periodic)
        except ArtifactWriteError as exc:
            raise ArtifactWriteError(f"{exc} (while writing the missed snapshot of step {steps:,})", exc.path,
                                     exc.reason, exc.bytes_needed, exc.bytes_free, exc.fix) from None
        self._record_snapshot(periodic, sha256_file(periodic))
        print(f"[resume] wrote the periodic snapshot {periodic.name} that an interrupted run had not finished")
        return periodic

    def _write(self, model: SAC, periodic_steps: int | None) -> Path:
        """One commit: the zip, the replay buffer and the metadata are written under temporary names, and only
        when all of them are complete are they renamed into place, the metadata last.

        A write that fails, or a kill during one, leaves the previous checkpoint's files as they were, all of
        one step: the metadata never names a zip or a buffer that is not there. The renames go zip, buffer,
        metadata: a kill in the milliseconds between two of them leaves the zip ahead of the metadata, whose
        ``replay_buffer.steps`` then no longer matches the zip's steps, so a resume collects fresh steps instead
        of loading a buffer of another step (the buffer first would have been loaded one checkpoint ahead of the
        zip). The periodic snapshot is copied from the committed zip after it; ``write_missed_snapshot`` redoes a
        copy a kill cut short.
        """
        checkpoint = self.paths.checkpoint
        buffer_path = self.replay_buffer_path if model.replay_buffer is not None else None
        with ExitStack() as commit:  # the renames run on exit, last entered first: zip, buffer, metadata
            meta_tmp = commit.enter_context(atomic_replace(self.paths.meta))
            buffer_tmp = commit.enter_context(atomic_replace(buffer_path)) if buffer_path is not None else None
            zip_tmp = commit.enter_context(atomic_replace(checkpoint))
            with writing(checkpoint, zip_tmp):
                model.save(zip_tmp)
            # Each zip's SHA-256, recorded when it is written: a published copy can be checked against it.
            digest = sha256_file(zip_tmp)
            changes: dict[str, Any] = {**self._progress(model), "sha256": {**self._digests(), checkpoint.name: digest}}
            if buffer_path is not None and buffer_tmp is not None:
                with writing(buffer_path, buffer_tmp):
                    write_replay_buffer(model, buffer_tmp)
                changes["replay_buffer"] = {"path": buffer_path.name, "steps": model.num_timesteps}
            with writing(self.paths.meta, meta_tmp):
                meta_tmp.write_text(json_text({**self.meta, **changes}))
        self.meta.update(changes)  # only now: a failed commit leaves the metadata of the last one
        if periodic_steps is not None:
            self._write_snapshot(periodic_steps, digest)
        return checkpoint

    def _write_snapshot(self, steps: int, digest: str) -> None:
        """Copy the committed zip to its periodic name and record it; on a failure, the checkpoint is saved."""
        periodic = self.paths.periodic(steps)
        try:
            copy_file(self.paths.checkpoint, periodic)
        except ArtifactWriteError as exc:
            raise SnapshotWriteError(exc) from None
        self._record_snapshot(periodic, digest)
        write_json(self.paths.meta, self.meta)

    def _record_snapshot(self, periodic: Path, digest: str) -> None:
        """List the snapshot ``periodic`` and its SHA-256 in the metadata (in memory; the caller writes it)."""
        self.meta["sha256"] = {**self._digests(), periodic.name: digest}
        if periodic.name not in self.meta.setdefault("periodic_checkpoints", []):
            self.meta["periodic_checkpoints"].append(periodic.name)

    def _digests(self) -> dict[str, str]:
        recorded = self.meta.get("sha256")
        return dict(recorded) if isinstance(recorded, dict) else {}

    def _progress(self, model: SAC) -> dict[str, Any]:
        """The metadata of where the run stands: steps, wall time, speed, the policy, the CUDA graph, GPU memory."""
        elapsed = time.time() - self.session_start
        session_steps = model.num_timesteps - self.session_start_steps
        status = getattr(model, "graph_status", None)  # FastSAC: what became of its CUDA-graph step
        progress = {
            "steps_done": int(model.num_timesteps),
            "wall_time_s": round(self.previous_wall_time + elapsed, 1),
            "steps_per_s": round(session_steps / elapsed, 2) if elapsed > 0 else None,
            "updated_at": now_iso(),
            "policy": describe_policy(model),
            "cuda_graph": asdict(status) if status is not None else None,
        }
        if model.device.type == "cuda":  # networks, batches and (framestack) the replay frames
            progress["gpu_memory_peak_bytes"] = int(th.cuda.max_memory_allocated(model.device))
        return progress


class SnapshotWriteError(ArtifactWriteError):
    """The checkpoint was committed, but copying it to its periodic snapshot failed."""

    def __init__(self, cause: ArtifactWriteError) -> None:
        super().__init__(str(cause), cause.path, cause.reason, cause.bytes_needed, cause.bytes_free, cause.fix)


class StopRequest:
    """Set by SIGINT/SIGTERM; the checkpoint callback saves before the next env step and ends ``learn()``."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second Ctrl-C: the user does not want to wait for the save
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n[{signal.Signals(signum).name}] saving a checkpoint at the next step, then exiting "
              "(a second signal quits without saving)", file=sys.stderr, flush=True)

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        previous = {sig: signal.signal(sig, self.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class StopTraining(Exception):
    """Raised by the checkpoint callback between two env steps, once the stop request's checkpoint is saved:
    it ends ``learn()`` there (SB3 lets a callback end it only from ``_on_step``, before the step is stored)."""

    def __init__(self, steps: int) -> None:
        super().__init__(f"stopped at step {steps:,} on request, after saving a checkpoint")


# ---------------------------------------------------------------------------------------------------------
# Fresh runs and resumed runs
# ---------------------------------------------------------------------------------------------------------
def guard_fresh_run(paths: RunPaths, move_old_run: bool) -> None:
    """A fresh run must not mix its curves into an old TensorBoard folder nor overwrite old checkpoints.

    A TensorBoard folder with events but no checkpoint is a run stopped before its first checkpoint
    (nothing to resume, nothing lost): it is moved aside with a note, so the same command starts again.
    """
    old_logs = paths.has_tensorboard_events()
    old_files = paths.own_checkpoint_files()
    if not old_logs and not old_files:
        return
    if old_logs and not old_files and not move_old_run:
        aside = paths.run_dir.with_name(f"{paths.run_dir.name}.old-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        os.replace(paths.run_dir, aside)
        print(f"[fresh run] {paths.run_dir} held TensorBoard logs but no checkpoint (a run stopped before its "
              f"first checkpoint, nothing to resume): moved them to {aside}")
        return
    if not move_old_run:
        what = f"{paths.run_dir} already holds TensorBoard logs" if old_logs else f"{old_files[0]} already exists"
        raise UserError(f"{what} from an earlier run of this tag and seed; continue it with --resume, or start over "
                        "with --move-old-run (which renames the old run with a timestamp).")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    if old_logs:
        aside = paths.run_dir.with_name(f"{paths.run_dir.name}.old-{stamp}")
        os.replace(paths.run_dir, aside)
        print(f"[fresh run] moved old TensorBoard folder to {aside}")
    # The old run's evaluations go too: aggregate would mix them with the new run's.
    for files, folder, what in ((old_files, paths.checkpoint_dir, "checkpoint file(s)"),
                                (paths.own_result_files(), paths.root / "results", "evaluation file(s) and video(s)")):
        if files:
            aside_dir = folder / f"{paths.stem}.old-{stamp}"
            aside_dir.mkdir(parents=True)
            for path in files:
                os.replace(path, aside_dir / path.name)
            print(f"[fresh run] moved {len(files)} old {what} to {aside_dir}")


def check_room_to_resume(paths: RunPaths, replay_buffer_path: Path | None) -> None:
    """Refuse a --resume whose next checkpoint cannot fit on the disk, before anything is built.

    The next checkpoint is about as large as the current one, and the atomic write keeps both until the
    rename, so that is the room it needs next to the current files.
    """
    needed = sum(size_on_disk(path) for path in (paths.checkpoint, paths.meta, replay_buffer_path) if path is not None)
    try:
        free = shutil.disk_usage(paths.checkpoint_dir).free
    except OSError:
        return
    if free < needed:
        raise UserError(f"--resume needs room for the next checkpoint in {paths.checkpoint_dir}: about {needed:,} "
                        f"bytes (the size of the current one), but only {free:,} are free; free space there (or copy "
                        "checkpoints/ and runs/ to a larger disk and pass --artifact-root) and resume again.")


def load_replay_buffer(model: SAC, path: Path) -> None:
    """The replay buffer saved at ``path`` into ``model``; a damaged one ends the resume in one sentence."""
    try:
        with warnings.catch_warnings():
            # Both loads close the episode that was running at the checkpoint, and say so in a warning meant for
            # code that would continue it: a resume starts new episodes, so closing it is what it needs.
            warnings.filterwarnings("ignore", message=re.escape(TRUNCATION_WARNING))
            if isinstance(model.replay_buffer, FrameStackHerReplayBuffer):
                model.replay_buffer.load(path)
            else:  # re-attaches HER's env
                model.load_replay_buffer(path)
    except Exception as exc:  # EOFError, pickle, JSON, mmap and NumPy errors all mean: damaged
        raise UserError(f"The replay buffer {path} saved with the checkpoint cannot be loaded ({_error_detail(exc)}); "
                        "it is damaged: restore it from a backup, or delete it and run the same "
                        "command again (the resume then collects --learning-starts fresh steps first).") from None


# --8<-- [start:restore_replay_buffer]
def restore_replay_buffer(model: SAC, path: Path, saved: dict | None,
                          learning_starts: int) -> bool:
    """Reload the replay buffer saved with the checkpoint; without one,
    collect ``learning_starts`` fresh steps before updates resume.

    SB3 counts ``learning_starts`` in absolute steps: with an empty buffer
    and ``learning_starts < num_timesteps`` it would sample at once and
    fail "Unable to sample before the end of the first episode".
    """
    steps = model.num_timesteps
    if saved and saved.get("steps") == steps:
        if path.exists():
            load_replay_buffer(model, path)
            assert model.replay_buffer is not None, "both loads leave a buffer"
            print(f"[resume] replay buffer restored from {path} "
                  f"({model.replay_buffer.size():,} transitions)")
            return True
        why = f"the replay buffer saved at step {steps:,} is missing ({path})"
    else:
        why = f"no replay buffer saved at step {steps:,}"
    model.learning_starts = steps + learning_starts
    print(f"[resume] {why}: collecting {learning_starts:,} fresh steps "
          "before updates resume")
    return False
# --8<-- [end:restore_replay_buffer]
