"""What ``eval`` writes and ``aggregate`` reads: deterministic episodes, the eval JSON, and the summaries over seeds
and over a run's snapshots (``stats`` holds the interval rules, ``artifacts.RunPaths`` the file names).

| function                | what it gives                                                                     |
|-------------------------|-----------------------------------------------------------------------------------|
| ``run_episodes``        | N deterministic episodes of a model: success, final goal distance, return, length |
| ``eval_result``         | the eval JSON of one checkpoint (Wilson interval over its episodes)               |
| ``read_eval_file``      | an eval JSON read back, its shape checked (every file read is untrusted)          |
| ``success_over_seeds``  | one number over seeds of one step count (refuses mixed step counts)               |
| ``success_over_steps``  | success against training steps, one row per snapshot step count                  |
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3 import SAC

from ch09.errors import UserError
from ch09.run.artifacts import (
    AGGREGATE_FORMAT,
    EVAL_FORMAT,
    SUCCESS_VS_STEPS_FORMAT,
    git_commit,
    now_iso,
    package_versions,
)
from ch09.run.digest import sha256_file
from ch09.run.stats import MixedStepCounts, common_step_count, success_summary, wilson_interval
from ch09.run.validation import FieldType, Number, check_fields, check_range, read_json_object


def run_episodes(model: SAC, env: gym.Env, n_episodes: int, seed: int) -> list[dict[str, Any]]:
    episodes = []
    obs, info = env.reset(seed=seed)
    for episode in range(n_episodes):
        if episode > 0:
            obs, info = env.reset()
        done, episode_return, length = False, 0.0, 0
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, info = env.step(action)
            episode_return += float(reward)
            length += 1
            done = terminated or truncated
        distance = float(np.linalg.norm(np.asarray(obs["achieved_goal"]) - np.asarray(obs["desired_goal"])))
        episodes.append({"episode": episode, "success": bool(info.get("is_success", 0.0)),
                         "final_goal_distance": round(distance, 5), "return": episode_return, "length": length})
    return episodes


def eval_result(checkpoint: Path, source: str | None, meta: dict[str, Any], steps: int, eval_seed: int,
                episodes: list[dict[str, Any]], videos: list[dict[str, Any]], wall_time_s: float) -> dict[str, Any]:
    """The eval JSON of one checkpoint: its episodes, the success rate with a Wilson 95% interval, and where the
    numbers came from (the checkpoint's digest, the training config, versions, commit)."""
    n_success = sum(e["success"] for e in episodes)
    low, high = wilson_interval(n_success, len(episodes))
    return {
        "format": EVAL_FORMAT,
        "checkpoint": str(checkpoint),
        "checkpoint_source": source,
        "checkpoint_sha256": sha256_file(checkpoint),
        "name": checkpoint.name.removesuffix(".zip"),
        "tag": meta["tag"],
        "env_id": meta["env_id"],
        "train_seed": meta["seed"],
        "checkpoint_steps": steps,
        "eval_seed": eval_seed,
        "n_episodes": len(episodes),
        "deterministic": True,
        "success_rate": n_success / len(episodes),
        "success_ci95": [round(low, 4), round(high, 4)],
        "ci_method": "Wilson score interval, 95%",
        "mean_final_goal_distance": float(np.mean([e["final_goal_distance"] for e in episodes])),
        "episodes": episodes,
        "videos": videos,
        "wall_time_s": round(wall_time_s, 1),
        "config": meta["config"],
        "versions": package_versions(),
        "git": git_commit(),
        "created_at": now_iso(),
    }


EVAL_FIELDS: dict[str, FieldType] = {
    "format": str, "name": str, "tag": str, "env_id": str, "train_seed": int, "checkpoint_steps": int,
    "n_episodes": int, "success_rate": Number, "success_ci95": list, "mean_final_goal_distance": Number}
"""The fields of an eval JSON that aggregate reads, with their JSON types: checked before any is used."""


AGGREGATE_STEPS_FIX = ("pass the eval files of one step count (evaluate each seed's snapshot of the same steps, "
                       "checkpoints/<run>_<500K>_steps.zip), or every snapshot's file of each seed for success "
                       "against steps")
"""What aggregate tells a user whose eval files mix step counts (``stats.common_step_count``)."""


def read_eval_file(path: Path) -> dict[str, Any]:
    """An eval result of this script, its shape checked (every file read is untrusted)."""
    fix = "pass the *_eval.json files that `eval --checkpoint ...` wrote, one per seed"
    data = read_json_object(path, "Eval file", fix)
    if data.get("format") != EVAL_FORMAT:
        raise UserError(f"{path} has format {data.get('format')!r}, not {EVAL_FORMAT!r} (not an eval result of this "
                        f"script); {fix}.")
    check_fields(data, EVAL_FIELDS, f"Eval file {path}", fix)
    check_range(data["success_rate"], 0.0, 1.0, f"success_rate in {path}", fix)
    interval = data["success_ci95"]
    if len(interval) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in interval):
        raise UserError(f"Eval file {path}: success_ci95 should be two numbers [low, high], found "
                        f"{json.dumps(interval)[:40]}; {fix}.")
    return data


