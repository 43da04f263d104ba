"""Tests of the production script scripts/ch09_pixel_push.py (train, eval, aggregate).

Real training runs go through a subprocess, exactly as a reader types them, with tiny budgets (150-300 env
steps, a 500-transition buffer, batch 8-32) and every artifact under pytest's tmp dir. Runs are module
fixtures shared by several tests, so the whole file costs a handful of runs. Errors a user can cause are
checked in-process through ``main(argv)`` (no interpreter start-up): each must be ONE line starting with
"error:" and exit code 2, never a traceback; so must a bad command line (tyro's message).

The learning tests (``-m slow``) train FetchReach-v4 from the state vector to >= 0.9 eval success.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import ch09_pixel_push as pixel_push
import cloudpickle
import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3.common.vec_env import DummyVecEnv

from ch09 import experiment
from ch09.errors import UserError
from ch09.run import artifacts, stats
from ch09.run.checkpoints import guard_fresh_run, load_for_acting
from ch09.run.vec_env import TimeoutSubprocVecEnv, WorkerTimeoutError, stop_signals_held
from lab_support import MemoryBudgetError

REQUIRED_TAGS = {"train/critic_loss", "train/actor_loss", "train/ent_coef", "rollout/success_rate",
                 "eval/success_rate", "time/fps"}
PIXEL_BUDGET = ["--total-steps", "150", "--buffer-size", "500", "--batch-size", "8", "--learning-starts", "100",
                "--eval-freq", "150", "--eval-episodes", "1", "--checkpoint-freq", "100", "--device", "cpu",
                "--no-progress", "--no-eval-video"]
"""Pixel runs at a tiny budget; the eval video, which renders and encodes an episode, is tested in test_video.py."""


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------
def hparams(run_dir: Path) -> dict[str, Any]:
    """The hyper-parameters written to TensorBoard's HPARAMS tab."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    content = accumulator.summary_metadata["_hparams_/session_start_info"].plugin_data.content
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
            for key, value in info.hparams.items()}





def assert_one_point_per_step(logged: dict[str, list[tuple[int, float]]]) -> None:
    """Each TensorBoard curve has at most one point per step: a second one draws a vertical jump."""
    for tag, points in logged.items():
        steps = [step for step, _ in points]
        assert len(steps) == len(set(steps)), f"{tag} logged twice at a step: {steps}"


