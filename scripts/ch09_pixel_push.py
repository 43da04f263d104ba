"""Chapter 9 "Run It": SAC + HER on FetchPush-v4 from 84x84 pixels -- train, evaluate, aggregate.

This file is the experiment, top to bottom: the configs (one dataclass per subcommand; the docstring
under each field is its ``--help``), which policy, encoder and replay buffer each flag combination means
(``build_agent``), and the three subcommands. It builds nothing of its own: the env, the encoders, the
DrQ replay and the critic-encoder policy are the lab components in ``scripts/labs/``. What a multi-day
run needs besides (checkpoints, resume, signals, callbacks, the env-worker watchdog, the memory
preflight, atomic writes, statistics) is the run machinery in ``scripts/ch09/``.

The investigation, one command per step (``bash docker/dev.sh python scripts/ch09_pixel_push.py ...``)

| step | command                                    | policy / encoder                                    |
|------|--------------------------------------------|-----------------------------------------------------|
| 0    | ``train --seed 0 --total-steps 2000000``   | SB3 MultiInputPolicy, NatureCNN, DrQ on             |
| 1    | ``train --encoder manip --no-drq ...``     | MultiInputPolicy, ManipulationCNN + SpatialSoftmax  |
| 2    | ``train --critic-encoder --no-drq ...``    | DrQv2SACPolicy: the critic trains the encoder       |
| 3    | step 2 with ``--total-steps 5000000``      | the Experiment Card's command (patience)            |
| 4    | ``train --critic-encoder ...`` (DrQ on)    | the DrQ + SpatialSoftmax ablation                   |
| -    | ``train --full-state``                     | the 25-D state control (pipeline check)             |

Subcommands
    train      train one seed; artifacts under --artifact-root (default: the repository root)
    eval       eval --checkpoint checkpoints/ch09_<tag>_<env>_seed0.zip [--n-episodes 100] [--seed S]
               eval --checkpoint URL [--sha256 HEX], eval --from-release FOLDER_OR_URL [--steps 1M]
    aggregate  aggregate results/ch09_<tag>_<env>_seed*_eval.json   (mean +/- std over seeds at one step count,
               t-based CI; files of different step counts are refused; the eval files of one run's snapshots
               give success against steps)
    package    package --checkpoint checkpoints/ch09_<tag>_<env>_seed0.zip   (a release folder to publish)
    selftest   selftest [--buffer-size N] [--precision bf16] [--n-envs N]   (this machine, before a long run:
               renderer, device, memory, the CUDA graph, bf16, speed; table + results/selftest.json)

Artifacts of ``train`` (``<tag>`` comes from the flags, e.g. ``manip_noDrQ_criticEnc``; ``<env>`` = FetchPush-v4)
    checkpoints/ch09_<tag>_<env>_seed<N>.zip               latest model (rewritten at every checkpoint)
    checkpoints/ch09_<tag>_<env>_seed<N>.meta.json         config, versions, git commit, steps done, wall time
    checkpoints/ch09_<tag>_<env>_seed<N>_<500K>_steps.zip  one every --checkpoint-freq steps
    runs/ch09_<tag>/<env>/seed<N>/                          TensorBoard (one folder per seed, continued on resume)
    results/ch09_<tag>_<env>_seed<N>_eval.json             written by ``eval``
    results/videos/ch09_<tag>_<env>_seed<N>_<steps>_ep<k>.mp4  written by ``eval --video N`` (listed in the JSON)

Every mistake a user can make (a resume without a checkpoint, a buffer larger than the memory, a hung
render worker, a missing EGL) ends in one sentence that says what to do, and exit code 2.
"""

from __future__ import annotations

import os
import sys

# The labs import each other by bare module name (a reader runs `python scripts/labs/<lab>.py`); so do we.
sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), "labs"))

from cli_guard import guard_entry_point, parse_with_one_line_errors, run_guarded

guard_entry_point(__name__)  # first of all: a failing import or an early SIGTERM/Ctrl-C is one line

import dataclasses
import functools
import json
import multiprocessing as mp
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import gymnasium as gym
import numpy as np
import tyro
from gymnasium import spaces
from stable_baselines3 import SAC
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import configure
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv
from stable_baselines3.her import HerReplayBuffer

from ch09.artifacts import (
    AGGREGATE_FORMAT,
    CHECKPOINT_FORMAT,
    EVAL_FORMAT,
    PERIODIC_RE,
    REPO_ROOT,
    SUCCESS_VS_STEPS_FORMAT,
    WRITE_FAILURES,
    RunPaths,
    artifact_root,
    clean_interrupted_writes,
    format_steps,
    git_commit,
    now_iso,
    package_versions,
    write_json,
)
from ch09.callbacks import (
    CheckpointCallback,
    HParamCallback,
    NoCudaNotice,
    PeriodicEvalCallback,
    ProgressBarCallback,
    testing_hooks,
)
from ch09.checkpoints import (
    Checkpointer,
    StopRequest,
    check_room_to_resume,
    describe_policy,
    guard_fresh_run,
    load_agent,
    load_for_acting,
    meta_for_checkpoint,
    read_meta,
    restore_replay_buffer,
)
from ch09.digest import sha256_file
from ch09.errors import UserError
from ch09.fast_sac import CudaContextError, FastSAC
from ch09.framestack_replay import FrameStackHerReplayBuffer
from ch09.memory import memory_plan, memory_preflight
from ch09.release import checkpoint_for_eval, package_run
from ch09.selftest import run_selftest
from ch09.stats import MixedStepCounts, common_step_count, success_summary, wilson_interval
from ch09.validation import (
    Number,
    check_device,
    check_fields,
    check_range,
    check_seed,
    check_writable_folder,
    positive_seconds,
    read_json_object,
)
from ch09.vec_env import WorkerTimeoutError, ignore_stop_signals, make_vec_env
from ch09.video import TENSORBOARD_CAMERA_SIZE, EpisodeRecorder, VideoFolder
from drqv2_sac_policy import DrQv2SACPolicy, print_bridge
from image_augmentation import HerDrQDictReplayBuffer
from lab_support import MemoryBudgetError
from manipulation_encoder import ManipulationExtractor
from pixel_wrapper import FRAME_STACK, IMAGE_SIZE, PIXEL_KEY, SUPPORTED_ENV_IDS, make_fetch_env, pixel_observation_space
from visual_encoder import NormalizedCombinedExtractor

