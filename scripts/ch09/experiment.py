"""Chapter 9's experiment: which agent each investigation step trains, on which env, and what a run records.

Read it top to bottom: ``TrainConfig`` (the flags of ``train``; the docstring under each field is its ``--help``),
then ``build_agent`` (the policy, encoder and replay buffer each flag combination means: every piece a lab
component), the checks that turn a bad flag into one sentence, the envs, and the run record. The entry script
``scripts/ch09_pixel_push.py`` drives it (train, eval, aggregate, package); the machinery a multi-day run needs
(checkpoints, signals, env workers, statistics) is ``ch09.run``, the fast update ``ch09.engine``.

| investigation step | flags                                   | ``build_agent`` gives                                 |
|--------------------|-----------------------------------------|-------------------------------------------------------|
| 0                  | (none)                                  | SB3 MultiInputPolicy, NatureCNN, DrQ on               |
| 1                  | ``--encoder manip --no-drq``            | MultiInputPolicy, ManipulationCNN + SpatialSoftmax    |
| 2                  | ``--critic-encoder --no-drq``           | DrQv2SACPolicy: the critic trains the encoder         |
| 4                  | ``--critic-encoder``                    | the DrQ + SpatialSoftmax ablation                     |
| -                  | ``--full-state``                        | the state-vector control (pipeline check)             |
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias, cast

import gymnasium as gym
import numpy as np
import tyro
from gymnasium import spaces
from stable_baselines3 import SAC
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv
from stable_baselines3.her import HerReplayBuffer

from ch09.engine.fast_sac import FastSAC
from ch09.engine.framestack_replay import FrameStackHerReplayBuffer
from ch09.engine.memory import memory_plan, memory_preflight
from ch09.errors import UserError
from ch09.run.artifacts import (
    CHECKPOINT_FORMAT,
    INVESTIGATION_TOTAL_STEPS,
    REPO_ROOT,
    RunPaths,
    artifact_root,
    clean_interrupted_writes,
    format_steps,
    git_commit,
    now_iso,
    package_versions,
)
from ch09.run.callbacks import HParamCallback, NoCudaNotice, PeriodicEvalCallback, ProgressBarCallback, testing_hooks
from ch09.run.checkpoints import (
    check_room_to_resume,
    describe_policy,
    guard_fresh_run,
    load_agent,
    read_meta,
    restore_replay_buffer,
)
from ch09.run.validation import check_device, check_seed, check_writable_folder, positive_seconds
from ch09.run.video import TENSORBOARD_CAMERA_SIZE, EpisodeRecorder
from cli_guard import parse_with_one_line_errors
from drqv2_sac_policy import DrQv2SACPolicy, print_bridge, routing_report
from image_augmentation import HerDrQDictReplayBuffer
from lab_support import MemoryBudgetError
from manipulation_encoder import ManipulationExtractor
from pixel_wrapper import FRAME_STACK, IMAGE_SIZE, PIXEL_KEY, SUPPORTED_ENV_IDS, make_fetch_env, pixel_observation_space
from visual_encoder import NormalizedCombinedExtractor

ReplayKind: TypeAlias = Literal["sb3", "framestack"]
"""sb3 (SB3's HER buffers, obs and next_obs stored whole) or framestack (FrameStackHerReplayBuffer)."""


PIXEL_DEFAULT_REPLAY: ReplayKind = "framestack"
"""Replay used for pixel runs when --replay is not given: each frame stored once."""


GOAL_MODE = "both"
"""Pixels for control, achieved/desired goals as 3-D vectors for HER (the chapter's 'visual HER synthesis')."""


EVAL_SEED_OFFSET = 10_000
"""Eval envs are seeded with seed + this, so evaluation goals are not the training stream's goals."""


def session_seed(seed: int, from_step: int) -> int:
    """The seed of a training session that starts at ``from_step``: ``seed`` itself for a fresh run.

    A resume gets a seed of its own, drawn from (seed, from_step) by NumPy's SeedSequence: ``SAC.load`` seeds
    every generator (torch, NumPy, the envs' goals) with the run's seed, so without it each resumed session
    would replay the first session's goals and draws. The same resume of the same run draws the same again.
    """
    if from_step == 0:
        return seed
    return int(np.random.SeedSequence([seed, from_step]).generate_state(1)[0])


LOG_INTERVAL_EPISODES = 4
"""SB3 writes the rollout/ and train/ curves every this many episodes."""


CHAPTER_HER_N_SAMPLED_GOAL = 8
"""The Experiment Card's k; runs with another k carry it in their artifact names."""


# ======================================================================================================
# The configuration of a run: the flags of `train` (the docstring under each field is its --help text)
# ======================================================================================================
@dataclass
class TrainConfig:
    """Train SAC + HER for one seed."""

    env: str = "FetchPush-v4"
    """Fetch goal task: FetchPush-v4 (the chapter), or FetchReach-v4 etc. to check quickly that learning works."""
    seed: int = 0
    """Random seed (torch, numpy, env resets); also part of every artifact name."""
    total_steps: int = INVESTIGATION_TOTAL_STEPS
    """Env steps to train for, counted over all envs; on --resume, the total to reach (raise it to extend a run)."""
    full_state: bool = False
    """Observe the Fetch state vector (25-D for Push, 10-D for Reach) instead of pixels: the pipeline check."""
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
    replay: ReplayKind | None = None
    """sb3 (HerReplayBuffer: obs, next_obs stored whole) or framestack (each frame once); None: framestack if pixels."""
    buffer_size: int = 500_000
    """Replay capacity in transitions (the Experiment Card's 500K). The preflight refuses one that does not fit."""
    frames_in_ram: bool = False
    """Pixels, --replay framestack: keep the frames in RAM instead of on the training GPU, for a GPU without room
    for --buffer-size (each batch is then drawn on the host and copied to the GPU: slower)."""
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
    overlap_collection: bool = False
    """FastSAC: run the updates of env step t while the envs simulate step t + 1, so the two take the time of
    the longer one; the action of step t + 1 then comes from the weights before step t's updates (a one-step
    policy lag). Off: the updates run between env steps, as SB3's do."""
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
    """Start over: move an earlier run's TensorBoard folder, checkpoints and evaluations aside (renamed with a
    timestamp)."""
    compare_sb3: Annotated[bool, tyro.conf.arg(aliases=("--bridge",))] = False
    """Print the lab's gradient-routing comparison (SB3's shared encoder vs DrQv2SACPolicy), then which loss trains
    the encoder of a run with these flags, before anything else (also where the command is then refused)."""
    progress: bool = True
    """Show a progress bar with steps/s and ETA."""
    artifact_root: Path = REPO_ROOT
    """Folder that holds checkpoints/, results/ and runs/."""


EXPERIMENT_FIELDS = ("env", "seed", "full_state", "encoder", "critic_encoder", "drq", "spatial_softmax",
                     "native_render", "replay", "buffer_size", "her_n_sampled_goal", "batch_size", "learning_rate",
                     "gamma", "tau", "n_envs")
"""Fields a resume must not change: SAC.load restores them from the checkpoint, so a different value on the
command line would be silently ignored. --total-steps, --eval-*, --checkpoint-freq, --device may change."""
SETTING_FIELDS = tuple(name for name in EXPERIMENT_FIELDS if name not in ("seed", "n_envs", "replay"))
"""What makes runs one setting, whose seeds a mean over seeds may pool: the experiment's fields but the seed and
two choices of how a run is computed (--n-envs keeps one update per env step; --replay stores the same data)."""


def differing_flags(configs: Sequence[dict[str, Any]], fields: Sequence[str] = SETTING_FIELDS) -> list[str]:
    """The train flags (``--batch-size``, ...) among ``fields`` on which run configs disagree; each config is
    ``TrainConfig`` as a dict (``asdict``, or the ``config`` a .meta.json or an eval file records)."""
    return [f"--{name.replace('_', '-')}" for name in fields
            if len({repr(config.get(name)) for config in configs}) > 1]


# ======================================================================================================
# The agent: which policy, encoder and replay buffer each flag combination means
# ======================================================================================================
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
    extractor: type[BaseFeaturesExtractor]
    if cfg.encoder == "manip":
        extractor, extractor_kwargs = ManipulationExtractor, {"spatial_softmax": cfg.spatial_softmax}
    else:
        extractor, extractor_kwargs = NormalizedCombinedExtractor, {}
    policy = DrQv2SACPolicy if cfg.critic_encoder else "MultiInputPolicy"
    # The encoders divide the uint8 pixels by 255 themselves: SB3 must only cast them to float.
    return policy, {"features_extractor_class": extractor, "features_extractor_kwargs": extractor_kwargs,
                    "normalize_images": False}


def replay_setup(cfg: TrainConfig) -> tuple[type, dict[str, Any]]:
    """Replay buffer class and its kwargs; HER ('future') is on in every configuration (--her-n-sampled-goal 0: off).

    | --replay               | DrQ on                    | DrQ off (--no-drq, --full-state) |
    |------------------------|---------------------------|----------------------------------|
    | framestack (pixels)    | FrameStackHerReplayBuffer | FrameStackHerReplayBuffer        |
    | sb3                    | HerDrQDictReplayBuffer    | HerReplayBuffer                  |
    """
    her_kwargs: dict[str, Any] = {"n_sampled_goal": cfg.her_n_sampled_goal, "goal_selection_strategy": "future"}
    if cfg.replay == "framestack":  # pixels, or a plain vectorised HER buffer for --full-state (drq is off there)
        return FrameStackHerReplayBuffer, {**her_kwargs, "drq": cfg.drq, "frame_stack": FRAME_STACK,
                                           "pixel_key": PIXEL_KEY, **({"storage_device": "cpu"} if cfg.frames_in_ram
                                                                      else {})}
    if cfg.drq:
        return HerDrQDictReplayBuffer, {**her_kwargs, "pixel_key": PIXEL_KEY}
    return HerReplayBuffer, her_kwargs


def agent_class(cfg: TrainConfig) -> tuple[type[SAC], dict[str, Any]]:
    """SB3's SAC (``--engine sb3``), or FastSAC and its options: the same algorithm with a faster ``train()``,
    whose checkpoints are plain SAC checkpoints (``ch09.engine.fast_sac``)."""
    if cfg.engine == "sb3":
        return SAC, {}
    return FastSAC, {"precision": cfg.precision, "cuda_graph": cfg.cuda_graph,
                     "overlap_collection": cfg.overlap_collection}


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


# ======================================================================================================
# The flags checked and named: every refusal is one sentence, before anything is built
# ======================================================================================================
def parse_train_args(args: Sequence[str]) -> TrainConfig:
    """``train``'s flags, parsed exactly as ``ch09_pixel_push.py train`` parses them (a bad one: tyro's SystemExit)."""
    return parse_with_one_line_errors(
        lambda: tyro.cli(TrainConfig, args=list(args), prog="ch09_pixel_push.py train"))


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
                      "--no-spatial-softmax": not cfg.spatial_softmax, "--no-native-render": not cfg.native_render,
                      "--frames-in-ram": cfg.frames_in_ram}
        given = [flag for flag, is_given in pixel_only.items() if is_given]
        if given:
            raise UserError(f"{', '.join(given)} only applies to pixel runs; drop it or drop --full-state.")
        return dataclasses.replace(cfg, drq=False, replay=cfg.replay or "sb3")

    if cfg.encoder is None:
        cfg.encoder = "manip" if (cfg.critic_encoder or not cfg.spatial_softmax) else "nature"
    if cfg.encoder == "nature" and not cfg.spatial_softmax:
        raise UserError("--no-spatial-softmax changes the ManipulationCNN head; use it with --encoder manip.")
    cfg.replay = cfg.replay or PIXEL_DEFAULT_REPLAY
    if cfg.frames_in_ram and cfg.replay == "sb3":
        raise UserError("--frames-in-ram places the frame-stack buffer's frames; SB3's buffer (--replay sb3) keeps "
                        "everything in RAM already: drop --frames-in-ram.")
    return cfg


