"""Benchmark: SB3's HerReplayBuffer vs FrameStackHerReplayBuffer on the same pixel transitions.

What it measures, in one run on one machine (compare the ratios; absolute times are noisy):

1. Memory: bytes per transition. SB3 stores obs and next_obs, each a 12x84x84 uint8 stack; ours stores each
   3x84x84 frame once (one row per env step, plus one row per episode for the reset frame).
2. ``add`` time per env step and ``sample`` time per batch of 256 (median of repeats), both buffers fed the
   same synthetic stream of 50-step episodes (random frames stacked exactly as the pixel wrapper stacks them;
   rewards from the real FetchPush ``compute_reward``).
3. End-to-end env steps/s of ``python scripts/ch09_pixel_push.py train`` with ``--replay sb3`` vs
   ``--replay framestack`` at ``--n-envs 1`` and ``4`` (short runs; the figure is the one the script writes
   to its ``.meta.json``).

Run it
------
    bash docker/dev.sh python scripts/bench_replay.py                 # CPU, minutes
    bash docker/dev.sh python scripts/bench_replay.py --device cuda   # buffers on the GPU
    bash docker/dev.sh python scripts/bench_replay.py --quick         # seconds: checks the script works
    bash docker/dev.sh python scripts/bench_replay.py --help          # every option and its default

It prints a table and writes JSON to ``results/bench_replay_<device>.json`` (or ``--out``).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

try:
    from cli_guard import guard_entry_point, parse_with_one_line_errors, run_guarded
except ModuleNotFoundError:  # the project is not installed in this Python: one sentence, not a traceback
    print("error: this project is not installed in this Python; run `pip install -e .` in the repository, or run "
          "the command through `bash docker/dev.sh python ...`.", file=sys.stderr)
    sys.exit(2)  # a mistake the user can fix, as cli_guard would say it (it is what could not be imported)

guard_entry_point(__name__)  # before the heavy imports: a failing import or an early SIGTERM is one line

import numpy as np
import torch as th
import tyro
from gymnasium import spaces
from stable_baselines3.common.vec_env import DummyVecEnv
from stable_baselines3.her.her_replay_buffer import HerReplayBuffer

from ch09.engine.framestack_replay import FrameStackHerReplayBuffer, rows_per_transition
from ch09.engine.memory import allocated_bytes_per_transition
from ch09.run.artifacts import REPO_ROOT
from ch09.run.validation import check_device
from pixel_wrapper import FRAME_STACK, IMAGE_SIZE, PROPRIO_DIM, make_fetch_env, pixel_observation_space

SCRIPTS_DIR = Path(__file__).resolve().parent
FETCH_EPISODE_STEPS = 50
TRAIN_BUFFER_SIZE = 20_000
"""Replay capacity of the end-to-end runs: larger than any run here, small enough for SB3's buffer in RAM."""
TRAIN_TIMEOUT_S = 900.0
GOAL_DIM = 3
ACTION_DIM = 4
FRAME_CHANNELS = 3


@dataclass
class BenchConfig:
    """SB3's HerReplayBuffer vs FrameStackHerReplayBuffer on the same pixel transitions."""

    transitions: int = 6_000
    """env steps fed to each buffer (per env); both hold half, so the second half times add() on a full ring."""
    n_envs: int = 1
    """parallel envs in the synthetic stream (episodes interleave)."""
    batch_size: int = 256
    """transitions per sampled batch."""
    sample_repeats: int = 30
    """batches sampled per buffer; the median time is reported."""
    device: str = "cpu"
    """training device the sampled tensors go to (our frames are stored there too)."""
    train_steps: int = 1_500
    """env steps per end-to-end training run (0 skips the end-to-end part)."""
    train_n_envs: tuple[int, ...] = (1, 4)
    """--n-envs values of the end-to-end runs."""
    train_timeout_s: float = TRAIN_TIMEOUT_S
    """seconds one end-to-end run may take before it is stopped and reported as missing."""
    seed: int = 0
    """seed of the synthetic stream and of torch."""
    quick: bool = False
    """tiny sizes and no training runs, in seconds: checks that the script works (overrides the sizes)."""
    out: Path | None = None
    """JSON path; None: results/bench_replay_<device>.json in the repository."""


QUICK = {"transitions": 300, "batch_size": 32, "sample_repeats": 3, "train_steps": 0}
"""What --quick sets."""