PIXEL_DEFAULT_REPLAY = "framestack"
"""Replay used for pixel runs when --replay is not given: each frame stored once."""
GOAL_MODE = "both"
"""Pixels for control, achieved/desired goals as 3-D vectors for HER (the chapter's 'visual HER synthesis')."""
EVAL_SEED_OFFSET = 10_000
"""Eval envs are seeded with seed + this, so evaluation goals are not the training stream's goals."""
LOG_INTERVAL_EPISODES = 4
"""SB3 writes the rollout/ and train/ curves every this many episodes."""


CHAPTER_HER_N_SAMPLED_GOAL = 8
"""The Experiment Card's k; runs with another k carry it in their artifact names."""


# ======================================================================================================
# Configuration: one dataclass per subcommand; the docstring under each field is its --help text
# ======================================================================================================
@dataclass
class TrainConfig:
    """Train SAC + HER for one seed."""

    env: str = "FetchPush-v4"
    """Fetch goal task: FetchPush-v4 (the chapter), or FetchReach-v4 etc. to check quickly that learning works."""
    seed: int = 0
    """Random seed (torch, numpy, env resets); also part of every artifact name."""
    total_steps: int = 2_000_000
    """Env steps to train for, counted over all envs; on --resume, the total to reach (raise it to extend a run)."""
    full_state: bool = False
    """Observe the 25-D state vector instead of pixels: the control run that checks the pipeline."""
    encoder: Literal["nature", "manip"] | None = None
    """nature (NatureCNN) or manip (ManipulationCNN); None: manip with --critic-encoder or --no-spatial-softmax."""
    critic_encoder: bool = False
    """Train the shared encoder with the critic loss only (DrQv2SACPolicy): the chapter's breakthrough."""
    drq: bool = True
    """DrQ random-shift augmentation of sampled pixels (+/-4 px); --no-drq turns it off."""
    spatial_softmax: bool = True
    """ManipulationCNN's SpatialSoftmax head; --no-spatial-softmax flattens instead (Exercises 3 and 4)."""
    native_render: bool = True
    """Render at 84x84 directly; --no-native-render renders 480x480 and resizes (slower, the tutorial's path)."""
    replay: Literal["sb3", "framestack"] | None = None
    """sb3 (HerReplayBuffer: obs, next_obs stored whole) or framestack (each frame once); None: framestack if pixels."""
    buffer_size: int = 500_000
    """Replay capacity in transitions (the Experiment Card's 500K). The preflight refuses one that does not fit."""
    her_n_sampled_goal: int = CHAPTER_HER_N_SAMPLED_GOAL
    """HER relabelled goals per real transition (k; 'future' strategy). 8 is the chapter's value, Ch5 used 4;
    any other k is part of the artifact names (_k4)."""
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
    """Parallel envs (N > 1: SubprocVecEnv, spawn), with N gradient steps per vector step: 1 update per env step."""
    worker_timeout: float = 300.0
    """Seconds an env worker may take to answer (step, reset, start-up) before the run stops with an error."""
    device: str = "auto"
    """Torch device of the networks and of the frame-stack buffer's frames: auto (cuda if available), cuda:1, cpu."""
    engine: Literal["fast", "sb3"] = "fast"
    """Update engine: fast (FastSAC: HER draw on the device, one CUDA-graph step) or sb3 (SB3's own SAC.train())."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """FastSAC's encoder passes: fp32, or bf16 (autocast, channels_last on CUDA; weights and losses stay fp32)."""
    cuda_graph: bool = True
    """FastSAC on CUDA: replay the update as one CUDA graph, verified against an eager step at every capture;
    --no-cuda-graph runs it eagerly (same losses, slower). The run's .meta.json records what became of it."""
    eval_freq: int = 50_000
    """Env steps between deterministic evaluations logged as eval/success_rate (0 turns them off)."""
    eval_episodes: int = 20
    """Episodes per evaluation during training."""
    eval_video: bool = True
    """Log the first episode of every evaluation under eval/video in TensorBoard (camera beside observation);
    --no-eval-video turns it off (the README says what it costs)."""
    checkpoint_freq: int = 500_000
    """Env steps between periodic checkpoints (named ..._500K_steps.zip, ..._1M_steps.zip, ...); a multiple of
    --n-envs, so each snapshot holds exactly the steps in its name."""
    save_replay_buffer: bool = False
    """Also save the replay buffer at every checkpoint, so --resume continues with it (as big as the buffer)."""
    resume: bool = False
    """Continue the latest checkpoint of the same tag and seed, in the same TensorBoard folder."""
    move_old_run: bool = False
    """Start over: move an earlier run's TensorBoard folder and checkpoints aside (renamed with a timestamp)."""
    compare_sb3: Annotated[bool, tyro.conf.arg(aliases=("--bridge",))] = False
    """Print the lab's gradient-routing comparison (SB3 default vs DrQv2SACPolicy) before training."""
    progress: bool = True
    """Show a progress bar with steps/s and ETA."""
    artifact_root: Path = REPO_ROOT
    """Folder that holds checkpoints/, results/ and runs/."""


@dataclass
class EvalConfig:
    """Evaluate a checkpoint: deterministic episodes on the env it was trained on."""

    checkpoint: str | None = None
    """Checkpoint .zip to evaluate: a path, or an http(s) URL (downloaded into checkpoints/, checked against the
    SHA256SUMS beside it or --sha256); its .meta.json (or the run's) says which env to rebuild."""
    from_release: str | None = None
    """A release folder written by `package`, or its URL: evaluates its final model (a snapshot with --steps),
    after checking its SHA256SUMS."""
    steps: str | None = None
    """With --from-release: the snapshot to evaluate, e.g. 500K, 1M, 1.5M."""
    sha256: str | None = None
    """SHA-256 the checkpoint must have (from its publisher), checked before anything in it is loaded."""
    n_episodes: int = 100
    """Deterministic episodes to run."""
    video: int = 0
    """Record the first N episodes as videos in results/videos/: the camera view beside the 84x84 observation."""
    video_format: Literal["mp4", "gif"] = "mp4"
    """Format of --video files: mp4 (H.264) or gif (larger, plays anywhere)."""
    seed: int | None = None
    """Seed of the first episode's reset; None: the training seed + 10000 (goals unseen in training)."""
    device: str = "auto"
    """Torch device for the policy."""
    artifact_root: Path = REPO_ROOT
    """Folder whose results/ receives <checkpoint name>_eval.json."""