def resolved_replay(cfg: TrainConfig) -> ReplayKind:
    """The replay of a config ``resolve_config`` has filled (``--replay``, or the default for pixels or state)."""
    assert cfg.replay is not None, "resolve_config fills --replay; resolve the config first"
    return cfg.replay


def saved_replay_buffer(cfg: TrainConfig, paths: RunPaths) -> Path | None:
    """Where this run saves its replay buffer at every checkpoint; None without --save-replay-buffer."""
    return paths.replay_buffer(resolved_replay(cfg)) if cfg.save_replay_buffer else None


def configured_policy(cfg: TrainConfig) -> BasePolicy:
    """The policy ``build_agent`` gives a run with these flags, built alone (no env, no buffer): what a resumed
    run's checkpoint holds too, since ``check_policy`` refuses one that differs."""
    policy, policy_kwargs = policy_setup(cfg)
    policy_class = SAC.policy_aliases[policy] if isinstance(policy, str) else policy
    return policy_class(*training_spaces(cfg), lambda _: cfg.learning_rate, **policy_kwargs)


def routing_line(policy: Any) -> str:
    """Which loss trains this run's encoder, read from its optimizers (``routing_report``), in one line: the check
    the chapter's "What can go wrong" asks of ``--compare-sb3`` for a run stuck at 5%."""
    report = routing_report(policy)
    n, in_actor, in_critic = (report[key] for key in ("encoder_tensors", "encoder_in_actor_optimizer",
                                                      "encoder_in_critic_optimizer"))
    head = (f"[bridge] this run: {report['policy_class']} with {report['encoder_class']}; the actor's encoder "
            f"tensors in the actor optimizer {in_actor}/{n}, the critic's in the critic optimizer {in_critic}/{n}")
    if report["shared_encoder"] and in_actor == 0 and in_critic == n:
        return f"{head}: one shared encoder, trained by the critic loss alone (Step 2's routing)."
    what = ("two encoders, trained by the actor loss and the critic loss" if not report["shared_encoder"]
            else f"one shared encoder, trained by the {report['trained_by']}")
    return (f"{head}: {what}, SB3's routing; --critic-encoder (DrQv2SACPolicy) trains one shared encoder with the "
            "critic loss alone.")