def load_meta(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------------
# fixtures: the real runs, each made once per module
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ch09_artifacts")


@pytest.fixture(scope="module")
def nature_run(root: Path, production) -> dict[str, Any]:
    """Step 0 exactly as the chapter runs it (NatureCNN, DrQ on, default replay), at a tiny budget."""
    proc = production.check("train", "--seed", "0", *PIXEL_BUDGET, "--artifact-root", str(root))
    return {"proc": proc, "stem": "ch09_nature_FetchPush-v4_seed0",
            "run_dir": root / "runs/ch09_nature/FetchPush-v4/seed0"}


@pytest.fixture(scope="module")
def critic_run(root: Path, production) -> dict[str, Any]:
    """Step 2 (critic-encoder routing, no DrQ) on SB3's HerReplayBuffer (Step 0 covers the default replay)."""
    proc = production.check("train", "--seed", "0", "--critic-encoder", "--no-drq", "--replay", "sb3",
                            *PIXEL_BUDGET, "--artifact-root", str(root))
    return {"proc": proc, "stem": "ch09_manip_noDrQ_criticEnc_FetchPush-v4_seed0",
            "run_dir": root / "runs/ch09_manip_noDrQ_criticEnc/FetchPush-v4/seed0"}


@pytest.fixture(scope="module")
def state_runs(root: Path, production) -> dict[str, Any]:
    """Two full-state seeds (seed 1 with 2 SubprocVecEnv workers), evaluated, ready to aggregate.

    The seed-0 run is resumed later (test_resume_...); the eval files are written here, before that."""
    budget = ["--total-steps", "200", *production.STATE_BUDGET, "--artifact-root", str(root)]
    seed0 = production.check("train", "--seed", "0", *budget)
    seed1 = production.check("train", "--seed", "1", "--n-envs", "2", *budget)
    evals = {}
    for seed in (0, 1):
        checkpoint = root / f"checkpoints/ch09_fullstate_FetchPush-v4_seed{seed}.zip"
        assert pixel_push.main(["eval", "--checkpoint", str(checkpoint), "--n-episodes", "2", "--device", "cpu",
                          "--artifact-root", str(root)]) == 0
        evals[seed] = root / f"results/ch09_fullstate_FetchPush-v4_seed{seed}_eval.json"
    return {"procs": (seed0, seed1), "evals": evals}


# ------------------------------------------------------------------------------------------------------
# configuration: the command line, tags, and which components each investigation step uses
# ------------------------------------------------------------------------------------------------------
STEPS = {  # flags -> (tag, policy, extractor, replay class)
    "step0": ([], "nature", "MultiInputPolicy", "NormalizedCombinedExtractor", "HerDrQDictReplayBuffer"),
    "step1": (["--encoder", "manip", "--no-drq"], "manip_noDrQ", "MultiInputPolicy", "ManipulationExtractor",
              "HerReplayBuffer"),
    "step2": (["--critic-encoder", "--no-drq"], "manip_noDrQ_criticEnc", "DrQv2SACPolicy", "ManipulationExtractor",
              "HerReplayBuffer"),
    "step4": (["--critic-encoder"], "manip_criticEnc", "DrQv2SACPolicy", "ManipulationExtractor",
              "HerDrQDictReplayBuffer"),
    "full_state": (["--full-state"], "fullstate", "MultiInputPolicy", "CombinedExtractor", "HerReplayBuffer"),
    "no_ss_480": (["--no-spatial-softmax", "--no-native-render", "--no-drq"], "manip_noSS_noDrQ_resize480",
                  "MultiInputPolicy", "ManipulationExtractor", "HerReplayBuffer"),
    "framestack": (["--critic-encoder", "--no-drq", "--replay", "framestack"], "manip_noDrQ_criticEnc",
                   "DrQv2SACPolicy", "ManipulationExtractor", "FrameStackHerReplayBuffer"),
}


def parse_train(*argv: str) -> experiment.TrainConfig:
    return experiment.resolve_config(pixel_push.parse_command_line(["train", *argv]))


@pytest.mark.parametrize("step", list(STEPS))
def test_each_investigation_step_maps_to_its_components(step: str) -> None:
    flags, tag, policy, extractor, replay = STEPS[step]
    pin_replay = [] if "--replay" in flags or "--full-state" in flags else ["--replay", "sb3"]  # any default
    cfg = parse_train(*flags, *pin_replay)
    assert experiment.config_tag(cfg) == tag
    assert experiment.expected_policy(cfg) == {"policy": policy, "features_extractor": extractor}
    replay_class, replay_kwargs = experiment.replay_setup(cfg)
    assert replay_class.__name__ == replay
    assert replay_kwargs["n_sampled_goal"] == 8 and replay_kwargs["goal_selection_strategy"] == "future"


def readme_production_commands() -> list[list[str]]:
    """Every production command README.md prints: code-block lines (continuations joined, shell variables set
    to a value) and the ``train ...`` cells of the investigation table ("Prefix each command with ...")."""
    text = (artifacts.REPO_ROOT / "README.md").read_text()
    commands = []
    for block in text.split("```")[1::2]:
        for line in block.replace("\\\n", " ").splitlines():
            if "ch09_pixel_push.py" in line and not line.lstrip().startswith("#"):
                line = line.split("ch09_pixel_push.py", 1)[1].split("  #", 1)[0]
                line = line.replace("$seed", "0").replace("$steps", "1M").replace("$R", "releases/x")
                commands.append(shlex.split(line))
    commands += [shlex.split(cell) for cell in re.findall(r"^\| [^|]+ \| `(train [^`]+)`", text, re.MULTILINE)]
    return commands


def test_every_command_the_readme_prints_parses() -> None:
    commands = readme_production_commands()
    assert len(commands) >= 15, f"found only {len(commands)} commands: the README's layout changed"
    for argv in commands:
        try:
            cfg = pixel_push.parse_command_line(argv)
        except SystemExit as exc:
            pytest.fail(f"the README's `ch09_pixel_push.py {' '.join(argv)}` does not parse (exit {exc.code})")
        assert type(cfg).__name__.lower().startswith(argv[0][:3]), argv


def test_another_her_k_gets_its_own_artifact_names() -> None:
    chapter = parse_train("--critic-encoder", "--no-drq", "--her-n-sampled-goal", "8")
    exercise = parse_train("--critic-encoder", "--no-drq", "--her-n-sampled-goal", "4")
    assert experiment.config_tag(chapter) == "manip_noDrQ_criticEnc"
    assert experiment.config_tag(exercise) == "manip_noDrQ_criticEnc_k4"
    assert experiment.config_tag(parse_train("--full-state", "--her-n-sampled-goal", "4")) == "fullstate_k4"
    assert experiment.run_paths(exercise).stem != experiment.run_paths(chapter).stem


def test_a_pixel_checkpoint_of_sb3s_default_path_acts_the_same_after_loading(tmp_path: Path) -> None:
    """A checkpoint trained with SB3's default normalize_images=True (as older ones were): SB3 divides, the
    encoder remembers that it must not, and load_for_acting gives the same actions."""
    from stable_baselines3 import SAC
    from stable_baselines3.common.vec_env import DummyVecEnv

    from manipulation_encoder import ManipulationExtractor
    from pixel_wrapper import make_fetch_env

    env = DummyVecEnv([lambda: make_fetch_env("FetchPush-v4", pixels=True, goal_mode="both")])
    try:
        default_path = SAC("MultiInputPolicy", env, buffer_size=10, learning_starts=10**6, device="cpu", seed=0,
                           policy_kwargs=dict(features_extractor_class=ManipulationExtractor))  # SB3 divides
        obs = env.reset()
        action, _ = default_path.predict(obs, deterministic=True)  # the first batch decides: divided already
        default_path.save(tmp_path / "default.zip")
        loaded = load_for_acting(tmp_path / "default.zip")
        assert loaded.policy.normalize_images
        np.testing.assert_allclose(loaded.predict(obs, deterministic=True)[0], action, atol=1e-6)
    finally:
        env.close()


def test_the_flags_the_chapter_prints(capsys: pytest.CaptureFixture) -> None:
    cfg = parse_train("--seed", "0", "--critic-encoder", "--no-drq", "--buffer-size", "500000",
                      "--her-n-sampled-goal", "8", "--total-steps", "5000000", "--checkpoint-freq", "500000")
    assert (cfg.critic_encoder, cfg.drq, cfg.buffer_size, cfg.her_n_sampled_goal) == (True, False, 500_000, 8)
    assert (cfg.total_steps, cfg.checkpoint_freq) == (5_000_000, 500_000)
    assert (cfg.encoder, cfg.replay) == ("manip", "framestack")
    assert parse_train("--native-render").native_render is True
    assert parse_train("--no-native-render").native_render is False
    assert parse_train("--bridge").compare_sb3 is True and parse_train("--compare-sb3").compare_sb3 is True
    assert parse_train("--no-spatial-softmax").encoder == "manip"
    assert parse_train("--resume").resume is True
    assert parse_train("--critic-encoder", "--encoder", "nature").encoder == "nature"  # explicit wins
    cfg = parse_train("--full-state")
    assert (cfg.encoder, cfg.drq, cfg.replay) == (None, False, "sb3")
    assert pixel_push.parse_command_line(["aggregate", "a.json", "b.json"]).files == [Path("a.json"), Path("b.json")]


def test_help_shows_field_docs_and_real_defaults(capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping by the terminal: the lines are the help's own
    with pytest.raises(SystemExit) as exit_info:
        pixel_push.parse_command_line(["train", "--help"])
    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "breakthrough" in help_text and "--no-drq" in help_text  # field docstrings became --help
    assert "500000" in help_text and str(artifacts.REPO_ROOT) in help_text  # --buffer-size, --artifact-root
    # a field docstring of two source lines is one paragraph, not cut where its first source line ends
    assert "instead of on the training GPU, for a GPU without room for --buffer-size (each batch" in help_text


@pytest.mark.parametrize("argv, fragments", [
    (["juggle"], ["unknown command 'juggle'", "train, eval, aggregate, package"]),
    ([], ["needs a command", "train, eval, aggregate, package"]),
    # a flag of a command is listed by that command's --help, not by the script's
    (["train", "--sed", "1"], ["'--sed 1'", "did you mean --seed?", "`ch09_pixel_push.py train --help` lists"]),
    (["train", "--seed", "zero"], ["--seed INT", "'zero'", "see `ch09_pixel_push.py train --help`"]),
    (["train", "--engine", "slow"], ["'slow'", "--engine", "fast, sb3"]),
    (["train", "--seed"], ["--seed needs a value"]),
    (["train", "--engine", "sb3", "--precision", "bf16", "--overlap-collection"],
     ["--precision bf16 and --overlap-collection only work with --engine fast", "drop them or drop --engine sb3"]),
    (["train", "--full-state", "--n-envs", "2", "--learning-starts", "60"],  # the HER buffer would raise
     ["--learning-starts 60", "50-step episode (2 env(s))", "--learning-starts 100 or more"]),
    (["package"], ["package needs --checkpoint"]),
])
def test_a_bad_command_line_is_one_sentence_and_exit_2(cli, argv: list[str], fragments: list[str]) -> None:
    """Unknown command, unknown flag, bad value, bad choice, missing value, missing required flag (eval's
    source is checked in tests/test_release.py): tyro's box becomes one sentence naming the valid choices."""
    code, _, err = cli.run(*argv)
    cli.assert_user_error(code, err, *fragments)


def test_step_labels_of_periodic_checkpoints() -> None:
    for steps, label in [(500_000, "500K"), (1_000_000, "1M"), (1_500_000, "1.5M"), (5_000_000, "5M"),
                         (250, "250"), (2_500_000, "2.5M"), (1_500_500, "1.5005M"), (12_345, "12.345K"),
                         (1_000_002, "1000002"), (1_000_006, "1000006"), (1_000_013, "1000013")]:
        assert artifacts.format_steps(steps) == label
        assert artifacts.parse_steps(label) == steps


def test_wilson_and_t_intervals() -> None:
    low, high = stats.wilson_interval(95, 100)
    assert 0.88 < low < 0.89 and 0.97 < high < 0.98  # textbook values 0.888, 0.978
    assert stats.wilson_interval(0, 2)[0] == 0.0 and stats.wilson_interval(2, 2)[1] == 1.0
    assert stats.t_quantile_975(2) == pytest.approx(4.303)
    assert stats.t_quantile_975(60) == pytest.approx(2.000, abs=0.003)
    mean, std, (low, high) = stats.seed_mean_interval([0.5, 0.6, 0.7])
    half = 4.303 * 0.1 / 3**0.5  # t(0.975, df=2) x std / sqrt(n)
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)
    assert (low, high) == pytest.approx((0.6 - half, 0.6 + half), abs=1e-3)
    assert stats.seed_mean_interval([0.0, 0.0, 0.1])[2][0] == 0.0  # clipped to [0, 1]
    one_seed = stats.success_summary([0.9], episodes=[100])
    assert one_seed[1:3] == (0.0, stats.wilson_interval(90, 100)) and one_seed[3].startswith("Wilson")
    three_seeds = stats.success_summary([0.5, 0.6, 0.7], episodes=[100] * 3)
    assert three_seeds[2] == pytest.approx((0.6 - half, 0.6 + half), abs=1e-3) and "df=2" in three_seeds[3]
    assert "widened" not in three_seeds[3]  # the spread over seeds is the larger uncertainty here
    # Seeds that agree have no spread, but 3 x 20 episodes are a sample: never the zero-width [1, 1].
    agreeing = stats.success_summary([1.0, 1.0, 1.0], episodes=[20] * 3)
    assert agreeing[2] == stats.wilson_interval(60, 60) and agreeing[2][0] < 0.95
    assert "widened to the Wilson interval over all 60 episodes" in agreeing[3]


# ------------------------------------------------------------------------------------------------------
# training runs: artifacts, metadata, TensorBoard
# ------------------------------------------------------------------------------------------------------
def test_pixel_run_writes_the_scaffold_artifacts(root: Path, nature_run: dict[str, Any]) -> None:
    stem = nature_run["stem"]
    checkpoints = root / "checkpoints"
    assert (checkpoints / f"{stem}.zip").is_file()
    assert (checkpoints / f"{stem}_100_steps.zip").is_file()
    assert not list(checkpoints.glob("*.tmp")), "atomic writes leave no temporary files"
    meta = load_meta(checkpoints / f"{stem}.meta.json")
    assert meta["tag"] == "nature" and meta["observation"] == "pixels" and meta["steps_done"] == 150
    assert meta["config"]["total_steps"] == 150 and meta["config"]["drq"] is True
    assert meta["policy"] == {"policy": "MultiInputPolicy", "features_extractor": "NormalizedCombinedExtractor",
                              "replay_buffer": "FrameStackHerReplayBuffer"}  # the pixel default
    assert meta["wall_time_s"] > 0 and meta["steps_per_s"] > 0
    assert {"stable-baselines3", "torch", "mujoco", "gymnasium-robotics"} <= set(meta["versions"])
    assert "commit" in meta["git"]
    (memory,) = meta["memory"]  # on the CPU the frame-stack buffer lives in RAM, all of it
    assert memory["device"] == "cpu" and memory["unit"] == "rows" and memory["items"] == 500
    assert 3 * 84 * 84 < memory["bytes_per_item"] < 2 * 3 * 84 * 84  # one frame per row, plus small vectors
    assert meta["periodic_checkpoints"] == [f"{stem}_100_steps.zip"]
    assert "[preflight] frame-stack replay buffer: 500 rows" in nature_run["proc"].stdout


def test_pixel_run_logs_the_contract_tags_and_hparams(nature_run: dict[str, Any], tensorboard_scalars) -> None:
    run_dir = nature_run["run_dir"]
    assert run_dir.is_dir() and not list(run_dir.parent.glob("seed0_*")), "one folder per seed, named exactly"
    logged = tensorboard_scalars(run_dir)
    assert REQUIRED_TAGS <= set(logged), f"missing {REQUIRED_TAGS - set(logged)}"
    assert logged["eval/success_rate"][-1][0] == 150
    assert_one_point_per_step(logged)  # the evaluation at the last step and the closing dump: one point each
    assert all(np.isfinite(v) for _, v in logged["train/critic_loss"])
    params = hparams(run_dir)
    assert params["tag"] == "nature" and params["batch_size"] == 8 and params["drq"] == 1  # TB stores bools as 1.0


def test_critic_encoder_run_routes_the_encoder_through_the_critic(root: Path, critic_run: dict[str, Any],
                                                                  tensorboard_scalars) -> None:
    meta = load_meta(root / "checkpoints" / f"{critic_run['stem']}.meta.json")
    assert meta["policy"] == {"policy": "DrQv2SACPolicy", "features_extractor": "ManipulationExtractor",
                              "replay_buffer": "HerReplayBuffer"}
    (memory,) = meta["memory"]
    assert memory["unit"] == "transitions" and memory["device"] == "cpu"
    assert memory["bytes_per_item"] > 2 * 12 * 84 * 84  # SB3 stores obs and next_obs stacks whole
    assert REQUIRED_TAGS <= set(tensorboard_scalars(critic_run["run_dir"]))

    model = load_for_acting(root / "checkpoints" / f"{critic_run['stem']}.zip")
    encoder = model.policy.actor.features_extractor
    assert encoder is model.policy.critic.features_extractor  # one shared encoder
    in_critic = {id(p) for group in model.critic.optimizer.param_groups for p in group["params"]}
    in_actor = {id(p) for group in model.actor.optimizer.param_groups for p in group["params"]}
    encoder_ids = {id(p) for p in encoder.parameters()}
    assert encoder_ids <= in_critic and not encoder_ids & in_actor


FRESH_PROCESS_LOAD = """
import sys
import numpy as np
from stable_baselines3 import SAC
from stable_baselines3.common.vec_env import DummyVecEnv
from ch09.run.checkpoints import load_for_acting
from pixel_wrapper import make_fetch_env

env = DummyVecEnv([lambda: make_fetch_env("FetchPush-v4", goal_mode="both")])
obs = env.reset()
for path in sys.argv[1:]:
    try:
        SAC.load(path, device="cpu")
        print("loaded without env")
    except AssertionError as exc:
        print("without env:", exc)
    trainable = SAC.load(path, env=env, device="cpu")
    actor = load_for_acting(path)
    same = np.array_equal(trainable.predict(obs, deterministic=True)[0], actor.predict(obs, deterministic=True)[0])
    print(type(trainable.policy).__name__, type(trainable.replay_buffer).__name__,
          type(actor.replay_buffer).__name__, trainable.num_timesteps, same)
env.close()
"""


def test_a_fresh_process_loads_production_checkpoints(root: Path, nature_run: dict[str, Any],
                                                      critic_run: dict[str, Any], production) -> None:
    """As a reader would, in a new interpreter: SAC.load(path, env=env), and the act-only helper without env."""
    checkpoints = [root / "checkpoints" / f"{run['stem']}.zip" for run in (critic_run, nature_run)]
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS_LOAD, *map(str, checkpoints)], capture_output=True,
                          text=True, timeout=180, cwd=artifacts.REPO_ROOT, env=production.environment())
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("without env:") and "HerReplayBuffer" in lines[0]  # what the README says
    assert lines[1] == "DrQv2SACPolicy HerReplayBuffer DictReplayBuffer 150 True"
    assert lines[2].startswith("without env:")
    assert lines[3] == "MultiInputPolicy FrameStackHerReplayBuffer DictReplayBuffer 150 True"


