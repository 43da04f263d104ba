"""SB3 callbacks of a long run: checkpoints and stop requests, evaluation, progress, hyper-parameters.

| callback                 | every ...                         | does                                            |
|--------------------------|-----------------------------------|-------------------------------------------------|
| ``CheckpointCallback``   | --checkpoint-freq env steps       | periodic checkpoint; ends learn() on a signal   |
| ``PeriodicEvalCallback`` | --eval-freq env steps             | deterministic episodes -> eval/success_rate,    |
|                          |                                   | one of them as a video -> eval/video            |
| ``ProgressBarCallback``  | env step                          | tqdm bar with steps/s, ETA, latest success rates |
| ``NoCudaNotice``         | first updates (pixels, no CUDA)   | one line: measured s/update, time for the run   |
| ``HParamCallback``       | start of training                 | the config in TensorBoard's HPARAMS tab         |
| ``KillAtStepForTests``   | env step (TEST HOOK, off unless   | SIGKILLs its own process once at step N, as the |
|                          | CH09_TEST_KILL_AT_STEP is set)    | OOM killer or ``kill -9`` would                 |

The schedules count env steps (``num_timesteps``), not callback calls, so they land on the same steps
with any ``--n-envs`` and after a resume.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import numpy as np
from stable_baselines3 import SAC
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import HParam
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.vec_env import VecEnv

from ch09.run.checkpoints import Checkpointer, StopRequest, StopTraining
from ch09.run.video import EpisodeRecorder, log_tensorboard_video

PROGRESS_POSTFIX_EVERY = 1000
"""Callback calls between updates of the progress bar's success-rate postfix."""
TEST_KILL_AT_STEP = "CH09_TEST_KILL_AT_STEP"
"""TEST HOOK environment variable: the env step at which a run's first session SIGKILLs itself."""
TEST_KILL_RUN = "CH09_TEST_KILL_RUN"
"""TEST HOOK environment variable: limits CH09_TEST_KILL_AT_STEP to the run with this artifact stem."""


