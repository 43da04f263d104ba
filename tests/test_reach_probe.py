"""Tests for scripts/reach_probe.py and ch09/probe.py: the critic's and the actor's way to the goal, per checkpoint."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import bench_train
import numpy as np
import pytest
import reach_probe
import torch as th

from ch09.probe import ask_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SUCCESS_DISTANCE = 0.05
"""Fetch's ``distance_threshold``, as the probe reads it from the env."""


def reaching_model(direction: float) -> SimpleNamespace:
    """A stand-in for a loaded model whose answers are known: its actor moves at half speed along ``direction`` x
    the way to the goal, and its critic values the distance left after the move (so dQ/da points at the goal)."""

    def actor(obs: dict[str, th.Tensor], deterministic: bool) -> th.Tensor:
        way = obs["desired_goal"] - obs["achieved_goal"]
        move = direction * 0.5 * way / way.norm(dim=1, keepdim=True)
        return th.cat([move, th.zeros(len(way), 1)], dim=1)

    def critic(obs: dict[str, th.Tensor], actions: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        left = (obs["achieved_goal"] + 0.01 * actions[:, :3] - obs["desired_goal"]).norm(dim=1, keepdim=True)
        return -left, -left - 1.0

    policy = SimpleNamespace(set_training_mode=lambda mode: None, actor=actor, critic=critic,
                             obs_to_tensor=lambda obs: ({k: th.as_tensor(v) for k, v in obs.items()}, True))
    return SimpleNamespace(policy=policy)


def test_the_answers_are_the_cosines_with_the_way_to_the_goal_over_the_states_that_have_one():
    rng = np.random.default_rng(0)
    achieved = rng.normal(size=(40, 3)).astype(np.float32)
    desired = achieved + rng.normal(size=(40, 3)).astype(np.float32) * 0.3
    desired[:5] = achieved[:5] + SUCCESS_DISTANCE / 2  # already there: no way to go, left out
    states = {"achieved_goal": achieved, "desired_goal": desired, "observation": rng.normal(size=(40, 10))}
    assert (np.linalg.norm(desired[5:] - achieved[5:], axis=1) > SUCCESS_DISTANCE).all()

    toward = ask_checkpoint(reaching_model(+1.0), states, SUCCESS_DISTANCE)
    assert toward["states"] == 35
    assert toward["critic_to_goal"] == pytest.approx(1.0, abs=1e-5)
    assert toward["actor_to_goal"] == pytest.approx(1.0, abs=1e-5)
    assert toward["action_size"] == pytest.approx(0.5 / math.sqrt(3), abs=1e-5)

    away = ask_checkpoint(reaching_model(-1.0), states, SUCCESS_DISTANCE)
    assert away["actor_to_goal"] == pytest.approx(-1.0, abs=1e-5)
    assert away["critic_to_goal"] == pytest.approx(1.0, abs=1e-5)  # the critic still knows the way


def test_a_real_runs_snapshots_are_probed_in_step_order_and_bad_input_is_one_sentence(production, tmp_path, cli):
    root = tmp_path / "run"
    production.check("train", "--env", "FetchReach-v4", *production.STATE_BUDGET, "--total-steps", "200",
                     "--eval-freq", "0", "--artifact-root", str(root))
    snapshots = sorted((root / "checkpoints").glob("*_steps.zip"))
    assert len(snapshots) == 2

    out = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, "scripts/reach_probe.py", *map(str, reversed(snapshots)), "--states", "60",
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
                          env=production.environment())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["run"] == "ch09_fullstate_FetchReach-v4_seed0" and report["random_walk_states"] == 60
    assert [row["steps"] for row in report["probes"]] == [100, 200]
    for row in report["probes"]:
        assert 0 < row["states"] <= 60
        assert -1.0 <= row["critic_to_goal"] <= 1.0 and -1.0 <= row["actor_to_goal"] <= 1.0
        assert 0.0 <= row["action_size"] <= 1.0
    # what the command printed is what --report renders of its file (the README's measured blocks)
    assert bench_train.markdown_report(out) in proc.stdout

    code, _, err = cli.run(str(root / "checkpoints" / "nothing_100_steps.zip"), main=reach_probe.main)
    cli.assert_user_error(code, err, "No checkpoint", "nothing_100_steps.zip")

    other = tmp_path / "other"
    other.mkdir()
    for path in (snapshots[0], root / "checkpoints" / "ch09_fullstate_FetchReach-v4_seed0.meta.json"):
        shutil.copy(path, other / path.name.replace("seed0", "seed1"))
    code, _, err = cli.run(str(snapshots[0]), str(next(other.glob("*_steps.zip"))), main=reach_probe.main)
    cli.assert_user_error(code, err, "belong to 2 runs", "probe one run at a time")

    meta_path = next(other.glob("*.meta.json"))
    meta = json.loads(meta_path.read_text())
    meta["config"]["env"] = "FetchPush-v4"
    meta_path.write_text(json.dumps(meta))
    code, _, err = cli.run(str(next(other.glob("*_steps.zip"))), main=reach_probe.main)
    cli.assert_user_error(code, err, "trained on FetchPush-v4", "only on FetchReach-v4")
