"""Chapter 9 "Run It": SAC + HER on FetchPush-v4 from 84x84 pixels -- train, evaluate, aggregate.

This is the production script the chapter's experiments run. It builds nothing of its own: the env, the
encoders, the DrQ replay buffer and the critic-encoder policy are the lab components in ``scripts/labs/``
(and the frame-stacked replay in ``scripts/framestack_replay.py``); this file wires them into SB3's SAC and
adds what a multi-day run needs: checkpoints, resume, evaluation, and errors you can act on.

The investigation, one command per step (``bash docker/dev.sh python scripts/ch09_pixel_push.py ...``)
------------------------------------------------------------------------------------------------------
| step | command                                               | policy / encoder                          |
|------|-------------------------------------------------------|-------------------------------------------|
| 0    | ``train --seed 0 --total-steps 2000000``              | SB3 MultiInputPolicy, NatureCNN, DrQ on   |
| 1    | ``train --encoder manip --no-drq ...``                | MultiInputPolicy, ManipulationCNN + SpatialSoftmax |
| 2    | ``train --critic-encoder --no-drq ...``               | DrQv2SACPolicy: the critic trains the encoder |
| 3    | step 2 with ``--total-steps 5000000`` (patience)       | the Experiment Card's command             |
| 4    | ``train --critic-encoder ...`` (DrQ on)               | the DrQ + SpatialSoftmax ablation         |
| -    | ``train --full-state``                                | the 25-D state control (pipeline check)   |

Subcommands
-----------
    train      train one seed; artifacts under --artifact-root (default: the repository root)
    eval       eval --checkpoint checkpoints/ch09_<tag>_<env>_seed0.zip [--n-episodes 100] [--seed S]
    aggregate  aggregate results/ch09_<tag>_<env>_seed*_eval.json   (mean +/- std over seeds, t-based CI)

Artifacts of ``train`` (``<tag>`` comes from the flags, e.g. ``manip_noDrQ_criticEnc``; ``<env>`` = FetchPush-v4)
    checkpoints/ch09_<tag>_<env>_seed<N>.zip            latest model (rewritten at every checkpoint)
    checkpoints/ch09_<tag>_<env>_seed<N>.meta.json      config, versions, git commit, steps done, wall time
    checkpoints/ch09_<tag>_<env>_seed<N>_<500K>_steps.zip   one every --checkpoint-freq steps
    runs/ch09_<tag>/<env>/seed<N>/                       TensorBoard (one folder per seed, continued on resume)
    results/ch09_<tag>_<env>_seed<N>_eval.json          written by ``eval``

Every mistake a user can make (a resume without a checkpoint, a buffer larger than the RAM, a hung render
worker, a missing EGL) ends in one sentence that says what to do, and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import math
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import typing
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Sequence

# The labs import each other by bare module name (they are run as `python scripts/labs/<lab>.py`); so do we.
SCRIPTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = SCRIPTS_DIR.parent
for _path in (SCRIPTS_DIR / "labs", SCRIPTS_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# pixel_wrapper sets MUJOCO_GL=egl (unless you chose) before mujoco is imported, and guards the mujoco pin.
from pixel_wrapper import (  # noqa: E402
    FRAME_STACK,
    IMAGE_SIZE,
    PIXEL_KEY,
    SUPPORTED_ENV_IDS,
    DEFAULT_RENDER_SIZE,
    RendererUnavailableError,
    available_memory_bytes,
    make_fetch_env,
)

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import torch as th  # noqa: E402
from stable_baselines3 import SAC  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback, CallbackList  # noqa: E402
from stable_baselines3.common.evaluation import evaluate_policy  # noqa: E402
from stable_baselines3.common.logger import HParam, configure  # noqa: E402
from stable_baselines3.common.monitor import Monitor  # noqa: E402
from stable_baselines3.common.utils import get_device  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv  # noqa: E402
from stable_baselines3.her import HerReplayBuffer  # noqa: E402

from drqv2_sac_policy import DrQv2SACPolicy, print_bridge  # noqa: E402
from ch09.framestack_replay import MEMORY_RESERVE_BYTES, FrameStackHerReplayBuffer  # noqa: E402
from image_augmentation import HerDrQDictReplayBuffer  # noqa: E402
from manipulation_encoder import ManipulationExtractor  # noqa: E402
from visual_encoder import NormalizedCombinedExtractor  # noqa: E402

# ======================================================================================================
# Constants
# ======================================================================================================
PIXEL_DEFAULT_REPLAY = "framestack"
"""Replay used for pixel runs when --replay is not given ('framestack' stores each frame once: 8x less memory)."""
GOAL_MODE = "both"
"""Pixels for control, achieved/desired goals as 3-D vectors for HER (the chapter's 'visual HER synthesis')."""
EVAL_SEED_OFFSET = 10_000
"""Eval envs are seeded with seed + this, so evaluation goals are not the training stream's goals."""
PROBE_BUFFER_ROWS = 8
"""Rows of the tiny replay buffer built to measure the real bytes per transition."""
EVAL_LOAD_BUFFER_SIZE = 100
"""Replay capacity used when a checkpoint is loaded only to act (eval): SB3 allocates a buffer on load."""
CHECKPOINT_FORMAT = "ch09-checkpoint-v1"
EVAL_FORMAT = "ch09-eval-v1"
AGGREGATE_FORMAT = "ch09-aggregate-v1"


class UserError(Exception):
    """A mistake the user can fix; main() prints its one-sentence message and exits non-zero."""


# ======================================================================================================
# Configuration: one dataclass per subcommand; the docstring under each field is its --help text
# ======================================================================================================
@dataclass
class TrainConfig:
    env: str = "FetchPush-v4"
    """Fetch goal task: FetchPush-v4 (the chapter), or FetchReach-v4 etc. to check quickly that learning works."""
    seed: int = 0
    """Random seed (torch, numpy, env resets); also part of every artifact name."""
    total_steps: int = 2_000_000
    """Env steps to train for, counted over all envs; on --resume, the total to reach (raise it to extend a run)."""
    full_state: bool = False
    """Observe the 25-D state vector instead of pixels: the control run that checks the pipeline."""
    encoder: Optional[Literal["nature", "manip"]] = None
    """Pixel encoder: 'nature' (NatureCNN, Step 0) or 'manip' (ManipulationCNN + SpatialSoftmax). Default: manip
    when --critic-encoder or --no-spatial-softmax is given, else nature."""
    critic_encoder: bool = False
    """Train the shared encoder with the critic loss only (DrQv2SACPolicy): the chapter's breakthrough."""
    drq: bool = True
    """DrQ random-shift augmentation of sampled pixels (+/-4 px); --no-drq turns it off."""
    spatial_softmax: bool = True
    """ManipulationCNN's SpatialSoftmax head; --no-spatial-softmax flattens instead (Exercises 3 and 4)."""
    native_render: bool = True
    """Render at 84x84 directly; --no-native-render renders 480x480 and resizes (slower, the tutorial's path)."""
    render_size: Optional[Literal[84, 480]] = None
    """Camera resolution before resizing to 84: 84 is --native-render, 480 is --no-native-render."""
    replay: Optional[Literal["sb3", "framestack"]] = None
    """Replay buffer: 'sb3' (HerReplayBuffer, obs and next_obs stored whole) or 'framestack' (each frame stored
    once; with --full-state a lean in-process HER buffer). Default: framestack for pixels, sb3 for --full-state."""
    buffer_size: int = 500_000
    """Replay capacity in transitions (the Experiment Card's 500K). The preflight refuses one that does not fit."""
    her_n_sampled_goal: int = 8
    """HER relabelled goals per real transition (k; 'future' strategy). 8 is the chapter's value, Ch5 used 4."""
    batch_size: int = 256
    """Transitions per gradient step."""
    learning_starts: int = 1_000
    """Random-action steps before the first update. On a resume without a saved buffer, counted from the resume."""
    learning_rate: float = 3e-4
    """Adam learning rate of actor, critic and entropy coefficient."""
    gamma: float = 0.95
    """Discount factor (50-step episodes: 0.95 is the Fetch/HER standard)."""
    tau: float = 0.005
    """Polyak coefficient of the target critic."""
    n_envs: int = 1
    """Parallel envs; N > 1 runs SubprocVecEnv (spawn) and does N gradient steps per vector step (1 update per
    env step, as with one env)."""
    worker_timeout: float = 300.0
    """Seconds an env worker may take to answer (step, reset, start-up) before the run stops with an error."""
    device: str = "auto"
    """Torch device for the networks: auto (cuda when available), cuda, cuda:1, cpu."""
    eval_freq: int = 50_000
    """Env steps between deterministic evaluations logged as eval/success_rate (0 turns them off)."""
    eval_episodes: int = 20
    """Episodes per evaluation during training."""
    checkpoint_freq: int = 500_000
    """Env steps between periodic checkpoints (named ..._500K_steps.zip, ..._1M_steps.zip, ...)."""
    save_replay_buffer: bool = False
    """Also save the replay buffer at every checkpoint, so --resume continues with it (as big as the buffer)."""
    resume: bool = False
    """Continue the latest checkpoint of the same tag and seed, in the same TensorBoard folder."""
    move_old_run: bool = False
    """Start over: move an earlier run's TensorBoard folder and checkpoints aside (renamed with a timestamp)."""
    compare_sb3: bool = False
    """Print the lab's gradient-routing comparison (SB3 default vs DrQv2SACPolicy) before training; alias --bridge."""
    progress: bool = True
    """Show a progress bar with steps/s and ETA."""
    artifact_root: str = ""
    """Folder that holds checkpoints/, results/ and runs/ (default: the repository root)."""


@dataclass
class EvalConfig:
    checkpoint: str = ""
    """Checkpoint .zip to evaluate; its .meta.json (or the run's) says which env to rebuild."""
    n_episodes: int = 100
    """Deterministic episodes to run."""
    seed: Optional[int] = None
    """Seed of the first episode's reset (default: the training seed + 10000, goals unseen in training)."""
    device: str = "auto"
    """Torch device for the policy."""
    artifact_root: str = ""
    """Folder whose results/ receives <checkpoint name>_eval.json (default: the repository root)."""


@dataclass
class AggregateConfig:
    files: list[str] = field(default_factory=list)
    """Eval JSON files of one configuration, one per seed (e.g. results/ch09_<tag>_<env>_seed*_eval.json)."""
    artifact_root: str = ""
    """Folder whose results/ receives the aggregate JSON (default: the repository root)."""


ARGUMENT_ALIASES = {"compare_sb3": ("--bridge",)}
POSITIONAL_FIELDS = {"files"}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field (what CleanRL's tyro turns into --help)."""
    class_node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(class_node, ast.ClassDef)
    docs: dict[str, str] = {}
    for node, following in zip(class_node.body, class_node.body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field: ``--total-steps`` for ``total_steps``; bools get ``--x/--no-x``; Literals become
    choices; the field's docstring is the help text. The dataclass stays the single source of truth."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if typing.get_origin(hint) is typing.Union:  # Optional[X] -> X
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        help_text = docs.get(f.name, "").replace("%", "%%")
        if f.name in POSITIONAL_FIELDS:
            parser.add_argument(f.name, nargs="+", help=help_text)
            continue
        names = ["--" + f.name.replace("_", "-"), *ARGUMENT_ALIASES.get(f.name, ())]
        if hint is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif typing.get_origin(hint) is Literal:
            choices = typing.get_args(hint)
            parser.add_argument(*names, type=type(choices[0]), choices=choices, default=f.default,
                                help=help_text + " (default: %(default)s)")
        else:
            parser.add_argument(*names, type=hint, default=f.default, help=help_text + " (default: %(default)s)")


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill the defaults that depend on other flags and refuse contradictions, each in one sentence."""
    cfg = dataclasses.replace(cfg)
    if cfg.env not in SUPPORTED_ENV_IDS:
        raise UserError(f"Unknown --env {cfg.env!r}; use one of the Fetch goal tasks: {', '.join(SUPPORTED_ENV_IDS)}.")
    for name in ("total_steps", "buffer_size", "batch_size", "n_envs", "checkpoint_freq", "eval_episodes"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}.")
    for name in ("her_n_sampled_goal", "learning_starts", "eval_freq"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}.")
    if not 0.0 < cfg.gamma <= 1.0 or not 0.0 < cfg.tau <= 1.0 or cfg.learning_rate <= 0:
        raise UserError("--gamma and --tau must lie in (0, 1] and --learning-rate must be positive.")
    if cfg.resume and cfg.move_old_run:
        raise UserError("--resume continues the earlier run and --move-old-run moves it aside; give only one.")

    if cfg.full_state:
        pixel_only = {"--encoder": cfg.encoder is not None, "--critic-encoder": cfg.critic_encoder,
                      "--no-spatial-softmax": not cfg.spatial_softmax,
                      "--render-size/--no-native-render": cfg.render_size is not None or not cfg.native_render}
        given = [flag for flag, is_given in pixel_only.items() if is_given]
        if given:
            raise UserError(f"{', '.join(given)} only applies to pixel runs; drop it or drop --full-state.")
        return dataclasses.replace(cfg, encoder=None, drq=False, replay=cfg.replay or "sb3", render_size=None)

    if cfg.encoder is None:
        cfg.encoder = "manip" if (cfg.critic_encoder or not cfg.spatial_softmax) else "nature"
    if cfg.encoder == "nature" and not cfg.spatial_softmax:
        raise UserError("--no-spatial-softmax changes the ManipulationCNN head; use it with --encoder manip.")
    if cfg.render_size is not None:
        if cfg.native_render is False and cfg.render_size == IMAGE_SIZE:
            raise UserError("--render-size 84 means --native-render; drop --no-native-render or use --render-size 480.")
        cfg.native_render = cfg.render_size == IMAGE_SIZE
    cfg.render_size = IMAGE_SIZE if cfg.native_render else DEFAULT_RENDER_SIZE
    if cfg.replay is None:
        cfg.replay = PIXEL_DEFAULT_REPLAY
    return cfg


# ======================================================================================================
# Names and paths: the tag says what was run, the paths are the scaffold's
# ======================================================================================================
def config_tag(cfg: TrainConfig) -> str:
    """``fullstate``, or ``<nature|manip>[_noSS][_noDrQ][_criticEnc][_resize480]`` (e.g. manip_noDrQ_criticEnc)."""
    if cfg.full_state:
        return "fullstate"
    tag = cfg.encoder or "nature"
    if cfg.encoder == "manip" and not cfg.spatial_softmax:
        tag += "_noSS"
    if not cfg.drq:
        tag += "_noDrQ"
    if cfg.critic_encoder:
        tag += "_criticEnc"
    if not cfg.native_render:
        tag += f"_resize{DEFAULT_RENDER_SIZE}"
    return tag


def format_steps(steps: int) -> str:
    """500000 -> '500K', 1000000 -> '1M', 1500000 -> '1.5M', 250 -> '250' (periodic checkpoint names)."""
    if steps >= 1_000_000:
        return f"{steps / 1_000_000:g}M"
    if steps >= 1_000:
        return f"{steps / 1_000:g}K"
    return str(steps)


PERIODIC_RE = re.compile(r"^(?P<stem>.+)_(?P<steps>\d+(?:\.\d+)?[KM]?)_steps$")


def parse_steps(label: str) -> int:
    """Inverse of format_steps: '1.5M' -> 1500000."""
    scale = {"K": 1_000, "M": 1_000_000}.get(label[-1], 1)
    return int(round(float(label.rstrip("KM")) * scale))


def artifact_root(value: str) -> Path:
    return Path(value).expanduser().resolve() if value else REPO_ROOT


@dataclass(frozen=True)
class RunPaths:
    """Where one (tag, env, seed) run keeps its artifacts."""

    root: Path
    stem: str  # ch09_<tag>_<env>_seed<N>
    run_dir: Path  # runs/ch09_<tag>/<env>/seed<N>

    @classmethod
    def for_config(cls, cfg: TrainConfig) -> "RunPaths":
        root, tag = artifact_root(cfg.artifact_root), config_tag(cfg)
        return cls(root, f"ch09_{tag}_{cfg.env}_seed{cfg.seed}", root / "runs" / f"ch09_{tag}" / cfg.env / f"seed{cfg.seed}")

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def checkpoint(self) -> Path:
        return self.checkpoint_dir / f"{self.stem}.zip"

    @property
    def meta(self) -> Path:
        return self.checkpoint_dir / f"{self.stem}.meta.json"

    def periodic(self, steps: int) -> Path:
        return self.checkpoint_dir / f"{self.stem}_{format_steps(steps)}_steps.zip"

    def replay_buffer(self, replay: str) -> Path:
        # SB3 pickles its buffer into one file; the frame-stack buffer streams its arrays into a folder.
        suffix = ".pkl" if replay == "sb3" else ""
        return self.checkpoint_dir / f"{self.stem}_replay_buffer{suffix}"

    def own_checkpoint_files(self) -> list[Path]:
        """This run's files in checkpoints/ (and not those of seed10 when this is seed1)."""
        if not self.checkpoint_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoint_dir.iterdir()
                      if (p.name.startswith(self.stem + ".") or p.name.startswith(self.stem + "_"))
                      and not p.name.startswith(self.stem + ".old-"))  # runs moved aside earlier


def has_tensorboard_events(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("events.out.tfevents*"))


# ======================================================================================================
# Environments: one factory (the lab's make_fetch_env), many processes when asked, and a watchdog
# ======================================================================================================
def make_monitored_env(env_id: str, pixels: bool, native_render: bool, in_worker: bool = False) -> gym.Env:
    """The env every process builds: make_fetch_env + Monitor (episode returns and lengths for TensorBoard)."""
    if in_worker:
        # Ctrl-C (and `timeout`, Slurm's scancel) signal the whole process group. The main process saves a
        # checkpoint and then closes the workers itself, so they must not die first; a worker whose main
        # process is gone still exits, on the EOFError of its closed pipe.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return Monitor(make_fetch_env(env_id, pixels=pixels, native_render=native_render, goal_mode=GOAL_MODE))


def env_factory(cfg: TrainConfig, in_worker: bool = False) -> Callable[[], gym.Env]:
    """A picklable zero-argument env constructor (SubprocVecEnv ships it to each worker)."""
    return functools.partial(make_monitored_env, cfg.env, not cfg.full_state, cfg.native_render, in_worker)


class WorkerTimeoutError(RuntimeError):
    """An env worker process did not answer in time, or died."""


class _TimedConnection:
    """A Pipe end whose ``recv`` gives up after ``timeout`` seconds instead of blocking forever."""

    def __init__(self, connection: Any, index: int, owner: "TimeoutSubprocVecEnv") -> None:
        self._connection, self._index, self._owner = connection, index, owner

    def recv(self) -> Any:
        timeout = self._owner.worker_timeout
        try:
            ready = self._connection.poll(timeout)
            if ready:
                return self._connection.recv()
        except (EOFError, ConnectionError, OSError) as exc:
            self._owner.failed = True
            raise WorkerTimeoutError(
                f"Env worker {self._index} of {self._owner.num_envs} exited unexpectedly ({type(exc).__name__})"
            ) from None
        self._owner.failed = True
        raise WorkerTimeoutError(
            f"Env worker {self._index} of {self._owner.num_envs} did not answer within {timeout:g} s (a hung EGL "
            "render is the usual cause, see google-deepmind/mujoco#3444)"
        )

    def __getattr__(self, name: str) -> Any:  # send, poll, close: unchanged
        return getattr(self._connection, name)


@contextmanager
def deadline(seconds: float, message: str) -> Iterator[None]:
    """Raise WorkerTimeoutError(message) if the block runs longer than ``seconds``.

    Uses SIGALRM, so it only acts in the main thread on POSIX; elsewhere the block simply runs."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise WorkerTimeoutError(message)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class TimeoutSubprocVecEnv(SubprocVecEnv):
    """SB3's SubprocVecEnv whose workers must answer within ``worker_timeout`` seconds.

    SubprocVecEnv waits on ``remote.recv()`` forever; a worker stuck in an EGL call would freeze a multi-day
    run without a word. Here every answer is awaited with ``poll(timeout)``, start-up included, and a silent
    worker raises ``WorkerTimeoutError``; ``close()`` then terminates the workers instead of waiting on them.
    """

    def __init__(self, env_fns: list[Callable[[], gym.Env]], worker_timeout: float, start_method: str = "spawn",
                 startup_timeout: float | None = None):
        self.worker_timeout = worker_timeout
        self.failed = False
        self.num_envs = len(env_fns)
        startup_timeout = worker_timeout if startup_timeout is None else startup_timeout
        message = (f"The {len(env_fns)} env workers did not start within {startup_timeout:g} s (importing and "
                   "building the envs, EGL context included)")
        try:
            with deadline(startup_timeout, message):
                super().__init__(env_fns, start_method=start_method)
        except WorkerTimeoutError:
            self.failed = True
            self._terminate_workers()
            raise
        self.remotes = [_TimedConnection(remote, i, self) for i, remote in enumerate(self.remotes)]

    def _terminate_workers(self) -> None:
        for process in getattr(self, "processes", []):
            if process.is_alive():
                process.terminate()
        for process in getattr(self, "processes", []):
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
        self.closed = True

    def close(self) -> None:
        if self.closed:
            return
        if self.failed:
            self._terminate_workers()
            return
        try:
            super().close()
        except WorkerTimeoutError:
            self._terminate_workers()


def make_training_env(cfg: TrainConfig) -> VecEnv:
    """DummyVecEnv for one env (no processes), TimeoutSubprocVecEnv with the spawn start method for N > 1:
    every worker starts a fresh interpreter with its own EGL context (a forked GL context is not safe)."""
    if cfg.n_envs == 1:
        return DummyVecEnv([env_factory(cfg)])
    return TimeoutSubprocVecEnv([env_factory(cfg, in_worker=True) for _ in range(cfg.n_envs)],
                                worker_timeout=cfg.worker_timeout, start_method="spawn")


def make_env_or_explain(cfg: TrainConfig, build: Callable[[TrainConfig], Any]) -> Any:
    """Turn the env layer's errors into one sentence each."""
    try:
        return build(cfg)
    except RendererUnavailableError as exc:
        raise UserError(str(exc)) from None


# ======================================================================================================
# The agent: which policy, encoder and replay buffer each flag combination means
# ======================================================================================================
def replay_setup(cfg: TrainConfig) -> tuple[type, dict[str, Any]]:
    """Replay buffer class and its kwargs (HER is on in every configuration)."""
    her_kwargs: dict[str, Any] = {"n_sampled_goal": cfg.her_n_sampled_goal, "goal_selection_strategy": "future"}
    if cfg.replay == "framestack":  # pixels, or a plain vectorised HER buffer for --full-state (drq is off there)
        return FrameStackHerReplayBuffer, {**her_kwargs, "drq": cfg.drq, "frame_stack": FRAME_STACK,
                                           "pixel_key": PIXEL_KEY}
    if cfg.full_state:
        return HerReplayBuffer, her_kwargs
    if cfg.drq:
        return HerDrQDictReplayBuffer, {**her_kwargs, "pixel_key": PIXEL_KEY}
    return HerReplayBuffer, her_kwargs


def policy_setup(cfg: TrainConfig) -> tuple[Any, dict[str, Any]]:
    """Policy class and its kwargs."""
    if cfg.full_state:
        return "MultiInputPolicy", {}
    if cfg.encoder == "manip":
        extractor, extractor_kwargs = ManipulationExtractor, {"spatial_softmax": cfg.spatial_softmax}
    else:
        extractor, extractor_kwargs = NormalizedCombinedExtractor, {}
    policy = DrQv2SACPolicy if cfg.critic_encoder else "MultiInputPolicy"
    return policy, {"features_extractor_class": extractor, "features_extractor_kwargs": extractor_kwargs}


# --8<-- [start:build_agent]
def build_agent(cfg: TrainConfig, env: VecEnv) -> SAC:
    """SAC + HER for one investigation step; every piece is a lab component.

    | flags                        | policy               | encoder (features_extractor_class)      | replay (--replay sb3)  |
    |------------------------------|----------------------|-----------------------------------------|------------------------|
    | (none) -- Step 0             | MultiInputPolicy     | NormalizedCombinedExtractor (NatureCNN) | HerDrQDictReplayBuffer |
    | --encoder manip --no-drq     | MultiInputPolicy     | ManipulationExtractor                   | HerReplayBuffer        |
    | --critic-encoder --no-drq    | DrQv2SACPolicy       | ManipulationExtractor, critic-trained   | HerReplayBuffer        |
    | --critic-encoder (DrQ on)    | DrQv2SACPolicy       | ManipulationExtractor, critic-trained   | HerDrQDictReplayBuffer |
    | --full-state                 | MultiInputPolicy     | SB3's CombinedExtractor (flatten)       | HerReplayBuffer        |
    | --replay framestack (pixel default) | (as above)    | (as above)                              | FrameStackHerReplayBuffer |

    MultiInputPolicy gives actor and critic separate encoders; the actor's learns from the actor loss, the
    critic's from the TD loss. DrQv2SACPolicy shares ONE encoder and routes only the TD gradient into it.
    ``gradient_steps = n_envs`` keeps one update per env step (UTD 1) however many envs collect.
    """
    policy, policy_kwargs = policy_setup(cfg)
    replay_class, replay_kwargs = replay_setup(cfg)
    return SAC(
        policy,
        env,
        learning_rate=cfg.learning_rate,
        buffer_size=cfg.buffer_size,
        learning_starts=cfg.learning_starts,
        batch_size=cfg.batch_size,
        tau=cfg.tau,
        gamma=cfg.gamma,
        train_freq=1,  # one vector step of n_envs transitions...
        gradient_steps=cfg.n_envs,  # ...then n_envs updates: UTD 1
        replay_buffer_class=replay_class,
        replay_buffer_kwargs=replay_kwargs,
        policy_kwargs=policy_kwargs,
        seed=cfg.seed,
        device=cfg.device,
        verbose=0,
    )
# --8<-- [end:build_agent]


def describe_policy(model: SAC) -> dict[str, str]:
    """What a loaded model actually is, to compare with what its metadata claims."""
    return {
        "policy": type(model.policy).__name__,
        "features_extractor": type(model.policy.actor.features_extractor).__name__,
        "replay_buffer": type(model.replay_buffer).__name__ if model.replay_buffer is not None else "None",
    }


def expected_policy(cfg: TrainConfig) -> dict[str, str]:
    policy, policy_kwargs = policy_setup(cfg)
    extractor = policy_kwargs.get("features_extractor_class")
    return {
        "policy": policy if isinstance(policy, str) else policy.__name__,
        "features_extractor": extractor.__name__ if extractor is not None else "CombinedExtractor",  # SB3's default
    }


def same_policy(model: SAC, cfg: TrainConfig) -> bool:
    actual, expected = describe_policy(model), expected_policy(cfg)
    # SB3 names the class behind "MultiInputPolicy" MultiInputPolicy; DrQv2SACPolicy keeps its own name.
    return actual["policy"] == expected["policy"] and actual["features_extractor"] == expected["features_extractor"]


# ======================================================================================================
# Memory preflight: refuse a buffer that cannot fit BEFORE allocating it (numpy allocates lazily, so the
# machine would otherwise run out of memory hours later, when the buffer fills)
# ======================================================================================================
def _array_bytes(obj: Any) -> int:
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, th.Tensor):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, dict):
        return sum(_array_bytes(value) for value in obj.values())
    return 0