def success_over_seeds(results: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """The aggregate JSON: mean, std and a 95% interval of the success rate over seeds (one file per seed, named
    ``names``), at the one step count they all share; files of different step counts are refused."""
    try:
        steps = common_step_count({name: r["checkpoint_steps"] for name, r in zip(names, results)},
                                  AGGREGATE_STEPS_FIX)
    except MixedStepCounts as exc:
        raise UserError(str(exc)) from None
    rates = [float(r["success_rate"]) for r in results]
    mean, std, ci, method = success_summary(rates, [int(r["n_episodes"]) for r in results])
    return {
        "format": AGGREGATE_FORMAT,
        "tag": results[0]["tag"],
        "env_id": results[0]["env_id"],
        "steps": steps,
        "n_seeds": len(rates),
        "seeds": [r["train_seed"] for r in results],
        "episodes_per_seed": sorted({r["n_episodes"] for r in results}),
        "success_rate_mean": mean,
        "success_rate_std": std,
        "success_rate_ci95": [round(ci[0], 4), round(ci[1], 4)],
        "ci_method": method,
        "per_seed": [{"seed": r["train_seed"], "success_rate": r["success_rate"], "steps": r["checkpoint_steps"],
                      "file": r["name"]} for r in results],
        "mean_final_goal_distance": float(np.mean([r["mean_final_goal_distance"] for r in results])),
        "created_at": now_iso(),
    }


def success_over_steps(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Success against training steps: the eval files of a run's snapshots (of one seed or several), one row
    per step count, with a t interval over the seeds at that step (Wilson where there is one seed)."""
    pairs = [(r["train_seed"], r["checkpoint_steps"]) for r in results]
    if len(set(pairs)) < len(pairs):
        repeated = sorted({pair for pair in pairs if pairs.count(pair) > 1})
        raise UserError(f"Several eval files are of the same seed at the same step count (seed, steps: {repeated}); "
                        "pass one file per seed and snapshot.")
    by_steps: dict[int, list[dict[str, Any]]] = {}
    for result in results:
        by_steps.setdefault(int(result["checkpoint_steps"]), []).append(result)
    rows = []
    for steps, group in sorted(by_steps.items()):
        rates = [float(r["success_rate"]) for r in group]
        mean, std, ci, method = success_summary(rates, [int(r["n_episodes"]) for r in group])
        rows.append({"steps": steps, "n_seeds": len(group), "seeds": sorted(r["train_seed"] for r in group),
                     "episodes_per_seed": sorted({r["n_episodes"] for r in group}), "success_rate_mean": mean,
                     "success_rate_std": std, "success_rate_ci95": [round(ci[0], 4), round(ci[1], 4)],
                     "ci_method": method, "files": [r["name"] for r in group]})
    return {"format": SUCCESS_VS_STEPS_FORMAT, "tag": results[0]["tag"], "env_id": results[0]["env_id"],
            "rows": rows, "created_at": now_iso()}