def test_eval_on_a_pixel_checkpoint(cli, root: Path, nature_run: dict[str, Any]) -> None:
    periodic = root / "checkpoints" / f"{nature_run['stem']}_100_steps.zip"  # uses the run's .meta.json
    code, out, err = cli.run("eval", "--checkpoint", str(periodic), "--n-episodes", "2", "--seed", "3",
                              "--device", "cpu", "--artifact-root", str(root))
    assert code == 0, err
    result = load_meta(root / "results" / f"{nature_run['stem']}_100_steps_eval.json")
    assert result["n_episodes"] == 2 and len(result["episodes"]) == 2 and result["eval_seed"] == 3
    assert result["checkpoint_steps"] == 100 and result["tag"] == "nature"
    low, high = result["success_ci95"]
    assert 0.0 <= low <= result["success_rate"] <= high <= 1.0
    assert all({"success", "final_goal_distance"} <= set(e) for e in result["episodes"])
    assert result["mean_final_goal_distance"] > 0 and "stable-baselines3" in result["versions"]
    assert "success_rate" in out


def test_full_state_runs_evaluate_and_aggregate(cli, root: Path, state_runs: dict[str, Any],
                                                tensorboard_scalars) -> None:
    meta1 = load_meta(root / "checkpoints/ch09_fullstate_FetchPush-v4_seed1.meta.json")
    assert meta1["config"]["n_envs"] == 2 and meta1["gradient_steps"] == 2  # UTD 1 with two envs
    assert REQUIRED_TAGS <= set(tensorboard_scalars(root / "runs/ch09_fullstate/FetchPush-v4/seed1"))

    code, out, err = cli.run("aggregate", *map(str, state_runs["evals"].values()),
                              "--artifact-root", str(root))
    assert code == 0, err
    assert "+/-" in out and "at 200 steps  (2 seeds x 2 episodes)" in out
    summary = load_meta(root / "results/ch09_fullstate_FetchPush-v4_aggregate.json")
    rates = [load_meta(path)["success_rate"] for path in state_runs["evals"].values()]
    assert summary["n_seeds"] == 2 and summary["seeds"] == [0, 1] and summary["steps"] == 200
    assert summary["success_rate_mean"] == pytest.approx(np.mean(rates))
    assert summary["success_rate_std"] == pytest.approx(np.std(rates, ddof=1))
    low, high = summary["success_rate_ci95"]
    assert low <= summary["success_rate_mean"] <= high


