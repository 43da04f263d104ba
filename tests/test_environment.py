"""The reference environment works: gymnasium-robotics imports and FetchPush-v4 renders through EGL."""

import os

import gymnasium as gym
import numpy as np


def test_fetch_push_renders_84x84_through_egl():
    import gymnasium_robotics

    assert os.environ.get("MUJOCO_GL") == "egl", "run the tests with MUJOCO_GL=egl (bash docker/dev.sh pytest)"
    gym.register_envs(gymnasium_robotics)
    env = gym.make("FetchPush-v4", render_mode="rgb_array", width=84, height=84)
    try:
        env.reset(seed=0)
        frame = env.render()
    finally:
        env.close()
    assert frame.shape == (84, 84, 3) and frame.dtype == np.uint8
    assert frame.min() < frame.max(), "the rendered frame is constant (a broken GL context renders black)"
