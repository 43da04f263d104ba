"""How fast an agent of the experiment trains: one measurement, in the process that calls ``measure``.

``scripts/bench_train.py`` runs each measurement in a process of its own (and several side by side) and prints the
table; ``selftest`` takes a short speed sample with the same function. What a measurement is:

| piece             | what it holds                                                                          |
|-------------------|----------------------------------------------------------------------------------------|
| ``RUNS``          | the configurations by name (stock SB3 Step 0 / Step 2, FastSAC Step 2, full-state)     |
| ``Measurement``   | one process's job: run, envs, batch, precision, device, budgets                        |
| ``PhaseClock``    | where the timed seconds go: updates (host, GPU), env steps, the rest                   |
| ``measure``       | build the agent as ``train`` does, warm up, time training (and the updates alone)      |
"""

from __future__ import annotations

import bisect
import functools
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
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
    frames_in_ram: bool = False
    """train's --frames-in-ram (a pixel run on the frame-stack buffer only)."""
    profile_updates: int = 0
    """Eager FastSAC gradient steps timed by part of the step after the rest (``profile_update``); 0: none."""


def stop_after(seconds: float) -> Any:
    """An SB3 callback that ends learn() ``seconds`` after it starts (SB3 is imported here: in the worker only)."""
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


class PhaseClock:
    """Where the seconds of timed training go, per phase, each second counted once (exclusive time).

    ``with PhaseClock(model) as clock:`` wraps, on the instances, the method that runs the gradient steps
    (``FastSAC._train_now``, which also runs the updates an overlapped collection defers; ``SAC.train`` for stock
    SB3) and the vec env's ``step_async`` / ``step_wait`` (the envs simulating and rendering, or waiting for their
    worker processes). ``phases_ms(steps)`` gives milliseconds per env step:

    | phase          | what                                                                                  |
    |----------------|---------------------------------------------------------------------------------------|
    | ``train_ms``   | host time inside the update calls (Python, kernel launches or one graph replay)        |
    | ``train_gpu_ms`` | GPU time of those calls: CUDA events around each, on the current stream (None off CUDA) |
    | ``env_ms``     | host time inside the env step                                                         |
    | ``rest_ms``    | the rest: the policy's action, the buffer's add, SB3's bookkeeping; on CUDA also the   |
    |                | wait for queued updates, since the action is read back to the host                     |

    On a GPU, ``train_gpu_ms`` near ``1000 / env steps/s`` means the GPU is the bottleneck; far below it, the host is.
    """

    def __init__(self, model: Any) -> None:
        from ch09.engine.fast_sac import FastSAC

        self.device: th.device = model.device
        self.env = model.get_env()
        self.model = model
        self.train_method = "_train_now" if isinstance(model, FastSAC) else "train"
        self.seconds: dict[str, float] = {"train": 0.0, "env": 0.0}
        self._events: list[tuple[th.cuda.Event, th.cuda.Event]] = []
        self._stack: list[str] = []
        self._since = 0.0
        self._total = 0.0
        self._started = 0.0

    def _enter(self, phase: str) -> None:
        now = time.perf_counter()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._since
        self._stack.append(phase)
        self._since = now

    def _exit(self) -> None:
        now = time.perf_counter()
        self.seconds[self._stack.pop()] += now - self._since
        self._since = now

    def _timed(self, phase: str, method: Callable[..., Any]) -> Callable[..., Any]:
        on_cuda = phase == "train" and self.device.type == "cuda"

        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._enter(phase)
            if on_cuda:
                start, end = th.cuda.Event(enable_timing=True), th.cuda.Event(enable_timing=True)
                start.record()
            try:
                return method(*args, **kwargs)
            finally:
                if on_cuda:
                    end.record()
                    self._events.append((start, end))
                self._exit()

        return timed

    def __enter__(self) -> PhaseClock:
        self.model.__dict__[self.train_method] = self._timed("train", getattr(self.model, self.train_method))
        for name in ("step_async", "step_wait"):
            self.env.__dict__[name] = self._timed("env", getattr(self.env, name))
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        _synchronize(self.device)  # every recorded event has happened
        self._total = time.perf_counter() - self._started
        del self.model.__dict__[self.train_method]
        for name in ("step_async", "step_wait"):
            del self.env.__dict__[name]

    def phases_ms(self, steps: int) -> dict[str, float | None]:
        """Milliseconds per env step of each phase over the timed window."""
        per_step = 1000.0 / max(steps, 1)
        gpu = sum(start.elapsed_time(end) for start, end in self._events) / 1000.0 if self._events else None
        return {
            "train_ms": self.seconds["train"] * per_step,
            "train_gpu_ms": gpu * per_step if gpu is not None else None,
            "env_ms": self.seconds["env"] * per_step,
            "rest_ms": (self._total - self.seconds["train"] - self.seconds["env"]) * per_step,
        }


PHASES = ("train_ms", "train_gpu_ms", "env_ms", "rest_ms")


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