def test_each_snapshot_holds_the_steps_in_its_name(root: Path, state_runs: dict[str, Any]) -> None:
    """Seed 1 trained with 2 envs, a snapshot every 100 steps: SB3's own record in each zip says its steps."""
    meta = load_meta(root / "checkpoints/ch09_fullstate_FetchPush-v4_seed1.meta.json")
    assert meta["periodic_checkpoints"] == ["ch09_fullstate_FetchPush-v4_seed1_100_steps.zip",
                                            "ch09_fullstate_FetchPush-v4_seed1_200_steps.zip"]
    for name in meta["periodic_checkpoints"]:
        with zipfile.ZipFile(root / "checkpoints" / name) as archive:
            saved = json.loads(archive.read("data"))  # SB3's save(): its attributes as JSON
        label = artifacts.PERIODIC_RE.match(name.removesuffix(".zip"))["steps"]
        assert saved["num_timesteps"] == artifacts.parse_steps(label), name


def test_checkpoint_freq_that_n_envs_cannot_reach_is_refused_before_anything_is_built(cli, tmp_path: Path) -> None:
    code, out, err = cli.run("train", "--n-envs", "3", "--checkpoint-freq", "500000", "--artifact-root",
                             str(tmp_path))
    cli.assert_user_error(code, err, "--checkpoint-freq 500,000 is not a multiple of --n-envs 3",
                          "would hold 500,001 steps", "--checkpoint-freq 500001")
    assert out == "" and list(tmp_path.iterdir()) == []


