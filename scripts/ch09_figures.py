#!/usr/bin/env python3
"""Chapter 9 figures, each one a command you can re-run on your own environment, logs and results.

The book's figures are not drawings: every number on them is measured when the command runs.

    figure               what it shows                                            where the numbers come from
    -------------------  -------------------------------------------------------  ------------------------------------
    env-frame            the 84x84 observation next to the same scene at 480x480, the lab wrapper (make_fetch_env);
                         puck / gripper / goal boxed with their sizes in pixels   object sizes measured by re-colouring
                         and the observation dict's keys, shapes and dtypes       each object and diffing the frames
    encoder-progression  NatureCNN vs ManipulationCNN layer by layer: how much    the lab's 5x5 blob measurement
                         of a 5-pixel object survives each layer                  (manipulation_encoder.blob_reach)
    loss-phases          success rate, critic loss, actor loss on one step axis   TensorBoard event files, read with
                         with the three training phases shaded                    TensorBoard's own EventAccumulator
    investigation        success rate per investigation step (Steps 0-4) as bars  results/*_eval.json (or aggregate
                         with 95% confidence intervals, the breakthrough marked   files) written by ch09_pixel_push.py
    rollout              one episode of a checkpoint as a filmstrip: 6-8 evenly   the checkpoint, run deterministically
                         spaced frames of the camera view (goal marker shown)     on the env it was trained on
                         above the 84x84 observation the policy acted on          (ch09/run/video.py's EpisodeRecorder)

The loss-phases and investigation figures read only JSON and event files, so they load no torch, SB3 or MuJoCo.

Usage (PNG and SVG land in figures/, which git ignores; --out-dir changes that):

    python scripts/ch09_figures.py env-frame [--seed 0]
    python scripts/ch09_figures.py encoder-progression
    python scripts/ch09_figures.py loss-phases --run runs/ch09_manip_noDrQ_criticEnc/FetchPush-v4/seed0
    python scripts/ch09_figures.py loss-phases --run ... --phases 1.2M,3.5M     # boundaries by hand
    python scripts/ch09_figures.py investigation --results results/
    python scripts/ch09_figures.py rollout --checkpoint checkpoints/ch09_manip_noDrQ_criticEnc_FetchPush-v4_seed0.zip

The three-phase rule (loss-phases, class PhaseRule), stated once so the figure can be checked by hand:
    s(t)   = success rate smoothed with TensorBoard's debiased exponential moving average (--smoothing, 0.6)
    Phase 3 (convergence):  from the first point where s(t) reaches 90% of its maximum to the end
    Phase 2 (hockey stick): the climb before it, from the last point where s(t) is at or below 10%
    Phase 1 (failure):      everything before the climb
    If max s(t) < 20% there was no hockey stick: the whole run is Phase 1.
    ("Last at or below 10%", not "first above 10%": a lucky blip early in Phase 1 must not start Phase 2.)
The success curve is rollout/success_rate by default (--success-curve eval to change it): one point per logged
batch of episodes, the densest signal, smoothed as drawn. It is SB3's mean over the last 100 episodes, so it
lags the policy by up to 100 x 50 = 5,000 steps: nothing at millions of steps, but a short run's phases are better
read from eval/success_rate (each point one deterministic evaluation, used unsmoothed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")  # figures are files; no display is needed or wanted

try:
    from cli_guard import guard_entry_point, parse_args_naming_unknown_flags, parse_with_one_line_errors, run_guarded
except ModuleNotFoundError:  # the project is not installed in this Python: one sentence, not a traceback
    print("error: this project is not installed in this Python; run `pip install -e .` in the repository, or run "
          "the command through `bash docker/dev.sh python ...`.", file=sys.stderr)
    sys.exit(2)  # a mistake the user can fix, as cli_guard would say it (it is what could not be imported)

guard_entry_point(__name__)  # before matplotlib loads: a failing import or an early SIGTERM is one line

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter, NullFormatter

# Only the standard library behind these two: the JSON and event-file figures load no torch, SB3 or MuJoCo.
from ch09.run.artifacts import (
    AGGREGATE_FORMAT,
    EVAL_FORMAT,
    INVESTIGATION_TOTAL_STEPS,
    REPO_ROOT,
    TENSORBOARD_EVENTS,
    format_steps,
    parse_steps,
    read_scalar_events,
    tensorboard_event_files,
)
from ch09.run.stats import MixedStepCounts, common_step_count, success_summary

DEFAULT_OUT_DIR = REPO_ROOT / "figures"

# ---------------------------------------------------------------------------------------------------------------
# Figure geometry. Saved WITHOUT bbox_inches="tight", so every PNG is exactly FIGURE_SIZES[name] * DPI pixels
# (the tests check the PNG header against these numbers).
# ---------------------------------------------------------------------------------------------------------------
DPI = 150
FIGURE_SIZES: dict[str, tuple[float, float]] = {  # inches (width, height)
    "env-frame": (14.0, 5.6),
    "encoder-progression": (14.0, 6.4),
    "loss-phases": (8.0, 7.5),
    "investigation": (10.5, 5.6),
    "rollout": (16.0, 5.0),
}
FILE_STEMS = {  # figures/<stem>.png and .svg
    "env-frame": "ch09_env_frame",
    "encoder-progression": "ch09_encoder_progression",
    "loss-phases": "ch09_loss_phases",
    "investigation": "ch09_investigation",
    "rollout": "ch09_rollout",  # + _<checkpoint name>: a Phase-1 and a Phase-3 checkpoint get two files
}
PHASE_COLORS = ("#d62728", "#ff7f0e", "#2ca02c")  # failure, hockey stick, convergence
PHASE_NAMES = ("Phase 1: failure", "Phase 2: hockey stick", "Phase 3: convergence")
PHASE_ALPHA = 0.12


class FigureInputError(Exception):
    """A problem the user can fix (missing folder, no logs, bad option); main() prints it as one sentence."""


def save_figure(fig: plt.Figure, figure: str, out_dir: Path, stem: str | None = None) -> list[Path]:
    """Write <out_dir>/<stem>.png and .svg at DPI and return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or FILE_STEMS[figure]
    paths = []
    for suffix in (".png", ".svg"):
        path = out_dir / f"{stem}{suffix}"
        fig.savefig(path, dpi=DPI, facecolor="white")
        paths.append(path)
    plt.close(fig)
    return paths


def step_label(value: float, _pos: Any = None) -> str:
    """An env-step count as the production script writes it (2M, 1.5M, 800K, 250); also a matplotlib formatter."""
    return format_steps(int(round(value)))


# ===============================================================================================================
# Figure 1: env-frame -- what the agent sees
# ===============================================================================================================
FRAME_SIZES = (84, 480)  # the observation size and the native render size the wrapper resizes from
COLOUR_PROBES = (np.array([1.0, 0.0, 1.0, 1.0]), np.array([0.0, 1.0, 0.0, 1.0]))  # magenta vs green
PUCK_GEOMS = ("object0",)
GRIPPER_BODIES = ("robot0:gripper_link", "robot0:r_gripper_finger_link", "robot0:l_gripper_finger_link")
OBJECT_STYLES = {"puck": "#00e5ff", "gripper": "#ffd400", "goal": "#ff3b3b"}


@dataclass
class ObjectFootprint:
    """Where one object lands in a rendered frame: its visible pixels and their bounding box."""

    name: str
    pixel_count: int
    box: tuple[int, int, int, int]  # (row0, col0, row1, col1), inclusive

    @property
    def height(self) -> int:
        return self.box[2] - self.box[0] + 1

    @property
    def width(self) -> int:
        return self.box[3] - self.box[1] + 1