def replay_bytes_per_transition(cfg: TrainConfig, env: VecEnv) -> int:
    """Bytes one stored transition takes in the buffer this run will allocate.

    For SB3's buffers, measured on a tiny instance of the real class: SB3 keeps ``observations`` and
    ``next_observations`` separately, each (rows, n_envs, ...), plus actions, rewards, dones, timeouts and
    HER's episode bookkeeping -- 169,520 bytes for a 12x84x84 uint8 pixel dict. The frame-stack buffer
    answers itself, since it stores each frame once.
    """
    replay_class, replay_kwargs = replay_setup(cfg)
    if cfg.replay == "framestack":
        return int(replay_class.estimate_bytes_per_transition(env.observation_space, env.action_space,
                                                              frame_stack=FRAME_STACK))
    probe = replay_class(PROBE_BUFFER_ROWS * env.num_envs, env.observation_space, env.action_space,
                         env=env, device="cpu", n_envs=env.num_envs, **replay_kwargs)
    # Count the arrays that grow with the capacity (first axis = rows), not the per-env bookkeeping.
    per_row = [value for value in vars(probe).values()
               if isinstance(value, dict) or (isinstance(value, (np.ndarray, th.Tensor))
                                              and value.ndim > 0 and value.shape[0] == probe.buffer_size)]
    return math.ceil(sum(_array_bytes(value) for value in per_row) / (probe.buffer_size * probe.n_envs))


