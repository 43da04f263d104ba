"""How fast an agent of the experiment trains: one measurement, in the process that calls ``measure``.

``scripts/bench_train.py`` runs each measurement in a process of its own (and several side by side) and prints the
table; ``selftest`` takes a short speed sample with the same function. What a measurement is:

| piece             | what it holds                                                                          |
|-------------------|----------------------------------------------------------------------------------------|
| ``RUNS``          | the configurations by name (stock SB3 Step 0 / Step 2, FastSAC Step 2, full-state)     |
| ``Measurement``   | one process's job: run, envs, batch, precision, device, budgets                        |
| ``measure``       | build the agent as ``train`` does, warm up, time training (and the updates alone)      |
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch as th

if TYPE_CHECKING:
    import gymnasium as gym

GPU_UTIL_PERIOD_S = 0.5


BARRIER_TIMEOUT_S = 900.0
"""Concurrent workers wait at most this long for each other to finish their warm-up."""


@dataclass(frozen=True)
class RunSpec:
    engine: Literal["sb3", "fast"]
    flags: dict[str, Any]
    """TrainConfig fields that pick this configuration (as the production script's flags would)."""
    what: str
    pixels: bool = True


RUNS = {
    "step0-sb3": RunSpec("sb3", {"replay": "sb3"}, "stock SB3, Step 0: MultiInputPolicy, NatureCNN, DrQ, HER"),
    "step2-sb3": RunSpec("sb3", {"critic_encoder": True, "drq": False, "replay": "sb3"},
                         "stock SB3, Step 2: DrQv2SACPolicy, ManipulationCNN, HER"),
    "step2-fast": RunSpec("fast", {"critic_encoder": True, "drq": False, "replay": "framestack"},
                          "FastSAC, Step 2, frame-once replay"),
    "state-sb3": RunSpec("sb3", {"full_state": True, "replay": "sb3"}, "stock SB3, full-state Push, HER",
                         pixels=False),
    "state-fast": RunSpec("fast", {"full_state": True, "replay": "framestack"},
                          "FastSAC, full-state Push, device HER draw", pixels=False),
    "state-fast-sb3replay": RunSpec("fast", {"full_state": True, "replay": "sb3"},
                                    "FastSAC, full-state Push, SB3 HER buffer (host draw)", pixels=False),
}


GPU_RUNS = ("step0-sb3", "step2-sb3", "step2-fast")


CPU_RUNS = ("state-sb3", "state-fast", "state-fast-sb3replay")


REFERENCE_RUN = {True: "step0-sb3", False: "state-sb3"}
"""The stock run each row's speed-up is measured against: Step 0 for pixels, full-state SB3 for the proxy."""


@dataclass
class Measurement:
    """One process's job (sent to it as JSON)."""

    run: str
    n_envs: int
    batch_size: int
    precision: Literal["fp32", "bf16"]
    device: str
    seed: int
    learning_starts: int
    warmup_steps: int
    seconds: float
    max_steps: int
    train_only_updates: int
    buffer_size: int
    overlap: bool
    torch_threads: int
    barrier_dir: str = ""
    barrier_count: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class _StopAfter:
    """An SB3 callback (built lazily: SB3 imports stay in the worker) that ends learn() after ``seconds``."""

    @staticmethod
    def make(seconds: float) -> Any:
        from stable_baselines3.common.callbacks import BaseCallback

        class StopAfter(BaseCallback):
            def _on_training_start(self) -> None:
                self.deadline = time.perf_counter() + seconds

            def _on_step(self) -> bool:
                return time.perf_counter() < self.deadline

        return StopAfter()


class GpuUtilization:
    """Samples ``nvidia-smi`` utilization.gpu in a thread; ``mean`` is None where nvidia-smi does not answer."""

    def __init__(self, device_index: int) -> None:
        self.device_index = device_index
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        command = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                   "-i", str(self.device_index)]
        while not self._stop.is_set():
            try:
                answer = subprocess.run(command, capture_output=True, text=True, timeout=5)
                self.samples.append(float(answer.stdout.strip().splitlines()[0]))
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                return
            self._stop.wait(GPU_UTIL_PERIOD_S)

    def __enter__(self) -> GpuUtilization:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def _wait_for_peers(measurement: Measurement) -> None:
    if measurement.barrier_count <= 1:
        return
    barrier = Path(measurement.barrier_dir)
    (barrier / f"ready_{measurement.seed}").touch()
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while len(list(barrier.glob("ready_*"))) < measurement.barrier_count:
        if time.monotonic() > deadline:
            raise TimeoutError("the other concurrent benchmark processes did not finish their warm-up")
        time.sleep(0.05)