def _geom_ids(model: Any, geoms: Sequence[str] = (), bodies: Sequence[str] = ()) -> list[int]:
    import mujoco

    ids = [mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_GEOM, name) for name in geoms]
    body_ids = {mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, name) for name in bodies}
    ids += [g for g in range(model.ngeom) if int(model.geom_bodyid[g]) in body_ids]
    missing = [i for i in ids if i < 0]
    assert not missing, f"geoms {geoms} / bodies {bodies} not all found in the model; did the Fetch XML change?"
    return ids


def measure_footprint(env: Any, name: str, image_size: int, geom_ids: Sequence[int] = (),
                      site_ids: Sequence[int] = ()) -> ObjectFootprint:
    """Measure which pixels an object covers by rendering it twice in two different colours and diffing.

    Hiding the object instead would also remove its shading on the table; re-colouring changes exactly the pixels
    where the object itself is visible (occluded parts stay unchanged), so the mask is what the camera sees.
    Geoms with a material take their colour from it, so the material is detached while probing and restored after.
    """
    from pixel_wrapper import render_and_resize

    model = env.unwrapped.model
    saved = (model.geom_rgba[list(geom_ids)].copy(), model.geom_matid[list(geom_ids)].copy(),
             model.site_rgba[list(site_ids)].copy())
    frames = []
    try:
        for colour in COLOUR_PROBES:
            for g in geom_ids:
                model.geom_matid[g] = -1
                model.geom_rgba[g] = colour
            for s in site_ids:
                model.site_rgba[s] = colour
            frames.append(render_and_resize(env, image_size).astype(np.int16))
    finally:
        model.geom_rgba[list(geom_ids)], model.geom_matid[list(geom_ids)] = saved[0], saved[1]
        model.site_rgba[list(site_ids)] = saved[2]
    mask = np.abs(frames[0] - frames[1]).max(axis=0) > 8  # (H, W): changed in any channel
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return ObjectFootprint(name, 0, (0, 0, -1, -1))
    return ObjectFootprint(name, int(mask.sum()), (int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())))


def capture_scene(seed: int) -> dict[str, Any]:
    """Reset the lab's pixel env with `seed`; return the 84x84 observation, the 480x480 frame and footprints.

    Both frames come from the lab wrapper: the 84x84 one is obs["pixels"][-3:] (the newest frame of the stack)
    of the env the training script uses (native 84x84 render); the 480x480 one is the native render of the
    env built with native_render=False, reset with the same seed, so the scene is identical.
    """
    import mujoco

    from pixel_wrapper import GOAL_MARKER_SITE, make_fetch_env, render_and_resize

    scene: dict[str, Any] = {"seed": seed, "footprints": {}, "qpos": []}
    with contextlib.ExitStack() as open_envs:
        # Both envs are closed on the way out, whatever fails in between (the wrapper's close() frees each env's
        # render objects in its own GL context, so the order does not matter).
        for image_size, native in ((FRAME_SIZES[0], True), (FRAME_SIZES[1], False)):
            env = make_fetch_env("FetchPush-v4", pixels=True, native_render=native)
            open_envs.callback(env.close)
            obs, _ = env.reset(seed=seed)
            model = env.unwrapped.model
            scene["qpos"].append(env.unwrapped.data.qpos.copy())  # robot + puck pose, to check the scenes match
            if native:
                scene["obs"] = obs
                scene["frame84"] = np.asarray(obs["pixels"][-3:]).transpose(1, 2, 0)
            else:
                scene["frame480"] = render_and_resize(env, image_size).transpose(1, 2, 0)
            goal_site = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, GOAL_MARKER_SITE)
            scene["footprints"][image_size] = {
                "puck": measure_footprint(env, "puck", image_size, geom_ids=_geom_ids(model, geoms=PUCK_GEOMS)),
                "gripper": measure_footprint(env, "gripper", image_size,
                                             geom_ids=_geom_ids(model, bodies=GRIPPER_BODIES)),
                # The wrapper hides the goal marker (alpha 0); the probe colours have alpha 1, so this shows it
                # once, only for measuring, and restores the hidden state afterwards.
                "goal": measure_footprint(env, "goal", image_size, site_ids=[goal_site]),
            }
    assert np.allclose(*scene["qpos"]), "the 84x84 and 480x480 envs reset to different scenes with the same seed"
    return scene


def describe_observation(obs: dict[str, np.ndarray]) -> list[str]:
    """One line per observation key: name, shape, dtype."""
    lines = []
    for key, value in obs.items():
        value = np.asarray(value)
        lines.append(f"{key:<15} {str(tuple(value.shape)):<13} {str(value.dtype):<8}")
    return lines


def _draw_footprints(ax: plt.Axes, footprints: dict[str, ObjectFootprint], hidden_goal: bool) -> None:
    for name, fp in footprints.items():
        if fp.pixel_count == 0:
            continue
        r0, c0, r1, c1 = fp.box
        style = OBJECT_STYLES[name]
        ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0 + 1, r1 - r0 + 1, fill=False, lw=1.6,
                               ls="--" if (name == "goal" and hidden_goal) else "-", edgecolor=style))


ZOOM_MARGIN = 3  # pixels of context around the objects in the zoomed 84x84 crop


def _zoom_window(footprints: dict[str, ObjectFootprint], size: int) -> tuple[int, int, int, int]:
    """Smallest crop (row0, col0, row1, col1), inclusive, holding every measured object plus a margin."""
    boxes = [fp.box for fp in footprints.values() if fp.pixel_count > 0]
    r0 = max(0, min(b[0] for b in boxes) - ZOOM_MARGIN)
    c0 = max(0, min(b[1] for b in boxes) - ZOOM_MARGIN)
    r1 = min(size - 1, max(b[2] for b in boxes) + ZOOM_MARGIN)
    c1 = min(size - 1, max(b[3] for b in boxes) + ZOOM_MARGIN)
    return r0, c0, r1, c1