@dataclass
class AggregateConfig:
    """Combine the eval files of one configuration, one per seed, into one number with a 95% interval."""

    files: tyro.conf.Positional[list[Path]]
    """Eval JSON files of one configuration and step count, one per seed (results/ch09_<tag>_<env>_seed*_eval.json)."""
    artifact_root: Path = REPO_ROOT
    """Folder whose results/ receives the aggregate JSON."""


@dataclass
class PackageConfig:
    """Write a release folder for a finished run, ready to upload: checkpoints, metadata, eval, curves, SHA256SUMS."""

    checkpoint: Path
    """The run's final checkpoint, checkpoints/ch09_<tag>_<env>_seed<N>.zip; its periodic snapshots come along."""
    out: Path | None = None
    """Release folder to write (an earlier release there is replaced); None: releases/<checkpoint name>."""
    artifact_root: Path | None = None
    """Folder holding the run's results/, runs/ and releases/; None: the one above the checkpoint's folder."""


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
    out: Path = REPO_ROOT / "results" / "selftest.json"
    """Where the JSON report goes (versions, device, every figure and result): attach it to a problem report."""
    render_seconds: float = 3.0
    """Seconds of step + render timed by the renderer check."""
    speed_seconds: float = 5.0
    """Seconds each engine trains in the speed sample."""


COMMANDS = {"train": TrainConfig, "eval": EvalConfig, "aggregate": AggregateConfig, "package": PackageConfig,
            "selftest": SelftestConfig}

EXPERIMENT_FIELDS = ("env", "seed", "full_state", "encoder", "critic_encoder", "drq", "spatial_softmax",
                     "native_render", "replay", "buffer_size", "her_n_sampled_goal", "batch_size", "learning_rate",
                     "gamma", "tau", "n_envs")
"""Fields a resume must not change: SAC.load restores them from the checkpoint, so a different value on the
command line would be silently ignored. --total-steps, --eval-*, --checkpoint-freq, --device may change."""


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
    check_seed("seed", cfg.seed)

    if cfg.full_state:
        pixel_only = {"--encoder": cfg.encoder is not None, "--critic-encoder": cfg.critic_encoder,
                      "--no-spatial-softmax": not cfg.spatial_softmax, "--no-native-render": not cfg.native_render}
        given = [flag for flag, is_given in pixel_only.items() if is_given]
        if given:
            raise UserError(f"{', '.join(given)} only applies to pixel runs; drop it or drop --full-state.")
        return dataclasses.replace(cfg, drq=False, replay=cfg.replay or "sb3")

    if cfg.encoder is None:
        cfg.encoder = "manip" if (cfg.critic_encoder or not cfg.spatial_softmax) else "nature"
    if cfg.encoder == "nature" and not cfg.spatial_softmax:
        raise UserError("--no-spatial-softmax changes the ManipulationCNN head; use it with --encoder manip.")
    cfg.replay = cfg.replay or PIXEL_DEFAULT_REPLAY
    return cfg


