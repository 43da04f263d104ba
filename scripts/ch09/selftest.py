"""``ch09_pixel_push.py selftest``: what a reader checks on their own machine before a multi-day run.

A day-long run that dies in its first hour, or silently trains ten times slower than it should, costs more
than any check. ``selftest`` takes under two minutes and runs each piece of the main job once, small, on the
reader's machine, with the same build path ``train`` uses (``build_agent`` on the Experiment Card's flags):

| check                | what it runs and measures                                         | passes when              |
|----------------------|-------------------------------------------------------------------|--------------------------|
| device               | torch, the CUDA device and its memory; one small computation      | the device computes      |
| renderer             | FetchPush-v4 through ``make_fetch_env``: MUJOCO_GL, GL renderer,  | (12, 84, 84) uint8       |
|                      | step + render steps/s for ``--render-seconds``                    | frames rendered at 84x84 |
| replay memory        | ``train``'s own memory preflight for --buffer-size and --n-envs   | every part fits          |
| bf16 vs fp32 losses  | the same gradient steps (seed, buffer, draws) in both precisions  | each loss within bound   |
| captured == eager    | FastSAC's verdict on its CUDA graph after those steps             | ``graph_status.state``   |
|                      | (``model.graph_status``), then one more step taken both ways      | is "captured", and that  |
|                      | (``model.replay_deviation()``); CUDA only                         | step within its bound    |
| speed sample         | stock SB3 vs FastSAC, --speed-seconds each (bench_train's         | both engines train       |
|                      | ``measure``): pixels on CUDA, the full-state proxy on a CPU       |                          |
| Experiment Card time | 5M env steps at the measured FastSAC rate; CUDA only              | a rate was measured      |

It prints one table, one line naming what it skipped and why (on a CPU-only machine: the CUDA graph and the
projection), and writes every figure, every check's result and the versions to a JSON report (``--out``) that
a reader attaches to a problem report; the report is rewritten as each check ends, so a selftest stopped midway
still leaves the finished checks (``"complete": false``). Exit code 1 when a check fails; a bad flag is one
sentence, exit 2.
A check that raises is reported as failed with its traceback in the JSON: one broken piece does not hide
what the others found.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch as th
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.vec_env import DummyVecEnv

from ch09 import experiment
from ch09.errors import UserError
from ch09.experiment import TrainConfig
from ch09.run.artifacts import REPO_ROOT, git_commit, now_iso, package_versions, write_json
from ch09.run.callbacks import human_duration
from ch09.run.validation import check_device, check_writable_folder, positive_seconds
from lab_support import free_memory, renderer_import_error

SELFTEST_FORMAT = "ch09-selftest-v1"
"""The ``format`` field of the JSON report."""
EXPERIMENT_CARD_STEPS = 5_000_000
"""Env steps of the Experiment Card run (README, Training, Step 3): what the projection is for."""
EXPERIMENT_CARD_FLAGS: dict[str, Any] = {"critic_encoder": True, "drq": False}
"""The Experiment Card's flags besides the defaults (``--buffer-size`` and ``--n-envs`` come from the command)."""
CARD_TIME_CHECK = f"Experiment Card time ({EXPERIMENT_CARD_STEPS / 1e6:g}M steps)"
SLOW_RENDER_STEPS_PER_S = 15.0
"""Below this, step + render is slow enough to dominate a run (README, Troubleshooting rendering)."""

LOSS_CHECK_BATCH = 8
"""Batch of the bf16-vs-fp32 steps: small, so they take seconds on a CPU too (the comparison needs no big batch)."""
LOSS_CHECK_LEARNING_STARTS = 100
"""Random steps collected before those updates: two complete 50-step episodes, so HER has futures to draw."""
LOSS_CHECK_BUFFER_SIZE = 1_000
"""Replay capacity of those models: room for the collected steps and the updates' own."""
LOSS_CHECK_EXTRA_STEPS = 5
"""Gradient steps after the CUDA-graph warm-up: the graph is captured, verified and replayed several times."""
BF16_LOSS_RTOL = 10 * 2**-8
"""Relative bound on |bf16 loss - fp32 loss|: bf16 keeps 8 significant bits, so one rounding moves a value by at
most 2^-8 of itself; the bound allows ten such roundings accumulated through the encoder passes. The losses
themselves are computed in float32 in both precisions, so a larger gap is a fault of the bf16 path, not rounding."""
BF16_LOSS_ATOL = 1e-3
"""Absolute slack for losses near zero (the entropy-coefficient loss starts at exactly 0)."""
COMPARED_LOSSES = ("train/critic_loss", "train/actor_loss", "train/ent_coef_loss")