def plot_env_frame(scene: dict[str, Any], out_dir: Path) -> list[Path]:
    """Draw the scene capture_scene(seed) measured."""
    seed = scene["seed"]
    fig = plt.figure(figsize=FIGURE_SIZES["env-frame"], layout="constrained")
    grid = fig.add_gridspec(2, 3, width_ratios=[1.0, 1.0, 0.95], height_ratios=[1.0, 1.15])
    titles = {84: "What the agent sees: the 84x84 observation\n(obs[\"pixels\"][-3:], upscaled without smoothing)",
              480: "The same scene rendered at 480x480\n(make_fetch_env(native_render=False))"}
    for col, size in enumerate(FRAME_SIZES):
        ax = fig.add_subplot(grid[:, col])
        frame = scene["frame84"] if size == 84 else scene["frame480"]
        ax.imshow(frame, interpolation="nearest")
        footprints = scene["footprints"][size]
        _draw_footprints(ax, footprints, hidden_goal=(size == 84))
        ax.set_title(titles[size], fontsize=10)
        ax.set_xticks([0, size - 1])
        ax.set_yticks([0, size - 1])
        ax.tick_params(labelsize=8)
        legend = []
        for name, fp in footprints.items():
            note = ", hidden in obs" if name == "goal" else ""
            text = f"{name}: {fp.pixel_count} px ({fp.width}x{fp.height} box{note})"
            legend.append(Patch(facecolor="none", edgecolor=OBJECT_STYLES[name], lw=1.6,
                                ls="--" if name == "goal" else "-", label=text))
        ax.legend(handles=legend, loc="upper left", fontsize=8, framealpha=0.9, handlelength=1.2)

    # Zoom into the 84x84 observation: every square is one pixel the CNN receives.
    footprints = scene["footprints"][84]
    r0, c0, r1, c1 = _zoom_window(footprints, 84)
    ax = fig.add_subplot(grid[0, 2])
    ax.imshow(scene["frame84"][r0:r1 + 1, c0:c1 + 1], interpolation="nearest",
              extent=(c0 - 0.5, c1 + 0.5, r1 + 0.5, r0 - 0.5))
    ax.set_xticks(np.arange(c0 - 0.5, c1 + 1, 1.0), minor=True)
    ax.set_yticks(np.arange(r0 - 0.5, r1 + 1, 1.0), minor=True)
    ax.grid(which="minor", color="white", lw=0.3, alpha=0.5)
    ax.tick_params(which="both", length=0, labelsize=7)
    ax.set_xticks([c0, c1])
    ax.set_yticks([r0, r1])
    _draw_footprints(ax, footprints, hidden_goal=True)
    for name, fp in footprints.items():
        if fp.pixel_count:
            ax.annotate(f"{name}\n{fp.pixel_count} px", xy=((fp.box[1] + fp.box[3]) / 2, fp.box[0] - 0.5),
                        xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=7.5,
                        color="black", bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": OBJECT_STYLES[name],
                                             "alpha": 0.9})
    ax.set_title("84x84 zoom: one square = one input pixel", fontsize=9.5)

    ax = fig.add_subplot(grid[1, 2])
    ax.axis("off")
    lines = ["Observation dict (make_fetch_env)", f"{'key':<15} {'shape':<13} {'dtype':<8}"]
    lines += describe_observation(scene["obs"])
    lines += ["",
              f"pixels: {scene['obs']['pixels'].shape[0] // 3} stacked RGB frames, oldest",
              "  first; the newest is pixels[-3:]",
              "proprioception: gripper position (3),",
              "  finger positions (2), gripper",
              "  velocity (3), finger velocities (2)",
              "achieved/desired_goal: puck and goal",
              "  xyz as vectors; the goal marker is",
              "  hidden in the pixels so that HER's",
              "  relabelled goals never contradict",
              "  the image",
              f"scene: FetchPush-v4, reset(seed={seed})"]
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8.5,
            transform=ax.transAxes)
    return save_figure(fig, "env-frame", out_dir)


# ===============================================================================================================
# Figure 2: encoder-progression -- how much of a 5-pixel object survives each layer
# ===============================================================================================================
CROP_PIXELS = 44  # every grid panel shows the same 44x44-input-pixel window around the object (same scale)
ENCODER_COLORS = {"NatureCNN": "#d62728", "ManipulationCNN": "#1f77b4"}


def measure_encoders() -> dict[str, list[dict]]:
    """The lab's blob measurement for both encoders, with the input image prepended as 'layer 0'."""
    from manipulation_encoder import BLOB_SIZE, ManipulationCNN, blob_reach
    from pixel_wrapper import FRAME_STACK, IMAGE_SIZE
    from visual_encoder import NatureCNN

    in_channels = 3 * FRAME_STACK
    input_row = {"layer": "input", "size": IMAGE_SIZE, "receptive_field": 1, "stride": 1,
                 "footprint": float(BLOB_SIZE), "reached_cells": BLOB_SIZE**2, "max_coverage": 1.0}
    return {"NatureCNN": [input_row, *blob_reach(NatureCNN(in_channels))],
            "ManipulationCNN": [input_row, *blob_reach(ManipulationCNN(in_channels))]}


def _draw_grid_panel(ax: plt.Axes, row: dict, color: str, blob_size: int) -> None:
    """One layer's output grid around the object, in input-pixel units so all panels share one scale.

    Cells are tiles `stride` input pixels wide; shaded cells are the ones the object reaches (sqrt(reached_cells)
    per axis, measured); the solid square is the object, blob_size pixels = `footprint` cells of this grid.
    Sizes and counts are the measured ones; the placement is schematic (the reached block is centred on the
    object, where the real grid may sit up to half a cell off).
    """
    half, stride = CROP_PIXELS / 2, row["stride"]
    reached = round(math.sqrt(row["reached_cells"]))
    block = reached * stride / 2  # the reached cells, centred on the object
    ax.add_patch(Rectangle((-block, -block), 2 * block, 2 * block, facecolor=color, alpha=0.18, lw=0))
    first = -block - stride * math.ceil((half - block) / stride)
    lines = np.arange(first, half + stride, stride)
    if stride > 1:  # at stride 1 the grid is the pixel grid: too dense to draw usefully
        ax.vlines(lines, -half, half, color="0.55", lw=0.6)
        ax.hlines(lines, -half, half, color="0.55", lw=0.6)
    ax.add_patch(Rectangle((-blob_size / 2, -blob_size / 2), blob_size, blob_size, facecolor="black", lw=0,
                           zorder=3))
    ax.set_xlim(-half, half)
    ax.set_ylim(half, -half)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(1.2)


def plot_encoder_progression(out_dir: Path) -> list[Path]:
    from manipulation_encoder import BLOB_SIZE

    measured = measure_encoders()
    n_cols = max(len(rows) for rows in measured.values())
    fig = plt.figure(figsize=FIGURE_SIZES["encoder-progression"], layout="constrained")
    grid = fig.add_gridspec(2, n_cols + 1, width_ratios=[1.0] * n_cols + [1.9])
    for r, (encoder, rows) in enumerate(measured.items()):
        color = ENCODER_COLORS[encoder]
        for c, row in enumerate(rows):
            ax = fig.add_subplot(grid[r, c])
            _draw_grid_panel(ax, row, color, BLOB_SIZE)
            title = "input image" if c == 0 else row["layer"]
            ax.set_title(f"{title}\n{row['size']}x{row['size']} grid", fontsize=9)
            ax.set_xlabel(f"{row['footprint']:.2f} cells/axis\n{row['max_coverage']:.0%} of best cell's\n"
                          f"{row['receptive_field']}x{row['receptive_field']} px view", fontsize=8)
            if c == 0:
                ax.set_ylabel(encoder, fontsize=11, color=color, fontweight="bold")
        if len(rows) < n_cols:  # the shorter encoder: explain the panels in the free slot
            ax = fig.add_subplot(grid[r, len(rows):n_cols])
            ax.axis("off")
            ax.text(0.5, 0.5, f"each panel: a {CROP_PIXELS}x{CROP_PIXELS}-pixel\nwindow of the input, same scale\n"
                              f"black: the {BLOB_SIZE}x{BLOB_SIZE}-pixel object\nlines: the layer's cells\n"
                              "shaded: cells the object reaches",
                    ha="center", va="center", fontsize=8.5, transform=ax.transAxes,
                    bbox={"boxstyle": "round,pad=0.5", "fc": "0.96", "ec": "0.7"})

    charts = grid[:, n_cols].subgridspec(2, 1, hspace=0.08)
    ax_span = fig.add_subplot(charts[0])
    ax_cover = fig.add_subplot(charts[1], sharex=ax_span)
    for encoder, rows in measured.items():
        depth = np.arange(len(rows))
        kw = {"color": ENCODER_COLORS[encoder], "marker": "o", "ms": 4, "lw": 1.6, "label": encoder}
        ax_span.plot(depth, [row["footprint"] for row in rows], **kw)
        ax_cover.plot(depth, [row["max_coverage"] for row in rows], **kw)
        for ax, key, fmt in ((ax_span, "footprint", "{:.2f}"), (ax_cover, "max_coverage", "{:.0%}")):
            ax.annotate(fmt.format(rows[-1][key]), xy=(depth[-1], rows[-1][key]), xytext=(5, 0),
                        textcoords="offset points", va="center", fontsize=8, color=ENCODER_COLORS[encoder])
    ax_span.axhline(1.0, color="0.5", lw=0.7, ls="--")
    ax_span.text(0.02, 1.0, "one cell", transform=ax_span.get_yaxis_transform(), fontsize=7.5, color="0.4",
                 va="bottom")
    ax_span.set_yscale("log")
    ax_span.set_yticks([0.5, 1, 2, 5], ["0.5", "1", "2", "5"])
    ax_span.set_ylabel("object span\n(cells per axis)", fontsize=9)
    ax_span.legend(fontsize=8, loc="upper right")
    ax_cover.set_yscale("log")
    ax_cover.set_yticks([0.01, 0.1, 1.0], ["1%", "10%", "100%"])
    ax_cover.set_ylabel("share of the best\ncell's view", fontsize=9)
    ax_cover.set_xlabel("layer (0 = input)", fontsize=9)
    ax_cover.set_xticks(range(n_cols))
    ax_cover.set_xlim(-0.3, n_cols - 1 + 0.8)
    plt.setp(ax_span.get_xticklabels(), visible=False)
    for ax in (ax_span, ax_cover):
        ax.yaxis.set_minor_formatter(NullFormatter())  # log axes: keep only the labelled ticks set above
        ax.grid(alpha=0.3, lw=0.5, which="both")
        ax.tick_params(labelsize=8)
    sizes = {e: " -> ".join(str(row["size"]) for row in rows) for e, rows in measured.items()}
    fig.suptitle(f"How much of a {BLOB_SIZE}x{BLOB_SIZE}-pixel object survives each layer "
                 f"(measured with manipulation_encoder.blob_reach)\n"
                 f"NatureCNN {sizes['NatureCNN']}   vs   ManipulationCNN {sizes['ManipulationCNN']}", fontsize=10.5)
    return save_figure(fig, "encoder-progression", out_dir)