def check_train_arguments(cfg: TrainConfig) -> None:
    """What ``resolve_config`` cannot judge from the flags alone: this machine's devices and folders, and a
    run that would never train. Called before anything is built (no env, no worker, no model)."""
    if cfg.learning_starts >= cfg.total_steps:
        raise UserError(f"--learning-starts {cfg.learning_starts:,} >= --total-steps {cfg.total_steps:,}: the run "
                        "would only collect random steps and never update; lower --learning-starts or raise "
                        "--total-steps.")
    if cfg.checkpoint_freq % cfg.n_envs:
        # A vector step adds n_envs steps at once: only multiples of n_envs are ever reached exactly, and a
        # snapshot's name must equal the steps inside it (write_missed_snapshot relies on it too).
        first_step = -(-cfg.checkpoint_freq // cfg.n_envs) * cfg.n_envs
        raise UserError(f"--checkpoint-freq {cfg.checkpoint_freq:,} is not a multiple of --n-envs {cfg.n_envs}, so the "
                        f"snapshot named {format_steps(cfg.checkpoint_freq)} would hold {first_step:,} steps (all "
                        f"{cfg.n_envs} envs step at once); use a multiple, e.g. --checkpoint-freq {first_step}.")
    positive_seconds("worker_timeout", cfg.worker_timeout)
    check_device("device", cfg.device)
    check_writable_folder("artifact_root", cfg.artifact_root)


def config_tag(cfg: TrainConfig) -> str:
    """``fullstate``, or ``<nature|manip>[_noSS][_noDrQ][_criticEnc][_resize480]`` (e.g. manip_noDrQ_criticEnc),
    then ``_k<N>`` when HER relabels N goals instead of the chapter's (Exercise 2's k=4 gets its own files)."""
    her_suffix = "" if cfg.her_n_sampled_goal == CHAPTER_HER_N_SAMPLED_GOAL else f"_k{cfg.her_n_sampled_goal}"
    if cfg.full_state:
        return "fullstate" + her_suffix
    tag = cfg.encoder or "nature"
    if cfg.encoder == "manip" and not cfg.spatial_softmax:
        tag += "_noSS"
    if not cfg.drq:
        tag += "_noDrQ"
    if cfg.critic_encoder:
        tag += "_criticEnc"
    if not cfg.native_render:
        tag += "_resize480"
    return tag + her_suffix


def run_paths(cfg: TrainConfig) -> RunPaths:
    return RunPaths.for_run(artifact_root(cfg.artifact_root), config_tag(cfg), cfg.env, cfg.seed)


# ======================================================================================================
# Environments: the lab's make_fetch_env in every process
# ======================================================================================================
def make_monitored_env(env_id: str, pixels: bool, native_render: bool, in_worker: bool = False) -> gym.Env:
    """The env every process builds: make_fetch_env + Monitor (episode returns and lengths for TensorBoard)."""
    if in_worker:
        ignore_stop_signals()  # the main process saves a checkpoint first, then closes the workers
    return Monitor(make_fetch_env(env_id, pixels=pixels, native_render=native_render, goal_mode=GOAL_MODE))


def env_factory(cfg: TrainConfig, in_worker: bool = False) -> functools.partial[gym.Env]:
    """A picklable zero-argument env constructor (SubprocVecEnv ships it to each worker)."""
    return functools.partial(make_monitored_env, cfg.env, not cfg.full_state, cfg.native_render, in_worker)


def eval_env_factory(cfg: TrainConfig) -> Callable[[], gym.Env]:
    """The periodic evaluation's env: the training env, inside an EpisodeRecorder when eval/video is on."""
    make_env = env_factory(cfg)
    if not cfg.eval_video:
        return make_env
    return lambda: EpisodeRecorder(make_env(), camera_size=TENSORBOARD_CAMERA_SIZE)


def eval_recorder(eval_env: DummyVecEnv) -> EpisodeRecorder | None:
    recorder = eval_env.envs[0]
    return recorder if isinstance(recorder, EpisodeRecorder) else None


def training_spaces(cfg: TrainConfig) -> tuple[spaces.Dict, spaces.Space]:
    """The training env's observation and action spaces, from one state-only env in this process: no
    rendering and no worker, so the memory preflight runs before anything expensive starts."""
    state_env = make_fetch_env(cfg.env, pixels=False)
    try:
        if cfg.full_state:
            return state_env.observation_space, state_env.action_space
        return pixel_observation_space(goal_mode=GOAL_MODE), state_env.action_space
    finally:
        state_env.close()


# ======================================================================================================
# The agent: which policy, encoder and replay buffer each flag combination means
# ======================================================================================================
def policy_setup(cfg: TrainConfig) -> tuple[Any, dict[str, Any]]:
    """Policy class and its kwargs.

    | flags                        | policy               | encoder (features_extractor_class)      |
    |------------------------------|----------------------|-----------------------------------------|
    | (none) -- Step 0             | MultiInputPolicy     | NormalizedCombinedExtractor (NatureCNN) |
    | --encoder manip --no-drq     | MultiInputPolicy     | ManipulationExtractor                   |
    | --critic-encoder [--no-drq]  | DrQv2SACPolicy       | ManipulationExtractor, critic-trained   |
    | --full-state                 | MultiInputPolicy     | SB3's CombinedExtractor (flatten)       |

    MultiInputPolicy gives actor and critic separate encoders; the actor's learns from the actor loss, the
    critic's from the TD loss. DrQv2SACPolicy shares ONE encoder and routes only the TD gradient into it.
    """
    if cfg.full_state:
        return "MultiInputPolicy", {}
    if cfg.encoder == "manip":
        extractor, extractor_kwargs = ManipulationExtractor, {"spatial_softmax": cfg.spatial_softmax}
    else:
        extractor, extractor_kwargs = NormalizedCombinedExtractor, {}
    policy = DrQv2SACPolicy if cfg.critic_encoder else "MultiInputPolicy"
    # The encoders divide the uint8 pixels by 255 themselves: SB3 must only cast them to float.
    return policy, {"features_extractor_class": extractor, "features_extractor_kwargs": extractor_kwargs,
                    "normalize_images": False}


def replay_setup(cfg: TrainConfig) -> tuple[type, dict[str, Any]]:
    """Replay buffer class and its kwargs; HER ('future') is on in every configuration.

    | --replay               | DrQ on                    | DrQ off (--no-drq, --full-state) |
    |------------------------|---------------------------|----------------------------------|
    | framestack (pixels)    | FrameStackHerReplayBuffer | FrameStackHerReplayBuffer        |
    | sb3                    | HerDrQDictReplayBuffer    | HerReplayBuffer                  |
    """
    her_kwargs: dict[str, Any] = {"n_sampled_goal": cfg.her_n_sampled_goal, "goal_selection_strategy": "future"}
    if cfg.replay == "framestack":  # pixels, or a plain vectorised HER buffer for --full-state (drq is off there)
        return FrameStackHerReplayBuffer, {**her_kwargs, "drq": cfg.drq, "frame_stack": FRAME_STACK,
                                           "pixel_key": PIXEL_KEY}
    if cfg.drq:
        return HerDrQDictReplayBuffer, {**her_kwargs, "pixel_key": PIXEL_KEY}
    return HerReplayBuffer, her_kwargs


def agent_class(cfg: TrainConfig) -> tuple[type[SAC], dict[str, Any]]:
    """SB3's SAC (``--engine sb3``), or FastSAC and its options: the same algorithm with a faster ``train()``,
    whose checkpoints are plain SAC checkpoints (``ch09.fast_sac``)."""
    if cfg.engine == "sb3":
        return SAC, {}
    return FastSAC, {"precision": cfg.precision, "cuda_graph": cfg.cuda_graph}


# --8<-- [start:build_agent]
def build_agent(cfg: TrainConfig, env: VecEnv) -> SAC:
    """SAC + HER for one investigation step; every piece is a lab component
    (``policy_setup`` and ``replay_setup`` say which flag picks which).

    ``gradient_steps = n_envs`` keeps one update per env step (UTD 1),
    however many envs collect.
    """
    policy, policy_kwargs = policy_setup(cfg)
    replay_class, replay_kwargs = replay_setup(cfg)
    algorithm, engine_options = agent_class(cfg)  # SAC or FastSAC
    return algorithm(
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
        **engine_options,
    )
# --8<-- [end:build_agent]


def expected_policy(cfg: TrainConfig) -> dict[str, str]:
    """The policy and encoder class names ``build_agent`` gives this config."""
    policy, policy_kwargs = policy_setup(cfg)
    extractor = policy_kwargs.get("features_extractor_class")
    return {
        "policy": policy if isinstance(policy, str) else policy.__name__,
        "features_extractor": extractor.__name__ if extractor is not None else "CombinedExtractor",  # SB3's default
    }


def check_policy(model: SAC, cfg: TrainConfig, checkpoint: Path, claimed_by: str) -> None:
    """Refuse a checkpoint whose networks are not the ones ``cfg`` builds (a checkpoint from another config)."""
    actual, expected = describe_policy(model), expected_policy(cfg)
    if (actual["policy"], actual["features_extractor"]) != (expected["policy"], expected["features_extractor"]):
        raise UserError(f"Checkpoint {checkpoint} holds {actual} but {claimed_by} {expected} "
                        "(a checkpoint from another config).")


def check_replay_memory(cfg: TrainConfig, observation_space: spaces.Space, action_space: spaces.Space
                        ) -> list[dict[str, Any]]:
    """The memory preflight of this config's replay buffer, its refusal phrased in the flags to change."""
    replay_class, replay_kwargs = replay_setup(cfg)
    plan = memory_plan(replay_class, replay_kwargs, cfg.buffer_size, observation_space, action_space,
                       n_envs=cfg.n_envs, device=cfg.device)
    try:
        return memory_preflight(plan)
    except MemoryBudgetError as exc:
        hint = "; --replay framestack stores each frame once" if cfg.replay == "sb3" and not cfg.full_state else ""
        raise UserError(f"--buffer-size {cfg.buffer_size:,} does not fit: {str(exc).rstrip('.')}{hint}.") from None


# ======================================================================================================
# train
# ======================================================================================================
def new_meta(cfg: TrainConfig, paths: RunPaths, memory: list[dict[str, Any]]) -> dict[str, Any]:
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
        "cuda_graph": None,  # FastSAC's GraphStatus, updated at every checkpoint
        "memory": memory,
        "versions": package_versions(),
        "git": git_commit(),
        "started_at": now_iso(),
        "steps_done": 0,
        "wall_time_s": 0.0,
        "sessions": [],
    }


