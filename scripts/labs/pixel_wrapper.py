"""Pixel observations for Fetch: from a MuJoCo camera to a stack of uint8 frames.

The idea
--------
A state-based agent on FetchPush-v4 reads a 25-D vector that already says where the puck is. A pixel agent
must find the puck in a camera image. This lab builds the three pieces that turn the simulator into
image observations an off-policy agent (SAC + HER) can learn from:

1. ``render_and_resize``: one camera frame, HWC uint8 from MuJoCo -> CHW uint8 ``(3, 84, 84)``.
   Rendering natively at 84x84 is much cheaper than rendering 480x480 and shrinking it; ``--verify``
   measures both.
2. ``PixelObservationWrapper``: stacks the last ``k = 4`` frames (oldest first) so velocities are
   visible, adds the 10-D proprioception the robot knows about itself, and keeps the goals as vectors:

       o_t = { pixels:         concat(f_{t-3}, f_{t-2}, f_{t-1}, f_t)   (3k, 84, 84) uint8
               proprioception: s_t[PROPRIO_INDICES]                      (10,) float32
               achieved_goal:  ag_t                                      (3,)  float32
               desired_goal:   g                                         (3,)  float32 }

   HER relabels the goal after the fact: r = -(||ag - g'|| > 0.05) for a new goal g'. The red goal marker
   drawn in the image would then contradict the relabelled vector g', so the wrapper hides it by default.
3. ``PixelReplayBuffer``: stores frames as uint8 and converts to float32 in [0, 1] only when a batch is
   sampled. One 12x84x84 observation is 84,672 bytes as uint8 and 4x that as float32; a transition
   keeps two of them (obs and next_obs), so memory, not compute, bounds the buffer size.

Run it
------
    bash docker/dev.sh python scripts/labs/pixel_wrapper.py --verify

MuJoCo renders off-screen through EGL (``MUJOCO_GL=egl``, set below unless you chose otherwise). The
other lab files import ``Claim``, ``report`` and ``make_fetch_env`` from here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, NamedTuple, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from PIL import Image

from lab_support import (  # sets MUJOCO_GL=egl unless you chose, and guards the mujoco pin, before mujoco loads
    Claim,
    RendererUnavailableError,
    available_memory_bytes,
    check_memory_fits,
    close_render_context,
    make_render_context_current,
    renderer_import_error,
    run_verify,
)

# ---------------------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------------------
IMAGE_SIZE = 84
"""Side of the square camera image the agent sees, in pixels (Atari/DQN convention)."""
FRAME_STACK = 4
"""Frames stacked per observation: 4 frames -> 12 channels, enough to see the puck move."""
DEFAULT_RENDER_SIZE = 480
"""MuJoCo's default render size for Fetch envs; the slow path renders this and resizes."""
GOAL_MODES = ("none", "desired", "both")
"""Which goal vectors sit beside the pixels: none; desired_goal only; achieved_goal and desired_goal (HER)."""
PROPRIO_INDICES = (0, 1, 2, 9, 10, 20, 21, 22, 23, 24)
"""The 10 entries of the 25-D Fetch observation the robot knows about itself: gripper position (0-2),
finger positions (9-10), gripper linear velocity (20-22), finger velocities (23-24). No object entries."""
FETCH_OBS_DIM = 25
"""Length of the Fetch observation vector for Push/Slide/PickAndPlace."""
FETCH_REACH_OBS_DIM = 10
"""FetchReach has no object, so its 10-D observation is exactly the proprioception, in the same order."""
SUCCESS_DISTANCE = 0.05
"""Fetch's success threshold in metres: reward = -(||achieved - desired|| > 0.05)."""
SUPPORTED_ENV_IDS = tuple(
    f"Fetch{task}{suffix}-v4" for task in ("Reach", "Push", "Slide", "PickAndPlace") for suffix in ("", "Dense")
)
"""The Fetch environments make_fetch_env builds."""
GOAL_MARKER_SITE = "target0"
"""MuJoCo site Fetch draws as the red goal sphere in every frame."""
PIXEL_KEY = "pixels"
"""Observation key of the stacked frames."""