# ---------------------------------------------------------------------------------------------------------
# A synthetic stream of transitions, stacked exactly like PixelObservationWrapper + DummyVecEnv deliver them
# ---------------------------------------------------------------------------------------------------------
def action_space() -> spaces.Box:
    """Fetch's action space: gripper displacement (3) and finger opening (1), each in [-1, 1]."""
    return spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)


def synthetic_stream(
    n_steps: int,
    n_envs: int,
    episode_lengths: tuple[int, ...] | int = FETCH_EPISODE_STEPS,
    frame_stack: int = FRAME_STACK,
    image_size: int = IMAGE_SIZE,
    seed: int = 0,
) -> Iterator[tuple[dict, dict, np.ndarray, np.ndarray, np.ndarray, list[dict]]]:
    """Yield ``add()`` arguments ``(obs, next_obs, action, reward, done, infos)`` for ``n_steps`` vec steps.

    Each env runs time-limited episodes (``episode_lengths[i]`` steps for env i): reset fills the frame
    stack with the reset frame, each step appends one random frame, the last step's next_obs is the
    terminal observation and the next call's obs is the new episode's reset observation, as SB3's
    ``_store_transition`` passes them. The achieved goal random-walks in 2 cm steps so HER's relabelled
    rewards are a mix of 0 and -1.
    """
    rng = np.random.default_rng(seed)
    lengths = (episode_lengths,) * n_envs if isinstance(episode_lengths, int) else tuple(episode_lengths)
    frames = [deque(maxlen=frame_stack) for _ in range(n_envs)]
    state = [dict() for _ in range(n_envs)]
    step_in_episode = np.zeros(n_envs, dtype=np.int64)

    def new_frame() -> np.ndarray:
        return rng.integers(0, 256, (FRAME_CHANNELS, image_size, image_size), dtype=np.uint8)

    def reset(env_idx: int) -> None:
        frame = new_frame()
        for _ in range(frame_stack):
            frames[env_idx].append(frame)
        state[env_idx] = {
            "proprioception": rng.normal(size=PROPRIO_DIM).astype(np.float32),
            "achieved_goal": rng.uniform(-0.1, 0.1, GOAL_DIM).astype(np.float32),
            "desired_goal": rng.uniform(-0.1, 0.1, GOAL_DIM).astype(np.float32),
        }
        step_in_episode[env_idx] = 0

    def observe() -> dict[str, np.ndarray]:
        obs = {"pixels": np.stack([np.concatenate(frames[i], axis=0) for i in range(n_envs)])}
        for key in ("proprioception", "achieved_goal", "desired_goal"):
            obs[key] = np.stack([state[i][key] for i in range(n_envs)])
        return obs

    for env_idx in range(n_envs):
        reset(env_idx)
    obs = observe()
    for _ in range(n_steps):
        action = rng.uniform(-1, 1, (n_envs, ACTION_DIM)).astype(np.float32)
        for env_idx in range(n_envs):
            frames[env_idx].append(new_frame())
            state[env_idx]["proprioception"] = rng.normal(size=PROPRIO_DIM).astype(np.float32)
            state[env_idx]["achieved_goal"] = (
                state[env_idx]["achieved_goal"] + rng.normal(0, 0.02, GOAL_DIM).astype(np.float32)
            )
            step_in_episode[env_idx] += 1
        next_obs = observe()  # for a done env this is its terminal observation
        distance = np.linalg.norm(next_obs["achieved_goal"] - next_obs["desired_goal"], axis=-1)
        reward = -(distance > 0.05).astype(np.float32)
        done = step_in_episode >= np.array(lengths)
        infos = [{"TimeLimit.truncated": bool(d)} for d in done]
        yield obs, next_obs, action, reward, done, infos
        for env_idx in np.flatnonzero(done):
            reset(int(env_idx))
        obs = observe() if done.any() else next_obs


# ---------------------------------------------------------------------------------------------------------
# Buffer benchmark
# ---------------------------------------------------------------------------------------------------------
@dataclass
class BufferResult:
    name: str
    bytes_per_transition: float
    """allocated bytes / transitions held when full of 50-step episodes."""
    add_us_per_step: float
    """microseconds of add() per env step, ring full (steady state)."""
    sample_ms_per_batch: float
    """median milliseconds per sample(batch_size), tensors on the device."""
    extra: dict[str, Any] = field(default_factory=dict)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        th.cuda.synchronize()