def test_resume_continues_the_same_run(root: Path, state_runs: dict[str, Any], production,
                                       tensorboard_scalars) -> None:
    """No replay buffer was saved: learning_starts moves past the restored steps (What Can Go Wrong row)."""
    proc = production.check("train", "--seed", "0", "--total-steps", "350", "--resume", *production.STATE_BUDGET,
                            "--artifact-root", str(root))
    assert "Unable to sample" not in proc.stderr
    run_dir = root / "runs/ch09_fullstate/FetchPush-v4/seed0"
    assert not [p for p in run_dir.parent.iterdir() if p.name.startswith("seed0") and p != run_dir], \
        "resume must not open a second folder"
    assert len(list(run_dir.glob("events.out.tfevents*"))) == 2
    logged = tensorboard_scalars(run_dir)
    steps = [step for step, _ in logged["time/fps"]]
    assert min(steps) <= 200 < max(steps) == 350, steps
    assert max(step for step, _ in logged["train/critic_loss"]) == 350  # updates resumed after the shift
    assert_one_point_per_step(logged)
    meta = load_meta(root / "checkpoints/ch09_fullstate_FetchPush-v4_seed0.meta.json")
    assert meta["steps_done"] == 350 and len(meta["sessions"]) == 2
    assert meta["sessions"][1]["from_step"] == 200 and meta["sessions"][1]["replay_restored"] is False
    assert meta["sessions"][1]["learning_starts"] == 300  # 200 restored + --learning-starts 100
    assert meta["config"]["total_steps"] == 350


def test_sigterm_saves_a_loadable_checkpoint_and_buffer(tmp_path: Path, production) -> None:
    process = production.popen("train", "--seed", "5", "--total-steps", "100000", "--save-replay-buffer",
                               *production.STATE_BUDGET, "--artifact-root", str(tmp_path))
    try:
        deadline = time.time() + 180
        for line in process.stdout:  # wait until learn() runs
            if line.startswith("[train] training") or time.time() > deadline:
                break
        time.sleep(3.0)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "stopped at step" in err and "--resume" in err

    from stable_baselines3.common.save_util import load_from_pkl

    stem = tmp_path / "checkpoints/ch09_fullstate_FetchPush-v4_seed5"
    model = load_for_acting(f"{stem}.zip")
    meta = load_meta(Path(f"{stem}.meta.json"))
    assert 0 < model.num_timesteps == meta["steps_done"] < 100_000
    assert meta["replay_buffer"]["steps"] == model.num_timesteps
    buffer = load_from_pkl(f"{stem}_replay_buffer.pkl")
    assert buffer.size() == model.num_timesteps  # saved between two steps: the last one is stored
    assert not list(stem.parent.glob("*.tmp*"))  # temporaries are <name>.tmp-<pid>-<n>


def saved_counters(checkpoint: Path) -> dict[str, int]:
    """What a checkpoint says the run has done: env steps, finished episodes, gradient steps."""
    with zipfile.ZipFile(checkpoint) as archive:
        saved = json.loads(archive.read("data"))  # SB3's save(): its attributes as JSON
    return {name: saved[name] for name in ("num_timesteps", "_episode_num", "_n_updates")}


def test_a_run_killed_after_a_periodic_checkpoint_resumes_as_if_never_killed(tmp_path: Path, production) -> None:
    """Killed at step 150 (SIGKILL), resumed from the step-100 checkpoint: at step 300 the run has stored every
    transition, counted every episode and run every update of a run that was never killed, and the snapshot of
    the last step is the final checkpoint. The resumed session draws goals of its own: SAC.load seeds every
    generator with the run's seed, so without a session seed the episodes after the resume would replay the first
    session's goals (episode 2 = episode 0, 3 = 1)."""
    flags = ["train", "--seed", "3", "--total-steps", "300", "--replay", "sb3", "--save-replay-buffer",
             *production.STATE_BUDGET]
    from stable_baselines3.common.save_util import load_from_pkl

    from ch09.run.digest import sha256_file

    finished, buffers = {}, {}
    for name in ("whole", "killed"):
        root = tmp_path / name
        if name == "killed":
            killed = production.run(*flags, "--artifact-root", str(root), CH09_TEST_KILL_AT_STEP="150")
            assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
            production.check(*flags, "--resume", "--artifact-root", str(root))
        else:
            production.check(*flags, "--artifact-root", str(root))
        stem = root / "checkpoints/ch09_fullstate_FetchPush-v4_seed3"
        buffers[name] = load_from_pkl(f"{stem}_replay_buffer.pkl")
        finished[name] = {**saved_counters(Path(f"{stem}.zip")), "transitions": buffers[name].size()}
        assert sha256_file(Path(f"{stem}_300_steps.zip")) == sha256_file(Path(f"{stem}.zip"))
    assert finished["whole"] == {"num_timesteps": 300, "_episode_num": 6, "_n_updates": 200, "transitions": 300}
    assert finished["killed"] == finished["whole"]
    goals = buffers["killed"].observations["desired_goal"][0:300:50, 0]  # the first step of episodes 0-5
    assert len({tuple(goal) for goal in goals}) == 6, goals