def check_train_arguments(cfg: TrainConfig) -> None:
    """What ``resolve_config`` does not judge: this machine's devices and folders, a run that would never train
    or would fail at its first sample, and flags the chosen engine would ignore. Called before anything is built
    (no env, no worker, no model)."""
    if cfg.learning_starts >= cfg.total_steps:
        raise UserError(f"--learning-starts {cfg.learning_starts:,} >= --total-steps {cfg.total_steps:,}: the run "
                        "would only collect random steps and never update; lower --learning-starts or raise "
                        "--total-steps.")
    check_first_sample(cfg)
    # Here, not in resolve_config, which also rebuilds the configs that older checkpoints recorded.
    if cfg.engine == "sb3":  # SB3's train() has neither: the run would silently be fp32 and not overlapped
        fast_only = {"--precision bf16": cfg.precision == "bf16", "--overlap-collection": cfg.overlap_collection}
        given = [flag for flag, is_given in fast_only.items() if is_given]
        if given:
            one = len(given) == 1
            raise UserError(f"{' and '.join(given)} only work{'s' if one else ''} with --engine fast; drop "
                            f"{'it' if one else 'them'} or drop --engine sb3.")
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


def episode_steps(env_id: str) -> int:
    """Env steps per episode of ``env_id``: its registered time limit (Fetch episodes only truncate)."""
    return gym.spec(env_id).max_episode_steps or 1