def resume_meta(cfg: TrainConfig, paths: RunPaths) -> dict[str, Any]:
    """The metadata of the run --resume continues, refusing a missing run or one with other flags."""
    if paths.has_tensorboard_events() and not paths.own_checkpoint_files():  # what guard_fresh_run moves aside
        raise UserError(f"--resume has nothing to continue: the run in {paths.run_dir} was stopped before its first "
                        "checkpoint, so nothing was saved yet; run the same command without --resume to start "
                        "afresh (its TensorBoard folder is moved aside automatically).")
    if not paths.checkpoint.is_file():
        raise UserError(f"--resume found no checkpoint {paths.checkpoint} for this tag and seed; "
                        "check the flags (they choose the tag) and --artifact-root, or drop --resume.")
    meta = read_meta(paths.meta, f"--resume of {paths.checkpoint}")
    current = asdict(cfg)
    differing = [f"--{name.replace('_', '-')} {current[name]!r} (checkpoint: {meta['config'].get(name)!r})"
                 for name in EXPERIMENT_FIELDS if meta["config"].get(name) != current[name]]
    if differing:
        raise UserError(f"Checkpoint {paths.checkpoint} comes from another config: {'; '.join(differing)}; resume "
                        "with the original flags, or start a separate run with --move-old-run.")
    return meta


def resume_agent(cfg: TrainConfig, paths: RunPaths, env: VecEnv, meta: dict[str, Any]) -> tuple[SAC, bool]:
    """The latest checkpoint with its replay buffer (or ``learning_starts`` moved past the restored steps)."""
    algorithm, engine_options = agent_class(cfg)  # --engine may differ from the saved run's
    model = load_agent(paths.checkpoint, env, cfg.device, algorithm=algorithm, **engine_options)
    check_policy(model, cfg, paths.checkpoint, "the flags ask for")
    restored = restore_replay_buffer(model, paths.replay_buffer(cfg.replay), meta.get("replay_buffer"),
                                     cfg.learning_starts)
    return model, restored