SPEED_RUNS = {"cuda": ("step0-sb3", "step2-fast"), "cpu": ("state-sb3", "state-fast")}
"""bench_train runs of the speed sample: pixels Step 0 stock vs Step 2 FastSAC on CUDA; on a CPU, where a pixel
update takes seconds, the full-state pair (bench_train's CPU proxy)."""
SPEED_BATCH = 256
"""The Experiment Card's batch."""
SPEED_LEARNING_STARTS = 100
"""Random steps per env before the sample's updates (two complete episodes each: the HER buffers sample only
finished ones)."""
SPEED_WARMUP_STEPS = 20
"""Trained steps before the timing starts: cuDNN autotuning and the CUDA-graph capture stay out of it."""
SPEED_BUFFER_SIZE = 5_000
"""Replay capacity of the speed sample (SB3's pixel buffer: ~0.85 GB of RAM at this size)."""

Status = Literal["pass", "fail", "skip"]


@dataclass
class CheckResult:
    """One row of the table and one entry of the report."""

    name: str
    status: Status
    summary: str
    """What it measured (pass or fail) or why it was skipped: one line."""
    figures: dict[str, Any] = field(default_factory=dict)
    """Every number the check measured, for the JSON report."""
    seconds: float | None = None
    """Wall time of the check (on the first row of a check that gives several)."""


@dataclass
class SelftestConfig:
    """Check this machine before a multi-day run, in under 2 minutes: renderer, device, whether the buffer fits,
    the CUDA graph, bf16 against fp32, a speed sample; one table, a JSON report, exit code 1 if a check fails."""

    device: str = "auto"
    """Torch device to check, as `train --device`: auto (cuda if available), cuda:1, cpu."""
    buffer_size: int = 500_000
    """The --buffer-size you will train with: the memory check runs train's preflight on it."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """The --precision you will train with: its CUDA graph is checked, and the speed sample uses it."""
    n_envs: int = 1
    """The --n-envs you will train with (memory check and speed sample)."""
    overlap_collection: bool = False
    """The --overlap-collection you will train with: the speed sample's FastSAC run uses it."""
    frames_in_ram: bool = False
    """The --frames-in-ram you will train with: the memory check and the speed sample's FastSAC run use it."""
    out: Path = REPO_ROOT / "results" / "selftest.json"
    """Where the JSON report goes (versions, device, every figure and result): attach it to a problem report."""
    render_seconds: float = 3.0
    """Seconds of step + render timed by the renderer check."""
    speed_seconds: float = 5.0
    """Seconds each engine trains in the speed sample."""


# ======================================================================================================
# The checks, each returning one CheckResult
# ======================================================================================================
def check_device_works(device: th.device) -> CheckResult:
    """torch, the device and its memory; a small computation proves the device answers."""
    ram = free_memory("cpu")  # the container's limit counts (cgroups), as in train's preflight
    figures: dict[str, Any] = {"torch": th.__version__, "torch_cuda": th.version.cuda, "device": str(device),
                               "cpu_count": os.cpu_count(), "ram_free_bytes": ram.bytes_available,
                               "ram_free_limited_by": ram.limited_by}
    if device.type == "cuda":
        free, total = th.cuda.mem_get_info(device)
        figures |= {"gpu": th.cuda.get_device_name(device), "gpu_memory_total_bytes": int(total),
                    "gpu_memory_free_bytes": int(free)}
    probe = th.ones(256, 256, device=device)
    result = float((probe @ probe).sum())  # a host read: a broken CUDA context raises here
    if result != 256.0**3:
        return CheckResult("device", "fail", f"256x256 matmul of ones gave {result:g}, not {256**3:,}", figures)
    ram_free = f"{figures['ram_free_bytes'] / 1e9:.1f} GB RAM free"
    if device.type == "cuda":
        return CheckResult("device", "pass", f"{figures['gpu']} ({device}), {total / 1e9:.1f} GB, "
                           f"{free / 1e9:.1f} GB free; {ram_free}; torch {th.__version__}", figures)
    return CheckResult("device", "pass", f"CPU only, {os.cpu_count()} cores, {ram_free}; torch {th.__version__}: "
                       "pixel training needs a CUDA GPU", figures)