# ===============================================================================================================
# Figure 3: loss-phases -- the three-phase loss signature from TensorBoard logs
# ===============================================================================================================
SUCCESS_CURVES = {"rollout": "rollout/success_rate", "eval": "eval/success_rate"}
LINE_COLOR, EVAL_COLOR = "#1f77b4", "0.1"
CRITIC_TAG = "train/critic_loss"
MIN_POINTS_TO_SMOOTH = 20  # shorter curves are drawn raw, point by point
DEFAULT_SMOOTHING = 0.6  # TensorBoard's EMA weight for the success curve the phases are read from (--smoothing)
ACTOR_TAG = "train/actor_loss"


@dataclass(frozen=True)
class PhaseRule:
    """The phase-detection rule; the module docstring states it in words."""

    start_threshold: float = 0.10
    """Phase 2 starts at the last point before Phase 3 where the success rate is at or below this."""
    saturation_fraction: float = 0.90
    """Phase 3 starts when the smoothed success rate first reaches this fraction of its maximum."""
    min_peak: float = 0.20
    """Below this maximum smoothed success there is no hockey stick: the whole run is Phase 1."""


@dataclass
class Curve:
    """One TensorBoard scalar: steps and values, sorted by step."""

    tag: str
    steps: np.ndarray
    values: np.ndarray


def find_event_dir(run_dir: Path) -> Path:
    """The folder of run_dir's TensorBoard event files: run_dir itself, or its one sub-folder that has them.

    ch09_pixel_push.py logs every session of a run (resumes included) into the run folder itself; SB3's own
    tensorboard_log puts them one level down (SAC_1/). Several sub-folders are several runs (a parent folder
    of seed0/, seed1/, ...), whose curves must not be mixed, so that is refused.
    """
    if run_dir.is_file():
        raise FigureInputError(f"--run {run_dir} is a file; pass the run folder that holds it ({run_dir.parent}).")
    if not run_dir.is_dir():
        raise FigureInputError(
            f"run folder {run_dir} does not exist; pass --run runs/ch09_<tag>/<env>/seed<N> "
            "as written by 'scripts/ch09_pixel_push.py train'.")
    if tensorboard_event_files(run_dir):
        return run_dir
    dirs = sorted({p.parent for p in run_dir.rglob(TENSORBOARD_EVENTS) if p.is_file()})
    if not dirs:
        raise FigureInputError(
            f"run folder {run_dir} holds no TensorBoard event files (events.out.tfevents.*); "
            "point --run at a folder a training run has logged to.")
    if len(dirs) > 1:
        names = ", ".join(str(d.relative_to(run_dir)) for d in dirs[:4]) + (", ..." if len(dirs) > 4 else "")
        raise FigureInputError(f"run folder {run_dir} holds the logs of {len(dirs)} runs ({names}); "
                               "pass one of them with --run.")
    return dirs[0]


