"""One training session of a run: what happens around ``model.learn`` so that no way of ending costs a checkpoint.

The experiment decides what to build (``ch09.experiment``: the agent, the envs, the callbacks); a session runs it:

| step                   | what the session does                                                                  |
|------------------------|----------------------------------------------------------------------------------------|
| ``with TrainingSession``| starts the env workers (with their watchdog) and the evaluation env; closes them all |
| ``begin(model)``       | records the session in the run's metadata, points SB3's logger at the run's TensorBoard |
|                        | folder (a resume continues the same curves), rebuilds a snapshot a kill lost            |
| ``learn(...)``         | ``model.learn`` under the stop-on-signal handler, with the periodic checkpoints; saves |
| ``report(model)``      | the closing line, and the exit code (128 + signal when a signal stopped the run)       |

How each way of ending keeps the progress: a worker that stops answering -> checkpoint, then one sentence;
SIGINT/SIGTERM -> checkpoint at the next step, exit 130/143; a full disk -> one sentence naming the folder
(our own writes are atomic, so the last checkpoint is intact).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import gymnasium as gym
from stable_baselines3 import SAC
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import KVWriter, configure
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

from ch09.engine.fast_sac import CudaContextError
from ch09.errors import UserError
from ch09.run.artifacts import REPO_ROOT, WRITE_FAILURES, RunPaths, git_commit, now_iso, write_json
from ch09.run.callbacks import CheckpointCallback
from ch09.run.checkpoints import Checkpointer, StopRequest, StopTraining
from ch09.run.vec_env import WorkerTimeoutError, make_vec_env


class OnePointPerStep(KVWriter):
    """A logger output in front of the ones that write: a key already written at this step is dropped from a later
    dump of the same step, so each TensorBoard curve has one point per step (a second draws a vertical jump).

    Two dumps meet at a step where an evaluation ends (its own dump writes the losses) or where SB3 logged the
    last episode, when the run's closing dump follows. FastSAC's recorder of the losses (``_LossesAtDump``) goes
    in front of this one when ``learn()`` starts, so the losses it records are checked too.
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self.keys: set[str] = set()

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]], step: int = 0) -> None:
        if step != self.step:
            self.step, self.keys = step, set()
        for key in self.keys & set(key_values):  # the dicts every output after this one is handed
            del key_values[key]
            key_excluded.pop(key, None)
        self.keys.update(key_values)

    def close(self) -> None:
        pass


