"""A lean HER replay buffer for stacked pixel observations: every rendered frame is stored once.

Why
---
SB3's ``HerReplayBuffer`` stores ``obs`` and ``next_obs`` separately, each with its whole 12x84x84 frame
stack: 2K = 8 frames per transition. But consecutive stacks share three of their four frames, and
``obs(t+1)`` is ``next_obs(t)``. This buffer keeps each 3x84x84 frame ONCE and rebuilds both stacks by
index arithmetic when a batch is sampled: about one frame per env step, so a buffer SB3 would need a
large server's RAM for fits in RAM, or on the GPU we train on. ``python scripts/bench_replay.py`` prints
the bytes per transition of both.

Layout: one row per env step, plus one per episode for the reset frame
----------------------------------------------------------------------
Every env ``e`` owns a ring of ``R = buffer_size // n_envs`` rows. An episode of ``L`` steps that starts
at row ``s`` fills ``L + 1`` consecutive rows (mod ``R``)::

    row s         : reset observation o_0   (frame f_0 and the other keys; no action, never sampled)
    row s + 1 + k : transition k            (action a_k, reward r_k, done/timeout, and o_{k+1}: its newest
                                             frame f_{k+1} and other keys; for the last step the
                                             ``terminal_observation`` SB3 substitutes for next_obs)

The pixel wrapper's stack at frame time tau is ``(f_{tau-3}, f_{tau-2}, f_{tau-1}, f_tau)`` with
``f_i = f_0`` for ``i < 0`` (reset fills the stack with the reset frame). Row ``s + i`` holds ``f_i``, so
with ``K = frame_stack`` and ``clip(x) = max(x, 0)``::

    obs(k)      = stack(k):     rows s + clip(k - K + 1 + j),  j = 0 .. K-1
    next_obs(k) = stack(k + 1): rows s + clip(k - K + 2 + j),  j = 0 .. K-1

Both together read only K + 1 distinct rows per sample. The other keys of ``obs(k)`` are row ``s + k``,
those of ``next_obs(k)`` row ``s + k + 1``. HER's "future" goal for transition k is the achieved goal of
``next_obs(j)`` for ``j ~ U{k, ..., L-1}`` (inclusive, as in SB3): row ``s + 1 + j``. All of it is vectorised
over the batch; the reward of a relabelled goal comes from ``compute_reward`` called once per batch,
in-process (SB3 makes an ``env_method`` round trip to a worker process for it).

A transition is sampled only once its episode has ended (as in SB3's HER): only then is ``L`` known. When
the ring comes round to the start row of an old episode, that whole episode stops being sampleable.

Use
---
    from ch09.engine.framestack_replay import FrameStackHerReplayBuffer
    model = SAC("MultiInputPolicy", env, replay_buffer_class=FrameStackHerReplayBuffer,
                replay_buffer_kwargs=dict(n_sampled_goal=4, drq=True))

It takes the ``replay_buffer_kwargs`` of SB3's ``HerReplayBuffer`` (``n_sampled_goal``,
``goal_selection_strategy``, ``copy_info_dict``, ``handle_timeout_termination``), and SB3's off-policy
algorithms (SAC, TD3, DDPG, DQN) pass ``env`` themselves, since this is a ``HerReplayBuffer`` subclass;
``save_replay_buffer`` / ``load_replay_buffer`` pickle it as they pickle SB3's (``save()`` / ``load()``
stream a large one to a folder instead).

``compute_reward`` runs in this process: the sub-env's own method under DummyVecEnv, and under
SubprocVecEnv a state-only copy of the registered task built here (``GoalEnvReward``); ``compute_reward=``
overrides both. When no copy can be built (an env made by a function and never registered, such as SB3's
``BitFlippingEnv``), the buffer says so in one warning and asks env 0's worker process, as SB3 does
(``env_method("compute_reward", ...)``): one round trip per sampled batch.

Only the ``pixel_key`` is stored frame by frame. Every other key is stored as it comes, exactly: the
float Boxes side by side in one array (their common float dtype holds every value of each), any other key
(an image, integers, booleans, a Discrete space) in an array of its own shape and dtype, as SB3 stores it.
Observation spaces without a pixel key (full-state runs, ``BitFlippingEnv``) work too: then this is simply
a compact, vectorised HER buffer.

``python scripts/bench_replay.py`` compares it with SB3's buffer; ``tests/test_framestack_replay.py``
checks every sampled stack against the stream a real pixel env produced.
"""

from __future__ import annotations

import copy
import json
import pickle
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard, cast

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import BaseBuffer
from stable_baselines3.common.preprocessing import get_action_dim, get_obs_shape
from stable_baselines3.common.type_aliases import DictReplayBufferSamples
from stable_baselines3.common.utils import get_device
from stable_baselines3.common.vec_env import VecEnv, VecNormalize
from stable_baselines3.her.goal_selection_strategy import KEY_TO_GOAL_STRATEGY, GoalSelectionStrategy
from stable_baselines3.her.her_replay_buffer import HerReplayBuffer

from ch09.engine.memory import MemoryNeed, array_bytes
from image_augmentation import DRQ_PAD, PIXEL_KEY, augment_pixel_samples
from lab_support import check_memory_fits
from pixel_wrapper import FRAME_STACK  # (importing it registers the Fetch envs)

RewardFn = Callable[[np.ndarray, np.ndarray, Any], np.ndarray]

SAVE_CHUNK_BYTES = 256 * 2**20
"""save()/load() stream each array in slices of about this many bytes (a buffer is never pickled whole)."""

SAVE_FORMAT_VERSION = 1

MIN_ACCEPTANCE = 0.25
"""Below this fraction of sampleable slots, sampling switches from rejection to an exact index list."""


def rows_per_transition(episode_steps: int) -> float:
    """Rows per stored transition in a buffer full of ``episode_steps``-step episodes: an episode of L
    transitions takes L + 1 rows, one more for its reset frame."""
    return (episode_steps + 1) / episode_steps


TRUNCATION_WARNING = (
    "The last trajectory in the replay buffer will be truncated.\n"
    "If you are in the same episode as when the replay buffer was saved,\n"
    "you should use `truncate_last_trajectory=False` to avoid that issue."
)
"""SB3's ``HerReplayBuffer.truncate_last_trajectory`` warning, word for word (code that filters it keeps working)."""

TERMINAL_OBSERVATION = "terminal_observation"
"""The info key SB3's VecEnvs add at a done: the episode's last observation, which the buffer stores as a row."""