def read_scalars(run_dir: Path) -> dict[str, Curve]:
    """Every scalar curve of one run folder, read with TensorBoard's own EventAccumulator, sorted by step."""
    merged: dict[str, dict[int, float]] = defaultdict(dict)
    for tag, events in read_scalar_events(find_event_dir(run_dir)).items():
        for event in events:
            merged[tag][int(event.step)] = float(event.value)  # a step logged twice (resume): the later wins
    curves = {}
    for tag, points in merged.items():
        steps = np.array(sorted(points), dtype=np.int64)
        curves[tag] = Curve(tag, steps, np.array([points[s] for s in steps], dtype=np.float64))
    return curves


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing slider: exponential moving average, debiased so the start is not pulled to 0."""
    out = np.empty_like(values, dtype=np.float64)
    last, debias = 0.0, 0.0
    for i, v in enumerate(values):
        last = weight * last + (1.0 - weight) * v
        debias = weight * debias + (1.0 - weight)
        out[i] = last / debias
    return out


def detect_phases(steps: np.ndarray, success: np.ndarray, rule: PhaseRule = PhaseRule()
                  ) -> tuple[float, float] | None:
    """Phase boundaries (start of Phase 2, start of Phase 3) in env steps, or None when there is no hockey stick.

    `success` should already be smoothed. Phase 3 starts at the first point whose success reaches
    rule.saturation_fraction * max; Phase 2 at the last point before that at or below rule.start_threshold,
    where the final climb takes off (the run's first point if success never was that low).
    """
    if success.size == 0 or float(success.max()) < rule.min_peak:
        return None
    start3 = int(np.argmax(success >= rule.saturation_fraction * float(success.max())))
    low = np.flatnonzero(success[:start3] <= rule.start_threshold)
    start2 = int(low[-1]) if low.size else 0
    return float(steps[start2]), float(steps[start3])


MILESTONE_SUCCESS = 0.90
"""The Experiment Card's "90% success" milestone: the first deterministic evaluation at or above it."""


def first_step_at(curve: Curve, level: float) -> float | None:
    """The first step at which ``curve`` reaches ``level`` (None if it never does)."""
    reached = np.flatnonzero(curve.values >= level)
    return float(curve.steps[reached[0]]) if reached.size else None


def milestones_line(run_name: str, curves: dict[str, Curve], bounds: Sequence[float], by_hand: bool) -> str:
    """The Experiment Card's two Results milestones, read off this run: where the climb starts (Phase 2, the
    hockey-stick onset) and the first evaluation at MILESTONE_SUCCESS or above."""
    if by_hand:
        onset = f"Phase 2 given by hand at {step_label(bounds[1])}"
    elif bounds[1] < bounds[-1]:
        onset = f"the climb (Phase 2) starts at {step_label(bounds[1])}"
    else:
        onset = "no hockey stick yet"
    evaluations = curves.get(SUCCESS_CURVES["eval"])
    if evaluations is None or not evaluations.steps.size:
        milestone = "no eval/success_rate curve"
    else:
        step = first_step_at(evaluations, MILESTONE_SUCCESS)
        milestone = (f"eval success first >= {MILESTONE_SUCCESS:.0%} at {step_label(step)}" if step is not None
                     else f"eval success never >= {MILESTONE_SUCCESS:.0%} (last evaluation at "
                          f"{step_label(float(evaluations.steps[-1]))})")
    return f"[loss-phases] {run_name}: {onset}; {milestone}"


def _shade_phases(axes: Sequence[plt.Axes], bounds: Sequence[float]) -> None:
    """bounds = [x_start, b1, b2, x_end]; shades three spans on every axis."""
    for ax in axes:
        for i in range(3):
            if bounds[i + 1] > bounds[i]:
                ax.axvspan(bounds[i], bounds[i + 1], color=PHASE_COLORS[i], alpha=PHASE_ALPHA, lw=0)
        for b in bounds[1:3]:
            ax.axvline(b, color="0.35", lw=0.8, ls=":")


def drawn_values(curve: Curve, smoothing: float) -> np.ndarray:
    """What the figure draws as a training curve's line: smoothed, or raw for a short curve (and phase detection
    uses exactly this, so the shading matches the line the reader sees)."""
    return curve.values if curve.steps.size < MIN_POINTS_TO_SMOOTH else smooth(curve.values, smoothing)


def phase_bounds(curves: dict[str, Curve], success_curve: str, phases: tuple[float, float] | None,
                 smoothing: float, rule: PhaseRule, run_dir: Path) -> tuple[list[float], str]:
    """The four step boundaries of the three phases (start, Phase 2, Phase 3, end) and how they were found:
    by ``rule`` on the success curve (drawn as plotted: smoothed unless it is the eval curve), or by hand."""
    x_end = max(float(c.steps.max()) for c in curves.values() if c.steps.size)
    x_start = 0.0
    if phases is not None:
        if phases[1] > x_end:
            raise FigureInputError(f"--phases {step_label(phases[0])},{step_label(phases[1])} goes past the last "
                                   f"step run folder {run_dir} logged ({step_label(x_end)}); pass boundaries inside "
                                   "the run.")
        return [x_start, phases[0], phases[1], x_end], "phase boundaries given by hand (--phases)"
    success = curves[SUCCESS_CURVES[success_curve]]
    values = success.values if success_curve == "eval" else drawn_values(success, smoothing)
    detected = detect_phases(success.steps, values, rule)
    if detected is None:
        return [x_start, x_end, x_end, x_end], (f"no hockey stick in {success.tag} (it never reached "
                                                f"{rule.min_peak:.0%})")
    return [x_start, *detected, x_end], (f"phases from {success.tag}: Phase 2 = the final climb from "
                                         f"{rule.start_threshold:.0%}, Phase 3 from {rule.saturation_fraction:.0%} "
                                         "of its max")


def plot_loss_phases(run_dir: Path, out_dir: Path, phases: tuple[float, float] | None = None,
                     smoothing: float = DEFAULT_SMOOTHING, success_curve: str | None = None,
                     rule: PhaseRule = PhaseRule()) -> list[Path]:
    """Three panels on one step axis with the phases shaded.

    success_curve: "rollout" or "eval", the curve phases are detected on; None = rollout, or eval if the run
    logged no rollout curve. Eval points are each a deterministic evaluation and are used unsmoothed.
    """
    curves = read_scalars(run_dir)
    present = {name: tag for name, tag in SUCCESS_CURVES.items() if tag in curves and curves[tag].steps.size}
    if success_curve is not None and success_curve not in present and present:
        raise FigureInputError(f"run folder {run_dir} has no {SUCCESS_CURVES[success_curve]} curve; "
                               f"use --success-curve {next(iter(present))}.")
    missing = [name for name, ok in (("success rate (rollout/ or eval/success_rate)", present),
                                     (CRITIC_TAG, CRITIC_TAG in curves), (ACTOR_TAG, ACTOR_TAG in curves)) if not ok]
    if missing:
        raise FigureInputError(
            f"run folder {run_dir} has event files but no {', no '.join(missing)} curve; "
            "log at least one training update (total steps > learning starts) before plotting.")
    success_curve = success_curve or next(iter(present))
    bounds, how = phase_bounds(curves, success_curve, phases, smoothing, rule, run_dir)

    fig, axes = plt.subplots(3, 1, sharex=True, figsize=FIGURE_SIZES["loss-phases"], layout="constrained")
    panels = [(axes[0], "success rate", [SUCCESS_CURVES["rollout"]] if "rollout" in present else []),
              (axes[1], "critic loss", [CRITIC_TAG]),
              (axes[2], "actor loss", [ACTOR_TAG])]
    for ax, ylabel, tags in panels:
        for tag in tags:
            curve = curves[tag]
            smoothed = curve.steps.size >= MIN_POINTS_TO_SMOOTH
            if smoothed:  # the raw points faintly, the smoothed line on top (TensorBoard's look)
                ax.plot(curve.steps, curve.values, color=LINE_COLOR, alpha=0.25, lw=0.8)
            label = ("rollout, smoothed" if smoothed else "rollout") if ax is axes[0] else None
            ax.plot(curve.steps, drawn_values(curve, smoothing), ".-" if not smoothed else "-",
                    ms=5, color=LINE_COLOR, lw=1.6 if smoothed else 1.4, label=label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.25, lw=0.5)
    if "eval" in present:
        curve = curves[SUCCESS_CURVES["eval"]]
        axes[0].plot(curve.steps, curve.values, "s-", ms=3.5, lw=1.0, color=EVAL_COLOR, zorder=3,
                     label="eval (deterministic policy)")
    axes[0].set_ylim(-0.03, 1.03)
    axes[0].yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:.0%}"))
    axes[0].legend(loc="center left", fontsize=8, framealpha=0.85)
    axes[1].axhline(0.0, color="0.5", lw=0.5)
    axes[2].axhline(0.0, color="0.5", lw=0.5)
    _shade_phases(axes, bounds)
    axes[2].set_xlabel("environment steps")
    axes[2].xaxis.set_major_formatter(FuncFormatter(step_label))
    axes[2].set_xlim(bounds[0], bounds[-1])

    phase_handles = [Patch(color=PHASE_COLORS[i], alpha=0.35,
                           label=f"{PHASE_NAMES[i]} ({step_label(bounds[i])}-{step_label(bounds[i + 1])})")
                     for i in range(3) if bounds[i + 1] > bounds[i]]
    fig.legend(handles=phase_handles, loc="outside lower center", ncol=3, fontsize=8.5, frameon=False)
    run_name = "/".join(run_dir.resolve().parts[-3:])
    print(milestones_line(run_name, curves, bounds, by_hand=phases is not None))
    fig.suptitle(f"Three-phase loss signature: {run_name}\n{how}\n(smoothing {smoothing})", fontsize=10)
    return save_figure(fig, "loss-phases", out_dir)


