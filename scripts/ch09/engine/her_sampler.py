"""HER sampling on the training device, from the frame-once replay buffer, without a host round trip.

Why
---
``FrameStackHerReplayBuffer.sample()`` draws indices with NumPy, relabels goals and computes rewards on the
host, then copies each batch to the GPU: every gradient step pays a host-to-device copy and a NumPy pass, and
a step captured as a CUDA graph cannot contain either. Here the same draw is torch code on the training device:
the buffer's arrays are mirrored there (the frames already live there when ``storage_device`` is the GPU), and
one function turns random numbers into a finished HER batch, with no ``.item()`` and no branch on a tensor
value, so it can run inside a captured graph.

The draw, as equations (R rows per env ring, E envs, the buffer's own notation)
-------------------------------------------------------------------------------
::

    slot  (row, env) ~ Uniform{ sampleable slots }           by rejection from the filled rows (below)
    k     = (row - ep_start - 1) mod R                         the transition's step in its episode
    HER   h ~ Bernoulli(n_sampled_goal / (n_sampled_goal + 1))
    goal  j ~ Uniform{k, ..., L - 1} ("future"), L - 1 ("final"), Uniform{0, ..., L - 1} ("episode")
          g' = achieved_goal of row ep_start + 1 + j           (the goal of obs AND next_obs where h = 1)
    r     = compute_reward(achieved_goal(next_obs), g') where h = 1, else the stored reward
    done  = done * (1 - timeout)                                a time-out is not terminal
    obs, next_obs pixel stacks = frames of rows ep_start + max(k - K + 1 + i, 0), i = 0..K (K = frame_stack)

Uniform slots without a host sync: draw ``M`` candidate slots uniformly over the filled rows, keep the
sampleable ones in draw order (a prefix sum gives each its place) and take the first ``B``: i.i.d. uniform
over the sampleable slots, like the buffer's own rejection loop. ``M`` is large enough that fewer than ``B``
hits does not happen in practice once the buffer is at least ``MIN_ACCEPTANCE`` sampleable (then the hits are
reused cyclically, still valid); below that (the first episodes), the host uploads the exact list of
sampleable slots and the draw is uniform over that list instead, as the buffer does.

| object                | what it is                                                                    |
|-----------------------|-------------------------------------------------------------------------------|
| ``TorchGoalReward``   | the Fetch ``compute_reward`` in torch, checked against the env's on random goals |
| ``DeviceReplayView``  | the buffer's arrays as tensors on the device, brought up to date by ``sync()`` |
| ``sample_her_batch``  | one batch: SB3's ``DictReplayBufferSamples`` plus the indices it came from    |

``tests/test_fast_sac.py`` checks the draw against the NumPy sampler's contract on a real pixel stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch as th
from stable_baselines3.common.type_aliases import DictReplayBufferSamples
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.her.goal_selection_strategy import GoalSelectionStrategy

from ch09.engine.framestack_replay import FrameStackHerReplayBuffer
from ch09.engine.memory import array_bytes
from image_augmentation import random_shift_aug

RANDOM_RANGE = 2**62
"""Integer draws are ``randint(0, 2**62) % n``: uniform on {0..n-1} up to a bias of n / 2**62, and exact
integers (a float ``rand() * n`` in float32 would favour some rows by ~n / 2**24, 6% at a million rows)."""

CANDIDATE_FACTOR = 8
EXTRA_CANDIDATES = 1024
"""Candidate slots per batch: ``M = CANDIDATE_FACTOR * B + EXTRA_CANDIDATES``. At the lowest acceptance the
rejection path is used for (``p = MIN_ACCEPTANCE``), B = 256 expects ``M p = 2B + 256`` hits with a standard
deviation of ``sqrt(M p (1 - p))``: more than 20 of them above B, so a batch that must reuse hits
(``_draw_slots``) practically never happens."""

REWARD_CHECK_GOALS = 4096
"""Random goal pairs on which the torch reward must equal the env's ``compute_reward`` before it is used."""