@dataclass
class SampleIndices:
    """Which stored transitions a batch holds: the buffer's half of a sample, before any gathering.

    | field        | shape | meaning                                                              |
    |--------------|-------|----------------------------------------------------------------------|
    | rows, envs   | (B,)  | ring row and env column of transition k (row = episode start + 1 + k) |
    | ep_start     | (B,)  | row of that episode's reset observation                              |
    | step         | (B,)  | k, the step index inside the episode (0-based)                       |
    | relabelled   | (B,)  | True where HER replaced the desired goal                             |
    | goal_rows    | (B,)  | row whose achieved goal becomes the new goal (= rows where not relabelled) |
    """

    rows: np.ndarray
    envs: np.ndarray
    ep_start: np.ndarray
    step: np.ndarray
    relabelled: np.ndarray
    goal_rows: np.ndarray


class GoalEnvReward:
    """``compute_reward`` of a registered goal env, evaluated in this process; pickles as (id, kwargs).

    HER needs rewards for relabelled goals. SB3 asks a worker process over a pipe (``env_method``); the
    Fetch reward depends only on the two goals, so a state-only copy of the env, built here on first use,
    gives the same numbers without the round trip. Rendering options are dropped: the copy never renders.
    """

    RENDER_KWARGS = ("render_mode", "width", "height", "camera_id", "camera_name", "default_camera_config")

    def __init__(self, env_id: str, env_kwargs: dict[str, Any] | None = None) -> None:
        self.env_id = env_id
        self.env_kwargs = {k: v for k, v in (env_kwargs or {}).items() if k not in self.RENDER_KWARGS}
        self._env: Any = None

    def build(self) -> None:
        """Make the copy now (a call does it on first use); raises what ``gym.make`` raises for this id."""
        if self._env is not None:
            return
        env = gym.make(self.env_id, **self.env_kwargs)
        if not callable(getattr(env.unwrapped, "compute_reward", None)):
            env.close()
            raise AttributeError(f"{self.env_id} has no compute_reward")
        self._env = env

    def __call__(self, achieved_goal: np.ndarray, desired_goal: np.ndarray, info: Any) -> np.ndarray:
        self.build()
        return self._env.unwrapped.compute_reward(achieved_goal, desired_goal, info)

    def __getstate__(self) -> dict[str, Any]:
        return {"env_id": self.env_id, "env_kwargs": self.env_kwargs, "_env": None}


# --8<-- [start:frame_stack_rows]
def frame_stack_rows(ep_start: np.ndarray, step: np.ndarray,
                     frame_stack: int, ring_rows: int) -> np.ndarray:
    """Rows of the K + 1 frames of obs(k) = [:, :K] and next_obs(k) = [:, 1:].

    | argument | shape    | meaning                                        |
    |----------|----------|------------------------------------------------|
    | ep_start | (B,)     | ring row of each episode's reset frame f_0     |
    | step     | (B,)     | k, the transition's index in its episode       |
    | return   | (B, K+1) | rows of f_{k-K+1}, ..., f_k, f_{k+1}, oldest   |
    |          |          | first, frame indices clipped at 0 (f_0)        |

    Clipping at 0 repeats the reset frame, as the wrapper's reset fills its
    stack.
    """
    # frame index i of each f_i the two stacks need
    offsets = step[:, None] - frame_stack + 1 + np.arange(frame_stack + 1)
    return (ep_start[:, None] + np.maximum(offsets, 0)) % ring_rows
# --8<-- [end:frame_stack_rows]