# ===============================================================================================================
# Figure 4: investigation -- success rate per investigation step
# ===============================================================================================================
CRITIC_ENCODER_TAG = "manip_noDrQ_criticEnc"  # Steps 2 and 3 train the same config; Step 3 just runs longer
STEP_OF_TAG = {"nature": 0, "manip_noDrQ": 1, CRITIC_ENCODER_TAG: 2, "manip_criticEnc": 4}
STEP_CHANGES = {  # what each step adds to the one before (the chapter's investigation arc)
    0: "NatureCNN\n(SB3 default)",
    1: "ManipulationCNN\n+ SpatialSoftmax",
    2: "+ critic trains\nthe encoder",
    3: "+ patience\n(longer run)",
    4: "+ DrQ\naugmentation",
}
BAR_STEPS_FIX = ("evaluate every seed of that configuration at the same steps (its periodic snapshot), or move the "
                 "other step count's files out of --results")
BREAKTHROUGH_MIN_GAIN = 0.25  # a step is "the breakthrough" only if it beats every earlier step by this much
MIN_BAR_SLOTS = 5  # the x axis always has room for at least this many bars
BAR_COLOR, BREAKTHROUGH_COLOR, OTHER_COLOR = "#8c9bab", "#2ca02c", "#c9c9c9"


@dataclass
class SeedResult:
    """One training seed's deterministic evaluation, read from an eval (or aggregate) file."""

    tag: str
    env_id: str
    seed: int
    steps: int
    success_rate: float
    n_episodes: int
    ci95: tuple[float, float]
    created_at: str = ""
    source: str = ""  # the file it was read from, named when a bar's seeds disagree on the step count

    @property
    def name(self) -> str:
        return self.source or f"{self.tag} seed {self.seed}"


@dataclass
class InvestigationBar:
    """One bar: a config (tag) at one training budget, over however many seeds were evaluated."""

    label: str
    step: int | None  # investigation step 0-4, None for a tag outside the arc (e.g. fullstate)
    tag: str
    steps: int
    seeds: list[SeedResult]
    mean: float = 0.0
    ci95: tuple[float, float] = (0.0, 1.0)
    left_out: list[SeedResult] = field(default_factory=list)  # seeds of the tag evaluated only at other budgets


def load_seed_results(results_dir: Path) -> list[SeedResult]:
    """All eval results under results_dir; aggregate files count only for configs with no eval file of their own.

    Several evaluations of the same seed at the same budget (re-runs of eval) keep the newest.
    """
    if results_dir.is_file():
        raise FigureInputError(f"--results {results_dir} is a file; pass the folder that holds the *_eval.json "
                               f"files ({results_dir.parent}).")
    if not results_dir.is_dir():
        raise FigureInputError(f"results folder {results_dir} does not exist; pass --results results/ "
                               "(where 'scripts/ch09_pixel_push.py eval' writes its *_eval.json files).")
    evals, aggregates = [], []
    # The folder itself, not its subfolders: train --move-old-run moves an old run's evaluations into one.
    paths = sorted({*results_dir.glob("*_eval.json"), *results_dir.glob("*_aggregate.json")})
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # not ours, or half-written: skip rather than fail the whole figure
        if not isinstance(data, dict):
            continue
        try:
            if data.get("format") == EVAL_FORMAT:
                evals.append(SeedResult(data["tag"], data["env_id"], int(data["train_seed"]),
                                        int(data["checkpoint_steps"]), float(data["success_rate"]),
                                        int(data["n_episodes"]), tuple(data["success_ci95"]),
                                        data.get("created_at", ""), path.name))
            elif data.get("format") == AGGREGATE_FORMAT:
                n_episodes = min(data.get("episodes_per_seed") or [0])
                for seed in data["per_seed"]:
                    # The aggregate keeps no per-seed interval; the bar's interval over seeds is recomputed anyway.
                    aggregates.append(SeedResult(data["tag"], data["env_id"], int(seed["seed"]), int(seed["steps"]),
                                                 float(seed["success_rate"]), n_episodes, (math.nan, math.nan),
                                                 data.get("created_at", ""), f"{path.name} seed {seed['seed']}"))
        except (KeyError, TypeError, ValueError) as exc:
            print(f"note: leaving out {path}: its {data['format']} fields are incomplete or of the wrong type "
                  f"({type(exc).__name__}: {exc}); evaluate that checkpoint again to rewrite it.")
    have_evals = {(r.tag, r.env_id) for r in evals}
    newest: dict[tuple, SeedResult] = {}
    for result in evals + [r for r in aggregates if (r.tag, r.env_id) not in have_evals]:
        key = (result.env_id, result.tag, budget_key(result.steps), result.seed)
        if key not in newest or result.created_at >= newest[key].created_at:
            newest[key] = result
    if not newest:
        raise FigureInputError(f"results folder {results_dir} holds no eval or aggregate files of ch09_pixel_push.py; "
                               "run its 'eval --checkpoint ...' for each trained seed first.")
    return list(newest.values())


def budget_key(steps: int) -> float:
    """Training budget rounded to 2 significant digits: seeds a few steps apart fall into one bar, which then
    refuses them (``stats.common_step_count``) rather than showing one and silently dropping the other."""
    return float(f"{steps:.2g}")


def bar_statistics(bar: InvestigationBar) -> None:
    """Mean over seeds and its 95% interval: Wilson over episodes for one seed, Student t over seeds otherwise.

    The same rule `ch09_pixel_push.py aggregate` reports (``stats.success_summary``).
    """
    bar.mean, _std, bar.ci95, _method = success_summary([s.success_rate for s in bar.seeds],
                                                        [s.n_episodes for s in bar.seeds])


def investigation_bars(results: list[SeedResult]) -> list[InvestigationBar]:
    """Map results to investigation steps, one bar per step (plus one per tag outside the arc).

    Each tag is shown at its largest training budget. The critic-encoder tag is Step 2 up to the investigation's
    budget (``INVESTIGATION_TOTAL_STEPS``) and Step 3 (patience: the same configuration trained longer) beyond
    it: a bar for each that it has, at the largest budget of each. A seed with no result at its bar's budget
    (a run that stopped early) is left out of the bar and listed in ``left_out``.
    """
    budgets: dict[str, dict[float, list[SeedResult]]] = defaultdict(lambda: defaultdict(list))
    for result in results:
        budgets[result.tag][budget_key(result.steps)].append(result)
    investigation = budget_key(INVESTIGATION_TOTAL_STEPS)
    bars = []
    for tag, by_budget in budgets.items():
        if tag == CRITIC_ENCODER_TAG:
            groups = [(2, [b for b in by_budget if b <= investigation]),
                      (3, [b for b in by_budget if b > investigation])]
        else:
            groups = [(STEP_OF_TAG.get(tag), list(by_budget))]
        for bar_step, group in groups:
            if not group:
                continue
            seeds = by_budget[max(group)]
            shown = {s.seed for s in seeds}
            latest: dict[int, SeedResult] = {}
            for budget in sorted(group):
                latest.update({s.seed: s for s in by_budget[budget] if s.seed not in shown})
            try:  # the rule `aggregate` applies: a bar is a number over seeds at one step count
                steps = common_step_count({s.name: s.steps for s in seeds}, BAR_STEPS_FIX)
            except MixedStepCounts as exc:
                raise FigureInputError(str(exc)) from None
            if bar_step is None:
                label = f"{wrap_tag(tag)}\n(outside the\n5-step arc)\n{step_label(steps)} steps"
            else:
                label = f"Step {bar_step}\n{STEP_CHANGES[bar_step]}\n{wrap_tag(tag)}\n{step_label(steps)} steps"
            bars.append(InvestigationBar(label, bar_step, tag, steps, sorted(seeds, key=lambda s: s.seed),
                                         left_out=[latest[seed] for seed in sorted(latest)]))
    bars.sort(key=lambda b: (b.step is None, b.step if b.step is not None else 0, b.tag, b.steps))
    for bar in bars:
        bar_statistics(bar)
    return bars