def check_first_sample(cfg: TrainConfig) -> None:
    """HER buffers (SB3's and the frame-once one) sample only from finished episodes: refuse a
    ``--learning-starts`` that lets the first update come before every env has finished one, and a
    ``--buffer-size`` that cannot hold one episode per env (the buffer would stop the run at its first
    sample, or refuse to be built)."""
    try:
        episode_length = episode_steps(cfg.env)
    except gym.error.Error:  # not registered here (MuJoCo did not start): the renderer check says so, later
        return
    smallest_buffer = (episode_length + 1) * cfg.n_envs  # the frame-once buffer also keeps each episode's first obs
    if cfg.buffer_size < smallest_buffer:
        raise UserError(f"--buffer-size {cfg.buffer_size:,} cannot hold one {episode_length}-step episode per env "
                        f"({cfg.n_envs} env(s)), and the HER replay buffer samples only finished episodes; use "
                        f"--buffer-size {smallest_buffer:,} or more.")
    needed = episode_length * cfg.n_envs
    if cfg.learning_starts < needed:
        raise UserError(f"--learning-starts {cfg.learning_starts:,} comes before every env has finished its first "
                        f"{episode_length}-step episode ({cfg.n_envs} env(s)), and the HER replay buffer samples only "
                        f"finished episodes; use --learning-starts {needed:,} or more.")