def replay_storage(cfg: TrainConfig) -> tuple[str, int]:
    """Where the buffer lives and how many bytes are free there: (description, bytes)."""
    device = get_device(cfg.device)
    if cfg.replay == "framestack" and device.type == "cuda":
        free, _total = th.cuda.mem_get_info(device)
        return f"GPU memory on {device}", int(free)
    return "RAM", available_memory_bytes()


def _round_down(n: int) -> int:
    step = 10 ** max(0, len(str(n)) - 2)  # two significant digits: 123,456 -> 120,000
    return max(n // step * step, 0)


# --8<-- [start:memory_preflight]
def memory_preflight(cfg: TrainConfig, env: VecEnv) -> dict[str, Any]:
    """Estimate the replay buffer's memory from its real layout and refuse, in one sentence, one that
    cannot fit: 500K SB3 pixel transitions are 85 GB, a number worth knowing before day two of a run."""
    bytes_per_transition = replay_bytes_per_transition(cfg, env)
    needed = cfg.buffer_size * bytes_per_transition
    where, available = replay_storage(cfg)
    usable = max(available - MEMORY_RESERVE_BYTES, 0)
    print(f"[preflight] replay buffer: {cfg.buffer_size:,} transitions x {bytes_per_transition:,} bytes "
          f"= {needed / 1e9:.2f} GB of {where} ({available / 1e9:.1f} GB available, --replay {cfg.replay})")
    if needed > usable:
        largest = _round_down(usable // bytes_per_transition)
        hint = " or --replay framestack (each frame stored once)" if cfg.replay == "sb3" and not cfg.full_state else ""
        raise UserError(
            f"A --buffer-size of {cfg.buffer_size:,} needs {needed / 1e9:.1f} GB of {where} ({bytes_per_transition:,} "
            f"bytes per transition with --replay {cfg.replay}) but only {usable / 1e9:.1f} GB is free after a "
            f"{MEMORY_RESERVE_BYTES / 1024**3:.0f} GB reserve; use --buffer-size {largest:,} or less{hint}."
        )
    return {"bytes_per_transition": bytes_per_transition, "buffer_bytes": needed, "storage": where,
            "available_bytes": available}
# --8<-- [end:memory_preflight]


# ======================================================================================================
# Checkpoints and metadata: atomic writes, so a crash never leaves a corrupt file behind an expected name
# ======================================================================================================
def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    _fsync_replace(tmp, path)


def atomic_save_model(model: SAC, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        model.save(handle)
    _fsync_replace(tmp, path)


def atomic_copy(source: Path, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, tmp)
    _fsync_replace(tmp, target)


def save_replay_buffer(model: SAC, path: Path) -> None:
    """SB3 pickles the buffer into one file; the frame-stack buffer streams its arrays into a folder."""
    assert model.replay_buffer is not None
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(model.replay_buffer, FrameStackHerReplayBuffer):
        shutil.rmtree(tmp, ignore_errors=True)
        model.replay_buffer.save(tmp)
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        with open(tmp, "wb") as handle:
            model.save_replay_buffer(handle)
        _fsync_replace(tmp, path)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "stable-baselines3", "gymnasium", "gymnasium-robotics", "mujoco", "numpy", "tensorboard"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["cuda"] = str(th.version.cuda)
    if th.cuda.is_available():
        versions["gpu"] = th.cuda.get_device_name(0)
    return versions


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_meta(path: Path, what: str) -> dict[str, Any]:
    """Load a .meta.json, explaining a missing or damaged one."""
    if not path.is_file():
        raise UserError(f"No metadata file {path} for {what}; was the checkpoint written by this script?")
    try:
        meta = json.loads(path.read_text())
        if meta.get("format") != CHECKPOINT_FORMAT or "config" not in meta:
            raise ValueError(f"format {meta.get('format')!r}")
    except (ValueError, OSError) as exc:
        raise UserError(f"The metadata file {path} is damaged or not this script's ({exc}); "
                        "restore it from a backup or start a fresh run.") from None
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


def load_agent(path: Path, env: VecEnv, device: str, custom_objects: dict[str, Any] | None = None) -> SAC:
    """SAC.load with the ways it can fail turned into one sentence each."""
    if not path.is_file():
        raise UserError(f"Checkpoint {path} does not exist; check the path (periodic ones end in _<N>_steps.zip).")
    try:
        return SAC.load(path, env=env, device=device, custom_objects=custom_objects)
    except ValueError as exc:
        if "spaces do not match" in str(exc) or "Observation spaces" in str(exc) or "Action spaces" in str(exc):
            raise UserError(f"Checkpoint {path} was trained on other observations than its .meta.json describes "
                            f"(a checkpoint from another config?): {str(exc).splitlines()[0]}") from None
        raise UserError(f"Checkpoint {path} cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}); it is "
                        "damaged or not an SB3 SAC checkpoint, use a periodic ..._steps.zip instead.") from None
    except Exception as exc:  # noqa: BLE001  (BadZipFile, EOFError, pickle and torch errors all mean: damaged)
        raise UserError(f"Checkpoint {path} cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}); it is "
                        "damaged or not an SB3 SAC checkpoint, use a periodic ..._steps.zip instead.") from None


# ======================================================================================================
# Resume: same experiment, same TensorBoard folder, steps continuing
# ======================================================================================================
EXPERIMENT_FIELDS = ("env", "seed", "full_state", "encoder", "critic_encoder", "drq", "spatial_softmax",
                     "native_render", "replay", "buffer_size", "her_n_sampled_goal", "batch_size", "learning_rate",
                     "gamma", "tau", "n_envs")
"""Fields a resume must not change: SAC.load restores them from the checkpoint, so a different value on the
command line would be silently ignored. --total-steps, --eval-*, --checkpoint-freq, --device may change."""


def check_same_experiment(saved: dict[str, Any], cfg: TrainConfig, checkpoint: Path) -> None:
    current = asdict(cfg)
    differing = [f"--{name.replace('_', '-')} {current[name]!r} (checkpoint: {saved.get(name)!r})"
                 for name in EXPERIMENT_FIELDS if saved.get(name) != current[name]]
    if differing:
        raise UserError(f"Checkpoint {checkpoint} comes from another config: {'; '.join(differing)}; resume with "
                        "the original flags, or start a separate run with --move-old-run.")


# --8<-- [start:resume_agent]
def resume_agent(cfg: TrainConfig, paths: RunPaths, env: VecEnv, meta: dict[str, Any]) -> tuple[SAC, bool]:
    """Load the latest checkpoint and its replay buffer; without a buffer, push learning_starts past the
    restored step count. (SB3 counts learning_starts in absolute steps: with an empty buffer and
    learning_starts < num_timesteps it would sample at once and raise "Unable to sample before the end of
    the first episode".)"""
    model = load_agent(paths.checkpoint, env, cfg.device)
    if not same_policy(model, cfg):
        raise UserError(f"Checkpoint {paths.checkpoint} holds {describe_policy(model)} but the flags ask for "
                        f"{expected_policy(cfg)} (a checkpoint from another config).")
    buffer_info = meta.get("replay_buffer") or {}
    buffer_path = paths.replay_buffer(cfg.replay)
    restored = bool(buffer_info) and buffer_info.get("steps") == model.num_timesteps and buffer_path.exists()
    if restored:
        if isinstance(model.replay_buffer, FrameStackHerReplayBuffer):
            model.replay_buffer.load(buffer_path)
        else:
            model.load_replay_buffer(buffer_path)  # re-attaches the env HER needs, truncates the open episode
        print(f"[resume] replay buffer restored from {buffer_path} ({model.replay_buffer.size():,} transitions)")
    else:
        model.learning_starts = model.num_timesteps + cfg.learning_starts
        print(f"[resume] no replay buffer saved at step {model.num_timesteps:,}: collecting {cfg.learning_starts:,} "
              f"fresh steps before updates resume (learning_starts = {model.learning_starts:,})")
    return model, restored
# --8<-- [end:resume_agent]


def guard_fresh_run(cfg: TrainConfig, paths: RunPaths) -> None:
    """A fresh run must not mix its curves into an old TensorBoard folder nor overwrite old checkpoints."""
    old_logs = has_tensorboard_events(paths.run_dir)
    old_files = paths.own_checkpoint_files()
    if not old_logs and not old_files:
        return
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    if not cfg.move_old_run:
        what = f"{paths.run_dir} already holds TensorBoard logs" if old_logs else f"{old_files[0]} already exists"
        raise UserError(f"{what} from an earlier run of this tag and seed; continue it with --resume, or start over "
                        "with --move-old-run (which renames the old run with a timestamp).")
    if old_logs:
        aside = paths.run_dir.with_name(f"{paths.run_dir.name}.old-{stamp}")
        os.replace(paths.run_dir, aside)
        print(f"[fresh run] moved old TensorBoard folder to {aside}")
    if old_files:
        aside_dir = paths.checkpoint_dir / f"{paths.stem}.old-{stamp}"
        aside_dir.mkdir(parents=True)
        for path in old_files:
            os.replace(path, aside_dir / path.name)
        print(f"[fresh run] moved {len(old_files)} old checkpoint file(s) to {aside_dir}")


# ======================================================================================================
# Callbacks: checkpoints + stop requests, evaluation, progress bar, hyper-parameters
# ======================================================================================================
class StopRequest:
    """Set by SIGINT/SIGTERM; the checkpoint callback ends learn() at the next env step."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second Ctrl-C: the user does not want to wait for the save
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n[{signal.Signals(signum).name}] saving a checkpoint at the next step, then exiting "
              "(a second signal quits without saving)", file=sys.stderr, flush=True)

    @contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        previous = {sig: signal.signal(sig, self.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class Checkpointer:
    """Writes the latest checkpoint, the periodic snapshots, the replay buffer and the metadata."""

    def __init__(self, cfg: TrainConfig, paths: RunPaths, meta: dict[str, Any]) -> None:
        self.cfg, self.paths, self.meta = cfg, paths, meta
        self.session_start = time.time()
        self.session_start_steps = 0
        self.previous_wall_time = float(meta.get("wall_time_s", 0.0))

    def start(self, steps: int) -> None:
        self.session_start, self.session_start_steps = time.time(), steps

    def save(self, model: SAC, periodic_steps: int | None = None) -> Path:
        atomic_save_model(model, self.paths.checkpoint)
        if periodic_steps is not None:
            periodic = self.paths.periodic(periodic_steps)
            atomic_copy(self.paths.checkpoint, periodic)
            self.meta.setdefault("periodic_checkpoints", [])
            if periodic.name not in self.meta["periodic_checkpoints"]:
                self.meta["periodic_checkpoints"].append(periodic.name)
        if self.cfg.save_replay_buffer and model.replay_buffer is not None:
            buffer_path = self.paths.replay_buffer(self.cfg.replay)
            save_replay_buffer(model, buffer_path)
            self.meta["replay_buffer"] = {"path": buffer_path.name, "steps": model.num_timesteps}
        self.write_meta(model)
        return self.paths.checkpoint

    def write_meta(self, model: SAC) -> None:
        elapsed = time.time() - self.session_start
        session_steps = model.num_timesteps - self.session_start_steps
        self.meta.update({
            "steps_done": int(model.num_timesteps),
            "wall_time_s": round(self.previous_wall_time + elapsed, 1),
            "steps_per_s": round(session_steps / elapsed, 2) if elapsed > 0 else None,
            "updated_at": now_iso(),
            "policy": describe_policy(model),
        })
        if model.device.type == "cuda":  # networks, batches and (framestack) the replay frames
            self.meta["gpu_memory_peak_bytes"] = int(th.cuda.max_memory_allocated(model.device))
        atomic_write_json(self.paths.meta, self.meta)


class CheckpointCallback(BaseCallback):
    """Periodic checkpoints at multiples of --checkpoint-freq, and the stop on SIGINT/SIGTERM."""

    def __init__(self, checkpointer: Checkpointer, stop: StopRequest, freq: int) -> None:
        super().__init__()
        self.checkpointer, self.stop, self.freq = checkpointer, stop, freq
        self.next_checkpoint = 0

    def _on_training_start(self) -> None:
        self.next_checkpoint = (self.num_timesteps // self.freq + 1) * self.freq

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.next_checkpoint:
            self.checkpointer.save(self.model, periodic_steps=self.next_checkpoint)
            self.next_checkpoint += self.freq
        return self.stop.signum is None


class PeriodicEvalCallback(BaseCallback):
    """Deterministic evaluation every ``eval_freq`` env steps, logged as eval/success_rate.

    Like SB3's EvalCallback, but the schedule counts env steps (num_timesteps), not callback calls, so it
    lands on the same steps with any --n-envs and after a resume."""

    def __init__(self, eval_env: VecEnv, eval_freq: int, n_episodes: int) -> None:
        super().__init__()
        self.eval_env, self.eval_freq, self.n_episodes = eval_env, eval_freq, n_episodes
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

        returns, lengths = evaluate_policy(self.model, self.eval_env, n_eval_episodes=self.n_episodes,
                                           deterministic=True, return_episode_rewards=True, callback=record_success)
        self.logger.record("eval/mean_reward", float(np.mean(returns)))
        self.logger.record("eval/mean_ep_length", float(np.mean(lengths)))
        if successes:
            self.last_success_rate = float(np.mean(successes))
            self.logger.record("eval/success_rate", self.last_success_rate)
        self.logger.dump(self.num_timesteps)
        return True


class ProgressBarCallback(BaseCallback):
    """tqdm bar over the whole run (it starts at the restored step on --resume): steps/s and ETA."""

    def __init__(self, total_steps: int, description: str, evaluator: PeriodicEvalCallback | None) -> None:
        super().__init__()
        self.total_steps, self.description, self.evaluator = total_steps, description, evaluator
        self.bar: Any = None

    def _on_training_start(self) -> None:
        from tqdm import tqdm

        interactive = sys.stderr.isatty()  # in a log file (nohup, docker logs) redraw only every 60 s
        self.bar = tqdm(total=self.total_steps, initial=self.num_timesteps, unit="step", unit_scale=True,
                        desc=self.description, dynamic_ncols=True, smoothing=0.05,
                        mininterval=1.0 if interactive else 60.0)

    def _on_step(self) -> bool:
        self.bar.update(self.training_env.num_envs)
        if self.n_calls % 1000 == 0:
            postfix = {}
            if self.model.ep_success_buffer:
                postfix["success"] = f"{np.mean(self.model.ep_success_buffer):.2f}"
            if self.evaluator is not None and self.evaluator.last_success_rate is not None:
                postfix["eval"] = f"{self.evaluator.last_success_rate:.2f}"
            self.bar.set_postfix(postfix, refresh=False)
        return True

    def _on_training_end(self) -> None:
        self.bar.close()


class HParamCallback(BaseCallback):
    """Writes the run's configuration to TensorBoard's HPARAMS tab."""

    def __init__(self, cfg: TrainConfig, tag: str) -> None:
        super().__init__()
        self.hparams = {key: (value if isinstance(value, (bool, int, float, str)) else str(value))
                        for key, value in asdict(cfg).items()}
        self.hparams["tag"] = tag

    def _on_training_start(self) -> None:
        metrics = {"eval/success_rate": 0.0, "rollout/success_rate": 0.0}
        self.logger.record("hparams", HParam(self.hparams, metrics), exclude=("stdout", "log", "json", "csv"))

    def _on_step(self) -> bool:
        return True


# ======================================================================================================
# train
# ======================================================================================================
def new_meta(cfg: TrainConfig, paths: RunPaths, preflight: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "tag": config_tag(cfg),
        "env_id": cfg.env,
        "seed": cfg.seed,
        "observation": "state" if cfg.full_state else "pixels",
        "image_size": None if cfg.full_state else IMAGE_SIZE,
        "frame_stack": None if cfg.full_state else FRAME_STACK,
        "goal_mode": GOAL_MODE,
        "config": asdict(cfg),
        "gradient_steps": cfg.n_envs,
        "checkpoint": paths.checkpoint.name,
        "tensorboard_dir": str(paths.run_dir.relative_to(paths.root)),
        "periodic_checkpoints": [],
        "replay_buffer": None,
        "memory": preflight,
        "versions": package_versions(),
        "git": git_commit(),
        "started_at": now_iso(),
        "steps_done": 0,
        "wall_time_s": 0.0,
        "sessions": [],
    }


def train(cfg: TrainConfig) -> int:
    cfg = resolve_config(cfg)
    tag, paths = config_tag(cfg), RunPaths.for_config(cfg)
    print(f"[train] {paths.stem}: {'state' if cfg.full_state else 'pixels'}, replay {cfg.replay}, "
          f"{cfg.n_envs} env(s), artifacts under {paths.root}")

    meta: dict[str, Any] | None = None
    if cfg.resume:
        if not paths.checkpoint.is_file():
            raise UserError(f"--resume found no checkpoint {paths.checkpoint} for this tag and seed; "
                            "check the flags (they choose the tag) and --artifact-root, or drop --resume.")
        meta = read_meta(paths.meta, f"--resume of {paths.checkpoint}")
        check_same_experiment(meta["config"], cfg, paths.checkpoint)
        if meta.get("steps_done", 0) >= cfg.total_steps:
            print(f"[resume] {paths.checkpoint} already has {meta['steps_done']:,} steps >= --total-steps "
                  f"{cfg.total_steps:,}; raise --total-steps to train further.")
            return 0
    else:
        guard_fresh_run(cfg, paths)

    if cfg.compare_sb3:
        print_bridge()

    env = make_env_or_explain(cfg, make_training_env)
    eval_env: VecEnv | None = None
    try:
        preflight = memory_preflight(cfg, env)
        if cfg.eval_freq > 0:
            eval_env = make_env_or_explain(cfg, lambda c: DummyVecEnv([env_factory(c)]))
            eval_env.seed(cfg.seed + EVAL_SEED_OFFSET)

        if meta is None:
            meta = new_meta(cfg, paths, preflight)
            model, restored = build_agent(cfg, env), False
        else:
            model, restored = resume_agent(cfg, paths, env, meta)
            meta["config"] = {**meta["config"], **{k: v for k, v in asdict(cfg).items() if k not in EXPERIMENT_FIELDS}}
        start_steps = model.num_timesteps
        meta["sessions"].append({"started_at": now_iso(), "from_step": start_steps, "replay_restored": restored,
                                 "learning_starts": model.learning_starts, "device": str(model.device),
                                 "git": git_commit()})

        # The exact folder, not SB3's tensorboard_log/<name>_<N>: a resume continues the same curves.
        model.set_logger(configure(str(paths.run_dir), ["tensorboard"]))
        checkpointer = Checkpointer(cfg, paths, meta)
        checkpointer.start(start_steps)
        stop = StopRequest()
        evaluator = PeriodicEvalCallback(eval_env, cfg.eval_freq, cfg.eval_episodes) if eval_env else None
        callbacks: list[BaseCallback] = [CheckpointCallback(checkpointer, stop, cfg.checkpoint_freq),
                                         HParamCallback(cfg, tag)]
        if evaluator is not None:
            callbacks.append(evaluator)
        if cfg.progress:
            callbacks.append(ProgressBarCallback(cfg.total_steps, paths.stem, evaluator))

        print(f"[train] training steps {start_steps:,} -> {cfg.total_steps:,}; TensorBoard: "
              f"tensorboard --logdir {paths.run_dir.parent.parent}", flush=True)
        with stop.installed():
            try:
                model.learn(total_timesteps=cfg.total_steps - start_steps, callback=CallbackList(callbacks),
                            log_interval=4, reset_num_timesteps=False)
            except WorkerTimeoutError as exc:
                # The model and buffer are intact (the failed step was never stored): keep the progress.
                checkpoint = checkpointer.save(model)
                raise UserError(f"{exc}, so the run stopped at step {model.num_timesteps:,} after saving {checkpoint}; "
                                "continue with --resume, with fewer --n-envs or a larger --worker-timeout.") from None
            checkpoint = checkpointer.save(model)
        if model.ep_success_buffer:
            model.dump_logs()  # SB3 logs every 4 episodes; this puts the final step on the curves too
        session = meta["sessions"][-1]
        session.update({"to_step": model.num_timesteps, "ended_at": now_iso(), "steps_per_s": meta["steps_per_s"]})
        atomic_write_json(paths.meta, meta)

        if stop.signum is not None:
            name = signal.Signals(stop.signum).name
            print(f"[{name}] stopped at step {model.num_timesteps:,} and saved {checkpoint}; continue with the same "
                  "command plus --resume.", file=sys.stderr)
            return 128 + stop.signum
        print(f"[train] done: {model.num_timesteps:,} steps, {meta['wall_time_s'] / 3600:.2f} h in total, "
              f"{meta['steps_per_s']} steps/s this session; checkpoint {checkpoint}")
        print(f"[train] evaluate it with: python scripts/ch09_pixel_push.py eval --checkpoint {checkpoint}"
              + (f" --artifact-root {paths.root}" if paths.root != REPO_ROOT else ""))
        return 0
    finally:
        for vec_env in (env, eval_env):
            if vec_env is not None:
                vec_env.close()


# ======================================================================================================
# eval: deterministic episodes on the env the checkpoint was trained on
# ======================================================================================================
def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a success rate (well-behaved at 0/n and n/n, unlike p +/- z*se)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def run_episodes(model: SAC, env: gym.Env, n_episodes: int, seed: int) -> list[dict[str, Any]]:
    episodes = []
    obs, info = env.reset(seed=seed)
    for episode in range(n_episodes):
        if episode > 0:
            obs, info = env.reset()
        done, episode_return, length = False, 0.0, 0
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, info = env.step(action)
            episode_return += float(reward)
            length += 1
            done = terminated or truncated
        distance = float(np.linalg.norm(np.asarray(obs["achieved_goal"]) - np.asarray(obs["desired_goal"])))
        episodes.append({"episode": episode, "success": bool(info.get("is_success", 0.0)),
                         "final_goal_distance": round(distance, 5), "return": episode_return, "length": length})
    return episodes


def evaluate(cfg: EvalConfig) -> int:
    checkpoint = Path(cfg.checkpoint).expanduser().resolve()
    if not checkpoint.is_file():
        raise UserError(f"Checkpoint {checkpoint} does not exist; pass the .zip that train wrote under checkpoints/.")
    if cfg.n_episodes < 1:
        raise UserError(f"--n-episodes must be at least 1, got {cfg.n_episodes}.")
    meta = read_meta(meta_for_checkpoint(checkpoint), f"checkpoint {checkpoint}")
    try:
        train_cfg = resolve_config(TrainConfig(**{k: v for k, v in meta["config"].items()
                                                  if k in {f.name for f in dataclasses.fields(TrainConfig)}}))
    except TypeError as exc:
        raise UserError(f"The metadata of {checkpoint} does not describe a training config ({exc}).") from None
    seed = train_cfg.seed + EVAL_SEED_OFFSET if cfg.seed is None else cfg.seed

    env = make_env_or_explain(train_cfg, lambda c: make_fetch_env(
        c.env, pixels=not c.full_state, native_render=c.native_render, goal_mode=GOAL_MODE))
    try:
        # SB3 rebuilds the replay buffer on load; to act we need only a small one.
        model = load_agent(checkpoint, DummyVecEnv([lambda: env]), cfg.device,
                           custom_objects={"buffer_size": EVAL_LOAD_BUFFER_SIZE, "learning_starts": 0})
        if not same_policy(model, train_cfg):
            raise UserError(f"Checkpoint {checkpoint} holds {describe_policy(model)} but its metadata describes "
                            f"{expected_policy(train_cfg)} (a checkpoint from another config).")
        start = time.time()
        episodes = run_episodes(model, env, cfg.n_episodes, seed)
        elapsed = time.time() - start
    finally:
        env.close()

    n_success = sum(e["success"] for e in episodes)
    rate = n_success / len(episodes)
    low, high = wilson_interval(n_success, len(episodes))
    stem = checkpoint.name.removesuffix(".zip")
    result = {
        "format": EVAL_FORMAT,
        "checkpoint": str(checkpoint),
        "name": stem,
        "tag": meta["tag"],
        "env_id": meta["env_id"],
        "train_seed": meta["seed"],
        "checkpoint_steps": int(model.num_timesteps),
        "eval_seed": seed,
        "n_episodes": len(episodes),
        "deterministic": True,
        "success_rate": rate,
        "success_ci95": [round(low, 4), round(high, 4)],
        "ci_method": "Wilson score interval, 95%",
        "mean_final_goal_distance": float(np.mean([e["final_goal_distance"] for e in episodes])),
        "episodes": episodes,
        "wall_time_s": round(elapsed, 1),
        "config": meta["config"],
        "versions": package_versions(),
        "git": git_commit(),
        "created_at": now_iso(),
    }
    out = artifact_root(cfg.artifact_root) / "results" / f"{stem}_eval.json"
    atomic_write_json(out, result)
    print(f"{stem}: success_rate {rate:.2f} (95% CI {low:.2f}-{high:.2f}, {len(episodes)} episodes), "
          f"mean final goal distance {result['mean_final_goal_distance']:.3f} m, at {model.num_timesteps:,} steps")
    print(f"wrote {out}")
    return 0


# ======================================================================================================
# aggregate: one number per configuration, as the Reproduce It block reports it
# ======================================================================================================
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042}
"""Two-sided 95% Student-t quantiles t(0.975, df); scipy is not a dependency of this project."""


def t_quantile_975(df: int) -> float:
    if df in T_975:
        return T_975[df]
    if df < 30:  # between tabulated values: the next smaller df is the conservative (larger) one
        return T_975[max(k for k in T_975 if k <= df)]
    z = 1.959964
    return z + (z**3 + z) / (4 * df)  # Cornish-Fisher: within 0.003 of the exact value for df >= 30


def aggregate(cfg: AggregateConfig) -> int:
    results = []
    for name in cfg.files:
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"Eval file {path} does not exist; run `eval --checkpoint ...` for each seed first.")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != EVAL_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
        except (ValueError, OSError) as exc:
            raise UserError(f"{path} is not an eval result of this script ({exc}).") from None
        results.append(data)
    configs = {(r["tag"], r["env_id"]) for r in results}
    if len(configs) > 1:
        raise UserError(f"The eval files mix configurations {sorted(configs)}; aggregate one tag and env at a time.")
    seeds = [r["train_seed"] for r in results]
    if len(set(seeds)) < len(seeds):
        raise UserError(f"Several eval files share a training seed ({sorted(seeds)}); pass one file per seed.")

    rates = np.array([r["success_rate"] for r in results], dtype=float)
    n = len(rates)
    mean = float(rates.mean())
    std = float(rates.std(ddof=1)) if n > 1 else 0.0
    if n > 1:
        half = t_quantile_975(n - 1) * std / math.sqrt(n)
        ci, method = [max(0.0, mean - half), min(1.0, mean + half)], f"Student t over seeds, 95%, df={n - 1}"
    else:
        ci, method = results[0]["success_ci95"], "Wilson over the single seed's episodes, 95%"
    episodes = sorted({r["n_episodes"] for r in results})
    episodes_text = str(episodes[0]) if len(episodes) == 1 else "/".join(map(str, episodes))
    tag, env_id = next(iter(configs))
    summary = {
        "format": AGGREGATE_FORMAT,
        "tag": tag,
        "env_id": env_id,
        "n_seeds": n,
        "seeds": seeds,
        "episodes_per_seed": episodes,
        "success_rate_mean": mean,
        "success_rate_std": std,
        "success_rate_ci95": [round(ci[0], 4), round(ci[1], 4)],
        "ci_method": method,
        "per_seed": [{"seed": r["train_seed"], "success_rate": r["success_rate"], "steps": r["checkpoint_steps"],
                      "file": r["name"]} for r in results],
        "mean_final_goal_distance": float(np.mean([r["mean_final_goal_distance"] for r in results])),
        "created_at": now_iso(),
    }
    out = artifact_root(cfg.artifact_root) / "results" / f"ch09_{tag}_{env_id}_aggregate.json"
    atomic_write_json(out, summary)
    print(f"ch09_{tag} {env_id}")
    print(f"  success_rate: {mean:.2f} +/- {std:.2f}  ({n} seed{'s' if n > 1 else ''} x {episodes_text} episodes)")
    print(f"  95% CI: [{ci[0]:.2f}, {ci[1]:.2f}]  ({method})")
    print("  per seed: " + ", ".join(f"seed{r['train_seed']} {r['success_rate']:.2f}" for r in results))
    print(f"wrote {out}")
    return 0


# ======================================================================================================
# Command line
# ======================================================================================================
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run `<subcommand> --help` for its options.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, cls, text in (("train", TrainConfig, "train SAC + HER for one seed"),
                            ("eval", EvalConfig, "evaluate a checkpoint (deterministic episodes)"),
                            ("aggregate", AggregateConfig, "combine several seeds' eval files")):
        sub = commands.add_parser(name, help=text, description=text)
        add_dataclass_arguments(sub, cls)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return train(config_from_args(TrainConfig, args))
        if args.command == "eval":
            if not args.checkpoint:
                raise UserError("eval needs --checkpoint PATH (a .zip under checkpoints/).")
            return evaluate(config_from_args(EvalConfig, args))
        return aggregate(config_from_args(AggregateConfig, args))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except WorkerTimeoutError as exc:
        print(f"error: {exc}; try fewer --n-envs or a larger --worker-timeout.", file=sys.stderr)
        return 1
    except RendererUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted before a checkpoint could be saved; nothing new was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    mp.freeze_support()
    sys.exit(main())