def train(cfg: TrainConfig) -> int:
    cfg = resolve_config(cfg)
    check_train_arguments(cfg)
    tag, paths = config_tag(cfg), run_paths(cfg)
    print(f"[train] {paths.stem}: {'state' if cfg.full_state else 'pixels'}, replay {cfg.replay}, "
          f"{cfg.n_envs} env(s), artifacts under {paths.root}")
    for note in clean_interrupted_writes(paths.checkpoint_dir, paths.stem):  # a kill mid-write leaves these
        print(f"[train] {note}")
    meta = resume_meta(cfg, paths) if cfg.resume else None
    if meta is not None:
        check_room_to_resume(paths, paths.replay_buffer(cfg.replay) if cfg.save_replay_buffer else None)
    if meta is not None and meta.get("steps_done", 0) >= cfg.total_steps:
        print(f"[resume] {paths.checkpoint} already has {meta['steps_done']:,} steps >= --total-steps "
              f"{cfg.total_steps:,}; raise --total-steps to train further.")
        return 0
    if meta is None:
        guard_fresh_run(paths, cfg.move_old_run)
    if cfg.compare_sb3:
        print_bridge()
    memory = check_replay_memory(cfg, *training_spaces(cfg))  # before any env worker exists

    env = make_vec_env([env_factory(cfg, in_worker=cfg.n_envs > 1) for _ in range(cfg.n_envs)], cfg.worker_timeout)
    eval_env: VecEnv | None = None
    try:
        if cfg.eval_freq > 0:
            eval_env = DummyVecEnv([eval_env_factory(cfg)])
            eval_env.seed(cfg.seed + EVAL_SEED_OFFSET)
        if meta is None:
            meta = new_meta(cfg, paths, memory)
            model, restored = build_agent(cfg, env), False
        else:
            model, restored = resume_agent(cfg, paths, env, meta)
            meta["config"] |= {k: v for k, v in asdict(cfg).items() if k not in EXPERIMENT_FIELDS}
        start_steps = model.num_timesteps
        meta["sessions"].append({"started_at": now_iso(), "from_step": start_steps, "replay_restored": restored,
                                 "learning_starts": model.learning_starts, "device": str(model.device),
                                 "engine": cfg.engine, "precision": cfg.precision,
                                 "git": git_commit()})

        # The exact folder, not SB3's tensorboard_log/<name>_<N>: a resume continues the same curves.
        model.set_logger(configure(str(paths.run_dir), ["tensorboard"]))
        checkpointer = Checkpointer(paths, meta, paths.replay_buffer(cfg.replay) if cfg.save_replay_buffer else None)
        checkpointer.start(start_steps)
        checkpointer.write_missed_snapshot(model, cfg.checkpoint_freq)  # a kill during the last copy lost it
        stop = StopRequest()
        evaluator = PeriodicEvalCallback(eval_env, cfg.eval_freq, cfg.eval_episodes,
                                         recorder=eval_recorder(eval_env)) if eval_env else None
        callbacks: list[BaseCallback] = [CheckpointCallback(checkpointer, stop, cfg.checkpoint_freq),
                                         HParamCallback({**asdict(cfg), "tag": tag})]
        if evaluator is not None:
            callbacks.append(evaluator)
        if cfg.progress:
            callbacks.append(ProgressBarCallback(cfg.total_steps, paths.stem, evaluator))
        if not cfg.full_state:
            callbacks.append(NoCudaNotice(cfg.total_steps))  # says nothing on a CUDA device
        callbacks += testing_hooks(paths.stem)  # empty unless a test sets CH09_TEST_KILL_AT_STEP

        print(f"[train] training steps {start_steps:,} -> {cfg.total_steps:,}; TensorBoard: "
              f"tensorboard --logdir {paths.run_dir.parent.parent}", flush=True)
        with stop.installed():
            try:
                model.learn(total_timesteps=cfg.total_steps - start_steps, callback=CallbackList(callbacks),
                            log_interval=LOG_INTERVAL_EPISODES, reset_num_timesteps=False)
                checkpoint = checkpointer.save(model)
            except WorkerTimeoutError as exc:
                # The model and buffer are intact (the failed step was never stored): keep the progress.
                checkpoint = checkpointer.save(model)
                raise UserError(f"{exc}, so the run stopped at step {model.num_timesteps:,} after saving {checkpoint}; "
                                "continue with --resume, with fewer --n-envs or a larger --worker-timeout.") from None
            except CudaContextError as exc:
                # Nothing can be read back from a broken context: the checkpoints written before it stay as they are.
                last = int(meta.get("steps_done", 0))
                kept = f"the checkpoint of step {last:,} is intact" if last else "no checkpoint had been written yet"
                said = str(exc)
                raise UserError(f"{said[:1].upper()}{said[1:]}, at step {model.num_timesteps:,}; {kept}: run the same "
                                f"command {'plus --resume ' if last else ''}with --no-cuda-graph (eager steps, "
                                "same losses).") from None
        if model.ep_success_buffer:
            model.dump_logs()  # SB3 logs every few episodes; this puts the final step on the curves too
        meta["sessions"][-1].update({"to_step": model.num_timesteps, "ended_at": now_iso(),
                                     "steps_per_s": meta["steps_per_s"], "cuda_graph": meta.get("cuda_graph")})
        write_json(paths.meta, meta)
    except OSError as exc:  # a TensorBoard write on a full disk (our own writes raise ArtifactWriteError)
        if exc.errno not in WRITE_FAILURES:
            raise
        where = exc.filename or paths.root
        raise UserError(f"Writing {where} failed ({exc.strerror}); free space there (or pass another --artifact-root) "
                        "and continue with the same command plus --resume if a checkpoint was saved.") from None
    finally:
        for vec_env in (env, eval_env):
            if vec_env is not None:
                vec_env.close()

    if stop.signum is not None:
        print(f"[{signal.Signals(stop.signum).name}] stopped at step {model.num_timesteps:,} and saved {checkpoint}; "
              "continue with the same command plus --resume.", file=sys.stderr)
        return 128 + stop.signum
    print(f"[train] done: {model.num_timesteps:,} steps, {meta['wall_time_s'] / 3600:.2f} h in total, "
          f"{meta['steps_per_s']} steps/s this session; checkpoint {checkpoint}")
    print(f"[train] evaluate it with: python scripts/ch09_pixel_push.py eval --checkpoint {checkpoint}"
          + (f" --artifact-root {paths.root}" if paths.root != REPO_ROOT else ""))
    return 0


# ======================================================================================================
# eval: deterministic episodes on the env the checkpoint was trained on
# ======================================================================================================
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