def check_replay_memory(cfg: TrainConfig, observation_space: spaces.Space, action_space: spaces.Space
                        ) -> list[dict[str, Any]]:
    """The memory preflight of this config's replay buffer, its refusal phrased in the flags to change."""
    replay_class, replay_kwargs = replay_setup(cfg)
    plan = memory_plan(replay_class, replay_kwargs, cfg.buffer_size, observation_space, action_space,
                       n_envs=cfg.n_envs, device=cfg.device)
    try:
        return memory_preflight(plan)
    except MemoryBudgetError as exc:
        hint = ""
        if cfg.replay == "sb3" and not cfg.full_state:
            hint = "; --replay framestack stores each frame once"
        elif exc.device != "cpu" and not cfg.full_state:  # the frames, on the training GPU
            hint = "; or keep the frames in RAM with --frames-in-ram (slower: each batch is drawn on the host)"
        raise UserError(f"--buffer-size {cfg.buffer_size:,} does not fit: {str(exc).rstrip('.')}{hint}.") from None


def config_tag(cfg: TrainConfig) -> str:
    """``fullstate``, or ``<nature|manip>[_noSS][_noDrQ][_criticEnc][_resize480]`` (e.g. manip_noDrQ_criticEnc),
    then ``_k<N>`` when HER relabels N goals instead of the chapter's (Exercise 2's k=4 gets its own files)."""
    her_suffix = "" if cfg.her_n_sampled_goal == CHAPTER_HER_N_SAMPLED_GOAL else f"_k{cfg.her_n_sampled_goal}"
    if cfg.full_state:
        return "fullstate" + her_suffix
    tag: str = cfg.encoder or "nature"
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
def make_monitored_env(env_id: str, pixels: bool, native_render: bool) -> gym.Env:
    """The env every process builds: make_fetch_env + Monitor (episode returns and lengths for TensorBoard)."""
    return Monitor(make_fetch_env(env_id, pixels=pixels, native_render=native_render, goal_mode=GOAL_MODE))


def env_factory(cfg: TrainConfig) -> functools.partial[gym.Env]:
    """A picklable zero-argument env constructor (SubprocVecEnv ships it to each worker)."""
    return functools.partial(make_monitored_env, cfg.env, not cfg.full_state, cfg.native_render)


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
            # gymnasium types an env's space as Space; a Fetch goal env's is a Dict (observation and goals)
            return cast(spaces.Dict, state_env.observation_space), state_env.action_space
        return pixel_observation_space(goal_mode=GOAL_MODE), state_env.action_space
    finally:
        state_env.close()


# ======================================================================================================
# The run record: what a run's .meta.json says, and a resume's checks against it
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


def open_run(cfg: TrainConfig, paths: RunPaths) -> dict[str, Any] | None:
    """The run record this session continues (``--resume``) or starts, after every check that needs no env and no
    worker (the memory preflight included); None when a resumed run already has ``--total-steps``."""
    if cfg.compare_sb3:  # first: a stuck run's check, answered even where the command is refused below
        print_bridge()
        print(routing_line(configured_policy(cfg)))
    for note in clean_interrupted_writes(paths.checkpoint_dir, paths.stem):  # a kill mid-write leaves these
        print(f"[train] {note}")
    meta = None
    if cfg.resume:
        meta = resume_meta(cfg, paths)
        check_room_to_resume(paths, saved_replay_buffer(cfg, paths))
        if meta.get("steps_done", 0) >= cfg.total_steps:
            print(f"[resume] {paths.checkpoint} already has {meta['steps_done']:,} steps >= --total-steps "
                  f"{cfg.total_steps:,}; raise --total-steps to train further.")
            return None
        note_resume_without_updates(cfg, paths, meta)
        meta["config"] |= {k: v for k, v in asdict(cfg).items() if k not in EXPERIMENT_FIELDS}
    else:
        guard_fresh_run(paths, cfg.move_old_run)
    memory = check_replay_memory(cfg, *training_spaces(cfg))  # before any env worker exists
    return meta if meta is not None else new_meta(cfg, paths, memory)


