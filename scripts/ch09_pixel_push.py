"""Chapter 9 "Run It": SAC + HER on FetchPush-v4 from 84x84 pixels -- train, evaluate, aggregate, package.

The subcommands, each a short function below: ``train`` opens a run, learns, saves; ``eval`` runs deterministic
episodes of a checkpoint; ``aggregate`` turns eval files into one number; ``package`` writes a release. What they
train is the experiment, ``ch09/experiment.py``: ``TrainConfig`` (the flags of ``train``) and ``build_agent``
(which policy, encoder and replay buffer each flag combination means; every piece a lab component from
``scripts/labs/``). What a multi-day run needs besides (sessions, checkpoints, resume, signals, env workers,
results, statistics) is ``ch09/run/``; the fast update engine is ``ch09/engine/``.

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

import sys

try:
    from cli_guard import guard_entry_point, parse_with_one_line_errors, run_guarded
except ModuleNotFoundError:  # the project is not installed in this Python: one sentence, not a traceback
    print("error: this project is not installed in this Python; run `pip install -e .` in the repository, or run "
          "the command through `bash docker/dev.sh python ...`.", file=sys.stderr)
    sys.exit(2)  # a mistake the user can fix, as cli_guard would say it (it is what could not be imported)

guard_entry_point(__name__)  # first of all: a failing import or an early SIGTERM/Ctrl-C is one line

import functools
import multiprocessing as mp
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tyro
from stable_baselines3.common.vec_env import DummyVecEnv

from ch09.errors import UserError
from ch09.experiment import (
    EVAL_SEED_OFFSET,
    GOAL_MODE,
    LOG_INTERVAL_EPISODES,
    TrainConfig,
    build_agent,
    check_policy,
    check_train_arguments,
    differing_flags,
    env_factory,
    eval_env_factory,
    open_run,
    resolve_config,
    resume_agent,
    run_paths,
    saved_replay_buffer,
    session_seed,
    train_command,
    train_config_of,
    training_callbacks,
)
from ch09.run.artifacts import (
    PERIODIC_RE,
    REPO_ROOT,
    RunPaths,
    artifact_root,
    format_steps,
    write_json,
)
from ch09.run.checkpoints import (
    load_for_acting,
    meta_for_checkpoint,
    read_meta,
)
from ch09.run.release import checkpoint_for_eval, package_run
from ch09.run.results import eval_result, read_eval_file, run_episodes, success_over_seeds, success_over_steps
from ch09.run.session import TrainingSession
from ch09.run.validation import (
    check_device,
    check_seed,
    check_writable_folder,
)
from ch09.run.vec_env import WorkerTimeoutError
from ch09.run.video import EpisodeRecorder, VideoFolder
from ch09.selftest import SelftestConfig, run_selftest
from pixel_wrapper import make_fetch_env


# ======================================================================================================
# The subcommands' configs (train's is the experiment's TrainConfig); each field's docstring is its --help
# ======================================================================================================
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


COMMANDS = {"train": TrainConfig, "eval": EvalConfig, "aggregate": AggregateConfig, "package": PackageConfig,
            "selftest": SelftestConfig}


# ======================================================================================================
# train: open the run, learn, save
# ======================================================================================================
def train(cfg: TrainConfig) -> int:
    """Train one seed: open the run (fresh, or continued with --resume), learn to --total-steps, save."""
    cfg = resolve_config(cfg)
    check_train_arguments(cfg)
    paths = run_paths(cfg)
    print(f"[train] {paths.stem}: {'state' if cfg.full_state else 'pixels'}, replay {cfg.replay}, "
          f"{cfg.n_envs} env(s), artifacts under {paths.root}")
    meta = open_run(cfg, paths)
    if meta is None:
        return 0  # a resumed run that already has --total-steps

    env_fns = [env_factory(cfg) for _ in range(cfg.n_envs)]
    session = TrainingSession(paths, meta, env_fns, cfg.worker_timeout,
                              eval_env_fn=eval_env_factory(cfg) if cfg.eval_freq > 0 else None,
                              eval_seed=session_seed(cfg.seed + EVAL_SEED_OFFSET, int(meta["steps_done"])),
                              replay_buffer_path=saved_replay_buffer(cfg, paths))
    with session:
        if cfg.resume:
            model, restored = resume_agent(cfg, paths, session.env, meta)
        else:
            model, restored = build_agent(cfg, session.env), False
        session.begin(model, restored, engine=cfg.engine, precision=cfg.precision,
                      overlap_collection=cfg.overlap_collection)
        session.learn(model, cfg.total_steps, cfg.checkpoint_freq, training_callbacks(cfg, paths, session.eval_env),
                      LOG_INTERVAL_EPISODES)
    return session.report(model)


# ======================================================================================================
# eval: deterministic episodes on the env the checkpoint was trained on
# ======================================================================================================
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

    root = artifact_root(cfg.artifact_root)
    result = eval_result(checkpoint, cfg.from_release or cfg.checkpoint, meta, int(model.num_timesteps), seed,
                         episodes, videos.written, elapsed)
    out = RunPaths.eval_result_of(root, checkpoint)
    write_json(out, result)
    low, high = result["success_ci95"]
    print(f"{result['name']}: success_rate {result['success_rate']:.2f} (95% CI {low:.2f}-{high:.2f}, "
          f"{len(episodes)} episodes), mean final goal distance {result['mean_final_goal_distance']:.3f} m, at "
          f"{model.num_timesteps:,} steps")
    print(f"wrote {out}")
    for video in videos.written:
        print(f"wrote {root / video['file']} ({video['frames']} frames)")
    return 0


# ======================================================================================================
# aggregate: one number per configuration, as the Reproduce It block reports it
# ======================================================================================================
def aggregate(cfg: AggregateConfig) -> int:
    """One number over seeds of one step count, or success against steps when the files are a run's snapshots."""
    if not cfg.files:
        raise UserError("aggregate needs the eval files of one configuration, e.g. "
                        "results/ch09_<tag>_<env>_seed*_eval.json.")
    check_writable_folder("artifact_root", cfg.artifact_root)
    results = [read_eval_file(path.expanduser()) for path in cfg.files]
    configs = {(r["tag"], r["env_id"]) for r in results}
    if len(configs) > 1:
        raise UserError(f"The eval files mix configurations {sorted(configs)}; aggregate one tag and env at a time.")
    differing = differing_flags([r["config"] if isinstance(r.get("config"), dict) else {} for r in results])
    if differing:
        raise UserError(f"The eval files are of {results[0]['tag']} runs trained with different "
                        f"{', '.join(differing)} (flags that are not part of the tag); aggregate the runs of one "
                        "setting at a time.")
    (tag, env_id), root = next(iter(configs)), artifact_root(cfg.artifact_root)
    seeds = [r["train_seed"] for r in results]
    if len(set(seeds)) < len(seeds):  # snapshots of a run: one row per step count
        summary = success_over_steps(results)
        out = RunPaths.success_vs_steps(root, tag, env_id)
        write_json(out, summary)
        print(f"ch09_{tag} {env_id}: success against training steps")
        print(f"  {'steps':>12}  {'seeds':>5}  {'success':>7}  95% CI")
        for row in summary["rows"]:
            low, high = row["success_rate_ci95"]
            print(f"  {row['steps']:>12,}  {row['n_seeds']:>5}  {row['success_rate_mean']:>7.2f}  "
                  f"[{low:.2f}, {high:.2f}]")
    else:
        summary = success_over_seeds(results, [path.name for path in cfg.files])
        out = RunPaths.aggregate(root, tag, env_id)
        write_json(out, summary)
        n, (low, high) = summary["n_seeds"], summary["success_rate_ci95"]
        print(f"ch09_{tag} {env_id}")
        print(f"  success_rate: {summary['success_rate_mean']:.2f} +/- {summary['success_rate_std']:.2f} at "
              f"{summary['steps']:,} steps  ({n} seed{'s' if n > 1 else ''} x "
              f"{'/'.join(map(str, summary['episodes_per_seed']))} episodes)")
        print(f"  95% CI: [{low:.2f}, {high:.2f}]  ({summary['ci_method']})")
        print("  per seed: " + ", ".join(f"seed{r['train_seed']} {r['success_rate']:.2f}" for r in results))
    print(f"wrote {out}")
    return 0


# ======================================================================================================
# package: a release folder of a finished run, for the checkpoint track
# ======================================================================================================


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
    eval_path = RunPaths.eval_result_of(root, checkpoint)
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
    """The subcommand's config; a bad command line ends in one sentence and exit code 2 (cli_guard), which points
    to the subcommand's ``--help`` (its flags are listed there, not under the script's)."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in args if not arg.startswith("-")), None)
    prog = "ch09_pixel_push.py" + (f" {command}" if command in COMMANDS else "")
    return parse_with_one_line_errors(lambda: tyro.extras.subcommand_cli_from_dict(
        COMMANDS, args=argv, prog="ch09_pixel_push.py", description=__doc__.split("\n")[0]), prog=prog)


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
