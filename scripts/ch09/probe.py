"""Why a FetchReach learning curve is flat: does the critic know the way to the goal, and does the actor take it?

On FetchReach the way is known: the gripper should move along d = desired_goal - achieved_goal (the achieved goal
is the gripper's position). So every checkpoint of a run can be asked, on the same states s:

    critic -> goal   mean over s of cos( dQ/da at a = pi(s),  d )     Q = the smaller of the twin critics
    actor -> goal    mean over s of cos( pi(s)[:3],  d )              pi(s) = tanh(mu(s)), the deterministic action
    |action|         mean over s of |pi(s)[:3]| / sqrt(3)             1 = full speed on every axis

The actor climbs the critic's action gradient, so a critic that learns says "toward the goal" before its actor
can. ``critic -> goal`` rising while ``actor -> goal`` stays flat points at the actor's update; both flat point at
what the critic learns from (the observations, the relabelled rewards, the target). The states are a uniform
random walk from one seed, observed as the run observes them (rendered pixels, or the state vector), the same for
every checkpoint; states already within the success distance of the goal have no way to go and are left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.vec_env import DummyVecEnv

from ch09.errors import UserError
from ch09.experiment import GOAL_MODE, check_policy, train_config_of
from ch09.run.checkpoints import load_for_acting, meta_for_checkpoint, read_meta
from pixel_wrapper import make_fetch_env

PROBE_ENV = "FetchReach-v4"
"""The one task whose way to the goal is the gripper's own: the direction from achieved to desired goal."""
PROBE_STATES = 200
"""States of the random walk each checkpoint is asked on (before those already at the goal are left out)."""


def random_walk(env: Any, n_states: int, seed: int) -> dict[str, np.ndarray]:
    """``n_states`` observations of a uniform random walk from ``reset(seed)``, stacked key by key."""
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    seen: list[dict[str, np.ndarray]] = []
    while len(seen) < n_states:
        seen.append(obs)
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            obs, _ = env.reset()
    return {key: np.stack([o[key] for o in seen]) for key in seen[0]}


def _mean_cosine(x: np.ndarray, y: np.ndarray) -> float:
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return float(np.mean(np.sum(x * y, axis=1) / np.maximum(norms, 1e-12)))


def ask_checkpoint(model: Any, states: dict[str, np.ndarray], success_distance: float) -> dict[str, float]:
    """The three answers of one loaded model on ``states`` (keys as in the module docstring), over the states
    farther from their goal than ``success_distance`` (the env's ``distance_threshold``: closer is a success)."""
    way = states["desired_goal"] - states["achieved_goal"]
    keep = np.linalg.norm(way, axis=1) > success_distance
    if not keep.any():
        raise UserError("Every probed state is already within the success distance of its goal; probe with more "
                        "--states or another --seed.")
    policy = model.policy
    policy.set_training_mode(False)
    obs, _ = policy.obs_to_tensor({key: value[keep] for key, value in states.items()})
    with th.no_grad():
        actions = policy.actor(obs, deterministic=True)  # tanh(mu): Fetch's actions are [-1, 1], never rescaled
    actions = actions.detach().requires_grad_(True)
    q = th.min(*policy.critic(obs, actions))  # the actor's objective, as the update sees it
    (grad,) = th.autograd.grad(q.sum(), actions)
    move, grad, way = actions.detach()[:, :3].cpu().numpy(), grad[:, :3].cpu().numpy(), way[keep]
    return {"critic_to_goal": _mean_cosine(grad, way), "actor_to_goal": _mean_cosine(move, way),
            "action_size": float(np.mean(np.linalg.norm(move, axis=1)) / math.sqrt(3)), "states": int(keep.sum())}


def probe_checkpoints(checkpoints: Sequence[Path], n_states: int = PROBE_STATES, seed: int = 0,
                      device: str = "cpu") -> dict[str, Any]:
    """Ask every checkpoint of one run (its periodic snapshots, in any order) on one random walk; rows by steps."""
    if not checkpoints:
        raise UserError("Name at least one checkpoint to probe (a run's .zip files, e.g. checkpoints/*_steps.zip).")
    if n_states < 1:
        raise UserError(f"--states must be at least 1, got {n_states}.")
    missing = [str(path) for path in checkpoints if not path.is_file()]
    if missing:
        raise UserError(f"No checkpoint {missing[0]}: pass the .zip files of a run (its checkpoints/ folder).")
    metas = {meta_for_checkpoint(path) for path in checkpoints}
    if len(metas) > 1:
        raise UserError(f"The checkpoints belong to {len(metas)} runs ({', '.join(sorted(m.name for m in metas))}); "
                        "probe one run at a time.")
    (meta_path,) = metas
    cfg = train_config_of(read_meta(meta_path, f"checkpoint {checkpoints[0]}"), checkpoints[0])
    if cfg.env != PROBE_ENV:
        raise UserError(f"{checkpoints[0]} trained on {cfg.env}; the probe knows the way to the goal only on "
                        f"{PROBE_ENV}, where it is the gripper's own.")
    env = make_fetch_env(cfg.env, pixels=not cfg.full_state, native_render=cfg.native_render, goal_mode=GOAL_MODE)
    try:
        states = random_walk(env, n_states, seed)
        rows = []
        for checkpoint in checkpoints:
            model = load_for_acting(checkpoint, DummyVecEnv([lambda: env]), device)
            check_policy(model, cfg, checkpoint, "its metadata describes")
            rows.append({"checkpoint": checkpoint.name, "steps": int(model.num_timesteps),
                         **ask_checkpoint(model, states, env.get_wrapper_attr("distance_threshold"))})
    finally:
        env.close()
    return {"env": PROBE_ENV, "run": meta_path.name.removesuffix(".meta.json"), "seed": seed,
            "random_walk_states": n_states, "device": device, "probes": sorted(rows, key=lambda row: row["steps"])}


def probe_markdown(report: dict[str, Any]) -> str:
    """One row per checkpoint, and what the columns mean."""
    lines = ["| env steps | critic -> goal | actor -> goal | \\|action\\| |", "|---|---|---|---|"]
    lines += [f"| {row['steps']:,} | {row['critic_to_goal']:.2f} | {row['actor_to_goal']:.2f} | "
              f"{row['action_size']:.2f} |" for row in report["probes"]]
    states = report["probes"][0]["states"] if report["probes"] else 0
    lines += ["", f"{report['run']} on {report['device']}: {states} of {report['random_walk_states']} states of a "
                  f"random walk (seed {report['seed']}) away from the goal; cosines with the way to the goal (1 "
                  "toward, 0 unrelated, -1 away)"]
    return "\n".join(lines)