class FrameStackHerReplayBuffer(HerReplayBuffer):
    """HER replay buffer that stores each frame once and rebuilds frame stacks at sample time.

    A drop-in ``replay_buffer_class`` for SB3's SAC, TD3, DDPG and DQN (they pass ``env``, ``device``,
    ``n_envs``).

    | stored per row (env step)                   | shape                  | dtype                | where              |
    |---------------------------------------------|------------------------|----------------------|--------------------|
    | ``frames`` (the ``pixel_key``, one frame)   | (R, n_envs, 3, 84, 84) | uint8                | ``storage_device`` |
    | ``vectors`` (the float keys side by side)   | (R, n_envs, d)         | their common float   | RAM                |
    | ``key_arrays[key]`` (every other key)       | (R, n_envs, *shape)    | the key's own        | RAM                |
    | ``actions``                                 | (R, n_envs, a)         | float32 (DQN: int64) | RAM                |
    | ``rewards``, ``dones``, ``timeouts``        | (R, n_envs)            | float32, bool, bool  | RAM                |
    | ``ep_start``, ``ep_length``, ``sampleable`` | (R, n_envs)            | int64, int64, bool   | RAM (bookkeeping)  |
    | ``infos`` (with ``copy_info_dict``)         | (R, n_envs)            | object: dicts        | RAM, not counted   |

    ``bytes_per_row`` adds these up (all but ``infos``, whose size only the env knows); an L-step episode
    takes L + 1 rows (its reset frame has one), so ``bytes_per_transition(L)`` is
    ``bytes_per_row * (L + 1) / L``. ``memory_plan`` says where they live.

    Args:
        buffer_size: rows in total (``buffer_size // n_envs`` per env); each episode uses one extra row.
        observation_space: dict space; ``pixel_key`` (a ``(3K, H, W)`` uint8 frame stack) is optional.
        action_space: Box action space, or Discrete for DQN.
        env: the training VecEnv (the algorithm injects it); used only to find ``compute_reward``.
        device: training device; sampled tensors land there.
        n_envs: number of parallel envs; their episodes interleave, each env has its own ring.
        optimize_memory_usage: must be False: this buffer is the memory-optimised variant already.
        handle_timeout_termination: time-limit truncations are not terminal (``dones`` sampled as 0).
        n_sampled_goal: k; a sample is relabelled with probability k / (k + 1).
        goal_selection_strategy: "future" (default), "final" or "episode".
        copy_info_dict: keep each transition's info dict and pass the relabelled transitions' infos to
            ``compute_reward`` (an object array of deep copies), as SB3 does; otherwise it gets empty dicts.
            The kept copy leaves out ``terminal_observation``: that is the episode's last observation, which
            the buffer stores as a row already (a whole frame stack, for pixels). For pixels this keeps the
            memory goal: one small Python dict per transition next to a frame (README: lean replay).
        compute_reward: vectorised ``(achieved_goal, desired_goal, infos) -> rewards``; None reads it from
            an in-process env (see the module docstring), or else asks ``env.env_method``.
        drq: apply DrQ random shifts (independently) to the sampled obs and next_obs pixels (no-op without pixels).
        drq_pad: largest DrQ shift in pixels.
        pixel_key: key of the stacked frames in the observation dict.
        frame_stack: K, frames per stacked observation.
        storage_device: where the frames live (None: the training device). On a GPU, sampling gathers
            frames there and never copies pixels from host to device.
    """

    rewrites: int = 0
    """How often ``reset()`` or ``load()`` replaced the contents wholesale: a device copy then takes them whole.
    (A class default, so a buffer pickled before it existed reads 0.)"""

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Dict,
        action_space: spaces.Space,
        env: VecEnv | None = None,
        device: th.device | str = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
        n_sampled_goal: int = 4,
        goal_selection_strategy: GoalSelectionStrategy | str = "future",
        copy_info_dict: bool = False,
        compute_reward: RewardFn | None = None,
        drq: bool = False,
        drq_pad: int = DRQ_PAD,
        pixel_key: str = PIXEL_KEY,
        frame_stack: int = FRAME_STACK,
        storage_device: th.device | str | None = None,
    ) -> None:
        # We skip HerReplayBuffer/DictReplayBuffer.__init__ on purpose: it would allocate obs AND next_obs
        # stacks, the memory this class exists to save. Subclassing HerReplayBuffer still makes SAC inject
        # env= and call set_env().
        BaseBuffer.__init__(self, buffer_size, observation_space, action_space, device, n_envs=n_envs)
        if optimize_memory_usage:
            raise ValueError(
                "FrameStackHerReplayBuffer already stores every frame once; leave optimize_memory_usage=False."
            )
        if not isinstance(observation_space, spaces.Dict):
            raise ValueError(f"FrameStackHerReplayBuffer needs a Dict observation space, got {observation_space}.")
        self.buffer_size = max(buffer_size // n_envs, 1)  # rows per env, as SB3 counts per env
        self.handle_timeout_termination = handle_timeout_termination
        self.optimize_memory_usage = False
        self.pixel_key = pixel_key
        self.frame_stack = int(frame_stack)
        self.frame_shape = self._frame_shape(observation_space, pixel_key, self.frame_stack)  # None: no pixels
        # The float keys share one (R, n_envs, d) array: one write per row, one read per sample. Every other
        # key keeps its own shape and dtype (an int64 or a uint8 image cast to float would not be exact/lean).
        self._vector_columns, vector_dtype = self._vector_layout(observation_space, pixel_key)
        self.vector_keys = list(self._vector_columns)
        self.array_keys = self._array_keys(observation_space, pixel_key)
        self._obs_shapes = {key: get_obs_shape(observation_space[key]) for key in observation_space.spaces}
        self.storage_device = self._storage_device(device, storage_device)
        self.drq, self.drq_pad = drq, drq_pad

        self.goal_selection_strategy = (
            KEY_TO_GOAL_STRATEGY[goal_selection_strategy.lower()]
            if isinstance(goal_selection_strategy, str)
            else goal_selection_strategy
        )
        if n_sampled_goal < 0:
            raise ValueError(f"n_sampled_goal is the number of relabelled goals per transition (0 turns HER off), "
                             f"so it cannot be negative; got {n_sampled_goal}.")
        self.n_sampled_goal = n_sampled_goal
        self.her_ratio = 1 - 1.0 / (n_sampled_goal + 1)  # P(relabel) = k / (k + 1)
        if n_sampled_goal > 0 and not {"achieved_goal", "desired_goal"} <= set(self._obs_shapes) - {pixel_key}:
            raise ValueError(
                f"HER relabels 'desired_goal' with an 'achieved_goal', but the observation keys are "
                f"{list(observation_space.spaces)}; build the env with goal_mode='both' or pass n_sampled_goal=0."
            )
        for need in self.memory_plan(buffer_size, observation_space, action_space, device=device, n_envs=n_envs,
                                     pixel_key=pixel_key, frame_stack=frame_stack, storage_device=storage_device):
            check_memory_fits(need.what, need.items, need.bytes_per_item, device=need.device, unit=need.unit)

        rows, envs = self.buffer_size, self.n_envs
        self.frames: np.ndarray | th.Tensor | None = None  # stays None without a pixel key
        if self.frame_shape is not None:
            if self.storage_device.type == "cpu":
                self.frames = np.zeros((rows, envs, *self.frame_shape), dtype=np.uint8)
            else:
                self.frames = th.zeros((rows, envs, *self.frame_shape), dtype=th.uint8, device=self.storage_device)
        vector_width = sum(columns.stop - columns.start for columns in self._vector_columns.values())
        self.vectors = np.zeros((rows, envs, vector_width), dtype=vector_dtype)
        self.key_arrays = {
            key: np.zeros((rows, envs, *self._obs_shapes[key]), dtype=observation_space[key].dtype)
            for key in self.array_keys
        }
        self.actions = np.zeros((rows, envs, self.action_dim), dtype=self._maybe_cast_dtype(action_space.dtype))
        self.rewards = np.zeros((rows, envs), dtype=np.float32)
        self.dones = np.zeros((rows, envs), dtype=bool)
        self.timeouts = np.zeros((rows, envs), dtype=bool)
        # Episode bookkeeping, per row: where its episode starts and how long it is (0 = not finished).
        self.ep_start = np.zeros((rows, envs), dtype=np.int64)
        self.ep_length = np.zeros((rows, envs), dtype=np.int64)
        self.sampleable = np.zeros((rows, envs), dtype=bool)  # transition rows of finished, intact episodes
        # Per-env writer state.
        self._all_envs = np.arange(envs)
        self._next_row = np.zeros(envs, dtype=np.int64)
        self._rows_written = np.zeros(envs, dtype=np.int64)
        self._open_start = np.full(envs, -1, dtype=np.int64)  # start row of the running episode, -1 if none
        self._n_sampleable = 0
        # With copy_info_dict: each transition row's info dict (read only where a transition is sampled). Without
        # it no rows, but still an array: HerReplayBuffer declares ``infos`` one.
        self.copy_info_dict = copy_info_dict
        self.infos = np.full((rows if copy_info_dict else 0, envs), None, dtype=object)

        self.env = None
        self._user_compute_reward = compute_reward
        self.compute_reward: RewardFn | None = compute_reward
        if env is not None:
            self.set_env(env)

    # ----------------------------------------------------------------------------------------------
    # Sizes
    # ----------------------------------------------------------------------------------------------
    @staticmethod
    def _frame_shape(observation_space: spaces.Dict, pixel_key: str, frame_stack: int) -> tuple[int, int, int] | None:
        """(C, H, W) of ONE frame, from the (C*K, H, W) stacked pixel space; None without pixels."""
        if pixel_key not in observation_space.spaces:
            return None
        space = observation_space[pixel_key]
        if not (isinstance(space, spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3):
            raise ValueError(f"observation_space['{pixel_key}'] must be a (C*K, H, W) uint8 Box, got {space}.")
        channels, height, width = space.shape
        if channels % frame_stack:
            raise ValueError(
                f"'{pixel_key}' has {channels} channels, which is not frame_stack={frame_stack} frames; "
                "pass the frame_stack the env was built with."
            )
        return channels // frame_stack, height, width

    @staticmethod
    def _is_vector_key(space: spaces.Space) -> TypeGuard[spaces.Box]:
        """A float Box: packed with the others, exactly (the common float dtype holds each one's values)."""
        return isinstance(space, spaces.Box) and np.issubdtype(space.dtype, np.floating)

    @staticmethod
    def _vector_layout(observation_space: spaces.Dict, pixel_key: str) -> tuple[dict[str, slice], np.dtype]:
        """Columns of each float key (not the pixel key) in the shared vector array, and that array's dtype."""
        boxes = {key: space for key, space in observation_space.spaces.items()
                 if key != pixel_key and FrameStackHerReplayBuffer._is_vector_key(space)}
        edges = np.cumsum([0, *[int(np.prod(space.shape)) for space in boxes.values()]])
        columns = {key: slice(int(lo), int(hi)) for key, lo, hi in zip(boxes, edges[:-1], edges[1:])}
        return columns, np.result_type(*[space.dtype for space in boxes.values()], np.float32)

    @staticmethod
    def _array_keys(observation_space: spaces.Dict, pixel_key: str) -> list[str]:
        """The keys stored in an array of their own: all but the pixel key and the float keys."""
        return [key for key, space in observation_space.spaces.items()
                if key != pixel_key and not FrameStackHerReplayBuffer._is_vector_key(space)]

    @staticmethod
    def _array_key_bytes(observation_space: spaces.Dict, key: str) -> int:
        """Bytes per row of a key stored in an array of its own: its SB3 shape in its own dtype."""
        space = observation_space[key]
        shape = get_obs_shape(space)
        if not isinstance(shape, tuple) or space.dtype is None:
            raise ValueError(f"observation_space['{key}'] must be a Box, Discrete, MultiDiscrete or MultiBinary "
                             f"space (an array of one dtype), got {space}.")
        return int(np.prod(shape)) * space.dtype.itemsize

    @staticmethod
    def _storage_device(device: th.device | str, storage_device: th.device | str | None) -> th.device:
        """Where the frames live: ``storage_device``, or else the training device (the GPU we train on)."""
        return get_device(device if storage_device is None else storage_device)

    @staticmethod
    def _row_bytes(
        observation_space: spaces.Dict, action_space: spaces.Space, frame_stack: int, pixel_key: str = PIXEL_KEY
    ) -> tuple[int, int]:
        """(frame bytes, everything else) per row; the frame part lives on the storage device."""
        shape = FrameStackHerReplayBuffer._frame_shape(observation_space, pixel_key, frame_stack)
        frame_bytes = int(np.prod(shape)) if shape is not None else 0
        columns, dtype = FrameStackHerReplayBuffer._vector_layout(observation_space, pixel_key)
        vector_bytes = sum(column.stop - column.start for column in columns.values()) * dtype.itemsize
        key_bytes = sum(FrameStackHerReplayBuffer._array_key_bytes(observation_space, key)
                        for key in FrameStackHerReplayBuffer._array_keys(observation_space, pixel_key))
        # float32 for float actions, as SB3 stores them; Discrete (DQN) keeps its int64
        action_dtype = np.dtype(FrameStackHerReplayBuffer._maybe_cast_dtype(action_space.dtype))
        action_bytes = get_action_dim(action_space) * action_dtype.itemsize
        scalar_bytes = 4 + 1 + 1  # reward float32, done bool, timeout bool
        bookkeeping_bytes = 8 + 8 + 1  # ep_start int64, ep_length int64, sampleable bool
        return frame_bytes, vector_bytes + key_bytes + action_bytes + scalar_bytes + bookkeeping_bytes

    @classmethod
    def memory_plan(
        cls,
        buffer_size: int,
        observation_space: spaces.Dict,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        n_envs: int = 1,
        *,
        pixel_key: str = PIXEL_KEY,
        frame_stack: int = FRAME_STACK,
        storage_device: th.device | str | None = None,
        **_other_kwargs: Any,
    ) -> list[MemoryNeed]:
        """What a buffer built with these arguments allocates, and where, before anything is allocated.

        The constructor checks this plan, and the production script's preflight runs the same plan before
        any env exists. The other constructor arguments (HER, DrQ) change no array size.
        """
        storage = cls._storage_device(device, storage_device)
        frame_bytes, host_bytes = cls._row_bytes(observation_space, action_space, frame_stack, pixel_key)
        rows = max(buffer_size // n_envs, 1) * n_envs
        if storage.type == "cpu":
            return [MemoryNeed("frame-stack replay buffer", rows, frame_bytes + host_bytes, "cpu", "rows")]
        plan = [MemoryNeed("replay frames", rows, frame_bytes, str(storage), "rows")] if frame_bytes else []
        return plan + [MemoryNeed("replay vectors", rows, host_bytes, "cpu", "rows")]

    @classmethod
    def bytes_per_row_for(
        cls, observation_space: spaces.Dict, action_space: spaces.Space, frame_stack: int = FRAME_STACK
    ) -> int:
        """Bytes of one row (one env step), frames and host arrays together, before anything is allocated."""
        return sum(cls._row_bytes(observation_space, action_space, frame_stack))

    @property
    def bytes_per_row(self) -> int:
        """Bytes of one row of this buffer (frames on the storage device + everything else in RAM)."""
        return sum(self._row_bytes(self.observation_space, self.action_space, self.frame_stack, self.pixel_key))

    def bytes_per_transition(self, episode_steps: int) -> float:
        """Bytes per stored transition when full of ``episode_steps``-step episodes (L + 1 rows per L)."""
        return self.bytes_per_row * rows_per_transition(episode_steps)

    def allocated_bytes(self) -> int:
        """Bytes this buffer's arrays hold now (frames wherever they live, plus the host arrays)."""
        return sum(array_bytes(array) for array in self._arrays().values())

    def size(self) -> int:
        """Transitions that can be sampled now (all envs; episodes still running are not counted)."""
        return self._n_sampleable

    # ----------------------------------------------------------------------------------------------
    # The env's reward function, evaluated in this process
    # ----------------------------------------------------------------------------------------------
    def set_env(self, env: VecEnv) -> None:
        super().set_env(env)  # raises if an env is already set, as SB3 does
        if self._user_compute_reward is None and self.n_sampled_goal > 0:  # without HER no reward is recomputed
            self.compute_reward = self._in_process_compute_reward(env)

    @staticmethod
    def _in_process_compute_reward(env: VecEnv) -> RewardFn | None:
        """An in-process ``compute_reward`` for ``env``'s task, or None (then: one env_method call per batch).

        DummyVecEnv: the first sub-env's own method. SubprocVecEnv: the envs live in worker processes, so we
        build a state-only copy of the registered task here (``GoalEnvReward``), which costs no rendering.
        When none can be built, say so once: from then on every sampled batch waits for a worker process.
        """
        envs = getattr(env, "envs", None)
        if envs:
            try:
                return envs[0].get_wrapper_attr("compute_reward")
            except AttributeError:
                raise ValueError(
                    f"HER needs the env's compute_reward(achieved_goal, desired_goal, info), but {envs[0]} has "
                    "none; pass compute_reward= to the buffer, or n_sampled_goal=0 to train without HER."
                ) from None
        try:
            spec = env.get_attr("spec", indices=[0])[0]
        except (AttributeError, EOFError, OSError):
            spec = None
        reason = "its envs have no gymnasium spec"
        if spec is not None:
            twin = GoalEnvReward(spec.id, spec.kwargs)
            try:
                twin.build()
                return twin
            except Exception as error:  # any failure (NameNotFound for an unregistered env): do as SB3 does
                reason = f"gym.make({spec.id!r}) failed here ({type(error).__name__}: {error})"
        warnings.warn(
            f"FrameStackHerReplayBuffer cannot compute rewards in this process: {reason}. Relabelled rewards "
            "now come from env.env_method('compute_reward', ...), a round trip to a worker process per sampled "
            "batch; pass compute_reward= to the buffer to avoid it.",
            stacklevel=3,  # the caller of set_env()
        )
        return None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # drops env, as SB3 does
        if self._user_compute_reward is None:
            state["compute_reward"] = None  # a bound method of a MuJoCo env; set_env() finds it again
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # A buffer pickled before keys had arrays of their own and before copy_info_dict (float keys only).
        if "key_arrays" not in state:
            self.key_arrays, self.array_keys = {}, []
            self._obs_shapes = {key: get_obs_shape(space) for key, space in self.observation_space.spaces.items()}
            self.copy_info_dict = False
        if not self.copy_info_dict:  # older versions pickled None here
            self.infos = np.full((0, self.n_envs), None, dtype=object)

    def _relabelled_infos(self, rows: np.ndarray, envs: np.ndarray) -> np.ndarray | list[dict[str, Any]]:
        """What ``compute_reward`` gets as ``info``, as SB3 passes it: deep copies of the kept infos (an object
        array) with ``copy_info_dict``, else empty dicts (Fetch's reward needs no info)."""
        if not self.copy_info_dict:
            return [{} for _ in range(len(rows))]
        return copy.deepcopy(self.infos[rows, envs])  # compute_reward may change them; the kept ones stay

    def _relabelled_rewards(self, achieved_goal: np.ndarray, desired_goal: np.ndarray,
                            infos: np.ndarray | list[dict[str, Any]]) -> np.ndarray:
        if self.compute_reward is not None:
            rewards = self.compute_reward(achieved_goal, desired_goal, infos)
        elif self.env is not None:
            # No in-process reward (see set_env): one round trip per batch, as SB3 does.
            rewards = self.env.env_method("compute_reward", achieved_goal, desired_goal, infos, indices=[0])[0]
        else:
            raise RuntimeError(
                "FrameStackHerReplayBuffer has no compute_reward for relabelled goals; pass compute_reward= "
                "or an env (SB3's algorithms do this for you)."
            )
        return np.asarray(rewards, dtype=np.float32).reshape(len(achieved_goal))

    # ----------------------------------------------------------------------------------------------
    # Writing
    # ----------------------------------------------------------------------------------------------
    # --8<-- [start:frame_stack_add]
    def add(  # type: ignore[override]
        self,
        obs: dict[str, np.ndarray],
        next_obs: dict[str, np.ndarray],
        action: np.ndarray,
        reward: np.ndarray,
        done: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        """Store one env step of every env (SB3's ``_store_transition``).

        At a done step SB3 has already put ``terminal_observation`` into
        ``next_obs``; the ``obs`` of the NEXT call is then the new episode's
        reset observation, stored as a start row of its own.
        """
        envs = self._all_envs
        obs_vectors = self._pack(obs)
        self._close_discontinued_episodes(obs, obs_vectors)
        starting = self._open_start < 0
        if starting.any():  # an episode's first step: its reset frame
            new = envs[starting]
            self._open_start[new] = self._next_row[new]
            start_rows = self._write_rows(new, obs, obs_vectors)
            # a start row holds an observation, not a transition
            self.dones[start_rows, new] = False
            self.timeouts[start_rows, new] = False
        self._refuse_wrapped_episode()

        rows = self._write_rows(envs, next_obs, self._pack(next_obs))
        done = np.asarray(done, dtype=bool).reshape(self.n_envs)
        self.actions[rows, envs] = np.asarray(action).reshape(
            self.n_envs, self.action_dim)
        self.rewards[rows, envs] = np.asarray(reward).reshape(self.n_envs)
        self.dones[rows, envs] = done
        if self.handle_timeout_termination:
            self.timeouts[rows, envs] = [
                info.get("TimeLimit.truncated", False) for info in infos]
        if self.copy_info_dict:
            self._keep_infos(rows, infos)
        for env_idx in np.flatnonzero(done):
            self._close_episode(int(env_idx))
    # --8<-- [end:frame_stack_add]

    def _keep_infos(self, rows: np.ndarray, infos: list[dict[str, Any]]) -> None:
        """copy_info_dict: keep each env's info at its transition row, without the terminal observation."""
        for row, env_idx, info in zip(rows, self._all_envs, infos):
            self.infos[row, env_idx] = {key: value for key, value in info.items() if key != TERMINAL_OBSERVATION}

    def _refuse_wrapped_episode(self) -> None:
        """The ring came round to a running episode's start row: that episode cannot be kept."""
        wrapped = self._next_row == self._open_start
        if wrapped.any():
            env_idx = int(np.flatnonzero(wrapped)[0])
            raise ValueError(
                f"an episode of env {env_idx} is longer than the {self.buffer_size:,} rows each env's ring "
                "holds (buffer_size // n_envs), so use a buffer_size of at least n_envs x (episode length + 1)."
            )

    def _newest_frames(self, source: dict[str, np.ndarray], envs: np.ndarray) -> np.ndarray | None:
        """(n, 3, H, W) view of the newest frame of each stack (the last 3 channels), or None without pixels."""
        if self.frame_shape is None:
            return None
        stacks = np.asarray(source[self.pixel_key])
        newest = stacks[:, -self.frame_shape[0] :]  # a view, no copy
        return newest if len(envs) == self.n_envs else newest[envs]

    def _pack(self, source: dict[str, np.ndarray]) -> np.ndarray:
        """(n_envs, d): all vector keys of ``source`` side by side, in observation-space order."""
        if not self.vector_keys:
            return np.zeros((self.n_envs, 0), dtype=self.vectors.dtype)
        return np.concatenate([np.asarray(source[key]).reshape(self.n_envs, -1) for key in self.vector_keys], axis=1)

    def _key_values(self, source: dict[str, np.ndarray], key: str) -> np.ndarray:
        """(n_envs, *shape) of an array key, as SB3 shapes it (a Discrete key's (n_envs,) becomes (n_envs, 1))."""
        return np.asarray(source[key]).reshape(self.n_envs, *self._obs_shapes[key])

    def _write_rows(self, envs: np.ndarray, source: dict[str, np.ndarray], vectors: np.ndarray) -> np.ndarray:
        """Write one row per env in ``envs`` at its next row: the newest frame and every other key of ``source``
        (``vectors`` is its ``_pack``, all envs); return the rows."""
        rows = self._next_row[envs]
        some = len(envs) != self.n_envs  # only the envs starting an episode
        self._free_rows(rows, envs)
        frames = self._newest_frames(source, envs)
        if isinstance(self.frames, np.ndarray):
            self.frames[rows, envs] = frames
        elif self.frames is not None and frames is not None:
            # One host-to-device copy of the new frames, then a scatter on the device; through pinned memory,
            # non-blocking: a pageable copy would wait for the GPU's queued updates.
            pinned = self.storage_device.type == "cuda"
            flat_rows = th.from_numpy(rows * self.n_envs + envs)
            new_frames = th.from_numpy(np.ascontiguousarray(frames))
            if pinned:
                flat_rows, new_frames = flat_rows.pin_memory(), new_frames.pin_memory()
            self.frames.view(-1, *self.frames.shape[2:]).index_copy_(
                0, flat_rows.to(self.storage_device, non_blocking=pinned),
                new_frames.to(self.storage_device, non_blocking=pinned))
        self.vectors[rows, envs] = vectors[envs] if some else vectors
        for key, array in self.key_arrays.items():
            values = self._key_values(source, key)
            array[rows, envs] = values[envs] if some else values
        self.ep_start[rows, envs] = self._open_start[envs]
        self.ep_length[rows, envs] = 0
        self._next_row[envs] = (rows + 1) % self.buffer_size
        self._rows_written[envs] += 1
        return rows

    def _unpack(self, packed: np.ndarray) -> dict[str, np.ndarray]:
        """Inverse of ``_pack`` for a (B, d) batch: per-key (B, *shape) arrays in each key's dtype."""
        return {
            key: np.ascontiguousarray(packed[:, columns]).reshape(len(packed), *self._obs_shapes[key])
            .astype(self.observation_space[key].dtype, copy=False)
            for key, columns in self._vector_columns.items()
        }

    def _read_observations(self, rows: np.ndarray, envs: np.ndarray) -> dict[str, np.ndarray]:
        """Every key but the pixel key at (rows, envs): (B, *shape) fresh arrays, each in its key's dtype."""
        observations = self._unpack(self.vectors[rows, envs])
        observations.update({key: array[rows, envs] for key, array in self.key_arrays.items()})
        return observations

    def _read_key(self, key: str, rows: np.ndarray, envs: np.ndarray) -> np.ndarray:
        """One key (not the pixel key) at (rows, envs), as ``_read_observations`` gives it."""
        if key in self.key_arrays:
            return self.key_arrays[key][rows, envs]
        packed = self.vectors[rows, envs, self._vector_columns[key]]
        return packed.reshape(len(rows), *self._obs_shapes[key]).astype(self.observation_space[key].dtype, copy=False)

    def _free_rows(self, rows: np.ndarray, envs: np.ndarray) -> None:
        """Before overwriting a row: if an old episode starts there, retire the whole episode.

        The ring overwrites oldest-first and an episode's start row is its oldest row, so the writer always
        meets an old episode at its start: without its reset frame no stack of that episode can be rebuilt.
        """
        lengths = self.ep_length[rows, envs]  # retiring an episode zeroes it, so only old start rows are > 0
        if not lengths.any():
            return
        old_start = (lengths > 0) & (self.ep_start[rows, envs] == rows)
        for row, env_idx in zip(rows[old_start], envs[old_start]):
            episode = (row + np.arange(self.ep_length[row, env_idx] + 1)) % self.buffer_size
            self._n_sampleable -= int(self.sampleable[episode, env_idx].sum())
            self.sampleable[episode, env_idx] = False
            self.ep_length[episode, env_idx] = 0

    def _close_episode(self, env_idx: int) -> None:
        """The running episode of ``env_idx`` ended: record its length and make its transitions sampleable."""
        start = int(self._open_start[env_idx])
        length = (int(self._next_row[env_idx]) - 1 - start) % self.buffer_size  # transition rows
        episode = (start + np.arange(length + 1)) % self.buffer_size
        self.ep_length[episode, env_idx] = length
        self.sampleable[episode[1:], env_idx] = True
        self._n_sampleable += length
        self._open_start[env_idx] = -1

    def _close_discontinued_episodes(self, obs: dict[str, np.ndarray], obs_vectors: np.ndarray) -> None:
        """This is subtle: the env may have been reset WITHOUT a done (a second ``learn()`` call, a resume).

        Then ``obs`` does not continue the running episode, and appending to it would splice two episodes
        into one frame stack. obs(t) must equal the stored next_obs(t-1); we compare the (host-side) keys
        other than pixels, which a reset changes, and close a broken episode as a time-out.
        """
        running = self._open_start >= 0
        if not (self.vector_keys or self.array_keys) or not running.any():
            return
        last_rows = (self._next_row - 1) % self.buffer_size
        continues = (self.vectors[last_rows, self._all_envs] == obs_vectors).all(axis=1)
        for key, array in self.key_arrays.items():
            stored = array[last_rows, self._all_envs].reshape(self.n_envs, -1)
            continues &= (stored == self._key_values(obs, key).reshape(self.n_envs, -1)).all(axis=1)
        continues |= ~running
        for env_idx in np.flatnonzero(~continues):
            warnings.warn(
                f"add() got an observation that does not continue env {env_idx}'s running episode (was the env "
                "reset without done?); that episode is closed as a time-out.",
                stacklevel=3,  # the caller of add()
            )
            self._truncate_episode(int(env_idx), int(last_rows[env_idx]))

    def _truncate_episode(self, env_idx: int, last_row: int) -> None:
        self.dones[last_row, env_idx] = True
        if self.handle_timeout_termination:
            self.timeouts[last_row, env_idx] = True  # not terminal: the target still bootstraps
        self._close_episode(env_idx)

    def truncate_last_trajectory(self) -> None:
        """Close every running episode as a time-out (after a resume the envs start fresh episodes).

        Warns as SB3's buffer does, with its words, when there is a running episode to close.
        """
        running = np.flatnonzero(self._open_start >= 0)
        if len(running):
            warnings.warn(TRUNCATION_WARNING, stacklevel=2)
        for env_idx in running:
            self._truncate_episode(int(env_idx), int((self._next_row[env_idx] - 1) % self.buffer_size))

    def reset(self) -> None:
        super().reset()
        self.sampleable[:] = False
        self.ep_length[:] = 0
        self._next_row[:] = 0
        self._rows_written[:] = 0
        self._open_start[:] = -1
        self._n_sampleable = 0
        self.rewrites += 1

    # ----------------------------------------------------------------------------------------------
    # Sampling
    # ----------------------------------------------------------------------------------------------
    def sample(self, batch_size: int, env: VecNormalize | None = None) -> DictReplayBufferSamples:  # type: ignore[override]
        """A batch of ``batch_size`` transitions, torch tensors on ``device``; pixels stay uint8."""
        return self._gather(self._sample_indices(batch_size), env)

    def raise_if_nothing_to_sample(self) -> None:
        """Raise SB3's error before the first episode has finished: there is no finished transition to draw
        (the device draw, which cannot raise inside a captured step, asks here first)."""
        if self._n_sampleable == 0:
            raise RuntimeError("Unable to sample before the end of the first episode; set learning_starts greater "
                               "than the steps of one episode.")

    # --8<-- [start:frame_stack_sample_indices]
    def _sample_indices(self, batch_size: int) -> SampleIndices:
        """Draw transitions uniformly from finished episodes, then HER goals:
        all index arithmetic, no data is read."""
        self.raise_if_nothing_to_sample()  # no episode has finished yet
        rows, envs = self._uniform_sampleable(batch_size)
        ep_start = self.ep_start[rows, envs]
        ep_length = self.ep_length[rows, envs]
        step = (rows - ep_start - 1) % self.buffer_size  # rows = s + 1 + k

        # P(relabel) = k / (k + 1): never when n_sampled_goal k = 0
        relabelled = np.random.random(batch_size) < self.her_ratio
        strategy = self.goal_selection_strategy
        if strategy == GoalSelectionStrategy.FUTURE:
            # inclusive of k, as in SB3: k <= j <= L - 1
            goal_step = np.random.randint(step, ep_length)
        elif strategy == GoalSelectionStrategy.FINAL:
            goal_step = ep_length - 1
        else:  # EPISODE
            goal_step = np.random.randint(0, ep_length)
        goal_rows = (ep_start + 1 + goal_step) % self.buffer_size
        goal_rows = np.where(relabelled, goal_rows, rows)
        return SampleIndices(rows, envs, ep_start, step, relabelled,
                             goal_rows)
    # --8<-- [end:frame_stack_sample_indices]

    def draw_plan(self) -> tuple[int, bool]:
        """How a uniform draw of sampleable slots goes, on the host or the device: (the filled rows per env,
        whether to pick from an exact list of sampleable slots instead of rejecting candidates from the filled
        rows, as when fewer than ``MIN_ACCEPTANCE`` of them are sampleable)."""
        filled = int(min(self._rows_written.max(), self.buffer_size))
        return filled, self._n_sampleable < MIN_ACCEPTANCE * filled * self.n_envs

    def _uniform_sampleable(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, envs) uniform over sampleable slots, by rejection from the filled part of the rings.

        Nearly every filled row is sampleable (all but one row per episode and the running episodes), so
        about one round suffices and nothing scans the whole buffer; a near-empty buffer takes the exact path.
        """
        filled, exact = self.draw_plan()
        if exact:
            flat = np.flatnonzero(self.sampleable[:filled])
            rows, envs = np.unravel_index(np.random.choice(flat, size=batch_size), (filled, self.n_envs))
            return rows, envs
        rows, envs, found = np.empty(batch_size, np.int64), np.empty(batch_size, np.int64), 0
        while found < batch_size:
            draws = 2 * (batch_size - found)
            cand_rows = np.random.randint(0, filled, draws)
            cand_envs = np.random.randint(0, self.n_envs, draws)
            ok = self.sampleable[cand_rows, cand_envs]
            take = min(int(ok.sum()), batch_size - found)
            rows[found : found + take] = cand_rows[ok][:take]
            envs[found : found + take] = cand_envs[ok][:take]
            found += take
        return rows, envs

    def _gather(self, idx: SampleIndices, env: VecNormalize | None = None) -> DictReplayBufferSamples:
        """Read the transitions ``idx`` names: rebuild frame stacks, relabel goals, recompute rewards."""
        obs_rows = (idx.rows - 1) % self.buffer_size  # obs(k) is row s + k; next_obs(k) is row s + k + 1
        obs = self._read_observations(obs_rows, idx.envs)
        next_obs = self._read_observations(idx.rows, idx.envs)
        rewards = self.rewards[idx.rows, idx.envs].copy()
        if idx.relabelled.any():
            her = idx.relabelled
            new_goals = self._read_key("achieved_goal", idx.goal_rows[her], idx.envs[her])
            obs["desired_goal"][her] = new_goals
            next_obs["desired_goal"][her] = new_goals  # the goal is fixed within a transition
            # r_k = reward(next achieved goal, new goal): s_{k+1} is what action a_k achieved.
            infos = self._relabelled_infos(idx.rows[her], idx.envs[her])
            rewards[her] = self._relabelled_rewards(next_obs["achieved_goal"][her], new_goals, infos)
        dones = self.dones[idx.rows, idx.envs].astype(np.float32)
        if self.handle_timeout_termination:
            dones *= 1.0 - self.timeouts[idx.rows, idx.envs]  # a time-out is not terminal

        if env is not None:
            # a dict in, a dict out (SB3 annotates the result as ndarray | dict)
            obs = cast(dict[str, np.ndarray], self._normalize_obs(obs, env))
            next_obs = cast(dict[str, np.ndarray], self._normalize_obs(next_obs, env))
        observations = {key: self._to_device(value) for key, value in obs.items()}
        next_observations = {key: self._to_device(value) for key, value in next_obs.items()}
        if self.frame_shape is not None:
            observations[self.pixel_key], next_observations[self.pixel_key] = self._gather_stacks(idx)
        order = list(self.observation_space.spaces)  # the observation space's key order
        samples = DictReplayBufferSamples(
            observations={key: observations[key] for key in order},
            actions=self._to_device(self.actions[idx.rows, idx.envs]),
            next_observations={key: next_observations[key] for key in order},
            dones=self._to_device(dones.reshape(-1, 1)),
            rewards=self._to_device(self._normalize_reward(rewards.reshape(-1, 1), env)),
        )
        if self.drq and self.frame_shape is not None:
            return augment_pixel_samples(samples, self.pixel_key, self.drq_pad)
        return samples

    # --8<-- [start:frame_stack_gather_stacks]
    def _gather_stacks(self, idx: SampleIndices
                       ) -> tuple[th.Tensor, th.Tensor]:
        """(B, 3K, H, W) uint8 obs and next_obs stacks from K + 1 frames."""
        assert self.frames is not None and self.frame_shape is not None
        frame_rows = frame_stack_rows(idx.ep_start, idx.step,
                                      self.frame_stack, self.buffer_size)
        if isinstance(self.frames, np.ndarray):
            frames = self.frames[frame_rows, idx.envs[:, None]]
            frames = th.from_numpy(frames).to(self.device)
        else:  # frames on the GPU: only the (B, K+1) index leaves the host
            device = self.storage_device
            rows = th.as_tensor(frame_rows, device=device)
            envs = th.as_tensor(idx.envs[:, None], device=device)
            frames = self.frames[rows, envs].to(self.device)
        batch, (channels, height, width) = len(idx.rows), self.frame_shape
        shape = (batch, self.frame_stack * channels, height, width)
        # Views, no copy: of (B, K+1, C, H, W), frames 0..K-1 are obs(k)
        # and frames 1..K are next_obs(k); merging (K, C) is a reshape.
        return frames[:, :-1].reshape(shape), frames[:, 1:].reshape(shape)
    # --8<-- [end:frame_stack_gather_stacks]

    def _to_device(self, array: np.ndarray) -> th.Tensor:
        return th.as_tensor(array).to(self.device)  # the gathered arrays are fresh copies already

    # ----------------------------------------------------------------------------------------------
    # Save / load: one .npy per array, streamed in slices, plus a small JSON of the writer state
    # ----------------------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray | th.Tensor]:
        arrays: dict[str, np.ndarray | th.Tensor] = {}
        if self.frames is not None:
            arrays["frames"] = self.frames
        arrays["vectors"] = self.vectors
        # a file name per key: "obs.<key>", any character a file name should not hold replaced by "_"
        arrays.update({f"obs.{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}": array for key, array in self.key_arrays.items()})
        arrays.update(
            actions=self.actions, rewards=self.rewards, dones=self.dones, timeouts=self.timeouts,
            ep_start=self.ep_start, ep_length=self.ep_length, sampleable=self.sampleable,
        )
        return arrays

    def _meta(self) -> dict[str, Any]:
        meta = {
            "format_version": SAVE_FORMAT_VERSION,
            "rows_per_env": self.buffer_size,
            "n_envs": self.n_envs,
            "frame_stack": self.frame_stack,
            "arrays": {name: [list(array.shape), str(array.dtype)] for name, array in self._arrays().items()},
        }
        # Only when set, so folders saved before copy_info_dict existed still load.
        return meta | {"copy_info_dict": True} if self.copy_info_dict else meta

    def save(self, directory: str | Path) -> None:
        """Write the buffer to ``directory`` (created): ``<array>.npy`` files written slice by slice + state.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, array in self._arrays().items():
            dtype = array.dtype if isinstance(array, np.ndarray) else th.empty(0, dtype=array.dtype).numpy().dtype
            out = np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+", dtype=dtype, shape=tuple(array.shape))
            for lo, hi in self._chunks(array):
                chunk = array[lo:hi]
                out[lo:hi] = chunk if isinstance(chunk, np.ndarray) else chunk.cpu().numpy()
            out.flush()
            del out
        if self.copy_info_dict:  # Python dicts: pickled, as SB3 pickles its whole buffer
            with open(directory / "infos.pkl", "wb") as handle:
                pickle.dump(self.infos, handle, protocol=pickle.HIGHEST_PROTOCOL)
        state = self._meta() | {
            "next_row": self._next_row.tolist(),
            "rows_written": self._rows_written.tolist(),
            "open_start": self._open_start.tolist(),
            "n_sampleable": self._n_sampleable,
        }
        (directory / "state.json").write_text(json.dumps(state, indent=1))

    def load(self, directory: str | Path, truncate_last_trajectory: bool = True) -> None:
        """Fill this buffer (built with the same arguments) from ``save(directory)``, slice by slice.

        ``truncate_last_trajectory`` closes the episodes that were running at save time as time-outs, as SB3
        does on resume (the envs will start new episodes); pass False to get the saved state byte for byte.
        """
        directory = Path(directory)
        state_file = directory / "state.json"
        if not state_file.is_file():
            raise FileNotFoundError(f"{state_file} does not exist; point load() at a directory written by save().")
        state = json.loads(state_file.read_text())
        expected = self._meta()
        saved = {key: state.get(key) for key in expected}
        if saved != expected:
            raise ValueError(
                f"the buffer saved in {directory} has layout {saved} but this one was built as {expected}; "
                "build it with the same buffer_size, n_envs, observation space, frame_stack and copy_info_dict."
            )
        for name, array in self._arrays().items():
            source = np.load(directory / f"{name}.npy", mmap_mode="r")
            for lo, hi in self._chunks(array):
                chunk = np.ascontiguousarray(source[lo:hi])
                if isinstance(array, np.ndarray):
                    array[lo:hi] = chunk
                else:
                    array[lo:hi].copy_(th.from_numpy(chunk))
            del source
        if self.copy_info_dict:
            with open(directory / "infos.pkl", "rb") as handle:
                self.infos[:] = pickle.load(handle)
        self._next_row = np.array(state["next_row"], dtype=np.int64)
        self._rows_written = np.array(state["rows_written"], dtype=np.int64)
        self._open_start = np.array(state["open_start"], dtype=np.int64)
        self._n_sampleable = int(state["n_sampleable"])
        self.rewrites += 1
        if truncate_last_trajectory:
            self.truncate_last_trajectory()

    @staticmethod
    def _chunks(array: np.ndarray | th.Tensor) -> list[tuple[int, int]]:
        row_bytes = max(array_bytes(array[0:1]), 1)
        step = max(SAVE_CHUNK_BYTES // row_bytes, 1)
        return [(lo, min(lo + step, len(array))) for lo in range(0, len(array), step)]
