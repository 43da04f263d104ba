"""Tests for scripts/labs/pixel_wrapper.py: the lab's --verify claims, run in-process and as a reader runs them,
plus the errors a user can cause (bad arguments, a renderer that does not work)."""

import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest

import pixel_wrapper as pw

LAB = Path(pw.__file__).resolve()


def test_verify_claims():
    for claim in pw.verify():
        assert claim.passed, f"{claim.name}: {claim.detail}"


def test_verify_command_exits_zero():
    result = subprocess.run(
        [sys.executable, str(LAB), "--verify"], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "claims passed" in result.stdout


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


def test_broken_renderer_gives_one_clear_sentence():
    """MUJOCO_GL=osmesa fails on these machines: the lab must say what to do, not dump a traceback."""
    env = {**os.environ, "MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"}
    result = subprocess.run(
        [sys.executable, str(LAB), "--verify"], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "MUJOCO_GL=osmesa" in result.stderr and "MUJOCO_GL=egl" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