def gl_renderer_name() -> str:
    """The OpenGL renderer of the current context (e.g. llvmpipe: Mesa on the CPU, or the NVIDIA GPU)."""
    try:
        from OpenGL import GL

        name = GL.glGetString(GL.GL_RENDERER)
    except Exception as exc:  # noqa: BLE001 -- a name for the report; rendering itself is checked by the caller
        return f"unknown ({type(exc).__name__})"
    return name.decode(errors="replace") if name else "unknown"


def check_renderer(seconds: float) -> CheckResult:
    """FetchPush-v4 frames through the project's ``make_fetch_env``: native 84x84, and how fast they come."""
    from lab_support import close_render_context, make_render_context_current
    from pixel_wrapper import FRAME_STACK, IMAGE_SIZE, PIXEL_KEY, make_fetch_env

    backend = os.environ.get("MUJOCO_GL", "<unset>")
    env = make_fetch_env("FetchPush-v4")  # native 84x84, the goal marker hidden: the training env
    try:
        obs, _ = env.reset(seed=0)
        make_render_context_current(env)
        # Imported only now: make_fetch_env has loaded it (and raised the clear error if MuJoCo cannot start).
        from gymnasium_robotics.envs.robot_env import MujocoRobotEnv

        robot = env.unwrapped
        assert isinstance(robot, MujocoRobotEnv), "FetchPush-v4 is a MuJoCo robot env"
        renderer = robot.mujoco_renderer
        render_size = (renderer.width, renderer.height)
        frames = obs[PIXEL_KEY]
        figures: dict[str, Any] = {"mujoco_gl": backend, "gl_renderer": gl_renderer_name(),
                                   "render_size": list(render_size), "frame_shape": list(frames.shape),
                                   "frame_dtype": str(frames.dtype)}
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            env.step(env.action_space.sample())
            steps += 1
        figures["steps_per_s"] = steps / (time.perf_counter() - start)
    finally:
        close_render_context(env)
    expected = (FRAME_STACK * 3, IMAGE_SIZE, IMAGE_SIZE)
    if tuple(frames.shape) != expected or frames.dtype != np.uint8 or render_size != (IMAGE_SIZE, IMAGE_SIZE):
        return CheckResult("renderer", "fail", f"frames {tuple(frames.shape)} {frames.dtype} rendered at "
                           f"{render_size}, expected {expected} uint8 rendered at {IMAGE_SIZE}x{IMAGE_SIZE}", figures)
    speed = f"{figures['steps_per_s']:.0f} steps/s (step + render, 1 process)"
    if figures["steps_per_s"] < SLOW_RENDER_STEPS_PER_S:
        speed += " -- slow, see the README's Troubleshooting rendering"
    return CheckResult("renderer", "pass", f"MUJOCO_GL={backend}, {figures['gl_renderer']}, native "
                       f"{IMAGE_SIZE}x{IMAGE_SIZE}: {speed}", figures)


def check_memory(card: TrainConfig) -> CheckResult:
    """``train``'s own preflight for this buffer (the one memory reader of the project), its lines kept."""

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            plan = experiment.check_replay_memory(card, *experiment.training_spaces(card))
    except UserError as exc:
        return CheckResult("replay memory", "fail", str(exc),
                           {"buffer_size": card.buffer_size, "preflight": printed.getvalue().splitlines()})
    parts = "; ".join(f"{need['what']} {need['items'] * need['bytes_per_item'] / 1e9:.1f} GB on {need['device']} "
                      f"({need['free_bytes'] / 1e9:.1f} GB free)" for need in plan)
    return CheckResult("replay memory", "pass", f"--buffer-size {card.buffer_size:,} fits: {parts}",
                       {"buffer_size": card.buffer_size, "n_envs": card.n_envs, "parts": plan,
                        "preflight": printed.getvalue().splitlines()})