def wrap_tag(tag: str, width: int = 13) -> str:
    """Break a long config tag after an underscore so neighbouring tick labels do not collide."""
    lines = [""]
    for part in re.split(r"(?<=_)", tag):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


def find_breakthrough(bars: Sequence[InvestigationBar]) -> int | None:
    """Index of the step bar that beats every earlier step by the most (at least BREAKTHROUGH_MIN_GAIN), or None."""
    best_gain, best_index, best_so_far = BREAKTHROUGH_MIN_GAIN, None, None
    for i, bar in enumerate(bars):
        if bar.step is None:
            continue
        if best_so_far is not None and bar.mean - best_so_far >= best_gain:
            best_gain, best_index = bar.mean - best_so_far, i
        best_so_far = bar.mean if best_so_far is None else max(best_so_far, bar.mean)
    return best_index


def plot_investigation(results_dir: Path, out_dir: Path, env_id: str | None = None,
                       highlight: int | None = None) -> list[Path]:
    results = load_seed_results(results_dir)
    envs = sorted({r.env_id for r in results})
    if env_id is None:
        if len(envs) > 1 and "FetchPush-v4" not in envs:
            raise FigureInputError(f"results folder {results_dir} mixes envs {', '.join(envs)}; choose one with --env.")
        env_id = "FetchPush-v4" if "FetchPush-v4" in envs else envs[0]
    results = [r for r in results if r.env_id == env_id]
    if not results:
        raise FigureInputError(f"results folder {results_dir} has no results for --env {env_id} "
                               f"(it has {', '.join(envs)}).")
    bars = investigation_bars(results)
    for bar in bars:
        if bar.left_out:
            others = ", ".join(f"seed {s.seed} (at {step_label(s.steps)})" for s in bar.left_out)
            print(f"note: the {bar.tag} bar at {step_label(bar.steps)} steps leaves out {others}: no evaluation "
                  "of them at its steps.")
    if highlight is None:
        breakthrough = find_breakthrough(bars)
    else:
        matches = [i for i, b in enumerate(bars) if b.step == highlight]
        if not matches:
            shown = ", ".join(str(b.step) for b in bars if b.step is not None) or "none"
            raise FigureInputError(f"--highlight {highlight} names a step with no results (steps shown: {shown}).")
        breakthrough = matches[0]

    fig, ax = plt.subplots(figsize=FIGURE_SIZES["investigation"], layout="constrained")
    x = np.arange(len(bars))
    colors = [OTHER_COLOR if b.step is None else BAR_COLOR for b in bars]
    if breakthrough is not None:
        colors[breakthrough] = BREAKTHROUGH_COLOR
    means = np.array([b.mean for b in bars])
    err = np.array([[b.mean - b.ci95[0] for b in bars], [b.ci95[1] - b.mean for b in bars]]).clip(min=0)
    ax.bar(x, means, width=0.62, color=colors, edgecolor="0.25", lw=0.6, zorder=2)
    ax.errorbar(x, means, yerr=err, fmt="none", ecolor="0.15", elinewidth=1.1, capsize=5, zorder=3)
    for i, bar in enumerate(bars):
        if len(bar.seeds) > 1:  # every seed as a dot, so the spread the interval summarises is visible
            jitter = np.linspace(-0.12, 0.12, len(bar.seeds))
            ax.plot(x[i] + jitter, [s.success_rate for s in bar.seeds], "o", ms=3.5, mfc="white", mec="0.15",
                    mew=0.8, zorder=4)
        seeds_text = f"{len(bar.seeds)} seed{'s' if len(bar.seeds) > 1 else ''}"
        ax.annotate(f"{bar.mean:.0%}\n{seeds_text}", xy=(x[i], bar.ci95[1]), xytext=(0, 4),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8.5)
    if breakthrough is not None:
        ax.annotate("breakthrough", xy=(x[breakthrough], bars[breakthrough].ci95[1]), xytext=(0, 30),
                    textcoords="offset points", ha="center", va="bottom", fontsize=9.5, fontweight="bold",
                    color=BREAKTHROUGH_COLOR)
    ax.set_xticks(x, [b.label for b in bars], fontsize=8)
    slots = max(len(bars), MIN_BAR_SLOTS)  # a lone bar keeps its width instead of filling the axis
    ax.set_xlim((len(bars) - 1) / 2 - slots / 2, (len(bars) - 1) / 2 + slots / 2)
    ax.set_ylim(0, 1.3)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:.0%}"))
    ax.set_ylabel("success rate (deterministic policy)")
    ax.grid(axis="y", alpha=0.3, lw=0.5, zorder=0)
    ax.spines[["top", "right"]].set_visible(False)
    methods = []
    if any(len(b.seeds) > 1 for b in bars):
        methods.append("Student t over seeds, never narrower than Wilson over all their episodes")
    if any(len(b.seeds) == 1 for b in bars):
        methods.append("Wilson over episodes for a single seed")
    ax.set_title("\n".join([f"The investigation on {env_id}: deterministic success rate per step",
                            "bars: mean over seeds, dots: seeds; whiskers: 95% CI:", "; ".join(methods)]), fontsize=10)
    return save_figure(fig, "investigation", out_dir)


# ===============================================================================================================
# Figure 5: rollout -- one episode of a checkpoint, as the camera and the policy saw it
# ===============================================================================================================
ROLLOUT_FRAME_CHOICES = (6, 7, 8)


def record_rollout(checkpoint: Path, seed: int | None) -> dict[str, Any]:
    """One deterministic episode of ``checkpoint`` on the env it was trained on, recorded frame by frame.

    The same steps as ``ch09_pixel_push.py eval``: the env its metadata names, the policy loaded to act, the
    first episode seeded with the training seed + 10000 unless ``seed`` says otherwise (so the figure shows
    the episode ``eval --video 1`` records). Imports torch, SB3 and MuJoCo, here only.
    """
    from stable_baselines3.common.vec_env import DummyVecEnv

    from ch09 import experiment
    from ch09.run.checkpoints import load_for_acting, meta_for_checkpoint, read_meta
    from ch09.run.results import run_episodes
    from ch09.run.video import CAMERA_SIZE, EpisodeRecorder
    from pixel_wrapper import make_fetch_env

    checkpoint = checkpoint.expanduser().resolve()
    if not checkpoint.is_file():
        raise FigureInputError(f"checkpoint {checkpoint} does not exist; pass a .zip that train wrote under "
                               "checkpoints/")
    meta = read_meta(meta_for_checkpoint(checkpoint), f"checkpoint {checkpoint}")
    train_cfg = experiment.train_config_of(meta, checkpoint)
    eval_seed = train_cfg.seed + experiment.EVAL_SEED_OFFSET if seed is None else seed
    env = make_fetch_env(train_cfg.env, pixels=not train_cfg.full_state, native_render=train_cfg.native_render,
                         goal_mode=experiment.GOAL_MODE)
    recorder = EpisodeRecorder(env, CAMERA_SIZE)
    try:
        model = load_for_acting(checkpoint, DummyVecEnv([lambda: recorder]), "cpu")
        experiment.check_policy(model, train_cfg, checkpoint, "its metadata describes")
        recorder.record_next(1)
        run_episodes(model, recorder, 1, eval_seed)
    finally:
        recorder.close()
    (episode,) = recorder.take()
    return {"episode": episode, "meta": meta, "steps": int(model.num_timesteps), "eval_seed": eval_seed,
            "checkpoint": checkpoint}


