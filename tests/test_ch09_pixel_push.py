"""Tests of the production script scripts/ch09_pixel_push.py (train, eval, aggregate).

Real training runs go through a subprocess, exactly as a reader types them, with tiny budgets (150-300 env
steps, a 500-transition buffer, batch 8-32) and every artifact under pytest's tmp dir. Runs are module
fixtures shared by several tests, so the whole file costs a handful of runs. Errors a user can cause are
checked in-process through ``main(argv)`` (no interpreter start-up): each must be ONE line starting with
"error:" and a non-zero exit code, never a traceback.

The learning tests (``-m slow``) train FetchReach-v4 from the state vector to >= 0.9 eval success.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

import ch09_pixel_push as ch09

SCRIPT = Path(ch09.__file__).resolve()
REQUIRED_TAGS = {"train/critic_loss", "train/actor_loss", "train/ent_coef", "rollout/success_rate",
                 "eval/success_rate", "time/fps"}
PIXEL_BUDGET = ["--total-steps", "150", "--buffer-size", "500", "--batch-size", "8", "--learning-starts", "100",
                "--eval-freq", "150", "--eval-episodes", "1", "--checkpoint-freq", "100", "--device", "cpu",
                "--no-progress"]
STATE_BUDGET = ["--full-state", "--buffer-size", "1000", "--batch-size", "32", "--learning-starts", "100",
                "--eval-freq", "200", "--eval-episodes", "2", "--checkpoint-freq", "100", "--device", "cpu",
                "--no-progress"]

NO_HER = {"replay_buffer_class": None, "replay_buffer_kwargs": {}, "buffer_size": 10}
"""custom_objects that load a checkpoint without an env (HER's buffer needs one; a plain buffer does not)."""


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------
def script_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def run_script(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=script_env(**env))


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard folder (all its event files), as {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


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


def run_main(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = ch09.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_sentence_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0, "a user error must exit non-zero"
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"want one 'error: ...' line, got:\n{err}"
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} missing from: {lines[0]}"


def load_meta(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------------
# fixtures: the real runs, each made once per module
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ch09_artifacts")


@pytest.fixture(scope="module")
def nature_run(root: Path) -> dict[str, Any]:
    """Step 0 exactly as the chapter runs it (NatureCNN, DrQ on, default replay), at a tiny budget."""
    proc = run_script("train", "--seed", "0", *PIXEL_BUDGET, "--artifact-root", str(root))
    assert_ok(proc)
    return {"proc": proc, "stem": "ch09_nature_FetchPush-v4_seed0", "run_dir": root / "runs/ch09_nature/FetchPush-v4/seed0"}


@pytest.fixture(scope="module")
def critic_run(root: Path) -> dict[str, Any]:
    """Step 2 (critic-encoder routing, no DrQ) on SB3's HerReplayBuffer (Step 0 covers the default replay)."""
    proc = run_script("train", "--seed", "0", "--critic-encoder", "--no-drq", "--replay", "sb3",
                      *PIXEL_BUDGET, "--artifact-root", str(root))
    assert_ok(proc)
    return {"proc": proc, "stem": "ch09_manip_noDrQ_criticEnc_FetchPush-v4_seed0",
            "run_dir": root / "runs/ch09_manip_noDrQ_criticEnc/FetchPush-v4/seed0"}


@pytest.fixture(scope="module")
def state_runs(root: Path) -> dict[str, Any]:
    """Two full-state seeds (seed 1 with 2 SubprocVecEnv workers), evaluated, ready to aggregate.

    The seed-0 run is resumed later (test_resume_...); the eval files are written here, before that."""
    seed0 = run_script("train", "--seed", "0", "--total-steps", "200", *STATE_BUDGET, "--artifact-root", str(root))
    assert_ok(seed0)
    seed1 = run_script("train", "--seed", "1", "--total-steps", "200", "--n-envs", "2", *STATE_BUDGET,
                       "--artifact-root", str(root))
    assert_ok(seed1)
    evals = {}
    for seed in (0, 1):
        checkpoint = root / f"checkpoints/ch09_fullstate_FetchPush-v4_seed{seed}.zip"
        assert ch09.main(["eval", "--checkpoint", str(checkpoint), "--n-episodes", "2", "--device", "cpu",
                          "--artifact-root", str(root)]) == 0
        evals[seed] = root / f"results/ch09_fullstate_FetchPush-v4_seed{seed}_eval.json"
    return {"procs": (seed0, seed1), "evals": evals}


# ------------------------------------------------------------------------------------------------------
# configuration: tags, flags, and which components each investigation step uses
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
    "no_ss_480": (["--no-spatial-softmax", "--render-size", "480", "--no-drq"], "manip_noSS_noDrQ_resize480",
                  "MultiInputPolicy", "ManipulationExtractor", "HerReplayBuffer"),
    "framestack": (["--critic-encoder", "--no-drq", "--replay", "framestack"], "manip_noDrQ_criticEnc",
                   "DrQv2SACPolicy", "ManipulationExtractor", "FrameStackHerReplayBuffer"),
}


def parse_train(*argv: str) -> ch09.TrainConfig:
    args = ch09.build_parser().parse_args(["train", *argv])
    return ch09.resolve_config(ch09.config_from_args(ch09.TrainConfig, args))


@pytest.mark.parametrize("step", list(STEPS))
def test_each_investigation_step_maps_to_its_components(step: str) -> None:
    flags, tag, policy, extractor, replay = STEPS[step]
    pin_replay = [] if "--replay" in flags or "--full-state" in flags else ["--replay", "sb3"]  # any default
    cfg = parse_train(*flags, *pin_replay)
    assert ch09.config_tag(cfg) == tag
    assert ch09.expected_policy(cfg) == {"policy": policy, "features_extractor": extractor}
    replay_class, replay_kwargs = ch09.replay_setup(cfg)
    assert replay_class.__name__ == replay
    assert replay_kwargs["n_sampled_goal"] == 8 and replay_kwargs["goal_selection_strategy"] == "future"


def test_flag_defaults_and_aliases(capsys: pytest.CaptureFixture) -> None:
    assert parse_train("--native-render").render_size == 84
    assert parse_train("--no-native-render").native_render is False
    assert parse_train("--render-size", "480").native_render is False
    assert parse_train("--bridge").compare_sb3 is True
    assert parse_train("--critic-encoder", "--encoder", "nature").encoder == "nature"  # explicit wins
    cfg = parse_train("--full-state")
    assert (cfg.encoder, cfg.drq, cfg.replay) == (None, False, "sb3")
    with pytest.raises(SystemExit):
        ch09.build_parser().parse_args(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "breakthrough" in help_text and "--no-drq" in help_text  # field docstrings became --help


def test_step_labels_of_periodic_checkpoints() -> None:
    for steps, label in [(500_000, "500K"), (1_000_000, "1M"), (1_500_000, "1.5M"), (5_000_000, "5M"),
                         (250, "250"), (2_500_000, "2.5M")]:
        assert ch09.format_steps(steps) == label
        assert ch09.parse_steps(label) == steps


def test_wilson_and_t_intervals() -> None:
    low, high = ch09.wilson_interval(95, 100)
    assert 0.88 < low < 0.89 and 0.97 < high < 0.98  # textbook values 0.888, 0.978
    assert ch09.wilson_interval(0, 2)[0] == 0.0 and ch09.wilson_interval(2, 2)[1] == 1.0
    assert ch09.t_quantile_975(2) == pytest.approx(4.303)
    assert ch09.t_quantile_975(60) == pytest.approx(2.000, abs=0.003)


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
                              "replay_buffer": meta["policy"]["replay_buffer"]}
    assert meta["policy"]["replay_buffer"] in {"HerDrQDictReplayBuffer", "FrameStackHerReplayBuffer"}
    assert meta["wall_time_s"] > 0 and meta["steps_per_s"] > 0
    assert {"stable-baselines3", "torch", "mujoco", "gymnasium-robotics"} <= set(meta["versions"])
    assert "commit" in meta["git"]
    assert meta["memory"]["bytes_per_transition"] > 20_000  # pixels, whichever replay is the default
    assert meta["periodic_checkpoints"] == [f"{stem}_100_steps.zip"]
    assert "[preflight] replay buffer" in nature_run["proc"].stdout


def test_pixel_run_logs_the_contract_tags_and_hparams(nature_run: dict[str, Any]) -> None:
    run_dir = nature_run["run_dir"]
    assert run_dir.is_dir() and not list(run_dir.parent.glob("seed0_*")), "one folder per seed, named exactly"
    logged = scalars(run_dir)
    assert REQUIRED_TAGS <= set(logged), f"missing {REQUIRED_TAGS - set(logged)}"
    assert logged["eval/success_rate"][-1][0] == 150
    assert all(np.isfinite(v) for _, v in logged["train/critic_loss"])
    params = hparams(run_dir)
    assert params["tag"] == "nature" and params["batch_size"] == 8 and params["drq"] == 1  # TB stores bools as 1.0


def test_critic_encoder_run_routes_the_encoder_through_the_critic(root: Path, critic_run: dict[str, Any]) -> None:
    meta = load_meta(root / "checkpoints" / f"{critic_run['stem']}.meta.json")
    assert meta["policy"] == {"policy": "DrQv2SACPolicy", "features_extractor": "ManipulationExtractor",
                              "replay_buffer": "HerReplayBuffer"}
    assert 169_000 < meta["memory"]["bytes_per_transition"] < 170_000  # SB3 stores obs and next_obs whole
    assert REQUIRED_TAGS <= set(scalars(critic_run["run_dir"]))

    from stable_baselines3 import SAC

    model = SAC.load(root / "checkpoints" / f"{critic_run['stem']}.zip", device="cpu", custom_objects=NO_HER)
    encoder = model.policy.actor.features_extractor
    assert encoder is model.policy.critic.features_extractor  # one shared encoder
    in_critic = {id(p) for group in model.critic.optimizer.param_groups for p in group["params"]}
    in_actor = {id(p) for group in model.actor.optimizer.param_groups for p in group["params"]}
    encoder_ids = {id(p) for p in encoder.parameters()}
    assert encoder_ids <= in_critic and not encoder_ids & in_actor


def test_eval_on_a_pixel_checkpoint(root: Path, nature_run: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    periodic = root / "checkpoints" / f"{nature_run['stem']}_100_steps.zip"  # uses the run's .meta.json
    code, out, err = run_main(capsys, "eval", "--checkpoint", str(periodic), "--n-episodes", "2", "--seed", "3",
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


def test_full_state_runs_evaluate_and_aggregate(root: Path, state_runs: dict[str, Any],
                                                capsys: pytest.CaptureFixture) -> None:
    meta1 = load_meta(root / "checkpoints/ch09_fullstate_FetchPush-v4_seed1.meta.json")
    assert meta1["config"]["n_envs"] == 2 and meta1["gradient_steps"] == 2  # UTD 1 with two envs
    assert REQUIRED_TAGS <= set(scalars(root / "runs/ch09_fullstate/FetchPush-v4/seed1"))

    code, out, err = run_main(capsys, "aggregate", *map(str, state_runs["evals"].values()),
                              "--artifact-root", str(root))
    assert code == 0, err
    assert "+/-" in out and "(2 seeds x 2 episodes)" in out
    summary = load_meta(root / "results/ch09_fullstate_FetchPush-v4_aggregate.json")
    rates = [load_meta(path)["success_rate"] for path in state_runs["evals"].values()]
    assert summary["n_seeds"] == 2 and summary["seeds"] == [0, 1]
    assert summary["success_rate_mean"] == pytest.approx(np.mean(rates))
    assert summary["success_rate_std"] == pytest.approx(np.std(rates, ddof=1))
    low, high = summary["success_rate_ci95"]
    assert low <= summary["success_rate_mean"] <= high


def test_resume_continues_the_same_run(root: Path, state_runs: dict[str, Any]) -> None:
    """No replay buffer was saved: learning_starts moves past the restored steps (What Can Go Wrong row)."""
    proc = run_script("train", "--seed", "0", "--total-steps", "350", "--resume", *STATE_BUDGET,
                      "--artifact-root", str(root))
    assert_ok(proc)
    assert "Unable to sample" not in proc.stderr
    run_dir = root / "runs/ch09_fullstate/FetchPush-v4/seed0"
    assert not [p for p in run_dir.parent.iterdir() if p.name.startswith("seed0") and p != run_dir], \
        "resume must not open a second folder"
    assert len(list(run_dir.glob("events.out.tfevents*"))) == 2
    logged = scalars(run_dir)
    steps = [step for step, _ in logged["time/fps"]]
    assert min(steps) <= 200 < max(steps) == 350, steps
    assert max(step for step, _ in logged["train/critic_loss"]) == 350  # updates resumed after the shift
    meta = load_meta(root / "checkpoints/ch09_fullstate_FetchPush-v4_seed0.meta.json")
    assert meta["steps_done"] == 350 and len(meta["sessions"]) == 2
    assert meta["sessions"][1]["from_step"] == 200 and meta["sessions"][1]["replay_restored"] is False
    assert meta["sessions"][1]["learning_starts"] == 300  # 200 restored + --learning-starts 100
    assert meta["config"]["total_steps"] == 350


def test_sigterm_saves_a_loadable_checkpoint_and_buffer(tmp_path: Path) -> None:
    args = ["train", "--seed", "5", "--total-steps", "100000", "--save-replay-buffer", *STATE_BUDGET,
            "--artifact-root", str(tmp_path)]
    process = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=script_env())
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

    from stable_baselines3 import SAC
    from stable_baselines3.common.save_util import load_from_pkl

    stem = tmp_path / "checkpoints/ch09_fullstate_FetchPush-v4_seed5"
    model = SAC.load(f"{stem}.zip", device="cpu", custom_objects=NO_HER)
    meta = load_meta(Path(f"{stem}.meta.json"))
    assert 0 < model.num_timesteps == meta["steps_done"] < 100_000
    assert meta["replay_buffer"]["steps"] == model.num_timesteps
    buffer = load_from_pkl(f"{stem}_replay_buffer.pkl")
    assert buffer.size() in (model.num_timesteps, model.num_timesteps - 1)  # the interrupted step is not stored


# ------------------------------------------------------------------------------------------------------
# errors a user can cause: one sentence, non-zero exit
# ------------------------------------------------------------------------------------------------------
def test_fresh_run_refuses_to_mix_logs(root: Path, nature_run: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_main(capsys, "train", "--seed", "0", *PIXEL_BUDGET, "--artifact-root", str(root))
    assert_one_sentence_error(code, err, "--resume", "--move-old-run")


def test_move_old_run_moves_logs_and_checkpoints_aside(tmp_path: Path) -> None:
    cfg = ch09.resolve_config(ch09.TrainConfig(full_state=True, artifact_root=str(tmp_path), move_old_run=True))
    paths = ch09.RunPaths.for_config(cfg)
    paths.run_dir.mkdir(parents=True)
    (paths.run_dir / "events.out.tfevents.1.host").write_bytes(b"x")
    paths.checkpoint_dir.mkdir(parents=True)
    paths.checkpoint.write_bytes(b"zip")
    other_seed = paths.checkpoint_dir / "ch09_fullstate_FetchPush-v4_seed01.zip"
    other_seed.write_bytes(b"zip")
    ch09.guard_fresh_run(cfg, paths)
    assert not paths.run_dir.exists() and not paths.checkpoint.exists() and other_seed.exists()
    assert len(list(paths.run_dir.parent.glob("seed0.old-*"))) == 1
    assert len(list(paths.checkpoint_dir.glob(f"{paths.stem}.old-*/{paths.stem}.zip"))) == 1
    ch09.guard_fresh_run(cfg, paths)  # nothing left to move: a second call is a no-op


def test_compare_sb3_prints_the_bridge_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    class Stop(Exception):
        pass

    calls = []

    def fake_bridge() -> int:
        calls.append("bridge")
        raise Stop

    monkeypatch.setattr(ch09, "print_bridge", fake_bridge)
    with pytest.raises(Stop):
        ch09.main(["train", "--critic-encoder", "--bridge", "--artifact-root", str(tmp_path), "--device", "cpu"])
    assert calls == ["bridge"] and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("argv, fragments", [
    (["train", "--env", "FetchJuggle-v4"], ["Unknown --env", "FetchPush-v4"]),
    (["train", "--full-state", "--critic-encoder"], ["--critic-encoder", "--full-state"]),
    (["train", "--encoder", "nature", "--no-spatial-softmax"], ["--encoder manip"]),
    (["train", "--resume"], ["--resume found no checkpoint"]),
    (["eval", "--checkpoint", "/nonexistent/ch09_x.zip"], ["does not exist"]),
    (["train", "--buffer-size", "0"], ["--buffer-size must be at least 1"]),
])
def test_bad_input_is_one_sentence(argv: list[str], fragments: list[str], tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_main(capsys, *argv, "--artifact-root", str(tmp_path))
    assert_one_sentence_error(code, err, *fragments)


def test_memory_preflight_refuses_a_buffer_that_cannot_fit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_main(capsys, "train", "--replay", "sb3", "--buffer-size", "1000000000", "--device", "cpu",
                              "--artifact-root", str(tmp_path))
    assert_one_sentence_error(code, err, "--buffer-size", "or less", "bytes per transition")
    bytes_per_transition = int(err.split("GB of RAM (")[1].split(" bytes")[0].replace(",", ""))
    assert 169_000 < bytes_per_transition < 170_000  # SB3 stores obs and next_obs: ~169.5 KB for 12x84x84
    assert not (tmp_path / "checkpoints").exists()


def test_resume_with_other_flags_is_refused(root: Path, state_runs: dict[str, Any],
                                            capsys: pytest.CaptureFixture) -> None:
    flags = [a if a != "32" else "64" for a in STATE_BUDGET]  # --batch-size 64 instead of 32
    code, _, err = run_main(capsys, "train", "--seed", "0", "--total-steps", "999", "--resume", *flags,
                            "--artifact-root", str(root))
    assert_one_sentence_error(code, err, "another config", "--batch-size 64")


def test_eval_refuses_damaged_and_mismatched_checkpoints(root: Path, nature_run: dict[str, Any],
                                                         state_runs: dict[str, Any], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    checkpoints = root / "checkpoints"
    # A truncated zip behind the expected name (what an interrupted non-atomic write would leave).
    damaged = tmp_path / "ch09_fullstate_FetchPush-v4_seed0.zip"
    damaged.write_bytes((checkpoints / "ch09_fullstate_FetchPush-v4_seed0.zip").read_bytes()[:2000])
    (tmp_path / "ch09_fullstate_FetchPush-v4_seed0.meta.json").write_text(
        (checkpoints / "ch09_fullstate_FetchPush-v4_seed0.meta.json").read_text())
    code, _, err = run_main(capsys, "eval", "--checkpoint", str(damaged), "--device", "cpu",
                            "--artifact-root", str(tmp_path))
    assert_one_sentence_error(code, err, "cannot be loaded")

    # A full-state checkpoint next to a pixel run's metadata: another config.
    mismatched = tmp_path / "mismatch.zip"
    mismatched.write_bytes((checkpoints / "ch09_fullstate_FetchPush-v4_seed1.zip").read_bytes())
    (tmp_path / "mismatch.meta.json").write_text((checkpoints / f"{nature_run['stem']}.meta.json").read_text())
    code, _, err = run_main(capsys, "eval", "--checkpoint", str(mismatched), "--device", "cpu",
                            "--artifact-root", str(tmp_path))
    assert_one_sentence_error(code, err, "another config")

    # No metadata at all.
    lonely = tmp_path / "lonely.zip"
    lonely.write_bytes(b"PK")
    code, _, err = run_main(capsys, "eval", "--checkpoint", str(lonely), "--artifact-root", str(tmp_path))
    assert_one_sentence_error(code, err, "No metadata file")


def test_aggregate_refuses_mixed_configs(root: Path, state_runs: dict[str, Any], tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    other = load_meta(state_runs["evals"][1])
    other["tag"] = "nature"
    (tmp_path / "other_eval.json").write_text(json.dumps(other))
    code, _, err = run_main(capsys, "aggregate", str(state_runs["evals"][0]), str(tmp_path / "other_eval.json"),
                            "--artifact-root", str(tmp_path))
    assert_one_sentence_error(code, err, "mix configurations")


def test_renderer_unavailable_is_one_sentence(tmp_path: Path) -> None:
    proc = run_script("train", "--artifact-root", str(tmp_path), "--device", "cpu", MUJOCO_GL="osmesa",
                      PYOPENGL_PLATFORM="osmesa", timeout=180)
    assert_one_sentence_error(proc.returncode, proc.stderr, "MUJOCO_GL=osmesa", "MUJOCO_GL=egl")


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


def test_a_silent_worker_ends_the_run_with_one_sentence() -> None:
    import functools

    import cloudpickle

    # Ship this test's env to the spawned workers by value (they need not import this test module).
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        env = ch09.TimeoutSubprocVecEnv([functools.partial(make_hanging_env, False),
                                         functools.partial(make_hanging_env, True)],
                                        worker_timeout=3.0, startup_timeout=180.0)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    try:
        env.reset()
        start = time.time()
        with pytest.raises(ch09.WorkerTimeoutError, match="Env worker 1 of 2 did not answer within 3 s"):
            env.step(np.zeros((2, 1), np.float32))
    finally:
        env.close()  # must not wait for the hung worker
    assert time.time() - start < 30
    assert all(not process.is_alive() for process in env.processes)


# ------------------------------------------------------------------------------------------------------
# learning, not only wiring (slow: minutes)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("n_envs", [1, 4])
def test_full_state_reach_learns(n_envs: int, tmp_path: Path) -> None:
    """FetchReach-v4 from the state vector reaches >= 0.9 deterministic eval success within 12,000 steps
    (stock SB3 SAC + HER gets 1.0 at 9,000 steps in about 5 minutes on 2 CPU cores: FACTS.md)."""
    start = time.time()
    proc = run_script("train", "--full-state", "--env", "FetchReach-v4", "--seed", "0", "--total-steps", "12000",
                      "--n-envs", str(n_envs), "--eval-freq", "1000", "--eval-episodes", "20",
                      "--checkpoint-freq", "12000", "--buffer-size", "100000", "--device", "cpu", "--no-progress",
                      "--artifact-root", str(tmp_path), timeout=1800, OMP_NUM_THREADS="2")
    assert_ok(proc)
    curve = scalars(tmp_path / "runs/ch09_fullstate/FetchReach-v4/seed0")["eval/success_rate"]
    print(f"n_envs={n_envs}: {time.time() - start:.0f} s, eval curve {[(s, round(v, 2)) for s, v in curve]}")
    assert max(v for _, v in curve) >= 0.9, curve