def bench_buffers(config: BenchConfig) -> list[BufferResult]:
    """Feed SB3's HerReplayBuffer and ours the same stream; time add() and sample()."""
    np.random.seed(config.seed)
    th.manual_seed(config.seed)
    reward_env = DummyVecEnv([lambda: make_fetch_env("FetchPush-v4", pixels=False)])  # compute_reward only
    observation_space, actions = pixel_observation_space(goal_mode="both"), action_space()
    capacity = config.transitions // 2 * config.n_envs
    buffers = {
        "sb3_her": HerReplayBuffer(capacity, observation_space, actions, env=reward_env, device=config.device,
                                   n_envs=config.n_envs),
        # One extra row per episode for the reset frame: give ours the rows to hold the same transitions.
        "framestack": FrameStackHerReplayBuffer(
            capacity + capacity // FETCH_EPISODE_STEPS + 2 * config.n_envs, observation_space, actions,
            env=reward_env, device=config.device, n_envs=config.n_envs,
        ),
    }
    add_seconds = {phase: dict.fromkeys(buffers, 0.0) for phase in ("fill", "steady")}
    chunk: list[tuple] = []

    def flush(phase: str) -> None:
        for name, buffer in buffers.items():
            _synchronize(config.device)
            start = time.perf_counter()
            for args in chunk:
                buffer.add(*args)
            _synchronize(config.device)
            add_seconds[phase][name] += time.perf_counter() - start
        chunk.clear()

    half = config.transitions // 2
    for step, args in enumerate(synthetic_stream(config.transitions, config.n_envs, seed=config.seed)):
        chunk.append(args)
        if len(chunk) == 256 or step + 1 == half:
            flush("fill" if step < half else "steady")
    flush("steady")

    results = []
    for name, buffer in buffers.items():
        buffer.sample(config.batch_size)  # warm-up (first CUDA kernels, allocator)
        times = []
        for _ in range(config.sample_repeats):
            _synchronize(config.device)
            start = time.perf_counter()
            buffer.sample(config.batch_size)
            _synchronize(config.device)
            times.append(time.perf_counter() - start)
        if name == "sb3_her":
            per_transition = float(allocated_bytes_per_transition(buffer))
            extra = {}
        else:
            rows = buffer.buffer_size * buffer.n_envs
            per_transition = buffer.allocated_bytes() / rows * rows_per_transition(FETCH_EPISODE_STEPS)
            extra = {"bytes_per_row": buffer.bytes_per_row,
                     "estimate_bytes_per_row": FrameStackHerReplayBuffer.bytes_per_row_for(observation_space, actions)}
        results.append(BufferResult(
            name=name,
            bytes_per_transition=per_transition,
            add_us_per_step=1e6 * add_seconds["steady"][name] / ((config.transitions - half) * config.n_envs),
            sample_ms_per_batch=1e3 * statistics.median(times),
            extra=extra | {"add_us_per_step_while_filling": 1e6 * add_seconds["fill"][name] / (half * config.n_envs)},
        ))
    reward_env.close()
    return results


