"""Watching the agent: eval --video, eval/video in TensorBoard, the rollout figure and the no-CUDA notice.

One tiny pixel run of the production script (FetchPush-v4, 110 steps: 100 random, then 10 updates on the
CPU, one evaluation) is made once per module; its checkpoint is evaluated with and without ``--video`` and
drawn by ``ch09_figures.py rollout``. A tiny full-state run with ``--no-eval-video`` is the control. The
in-process tests check the recorder itself against a twin env that is not recorded.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import ch09_figures as figures
import imageio.v2 as imageio
import imageio.v3 as iio
import mujoco
import numpy as np
import pytest

from ch09.run.callbacks import NoCudaNotice, ProgressBarCallback
from ch09.run.video import (
    CAMERA_SIZE,
    HEADER_HEIGHT,
    TENSORBOARD_CAMERA_SIZE,
    CameraView,
    EpisodeRecorder,
    compose_frame,
    write_video,
)
from pixel_wrapper import GOAL_MARKER_SITE, IMAGE_SIZE, PIXEL_KEY, make_fetch_env

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_ID, PIXEL_TAG, SEED = "FetchPush-v4", "nature", 0
LEARNING_STARTS, TRAIN_STEPS = 100, 110
EPISODE_FRAMES = 51  # FetchPush: 50 steps, plus the reset frame
PIXEL_RUN = ("--total-steps", str(TRAIN_STEPS), "--learning-starts", str(LEARNING_STARTS), "--batch-size", "32",
             "--buffer-size", "1000", "--eval-freq", str(TRAIN_STEPS), "--eval-episodes", "1",
             "--checkpoint-freq", "1000", "--device", "cpu", "--no-progress")
NOTICE = "a pixel update takes"


def tensorboard_summaries(run_dir: Path) -> tuple[dict[str, list], list[str]]:
    """{image tag: [ImageEvent, ...]} and the scalar tags of a TensorBoard folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    return {tag: accumulator.Images(tag) for tag in tags["images"]}, tags["scalars"]


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory: pytest.TempPathFactory, production) -> dict:
    root = tmp_path_factory.mktemp("video_pixel_run")
    proc = production.check("train", *PIXEL_RUN, "--artifact-root", str(root))
    stem = f"ch09_{PIXEL_TAG}_{ENV_ID}_seed{SEED}"
    return {"root": root, "stdout": proc.stdout, "checkpoint": root / "checkpoints" / f"{stem}.zip", "stem": stem,
            "run_dir": root / "runs" / f"ch09_{PIXEL_TAG}" / ENV_ID / f"seed{SEED}"}


@pytest.fixture(scope="module")
def evals(pixel_run: dict, production) -> dict:
    """The same checkpoint evaluated twice, 2 episodes each: with --video 1, and without."""
    root, checkpoint = pixel_run["root"], pixel_run["checkpoint"]
    result = root / "results" / f"{pixel_run['stem']}_eval.json"
    common = ("eval", "--checkpoint", str(checkpoint), "--n-episodes", "2", "--device", "cpu",
              "--artifact-root", str(root))
    production.check(*common, "--video", "1")
    with_video = json.loads(result.read_text())
    production.check(*common)
    return {"with_video": with_video, "without": json.loads(result.read_text())}


# ---------------------------------------------------------------------------------------------------------------
# eval --video
# ---------------------------------------------------------------------------------------------------------------
def test_eval_video_is_an_mp4_of_the_episode_listed_in_the_eval_json(evals: dict, pixel_run: dict) -> None:
    expected = f"results/videos/{pixel_run['stem']}_{TRAIN_STEPS}_ep0.mp4"
    assert [v["file"] for v in evals["with_video"]["videos"]] == [expected]  # --video 1 of 2 episodes
    frames = imageio.mimread(pixel_run["root"] / expected, memtest=False)  # decoded by imageio-ffmpeg
    assert len(frames) == evals["with_video"]["episodes"][0]["length"] + 1 == EPISODE_FRAMES
    # camera 480x480 beside the 84x84 observation upscaled x5, under the text header
    assert {frame.shape for frame in frames} == {(HEADER_HEIGHT + CAMERA_SIZE, 2 * CAMERA_SIZE, 3)}
    assert evals["without"]["videos"] == []


def test_recording_does_not_change_the_episodes(evals: dict) -> None:
    assert evals["with_video"]["success_rate"] == evals["without"]["success_rate"]
    assert evals["with_video"]["episodes"] == evals["without"]["episodes"]  # final distances and returns too