class CheckpointCallback(BaseCallback):
    """Periodic checkpoints at multiples of ``freq`` env steps, and the stop on SIGINT/SIGTERM, both between
    two env steps.

    SB3 calls ``_on_step`` after the envs stepped but before it stores their transitions, counts the episodes
    they finished and runs the step's updates: a checkpoint there would miss all three, and a resume from it
    would lose them. At ``_on_rollout_start`` (SB3 collects a rollout of ``train_freq`` steps, then trains)
    the last step is stored and trained on: the run is whole. The last step of ``learn()`` has no rollout
    after it; the session's final save writes its snapshot (``due_snapshot``).
    """

    model: SAC  # SB3 declares a BaseAlgorithm; the checkpoints are SAC's (train's model, FastSAC included)

    def __init__(self, checkpointer: Checkpointer, stop: StopRequest, freq: int) -> None:
        super().__init__()
        self.checkpointer, self.stop, self.freq = checkpointer, stop, freq
        self.next_checkpoint = 0

    def _on_training_start(self) -> None:
        self.next_checkpoint = (self.num_timesteps // self.freq + 1) * self.freq

    def due_snapshot(self) -> int | None:
        """The periodic step a save now should also be kept as (``_<N>_steps.zip``), or None."""
        return self.next_checkpoint if self.model.num_timesteps >= self.next_checkpoint else None

    def _on_rollout_start(self) -> None:
        due = self.due_snapshot()
        if due is not None:
            self.checkpointer.save(self.model, periodic_steps=due)
            self.next_checkpoint += self.freq
        if self.stop.signum is not None:
            if due is None:
                self.checkpointer.save(self.model)
            raise StopTraining(self.model.num_timesteps)

    def _on_step(self) -> bool:
        return True


class PeriodicEvalCallback(BaseCallback):
    """Deterministic evaluation every ``eval_freq`` env steps, logged as eval/success_rate.

    Like SB3's EvalCallback, but scheduled on env steps rather than on callback calls. With a ``recorder``
    (the eval env's ``EpisodeRecorder``), the first evaluated episode is logged as an animated image under
    eval/video and its cost in seconds (camera renders + GIF encoding) under eval/video_seconds; eval/seconds
    is the whole evaluation's wall time.
    """

    def __init__(self, eval_env: VecEnv, eval_freq: int, n_episodes: int,
                 recorder: EpisodeRecorder | None = None) -> None:
        super().__init__()
        self.eval_env, self.eval_freq, self.n_episodes, self.recorder = eval_env, eval_freq, n_episodes, recorder
        self.next_eval = 0
        self.last_success_rate: float | None = None

    def _on_training_start(self) -> None:
        self.next_eval = (self.num_timesteps // self.eval_freq + 1) * self.eval_freq

    def _on_step(self) -> bool:
        if self.num_timesteps < self.next_eval:
            return True
        self.next_eval += self.eval_freq
        successes: list[float] = []

        def record_success(locals_: dict[str, Any], _globals: dict[str, Any]) -> None:
            if locals_["done"] and "is_success" in locals_["info"]:
                successes.append(float(locals_["info"]["is_success"]))

        start = time.perf_counter()
        if self.recorder is not None:
            self.recorder.record_next(1)  # evaluate_policy's first reset starts it
            recording_before = self.recorder.seconds
        returns, lengths = evaluate_policy(self.model, self.eval_env, n_eval_episodes=self.n_episodes,
                                           deterministic=True, return_episode_rewards=True, callback=record_success)
        self.logger.record("eval/mean_reward", float(np.mean(returns)))
        self.logger.record("eval/mean_ep_length", float(np.mean(lengths)))
        if successes:
            self.last_success_rate = float(np.mean(successes))
            self.logger.record("eval/success_rate", self.last_success_rate)
        if self.recorder is not None:
            self._log_video(self.recorder, self.recorder.seconds - recording_before)
        self.logger.record("eval/seconds", time.perf_counter() - start)  # the whole evaluation, video included
        self.logger.dump(self.num_timesteps)
        return True

    def _log_video(self, recorder: EpisodeRecorder, recording_seconds: float) -> None:
        start = time.perf_counter()
        for episode in recorder.take()[:1]:
            frames = list(episode.frames(f"{self.num_timesteps:,} steps"))
            log_tensorboard_video(self.logger, "eval/video", frames, self.num_timesteps)
            self.logger.record("eval/video_seconds", recording_seconds + time.perf_counter() - start)


class ProgressBarCallback(BaseCallback):
    """tqdm bar over the whole run (it starts at the restored step on --resume): steps/s and ETA.

    The random-action steps before ``learning_starts`` run far faster than training steps (no update), so
    their rate would promise an ETA many times too short: they get a bar of their own, and the bar that
    follows measures its rate, and so its ETA, from the first update on.
    """

    model: OffPolicyAlgorithm  # SB3 declares a BaseAlgorithm; learning_starts is an off-policy algorithm's

    def __init__(self, total_steps: int, description: str, evaluator: PeriodicEvalCallback | None) -> None:
        super().__init__()
        self.total_steps, self.description, self.evaluator = total_steps, description, evaluator
        self.bar: Any = None
        self.updating = False

    def _new_bar(self, description: str) -> None:
        from tqdm import tqdm

        interactive = sys.stderr.isatty()  # in a log file (nohup, docker logs) redraw only once a minute
        self.bar = tqdm(total=self.total_steps, initial=self.num_timesteps, unit="step", unit_scale=True,
                        desc=description, dynamic_ncols=True, smoothing=0.05,
                        mininterval=1.0 if interactive else 60.0)

    def _on_training_start(self) -> None:
        self.updating = self.num_timesteps > self.model.learning_starts
        self._new_bar(self.description if self.updating else f"{self.description} (random actions)")

    def _on_step(self) -> bool:
        self.bar.update(self.training_env.num_envs)
        if not self.updating and self.num_timesteps > self.model.learning_starts:  # SB3 updates from here on
            self.updating = True
            self.bar.close()
            self._new_bar(self.description)
        if self.n_calls % PROGRESS_POSTFIX_EVERY == 0:
            postfix = {}
            if self.model.ep_success_buffer:
                postfix["success"] = f"{np.mean(self.model.ep_success_buffer):.2f}"
            if self.evaluator is not None and self.evaluator.last_success_rate is not None:
                postfix["eval"] = f"{self.evaluator.last_success_rate:.2f}"
            self.bar.set_postfix(postfix, refresh=False)
        return True

    def _on_training_end(self) -> None:
        self.bar.close()


def human_duration(seconds: float) -> str:
    """2.3 years, 9.7 days, 5.2 h, 14 min, 40 s: a duration in the unit a reader plans with."""
    for unit, size in (("years", 365.25 * 86_400), ("days", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}" if seconds < 100 * size else f"{seconds / size:,.0f} {unit}"
    return f"{seconds:.0f} s"


class NoCudaNotice(BaseCallback):
    """Pixels without CUDA: measure the first updates, print what they mean for the run, and go on.

    SB3 calls ``train()`` (the ``gradient_steps`` updates) after a rollout ends and before the next one
    starts, so the time between those two callbacks is the update time, and the time from one rollout
    start to the next is a whole training iteration (``n_envs`` env steps plus their updates), which the
    projection of the steps still to go uses. The first iteration (allocations, warm-up) is not counted; the
    median of the next ``MEASURED_ITERATIONS`` is, so an evaluation falling among them does not inflate the figure.
    With overlapped collection ``train()`` only defers the updates to the next env step, so the notice gives the
    time of a whole training step instead of an update's.
    """

    MEASURED_ITERATIONS = 5

    model: OffPolicyAlgorithm  # SB3 declares a BaseAlgorithm; learning_starts, gradient_steps are off-policy's

    def __init__(self, total_steps: int) -> None:
        super().__init__()
        self.total_steps = total_steps
        self.active = False
        self.update_started: float | None = None
        self.iteration_started: float | None = None
        self.update_seconds: list[float] = []
        self.iteration_seconds: list[float] = []
        self.updates_deferred = False  # FastSAC's overlapped collection: train() left its updates to the next step

    def _on_training_start(self) -> None:
        self.active = self.model.device.type != "cuda"

    def _on_rollout_end(self) -> None:
        if self.active and self.num_timesteps > self.model.learning_starts:
            self.update_started = time.perf_counter()

    def _on_rollout_start(self) -> None:
        if not self.active:
            return
        now = time.perf_counter()
        if self.update_started is not None and self.iteration_started is not None:  # train() ran since the last
            self.updates_deferred |= getattr(self.model, "deferred_update_steps", 0) > 0
            self.update_seconds.append(now - self.update_started)
            self.iteration_seconds.append(now - self.iteration_started)
        self.update_started, self.iteration_started = None, now
        if len(self.update_seconds) > self.MEASURED_ITERATIONS:  # the first one was the warm-up
            self.active = False
            self._print(self.update_seconds[1:], self.iteration_seconds[1:])

    def _print(self, update_seconds: list[float], iteration_seconds: list[float]) -> None:
        import torch
        from tqdm import tqdm

        per_update = float(np.median(update_seconds)) / max(self.model.gradient_steps, 1)
        per_step = float(np.median(iteration_seconds)) / self.training_env.num_envs
        steps_left = max(self.total_steps - self.num_timesteps, 0)  # the random-action steps are behind us
        where = "no CUDA GPU" if not torch.cuda.is_available() else f"training on {self.model.device}, not CUDA"
        took = (f"a pixel training step (env step and update, overlapped) takes {per_step:.3g} s here"
                if self.updates_deferred else f"a pixel update takes {per_update:.3g} s here")
        bf16 = "; --precision bf16 is for CUDA GPUs (slower than fp32 on a CPU)" \
            if getattr(self.model, "precision", "fp32") == "bf16" else ""
        tqdm.write(f"{where}: {took}, so the remaining {steps_left:,} steps would take "
                   f"~{human_duration(per_step * steps_left)}; use a GPU, or --full-state to check the pipeline{bf16}",
                   file=sys.stdout)

    def _on_step(self) -> bool:
        return True


class HParamCallback(BaseCallback):
    """Writes the run's configuration to TensorBoard's HPARAMS tab."""

    def __init__(self, hparams: dict[str, Any]) -> None:
        super().__init__()
        # TensorBoard takes bools, numbers and strings; anything else (None, lists) is shown as text.
        self.hparams = {key: (value if isinstance(value, (bool, int, float, str)) else str(value))
                        for key, value in hparams.items()}

    def _on_training_start(self) -> None:
        metrics = {"eval/success_rate": 0.0, "rollout/success_rate": 0.0}
        self.logger.record("hparams", HParam(self.hparams, metrics), exclude=("stdout", "log", "json", "csv"))

    def _on_step(self) -> bool:
        return True


class KillAtStepForTests(BaseCallback):
    """TEST HOOK, not for users: SIGKILL this process at env step ``kill_at_step``, once per run.

    It is how tests/test_ch09_sweep.py makes a run die mid-way the way the OOM killer or ``kill -9`` would
    (no handler runs, nothing is saved), to check that the sweep's retry resumes from the last checkpoint.
    It acts only in a session that started at step 0 (a run's first session): the resumed retry trains on.
    """

    def __init__(self, kill_at_step: int) -> None:
        super().__init__()
        self.kill_at_step = kill_at_step
        self.armed = False

    def _on_training_start(self) -> None:
        self.armed = self.num_timesteps == 0

    def _on_step(self) -> bool:
        if self.armed and self.num_timesteps >= self.kill_at_step:
            print(f"[test hook] {TEST_KILL_AT_STEP}: SIGKILL at step {self.num_timesteps:,}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return True


def testing_hooks(run_stem: str) -> list[BaseCallback]:
    """The test hooks the environment switches on for this run (none in normal use)."""
    kill_at_step = os.environ.get(TEST_KILL_AT_STEP)
    only_run = os.environ.get(TEST_KILL_RUN)
    if not kill_at_step or (only_run and only_run != run_stem):
        return []
    return [KillAtStepForTests(int(kill_at_step))]