def train_config_of(meta: dict[str, Any], checkpoint: Path) -> TrainConfig:
    """The training config a checkpoint's metadata records (fields this version no longer has are ignored)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        return resolve_config(TrainConfig(**{k: v for k, v in meta["config"].items() if k in known}))
    except TypeError as exc:
        raise UserError(f"The metadata of {checkpoint} does not describe a training config ({exc}).") from None


def eval_video_folder(cfg: EvalConfig, meta: dict[str, Any], steps: int) -> VideoFolder:
    """Where ``eval --video`` writes: results/videos/ch09_<tag>_<env>_seed<N>_<steps>_ep<k>.<mp4|gif>."""
    root = artifact_root(cfg.artifact_root)
    run_stem = RunPaths.for_run(root, meta["tag"], meta["env_id"], meta["seed"]).stem
    return VideoFolder(root / "results" / "videos", run_stem, format_steps(steps), cfg.video_format, root)


def evaluate(cfg: EvalConfig) -> int:
    if cfg.n_episodes < 1:
        raise UserError(f"--n-episodes must be at least 1, got {cfg.n_episodes}.")
    if cfg.seed is not None:
        check_seed("seed", cfg.seed)
    check_device("device", cfg.device)
    check_writable_folder("artifact_root", cfg.artifact_root)
    if not 0 <= cfg.video <= cfg.n_episodes:
        raise UserError(f"--video is how many of the --n-episodes {cfg.n_episodes} episodes to record, so it lies "
                        f"in 0..{cfg.n_episodes}; got {cfg.video}.")
    if cfg.video:
        check_writable_folder("artifact_root", artifact_root(cfg.artifact_root) / "results" / "videos")
    # Loading a checkpoint runs the code pickled in it: one from elsewhere is checked against its digest first.
    checkpoint = checkpoint_for_eval(cfg.checkpoint, cfg.from_release, cfg.steps, cfg.sha256,
                                     artifact_root(cfg.artifact_root) / "checkpoints")
    meta = read_meta(meta_for_checkpoint(checkpoint), f"checkpoint {checkpoint}")
    train_cfg = train_config_of(meta, checkpoint)
    seed = train_cfg.seed + EVAL_SEED_OFFSET if cfg.seed is None else cfg.seed

    env = make_fetch_env(train_cfg.env, pixels=not train_cfg.full_state, native_render=train_cfg.native_render,
                         goal_mode=GOAL_MODE)
    try:
        model = load_for_acting(checkpoint, DummyVecEnv([lambda: env]), cfg.device)  # spaces checked, no buffer
        check_policy(model, train_cfg, checkpoint, "its metadata describes")
        videos = eval_video_folder(cfg, meta, int(model.num_timesteps))
        if cfg.video:
            env = EpisodeRecorder(env, on_episode=videos)  # same episodes: it renders from a copy of the state
            env.record_next(cfg.video)
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
        "checkpoint_source": cfg.from_release or cfg.checkpoint,
        "checkpoint_sha256": sha256_file(checkpoint),
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
        "videos": videos.written,
        "wall_time_s": round(elapsed, 1),
        "config": meta["config"],
        "versions": package_versions(),
        "git": git_commit(),
        "created_at": now_iso(),
    }
    out = artifact_root(cfg.artifact_root) / "results" / f"{stem}_eval.json"
    write_json(out, result)
    print(f"{stem}: success_rate {rate:.2f} (95% CI {low:.2f}-{high:.2f}, {len(episodes)} episodes), "
          f"mean final goal distance {result['mean_final_goal_distance']:.3f} m, at {model.num_timesteps:,} steps")
    print(f"wrote {out}")
    for video in videos.written:
        print(f"wrote {artifact_root(cfg.artifact_root) / video['file']} ({video['frames']} frames)")
    return 0


# ======================================================================================================
# aggregate: one number per configuration, as the Reproduce It block reports it
# ======================================================================================================
EVAL_FIELDS = {"format": str, "name": str, "tag": str, "env_id": str, "train_seed": int, "checkpoint_steps": int,
               "n_episodes": int, "success_rate": Number, "success_ci95": list, "mean_final_goal_distance": Number}
"""The fields of an eval JSON that aggregate reads, with their JSON types: checked before any is used."""


AGGREGATE_STEPS_FIX = ("pass the eval files of one step count (evaluate each seed's snapshot of the same steps, "
                       "checkpoints/<run>_<500K>_steps.zip), or every snapshot's file of each seed for success "
                       "against steps")
"""What aggregate tells a user whose eval files mix step counts (``stats.common_step_count``)."""


def read_eval_file(path: Path) -> dict[str, Any]:
    """An eval result of this script, its shape checked (every file read is untrusted)."""
    fix = "pass the *_eval.json files that `eval --checkpoint ...` wrote, one per seed"
    data = read_json_object(path, "Eval file", fix)
    if data.get("format") != EVAL_FORMAT:
        raise UserError(f"{path} has format {data.get('format')!r}, not {EVAL_FORMAT!r} (not an eval result of this "
                        f"script); {fix}.")
    check_fields(data, EVAL_FIELDS, f"Eval file {path}", fix)
    check_range(data["success_rate"], 0.0, 1.0, f"success_rate in {path}", fix)
    interval = data["success_ci95"]
    if len(interval) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in interval):
        raise UserError(f"Eval file {path}: success_ci95 should be two numbers [low, high], found "
                        f"{json.dumps(interval)[:40]}; {fix}.")
    return data


def aggregate(cfg: AggregateConfig) -> int:
    if not cfg.files:
        raise UserError("aggregate needs the eval files of one configuration, e.g. "
                        "results/ch09_<tag>_<env>_seed*_eval.json.")
    check_writable_folder("artifact_root", cfg.artifact_root)
    results = [read_eval_file(path.expanduser()) for path in cfg.files]
    configs = {(r["tag"], r["env_id"]) for r in results}
    if len(configs) > 1:
        raise UserError(f"The eval files mix configurations {sorted(configs)}; aggregate one tag and env at a time.")
    seeds = [r["train_seed"] for r in results]
    if len(set(seeds)) < len(seeds):  # snapshots of a run: one row per step count
        return aggregate_over_steps(results, cfg)
    try:
        steps = common_step_count({path.name: r["checkpoint_steps"] for path, r in zip(cfg.files, results)},
                                  AGGREGATE_STEPS_FIX)
    except MixedStepCounts as exc:
        raise UserError(str(exc)) from None

    rates = [float(r["success_rate"]) for r in results]
    n = len(rates)
    mean, std, ci, method = success_summary(rates, results[0]["success_ci95"])
    episodes = sorted({r["n_episodes"] for r in results})
    tag, env_id = next(iter(configs))
    summary = {
        "format": AGGREGATE_FORMAT,
        "tag": tag,
        "env_id": env_id,
        "steps": steps,
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
    write_json(out, summary)
    print(f"ch09_{tag} {env_id}")
    print(f"  success_rate: {mean:.2f} +/- {std:.2f} at {steps:,} steps  ({n} seed{'s' if n > 1 else ''} x "
          f"{'/'.join(map(str, episodes))} episodes)")
    print(f"  95% CI: [{ci[0]:.2f}, {ci[1]:.2f}]  ({method})")
    print("  per seed: " + ", ".join(f"seed{r['train_seed']} {r['success_rate']:.2f}" for r in results))
    print(f"wrote {out}")
    return 0


def aggregate_over_steps(results: list[dict[str, Any]], cfg: AggregateConfig) -> int:
    """Success against training steps: the eval files of a run's snapshots (of one seed or several), one row
    per step count, with a t interval over the seeds at that step (Wilson where there is one seed)."""
    pairs = [(r["train_seed"], r["checkpoint_steps"]) for r in results]
    if len(set(pairs)) < len(pairs):
        repeated = sorted({pair for pair in pairs if pairs.count(pair) > 1})
        raise UserError(f"Several eval files are of the same seed at the same step count (seed, steps: {repeated}); "
                        "pass one file per seed and snapshot.")
    by_steps: dict[int, list[dict[str, Any]]] = {}
    for result in results:
        by_steps.setdefault(int(result["checkpoint_steps"]), []).append(result)
    rows = []
    for steps, group in sorted(by_steps.items()):
        rates = [float(r["success_rate"]) for r in group]
        mean, std, ci, method = success_summary(rates, group[0]["success_ci95"])
        rows.append({"steps": steps, "n_seeds": len(group), "seeds": sorted(r["train_seed"] for r in group),
                     "episodes_per_seed": sorted({r["n_episodes"] for r in group}), "success_rate_mean": mean,
                     "success_rate_std": std, "success_rate_ci95": [round(ci[0], 4), round(ci[1], 4)],
                     "ci_method": method, "files": [r["name"] for r in group]})
    tag, env_id = results[0]["tag"], results[0]["env_id"]
    summary = {"format": SUCCESS_VS_STEPS_FORMAT, "tag": tag, "env_id": env_id, "rows": rows,
               "created_at": now_iso()}
    out = artifact_root(cfg.artifact_root) / "results" / f"ch09_{tag}_{env_id}_success_vs_steps.json"
    write_json(out, summary)
    print(f"ch09_{tag} {env_id}: success against training steps")
    print(f"  {'steps':>12}  {'seeds':>5}  {'success':>7}  95% CI")
    for row in rows:
        low, high = row["success_rate_ci95"]
        print(f"  {row['steps']:>12,}  {row['n_seeds']:>5}  {row['success_rate_mean']:>7.2f}  [{low:.2f}, {high:.2f}]")
    print(f"wrote {out}")
    return 0


# ======================================================================================================
# package: a release folder of a finished run, for the checkpoint track
# ======================================================================================================
RUN_ONLY_FIELDS = ("resume", "move_old_run", "compare_sb3", "progress", "artifact_root")
"""Train flags that say how a session ran, not what was trained: left out of a release's train command."""