@pytest.mark.parametrize("case", ["negative video count", "artifact root is a file"])
def test_bad_video_input_is_one_sentence(case: str, pixel_run: dict, production, tmp_path: Path) -> None:
    if case == "negative video count":
        args = ("--video", "-1", "--artifact-root", str(pixel_run["root"]))
    else:
        blocker = tmp_path / "a_file"
        blocker.write_text("not a folder")
        args = ("--video", "1", "--artifact-root", str(blocker))
    proc = production.run("eval", "--checkpoint", str(pixel_run["checkpoint"]), "--n-episodes", "2", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# Training: eval/video in TensorBoard, the no-CUDA notice
# ---------------------------------------------------------------------------------------------------------------
def test_periodic_eval_logs_one_episode_as_a_video(pixel_run: dict) -> None:
    images, scalars = tensorboard_summaries(pixel_run["run_dir"])
    (event,) = images["eval/video"]  # one evaluation, at step 110
    assert event.step == TRAIN_STEPS
    frames = iio.imread(event.encoded_image_string, index=None, extension=".gif")
    assert frames.shape[:3] == (EPISODE_FRAMES, HEADER_HEIGHT + TENSORBOARD_CAMERA_SIZE, 2 * TENSORBOARD_CAMERA_SIZE)
    assert "eval/video_seconds" in scalars


def test_pixel_run_without_cuda_prints_its_measured_update_time(pixel_run: dict) -> None:
    lines = [line for line in pixel_run["stdout"].splitlines() if NOTICE in line]
    assert len(lines) == 1, pixel_run["stdout"][-3000:]
    seconds = float(re.search(rf"{NOTICE} ([0-9.e+-]+) s here", lines[0])[1])
    assert seconds > 0
    # the projection covers the steps still to go: not the random-action ones, nor the measured iterations
    steps_left = int(re.search(r"so the remaining ([0-9,]+) steps would take ~", lines[0])[1].replace(",", ""))
    assert 0 < steps_left <= TRAIN_STEPS - LEARNING_STARTS - NoCudaNotice.MEASURED_ITERATIONS, lines[0]
    assert "--full-state" in lines[0]


@pytest.mark.slow  # a pixel run in bf16 on the CPU for one variant of the notice above
def test_with_overlapped_collection_the_notice_times_whole_training_steps(production, tmp_path: Path) -> None:
    """train() only defers the updates to the next env step there: the time between SB3's callbacks is not an
    update's, so the notice gives the time of a training step, which includes an 84x84 render (milliseconds).
    The run asks for bf16, which the notice says is for GPUs."""
    proc = production.check("train", *PIXEL_RUN, "--overlap-collection", "--precision", "bf16", "--eval-freq", "0",
                            "--batch-size", "8", "--artifact-root", str(tmp_path))  # (bf16 is slow on a CPU)
    assert NOTICE not in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if "no CUDA GPU" in line]
    assert len(lines) == 1, proc.stdout[-3000:]
    seconds = float(re.search(r"a pixel training step \(env step and update, overlapped\) takes ([0-9.e+-]+) s here",
                              lines[0])[1])
    assert seconds > 1e-3, lines[0]
    assert lines[0].endswith("; --precision bf16 is for CUDA GPUs (slower than fp32 on a CPU)")


def test_full_state_run_has_no_notice_and_no_eval_video_with_the_flag(production, tmp_path: Path) -> None:
    assert "--no-eval-video" in production.STATE_BUDGET
    proc = production.check("train", "--total-steps", "200", *production.STATE_BUDGET, "--artifact-root", str(tmp_path))
    assert NOTICE not in proc.stdout  # updates ran (learning starts at 100), but on the state vector
    images, scalars = tensorboard_summaries(tmp_path / "runs" / "ch09_fullstate" / ENV_ID / f"seed{SEED}")
    assert "eval/success_rate" in scalars and "eval/video" not in images


