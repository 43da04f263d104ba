"""The memory preflight: refuse a replay buffer that cannot fit BEFORE anything is allocated.

NumPy and torch allocate lazily, so a buffer larger than the machine fails only when it fills, hours or
days into a run. ``train`` therefore asks, before any env worker starts, how many bytes the buffer it is
about to build will take and where, and checks each part with the project's one fit check
(``lab_support.check_memory_fits``). Free RAM is the host's, or a container's cgroup limit where that is
smaller (``lab_support.available_memory``), so a buffer is never judged against memory the OOM killer guards.

Where the buffer's arrays live is the buffer class's own decision: a class with a ``memory_plan``
classmethod (``FrameStackHerReplayBuffer``: frames on the training device, the rest in RAM) answers for
itself; SB3's NumPy buffers always live in RAM, and their bytes per transition are measured on a tiny
instance of the real class, so the figure is exact for whatever keys and dtypes the observation has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import BaseBuffer

from lab_support import check_memory_fits, free_memory

PROBE_ROWS = 8
"""Rows per env of the tiny buffer built to measure SB3's bytes per transition."""


@dataclass(frozen=True)
class MemoryNeed:
    """One part of a replay buffer: ``items`` x ``bytes_per_item`` on ``device``."""

    what: str
    """What is stored, e.g. 'replay buffer' or 'replay frames'."""
    items: int
    """How many: transitions for SB3's buffers, rows (one per env step) for the frame-stack buffer."""
    bytes_per_item: int
    """Bytes of one item."""
    device: str
    """Where it lives: 'cpu' (RAM) or a CUDA device such as 'cuda:0'."""
    unit: str = "transitions"
    """What one item is, for the messages."""

    @property
    def total_bytes(self) -> int:
        return self.items * self.bytes_per_item


def array_bytes(value: Any) -> int:
    """Bytes a NumPy array or a torch tensor holds (a dict of them: their sum; anything else: 0)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, th.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, dict):
        return sum(array_bytes(item) for item in value.values())
    return 0


def allocated_bytes_per_transition(buffer: BaseBuffer) -> int:
    """Bytes an SB3 buffer allocated per transition: every array whose first axis is the capacity.

    SB3 keeps ``observations`` and ``next_observations`` separately, each ``(rows, n_envs, ...)``, plus
    actions, rewards, dones, timeouts and (HER) the episode bookkeeping; per-env state is not counted.
    """
    rows = buffer.buffer_size
    per_row = [value for value in vars(buffer).values()
               if isinstance(value, dict) or (isinstance(value, (np.ndarray, th.Tensor))
                                              and value.ndim > 0 and value.shape[0] == rows)]
    return math.ceil(sum(array_bytes(value) for value in per_row) / (rows * buffer.n_envs))


def memory_plan(replay_class: type, replay_kwargs: dict[str, Any], buffer_size: int,
                observation_space: spaces.Space, action_space: spaces.Space, n_envs: int,
                device: str) -> list[MemoryNeed]:
    """The parts of the ``replay_class`` buffer that ``SAC(..., buffer_size=...)`` would allocate."""
    own_plan = getattr(replay_class, "memory_plan", None)
    if own_plan is not None:
        return own_plan(buffer_size, observation_space, action_space, device=device, n_envs=n_envs,
                        **replay_kwargs)
    # SB3's buffers: NumPy arrays in RAM. The probe needs no env (HER uses it only when sampling).
    probe = replay_class(PROBE_ROWS * n_envs, observation_space, action_space, env=None, device="cpu",
                         n_envs=n_envs, **replay_kwargs)
    return [MemoryNeed("replay buffer", buffer_size, allocated_bytes_per_transition(probe), "cpu")]


# --8<-- [start:memory_preflight]
def memory_preflight(plan: Sequence[MemoryNeed]) -> list[dict[str, Any]]:
    """Print what each part of the replay buffer needs and where; refuse,
    in one sentence (``MemoryBudgetError``), a part that cannot fit."""
    report = []
    for need in plan:
        free = free_memory(need.device)  # RAM: the host's, or a cgroup's limit
        print(f"[preflight] {need.what}: {need.items:,} {need.unit} x "
              f"{need.bytes_per_item:,} bytes = "
              f"{need.total_bytes / 1e9:.2f} GB on {need.device} "
              f"({free.bytes_available / 1e9:.1f} GB free: {free.limited_by})")
        check_memory_fits(need.what, need.items, need.bytes_per_item,
                          device=need.device, unit=need.unit, free=free)
        report.append({**asdict(need), "free_bytes": free.bytes_available,
                       "free_limited_by": free.limited_by})
    return report
# --8<-- [end:memory_preflight]