def _synchronize(device: th.device) -> None:
    if device.type == "cuda":
        th.cuda.synchronize(device)


def bytes_per_transition(model: Any) -> float:
    """Replay bytes per stored transition, measured on the allocated arrays (and the engine's device copy)."""
    from ch09.engine.framestack_replay import FrameStackHerReplayBuffer
    from ch09.engine.memory import allocated_bytes_per_transition

    buffer = model.replay_buffer
    per_row = float(allocated_bytes_per_transition(buffer))
    if not isinstance(buffer, FrameStackHerReplayBuffer):
        return per_row  # SB3: one row is one transition
    engine = getattr(model, "_engine", None)
    if engine is not None and engine.view is not None:
        per_row += engine.view.device_bytes / (buffer.buffer_size * buffer.n_envs)
    spec = model.get_env().get_attr("spec", indices=[0])[0]
    episode_steps = spec.max_episode_steps if spec is not None and spec.max_episode_steps else 50
    return per_row * (episode_steps + 1) / episode_steps  # one extra row per episode: its reset frame


def measure(measurement: Measurement) -> dict[str, Any]:
    """Build, warm up, time: the job of one worker process."""
    from ch09 import experiment  # SB3, MuJoCo and the experiment load in the measuring process only
    from ch09.engine.fast_sac import FastSAC
    from ch09.run.vec_env import make_vec_env

    th.set_num_threads(measurement.torch_threads)
    spec = RUNS[measurement.run]
    cfg = experiment.TrainConfig(
        seed=measurement.seed, n_envs=measurement.n_envs, batch_size=measurement.batch_size,
        buffer_size=measurement.buffer_size, learning_starts=measurement.learning_starts,
        device=measurement.device, engine=spec.engine, precision=measurement.precision, **spec.flags)
    cfg = experiment.resolve_config(cfg)
    env_fns: list[Callable[[], gym.Env]] = [experiment.env_factory(cfg, in_worker=cfg.n_envs > 1)
                                            for _ in range(cfg.n_envs)]
    env = make_vec_env(env_fns, worker_timeout=cfg.worker_timeout)
    try:
        model = experiment.build_agent(cfg, env)  # SAC or FastSAC, as `train --engine ...` builds it
        if measurement.overlap and isinstance(model, FastSAC):
            model.overlap_collection = True  # FastSAC's option (SAC has none); not a `train` flag
        device = model.device
        # SB3 types learn()'s log_interval int, but hands it to collect_rollouts, which takes None (no episode logs)
        model.learn(measurement.learning_starts + measurement.warmup_steps,
                    log_interval=None)  # type: ignore[arg-type]
        _wait_for_peers(measurement)

        _synchronize(device)
        steps_before, updates_before = model.num_timesteps, model._n_updates
        with GpuUtilization(device.index or 0) as utilization:
            start = time.perf_counter()
            model.learn(measurement.max_steps, callback=_StopAfter.make(measurement.seconds),
                        reset_num_timesteps=False, log_interval=None)  # type: ignore[arg-type]  # (as above)
            _synchronize(device)
            seconds = time.perf_counter() - start
        steps, updates = model.num_timesteps - steps_before, model._n_updates - updates_before

        train_only = None
        if measurement.train_only_updates > 0:
            model.train(gradient_steps=1, batch_size=measurement.batch_size)  # any lazy set-up out of the timing
            _synchronize(device)
            start = time.perf_counter()
            model.train(gradient_steps=measurement.train_only_updates, batch_size=measurement.batch_size)
            _synchronize(device)
            train_only = measurement.train_only_updates / (time.perf_counter() - start)
        engine = getattr(model, "_engine", None)
        graph_status = getattr(model, "graph_status", None)  # FastSAC only
        return {
            **asdict(measurement),
            "engine": spec.engine,
            "steps": steps,
            "updates": updates,
            "seconds": seconds,
            "env_steps_per_s": steps / seconds,
            "updates_per_s": updates / seconds,
            "train_only_updates_per_s": train_only,
            "peak_gpu_memory_bytes": th.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "bytes_per_transition": bytes_per_transition(model),
            "gpu_utilization_percent": utilization.mean,
            "cuda_graph": asdict(graph_status) if graph_status is not None else None,
            "device_sampler": bool(engine is not None and engine.view is not None),
        }
    finally:
        env.close()