# ------------------------------------------------------------------------------------------------------
# errors a user can cause: one sentence, exit code 2
# ------------------------------------------------------------------------------------------------------
def test_fresh_run_refuses_to_mix_logs(cli, root: Path, nature_run: dict[str, Any]) -> None:
    code, _, err = cli.run("train", "--seed", "0", *PIXEL_BUDGET, "--artifact-root", str(root))
    cli.assert_user_error(code, err, "--resume", "--move-old-run")


def test_move_old_run_moves_logs_and_checkpoints_aside(tmp_path: Path) -> None:
    cfg = experiment.resolve_config(experiment.TrainConfig(full_state=True, artifact_root=tmp_path, move_old_run=True))
    paths = experiment.run_paths(cfg)
    paths.run_dir.mkdir(parents=True)
    (paths.run_dir / "events.out.tfevents.1.host").write_bytes(b"x")
    paths.checkpoint_dir.mkdir(parents=True)
    paths.checkpoint.write_bytes(b"zip")
    other_seed = paths.checkpoint_dir / "ch09_fullstate_FetchPush-v4_seed01.zip"
    other_seed.write_bytes(b"zip")
    results = tmp_path / "results"
    (results / "videos").mkdir(parents=True)
    evaluations = [results / f"{paths.stem}_eval.json", results / f"{paths.stem}_100_steps_eval.json",
                   results / "videos" / f"{paths.stem}_100_ep0.mp4"]
    other_evaluation = results / "ch09_fullstate_FetchPush-v4_seed01_eval.json"
    for path in [*evaluations, other_evaluation]:
        path.write_text("{}")
    guard_fresh_run(paths, move_old_run=True)
    assert not paths.run_dir.exists() and not paths.checkpoint.exists() and other_seed.exists()
    assert len(list(paths.run_dir.parent.glob("seed0.old-*"))) == 1
    assert len(list(paths.checkpoint_dir.glob(f"{paths.stem}.old-*/{paths.stem}.zip"))) == 1
    assert not any(path.exists() for path in evaluations) and other_evaluation.exists()
    assert len(list(results.glob(f"{paths.stem}.old-*/*"))) == 3  # aggregate would mix them with the new run's
    guard_fresh_run(paths, move_old_run=False)  # nothing left to move: a fresh run may start


def test_train_bridge_runs_before_any_run_file_is_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Stop(Exception):
        pass

    calls = []

    def fake_bridge() -> int:
        calls.append("bridge")
        raise Stop

    monkeypatch.setattr(experiment, "print_bridge", fake_bridge)
    with pytest.raises(Stop):  # run_command: main() without the top-level guard, which would report the Stop
        pixel_push.run_command(pixel_push.parse_command_line(["train", "--critic-encoder", "--bridge",
                                                              "--artifact-root", str(tmp_path), "--device", "cpu"]))
    assert calls == ["bridge"] and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("flags, verdict", [
    ({}, "two encoders, trained by the actor loss and the critic loss, SB3's routing; --critic-encoder"),
    ({"critic_encoder": True, "drq": False}, "one shared encoder, trained by the critic loss alone"),
])
def test_the_bridge_line_says_which_loss_trains_the_runs_own_encoder(flags: dict, verdict: str) -> None:
    """What --compare-sb3 adds for the run itself: Step 0's policy (SB3's routing, the actor's encoder in the actor
    optimizer) against Step 2's (the critic's optimizer alone holds the shared encoder). The line comes from the
    policy the flags configure, built alone, and reads the same for the agent ``build_agent`` makes."""
    cfg = experiment.resolve_config(experiment.TrainConfig(device="cpu", buffer_size=1_000, **flags))
    line = experiment.routing_line(experiment.configured_policy(cfg))
    env = DummyVecEnv([experiment.env_factory(cfg)])
    try:
        assert experiment.routing_line(experiment.build_agent(cfg, env).policy) == line
    finally:
        env.close()
    assert verdict in line
    in_actor = "in the actor optimizer 0/8" if cfg.critic_encoder else "in the actor optimizer 8/8"
    assert in_actor in line and "in the critic optimizer 8/8" in line