# ---------------------------------------------------------------------------------------------------------
# End-to-end: the production script's env steps/s
# ---------------------------------------------------------------------------------------------------------
def train_steps_per_second(replay: str, n_envs: int, steps: int, device: str, artifact_root: Path,
                           timeout_s: float = TRAIN_TIMEOUT_S) -> float | None:
    """Run ``ch09_pixel_push.py train`` (Step 0: NatureCNN + DrQ, batch 256) briefly and return the env
    steps/s it records in its .meta.json; None (with the output printed) when the run fails."""
    command = [
        sys.executable, str(SCRIPTS_DIR / "ch09_pixel_push.py"), "train", "--artifact-root", str(artifact_root),
        "--replay", replay, "--n-envs", str(n_envs), "--total-steps", str(steps), "--device", device,
        # Updates start once every env has finished an episode, so nearly the whole run is training.
        "--learning-starts", str((FETCH_EPISODE_STEPS + 14) * n_envs), "--buffer-size", str(TRAIN_BUFFER_SIZE),
        "--eval-freq", "0", "--checkpoint-freq", str(10 * steps), "--no-progress", "--seed", "0",
    ]
    # A session of its own, so a stopped run takes its env worker processes with it.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=os.environ | {"PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        print(f"[bench] {replay} --n-envs {n_envs}: no result within {timeout_s:.0f} s")
        return None
    metas = list((artifact_root / "checkpoints").glob("*.meta.json"))
    if process.returncode != 0 or len(metas) != 1:
        print(f"[bench] {' '.join(command[2:])} failed:\n{output[-3000:]}")
        return None
    return json.loads(metas[0].read_text())["steps_per_s"]


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------
def run(config: BenchConfig, out: Path) -> dict[str, Any]:
    """Both parts; the JSON at ``out`` is rewritten after each measurement, so a stopped run keeps its figures."""
    buffer_results = bench_buffers(config)
    sb3, ours = buffer_results
    report: dict[str, Any] = {
        "config": asdict(config),
        "torch": th.__version__,
        "device_name": th.cuda.get_device_name() if config.device.startswith("cuda") else "cpu",
        "buffers": [asdict(result) for result in buffer_results],
        "ratios_sb3_over_framestack": {
            "bytes_per_transition": sb3.bytes_per_transition / ours.bytes_per_transition,
            "add_time": sb3.add_us_per_step / ours.add_us_per_step,
            "sample_time": sb3.sample_ms_per_batch / ours.sample_ms_per_batch,
        },
        "end_to_end_steps_per_s": {},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    if config.train_steps > 0:
        for n_envs in config.train_n_envs:
            for replay in ("sb3", "framestack"):
                with tempfile.TemporaryDirectory() as root:
                    fps = train_steps_per_second(replay, n_envs, config.train_steps, config.device, Path(root),
                                                 config.train_timeout_s)
                report["end_to_end_steps_per_s"][f"{replay}_n_envs{n_envs}"] = fps
                print(f"[bench] train --replay {replay} --n-envs {n_envs}: {fps} env steps/s", flush=True)
                out.write_text(json.dumps(report, indent=2, default=str))
    return report


def print_report(report: dict[str, Any]) -> None:
    config = report["config"]
    print(f"\nReplay buffers, {config['transitions']:,} env steps x {config['n_envs']} env(s), "
          f"batch {config['batch_size']}, device {config['device']} ({report['device_name']})")
    print(f"{'buffer':<12} {'bytes/transition':>17} {'add us/step':>12} {'sample ms/batch':>16}")
    for result in report["buffers"]:
        print(f"{result['name']:<12} {result['bytes_per_transition']:>17,.0f} {result['add_us_per_step']:>12.1f} "
              f"{result['sample_ms_per_batch']:>16.2f}")
    ratios = report["ratios_sb3_over_framestack"]
    print(f"{'SB3 / ours':<12} {ratios['bytes_per_transition']:>16.2f}x {ratios['add_time']:>11.2f}x "
          f"{ratios['sample_time']:>15.2f}x")
    if report["end_to_end_steps_per_s"]:
        print("\nEnd to end: ch09_pixel_push.py train, env steps/s")
        for name, fps in report["end_to_end_steps_per_s"].items():
            print(f"  {name:<22} {'failed' if fps is None else f'{fps:,.1f}'}")
        for n_envs in config["train_n_envs"]:
            sb3, ours = (report["end_to_end_steps_per_s"].get(f"{r}_n_envs{n_envs}") for r in ("sb3", "framestack"))
            if sb3 and ours:
                print(f"  framestack / sb3 at --n-envs {n_envs}: {ours / sb3:.2f}x")


def main(argv: list[str] | None = None) -> int:
    """Parse, then benchmark under the top-level guard (a user error: one sentence, exit 2)."""
    config = parse_with_one_line_errors(lambda: tyro.cli(BenchConfig, args=argv, prog="bench_replay.py",
                                                 description=__doc__.split("\n\n")[0]))
    return run_guarded(functools.partial(bench, config))


def bench(config: BenchConfig) -> int:
    check_device("device", config.device)  # 'tpu', or cuda without CUDA: one sentence before anything runs
    if config.quick:
        config = replace(config, **QUICK)
    torch_threads = th.get_num_threads()
    th.set_num_threads(1 if config.device == "cpu" else torch_threads)
    out = config.out or REPO_ROOT / "results" / f"bench_replay_{config.device.split(':')[0]}.json"
    report = run(config, out)
    print_report(report)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