def plot_rollout(rollout: dict[str, Any], out_dir: Path, n_frames: int = 8) -> list[Path]:
    """Draw what record_rollout recorded: ``n_frames`` evenly spaced frames, the reset and the last included."""
    episode, meta = rollout["episode"], rollout["meta"]
    picks = np.linspace(0, episode.length, n_frames).round().astype(int)
    rows = 1 if episode.observation is None else 2
    fig, axes = plt.subplots(rows, n_frames, figsize=FIGURE_SIZES["rollout"], layout="constrained", squeeze=False)
    for col, t in enumerate(picks):
        ax = axes[0, col]
        ax.imshow(episode.camera[t])
        colour = PHASE_COLORS[2] if episode.success[t] else "black"
        ax.set_title(f"step {t}\n{episode.distance[t]:.3f} m to goal" + ("\nsuccess" if episode.success[t] else ""),
                     fontsize=9, color=colour)
        if rows == 2:
            axes[1, col].imshow(episode.observation[t], interpolation="nearest")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    size = episode.camera[0].shape[0]
    axes[0, 0].set_ylabel(f"camera {size}x{size}\n(goal marker shown)", fontsize=9)
    if rows == 2:
        obs = episode.observation[0].shape[0]
        axes[1, 0].set_ylabel(f"policy input {obs}x{obs}\n(newest frame, goal hidden)", fontsize=9)
    outcome = "success" if episode.success[-1] else "no success"
    note = "" if rows == 2 else "; full-state run: the policy reads the state vector, there is no observation image"
    fig.suptitle(f"{meta['tag']} on {meta['env_id']}, seed {meta['seed']}, {step_label(rollout['steps'])} steps: "
                 f"one deterministic episode (reset seed {rollout['eval_seed']}), {outcome} after "
                 f"{episode.length} steps{note}", fontsize=11)
    stem = f"{FILE_STEMS['rollout']}_{rollout['checkpoint'].name.removesuffix('.zip')}"
    return save_figure(fig, "rollout", out_dir, stem=stem)


def rollout_figure(checkpoint: Path, seed: int | None, n_frames: int, out_dir: Path) -> list[Path]:
    """record_rollout + plot_rollout, with the production script's one-sentence errors kept as one sentence."""
    try:
        from ch09.errors import UserError
        from pixel_wrapper import RendererUnavailableError  # runs the lab's mujoco pin guard
    except ImportError as err:
        raise FigureInputError(str(err)) from None
    try:
        rollout = record_rollout(checkpoint, seed)
    except (UserError, RendererUnavailableError) as err:
        raise FigureInputError(str(err)) from None
    return plot_rollout(rollout, out_dir, n_frames)


# ===============================================================================================================
# Command line
# ===============================================================================================================
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="figure", required=True, metavar="figure")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        # argparse %-formats a subcommand's help in the list, not its description: "%%" there would print as is
        p = sub.add_parser(name, help=help_text, description=help_text.replace("%%", "%"))
        p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                       help="folder for the PNG and SVG (default: figures/ in the repository)")
        return p

    p = add("env-frame", "the 84x84 observation and the 480x480 scene, objects measured and annotated")
    p.add_argument("--seed", type=int, default=0, help="env.reset(seed=...) for the scene (default 0)")
    add("encoder-progression", "NatureCNN vs ManipulationCNN: how much of a 5-pixel object survives each layer")
    p = add("loss-phases", "success rate, critic loss and actor loss of one run with the three phases shaded")
    p.add_argument("--run", type=Path, required=True, help="run folder, e.g. runs/ch09_<tag>/<env>/seed<N>")
    p.add_argument("--phases", type=str, default=None,
                   help="phase boundaries by hand, 'A,B' in env steps (e.g. 1.2M,3.5M): Phase 2 starts at A, "
                        "Phase 3 at B; default: detected from the success curve")
    p.add_argument("--success-curve", choices=sorted(SUCCESS_CURVES), default=None,
                   help="curve the phases are detected on (default: rollout, or eval if there is no rollout "
                        "curve); rollout/success_rate is SB3's mean over the last 100 episodes, so it lags by up "
                        "to 5K steps: use eval for short runs")
    p.add_argument("--smoothing", type=float, default=DEFAULT_SMOOTHING,
                   help=f"TensorBoard-style EMA weight in [0, 1) for the smoothed curves (default {DEFAULT_SMOOTHING})")
    p = add("investigation", "success rate per investigation step (Steps 0-4) with 95%% confidence intervals")
    p.add_argument("--results", type=Path, required=True, help="folder with *_eval.json (or aggregate) files")
    p.add_argument("--env", type=str, default=None,
                   help="env id to plot (default: FetchPush-v4 if present, else the only env in the folder)")
    p.add_argument("--highlight", type=int, default=None, choices=sorted(STEP_CHANGES),
                   help="step to mark as the breakthrough (default: the step that beats every earlier step by "
                        f"the most, at least {BREAKTHROUGH_MIN_GAIN * 100:.0f} points)")
    p = add("rollout", "one episode of a checkpoint as a filmstrip: camera view above the 84x84 observation")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint .zip written by train")
    p.add_argument("--seed", type=int, default=None,
                   help="reset seed of the episode (default: the training seed + 10000, eval's first episode)")
    p.add_argument("--frames", type=int, default=8, choices=ROLLOUT_FRAME_CHOICES,
                   help="evenly spaced frames to show, the first and the last included (default 8)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_with_one_line_errors(lambda: parse_args_naming_unknown_flags(parser, argv))
    try:
        if args.figure == "env-frame":
            try:
                from pixel_wrapper import RendererUnavailableError  # runs the lab's mujoco pin guard
            except ImportError as err:
                raise FigureInputError(str(err)) from None
            try:
                scene = capture_scene(args.seed)
            except RendererUnavailableError as err:  # no EGL / wrong MUJOCO_GL: the lab's sentence says what to do
                raise FigureInputError(str(err)) from None
            paths = plot_env_frame(scene, args.out_dir)
        elif args.figure == "encoder-progression":
            paths = plot_encoder_progression(args.out_dir)
        elif args.figure == "loss-phases":
            phases = None
            if args.phases is not None:
                try:
                    a, b = (parse_steps(x.strip()) for x in args.phases.split(","))
                except (ValueError, IndexError):
                    raise FigureInputError(f"--phases wants two step counts 'A,B' such as 1.2M,3.5M or 5000,8000, "
                                           f"got {args.phases!r}") from None
                if not a < b:
                    raise FigureInputError(f"--phases wants A < B, got {step_label(a)} and {step_label(b)}")
                phases = (float(a), float(b))
            if not 0.0 <= args.smoothing < 1.0:
                raise FigureInputError(f"--smoothing must be in [0, 1), got {args.smoothing}")
            paths = plot_loss_phases(args.run, args.out_dir, phases, args.smoothing, args.success_curve)
        elif args.figure == "rollout":
            paths = rollout_figure(args.checkpoint, args.seed, args.frames, args.out_dir)
        else:
            paths = plot_investigation(args.results, args.out_dir, args.env, args.highlight)
    except FigureInputError as err:
        print(f"error: ch09_figures.py {args.figure}: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