def test_train_bridge_answers_for_a_run_that_exists_before_refusing_to_overwrite_it(
        cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's check for a run stuck near 5%: the run's own command plus --bridge prints which loss trains its
    encoder, though the command then stops at the run it would overwrite, as without the flag."""
    monkeypatch.setattr(experiment, "print_bridge", lambda: 0)  # the lab's own comparison: tested in test_labs_cli
    flags = ("--critic-encoder", "--no-drq", "--buffer-size", "1000", "--device", "cpu", "--artifact-root",
             str(tmp_path), "--learning-starts", "1000", "--total-steps", "1010", "--eval-freq", "0", "--no-progress")
    paths = experiment.run_paths(experiment.resolve_config(pixel_push.parse_command_line(["train", *flags])))
    paths.checkpoint.parent.mkdir(parents=True)
    paths.checkpoint.write_bytes(b"the earlier run")
    code, out, err = cli.run("train", *flags, "--bridge")
    cli.assert_user_error(code, err, "already exists", "--resume")
    assert "[bridge] this run: DrQv2SACPolicy" in out and "trained by the critic loss alone" in out, out
    assert paths.checkpoint.read_bytes() == b"the earlier run"


@pytest.mark.parametrize("argv, fragments", [
    (["train", "--env", "FetchJuggle-v4"], ["Unknown --env", "FetchPush-v4"]),
    (["train", "--full-state", "--critic-encoder"], ["--critic-encoder", "--full-state"]),
    (["train", "--full-state", "--no-native-render"], ["--no-native-render", "--full-state"]),
    (["train", "--encoder", "nature", "--no-spatial-softmax"], ["--encoder manip"]),
    (["train", "--full-state", "--frames-in-ram"], ["--frames-in-ram", "--full-state"]),
    (["train", "--replay", "sb3", "--frames-in-ram"], ["--frames-in-ram", "RAM already"]),
    (["train", "--resume"], ["--resume found no checkpoint"]),
    (["eval", "--checkpoint", "/nonexistent/ch09_x.zip"], ["does not exist"]),
    (["aggregate", "/nonexistent/ch09_x_eval.json"], ["does not exist"]),
    (["aggregate"], ["needs the eval files"]),
    (["train", "--buffer-size", "0"], ["--buffer-size must be at least 1"]),
])
def test_bad_input_is_one_sentence(cli, argv: list[str], fragments: list[str], tmp_path: Path) -> None:
    code, _, err = cli.run(*argv, "--artifact-root", str(tmp_path))
    cli.assert_user_error(code, err, *fragments)


def test_frames_that_do_not_fit_on_the_gpu_are_refused_with_the_way_to_keep_them_in_ram(monkeypatch) -> None:
    """The preflight's refusal of the frames on a GPU (too little free memory there) names --frames-in-ram, and
    with that flag the buffer's plan books the frames in RAM instead. (The GPU refusal itself needs a GPU: its
    plan is checked by `pytest -m gpu`; here the preflight raises as a small GPU's would.)"""
    def small_gpu(plan):
        raise MemoryBudgetError("replay frames of 500,000 rows needs 10.6 GB of GPU memory on cuda:0", "cuda:0")

    monkeypatch.setattr(experiment, "memory_preflight", small_gpu)
    cfg = experiment.resolve_config(experiment.TrainConfig(critic_encoder=True, drq=False, device="cpu"))
    with pytest.raises(UserError, match="--frames-in-ram"):
        experiment.check_replay_memory(cfg, *experiment.training_spaces(cfg))
    in_ram = experiment.resolve_config(dataclasses.replace(cfg, frames_in_ram=True))
    _, replay_kwargs = experiment.replay_setup(in_ram)
    assert replay_kwargs["storage_device"] == "cpu"


def test_memory_preflight_refuses_a_buffer_before_any_worker_starts(cli, tmp_path: Path) -> None:
    """A worker start-up deadline of 1 ms: had a worker been spawned before the preflight, the error would be
    the watchdog's, not the memory sentence."""
    code, out, err = cli.run("train", "--replay", "sb3", "--buffer-size", "1000000000", "--device", "cpu",
                              "--n-envs", "2", "--worker-timeout", "0.001", "--artifact-root", str(tmp_path))
    cli.assert_user_error(code, err, "--buffer-size 1,000,000,000 does not fit", "or fewer",
                              "--replay framestack")
    bytes_per_transition = int(err.split(" bytes each)")[0].rsplit("(", 1)[1].replace(",", ""))
    assert bytes_per_transition > 2 * 12 * 84 * 84  # SB3 stores obs and next_obs stacks whole
    assert f"x {bytes_per_transition:,} bytes" in out  # the preflight line printed the same figure
    assert not (tmp_path / "checkpoints").exists()


def test_resume_with_other_flags_is_refused(cli, root: Path, state_runs: dict[str, Any], production) -> None:
    flags = [a if a != "32" else "64" for a in production.STATE_BUDGET]  # --batch-size 64 instead of 32
    code, _, err = cli.run("train", "--seed", "0", "--total-steps", "999", "--resume", *flags,
                            "--artifact-root", str(root))
    cli.assert_user_error(code, err, "another config", "--batch-size 64")


def test_eval_refuses_damaged_and_mismatched_checkpoints(cli, root: Path, nature_run: dict[str, Any],
                                                         state_runs: dict[str, Any], tmp_path: Path) -> None:
    checkpoints = root / "checkpoints"
    # A truncated zip behind the expected name (what an interrupted non-atomic write would leave).
    damaged = tmp_path / "ch09_fullstate_FetchPush-v4_seed0.zip"
    damaged.write_bytes((checkpoints / "ch09_fullstate_FetchPush-v4_seed0.zip").read_bytes()[:2000])
    (tmp_path / "ch09_fullstate_FetchPush-v4_seed0.meta.json").write_text(
        (checkpoints / "ch09_fullstate_FetchPush-v4_seed0.meta.json").read_text())
    code, _, err = cli.run("eval", "--checkpoint", str(damaged), "--device", "cpu",
                            "--artifact-root", str(tmp_path))
    cli.assert_user_error(code, err, "cannot be loaded", "ch09_fullstate_FetchPush-v4_seed0_<N>_steps.zip",
                          "copy one over ch09_fullstate_FetchPush-v4_seed0.zip to --resume from it")

    # A full-state checkpoint next to a pixel run's metadata: another config.
    mismatched = tmp_path / "mismatch.zip"
    mismatched.write_bytes((checkpoints / "ch09_fullstate_FetchPush-v4_seed1.zip").read_bytes())
    (tmp_path / "mismatch.meta.json").write_text((checkpoints / f"{nature_run['stem']}.meta.json").read_text())
    code, _, err = cli.run("eval", "--checkpoint", str(mismatched), "--device", "cpu",
                            "--artifact-root", str(tmp_path))
    cli.assert_user_error(code, err, "another config")

    # No metadata at all.
    lonely = tmp_path / "lonely.zip"
    lonely.write_bytes(b"PK")
    code, _, err = cli.run("eval", "--checkpoint", str(lonely), "--artifact-root", str(tmp_path))
    cli.assert_user_error(code, err, "No metadata file", "copy it there with the checkpoint")


def test_aggregate_refuses_mixed_configs(cli, root: Path, state_runs: dict[str, Any], tmp_path: Path) -> None:
    other = load_meta(state_runs["evals"][1])
    other["tag"] = "nature"
    (tmp_path / "other_eval.json").write_text(json.dumps(other))
    code, _, err = cli.run("aggregate", str(state_runs["evals"][0]), str(tmp_path / "other_eval.json"),
                            "--artifact-root", str(tmp_path))
    cli.assert_user_error(code, err, "mix configurations")


def test_aggregate_refuses_seeds_trained_in_other_settings(cli, root: Path, state_runs: dict[str, Any],
                                                           tmp_path: Path) -> None:
    """Same tag, same steps, but another --batch-size: not part of the tag, yet another experiment."""
    other = load_meta(state_runs["evals"][1])
    other["config"]["batch_size"] *= 2
    (tmp_path / "other_eval.json").write_text(json.dumps(other))
    code, _, err = cli.run("aggregate", str(state_runs["evals"][0]), str(tmp_path / "other_eval.json"),
                            "--artifact-root", str(tmp_path))
    cli.assert_user_error(code, err, "trained with different --batch-size", "one setting at a time")


def test_aggregate_refuses_seeds_at_different_step_counts(cli, root: Path, state_runs: dict[str, Any],
                                                          tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Seed 0 at 200 steps and seed 1's 100-step snapshot, both real evaluations: one number over them would
    describe no run, so aggregate names each file with its steps and writes nothing."""
    snapshot = root / "checkpoints/ch09_fullstate_FetchPush-v4_seed1_100_steps.zip"
    assert pixel_push.main(["eval", "--checkpoint", str(snapshot), "--n-episodes", "2", "--device", "cpu",
                      "--artifact-root", str(tmp_path)]) == 0
    snapshot_eval = tmp_path / "results/ch09_fullstate_FetchPush-v4_seed1_100_steps_eval.json"
    capsys.readouterr()  # eval's own lines
    code, out, err = cli.run("aggregate", str(state_runs["evals"][0]), str(snapshot_eval),
                             "--artifact-root", str(tmp_path))
    cli.assert_user_error(code, err, "ch09_fullstate_FetchPush-v4_seed1_100_steps_eval.json at 100 steps",
                          "ch09_fullstate_FetchPush-v4_seed0_eval.json at 200 steps", "of one step count")
    assert out == "" and not list((tmp_path / "results").glob("*aggregate*"))


@pytest.mark.parametrize("backend", ["osmesa", "glfw"])
def test_renderer_unavailable_is_one_sentence(cli, backend: str, tmp_path: Path, production) -> None:
    """No OSMesa here, and GLFW without a display (which warns before it fails: the warnings are held back)."""
    platform = {"osmesa": "osmesa", "glfw": "egl"}[backend]  # GLFW makes its own context, without PyOpenGL
    proc = production.run("train", "--artifact-root", str(tmp_path), "--device", "cpu", MUJOCO_GL=backend,
                          PYOPENGL_PLATFORM=platform, DISPLAY="", timeout=180)
    cli.assert_user_error(proc.returncode, proc.stderr, f"MUJOCO_GL={backend}", "MUJOCO_GL=egl")


# ------------------------------------------------------------------------------------------------------
# the worker watchdog of --n-envs
# ------------------------------------------------------------------------------------------------------
class HangingEnv(gym.Env):
    """A trivial env whose second worker never answers a step (stands in for a hung EGL render)."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, hang: bool) -> None:
        self.hang = hang

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        if self.hang:
            time.sleep(600)
        return np.zeros(2, np.float32), 0.0, False, False, {}


def make_hanging_env(hang: bool) -> gym.Env:
    return HangingEnv(hang)


def hanging_env_workers(*hang: bool, worker_timeout: float) -> TimeoutSubprocVecEnv:
    # Ship this test's env to the spawned workers by value (they need not import this test module).
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        return TimeoutSubprocVecEnv([functools.partial(make_hanging_env, h) for h in hang],
                                    worker_timeout=worker_timeout, startup_timeout=180.0)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


WORKER_TIMEOUT_S = 3.0
CLOSE_SLACK_S = 10.0
"""Time a loaded 2-core machine may take to kill and reap the workers after the timeout (a kill is immediate)."""


def test_a_silent_worker_ends_the_run_with_one_sentence() -> None:
    env = hanging_env_workers(False, True, worker_timeout=WORKER_TIMEOUT_S)
    try:
        env.reset()
        start = time.time()
        with pytest.raises(WorkerTimeoutError, match="Env worker 1 of 2 did not answer within 3 s"):
            env.step(np.zeros((2, 1), np.float32))
    finally:
        env.close()  # must not wait for the hung worker (it sleeps 600 s)
    assert time.time() - start < WORKER_TIMEOUT_S + CLOSE_SLACK_S
    assert all(not process.is_alive() for process in env.processes)


def signal_mask(pid: int, field: str) -> int:
    """A /proc/<pid>/status signal mask (e.g. SigIgn: the ignored signals) as an int; bit n-1 is signal n."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1], 16)


def test_stop_signals_wait_while_a_worker_starts_and_workers_ignore_them() -> None:
    """A SIGTERM handled in the middle of a worker's start() ends the main process before the worker has its
    start-up data, and the worker prints a traceback: held there, it is handled right after. The workers ignore
    Ctrl-C and SIGTERM (the main process saves first, then closes them)."""
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with stop_signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert received == []
        time.sleep(0.05)
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)

    env = hanging_env_workers(False, False, worker_timeout=60.0)
    try:
        env.reset()  # every worker has built its env
        stop_bits = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
        for process in env.processes:
            assert signal_mask(process.pid, "SigIgn") & stop_bits == stop_bits
    finally:
        env.close()


# ------------------------------------------------------------------------------------------------------
# learning, not only wiring (slow: minutes)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("n_envs", [1, 4])
def test_full_state_reach_learns(n_envs: int, tmp_path: Path, production, tensorboard_scalars) -> None:
    """FetchReach-v4 from the state vector reaches >= 0.9 deterministic eval success within 12,000 steps
    (the README's learning reference)."""
    start = time.time()
    production.check("train", "--full-state", "--env", "FetchReach-v4", "--seed", "0", "--total-steps", "12000",
                     "--n-envs", str(n_envs), "--eval-freq", "1000", "--eval-episodes", "20",
                     "--checkpoint-freq", "12000", "--buffer-size", "100000", "--device", "cpu", "--no-progress",
                     "--artifact-root", str(tmp_path), timeout=1800,
                     OMP_NUM_THREADS=production.learning_threads())
    curve = tensorboard_scalars(tmp_path / "runs/ch09_fullstate/FetchReach-v4/seed0")["eval/success_rate"]
    print(f"n_envs={n_envs}: {time.time() - start:.0f} s, eval curve {[(s, round(v, 2)) for s, v in curve]}")
    assert max(v for _, v in curve) >= 0.9, curve