class TrainingSession:
    """The env workers, the checkpointer and the signal handling of one ``train`` session."""

    def __init__(self, paths: RunPaths, meta: dict[str, Any], env_fns: Sequence[Callable[[], gym.Env]],
                 worker_timeout: float, eval_env_fn: Callable[[], gym.Env] | None = None, eval_seed: int = 0,
                 replay_buffer_path: Path | None = None) -> None:
        self.paths, self.meta = paths, meta
        self.env_fns, self.worker_timeout = list(env_fns), worker_timeout
        self.eval_env_fn, self.eval_seed = eval_env_fn, eval_seed
        self.checkpointer = Checkpointer(paths, meta, replay_buffer_path)
        self.stop = StopRequest()
        self.env: VecEnv | None = None
        self.eval_env: DummyVecEnv | None = None
        self.checkpoint: Path | None = None
        self.completed = False  # learn() reached --total-steps

    # ---- the envs ------------------------------------------------------------------------------------
    def __enter__(self) -> TrainingSession:
        self.env = make_vec_env(self.env_fns, self.worker_timeout)
        try:
            if self.eval_env_fn is not None:
                self.eval_env = DummyVecEnv([self.eval_env_fn])
                self.eval_env.seed(self.eval_seed)
        except BaseException:
            self.env.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for vec_env in (self.env, self.eval_env):
            if vec_env is not None:
                vec_env.close()
        if isinstance(error, OSError) and error.errno in WRITE_FAILURES:
            # A TensorBoard write on a full disk (our own writes raise ArtifactWriteError with their own sentence).
            where = error.filename or self.paths.root
            raise UserError(f"Writing {where} failed ({error.strerror}); free space there (or pass another "
                            "--artifact-root) and continue with the same command plus --resume if a checkpoint "
                            "was saved.") from None

    # ---- the session ---------------------------------------------------------------------------------
    def begin(self, model: SAC, replay_restored: bool, **details: Any) -> None:
        """Record this session (from which step, on which device, ``details`` such as the engine), log into the
        run's own TensorBoard folder, and rebuild the last snapshot if a kill during its copy lost it."""
        start_steps = model.num_timesteps
        self.meta["sessions"].append({"started_at": now_iso(), "from_step": start_steps,
                                      "replay_restored": replay_restored, "learning_starts": model.learning_starts,
                                      "device": str(model.device), **details, "git": git_commit()})
        # The exact folder, not SB3's tensorboard_log/<name>_<N>: a resume continues the same curves.
        model.set_logger(configure(str(self.paths.run_dir), ["tensorboard"]))
        model.logger.output_formats.insert(0, OnePointPerStep())
        self.checkpointer.start(start_steps)

    def learn(self, model: SAC, total_steps: int, checkpoint_freq: int, callbacks: Sequence[BaseCallback],
              log_interval: int) -> Path:
        """Train to ``total_steps`` with a snapshot every ``checkpoint_freq`` steps; save; return the checkpoint."""
        self.checkpointer.write_missed_snapshot(model, checkpoint_freq)  # a kill during the last copy lost it
        checkpoints = CheckpointCallback(self.checkpointer, self.stop, checkpoint_freq)
        every = CallbackList([checkpoints, *callbacks])
        start_steps = model.num_timesteps
        print(f"[train] training steps {start_steps:,} -> {total_steps:,}; TensorBoard: "
              f"tensorboard --logdir {self.paths.run_dir.parent.parent}", flush=True)
        with self.stop.installed():
            try:
                try:
                    model.learn(total_timesteps=total_steps - start_steps, callback=every,
                                log_interval=log_interval, reset_num_timesteps=False)
                except StopTraining:  # a stop request: the callback saved the checkpoint between two steps
                    every.on_training_end()  # SB3 skips it when learn() ends in an exception (the progress bar)
                    self.checkpoint = self.paths.checkpoint
                else:
                    self.completed = True  # a signal during this last save changes nothing: the run is done
                    self.checkpoint = self.checkpointer.save(model, periodic_steps=checkpoints.due_snapshot())
            except WorkerTimeoutError as exc:
                # The model and buffer are intact (the failed step was never stored): keep the progress.
                checkpoint = self.checkpointer.save(model)
                raise UserError(f"{exc}, so the run stopped at step {model.num_timesteps:,} after saving "
                                f"{checkpoint}; continue with --resume, with fewer --n-envs or a larger "
                                "--worker-timeout.") from None
            except CudaContextError as exc:
                # Nothing can be read back from a broken context: the checkpoints written before it stay as they are.
                last = int(self.meta.get("steps_done", 0))
                kept = f"the checkpoint of step {last:,} is intact" if last else "no checkpoint had been written yet"
                said = str(exc)
                raise UserError(f"{said[:1].upper()}{said[1:]}, at step {model.num_timesteps:,}; {kept}: run the "
                                f"same command {'plus --resume ' if last else ''}with --no-cuda-graph (eager steps, "
                                "same losses).") from None
        if model.ep_success_buffer:
            model.dump_logs()  # SB3 logs every few episodes; this puts the final step on the curves too
        self.meta["sessions"][-1].update({"to_step": model.num_timesteps, "ended_at": now_iso(),
                                          "steps_per_s": self.meta["steps_per_s"],
                                          "cuda_graph": self.meta.get("cuda_graph")})
        write_json(self.paths.meta, self.meta)
        return self.checkpoint

    def report(self, model: SAC) -> int:
        """The closing line of the session, and its exit code."""
        if self.stop.signum is not None and not self.completed:
            print(f"[{signal.Signals(self.stop.signum).name}] stopped at step {model.num_timesteps:,} and saved "
                  f"{self.checkpoint}; continue with the same command plus --resume.", file=sys.stderr)
            return 128 + self.stop.signum
        print(f"[train] done: {model.num_timesteps:,} steps, {self.meta['wall_time_s'] / 3600:.2f} h in total, "
              f"{self.meta['steps_per_s']} steps/s this session; checkpoint {self.checkpoint}")
        root_flag = f" --artifact-root {self.paths.root}" if self.paths.root != REPO_ROOT else ""
        print(f"[train] evaluate it with: python scripts/ch09_pixel_push.py eval --checkpoint {self.checkpoint}"
              + root_flag)
        return 0