NumpyReward = Callable[[np.ndarray, np.ndarray, Any], np.ndarray]


# ======================================================================================================
# The sparse Fetch reward in torch
# ======================================================================================================
class TorchGoalReward:
    """``compute_reward`` of the Fetch tasks, vectorised in torch: ``-(||g_a - g|| > threshold)`` (sparse) or
    ``-||g_a - g||`` (dense), as ``gymnasium_robotics``' ``BaseFetchEnv.compute_reward``.

    | argument / output | shape  | dtype                                  |
    |-------------------|--------|----------------------------------------|
    | achieved_goal     | (B, 3) | the buffer's vector dtype (float32/64) |
    | desired_goal      | (B, 3) | same                                   |
    | return            | (B,)   | float32                                |

    The distance is computed in the goals' own dtype, as NumPy does, so a distance that rounds to exactly the
    threshold gives the same reward.
    """

    def __init__(self, distance_threshold: float, reward_type: str = "sparse") -> None:
        if reward_type not in ("sparse", "dense"):
            raise ValueError(f"reward_type must be 'sparse' or 'dense', got {reward_type!r}.")
        self.distance_threshold = float(distance_threshold)
        self.reward_type = reward_type

    def __call__(self, achieved_goal: th.Tensor, desired_goal: th.Tensor) -> th.Tensor:
        distance = (achieved_goal - desired_goal).square().sum(dim=-1).sqrt()
        if self.reward_type == "sparse":
            return -(distance > self.distance_threshold).to(th.float32)
        return -distance.to(th.float32)

    @classmethod
    def for_env(cls, env: VecEnv) -> TorchGoalReward | None:
        """The torch reward of ``env``'s task, or None when it is not a Fetch-style goal task."""
        try:
            threshold = env.get_attr("distance_threshold", indices=[0])[0]
            reward_type = env.get_attr("reward_type", indices=[0])[0]
        except (AttributeError, EOFError, OSError):
            return None
        if not isinstance(threshold, (int, float)) or reward_type not in ("sparse", "dense"):
            return None
        return cls(float(threshold), reward_type)

    def matches(self, numpy_reward: NumpyReward, goal_dim: int, dtype: np.dtype, seed: int = 0) -> bool:
        """True if this reward equals ``numpy_reward`` exactly on random goal pairs, many near the threshold."""
        rng = np.random.default_rng(seed)
        achieved = rng.uniform(-0.3, 0.3, size=(REWARD_CHECK_GOALS, goal_dim)).astype(dtype)
        direction = rng.normal(size=(REWARD_CHECK_GOALS, goal_dim))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        # Half the pairs at distances within 1% of the threshold (where a rounding difference would show).
        near = self.distance_threshold * rng.uniform(0.99, 1.01, size=(REWARD_CHECK_GOALS, 1))
        far = rng.uniform(0.0, 4 * self.distance_threshold, size=(REWARD_CHECK_GOALS, 1))
        radius = np.where(np.arange(REWARD_CHECK_GOALS)[:, None] % 2 == 0, near, far)
        desired = (achieved + radius * direction).astype(dtype)
        expected = np.asarray(numpy_reward(achieved, desired, [{}] * REWARD_CHECK_GOALS), dtype=np.float32)
        got = self(th.from_numpy(achieved), th.from_numpy(desired)).numpy()
        return expected.shape == got.shape and bool(np.array_equal(expected, got))


# ======================================================================================================
# The buffer's arrays on the training device
# ======================================================================================================
WRITE_ONCE_ARRAYS = ("frames", "vectors", "actions", "rewards", "ep_start")
"""Written once, when their row is written: a sync copies only the rows written since the last one."""
BOOKKEEPING_ARRAYS = ("ep_length", "sampleable", "dones", "timeouts")
"""Also changed later: when an episode closes (its length, sampleable), is cut short (done, timeout of its
last row) or is retired by the ring (its rows stop being sampleable)."""