def test_progress_bar_measures_its_rate_from_the_first_update() -> None:
    import torch
    from stable_baselines3 import SAC

    env = make_fetch_env("FetchReach-v4", pixels=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two shared cores make each tiny update many times slower
    try:
        model = SAC("MultiInputPolicy", env, learning_starts=LEARNING_STARTS, batch_size=32, buffer_size=1000,
                    device="cpu", seed=0)
        bar = ProgressBarCallback(LEARNING_STARTS + 5, "test", None)
        model.learn(LEARNING_STARTS + 5, callback=bar)
    finally:
        torch.set_num_threads(threads)
        env.close()
    assert bar.updating
    assert bar.bar.initial == LEARNING_STARTS + 1  # the bar of the training phase starts at the first update


# ---------------------------------------------------------------------------------------------------------------
# The rollout figure
# ---------------------------------------------------------------------------------------------------------------
def test_rollout_figure_from_the_checkpoint(pixel_run: dict, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": "egl"}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "ch09_figures.py"), "rollout",
                           "--checkpoint", str(pixel_run["checkpoint"]), "--frames", "6", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = f"{figures.FILE_STEMS['rollout']}_{pixel_run['stem']}"
    inches = figures.FIGURE_SIZES["rollout"]
    assert png_size(tmp_path / f"{stem}.png") == (round(inches[0] * figures.DPI), round(inches[1] * figures.DPI))
    assert (tmp_path / f"{stem}.svg").read_text()[:200].lstrip().startswith("<?xml")


# ---------------------------------------------------------------------------------------------------------------
# The recorder itself (in-process)
# ---------------------------------------------------------------------------------------------------------------
def test_recorder_leaves_the_env_unchanged_and_shows_the_hidden_goal_only_in_the_camera_view() -> None:
    recorded = EpisodeRecorder(make_fetch_env(ENV_ID), camera_size=CAMERA_SIZE)
    twin = make_fetch_env(ENV_ID)  # same env, never recorded
    view84 = CameraView(twin, IMAGE_SIZE)
    try:
        model = recorded.unwrapped.model
        marker = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, GOAL_MARKER_SITE)
        recorded.record_next(1)
        obs, _ = recorded.reset(seed=3)
        twin_obs, _ = twin.reset(seed=3)
        actions = np.random.default_rng(0).uniform(-1, 1, size=(5, 4)).astype(np.float32)
        same, camera_is_observation, marker_pixels = [], [], []
        for action in actions:
            newest = twin_obs[PIXEL_KEY][-3:].transpose(1, 2, 0)
            goal = twin_obs["desired_goal"]
            camera_is_observation.append(np.array_equal(view84.render(goal, show_goal_marker=False), newest))
            marker_pixels.append(int((view84.render(goal) != newest).any(axis=-1).sum()))
            obs, reward, *_ = recorded.step(action)
            twin_obs, twin_reward, *_ = twin.step(action)
            same.append(reward == twin_reward and all(np.array_equal(obs[k], twin_obs[k]) for k in obs))
        assert all(same)  # the recorded episode is the unrecorded one, step for step
        assert all(camera_is_observation)  # the camera view is the observation's camera, only larger
        assert all(count > 0 for count in marker_pixels)  # the goal marker shows in the camera view...
        assert model.site_rgba[marker, 3] == 0.0  # ...and is hidden again in the env's model
        episode = recorded.current
        assert episode.n_frames == len(actions) + 1 and episode.camera[0].shape == (CAMERA_SIZE, CAMERA_SIZE, 3)
        assert np.array_equal(episode.observation[-1], obs[PIXEL_KEY][-3:].transpose(1, 2, 0))
    finally:
        view84.close()
        recorded.close()
        twin.close()


MAX_PANEL_ERROR = {"mp4": 24.0, "gif": 18.0}
"""Mean |decoded - written| (levels of 255) over the observation panel of the random-noise frame below: measured
16.2 through H.264 and 11.6 through GIF's palette (2026-12-04); the bounds are 1.5x that. A frame of other random
pixels scores ~84, so a wrong or shifted frame fails."""


@pytest.mark.parametrize("video_format", ["mp4", "gif"])
def test_video_files_decode_to_the_frames_written(video_format: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    camera = rng.integers(0, 255, (CAMERA_SIZE, CAMERA_SIZE, 3), dtype=np.uint8)
    observation = rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    frames = [compose_frame(camera, observation, t, 50, 0.1, t > 1) for t in range(4)]
    state_only = compose_frame(camera, None, 0, 50, 0.1, False)  # full state: the camera view alone
    assert state_only.shape == (HEADER_HEIGHT + CAMERA_SIZE, CAMERA_SIZE, 3)
    path = tmp_path / f"clip.{video_format}"
    assert write_video(path, iter(frames), video_format) == len(frames)
    decoded = imageio.mimread(path, memtest=False)
    assert len(decoded) == len(frames) and decoded[0].shape[:2] == frames[0].shape[:2]
    panel = (slice(HEADER_HEIGHT + 30, HEADER_HEIGHT + 450), slice(CAMERA_SIZE + 30, CAMERA_SIZE + 450))
    error = np.abs(decoded[0][..., :3][panel].astype(int) - frames[0][panel].astype(int)).mean()
    assert error < MAX_PANEL_ERROR[video_format], f"mean error {error:.1f} levels"
    assert not list(tmp_path.glob("*.tmp*")), "a temporary file was left behind"

