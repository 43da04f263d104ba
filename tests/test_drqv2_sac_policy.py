"""Tests for scripts/labs/drqv2_sac_policy.py: the lab's own claims in-process, its modes as subprocesses.

The claims are the lab's `verify()`; these tests add only what a claim cannot say about itself: that the
modes run as a reader runs them (`python scripts/labs/drqv2_sac_policy.py --verify`), that a model saved there
loads in ANOTHER process without `custom_objects`, and that `routing_report` tells SB3's routings apart.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3 import SAC
from stable_baselines3.sac.policies import SACPolicy

import drqv2_sac_policy as lab
from visual_encoder import pixel_dict_space

REPO_ROOT = Path(__file__).resolve().parents[1]
LAB = REPO_ROOT / "scripts" / "labs" / "drqv2_sac_policy.py"
SUBPROCESS_TIMEOUT_S = 300


def run_lab(*args: str, timeout: int = SUBPROCESS_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(LAB), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture()
def one_thread():
    previous = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(previous)


def _spaces() -> tuple[gym.spaces.Dict, gym.spaces.Box]:
    return pixel_dict_space(), gym.spaces.Box(-1.0, 1.0, (4,), np.float32)


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
# The lab's claims, in-process (the module is imported by name here: SAC.save pickles it by reference)
# ---------------------------------------------------------------------------------------------------------
def test_verify_claims_in_process(one_thread):
    claims = lab.verify()
    assert len(claims) == 8
    for claim in claims:
        assert claim.passed, f"{claim.name}: {claim.detail}"


# ---------------------------------------------------------------------------------------------------------
# routing_report and the policy class, on hand-built spaces (no renderer, fast)
# ---------------------------------------------------------------------------------------------------------
def test_routing_report_tells_the_three_routings_apart():
    observation_space, action_space = _spaces()
    ours = lab.routing_report(lab.drqv2_policy(observation_space, action_space))
    shared = lab.routing_report(lab.sb3_default_policy(observation_space, action_space))
    separate = lab.routing_report(SACPolicy(observation_space, action_space, lambda _: 3e-4,
                                            features_extractor_class=lab.ManipulationExtractor))
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
    assert type(loaded) is lab.DrQv2SACPolicy
    assert lab.routing_report(loaded) == lab.routing_report(policy)
    np.testing.assert_allclose(loaded.predict(obs, deterministic=True)[0], policy.predict(obs, deterministic=True)[0],
                               atol=lab.SAVE_LOAD_ATOL)


def test_sac_saved_here_loads_in_a_fresh_process_without_custom_objects(tmp_path):
    model = SAC(lab.DrQv2SACPolicy, RandomPixelEnv(), buffer_size=10, device="cpu", seed=0)
    observation = model.observation_space.sample()
    np.savez(tmp_path / "obs.npz", **observation)
    model.save(tmp_path / "model.zip")
    expected, _ = model.predict(observation, deterministic=True)
    script = (
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {str(LAB.parent)!r})\n"
        "from stable_baselines3 import SAC\n"
        f"model = SAC.load({str(tmp_path / 'model.zip')!r}, device='cpu')\n"
        f"obs = dict(np.load({str(tmp_path / 'obs.npz')!r}))\n"
        f"np.save({str(tmp_path / 'actions.npy')!r}, model.predict(obs, deterministic=True)[0])\n"
        "print(type(model.policy).__module__ + '.' + type(model.policy).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "drqv2_sac_policy.DrQv2SACPolicy" in done.stdout
    np.testing.assert_allclose(np.load(tmp_path / "actions.npy"), expected, atol=lab.SAVE_LOAD_ATOL)


def test_demo_rejects_too_few_steps(capsys):
    with pytest.raises(SystemExit) as exit_info:
        lab.main(["--demo", "--steps", "10"])
    assert exit_info.value.code == 2
    assert "--steps must be at least" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The modes as a reader runs them
# ---------------------------------------------------------------------------------------------------------
def test_verify_mode_subprocess():
    done = run_lab("--verify")
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "8/8 claims passed" in done.stdout
    # run as __main__, the lab re-imports itself by name, so SAC.save pickled the class by reference
    assert "class drqv2_sac_policy.DrQv2SACPolicy" in done.stdout


def test_probe_mode_subprocess():
    done = run_lab("--probe")
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    out = done.stdout
    assert "probe: routing as expected" in out
    assert "ratio critic / actor" in out
    encoder_in_actor = next(line for line in out.splitlines() if line.startswith("encoder in actor optimizer"))
    assert encoder_in_actor.split()[-2:] == ["8/8", "0/8"]  # SB3 default, ours


def test_bridge_mode_subprocess():
    done = run_lab("--bridge")
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "8/8 claims passed" in done.stdout
    assert "probe: routing as expected" in done.stdout
    assert "bridge: 9/9 criteria met by DrQv2SACPolicy" in done.stdout


@pytest.mark.slow
def test_demo_mode_short_run():
    done = run_lab("--demo", "--steps", "400", timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "losses finite: yes" in done.stdout