class _RecordedValues(KVWriter):
    """An SB3 logger output that keeps every dump in memory: the losses as SB3's logger receives them."""

    def __init__(self) -> None:
        self.dumps: list[dict[str, Any]] = []

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        self.dumps.append(dict(key_values))

    def close(self) -> None:
        pass


@dataclass
class TrainedSample:
    """A tiny FastSAC on the device after a few gradient steps, and the losses SB3 logged for each."""

    model: Any
    losses: list[dict[str, float]]


def train_tiny_fastsac(card: TrainConfig, precision: Literal["fp32", "bf16"], device: th.device,
                       updates: int) -> TrainedSample:
    """Build FastSAC as ``train`` does (Experiment Card flags, small buffer and batch), collect two episodes of
    random steps, then run ``updates`` gradient steps one ``train()`` call at a time, reading each one's
    losses through SB3's logger. The same seed gives the same weights, buffer and random draws in any precision."""
    import dataclasses


    cfg = dataclasses.replace(card, precision=precision, engine="fast", n_envs=1, device=str(device),
                              buffer_size=LOSS_CHECK_BUFFER_SIZE, batch_size=LOSS_CHECK_BATCH,
                              learning_starts=LOSS_CHECK_LEARNING_STARTS)
    env = DummyVecEnv([experiment.env_factory(cfg)])
    try:
        model = experiment.build_agent(cfg, env)
        recorded = _RecordedValues()
        model.set_logger(Logger(None, [recorded]))
        # Random steps only: no update yet. (SB3 types learn()'s log_interval int; its collect_rollouts takes None.)
        model.learn(LOSS_CHECK_LEARNING_STARTS, log_interval=None)  # type: ignore[arg-type]
        th.manual_seed(cfg.seed)  # the same draws (batch indices, HER goals, noise) in every precision
        losses = []
        for _ in range(updates):
            model.train(gradient_steps=1, batch_size=cfg.batch_size)
            model.dump_logs()
            losses.append({key: float(recorded.dumps[-1][key]) for key in COMPARED_LOSSES})
    finally:
        env.close()
    return TrainedSample(model, losses)


def compare_losses(fp32: list[dict[str, float]], bf16: list[dict[str, float]]) -> CheckResult:
    """Each logged loss of the bf16 steps against the fp32 steps, within
    ``BF16_LOSS_ATOL + BF16_LOSS_RTOL * |fp32 loss|``."""
    gaps = []  # (gap as a fraction of the bound, loss, update index)
    for step, (reference, candidate) in enumerate(zip(fp32, bf16, strict=True)):
        for key in COMPARED_LOSSES:
            bound = BF16_LOSS_ATOL + BF16_LOSS_RTOL * abs(reference[key])
            gaps.append((abs(candidate[key] - reference[key]) / bound, key, step))
    finite = all(math.isfinite(loss[key]) for loss in (*fp32, *bf16) for key in COMPARED_LOSSES)
    excess, key, step = max(gaps, key=lambda gap: math.inf if math.isnan(gap[0]) else gap[0])
    figures = {"updates": len(fp32), "batch_size": LOSS_CHECK_BATCH, "rtol": BF16_LOSS_RTOL, "atol": BF16_LOSS_ATOL,
               "worst_fraction_of_bound": excess, "worst_loss": key, "worst_step": step,
               "fp32_losses": fp32, "bf16_losses": bf16}
    where = (f"{key.removeprefix('train/')} at update {step + 1}: fp32 {fp32[step][key]:.5g}, "
             f"bf16 {bf16[step][key]:.5g}")
    if not finite or not excess <= 1.0:
        return CheckResult("bf16 vs fp32 losses", "fail", f"{where}, {excess:.2f}x the bound "
                           f"({BF16_LOSS_ATOL:g} + {BF16_LOSS_RTOL:.3f} x |fp32|)", figures)
    return CheckResult("bf16 vs fp32 losses", "pass", f"{len(fp32)} updates, largest gap {excess:.2g}x the bound "
                       f"({where})", figures)