def train_command(config: dict[str, Any]) -> str:
    """The ``train`` command line of a recorded config: the flags that differ from the defaults, without those
    ``resolve_config`` fills in by itself (the encoder, the replay, DrQ off for --full-state)."""
    defaults = asdict(TrainConfig())
    given = {f.name: config[f.name] for f in dataclasses.fields(TrainConfig)
             if f.name in config and f.name not in RUN_ONLY_FIELDS and config[f.name] != defaults[f.name]}
    try:
        resolved = asdict(resolve_config(TrainConfig(**given)))
        for name in ("encoder", "replay", "drq"):
            without = {k: v for k, v in given.items() if k != name}
            if name in given and asdict(resolve_config(TrainConfig(**without))) == resolved:
                given = without
    except (UserError, TypeError):
        pass  # a config this version cannot rebuild: show every recorded difference
    flags = []
    for name, value in given.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(defaults[name], bool):
            flags.append(flag if value else f"--no-{flag[2:]}")
        else:
            flags.append(f"{flag} {value}")
    return " ".join(["train", *flags])


def package(cfg: PackageConfig) -> int:
    checkpoint = cfg.checkpoint.expanduser().resolve()
    if not checkpoint.is_file():
        raise UserError(f"Checkpoint {checkpoint} does not exist; pass the run's final .zip under checkpoints/.")
    stem = checkpoint.name.removesuffix(".zip")
    if periodic := PERIODIC_RE.match(stem):
        raise UserError(f"{checkpoint.name} is a periodic snapshot; package the run's final checkpoint "
                        f"{periodic['stem']}.zip (its snapshots come with it).")
    root = artifact_root(cfg.artifact_root) if cfg.artifact_root is not None else checkpoint.parent.parent
    meta_path = meta_for_checkpoint(checkpoint)
    meta = read_meta(meta_path, f"checkpoint {checkpoint}")
    eval_path = root / "results" / f"{stem}_eval.json"
    if not eval_path.is_file():
        root_flag = f" --artifact-root {root}" if root != REPO_ROOT else ""
        raise UserError(f"There is no {eval_path}, and a release reports its success rate; evaluate the checkpoint "
                        f"first with `python scripts/ch09_pixel_push.py eval --checkpoint {checkpoint} "
                        f"--n-episodes 100{root_flag}`.")
    out = cfg.out.expanduser().resolve() if cfg.out is not None else root / "releases" / stem
    sums = package_run(checkpoint, meta_path, meta, read_eval_file(eval_path), root, out, train_command(meta["config"]))
    zips = [name for name in sums if name.endswith(".zip")]
    print(f"[package] {out}: {len(sums)} files, {len(zips)} checkpoint(s), "
          f"{sum((out / name).stat().st_size for name in sums):,} bytes; SHA-256 of {stem}.zip: {sums[stem + '.zip']}")
    print(f"[package] check it: (cd {out} && sha256sum -c SHA256SUMS); upload the folder as it is, then evaluate "
          f"it with: python scripts/ch09_pixel_push.py eval --from-release <its URL or {out}>")
    return 0


# ======================================================================================================
# Command line
# ======================================================================================================
Config = TrainConfig | EvalConfig | AggregateConfig | PackageConfig | SelftestConfig


def parse_command_line(argv: Sequence[str] | None = None) -> Config:
    """The subcommand's config; a bad command line ends in one sentence and exit code 2 (cli_guard)."""
    return parse_with_one_line_errors(lambda: tyro.extras.subcommand_cli_from_dict(
        COMMANDS, args=argv, prog="ch09_pixel_push.py", description=__doc__.split("\n")[0]))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run the subcommand under the top-level guard: one line on stderr for whatever ends it.

    A bug's traceback goes to ``<artifact root>/logs/crash-<time>-<pid>.log`` (cli_guard says where).
    """
    cfg = parse_command_line(argv)
    root = getattr(cfg, "artifact_root", None) or REPO_ROOT
    return run_guarded(functools.partial(run_command, cfg), log_dir=Path(root).expanduser() / "logs",
                       interrupted="the checkpoints saved before are intact; run the same command again, with "
                                   "--resume if it had saved one")


def run_command(cfg: Config) -> int:
    """The subcommand. Its user errors (``UserError``, the labs' renderer and memory errors) carry an
    ``exit_code``, so the top-level guard prints their one sentence."""
    try:
        if isinstance(cfg, TrainConfig):
            return train(cfg)
        if isinstance(cfg, EvalConfig):
            return evaluate(cfg)
        if isinstance(cfg, PackageConfig):
            return package(cfg)
        if isinstance(cfg, SelftestConfig):
            return run_selftest(cfg)
        return aggregate(cfg)
    except WorkerTimeoutError as exc:  # the workers did not even start
        raise UserError(f"{exc}; try fewer --n-envs or a larger --worker-timeout.") from None


if __name__ == "__main__":
    mp.freeze_support()
    sys.exit(main())