class HostUpload:
    """Host arrays gathered into one staging buffer and sent to the device in ONE copy.

    ``add`` returns an array's slot; ``send`` copies everything (pinned and non-blocking on a GPU, so the host
    never waits for the GPU's queue) and returns each array's device tensor, a view of the one copy, in slot
    order. Each array starts at a multiple of 8 bytes, so every dtype can view its bytes.
    """

    ALIGN = 8

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []

    def add(self, array: np.ndarray) -> int:
        self.arrays.append(np.ascontiguousarray(array))
        return len(self.arrays) - 1

    def send(self, device: th.device) -> list[th.Tensor]:
        offsets, total = [], 0
        for array in self.arrays:
            offsets.append(total)
            total += -(-array.nbytes // self.ALIGN) * self.ALIGN
        staging = th.empty(max(total, self.ALIGN), dtype=th.uint8, pin_memory=device.type == "cuda")
        host = staging.numpy()
        for array, offset in zip(self.arrays, offsets):
            host[offset: offset + array.nbytes] = array.reshape(-1).view(np.uint8)
        on_device = staging.to(device, non_blocking=True)
        return [on_device[offset: offset + array.nbytes].view(th.from_numpy(array[:0].reshape(-1)).dtype)
                .reshape(array.shape) for array, offset in zip(self.arrays, offsets)]


@dataclass
class _WriterState:
    next_row: np.ndarray
    rows_written: np.ndarray
    open_start: np.ndarray
    rewrites: int


class DeviceReplayView:
    """``FrameStackHerReplayBuffer``'s arrays as torch tensors on ``device``, and the scalars the draw needs.

    On the CPU the tensors are zero-copy views of the buffer's NumPy arrays (``th.from_numpy``): always
    current, ``sync()`` only refreshes the scalars. On a GPU they are copies, and ``sync()`` (called once per
    ``train()``, outside any captured graph) copies what changed since the last call, per env ring:

    - rows written since then (all arrays);
    - the bookkeeping of the episode that was running then (it may have closed: its length, sampleable) and
      of the rows just ahead of the writer (the ring may have retired the old episode that started there: at
      most the longest episode seen so far).

    Anything it cannot account for (first call, ``reset()``, ``load()``, a ring that went round) copies
    everything. Frames that already live on ``device`` (``storage_device`` = the GPU) are used in place. What a
    sync sends -- the changed rows of every array, their indices, the draw's scalars -- goes up in ONE
    host-to-device copy (``HostUpload``: pinned, non-blocking), then is scattered on the device.
    The view reads the buffer's arrays and writer state (``_next_row``, ``_rows_written``, ``_open_start``,
    ``_n_sampleable``); it never writes to the buffer.
    """

    def __init__(self, buffer: FrameStackHerReplayBuffer, device: th.device | str,
                 copy_host_arrays: bool | None = None) -> None:
        self.buffer = buffer
        self.device = th.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = th.device("cuda", th.cuda.current_device())  # compare equal to tensor.device
        self.copy_host_arrays = self.device.type != "cpu" if copy_host_arrays is None else copy_host_arrays
        self.rows, self.n_envs = buffer.buffer_size, buffer.n_envs
        self.tensors: dict[str, th.Tensor] = {}
        self._sources: dict[str, Any] = {}
        for name in WRITE_ONCE_ARRAYS + BOOKKEEPING_ARRAYS:
            source = getattr(buffer, name)
            if source is None:  # no pixel key: no frames
                continue
            self._sources[name] = source
            self.tensors[name] = self._device_tensor(source)
        slots = self.rows * self.n_envs
        # Scalars and the exact-list fallback, at fixed addresses: a captured graph reads them in place. The
        # three scalars are views of one tensor, so one copy sets them all.
        self._scalars = th.tensor([1, 0, 1], dtype=th.int64, device=self.device)
        self.filled_slots, self.use_exact_list, self.exact_count = self._scalars.unbind()
        self.exact_slots = th.zeros(slots, dtype=th.int64, device=self.device)
        self._last: _WriterState | None = None
        self._longest_episode_rows = 1
        self.full_syncs = 0  # how often sync() copied everything (tests read it)
        self.uploads = 0  # host-to-device copies made by syncs besides the full ones (tests read it)
        self._exact_count_host = 1  # exact_count's value, kept here: never read back from the device

    # ---- construction ----------------------------------------------------------------------------
    def _device_tensor(self, source: np.ndarray | th.Tensor) -> th.Tensor:
        if isinstance(source, th.Tensor):
            if source.device == self.device:
                return source  # frames on the training device already: gathered in place
            return th.empty(source.shape, dtype=source.dtype, device=self.device)
        if not self.copy_host_arrays:
            return th.from_numpy(source)  # a view: the buffer's writes show up immediately
        return th.empty(source.shape, dtype=th.from_numpy(source[:0]).dtype, device=self.device)

    def is_stale(self) -> bool:
        """True if the buffer replaced one of its arrays (the tensors here would no longer follow it)."""
        return any(getattr(self.buffer, name) is not source for name, source in self._sources.items())

    def _is_copy(self, name: str) -> bool:
        source = self._sources[name]
        tensor = self.tensors[name]
        if isinstance(source, th.Tensor):
            return tensor is not source
        return self.copy_host_arrays

    # ---- sync ------------------------------------------------------------------------------------
    def sync(self) -> None:
        """Bring the device copies and the draw's scalars up to date with the buffer (host side, no GPU wait)."""
        buffer = self.buffer
        if self.is_stale():
            raise RuntimeError("the buffer replaced an array this view mirrors; build a new DeviceReplayView.")
        now = _WriterState(buffer._next_row.copy(), buffer._rows_written.copy(), buffer._open_start.copy(),
                           buffer.rewrites)
        copied = [name for name in self.tensors if self._is_copy(name)]
        upload = HostUpload()
        writes: list[tuple[list[str], int, int]] = []  # (arrays, slot of the row indices, slot of the env indices)
        if copied:
            windows = self._windows(now)
            if windows is None:
                self._copy_all(copied)
            else:
                new_rows, bookkeeping_rows = windows
                for names, (row_index, env_index) in (([n for n in copied if n in WRITE_ONCE_ARRAYS], new_rows),
                                                      ([n for n in copied if n in BOOKKEEPING_ARRAYS],
                                                       bookkeeping_rows)):
                    if names and len(row_index):
                        writes.append((names, upload.add(row_index), upload.add(env_index)))
                if len(bookkeeping_rows[0]):
                    seen = int(buffer.ep_length[bookkeeping_rows].max()) + 1
                    self._longest_episode_rows = max(self._longest_episode_rows, seen)
        elif self._last is None:
            self._longest_episode_rows = int(buffer.ep_length.max()) + 1
        self._last = now
        self._write_rows(upload, writes)

    def _write_rows(self, upload: HostUpload, writes: list[tuple[list[str], int, int]]) -> None:
        """Send the changed rows (``writes``) and the draw's scalars in one copy, then scatter them on the device."""
        rows_of = {}
        for names, row_slot, env_slot in writes:
            row_index, env_index = upload.arrays[row_slot], upload.arrays[env_slot]
            for name in names:
                source = self._sources[name]
                if not isinstance(source, th.Tensor):  # (frames on another device are gathered there below)
                    rows_of[name] = upload.add(source[row_index, env_index])
        scalars_slot, exact_slot = self._scalars_to_upload(upload)
        sent = upload.send(self.device)
        self.uploads += 1
        for names, row_slot, env_slot in writes:
            rows_t, envs_t = sent[row_slot], sent[env_slot]
            for name in names:
                source = self._sources[name]
                if name in rows_of:
                    values = sent[rows_of[name]]
                else:
                    values = source[rows_t.to(source.device), envs_t.to(source.device)].to(self.device)
                self.tensors[name].index_put_((rows_t, envs_t), values)
        self._scalars.copy_(sent[scalars_slot])
        if exact_slot is not None:
            exact = sent[exact_slot]
            self.exact_slots[: len(exact)].copy_(exact)

    def _windows(self, now: _WriterState) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None:
        """(rows, envs) written since the last sync, and (rows, envs) whose bookkeeping may have changed;
        None when only a full copy is safe."""
        last = self._last
        if last is None:
            return None
        if now.rewrites != last.rewrites:
            return None  # reset() or load() since the last sync: every row may have changed
        rows = self.rows
        new = now.rows_written - last.rows_written
        if (new < 0).any() or ((last.next_row + new) % rows != now.next_row).any():
            return None  # the writer did not simply move on
        margin = self._longest_episode_rows
        new_parts, book_parts = [], []
        for env in range(self.n_envs):
            start = last.open_start[env] if last.open_start[env] >= 0 else last.next_row[env]
            back = (last.next_row[env] - start) % rows
            if back + new[env] + margin >= rows:
                return None  # the ring went (almost) round since the last sync
            new_parts.append(((last.next_row[env] + np.arange(new[env])) % rows, env))
            book_parts.append(((start + np.arange(back + new[env] + margin)) % rows, env))

        def flatten(parts: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
            row_index = np.concatenate([r for r, _ in parts]).astype(np.int64)
            env_index = np.concatenate([np.full(len(r), e, dtype=np.int64) for r, e in parts])
            return row_index, env_index

        return flatten(new_parts), flatten(book_parts)

    def _copy_all(self, names: list[str]) -> None:
        self.full_syncs += 1
        for name in names:
            source = self._sources[name]
            if isinstance(source, th.Tensor):
                self.tensors[name].copy_(source)
            else:
                self.tensors[name].copy_(self._staged(source))
        self._longest_episode_rows = int(self.buffer.ep_length.max()) + 1

    def _staged(self, array: np.ndarray) -> th.Tensor:
        """``array`` on the device; through pinned memory on a GPU, so the copy does not wait for the GPU."""
        tensor = th.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _scalars_to_upload(self, upload: HostUpload) -> tuple[int, int | None]:
        """Slots of (filled slots, use the exact list, its length) and, early on, of the exact list itself."""
        buffer = self.buffer
        filled, exact = buffer.draw_plan()
        count, exact_slot = self._exact_count_host, None
        if exact and buffer._n_sampleable > 0:  # the first episodes: few slots, an exact list is cheap
            flat = np.flatnonzero(buffer.sampleable[:filled].reshape(-1)).astype(np.int64)
            count, exact_slot = len(flat), upload.add(flat)
        self._exact_count_host = count
        scalars = np.array([max(filled * self.n_envs, 1), int(exact), count], dtype=np.int64)
        return upload.add(scalars), exact_slot

    @property
    def device_bytes(self) -> int:
        """Bytes of the copies this view holds on the device (0 on the CPU, where the arrays are views)."""
        copies = [t for name, t in self.tensors.items() if self._is_copy(name)]
        scalars = [self.exact_slots] if self.copy_host_arrays else []
        return sum(array_bytes(t) for t in copies + scalars)


# ======================================================================================================
# One HER batch, drawn on the device
# ======================================================================================================
@dataclass
class DeviceSampleIndices:
    """Where each sample came from (the device twin of the buffer's ``SampleIndices``), for tests."""

    rows: th.Tensor
    envs: th.Tensor
    ep_start: th.Tensor
    step: th.Tensor
    relabelled: th.Tensor
    goal_rows: th.Tensor


def _uniform_ints(upper: th.Tensor, shape: tuple[int, ...], device: th.device) -> th.Tensor:
    """Uniform integers in {0, ..., upper - 1}, ``upper`` a tensor (>= 1): no host value needed."""
    return th.randint(0, RANDOM_RANGE, shape, device=device) % upper


def _draw_slots(view: DeviceReplayView, batch_size: int) -> th.Tensor:
    """(B,) flat slots ``row * n_envs + env``, uniform over the sampleable ones: see the module docstring."""
    device = view.device
    sampleable = view.tensors["sampleable"].reshape(-1)
    candidates = _uniform_ints(view.filled_slots, (CANDIDATE_FACTOR * batch_size + EXTRA_CANDIDATES,), device)
    hit = sampleable[candidates]
    place = th.cumsum(hit, dim=0) - 1  # the rank of each hit among the hits, in draw order
    target = th.where(hit & (place < batch_size), place, batch_size)  # misses and extra hits -> a spare cell
    first_hits = th.zeros(batch_size + 1, dtype=th.int64, device=device).scatter_(0, target, candidates)
    n_hits = hit.sum().clamp(min=1, max=batch_size)
    by_rejection = first_hits[th.arange(batch_size, device=device) % n_hits]
    from_list = view.exact_slots[_uniform_ints(view.exact_count, (batch_size,), device)]
    return th.where(view.use_exact_list.bool(), from_list, by_rejection)


def sample_her_batch(
    view: DeviceReplayView,
    batch_size: int,
    reward_fn: Callable[[th.Tensor, th.Tensor], th.Tensor] | None,
) -> tuple[DictReplayBufferSamples, DeviceSampleIndices]:
    """One HER batch from ``view``, entirely on its device: the equations of the module docstring.

    Returns what ``buffer.sample()`` returns (pixels uint8, each key in its space's dtype, rewards and dones
    ``(B, 1)`` float32) and the indices. ``reward_fn`` may be None only without HER (``n_sampled_goal=0``).
    """
    buffer, device, ring = view.buffer, view.device, view.rows
    tensors = view.tensors
    slots = _draw_slots(view, batch_size)
    rows, envs = slots // view.n_envs, slots % view.n_envs
    ep_start = tensors["ep_start"][rows, envs]
    ep_length = tensors["ep_length"][rows, envs]
    step = (rows - ep_start - 1) % ring  # rows = ep_start + 1 + k

    if buffer.n_sampled_goal > 0:
        relabelled = th.rand(batch_size, device=device) < buffer.her_ratio
    else:
        relabelled = th.zeros(batch_size, dtype=th.bool, device=device)
    strategy = buffer.goal_selection_strategy
    if strategy == GoalSelectionStrategy.FUTURE:  # k <= j <= L - 1, inclusive of k as in SB3
        goal_step = step + _uniform_ints((ep_length - step).clamp(min=1), (batch_size,), device)
    elif strategy == GoalSelectionStrategy.FINAL:
        goal_step = ep_length - 1
    else:  # EPISODE
        goal_step = _uniform_ints(ep_length.clamp(min=1), (batch_size,), device)
    goal_rows = th.where(relabelled, (ep_start + 1 + goal_step) % ring, rows)

    vectors = tensors["vectors"]
    obs_vectors = vectors[(rows - 1) % ring, envs]  # obs(k) is row s + k, next_obs(k) row s + k + 1
    next_vectors = vectors[rows, envs]
    rewards = tensors["rewards"][rows, envs]
    columns = buffer._vector_columns
    if buffer.n_sampled_goal > 0:
        if reward_fn is None:
            raise ValueError("sample_her_batch needs a reward_fn when the buffer relabels goals (n_sampled_goal > 0).")
        achieved, desired = columns["achieved_goal"], columns["desired_goal"]
        new_goals = vectors[goal_rows, envs][:, achieved]
        her = relabelled[:, None]
        obs_vectors = th.cat([obs_vectors[:, : desired.start], th.where(her, new_goals, obs_vectors[:, desired]),
                              obs_vectors[:, desired.stop:]], dim=1)
        next_vectors_relabelled = th.where(her, new_goals, next_vectors[:, desired])
        # r_k = reward(next achieved goal, new goal): s_{k+1} is what action a_k achieved.
        rewards = th.where(relabelled, reward_fn(next_vectors[:, achieved], new_goals), rewards)
        next_vectors = th.cat([next_vectors[:, : desired.start], next_vectors_relabelled,
                               next_vectors[:, desired.stop:]], dim=1)
    dones = tensors["dones"][rows, envs].to(th.float32)
    if buffer.handle_timeout_termination:
        dones = dones * (1.0 - tensors["timeouts"][rows, envs].to(th.float32))  # a time-out is not terminal

    observations = _unpack(buffer, obs_vectors, batch_size)
    next_observations = _unpack(buffer, next_vectors, batch_size)
    if buffer.frame_shape is not None:
        obs_stack, next_stack = _gather_stacks(view, ep_start, step, envs, batch_size)
        if buffer.drq:  # (random_shift_aug without return_shifts returns the images alone)
            obs_stack = cast(th.Tensor, random_shift_aug(obs_stack, buffer.drq_pad))
            # a fresh shift, as the buffer does
            next_stack = cast(th.Tensor, random_shift_aug(next_stack, buffer.drq_pad))
        observations[buffer.pixel_key], next_observations[buffer.pixel_key] = obs_stack, next_stack
    order = list(buffer.observation_space.spaces)
    samples = DictReplayBufferSamples(
        observations={key: observations[key] for key in order},
        actions=tensors["actions"][rows, envs],
        next_observations={key: next_observations[key] for key in order},
        dones=dones.reshape(-1, 1),
        rewards=rewards.to(th.float32).reshape(-1, 1),
    )
    return samples, DeviceSampleIndices(rows, envs, ep_start, step, relabelled, goal_rows)


def _unpack(buffer: FrameStackHerReplayBuffer, packed: th.Tensor, batch_size: int) -> dict[str, th.Tensor]:
    """The buffer's ``_unpack`` in torch: per-key (B, *shape) tensors in each key's dtype."""
    out = {}
    for key, columns in buffer._vector_columns.items():
        space = buffer.observation_space[key]
        assert space.shape is not None, "a packed key is a float Box"
        dtype = th.from_numpy(np.zeros(0, dtype=space.dtype)).dtype
        out[key] = packed[:, columns].reshape(batch_size, *space.shape).to(dtype)
    return out


def _gather_stacks(view: DeviceReplayView, ep_start: th.Tensor, step: th.Tensor, envs: th.Tensor,
                   batch_size: int) -> tuple[th.Tensor, th.Tensor]:
    """(B, 3K, H, W) uint8 obs and next_obs stacks from K + 1 frames: the buffer's ``frame_stack_rows``."""
    buffer = view.buffer
    stack_depth = buffer.frame_stack
    offsets = step[:, None] - stack_depth + 1 + th.arange(stack_depth + 1, device=view.device)
    frame_rows = (ep_start[:, None] + offsets.clamp(min=0)) % view.rows  # (B, K+1), oldest first
    frames = view.tensors["frames"][frame_rows, envs[:, None]]  # (B, K+1, C, H, W)
    assert buffer.frame_shape is not None, "sample_her_batch gathers stacks only from a buffer with frames"
    channels, height, width = buffer.frame_shape
    depth = stack_depth * channels
    return (frames[:, :-1].reshape(batch_size, depth, height, width),
            frames[:, 1:].reshape(batch_size, depth, height, width))


def device_sampler_supported(buffer: Any, vec_normalize: Any, device: th.device) -> str | None:
    """None if ``sample_her_batch`` can serve this buffer on ``device``; else the reason it cannot (one sentence)."""
    if not isinstance(buffer, FrameStackHerReplayBuffer):
        return f"the replay buffer is {type(buffer).__name__}, not FrameStackHerReplayBuffer"
    if device.type != "cpu" and buffer.frames is not None and buffer.storage_device.type == "cpu":
        return "its frames are kept in RAM (storage_device='cpu'), and drawing on the GPU would copy them all there"
    if vec_normalize is not None:
        return "VecNormalize rescales sampled observations on the host"
    if getattr(buffer, "key_arrays", None):  # keys that are not float vectors (ints, extra images)
        return f"the keys {list(buffer.key_arrays)} are stored apart from the float vectors"
    return None