def check_graph_status(model: Any, device: th.device) -> CheckResult:
    """captured == eager: FastSAC's verdict at the capture (``model.graph_status``: state, reason, max_deviation),
    then one more gradient step taken both ways (``model.replay_deviation()``), so that a replay gone wrong after
    the capture shows too. Passes only when the step runs captured and both are within GRAPH_VERIFY_RTOL."""
    from ch09.engine.fast_sac import GRAPH_VERIFY_RTOL

    name = "captured == eager"
    if device.type != "cuda":
        return CheckResult(name, "skip", "no CUDA device: the update is captured as a CUDA graph only on CUDA")
    status = getattr(model, "graph_status", None)
    if status is None:
        return CheckResult(name, "fail", "this FastSAC reports no graph_status, so its capture is unverified")
    figures = {"state": status.state, "reason": status.reason, "max_deviation": status.max_deviation}
    if status.state == "captured":
        late, tolerance = model.replay_deviation(), GRAPH_VERIFY_RTOL[model.precision]
        finite = math.isfinite(late)  # inf: a replayed value was not finite (JSON gets null)
        figures |= {"late_replay_deviation": late if finite else None, "tolerance": tolerance}
        if not late <= tolerance:
            how = (f"differs from the eager step by {late:.2g} of the step's size" if finite
                   else "gave non-finite values")
            return CheckResult(name, "fail", f"a replay {LOSS_CHECK_EXTRA_STEPS} steps after the capture {how} "
                               f"(tolerance {tolerance:g}); train with --no-cuda-graph (same losses, slower) and "
                               "report it", figures)
        at_capture = "n/a" if status.max_deviation is None else f"{status.max_deviation:.2g}"
        return CheckResult(name, "pass", f"the captured step matches an eager one at its capture and "
                           f"{LOSS_CHECK_EXTRA_STEPS} steps later (deviation {at_capture}, then {late:.2g})", figures)
    if status.state == "off":
        return CheckResult(name, "skip", f"the CUDA graph is turned off ({status.reason})", figures)
    return CheckResult(name, "fail", f"CUDA graph {status.state}: {status.reason}", figures)


def check_precisions(card: TrainConfig, device: th.device, chosen: str) -> list[CheckResult]:
    """bf16 against fp32 on the same steps, then the CUDA graph's verdict for the chosen precision."""
    from ch09.engine.fast_sac import GRAPH_WARMUP_STEPS

    updates = GRAPH_WARMUP_STEPS + LOSS_CHECK_EXTRA_STEPS
    samples = {precision: train_tiny_fastsac(card, precision, device, updates) for precision in ("fp32", "bf16")}
    return [compare_losses(samples["fp32"].losses, samples["bf16"].losses),
            check_graph_status(samples[chosen].model, device)]