def profile_update(engine: Any, updates: int) -> dict[str, float]:
    """Milliseconds per gradient step spent in each part of FastSAC's step (``UPDATE_SECTIONS``), over ``updates``
    eager steps of the engine under torch.profiler. On CUDA the kernel time each part launched: what a captured
    graph replays, without the launch gaps of eager steps; on a CPU, host time."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = engine.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])]) as profiler:
        engine.eager_steps_in_sections(updates)
        _synchronize(engine.device)
    return section_ms(profiler.events(), on_cuda, updates)


def section_ms(events: Any, on_cuda: bool, updates: int) -> dict[str, float]:
    """Milliseconds per step of each section, from the profiler's events.

    A section is the host-side range of its name; on CUDA it is charged every kernel (and copy) launched while the
    range was open, FROM ANY THREAD: the autograd engine runs a CUDA backward on a thread of its own, so the
    backward's kernels are not children of the range, but ``backward()`` blocks inside it until they are launched.
    """
    from ch09.engine.fast_sac import UPDATE_SECTIONS

    cpu = th.autograd.DeviceType.CPU
    windows = sorted((event.time_range.start, event.time_range.end, event.name) for event in events
                     if event.name in UPDATE_SECTIONS and event.device_type == cpu)
    microseconds = dict.fromkeys(UPDATE_SECTIONS, 0.0)
    if not on_cuda:
        for start, end, name in windows:
            microseconds[name] += end - start
    else:
        starts = [start for start, _, _ in windows]
        for event in events:
            if event.device_type != cpu or not event.self_device_time_total:
                continue
            index = bisect.bisect_right(starts, event.time_range.start) - 1
            if index >= 0 and event.time_range.start < windows[index][1]:
                microseconds[windows[index][2]] += event.self_device_time_total
    return {name: value / 1000.0 / max(updates, 1) for name, value in microseconds.items()}


def replay_bytes_per_transition(model: Any, episode_steps: int) -> float:
    """Replay bytes per stored transition, measured on the allocated arrays (and the engine's device copy), when
    the buffer is full of ``episode_steps``-step episodes."""
    from ch09.engine.framestack_replay import FrameStackHerReplayBuffer, rows_per_transition
    from ch09.engine.memory import allocated_bytes_per_transition

    buffer = model.replay_buffer
    per_row = float(allocated_bytes_per_transition(buffer))
    if not isinstance(buffer, FrameStackHerReplayBuffer):
        return per_row  # SB3: one row is one transition
    engine = getattr(model, "_engine", None)
    if engine is not None and engine.view is not None:
        per_row += engine.view.device_bytes / (buffer.buffer_size * buffer.n_envs)
    return per_row * rows_per_transition(episode_steps)


def measure(measurement: Measurement, measured: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Build, warm up, time: the job of one worker process. ``measured`` is handed the result before the profile
    (``profile_updates``) starts, so a profile that never returns cannot take the speeds with it."""
    from stable_baselines3.common.logger import Logger

    from ch09 import experiment  # SB3, MuJoCo and the experiment load in the measuring process only
    from ch09.run.vec_env import make_vec_env

    th.set_num_threads(measurement.torch_threads)
    spec = RUNS[measurement.run]
    cfg = experiment.TrainConfig(
        seed=measurement.seed, n_envs=measurement.n_envs, batch_size=measurement.batch_size,
        buffer_size=measurement.buffer_size, learning_starts=measurement.learning_starts,
        device=measurement.device, engine=spec.engine, precision=measurement.precision,
        overlap_collection=measurement.overlap, frames_in_ram=measurement.frames_in_ram, **spec.flags)
    cfg = experiment.resolve_config(cfg)
    experiment.check_first_sample(cfg)  # train's refusal, as one sentence, before the HER buffer would raise mid-run
    env_fns: list[Callable[[], gym.Env]] = [experiment.env_factory(cfg) for _ in range(cfg.n_envs)]
    env = make_vec_env(env_fns, worker_timeout=cfg.worker_timeout)
    try:
        model = experiment.build_agent(cfg, env)  # SAC or FastSAC, as `train --engine ...` builds it
        model.set_logger(Logger(None, []))  # nothing to log; SB3's own would leave an empty /tmp/SB3-<time> folder
        device = model.device
        # SB3 types learn()'s log_interval int, but hands it to collect_rollouts, which takes None (no episode logs)
        model.learn(measurement.learning_starts + measurement.warmup_steps,
                    log_interval=None)  # type: ignore[arg-type]
        _wait_for_peers(measurement)

        _synchronize(device)
        steps_before, updates_before = model.num_timesteps, model._n_updates
        with GpuUtilization(device.index or 0) as utilization, PhaseClock(model) as clock:
            start = time.perf_counter()
            model.learn(measurement.max_steps, callback=stop_after(measurement.seconds),
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
        # read before the profile: its eager steps allocate their own tensors beside the captured graph's pool
        peak_memory = th.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        result = {
            **asdict(measurement),
            "engine": spec.engine,
            "steps": steps,
            "updates": updates,
            "seconds": seconds,
            "env_steps_per_s": steps / seconds,
            "updates_per_s": updates / seconds,
            **clock.phases_ms(steps),
            "train_only_updates_per_s": train_only,
            "update_sections_ms": None,
            "update_sections_error": None,
            "peak_gpu_memory_bytes": peak_memory,
            "bytes_per_transition": replay_bytes_per_transition(model, experiment.episode_steps(cfg.env)),
            "gpu_utilization_percent": utilization.mean,
            "cuda_graph": asdict(graph_status) if graph_status is not None else None,
            "device_sampler": bool(engine is not None and engine.view is not None),
            "cudnn_deterministic": th.backends.cudnn.deterministic,  # SB3's seeding sets it on a CUDA device
        }
        if engine is not None and measurement.profile_updates > 0:
            if measured is not None:
                measured(result)
            try:  # after the timing, and never at the cost of the row: a profiler that fails is a note in it
                result["update_sections_ms"] = profile_update(engine, measurement.profile_updates)
            except Exception as error:  # noqa: BLE001 - any failure of the profiler is reported, not raised
                result["update_sections_error"] = f"{type(error).__name__}: {error}".splitlines()[0]
        return result
    finally:
        env.close()
