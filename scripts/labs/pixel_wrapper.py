"""Pixel observations for Fetch: from a MuJoCo camera to a stack of uint8 frames.

The idea
--------
A state-based agent on FetchPush-v4 reads a 25-D vector that already says where the puck is. A pixel agent
must find the puck in a camera image. This lab builds the pieces that turn the simulator into image
observations an off-policy agent (SAC + HER) can learn from:

1. ``render_and_resize``: one camera frame, HWC uint8 from MuJoCo -> CHW uint8 ``(3, 84, 84)``.
   Rendering natively at 84x84 is much cheaper than rendering 480x480 and shrinking it; ``--verify``
   measures both.
2. ``PixelObservationWrapper``: stacks the last ``k = 4`` frames (oldest first) so velocities are
   visible, adds the 10-D proprioception the robot knows about itself, and keeps the goals as vectors:

       o_t = { pixels:         concat(f_{t-3}, f_{t-2}, f_{t-1}, f_t)   (3k, 84, 84) uint8
               proprioception: s_t[PROPRIO_INDICES]                      (10,) float32
               achieved_goal:  ag_t                                      (3,)  float32
               desired_goal:   g                                         (3,)  float32 }

   ``pixel_observation_space`` is that Dict space, the one definition every lab and script uses.
   HER relabels the goal after the fact: r = -(||ag - g'|| > 0.05) for a new goal g'. The red goal marker
   drawn in the image would then contradict the relabelled vector g', so the wrapper hides it by default.
3. ``PixelReplayBuffer``: stores frames as uint8 and hands them out as uint8; the encoder divides by 255
   (one conversion, on the training device, as DrQ-v2's encoder does). A 12x84x84 observation takes
   12 * 84 * 84 bytes as uint8 and 4x that as float32, and a transition keeps two of them (obs and
   next_obs), so memory, not compute, bounds the buffer size.

``make_fetch_env`` is the project's one place where envs are made; ``gym.make("Ch09PixelFetchPush-v0")``
builds the same pixel env through Gymnasium's registry.

Run it
------
    bash docker/dev.sh python scripts/labs/pixel_wrapper.py --verify

MuJoCo renders off-screen through EGL (``MUJOCO_GL=egl``, set by ``lab_support`` unless you chose otherwise).
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import time
import warnings
from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple

from cli_guard import guard_entry_point, run_guarded

guard_entry_point(__name__)  # a refused mujoco, a missing package, an early SIGTERM: one line, no traceback

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from PIL import Image

from lab_support import (  # sets MUJOCO_GL=egl unless you chose, and guards the mujoco pin, before mujoco loads
    MEMORY_RESERVE_BYTES,
    Claim,
    RendererUnavailableError,
    available_memory,
    check_memory_fits,
    close_render_context,
    lab_main,
    make_render_context_current,
    renderer_import_error,
    renderer_start_warnings,
)

__all__ = [  # the names other modules import from here (some are re-exported from lab_support)
    "DEFAULT_RENDER_SIZE", "FRAME_STACK", "GOAL_DIM", "GOAL_MARKER_SITE", "GOAL_MODES", "IMAGE_SIZE", "PIXEL_ENV_ID",
    "PIXEL_KEY", "PROPRIO_DIM", "PROPRIO_INDICES", "SUPPORTED_ENV_IDS", "PixelBatch", "PixelObservationWrapper",
    "PixelReplayBuffer", "RendererUnavailableError", "available_memory", "make_fetch_env",
    "pixel_observation_space", "render_and_resize",
]

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
PROPRIO_DIM = len(PROPRIO_INDICES)
"""Length of the proprioception vector."""
GOAL_DIM = 3
"""Length of Fetch's achieved_goal and desired_goal vectors (a position in metres)."""
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
PIXEL_ENV_ID = "Ch09PixelFetchPush-v0"
"""Gymnasium id of the chapter's pixel env: ``gym.make(PIXEL_ENV_ID)`` calls ``make_fetch_env("FetchPush-v4")``."""
GOAL_MARKER_SITE = "target0"
"""MuJoCo site Fetch draws as the red goal sphere in every frame."""
PIXEL_KEY = "pixels"
"""Observation key of the stacked frames."""