def check_speed(card: TrainConfig, device: th.device, seconds: float) -> list[CheckResult]:
    """Stock SB3 vs FastSAC, timed by bench_train's own measurement, and the Experiment Card at the fast rate."""
    from ch09.benchmark import RUNS, Measurement, measure

    stock_run, fast_run = SPEED_RUNS["cuda" if device.type == "cuda" else "cpu"]
    rates, measurements = {}, {}
    for run in (stock_run, fast_run):
        result = measure(Measurement(
            run=run, n_envs=card.n_envs, batch_size=SPEED_BATCH,
            precision=card.precision if RUNS[run].engine == "fast" else "fp32", device=str(device), seed=0,
            learning_starts=SPEED_LEARNING_STARTS * card.n_envs, warmup_steps=SPEED_WARMUP_STEPS, seconds=seconds,
            max_steps=10**9, train_only_updates=0, buffer_size=SPEED_BUFFER_SIZE,
            overlap=card.overlap_collection and RUNS[run].engine == "fast",
            frames_in_ram=card.frames_in_ram and RUNS[run].pixels and RUNS[run].flags.get("replay") == "framestack",
            torch_threads=th.get_num_threads()))
        rates[run], measurements[run] = result["env_steps_per_s"], result
    stock, fast = rates[stock_run], rates[fast_run]
    # on a CPU both engines spend the time in the same update math, and a few seconds of each on a shared machine
    # give a ratio of the load, not of the engine: none there (bench_train's rounds measure it)
    speedup = fast / stock if RUNS[fast_run].pixels else None
    figures = {"runs": {run: RUNS[run].what for run in rates}, "env_steps_per_s": rates, "n_envs": card.n_envs,
               "batch_size": SPEED_BATCH, "precision": card.precision,
               "overlap_collection": card.overlap_collection, "frames_in_ram": card.frames_in_ram,
               "seconds_each": seconds,
               "speedup": speedup, "measurements": measurements}  # bench_train's own record of each
    if speedup is not None:
        ratio, proxy = f" ({speedup:.2f}x)", ""
    else:
        ratio, proxy = "", (" (the full-state proxy: both engines train; on a CPU their ratio says nothing of the "
                            "engine, README's CPU table)")
    speed = CheckResult("speed sample", "pass", f"{stock_run} {stock:.1f}, {fast_run} {fast:.1f} env steps/s"
                        f"{ratio}, {card.n_envs} env(s), batch {SPEED_BATCH}{proxy}", figures)
    name = CARD_TIME_CHECK
    if not RUNS[fast_run].pixels:
        return [speed, CheckResult(name, "skip", "no CUDA device: only a pixel rate on a GPU projects the run")]
    seconds_needed = EXPERIMENT_CARD_STEPS / fast
    return [speed, CheckResult(name, "pass", f"~{human_duration(seconds_needed)} at {fast:.1f} env steps/s "
                               f"({fast_run}, {card.precision}, {card.n_envs} env(s))",
                               {"projected_seconds": seconds_needed, "env_steps_per_s": fast})]


# ======================================================================================================
# Running them: one table, one skip line, one JSON report
# ======================================================================================================
def skipped(reason: str, *names: str) -> list[CheckResult]:
    return [CheckResult(name, "skip", reason) for name in names]


def guarded(name: str, check: Callable[[], CheckResult | list[CheckResult]], *names: str) -> list[CheckResult]:
    """The check's results; if it raises, a failed row (the error is the summary, the traceback goes to the
    report) and a skipped row for each further row it would have given, so the checks after it still run."""
    start = time.perf_counter()
    try:
        result = check()
        results = result if isinstance(result, list) else [result]
    except Exception as exc:  # noqa: BLE001 -- reported as a failed check, traceback in the JSON
        summary = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        figures = {"traceback": traceback.format_exc()}
        results = [CheckResult(name, "fail", summary, figures), *skipped(f"{name} failed", *names)]
    results[0].seconds = round(time.perf_counter() - start, 2)
    return results


def validate(cfg: SelftestConfig) -> th.device:
    """The device to check; a bad flag is one sentence (exit code 2) before anything runs."""
    for name in ("buffer_size", "n_envs"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}.")
    positive_seconds("render_seconds", cfg.render_seconds)
    positive_seconds("speed_seconds", cfg.speed_seconds)
    check_device("device", cfg.device)
    out = Path(cfg.out).expanduser()
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; pass the report's file name, e.g. {out / 'selftest.json'}.")
    check_writable_folder("out", out.parent)
    if cfg.device == "auto":
        return th.device("cuda" if th.cuda.is_available() else "cpu")
    return th.device(cfg.device)