# ---------------------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------------------
# --8<-- [start:render_and_resize]
def render_and_resize(env: gym.Env, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Render the env's camera and return one frame as a ``(3, image_size, image_size)`` uint8 array.

    | step                  | array                                | note                                  |
    |-----------------------|--------------------------------------|---------------------------------------|
    | ``env.render()``      | ``(H, W, 3)`` uint8, HWC             | MuJoCo's RGB buffer                   |
    | resize (if H != size) | ``(size, size, 3)`` uint8            | slow path only: 480x480 -> 84x84      |
    | transpose(2, 0, 1)    | ``(3, size, size)`` uint8, CHW       | PyTorch's Conv2d wants channels first |

    The fast path builds the env with ``width=height=image_size`` so MuJoCo rasterises only 84x84 pixels
    and no resize happens. The slow path renders 480x480 (32x more pixels) and shrinks it with box
    (area) filtering, which averages every source pixel instead of skipping most of them.
    The frame stays uint8: converting to float32 here would make every stored frame 4x larger.
    """
    make_render_context_current(env)  # several envs in one process each own a GL context: pick this one
    frame = np.asarray(env.render())  # (H, W, 3) uint8
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(
            f"expected an RGB frame (H, W, 3) from env.render(), got shape {frame.shape}; "
            "build the env with render_mode='rgb_array'."
        )
    if frame.shape[:2] != (image_size, image_size):
        frame = np.asarray(Image.fromarray(frame).resize((image_size, image_size), Image.Resampling.BOX))
    return np.ascontiguousarray(frame.transpose(2, 0, 1), dtype=np.uint8)  # HWC -> CHW
# --8<-- [end:render_and_resize]


# --8<-- [start:pixel_obs_wrapper]
class PixelObservationWrapper(gym.Wrapper):
    """Replace a Fetch env's state vector by stacked camera frames (+ proprioception, + goal vectors).

    | key                | shape                           | dtype   | present when                   |
    |--------------------|---------------------------------|---------|--------------------------------|
    | ``pixels``         | ``(3*frame_stack, size, size)`` | uint8   | always; oldest frame first     |
    | ``proprioception`` | ``(10,)``                       | float32 | ``proprioception=True``        |
    | ``achieved_goal``  | ``(3,)``                        | float32 | ``goal_mode="both"``           |
    | ``desired_goal``   | ``(3,)``                        | float32 | ``goal_mode`` desired or both  |

    ``obs["pixels"][-3:]`` is the newest frame. ``reset`` fills the stack with copies of the first frame,
    so the agent never sees an all-black history. With ``goal_mode="both"`` SB3's ``HerReplayBuffer`` works
    unchanged: it relabels the vector goals and calls ``compute_reward``, which this wrapper passes through.

    ``hide_goal_marker=True`` (default) makes the red goal sphere transparent. HER stores an image rendered
    with the ORIGINAL goal next to a RELABELLED goal vector; a visible marker would tell the network one
    goal while the vector and the reward say another (at 84x84 the marker covers 4 pixels, the puck 11).
    """

    def __init__(
        self,
        env: gym.Env,
        goal_mode: str = "both",
        frame_stack: int = FRAME_STACK,
        image_size: int = IMAGE_SIZE,
        proprioception: bool = True,
        hide_goal_marker: bool = True,
    ) -> None:
        super().__init__(env)
        if goal_mode not in GOAL_MODES:
            raise ValueError(f"goal_mode must be one of {GOAL_MODES}, got {goal_mode!r}.")
        if not isinstance(frame_stack, (int, np.integer)) or isinstance(frame_stack, bool) or frame_stack < 1:
            raise ValueError(
                f"frame_stack must be an integer >= 1 (the chapter uses {FRAME_STACK}), got {frame_stack!r}."
            )
        if not isinstance(image_size, (int, np.integer)) or image_size < 1:
            raise ValueError(
                f"image_size must be a positive integer (the chapter uses {IMAGE_SIZE}), got {image_size!r}."
            )
        inner = env.observation_space
        is_goal_env = isinstance(inner, spaces.Dict) and {"achieved_goal", "desired_goal"} <= set(inner.spaces)
        if goal_mode != "none" and not is_goal_env:
            raise ValueError(
                f"goal_mode={goal_mode!r} needs a goal env whose observations hold 'achieved_goal' and "
                "'desired_goal' (a Fetch env); use goal_mode='none' for this env."
            )
        if proprioception:
            obs_dim = inner["observation"].shape[0] if is_goal_env and "observation" in inner.spaces else None
            if obs_dim not in (FETCH_OBS_DIM, FETCH_REACH_OBS_DIM):
                raise ValueError(
                    "proprioception=True reads the robot state from a Fetch observation (25-D, or 10-D for Reach), "
                    f"but this env's observation is {inner}; pass proprioception=False."
                )
            # Reach's 10-D observation IS the proprioception (same order); Push/Slide/PickAndPlace need a subset.
            self._proprio_indices = np.array(PROPRIO_INDICES if obs_dim == FETCH_OBS_DIM else range(obs_dim))
        if env.render_mode != "rgb_array":
            raise ValueError(
                f"PixelObservationWrapper needs render_mode='rgb_array', got {env.render_mode!r}; "
                "build the env with make_fetch_env()."
            )

        self.goal_mode = goal_mode
        self.frame_stack = int(frame_stack)
        self.image_size = int(image_size)
        self.proprioception = proprioception
        self.hide_goal_marker = hide_goal_marker
        self._frames: deque[np.ndarray] = deque(maxlen=self.frame_stack)  # each (3, H, W) uint8

        vector = lambda n: spaces.Box(-np.inf, np.inf, shape=(n,), dtype=np.float32)  # noqa: E731
        pixel_shape = (3 * self.frame_stack, self.image_size, self.image_size)
        obs_spaces: dict[str, spaces.Space] = {PIXEL_KEY: spaces.Box(0, 255, shape=pixel_shape, dtype=np.uint8)}
        if proprioception:
            obs_spaces["proprioception"] = vector(len(self._proprio_indices))
        if goal_mode == "both":
            obs_spaces["achieved_goal"] = vector(inner["achieved_goal"].shape[0])
        if goal_mode in ("desired", "both"):
            obs_spaces["desired_goal"] = vector(inner["desired_goal"].shape[0])
        self.observation_space = spaces.Dict(obs_spaces, sort_keys=False)  # keep the table's key order

        if hide_goal_marker:
            self._set_goal_marker_alpha(0.0)

    def _set_goal_marker_alpha(self, alpha: float) -> None:
        """Set the goal sphere's opacity. Fetch moves the site to the goal before every render but never
        touches its colour, so setting alpha once is enough."""
        model = getattr(self.env.unwrapped, "model", None)
        if model is None:
            return  # not a MuJoCo env: no marker to hide
        import mujoco  # loaded by lab_support already, after it chose the GL backend

        site_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, GOAL_MARKER_SITE)
        if site_id >= 0:
            model.site_rgba[site_id, 3] = alpha

    def _observation(self, env_obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        obs = {PIXEL_KEY: np.concatenate(self._frames, axis=0)}  # (3k, H, W) uint8, a fresh array
        if self.proprioception:
            obs["proprioception"] = env_obs["observation"][self._proprio_indices].astype(np.float32)
        for key in ("achieved_goal", "desired_goal"):
            if key in self.observation_space.spaces:
                obs[key] = np.asarray(env_obs[key], dtype=np.float32)
        return obs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        env_obs, info = self.env.reset(seed=seed, options=options)
        frame = render_and_resize(self.env, self.image_size)
        for _ in range(self.frame_stack):  # fill the history with the first frame
            self._frames.append(frame)
        return self._observation(env_obs), info

    def step(self, action):
        env_obs, reward, terminated, truncated, info = self.env.step(action)
        self._frames.append(render_and_resize(self.env, self.image_size))  # deque drops the oldest
        # Fetch returns a NumPy scalar; Gymnasium's API (and SB3's check_env) expect a Python float.
        return self._observation(env_obs), float(reward), terminated, truncated, info

    def compute_reward(self, achieved_goal: np.ndarray, desired_goal: np.ndarray, info: Any) -> np.ndarray:
        """Fetch's reward for (batches of) goals; HER calls this to score relabelled transitions."""
        return self.env.unwrapped.compute_reward(achieved_goal, desired_goal, info)

    def close(self) -> None:
        """Free this env's GL objects in its own context, so closing it never blanks another env's frames."""
        close_render_context(self.env)
# --8<-- [end:pixel_obs_wrapper]


def make_fetch_env(
    env_id: str = "FetchPush-v4",
    *,
    pixels: bool = True,
    native_render: bool = True,
    image_size: int = IMAGE_SIZE,
    frame_stack: int = FRAME_STACK,
    goal_mode: str = "both",
    proprioception: bool = True,
    hide_goal_marker: bool = True,
) -> gym.Env:
    """Build a Fetch env: the project's ONE place where envs are made.

    ``pixels=False`` returns the plain goal env (``observation`` 25-D, ``achieved_goal``, ``desired_goal``)
    for state-based runs. ``pixels=True`` wraps it in ``PixelObservationWrapper``; ``native_render=True``
    asks MuJoCo for ``image_size`` frames directly, ``False`` renders 480x480 and resizes (slow path).
    Raises ``ValueError`` for an unknown env id and ``RendererUnavailableError`` when MuJoCo cannot render.
    """
    if env_id not in SUPPORTED_ENV_IDS:
        raise ValueError(f"make_fetch_env builds the Fetch envs {', '.join(SUPPORTED_ENV_IDS)}; got {env_id!r}.")
    if renderer_import_error() is not None:
        raise RendererUnavailableError.from_exception(renderer_import_error())
    if not pixels:
        return gym.make(env_id)

    render_size = image_size if native_render else DEFAULT_RENDER_SIZE
    env = gym.make(env_id, render_mode="rgb_array", width=render_size, height=render_size)
    try:
        env.reset()  # rendering needs a goal, which the first reset samples
        try:
            env.render()  # the OpenGL context is created here; this is where a bad MUJOCO_GL fails
        except Exception as exc:  # noqa: BLE001
            raise RendererUnavailableError.from_exception(exc) from None
        return PixelObservationWrapper(
            env,
            goal_mode=goal_mode,
            frame_stack=frame_stack,
            image_size=image_size,
            proprioception=proprioception,
            hide_goal_marker=hide_goal_marker,
        )
    except Exception:
        with contextlib.suppress(Exception):  # a half-built env must not leak its GL context
            close_render_context(env)
        raise


class PixelBatch(NamedTuple):
    """A sampled batch; observation dicts hold float32, pixels scaled to [0, 1]."""

    observations: dict[str, np.ndarray]
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: dict[str, np.ndarray]
    dones: np.ndarray


# --8<-- [start:pixel_replay_buffer]
class PixelReplayBuffer:
    """A ring buffer that stores pixels as uint8 and hands out float32 in [0, 1].

    | array                          | shape                           | dtype   | bytes per transition         |
    |--------------------------------|---------------------------------|---------|------------------------------|
    | ``obs["pixels"]``              | ``(capacity, 12, 84, 84)``      | uint8   | 84,672                       |
    | ``next_obs["pixels"]``         | ``(capacity, 12, 84, 84)``      | uint8   | 84,672                       |
    | vector keys (obs and next_obs) | ``(capacity, d)``               | float32 | 4 d each (2 x 64 for d = 16) |
    | actions, rewards, dones        | ``(capacity, a)``, ``(capacity,)`` | float32 | 4 a + 4 + 4 (24 for a = 4) |

    Storing float32 pixels would cost 4x as much (677 KB per transition). ``next_obs`` is stored separately,
    as in SB3's ``DictReplayBuffer``; that doubles the memory but keeps indexing trivial (frames shared
    between consecutive stacks could be stored once, which is what DrQ-v2's buffer does).
    ``dones`` records termination only: a time-limit truncation is not terminal, so the target still
    bootstraps from ``next_obs`` (Fetch episodes only ever truncate).
    """

    def __init__(
        self,
        capacity: int,
        observation_space: spaces.Dict,
        action_dim: int,
        pixel_key: str = PIXEL_KEY,
        seed: int | None = None,
    ) -> None:
        if pixel_key not in observation_space.spaces:
            raise ValueError(
                f"observation_space has no {pixel_key!r} key; its keys are {list(observation_space.spaces)}."
            )
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 transition, got {capacity}.")
        self.capacity = int(capacity)
        self.pixel_key = pixel_key
        self.obs_shapes = {key: space.shape for key, space in observation_space.spaces.items()}
        self.action_dim = int(action_dim)

        needed, available = self.capacity * self.bytes_per_transition, available_memory_bytes()
        if needed > available:
            raise ValueError(
                f"a PixelReplayBuffer of {self.capacity:,} transitions needs {needed / 1e9:.1f} GB "
                f"({self.bytes_per_transition:,} bytes each) but only {available / 1e9:.1f} GB is available; "
                f"use capacity <= {available // self.bytes_per_transition:,} or free memory."
            )

        def storage(key: str) -> np.ndarray:
            dtype = np.uint8 if key == pixel_key else np.float32  # the whole point: pixels stay uint8
            return np.zeros((self.capacity, *self.obs_shapes[key]), dtype=dtype)

        self.observations = {key: storage(key) for key in self.obs_shapes}
        self.next_observations = {key: storage(key) for key in self.obs_shapes}
        self.actions = np.zeros((self.capacity, self.action_dim), dtype=np.float32)
        self.rewards = np.zeros(self.capacity, dtype=np.float32)
        self.dones = np.zeros(self.capacity, dtype=np.float32)
        self.pos, self.full = 0, False
        self.rng = np.random.default_rng(seed)

    @property
    def bytes_per_transition(self) -> int:
        """Bytes one stored transition occupies (obs + next_obs + action + reward + done)."""
        obs_bytes = sum(
            int(np.prod(shape)) * (1 if key == self.pixel_key else 4) for key, shape in self.obs_shapes.items()
        )
        return 2 * obs_bytes + 4 * self.action_dim + 4 + 4

    def __len__(self) -> int:
        return self.capacity if self.full else self.pos

    def add(self, obs: dict, next_obs: dict, action: np.ndarray, reward: float, terminated: bool) -> None:
        """Store one transition, overwriting the oldest once the buffer is full."""
        for key in self.obs_shapes:
            self.observations[key][self.pos] = obs[key]
            self.next_observations[key][self.pos] = next_obs[key]
        self.actions[self.pos] = action
        self.rewards[self.pos] = reward
        self.dones[self.pos] = float(terminated)
        self.pos = (self.pos + 1) % self.capacity
        self.full = self.full or self.pos == 0

    def _to_float(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # uint8 -> float32 happens HERE, on the batch only: 256 x 12 x 84 x 84 floats, not the whole buffer.
        return {
            key: value.astype(np.float32) / 255.0 if key == self.pixel_key else value for key, value in obs.items()
        }

    def sample(self, batch_size: int) -> PixelBatch:
        """Sample ``batch_size`` transitions uniformly (with replacement)."""
        if len(self) == 0:
            raise ValueError("cannot sample from an empty PixelReplayBuffer; add transitions first.")
        idx = self.rng.integers(0, len(self), size=batch_size)
        return PixelBatch(
            observations=self._to_float({key: arr[idx] for key, arr in self.observations.items()}),
            actions=self.actions[idx],
            rewards=self.rewards[idx],
            next_observations=self._to_float({key: arr[idx] for key, arr in self.next_observations.items()}),
            dones=self.dones[idx],
        )
# --8<-- [end:pixel_replay_buffer]


# ---------------------------------------------------------------------------------------------------------
# Checks (--verify)
# ---------------------------------------------------------------------------------------------------------
SPEED_STEPS = 30
"""Env steps timed per render path in --verify."""


def _render_speeds(
    native: gym.Env, resized: gym.Env, n_steps: int = SPEED_STEPS, rounds: int = 3
) -> tuple[float, float]:
    """Steps/s (step + render, + resize for ``resized``) of the two render paths.

    The paths take turns in ``rounds`` blocks so that load from other processes on a shared machine
    slows both alike; the first render of each env (context creation) happens before timing starts.
    """
    elapsed = {id(native): 0.0, id(resized): 0.0}
    for env in (native, resized):
        env.reset(seed=0)
    for _ in range(rounds):
        for env in (native, resized):
            actions = [env.action_space.sample() for _ in range(n_steps // rounds)]
            start = time.perf_counter()
            for action in actions:
                env.step(action)  # the wrapper renders (and for `resized`, resizes) inside step
            elapsed[id(env)] += time.perf_counter() - start
    steps = rounds * (n_steps // rounds)
    return steps / elapsed[id(native)], steps / elapsed[id(resized)]


def _goal_marker_pixels_changed(env: PixelObservationWrapper, shift: np.ndarray) -> int:
    """Move the goal by ``shift`` metres, re-render, and count pixels whose colour changed."""
    env.reset(seed=0)
    before = render_and_resize(env, env.image_size)
    fetch = env.unwrapped
    original_goal = fetch.goal.copy()
    fetch.goal = original_goal + shift  # Fetch's render callback moves the marker to self.goal
    after = render_and_resize(env, env.image_size)
    fetch.goal = original_goal
    return int(np.any(before != after, axis=0).sum())


def verify() -> list[Claim]:
    """Run every claim of this lab and return them (pytest runs the same list)."""
    claims: list[Claim] = []
    env = make_fetch_env("FetchPush-v4")  # native 84x84, goal_mode="both", marker hidden
    slow_env = make_fetch_env("FetchPush-v4", native_render=False)
    shown_env = make_fetch_env("FetchPush-v4", hide_goal_marker=False)
    from stable_baselines3.common.env_checker import check_env  # heavy import (torch), after the envs work

    try:
        # Row 1: render_and_resize -------------------------------------------------------------------
        env.reset(seed=0)
        slow_env.reset(seed=0)
        frame, slow_frame = render_and_resize(env), render_and_resize(slow_env)
        claims.append(Claim(
            "render_and_resize gives a (3, 84, 84) np.uint8 frame with values in [0, 255] (native 84x84 render)",
            frame.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and frame.dtype == np.uint8 and frame.min() < frame.max(),
            f"shape {frame.shape}, dtype {frame.dtype}, values {frame.min()}..{frame.max()}",
        ))
        claims.append(Claim(
            "the slow path (480x480 render + box resize) gives the same (3, 84, 84) uint8 layout",
            slow_frame.shape == frame.shape and slow_frame.dtype == np.uint8,
            f"shape {slow_frame.shape}, dtype {slow_frame.dtype}, mean |diff| to native "
            f"{np.abs(slow_frame.astype(int) - frame.astype(int)).mean():.1f} levels",
        ))
        native_sps, slow_sps = _render_speeds(env, slow_env)
        claims.append(Claim(
            "rendering natively at 84x84 is faster than rendering 480x480 and resizing",
            native_sps > slow_sps,
            f"step+render: native {native_sps:.0f} steps/s, 480x480+resize {slow_sps:.0f} steps/s, "
            f"{native_sps / slow_sps:.2f}x, {SPEED_STEPS} steps each",
        ))

        # Row 2: the wrapper's observation ----------------------------------------------------------------
        obs, _ = env.reset(seed=0)
        expected = {
            "pixels": ((3 * FRAME_STACK, IMAGE_SIZE, IMAGE_SIZE), np.uint8),
            "proprioception": ((len(PROPRIO_INDICES),), np.float32),
            "achieved_goal": ((3,), np.float32),
            "desired_goal": ((3,), np.float32),
        }
        got = {key: (value.shape, value.dtype) for key, value in obs.items()}
        claims.append(Claim(
            "goal_mode='both' obs has keys pixels (12, 84, 84) uint8, proprioception (10,), achieved_goal (3,), "
            "desired_goal (3,) float32, in that order",
            list(got) == list(expected) and all(got[k] == (s, np.dtype(d)) for k, (s, d) in expected.items()),
            ", ".join(f"{k} {s} {np.dtype(d).name}" for k, (s, d) in got.items()),
        ))
        valid = [env.observation_space.contains(obs)]
        raw_obs, _ = env.env.reset(seed=0)  # the unwrapped Fetch observation of the same (seeded) reset
        proprio_ok = np.array_equal(
            obs["proprioception"], raw_obs["observation"][list(PROPRIO_INDICES)].astype(np.float32)
        )
        for _ in range(5):
            obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            valid.append(env.observation_space.contains(obs) and np.isfinite(reward))
        space = env.observation_space
        exact_space = (
            space[PIXEL_KEY] == spaces.Box(0, 255, (12, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
            and all(space[k].dtype == np.float32 and np.all(np.isinf(space[k].low)) and np.all(np.isinf(space[k].high))
                    for k in space.spaces if k != PIXEL_KEY)
        )
        claims.append(Claim(
            "reset and 5 steps give observations inside an exact Dict space (pixels Box 0..255 uint8, vectors "
            "float32 -inf..inf)",
            all(valid) and exact_space,
            f"{sum(valid)}/{len(valid)} observations contained, space exact: {exact_space}",
        ))
        claims.append(Claim(
            "proprioception is the Fetch observation at indices (0-2, 9-10, 20-24) as float32",
            proprio_ok,
            f"indices {PROPRIO_INDICES}",
        ))
        base = env.env  # the same Fetch env, re-wrapped to show the other goal modes
        key_sets = {
            mode: list(PixelObservationWrapper(base, goal_mode=mode).observation_space.spaces)
            for mode in ("none", "desired")
        }
        claims.append(Claim(
            "goal_mode='none' adds no goal vector; goal_mode='desired' adds desired_goal only",
            key_sets == {"none": ["pixels", "proprioception"], "desired": ["pixels", "proprioception", "desired_goal"]},
            f"none: {key_sets['none']}, desired: {key_sets['desired']}",
        ))
        ag = np.random.default_rng(0).uniform(0.0, 0.2, size=(64, 3))
        dg = np.zeros((64, 3))
        rewards = env.compute_reward(ag, dg, [{}] * 64)
        expected_rewards = -(np.linalg.norm(ag - dg, axis=-1) > SUCCESS_DISTANCE).astype(np.float32)
        claims.append(Claim(
            "compute_reward passes through to Fetch, vectorised: -(||ag - g|| > 0.05) for a batch of 64 goals",
            rewards.shape == (64,) and np.array_equal(rewards, expected_rewards),
            f"shape {rewards.shape}, {int((rewards == 0).sum())} successes / 64",
        ))

        # Goal marker and frame order ---------------------------------------------------------------------
        shift = np.array([-0.10, 0.10, 0.0])
        hidden_changed = _goal_marker_pixels_changed(env, shift)
        shown_changed = _goal_marker_pixels_changed(shown_env, shift)
        claims.append(Claim(
            "with the marker hidden, moving the goal 14 cm changes no pixel; with hide_goal_marker=False it does",
            hidden_changed == 0 and shown_changed > 0,
            f"pixels changed: hidden {hidden_changed}, shown {shown_changed} of {IMAGE_SIZE * IMAGE_SIZE}",
        ))
        obs, _ = env.reset(seed=0)
        frames = obs[PIXEL_KEY].reshape(FRAME_STACK, 3, IMAGE_SIZE, IMAGE_SIZE)
        filled = all(np.array_equal(f, frames[-1]) for f in frames)
        newest_ok, shifted_ok, distinct = [], [], 0
        for _ in range(FRAME_STACK + 1):
            prev = obs[PIXEL_KEY]
            obs, *_ = env.step(np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32))  # move: frames differ
            newest_ok.append(np.array_equal(obs[PIXEL_KEY][-3:], render_and_resize(env)))
            shifted_ok.append(np.array_equal(obs[PIXEL_KEY][:-3], prev[3:]))
            distinct += not np.array_equal(obs[PIXEL_KEY][-3:], prev[-3:])
        claims.append(Claim(
            "frame stack is oldest first: reset fills 4 copies, pixels[-3:] is the latest render, older frames "
            "shift down one slot per step",
            filled and all(newest_ok) and all(shifted_ok) and distinct > 0,
            f"reset filled: {filled}, newest == render: {sum(newest_ok)}/{len(newest_ok)}, "
            f"shifted: {sum(shifted_ok)}/{len(shifted_ok)}, steps with a new frame: {distinct}",
        ))
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("always")  # check_env also prints a note that it detected a GoalEnv
            try:
                check_env(env)
                check_error = ""
            except Exception as exc:  # noqa: BLE001  (report, do not crash --verify)
                check_error = f"{type(exc).__name__}: {exc}"
        check_warnings = [str(w.message)[:80] for w in caught if "stable_baselines3" in str(w.filename)]
        claims.append(Claim(
            "SB3 check_env accepts the wrapped env without errors or SB3 warnings",
            not check_error and not check_warnings,
            check_error or (f"warnings: {check_warnings}" if check_warnings else "no errors, no warnings"),
        ))

        # Row 3: the replay buffer ---------------------------------------------------------------------------
        action_dim = env.action_space.shape[0]
        buffer = PixelReplayBuffer(100, env.observation_space, action_dim, seed=0)
        sample_space = spaces.Dict(env.observation_space.spaces, sort_keys=False, seed=0)
        for _ in range(100):
            buffer.add(sample_space.sample(), sample_space.sample(), env.action_space.sample(), -1.0, False)
        batch = buffer.sample(32)
        stored = buffer.observations[PIXEL_KEY]
        pixels = batch.observations[PIXEL_KEY]
        claims.append(Claim(
            "the buffer stores pixels as uint8; sampled pixels are float32 in [0, 1]",
            stored.dtype == np.uint8 and buffer.next_observations[PIXEL_KEY].dtype == np.uint8
            and pixels.dtype == np.float32 and batch.next_observations[PIXEL_KEY].dtype == np.float32
            and 0.0 <= pixels.min() and pixels.max() <= 1.0,
            f"stored {stored.dtype} {stored.shape}, sampled {pixels.dtype} {pixels.shape} in "
            f"[{pixels.min():.3f}, {pixels.max():.3f}]",
        ))
        per_transition = buffer.bytes_per_transition
        claims.append(Claim(
            "one transition (obs + next_obs with 12x84x84 uint8 pixels) takes ~169 KB",
            abs(per_transition - 169_000) < 2_000,
            f"{per_transition:,} bytes/transition = 2 x {3 * FRAME_STACK * IMAGE_SIZE**2:,} pixel bytes + vectors; "
            f"100K transitions = {100_000 * per_transition / 1e9:.1f} GB",
        ))
        available = available_memory_bytes()
        too_big = available // per_transition + 1
        try:
            PixelReplayBuffer(too_big, env.observation_space, action_dim)
            refusal = ""
        except ValueError as exc:
            refusal = str(exc)
        largest = f"{available // per_transition:,}"
        claims.append(Claim(
            "a capacity larger than available memory is refused with a ValueError naming the largest that fits",
            largest in refusal,
            f"capacity {too_big:,} refused: {refusal!r}" if refusal else f"capacity {too_big:,} was accepted",
        ))
    finally:
        for e in (env, slow_env, shown_env):
            e.close()
    return claims


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--verify", action="store_true", help="check every claim of this lab (about 15 s on a CPU)")
    args = parser.parse_args(argv)
    if not args.verify:
        parser.print_help()
        return 0
    return run_verify(verify)


if __name__ == "__main__":
    sys.exit(main())