def training_callbacks(cfg: TrainConfig, paths: RunPaths, eval_env: DummyVecEnv | None) -> list[BaseCallback]:
    """What runs beside learning (the session adds the periodic checkpoints): hyper-parameters for TensorBoard,
    the periodic evaluation, the progress bar, the no-GPU notice."""
    evaluator = PeriodicEvalCallback(eval_env, cfg.eval_freq, cfg.eval_episodes,
                                     recorder=eval_recorder(eval_env)) if eval_env is not None else None
    callbacks: list[BaseCallback] = [HParamCallback({**asdict(cfg), "tag": config_tag(cfg)})]
    if evaluator is not None:
        callbacks.append(evaluator)
    if cfg.progress:
        callbacks.append(ProgressBarCallback(cfg.total_steps, paths.stem, evaluator))
    if not cfg.full_state:
        callbacks.append(NoCudaNotice(cfg.total_steps))  # says nothing on a CUDA device
    return callbacks + testing_hooks(paths.stem)  # empty unless a test sets CH09_TEST_KILL_AT_STEP


def note_resume_without_updates(cfg: TrainConfig, paths: RunPaths, meta: dict[str, Any]) -> None:
    """Say so when a resume will end before its first update: without its replay buffer (not saved, or missing)
    it collects ``--learning-starts`` fresh steps first (``restore_replay_buffer``). Not refused: a sweep retries
    a run killed near its end with the run's own flags, and it must be able to finish."""
    steps, saved = int(meta["steps_done"]), meta["replay_buffer"]
    if saved is not None and saved["steps"] == steps and paths.replay_buffer(resolved_replay(cfg)).exists():
        return
    if steps + cfg.learning_starts >= cfg.total_steps:
        print(f"[resume] note: with no saved replay buffer, this session collects --learning-starts "
              f"{cfg.learning_starts:,} fresh steps before updating (to step {steps + cfg.learning_starts:,}), so it "
              f"ends at --total-steps {cfg.total_steps:,} without an update; raise --total-steps to train further.")


def changed_experiment_flags(config: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """``--flag value (checkpoint: saved value)`` for each of EXPERIMENT_FIELDS on which ``config`` (a
    ``TrainConfig`` as a dict) differs from the ``config`` a checkpoint's .meta.json recorded."""
    return [f"--{name.replace('_', '-')} {config[name]!r} (checkpoint: {saved.get(name)!r})"
            for name in EXPERIMENT_FIELDS if saved.get(name) != config[name]]


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
    differing = changed_experiment_flags(asdict(cfg), meta["config"])
    if differing:
        raise UserError(f"Checkpoint {paths.checkpoint} comes from another config: {'; '.join(differing)}; resume "
                        "with the original flags, or start a separate run with --move-old-run.")
    return meta


def resume_agent(cfg: TrainConfig, paths: RunPaths, env: VecEnv, meta: dict[str, Any]) -> tuple[SAC, bool]:
    """The latest checkpoint with its replay buffer (or ``learning_starts`` moved past the restored steps)."""
    algorithm, engine_options = agent_class(cfg)  # --engine may differ from the saved run's
    model = load_agent(paths.checkpoint, env, cfg.device, algorithm=algorithm, **engine_options)
    check_policy(model, cfg, paths.checkpoint, "the flags ask for")
    model.set_random_seed(session_seed(cfg.seed, model.num_timesteps))  # the envs take it at their next reset
    restored = restore_replay_buffer(model, paths.replay_buffer(resolved_replay(cfg)), meta.get("replay_buffer"),
                                     cfg.learning_starts)
    return model, restored


def train_config_of(meta: dict[str, Any], checkpoint: Path) -> TrainConfig:
    """The training config a checkpoint's metadata records (fields this version no longer has are ignored)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        return resolve_config(TrainConfig(**{k: v for k, v in meta["config"].items() if k in known}))
    except TypeError as exc:
        raise UserError(f"The metadata of {checkpoint} does not describe a training config ({exc}).") from None


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