def print_report(results: list[CheckResult], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a log file or a pipe: no wrapping inside the rows
    table = Table(title=title, title_justify="left")
    table.add_column("check", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("measured, or why")
    styles = {"pass": "green", "fail": "bold red", "skip": "yellow"}
    for result in results:
        table.add_row(result.name, f"[{styles[result.status]}]{result.status}[/]", result.summary)
    console.print(table)


def exit_status(results: list[CheckResult]) -> int:
    """1 when a check failed, else 0 (a skipped check is not a failure)."""
    return 1 if any(r.status == "fail" for r in results) else 0


def skip_line(results: list[CheckResult]) -> str | None:
    skipped = [f"{r.name} ({r.summary})" for r in results if r.status == "skip"]
    return "skipped: " + "; ".join(skipped) if skipped else None


def selftest_report(cfg: SelftestConfig, out: Path, results: list[CheckResult], elapsed: float,
                    complete: bool, provenance: dict[str, Any]) -> dict[str, Any]:
    """The JSON report; ``complete`` is False while checks are still to run (and stays so in the file of a
    selftest that was stopped before its last check). ``provenance``: the versions and the git commit, read once."""
    return {
        "format": SELFTEST_FORMAT,
        "complete": complete,
        "passed": exit_status(results) == 0 if complete else None,
        "counts": {status: sum(r.status == status for r in results) for status in ("pass", "fail", "skip")},
        "checks": [asdict(r) for r in results],
        "skipped": skip_line(results),
        "config": {**asdict(cfg), "out": str(out)},
        "device": results[0].figures if results else None,
        **provenance,
        "wall_time_s": round(elapsed, 1),
        "created_at": now_iso(),
    }


def run_selftest(cfg: SelftestConfig) -> int:
    """Run every check, print the table, write the report; 1 if a check failed, else 0."""

    device = validate(cfg)
    started = time.perf_counter()
    card = experiment.resolve_config(experiment.TrainConfig(
        **EXPERIMENT_CARD_FLAGS, buffer_size=cfg.buffer_size, n_envs=cfg.n_envs, device=str(device),
        precision=cfg.precision, overlap_collection=cfg.overlap_collection, frames_in_ram=cfg.frames_in_ram))
    switches = "".join(f" --{name.replace('_', '-')}" for name in ("overlap_collection", "frames_in_ram")
                       if getattr(cfg, name))
    print(f"[selftest] {device}, the Experiment Card's flags with --buffer-size {cfg.buffer_size:,} --n-envs "
          f"{cfg.n_envs} --precision {cfg.precision}{switches}: device, renderer, replay memory, bf16 vs fp32, "
          "CUDA graph, speed sample", flush=True)

    out = Path(cfg.out).expanduser().resolve()
    results: list[CheckResult] = []
    provenance = {"versions": package_versions(), "git": git_commit()}  # the same for every rewrite of the report

    def record(rows: list[CheckResult]) -> None:
        """Keep a check's rows, say how it went, and rewrite the report: a selftest stopped by a kill, a
        Ctrl-C or a hang in a later check still leaves what the earlier ones found."""
        results.extend(rows)
        for row in rows:
            took = f" in {row.seconds:.0f} s" if row.seconds is not None else ""
            print(f"[selftest] {row.name}: {row.status}{took}", flush=True)
        write_json(out, selftest_report(cfg, out, results, time.perf_counter() - started, complete=False,
                                        provenance=provenance))

    mujoco_starts = renderer_import_error() is None  # no MuJoCo, no env of any kind
    no_mujoco = "MuJoCo did not start (see the renderer row)"
    record(guarded("device", lambda: check_device_works(device)))
    record(guarded("renderer", lambda: check_renderer(cfg.render_seconds)))
    renders = results[-1].status == "pass"
    if mujoco_starts:
        record(guarded("replay memory", lambda: check_memory(card)))
    else:
        record(skipped(no_mujoco, "replay memory"))
    if renders:
        record(guarded("bf16 vs fp32 losses", lambda: check_precisions(card, device, cfg.precision),
                       "captured == eager"))
    else:
        record(skipped("the renderer failed, and these train on pixels", "bf16 vs fp32 losses",
                       "captured == eager"))
    if device.type == "cuda" and not renders:
        record(skipped("the renderer failed, and the GPU sample trains on pixels", "speed sample",
                       CARD_TIME_CHECK))
    elif not mujoco_starts:
        record(skipped(no_mujoco, "speed sample", CARD_TIME_CHECK))
    else:
        record(guarded("speed sample", lambda: check_speed(card, device, cfg.speed_seconds), CARD_TIME_CHECK))
    elapsed = time.perf_counter() - started
    report = selftest_report(cfg, out, results, elapsed, complete=True, provenance=provenance)
    write_json(out, report)
    counts = report["counts"]
    print_report(results, f"ch09 selftest on {device}")
    if report["skipped"]:
        print(report["skipped"])
    print(f"selftest: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped in {elapsed:.0f} s; "
          f"report {out} (attach it to a problem report)")
    return exit_status(results)