# ---------------------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------------------
# --8<-- [start:render_and_resize]
def render_and_resize(env: gym.Env, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Render the env's camera: one ``(3, size, size)`` uint8 frame.

    | step                   | array                     | note            |
    |------------------------|---------------------------|-----------------|
    | ``env.render()``       | ``(H, W, 3)`` uint8       | MuJoCo RGB, HWC |
    | resize if H != size    | ``(size, size, 3)`` uint8 | slow path only  |
    | ``transpose(2, 0, 1)`` | ``(3, size, size)`` uint8 | CHW, for Conv2d |

    The fast path builds the env with ``width=height=image_size``, so MuJoCo
    rasterises only 84x84 pixels and no resize happens. The slow path renders
    480x480 (32x more pixels) and shrinks it with box (area) filtering, which
    averages every source pixel instead of skipping most of them. The frame
    stays uint8: float32 would make every stored frame 4x larger.
    """
    make_render_context_current(env)  # each env owns a GL context: use ours
    frame = np.asarray(env.render())  # (H, W, 3) uint8
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(
            f"expected an RGB frame (H, W, 3) from env.render(), got shape "
            f"{frame.shape}; build the env with render_mode='rgb_array'."
        )
    if frame.shape[:2] != (image_size, image_size):
        size = (image_size, image_size)
        box = Image.Resampling.BOX
        frame = np.asarray(Image.fromarray(frame).resize(size, box))
    # HWC -> CHW, one contiguous uint8 block per frame
    return np.ascontiguousarray(frame.transpose(2, 0, 1), dtype=np.uint8)
# --8<-- [end:render_and_resize]


# --8<-- [start:pixel_observation_space]
def pixel_observation_space(
    frame_stack: int = FRAME_STACK,
    image_size: int = IMAGE_SIZE,
    proprio_dim: int = PROPRIO_DIM,
    goal_mode: str = "both",
    goal_dim: int = GOAL_DIM,
) -> spaces.Dict:
    """The pixel env's observation space, keys in this order (s = image_size).

    | key            | shape                   | dtype   | when            |
    |----------------|-------------------------|---------|-----------------|
    | pixels         | (3 * frame_stack, s, s) | uint8   | always          |
    | proprioception | (proprio_dim,)          | float32 | proprio_dim > 0 |
    | achieved_goal  | (goal_dim,)             | float32 | goal_mode both  |
    | desired_goal   | (goal_dim,)             | float32 | desired or both |

    Pixels are a Box 0..255, vectors unbounded. The wrapper, the replay
    buffers, the memory preflight and the tests all build the space here.
    """
    if goal_mode not in GOAL_MODES:
        raise ValueError(f"goal_mode must be one of {GOAL_MODES}, "
                         f"got {goal_mode!r}.")

    def vector(n: int) -> spaces.Box:
        return spaces.Box(-np.inf, np.inf, shape=(n,), dtype=np.float32)

    pixel_shape = (3 * frame_stack, image_size, image_size)
    pixels = spaces.Box(0, 255, shape=pixel_shape, dtype=np.uint8)
    entries: dict[str, spaces.Space] = {PIXEL_KEY: pixels}
    if proprio_dim > 0:
        entries["proprioception"] = vector(proprio_dim)
    if goal_mode == "both":
        entries["achieved_goal"] = vector(goal_dim)
    if goal_mode in ("desired", "both"):
        entries["desired_goal"] = vector(goal_dim)
    return spaces.Dict(entries, sort_keys=False)  # keep the table's order
# --8<-- [end:pixel_observation_space]


def _proprio_indices_or_refuse(
    env: gym.Env, goal_mode: str, frame_stack: Any, image_size: Any, proprioception: bool
) -> np.ndarray:
    """Check PixelObservationWrapper's arguments; return the proprioception indices (empty when off)."""
    if goal_mode not in GOAL_MODES:
        raise ValueError(f"goal_mode must be one of {GOAL_MODES}, got {goal_mode!r}.")
    if not isinstance(frame_stack, (int, np.integer)) or isinstance(frame_stack, bool) or frame_stack < 1:
        raise ValueError(f"frame_stack must be an integer >= 1 (the chapter uses {FRAME_STACK}), got {frame_stack!r}.")
    if not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer (the chapter uses {IMAGE_SIZE}), got {image_size!r}.")
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
    if env.render_mode != "rgb_array":
        raise ValueError(
            f"PixelObservationWrapper needs render_mode='rgb_array', got {env.render_mode!r}; "
            "build the env with make_fetch_env()."
        )
    if not proprioception:
        return np.array([], dtype=np.int64)
    # Reach's 10-D observation IS the proprioception (same order); Push/Slide/PickAndPlace need a subset.
    return np.array(PROPRIO_INDICES if obs_dim == FETCH_OBS_DIM else range(obs_dim))


# --8<-- [start:pixel_obs_wrapper]
class PixelObservationWrapper(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """A Fetch env seen through its camera: frames + robot state + goals.

    The observation is ``pixel_observation_space(...)``: ``pixels`` holds the
    last ``frame_stack`` frames, oldest first (``obs["pixels"][-3:]`` is the
    newest); ``reset`` fills the stack with copies of the first frame, so the
    agent never sees an all-black history. With ``goal_mode="both"`` SB3's
    ``HerReplayBuffer`` works unchanged: it relabels the vector goals and
    calls ``compute_reward``, which this wrapper passes through.

    ``hide_goal_marker=True`` (default) makes the red goal sphere transparent.
    HER stores an image rendered with the ORIGINAL goal next to a RELABELLED
    goal vector; a visible marker would tell the network one goal while the
    vector and the reward say another.
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
        # Recorded so that env.spec (and gymnasium's check_env) can rebuild us.
        gym.utils.RecordConstructorArgs.__init__(
            self, goal_mode=goal_mode, frame_stack=frame_stack,
            image_size=image_size, proprioception=proprioception,
            hide_goal_marker=hide_goal_marker,
        )
        gym.Wrapper.__init__(self, env)
        self._proprio_indices = _proprio_indices_or_refuse(
            env, goal_mode, frame_stack, image_size, proprioception
        )
        self.goal_mode, self.proprioception = goal_mode, proprioception
        self.frame_stack, self.image_size = int(frame_stack), int(image_size)
        # Each entry is one (3, H, W) uint8 frame; the deque drops the oldest.
        self._frames: deque[np.ndarray] = deque(maxlen=self.frame_stack)
        self.observation_space = pixel_observation_space(
            self.frame_stack, self.image_size, len(self._proprio_indices),
            goal_mode, GOAL_DIM,
        )
        if hide_goal_marker:
            self._set_goal_marker_alpha(0.0)

    def _set_goal_marker_alpha(self, alpha: float) -> None:
        """Set the goal sphere's opacity. Fetch moves the site to the goal
        before every render but never touches its colour, so setting alpha
        once is enough."""
        model = getattr(self.env.unwrapped, "model", None)
        if model is None:
            return  # not a MuJoCo env: no marker to hide
        import mujoco  # lab_support loaded it, after choosing the GL backend

        site_id = mujoco.mj_name2id(
            model, mujoco.mjtObj.mjOBJ_SITE, GOAL_MARKER_SITE)
        if site_id >= 0:
            model.site_rgba[site_id, 3] = alpha
    # --8<-- [end:pixel_obs_wrapper]

    # --8<-- [start:pixel_obs_wrapper_step]
    def _observation(self, env_obs: dict[str, np.ndarray]) -> dict:
        stacked = np.concatenate(self._frames, axis=0)  # (3k, H, W), a copy
        obs = {PIXEL_KEY: stacked}
        if self.proprioception:
            state = env_obs["observation"][self._proprio_indices]
            obs["proprioception"] = state.astype(np.float32)
        for key in ("achieved_goal", "desired_goal"):
            if key in self.observation_space.spaces:
                obs[key] = np.asarray(env_obs[key], dtype=np.float32)
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        env_obs, info = self.env.reset(seed=seed, options=options)
        frame = render_and_resize(self.env, self.image_size)
        for _ in range(self.frame_stack):  # history = the first frame
            self._frames.append(frame)
        return self._observation(env_obs), info

    def step(self, action):
        env_obs, reward, terminated, truncated, info = self.env.step(action)
        frame = render_and_resize(self.env, self.image_size)
        self._frames.append(frame)  # the deque drops the oldest frame
        # Fetch returns a NumPy scalar; Gymnasium (and SB3) expect a float.
        obs = self._observation(env_obs)
        return obs, float(reward), terminated, truncated, info

    def compute_reward(self, achieved_goal, desired_goal, info) -> np.ndarray:
        """Fetch's reward for batches of goals: HER scores relabels."""
        fetch = self.env.unwrapped
        return fetch.compute_reward(achieved_goal, desired_goal, info)
    # --8<-- [end:pixel_obs_wrapper_step]

    def close(self) -> None:
        """Free this env's GL objects in its own context, so closing it never blanks another env's frames."""
        close_render_context(self.env)


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
            with renderer_start_warnings():
                env.render()  # the OpenGL context is created here; this is where a bad MUJOCO_GL fails
        except Exception as exc:
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


if PIXEL_ENV_ID not in gym.registry:  # a second import (e.g. as __main__ and by name) must not re-register
    # The inner gym.make already adds Gymnasium's env checker, order enforcing and the 50-step time limit.
    gym.register(PIXEL_ENV_ID, entry_point=make_fetch_env, kwargs={"env_id": "FetchPush-v4"},
                 order_enforce=False, disable_env_checker=True)


class PixelBatch(NamedTuple):
    """A sampled batch, as stored: pixels uint8 (the encoder divides by 255), vectors float32."""

    observations: dict[str, np.ndarray]
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: dict[str, np.ndarray]
    dones: np.ndarray


def _refuse_bad_buffer_arguments(capacity: int, observation_space: spaces.Dict, pixel_key: str) -> None:
    """PixelReplayBuffer's argument checks, outside the printed listing."""
    if not isinstance(observation_space, spaces.Dict) or pixel_key not in observation_space.spaces:
        keys = list(observation_space.spaces) if isinstance(observation_space, spaces.Dict) else observation_space
        raise ValueError(f"observation_space has no {pixel_key!r} key (it holds {keys}); "
                         "build it with pixel_observation_space().")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1 transition, got {capacity}.")


# --8<-- [start:pixel_replay_buffer]
class PixelReplayBuffer:
    """A ring buffer that stores pixels as uint8 and hands them out as uint8.

    | array                  | shape                | dtype   | bytes each   |
    |------------------------|----------------------|---------|--------------|
    | ``obs["pixels"]``      | ``(N, 12, 84, 84)``  | uint8   | 12 * 84 * 84 |
    | ``next_obs["pixels"]`` | ``(N, 12, 84, 84)``  | uint8   | 12 * 84 * 84 |
    | vectors, both obs      | ``(N, d)`` each      | float32 | 4 d each     |
    | action, reward, done   | ``(N, a)``, ``(N,)`` | float32 | 4 a + 4 + 4  |

    Storing float32 pixels would cost 4x as much; the encoder divides by 255
    on the training device instead. ``next_obs`` is stored separately, as in
    SB3's ``DictReplayBuffer``: twice the memory, trivial indexing. (DrQ-v2
    stores one whole stack per step and reads next_obs from the next step;
    ``ch09.engine.framestack_replay`` stores each frame once.) ``dones`` records
    termination only: a time-limit truncation is not terminal, so the target
    still bootstraps from ``next_obs`` (Fetch episodes only ever truncate).
    """

    def __init__(
        self,
        capacity: int,
        observation_space: spaces.Dict,
        action_dim: int,
        pixel_key: str = PIXEL_KEY,
        seed: int | None = None,
    ) -> None:
        _refuse_bad_buffer_arguments(capacity, observation_space, pixel_key)
        self.capacity, self.action_dim = int(capacity), int(action_dim)
        self.pixel_key = pixel_key
        self.obs_shapes = {
            key: space.shape for key, space in observation_space.spaces.items()
        }
        # numpy allocates lazily: refuse a buffer that could never fill.
        check_memory_fits(
            "a PixelReplayBuffer", self.capacity, self.bytes_per_transition
        )

        def storage(key: str) -> np.ndarray:
            # The whole point: pixels stay uint8.
            dtype = np.uint8 if key == pixel_key else np.float32
            return np.zeros((self.capacity, *self.obs_shapes[key]), dtype)

        self.observations = {key: storage(key) for key in self.obs_shapes}
        self.next_observations = {key: storage(key) for key in self.obs_shapes}
        self.actions = np.zeros((self.capacity, self.action_dim), np.float32)
        self.rewards = np.zeros(self.capacity, np.float32)
        self.dones = np.zeros(self.capacity, np.float32)
        self.pos, self.full = 0, False
        self.rng = np.random.default_rng(seed)

    @property
    def bytes_per_transition(self) -> int:
        """Bytes of one transition: obs, next_obs, action, reward, done."""
        obs_bytes = sum(
            int(np.prod(shape)) * (1 if key == self.pixel_key else 4)
            for key, shape in self.obs_shapes.items()
        )
        return 2 * obs_bytes + 4 * self.action_dim + 4 + 4
    # --8<-- [end:pixel_replay_buffer]

    def __len__(self) -> int:
        return self.capacity if self.full else self.pos

    # --8<-- [start:pixel_replay_buffer_add_sample]
    def add(self, obs, next_obs, action, reward: float,
            terminated: bool) -> None:
        """Store one transition, overwriting the oldest once full."""
        for key in self.obs_shapes:
            self.observations[key][self.pos] = obs[key]
            self.next_observations[key][self.pos] = next_obs[key]
        self.actions[self.pos] = action
        self.rewards[self.pos] = reward
        self.dones[self.pos] = float(terminated)
        self.pos = (self.pos + 1) % self.capacity
        self.full = self.full or self.pos == 0

    def sample(self, batch_size: int) -> PixelBatch:
        """``batch_size`` transitions, uniformly with replacement.

        Pixels come out uint8, as stored: a batch crosses to the training
        device at a quarter of its float32 size, and the encoder scales it.
        """
        if len(self) == 0:
            raise ValueError(
                "cannot sample an empty PixelReplayBuffer; add first.")
        idx = self.rng.integers(0, len(self), size=batch_size)
        return PixelBatch(
            observations={k: v[idx] for k, v in self.observations.items()},
            actions=self.actions[idx],
            rewards=self.rewards[idx],
            next_observations={
                k: v[idx] for k, v in self.next_observations.items()
            },
            dones=self.dones[idx],
        )
    # --8<-- [end:pixel_replay_buffer_add_sample]


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


def _check_renders(env: gym.Env, slow_env: gym.Env) -> list[Claim]:
    env.reset(seed=0)
    slow_env.reset(seed=0)
    frame, slow_frame = render_and_resize(env), render_and_resize(slow_env)
    native_sps, slow_sps = _render_speeds(env, slow_env)
    return [
        Claim(
            "render_and_resize gives a (3, 84, 84) np.uint8 frame with values in [0, 255] (native 84x84 render)",
            frame.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and frame.dtype == np.uint8 and frame.min() < frame.max(),
            f"shape {frame.shape}, dtype {frame.dtype}, values {frame.min()}..{frame.max()}",
        ),
        Claim(
            "the slow path (480x480 render + box resize) gives the same (3, 84, 84) uint8 layout",
            slow_frame.shape == frame.shape and slow_frame.dtype == np.uint8,
            f"shape {slow_frame.shape}, dtype {slow_frame.dtype}, mean |diff| to native "
            f"{np.abs(slow_frame.astype(int) - frame.astype(int)).mean():.1f} levels",
        ),
        Claim(
            "rendering natively at 84x84 is faster than rendering 480x480 and resizing",
            native_sps > slow_sps,
            f"step+render: native {native_sps:.0f} steps/s, 480x480+resize {slow_sps:.0f} steps/s, "
            f"{native_sps / slow_sps:.2f}x, {SPEED_STEPS} steps each",
        ),
    ]


def _check_observations(env: PixelObservationWrapper) -> list[Claim]:
    obs, _ = env.reset(seed=0)
    expected = {  # the table of the module docstring, written out independently of pixel_observation_space
        "pixels": ((3 * FRAME_STACK, IMAGE_SIZE, IMAGE_SIZE), np.uint8),
        "proprioception": ((len(PROPRIO_INDICES),), np.float32),
        "achieved_goal": ((3,), np.float32),
        "desired_goal": ((3,), np.float32),
    }
    got = {key: (value.shape, value.dtype) for key, value in obs.items()}
    valid = [env.observation_space.contains(obs)]
    raw_obs, _ = env.env.reset(seed=0)  # the unwrapped Fetch observation of the same (seeded) reset
    proprio_ok = np.array_equal(obs["proprioception"], raw_obs["observation"][list(PROPRIO_INDICES)].astype(np.float32))
    for _ in range(5):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        valid.append(env.observation_space.contains(obs) and np.isfinite(reward))
    space = env.observation_space
    exact_space = (
        space[PIXEL_KEY] == spaces.Box(0, 255, (12, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        and all(space[k].dtype == np.float32 and np.all(np.isinf(space[k].low)) and np.all(np.isinf(space[k].high))
                for k in space.spaces if k != PIXEL_KEY)
    )
    base = env.env  # the same Fetch env, re-wrapped to show the other goal modes
    key_sets = {mode: list(PixelObservationWrapper(base, goal_mode=mode).observation_space.spaces)
                for mode in ("none", "desired")}
    ag = np.random.default_rng(0).uniform(0.0, 0.2, size=(64, 3))
    dg = np.zeros((64, 3))
    rewards = env.compute_reward(ag, dg, [{}] * 64)
    expected_rewards = -(np.linalg.norm(ag - dg, axis=-1) > SUCCESS_DISTANCE).astype(np.float32)
    return [
        Claim(
            "goal_mode='both' obs has keys pixels (12, 84, 84) uint8, proprioception (10,), achieved_goal (3,), "
            "desired_goal (3,) float32, in that order",
            list(got) == list(expected) and all(got[k] == (s, np.dtype(d)) for k, (s, d) in expected.items()),
            ", ".join(f"{k} {s} {np.dtype(d).name}" for k, (s, d) in got.items()),
        ),
        Claim(
            "reset and 5 steps give observations inside an exact Dict space (pixels Box 0..255 uint8, vectors "
            "float32 -inf..inf)",
            all(valid) and exact_space,
            f"{sum(valid)}/{len(valid)} observations contained, space exact: {exact_space}",
        ),
        Claim(
            "proprioception is the Fetch observation at indices (0-2, 9-10, 20-24) as float32",
            proprio_ok,
            f"indices {PROPRIO_INDICES}",
        ),
        Claim(
            "goal_mode='none' adds no goal vector; goal_mode='desired' adds desired_goal only",
            key_sets == {"none": ["pixels", "proprioception"], "desired": ["pixels", "proprioception", "desired_goal"]},
            f"none: {key_sets['none']}, desired: {key_sets['desired']}",
        ),
        Claim(
            "compute_reward passes through to Fetch, vectorised: -(||ag - g|| > 0.05) for a batch of 64 goals",
            rewards.shape == (64,) and np.array_equal(rewards, expected_rewards),
            f"shape {rewards.shape}, {int((rewards == 0).sum())} successes / 64",
        ),
    ]


def _check_marker_and_frame_order(env: PixelObservationWrapper, shown_env: PixelObservationWrapper) -> list[Claim]:
    shift = np.array([-0.10, 0.10, 0.0])
    hidden_changed = _goal_marker_pixels_changed(env, shift)
    shown_changed = _goal_marker_pixels_changed(shown_env, shift)
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
    return [
        Claim(
            "with the marker hidden, moving the goal 14 cm changes no pixel; with hide_goal_marker=False it does",
            hidden_changed == 0 and shown_changed > 0,
            f"pixels changed: hidden {hidden_changed}, shown {shown_changed} of {IMAGE_SIZE * IMAGE_SIZE}",
        ),
        Claim(
            "frame stack is oldest first: reset fills 4 copies, pixels[-3:] is the latest render, older frames "
            "shift down one slot per step",
            filled and all(newest_ok) and all(shifted_ok) and distinct > 0,
            f"reset filled: {filled}, newest == render: {sum(newest_ok)}/{len(newest_ok)}, "
            f"shifted: {sum(shifted_ok)}/{len(shifted_ok)}, steps with a new frame: {distinct}",
        ),
    ]


def _check_conventions(env: PixelObservationWrapper) -> list[Claim]:
    """SB3's and Gymnasium's env checkers, the spec rebuild and the registered id."""
    from gymnasium.utils.env_checker import check_env as gymnasium_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env  # heavy (torch): after the envs

    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")  # check_env also prints a note that it detected a GoalEnv
        try:
            sb3_check_env(env)
            sb3_error = ""
        except Exception as exc:  # report, do not crash --verify
            sb3_error = f"{type(exc).__name__}: {exc}"
    sb3_warnings = [str(w.message)[:80] for w in caught if "stable_baselines3" in str(w.filename)]

    registered = gym.make(PIXEL_ENV_ID)
    rebuilt = registered.spec.make()  # RecordConstructorArgs: the spec names our wrapper and its arguments
    try:
        wrapper_specs = [w.name for w in registered.spec.additional_wrappers]
        same_frames = all(
            np.array_equal(a.reset(seed=0)[0][PIXEL_KEY], b.reset(seed=0)[0][PIXEL_KEY])
            for a, b in ((registered, env), (rebuilt, env))
        )
        same_space = registered.observation_space == rebuilt.observation_space == env.observation_space
        # Gymnasium's checker rebuilds the env from env.spec; Fetch's "human" mode needs a display, so skip renders.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                gymnasium_check_env(env, skip_render_check=True)
                gym_error = ""
            except Exception as exc:  # report, do not crash --verify
                gym_error = f"{type(exc).__name__}: {exc}"
        # Not counted: the note that we check a wrapper (on purpose), and unbounded vector entries (Fetch's own
        # observation space is unbounded too; a Box of positions in metres has no natural limit).
        expected_notes = ("different from the unwrapped", "infinity")
        gym_warnings = [str(w.message)[:80] for w in caught if "gymnasium" in str(w.filename)
                        and not any(note in str(w.message) for note in expected_notes)]
    finally:
        rebuilt.close()
        registered.close()
    return [
        Claim(
            "SB3 check_env accepts the wrapped env without errors or SB3 warnings",
            not sb3_error and not sb3_warnings,
            sb3_error or (f"warnings: {sb3_warnings}" if sb3_warnings else "no errors, no warnings"),
        ),
        Claim(
            f"gym.make({PIXEL_ENV_ID!r}) and env.spec.make() rebuild the same pixel env; Gymnasium's check_env "
            "accepts it",
            same_frames and same_space and "PixelObservationWrapper" in wrapper_specs and not gym_error
            and not gym_warnings,
            f"spec wrappers {wrapper_specs}, same space and reset frames: {same_space and same_frames}; "
            + (gym_error or (f"warnings: {gym_warnings}" if gym_warnings else "check_env: no errors, no warnings")),
        ),
    ]


def _check_replay_buffer(action_space: spaces.Box) -> list[Claim]:
    space = pixel_observation_space()
    space.seed(0)
    action_dim = action_space.shape[0]
    buffer = PixelReplayBuffer(100, space, action_dim, seed=0)
    for _ in range(100):
        buffer.add(space.sample(), space.sample(), action_space.sample(), -1.0, False)
    batch = buffer.sample(32)
    stored, pixels = buffer.observations[PIXEL_KEY], batch.observations[PIXEL_KEY]
    per_transition = buffer.bytes_per_transition
    pixel_bytes = 3 * FRAME_STACK * IMAGE_SIZE**2
    vector_bytes = 4 * sum(box.shape[0] for key, box in space.spaces.items() if key != PIXEL_KEY)
    expected_bytes = 2 * (pixel_bytes + vector_bytes) + 4 * action_dim + 4 + 4

    available = available_memory().bytes_available
    too_big = available // per_transition + 1  # more than all free memory, so surely refused
    try:
        PixelReplayBuffer(too_big, space, action_dim)
        refusal = ""
    except ValueError as exc:
        refusal = str(exc)
    # The message names the largest capacity that fits; free memory moves between our reading and the buffer's.
    named = re.search(r"use ([\d,]+) transitions or fewer", refusal)
    largest = int(named[1].replace(",", "")) if named else -1
    expected_largest = max(available - MEMORY_RESERVE_BYTES, 0) // per_transition
    return [
        Claim(
            "the buffer stores pixels as uint8 and samples them as uint8 (the encoder divides by 255)",
            stored.dtype == np.uint8 and buffer.next_observations[PIXEL_KEY].dtype == np.uint8
            and pixels.dtype == np.uint8 and batch.next_observations[PIXEL_KEY].dtype == np.uint8
            and np.isin(pixels, stored).all(),
            f"stored {stored.dtype} {stored.shape}, sampled {pixels.dtype} {pixels.shape}",
        ),
        Claim(
            "bytes per transition = 2 x (12x84x84 uint8 pixels + 4 x 16 vector bytes) + action, reward, done",
            per_transition == expected_bytes,
            f"{per_transition:,} bytes/transition; 100K transitions = {100_000 * per_transition / 1e9:.1f} GB",
        ),
        Claim(
            "a capacity larger than available memory is refused with a ValueError naming the largest that fits",
            0 <= largest < too_big and abs(largest - expected_largest) <= max(expected_largest // 100, 1_000),
            f"capacity {too_big:,} refused: {refusal!r}" if refusal else f"capacity {too_big:,} was accepted",
        ),
    ]


def verify() -> list[Claim]:
    """Check every claim of this lab: one PASS/FAIL line each."""
    env = make_fetch_env("FetchPush-v4")  # native 84x84, goal_mode="both", marker hidden
    slow_env = make_fetch_env("FetchPush-v4", native_render=False)
    shown_env = make_fetch_env("FetchPush-v4", hide_goal_marker=False)
    try:
        return [
            *_check_renders(env, slow_env),
            *_check_observations(env),
            *_check_marker_and_frame_order(env, shown_env),
            *_check_conventions(env),
            *_check_replay_buffer(env.action_space),
        ]
    finally:
        for e in (env, slow_env, shown_env):
            e.close()


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    return lab_main(__doc__, {"verify": verify}, argv)


if __name__ == "__main__":
    sys.exit(run_guarded(main))
