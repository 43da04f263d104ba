"""Tests for scripts/labs/drqv2_sac_policy.py beyond its claims (those run once, as `--bridge`, in test_labs_cli.py).

These add only what a claim cannot say about itself: that a model saved here loads in ANOTHER process without
`custom_objects`, that `routing_report` tells SB3's three routings apart, and the policy's own save/load.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import SAC
from stable_baselines3.sac.policies import SACPolicy

import drqv2_sac_policy as lab
from pixel_wrapper import pixel_observation_space

LABS_DIR = Path(lab.__file__).resolve().parent
SUBPROCESS_TIMEOUT_S = 300


def _spaces() -> tuple[gym.spaces.Dict, gym.spaces.Box]:
    return pixel_observation_space(), gym.spaces.Box(-1.0, 1.0, (4,), np.float32)


class RandomPixelEnv(gym.Env):
    """The pixel env's spaces with random observations: builds an SAC model with no renderer."""

    def __init__(self) -> None:
        self.observation_space, self.action_space = _spaces()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


# ---------------------------------------------------------------------------------------------------------
# routing_report and the policy class, on hand-built spaces (no renderer, fast)
# ---------------------------------------------------------------------------------------------------------
def test_routing_report_tells_the_three_routings_apart():
    observation_space, action_space = _spaces()
    ours = lab.routing_report(lab.drqv2_policy(observation_space, action_space))
    shared = lab.routing_report(lab.sb3_shared_encoder_policy(observation_space, action_space))
    separate = lab.routing_report(SACPolicy(observation_space, action_space, lambda _: 3e-4,
                                            features_extractor_class=lab.ManipulationExtractor,
                                            normalize_images=False))
    n = ours["encoder_tensors"]
    assert n == 8 and ours["features_dim"] == ours["actor_input_dim"] == ours["critic_input_dim"] == 80
    assert (ours["encoder_in_actor_optimizer"], ours["encoder_in_critic_optimizer"]) == (0, n)
    assert (shared["encoder_in_actor_optimizer"], shared["encoder_in_critic_optimizer"]) == (n, 0)
    assert ours["trained_by"] == "critic loss" and shared["trained_by"] == "actor loss"
    assert ours["shared_encoder"] and shared["shared_encoder"] and not separate["shared_encoder"]
    assert (separate["encoder_in_actor_optimizer"], separate["encoder_in_critic_optimizer"]) == (n, n)
    assert all(r["target_encoder_separate"] for r in (ours, shared, separate))


def test_policy_refuses_separate_encoders():
    with pytest.raises(ValueError, match="MultiInputPolicy"):
        lab.DrQv2SACPolicy(*_spaces(), lambda _: 3e-4, share_features_extractor=False)


def test_policy_save_load_keeps_class_and_routing(tmp_path):
    observation_space, action_space = _spaces()
    policy = lab.drqv2_policy(observation_space, action_space)
    policy.save(str(tmp_path / "policy.pt"))
    loaded = lab.DrQv2SACPolicy.load(str(tmp_path / "policy.pt"), device="cpu")
    obs = {k: np.stack([v] * 3) for k, v in observation_space.sample().items()}
    assert type(loaded) is lab.DrQv2SACPolicy and loaded.normalize_images is False  # the encoder divides by 255
    assert lab.routing_report(loaded) == lab.routing_report(policy)
    np.testing.assert_allclose(loaded.predict(obs, deterministic=True)[0], policy.predict(obs, deterministic=True)[0],
                               atol=lab.SAVE_LOAD_ATOL)


def test_sac_saved_here_loads_in_a_fresh_process_without_custom_objects(tmp_path):
    model = SAC(lab.DrQv2SACPolicy, RandomPixelEnv(), buffer_size=10, device="cpu", seed=0)
    observation = model.observation_space.sample()
    np.savez(tmp_path / "obs.npz", **observation)
    model.save(tmp_path / "model.zip")
    expected, _ = model.predict(observation, deterministic=True)
    script = (  # a fresh interpreter that finds the labs the way a reader's does: on its import path
        "import numpy as np\n"
        "from stable_baselines3 import SAC\n"
        f"model = SAC.load({str(tmp_path / 'model.zip')!r}, device='cpu')\n"
        f"obs = dict(np.load({str(tmp_path / 'obs.npz')!r}))\n"
        f"np.save({str(tmp_path / 'actions.npy')!r}, model.predict(obs, deterministic=True)[0])\n"
        "print(type(model.policy).__module__ + '.' + type(model.policy).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)  # the installed project, from outside the repository
    assert done.returncode == 0, done.stderr[-2000:]
    assert "drqv2_sac_policy.DrQv2SACPolicy" in done.stdout
    np.testing.assert_allclose(np.load(tmp_path / "actions.npy"), expected, atol=lab.SAVE_LOAD_ATOL)


@pytest.mark.slow
def test_demo_mode_short_run(lab_script):
    done = lab_script.run("drqv2_sac_policy", "--demo", "--steps", "400", timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "losses finite: yes" in done.stdout
