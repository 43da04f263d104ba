"""Tests for scripts/labs/pixel_wrapper.py beyond its --verify claims (those run once, in test_labs_cli.py):
the errors a user can cause (bad arguments, a renderer that does not work), the observation-space builder's
options, the replay buffer's ring, and several envs rendering in one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import pixel_wrapper as pw

LAB = Path(pw.__file__).resolve()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"goal_mode": "all"}, "goal_mode must be one of"),
        ({"frame_stack": 0}, "frame_stack must be an integer >= 1"),
        ({"env_id": "FetchPush-v9"}, "make_fetch_env builds the Fetch envs"),
    ],
)
def test_make_fetch_env_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pw.make_fetch_env(**kwargs)


def test_non_goal_env_needs_goal_mode_none_and_no_proprioception():
    env = gym.make("CartPole-v1")
    with pytest.raises(ValueError, match="use goal_mode='none'"):
        pw.PixelObservationWrapper(env, goal_mode="both")
    with pytest.raises(ValueError, match="pass proprioception=False"):
        pw.PixelObservationWrapper(env, goal_mode="none")
    env.close()


def test_state_env_for_full_state_runs():
    env = pw.make_fetch_env(pixels=False)
    obs, _ = env.reset(seed=0)
    assert obs["observation"].shape == (25,) and obs["desired_goal"].shape == (3,)
    env.close()


@pytest.mark.parametrize("kwargs, keys", [
    ({}, ["pixels", "proprioception", "achieved_goal", "desired_goal"]),
    ({"goal_mode": "desired"}, ["pixels", "proprioception", "desired_goal"]),
    ({"proprio_dim": 0, "goal_mode": "none"}, ["pixels"]),
])
def test_pixel_observation_space_keys_follow_the_arguments(kwargs, keys):
    space = pw.pixel_observation_space(frame_stack=2, image_size=16, **kwargs)
    assert list(space.spaces) == keys
    assert space["pixels"].shape == (6, 16, 16) and space["pixels"].dtype == np.uint8


def test_pixel_observation_space_rejects_an_unknown_goal_mode():
    with pytest.raises(ValueError, match="goal_mode must be one of"):
        pw.pixel_observation_space(goal_mode="all")


def test_replay_buffer_overwrites_the_oldest_transition_when_full():
    space = pw.pixel_observation_space(frame_stack=1, image_size=8, proprio_dim=0, goal_mode="none")
    buffer = pw.PixelReplayBuffer(3, space, action_dim=1, seed=0)
    for value in range(5):  # transitions 0..4 into 3 slots: 3 and 4 overwrite 0 and 1
        frame = np.full((3, 8, 8), value, np.uint8)
        buffer.add({"pixels": frame}, {"pixels": frame + 1}, np.array([value]), float(value), False)
    assert len(buffer) == 3 and buffer.full
    assert sorted(buffer.rewards.tolist()) == [2.0, 3.0, 4.0]
    batch = buffer.sample(16)
    assert np.array_equal(batch.next_observations["pixels"][:, 0, 0, 0], batch.rewards.astype(np.uint8) + 1)


def test_replay_buffer_refuses_an_empty_sample_and_a_space_without_pixels():
    space = pw.pixel_observation_space(frame_stack=1, image_size=8)
    with pytest.raises(ValueError, match="cannot sample an empty"):
        pw.PixelReplayBuffer(2, space, action_dim=4).sample(1)
    with pytest.raises(ValueError, match="pixel_observation_space"):
        pw.PixelReplayBuffer(2, gym.spaces.Dict({"image": space["pixels"]}), action_dim=4)


def test_broken_renderer_gives_one_clear_sentence(lab_script):
    """MUJOCO_GL=osmesa fails on these machines: the lab must say what to do, not dump a traceback."""
    result = lab_script.run("pixel_wrapper", "--verify", timeout=120, MUJOCO_GL="osmesa",
                            PYOPENGL_PLATFORM="osmesa")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "MUJOCO_GL=osmesa" in result.stderr and "MUJOCO_GL=egl" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


# Runs in a fresh interpreter: the bug depends on which GL context is current when Python garbage-collects a
# closed env, and earlier tests in this session have already created and closed envs of their own.
SEVERAL_ENVS_SCRIPT = r"""
import gc, json, sys
import gymnasium as gym
import numpy as np
import pixel_wrapper as pw

shift = np.array([-0.10, 0.10, 0.0])
# References: the first envs of a fresh process always render right.
env = pw.make_fetch_env(hide_goal_marker=False)
env.reset(seed=0)
ref_shown = pw.render_and_resize(env)
ref_marker_changed = pw._goal_marker_pixels_changed(env, shift)
big = pw.make_fetch_env(native_render=False)
big.reset(seed=0)
ref_480 = pw.render_and_resize(big, pw.DEFAULT_RENDER_SIZE)
env.close(); big.close(); del env, big; gc.collect()

# Sequence 2: state env; an 84x84 env built, reset and closed; then a 480x480 env. The closed env is
# garbage-collected while the 480x480 env's context is current.
state = pw.make_fetch_env(pixels=False); state.reset(seed=0)
small = pw.make_fetch_env(); small.reset(seed=0); small.close()
big = pw.make_fetch_env(native_render=False); big.reset(seed=0)
del small; gc.collect()
seq2_raw_480 = big.unwrapped.render()  # Gymnasium's own render path, without render_and_resize
big.reset(seed=0)
seq2_480 = pw.render_and_resize(big, pw.DEFAULT_RENDER_SIZE)

# Sequence 1: an env built elsewhere (raw gym.make, closed by Gymnasium alone) is garbage-collected while a
# pixel env with the marker shown is current: render_and_resize must notice and repair the damage.
raw = gym.make("FetchPush-v4", render_mode="rgb_array", width=84, height=84)
raw.reset(seed=0); raw.render(); raw.close()
shown = pw.make_fetch_env(hide_goal_marker=False); shown.reset(seed=0)
del raw; gc.collect()
shown.reset(seed=0)
seq1_shown = pw.render_and_resize(shown)
seq1_marker_changed = pw._goal_marker_pixels_changed(shown, shift)
for e in (shown, big, state):
    e.close()

diff = lambda a, b: float(np.abs(a.astype(int) - b.astype(int)).mean())
print(json.dumps({
    "ref_480_mean": float(ref_480.mean()), "ref_marker_changed": ref_marker_changed,
    "seq2_raw_480_mean": float(seq2_raw_480.mean()), "seq2_480_diff": diff(seq2_480, ref_480),
    "seq1_shown_diff": diff(seq1_shown, ref_shown), "seq1_marker_changed": seq1_marker_changed,
}))
"""


def test_renders_stay_right_when_envs_are_created_and_closed_in_one_process():
    """Regression: a closed env's MjrContext freed later (at garbage collection) inside another env's GL context
    deleted that env's framebuffer: black 480x480 frames, and a goal marker whose moves changed 0 pixels."""
    env = {**os.environ, "MUJOCO_GL": "egl"}
    result = subprocess.run(
        [sys.executable, "-c", SEVERAL_ENVS_SCRIPT], capture_output=True, text=True, timeout=180, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    m = json.loads(result.stdout.strip().splitlines()[-1])
    assert m["ref_480_mean"] > 50 and m["ref_marker_changed"] > 0, m  # the fresh-process references are sane
    assert m["seq2_raw_480_mean"] > 50, m  # not black (was 0.0)
    assert m["seq2_480_diff"] < 1.0, m  # same frame as in a fresh process
    assert m["seq1_shown_diff"] < 1.0, m
    assert m["seq1_marker_changed"] > 0, m  # was 0
