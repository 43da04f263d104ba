"""DrQ image augmentation for pixel RL: random shifts, applied in the replay buffer at sample time.

The idea (DrQ, Kostrikov, Yarats & Fergus 2020; DrQ-v2, Yarats et al. 2021)
----------------------------------------------------------------------------
A Q-function learned from 84x84 pixels can overfit to exact pixel positions: with a few thousand
images the critic memorises "this arrangement of pixels is worth -18" instead of learning where the
puck is. DrQ regularises it with the cheapest augmentation that keeps the task intact: shift the whole
image by a few pixels. Pad every side by ``pad = 4`` pixels, repeating the border pixels ("replicate"
padding, so no black bars appear), then crop a random 84x84 window back out:

    padded = replicate_pad(x, 4)                          (B, C, 92, 92)
    dy, dx ~ Uniform{-4, ..., +4}, one pair per sample    (81 possible shifts)
    out[b, c, i, j] = padded[b, c, i + 4 + dy, j + 4 + dx]
                    = x[b, c, clamp(i + dy, 0, H-1), clamp(j + dx, 0, W-1)]

The second line is the same operation written without building the padded tensor: replicate padding
followed by a crop is an index clamp. One ``gather`` with a per-sample map of source pixels applies a
different shift to every sample in one batched call, on any device and for any dtype, so uint8 pixels
stay exact integers (an interpolating ``grid_sample`` would not).

Three rules make it work in an RL pipeline:
  1. One shift per sample, shared by all 12 channels (4 stacked RGB frames). Shifting frames
     differently would invent motion that never happened.
  2. Augment at SAMPLE time, not store time. The buffer keeps the raw uint8 frames; every minibatch
     sees fresh shifts of the same data, and the encoder divides by 255 after the shift.
  3. Shift obs and next_obs independently. The TD target r + gamma * Q(s', a') then averages over
     shifts of s' as well as s, which is what smooths the critic. (One shift each per update, as in
     DrQ-v2; the original DrQ also averaged K=2 target and M=2 loss augmentations.)

With HER (``HerDrQDictReplayBuffer``) the two sample-time operations compose: SB3 first relabels the
goal VECTORS (desired_goal <- a future achieved_goal for k/(k+1) of the batch, reward recomputed with
``compute_reward``), then the pixels are shifted. The goal never lives in the image (the pixel wrapper
hides the goal marker), so relabelling cannot contradict what the image shows.

A warning the chapter's DrQ ablation makes concrete: the shift moves every pixel by up to 4 px, and a
SpatialSoftmax head reads pixel COORDINATES, so DrQ adds position noise about the size of the puck
(only a few pixels wide at 84x84). The chapter pairs DrQ with flatten-based encoders (NatureCNN) and
trains ManipulationCNN + SpatialSoftmax with ``--no-drq``.

How to run
----------
    bash docker/dev.sh python scripts/labs/image_augmentation.py --verify

``--verify`` checks the shift on synthetic "coordinate images" (pixel value = its own row or column
index, so the shift can be read off the output), then trains SB3 SAC for a few steps on pixel
FetchPush-v4 with ``HerDrQDictReplayBuffer`` and checks the samples: shapes, uint8 storage, fresh
shifts on every call, HER rewards equal to ``compute_reward``, and the relabelled fraction.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import Any

from cli_guard import guard_entry_point, run_guarded

guard_entry_point(__name__)  # a refused mujoco, a missing package, an early SIGTERM: one line, no traceback

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.buffers import DictReplayBuffer
from stable_baselines3.common.type_aliases import DictReplayBufferSamples
from stable_baselines3.her.her_replay_buffer import HerReplayBuffer

from lab_support import Claim, lab_main
from pixel_wrapper import FRAME_STACK, IMAGE_SIZE, PIXEL_KEY, make_fetch_env, pixel_observation_space

DRQ_PAD = 4
"""Pad (and so the largest shift) in pixels: DrQ's value for 84x84 images, about 5% of the width."""


def _refuse_bad_shift_arguments(x: torch.Tensor, pad: int) -> None:
    """random_shift_aug's argument checks, outside the printed listing."""
    if x.dim() != 4:
        raise ValueError(f"random_shift_aug expects a (B, C, H, W) batch, got shape {tuple(x.shape)}; "
                         "add a batch dimension with x.unsqueeze(0) for a single image.")
    if pad < 0:
        raise ValueError(f"pad must be >= 0 pixels, got {pad}.")


# --8<-- [start:random_shift_aug]
def random_shift_aug(
    x: torch.Tensor,
    pad: int = DRQ_PAD,
    generator: torch.Generator | None = None,
    return_shifts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Shift every image by its own random integer offset, edges repeated.

    DrQ's "replicate-pad by ``pad``, then randomly crop back to H x W",
    written as an index clamp: no padded copy, no interpolation, no Python
    loop over the batch, just one ``gather``.

    | argument / output | shape        | meaning                             |
    |-------------------|--------------|-------------------------------------|
    | x                 | (B, C, H, W) | uint8 or float, any device          |
    | return            | (B, C, H, W) | same dtype and device as x          |
    | shifts (optional) | (B, 2) int64 | (dy, dx) per sample, in [-pad, pad] |

    Output pixel (i, j) of sample b reads input pixel (i + dy_b, j + dx_b),
    clamped to the border, so the picture moves by (-dy_b, -dx_b). All C
    channels of a sample share one shift: the stacked frames of one
    observation must stay aligned, or the shift would fake motion.

    Args:
        x: batch of images, channels first (C = 12 for 4 RGB frames).
        pad: largest shift in pixels (DrQ: 4 for 84x84); 0 returns a copy.
        generator: optional ``torch.Generator`` for reproducible shifts; it
            may live on the CPU while x is on a GPU (the shifts are drawn on
            the generator's device, then moved).
        return_shifts: also return the (B, 2) shifts, for tests and plots.
    """
    _refuse_bad_shift_arguments(x, pad)
    batch, channels, height, width = x.shape
    draw_device = generator.device if generator is not None else x.device
    # One (dy, dx) pair per SAMPLE, never per channel: the stack moves as one.
    shifts = torch.randint(
        -pad, pad + 1, (batch, 2), generator=generator, device=draw_device
    ).to(x.device)

    # Replicate padding + crop == clamping the source coordinate into the
    # image (the border pixel repeats).
    rows = torch.arange(height, device=x.device) + shifts[:, 0:1]  # (B, H)
    cols = torch.arange(width, device=x.device) + shifts[:, 1:2]  # (B, W)
    rows, cols = rows.clamp(0, height - 1), cols.clamp(0, width - 1)
    # One map per sample: output pixel (i, j) reads flat input pixel
    # rows[i] * W + cols[j].
    source = rows[:, :, None] * width + cols[:, None, :]
    source = source.view(batch, 1, height * width)
    # expand() shares the map across all C channels without copying.
    flat = x.reshape(batch, channels, height * width)
    index = source.expand(batch, channels, height * width)
    out = flat.gather(2, index).view(batch, channels, height, width)
    return (out, shifts) if return_shifts else out
# --8<-- [end:random_shift_aug]


# ---------------------------------------------------------------------------------------------------
# Plumbing: constructor argument checks shared by both buffers
# ---------------------------------------------------------------------------------------------------
def _check_pixel_space(observation_space: spaces.Space, pixel_key: str, drq_pad: int) -> None:
    """Fail at construction time, with the fix in the message, instead of deep inside SAC.train()."""
    if not isinstance(observation_space, spaces.Dict) or pixel_key not in observation_space.spaces:
        keys = list(observation_space.spaces) if isinstance(observation_space, spaces.Dict) else observation_space
        raise ValueError(f"DrQ buffers need a Dict observation space with an image under '{pixel_key}', got {keys}; "
                         "build the env with make_fetch_env(..., pixels=True) or pass pixel_key=<your image key>.")
    pixel_space = observation_space.spaces[pixel_key]
    if not (isinstance(pixel_space, spaces.Box) and len(pixel_space.shape) == 3 and pixel_space.dtype == np.uint8):
        raise ValueError(f"observation_space['{pixel_key}'] must be a (C, H, W) uint8 Box, got {pixel_space}; "
                         "store raw uint8 frames (the encoder divides by 255 after the shift).")
    if drq_pad < 0:
        raise ValueError(f"drq_pad must be >= 0 pixels, got {drq_pad}.")


# --8<-- [start:drq_replay_buffer]
def augment_pixel_samples(
    samples: DictReplayBufferSamples,
    pixel_key: str = PIXEL_KEY,
    pad: int = DRQ_PAD,
) -> DictReplayBufferSamples:
    """The batch with obs and next_obs pixels shifted INDEPENDENTLY.

    Every other field is untouched. The pixels are torch tensors on the
    training device already, so the shift runs there (GPU if any), and they
    stay uint8: the encoder divides by 255, after the augmentation.
    """
    obs = dict(samples.observations)
    next_obs = dict(samples.next_observations)
    obs[pixel_key] = random_shift_aug(obs[pixel_key], pad)
    next_obs[pixel_key] = random_shift_aug(next_obs[pixel_key], pad)  # fresh
    return samples._replace(observations=obs, next_observations=next_obs)


class DrQDictReplayBuffer(DictReplayBuffer):
    """SB3 ``DictReplayBuffer``: raw uint8 frames in, DrQ shifts at sampling.

    Use it as ``SAC("MultiInputPolicy", env,
    replay_buffer_class=DrQDictReplayBuffer)``. Sampling the same indices
    twice gives two different shifts of the same stored images: the
    augmentation is a property of the minibatch, never of the data.

    Args:
        *args, **kwargs: passed to SB3's ``DictReplayBuffer`` unchanged.
        pixel_key: key of the (C, H, W) uint8 image in the observation.
        drq_pad: largest shift in pixels.
    """

    def __init__(
        self, *args: Any, pixel_key: str = PIXEL_KEY, drq_pad: int = DRQ_PAD,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        _check_pixel_space(self.observation_space, pixel_key, drq_pad)
        self.pixel_key = pixel_key
        self.drq_pad = drq_pad

    def _get_samples(  # type: ignore[override]
        self, batch_inds: np.ndarray, env: Any = None
    ) -> DictReplayBufferSamples:
        # uint8 copies of the stored frames, then the shift.
        samples = super()._get_samples(batch_inds, env=env)
        return augment_pixel_samples(samples, self.pixel_key, self.drq_pad)
# --8<-- [end:drq_replay_buffer]


# --8<-- [start:her_drq_replay_buffer]
class HerDrQDictReplayBuffer(HerReplayBuffer):
    """SB3 ``HerReplayBuffer`` + DrQ: relabel the goals, then shift pixels.

    Both happen at sample time. Use it exactly like SB3's HER buffer (SAC
    passes ``env`` itself)::

        SAC("MultiInputPolicy", env,
            replay_buffer_class=HerDrQDictReplayBuffer,
            replay_buffer_kwargs=dict(n_sampled_goal=4,
                                      goal_selection_strategy="future"))

    The order is safe because the two operations touch disjoint keys: HER
    rewrites ``desired_goal`` and the reward (``env.compute_reward`` on the
    next achieved_goal), DrQ rewrites only the image. That holds only while
    the goal is NOT drawn into the image (the pixel wrapper hides the goal
    marker); otherwise a relabelled goal vector would contradict the goal
    the picture shows.

    Args:
        *args, **kwargs: passed to SB3's ``HerReplayBuffer`` unchanged.
        pixel_key: key of the (C, H, W) uint8 image in the observation.
        drq_pad: largest shift in pixels.
    """

    def __init__(
        self, *args: Any, pixel_key: str = PIXEL_KEY, drq_pad: int = DRQ_PAD,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        _check_pixel_space(self.observation_space, pixel_key, drq_pad)
        self.pixel_key = pixel_key
        self.drq_pad = drq_pad

    def sample(  # type: ignore[override]
        self, batch_size: int, env: Any = None
    ) -> DictReplayBufferSamples:
        # SB3's HER: the first B - int(k/(k+1) * B) samples are real; the
        # rest get a goal from the same episode's future and a reward
        # recomputed with compute_reward. Storage is never modified.
        samples = super().sample(batch_size, env=env)
        return augment_pixel_samples(samples, self.pixel_key, self.drq_pad)
# --8<-- [end:her_drq_replay_buffer]


# ===================================================================================================
# Checks (--verify)
# ===================================================================================================
N_SHIFT_SAMPLES = 1024
"""Batch for the shift statistics: with 81 equally likely shifts, each appears ~13 times."""
HER_EPISODES = 2
"""Episodes of random actions that fill the HER buffer (50 steps each)."""
EPISODE_STEPS = 50
HER_BUFFER_SIZE = 1_000
"""Larger than the steps collected, so the buffer never wraps during the check."""
HER_SAMPLE_BATCHES = 4
HER_BATCH_SIZE = 256


def coordinate_images(batch: int, frame_stack: int = FRAME_STACK, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(B, 3*frame_stack, size, size) uint8 whose pixel values ARE their coordinates.

    In each RGB frame, channel 0 holds the row index, channel 1 the column index and channel 2 the frame
    number, so after a shift out[0, i, j] - i = dy and out[1, i, j] - j = dx can be read off any interior
    pixel, per frame.
    """
    rows = torch.arange(size, dtype=torch.uint8).view(size, 1).expand(size, size)
    cols = torch.arange(size, dtype=torch.uint8).view(1, size).expand(size, size)
    frames = [torch.stack([rows, cols, torch.full((size, size), k, dtype=torch.uint8)]) for k in range(frame_stack)]
    return torch.cat(frames).unsqueeze(0).repeat(batch, 1, 1, 1)


def read_shifts(out: torch.Tensor, pad: int = DRQ_PAD) -> torch.Tensor:
    """(B, frame_stack, 2) (dy, dx) recovered per frame from shifted coordinate images (centre pixel)."""
    size = out.shape[-1]
    centre = size // 2  # far from the border, so no clamping: value - index = shift
    dy = out[:, 0::3, centre, centre].long() - centre
    dx = out[:, 1::3, centre, centre].long() - centre
    return torch.stack([dy, dx], dim=-1)


def padded_border_repeats_edge(image: torch.Tensor, dy: int, dx: int) -> tuple[bool, int]:
    """Check one shifted (C, H, W) image: are the |dy| rows and |dx| columns that came from the padding
    copies of the first row/column that came from inside the image? Returns (ok, rows + columns checked)."""
    checks = []
    for axis, shift in ((-2, dy), (-1, dx)):
        size = image.shape[axis]
        if shift == 0:
            continue
        # dy < 0: the window hangs over the top, output rows 0..-dy-1 are padding and row -dy is input row 0.
        # dy > 0: it hangs over the bottom, the last dy rows are padding and row H-1-dy is input row H-1.
        padding = torch.arange(-shift) if shift < 0 else torch.arange(size - shift, size)
        edge = -shift if shift < 0 else size - 1 - shift
        checks.append(bool((image.index_select(axis, padding) == image.index_select(axis, torch.tensor([edge]))).all()))
    return all(checks), abs(dy) + abs(dx)


def verify_random_shift() -> list[Claim]:
    """The shift itself, on coordinate images and random images."""
    claims: list[Claim] = []
    generator = torch.Generator().manual_seed(0)
    x = coordinate_images(N_SHIFT_SAMPLES)
    out, shifts = random_shift_aug(x, DRQ_PAD, generator=generator, return_shifts=True)

    claims.append(Claim(
        "shape and dtype preserved: (B, 12, 84, 84) uint8 in -> same out",
        tuple(out.shape) == tuple(x.shape) and out.dtype == torch.uint8 and out.device == x.device,
        f"{tuple(x.shape)} {x.dtype} -> {tuple(out.shape)} {out.dtype}"))

    unshifted = (shifts == 0).all(dim=1)
    changed = (out != x).flatten(1).any(dim=1)
    claims.append(Claim(
        "output != input for every sample with a nonzero shift (and == for shift (0, 0))",
        bool((changed == ~unshifted).all()) and bool(changed.any()),
        f"{int(changed.sum())}/{len(x)} changed, {int(unshifted.sum())} drew (0, 0); expected 1/81 = "
        f"{len(x) / 81:.0f}"))

    claims.append(Claim(
        f"shifts bounded by +/-{DRQ_PAD} px and every one of the {(2 * DRQ_PAD + 1) ** 2} shifts occurs",
        int(shifts.abs().max()) <= DRQ_PAD and len({tuple(s) for s in shifts.tolist()}) == (2 * DRQ_PAD + 1) ** 2,
        f"dy in [{int(shifts[:, 0].min())}, {int(shifts[:, 0].max())}], dx in [{int(shifts[:, 1].min())}, "
        f"{int(shifts[:, 1].max())}], {len({tuple(s) for s in shifts.tolist()})} distinct"))

    per_frame = read_shifts(out)  # (B, 4, 2) shift measured from the pixels of each stacked frame
    same_in_stack = bool((per_frame == per_frame[:, :1]).all())
    matches_reported = bool((per_frame[:, 0] == shifts).all())
    frame_ids_kept = bool((out[:, 2::3] == x[:, 2::3]).all())  # channel 2 of frame k is constant k
    claims.append(Claim(
        "one shift per sample shared by all 4 stacked frames (measured from each frame's pixels)",
        same_in_stack and matches_reported and frame_ids_kept,
        f"{int((per_frame == per_frame[:, :1]).all(dim=(1, 2)).sum())}/{len(x)} samples with 4 equal frame "
        f"shifts; equal to returned shifts: {matches_reported}"))

    # Replicate padding: where the crop window hangs over the image, the padded rows/columns repeat the
    # edge row/column in EVERY channel. (Zero padding would fail this: the column channel would read 0.)
    borders = [padded_border_repeats_edge(out[b], dy, dx) for b, (dy, dx) in enumerate(shifts.tolist())]
    n_borders = sum(n for _, n in borders)
    claims.append(Claim(
        "replicate padding at the edges: every padded row/column equals the image's edge row/column",
        all(ok for ok, _ in borders) and n_borders > 0,
        f"{n_borders} padded rows/columns checked in {len(x)} shifted images, none black"))

    # The clamp formulation is exactly replicate-pad + crop: compare to the textbook version, sample by sample.
    images = torch.randint(0, 256, (64, 3 * FRAME_STACK, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8,
                           generator=generator)
    fast, image_shifts = random_shift_aug(images, DRQ_PAD, generator=generator, return_shifts=True)
    padded = torch.nn.functional.pad(images.float(), (DRQ_PAD,) * 4, mode="replicate")
    reference = torch.stack([
        padded[b, :, DRQ_PAD + dy: DRQ_PAD + dy + IMAGE_SIZE, DRQ_PAD + dx: DRQ_PAD + dx + IMAGE_SIZE]
        for b, (dy, dx) in enumerate(image_shifts.tolist())])
    as_float = random_shift_aug(images.float(), DRQ_PAD, generator=torch.Generator().manual_seed(1))
    again = random_shift_aug(images.float(), DRQ_PAD, generator=torch.Generator().manual_seed(1))
    claims.append(Claim(
        "equals F.pad(mode='replicate') + crop exactly; uint8 stays integer, float works, seeded = reproducible",
        torch.equal(fast.float(), reference) and as_float.dtype == torch.float32 and torch.equal(as_float, again),
        f"max |fast - reference| = {float((fast.float() - reference).abs().max()):.0f} over 64 random images"))
    return claims


def collect_her_model(episodes: int = HER_EPISODES) -> tuple[Any, Any, dict[str, Any]]:
    """Train SAC + HerDrQDictReplayBuffer on pixel FetchPush-v4: random actions fill the buffer, then a few updates.

    The chapter's Step 0 setup: NormalizedCombinedExtractor, whose NatureCNN divides the shifted uint8 pixels by
    255 (so SB3 must not: ``normalize_images=False``). Returns the model, its VecEnv (caller closes it) and
    timing/loss figures.
    """
    from stable_baselines3 import SAC  # local imports: only the checks need the algorithm and an encoder

    from visual_encoder import NormalizedCombinedExtractor

    env = make_fetch_env("FetchPush-v4", pixels=True, goal_mode="both")
    learning_starts = episodes * EPISODE_STEPS
    gradient_steps = 10
    model = SAC(
        "MultiInputPolicy", env, seed=0, device="cpu", buffer_size=HER_BUFFER_SIZE,
        batch_size=16, learning_starts=learning_starts,
        replay_buffer_class=HerDrQDictReplayBuffer,
        replay_buffer_kwargs=dict(n_sampled_goal=4, goal_selection_strategy="future"),
        policy_kwargs=dict(features_extractor_class=NormalizedCombinedExtractor, normalize_images=False),
    )
    start = time.perf_counter()
    model.learn(total_timesteps=learning_starts + gradient_steps)  # SAC acts uniformly at random before learning_starts
    seconds = time.perf_counter() - start
    losses = {k: v for k, v in model.logger.name_to_value.items() if "loss" in k}
    return model, model.get_env(), {"seconds": seconds, "steps": learning_starts + gradient_steps,
                                    "gradient_steps": gradient_steps, "losses": losses}


def copy_transitions(source: DictReplayBuffer, target: DictReplayBuffer) -> None:
    """Copy the filled part of one buffer's storage into another with the same spaces (no env needed)."""
    n = source.buffer_size if source.full else source.pos
    for key in source.observations:
        target.observations[key][:n] = source.observations[key][:n]
        target.next_observations[key][:n] = source.next_observations[key][:n]
    for name in ("actions", "rewards", "dones", "timeouts"):
        getattr(target, name)[:n] = getattr(source, name)[:n]
    target.pos, target.full = n % target.buffer_size, n == target.buffer_size


def verify_drq_buffer(her_buffer: HerReplayBuffer) -> list[Claim]:
    """DrQDictReplayBuffer against a plain DictReplayBuffer holding the same real pixel transitions."""
    n = her_buffer.pos
    kwargs = dict(buffer_size=n, observation_space=her_buffer.observation_space,
                  action_space=her_buffer.action_space, device="cpu")
    drq, plain = DrQDictReplayBuffer(**kwargs), DictReplayBuffer(**kwargs)
    copy_transitions(her_buffer, drq)
    copy_transitions(her_buffer, plain)
    stored_before = drq.observations[PIXEL_KEY].copy()

    indices = np.arange(n)
    first, second, raw = drq._get_samples(indices), drq._get_samples(indices), plain._get_samples(indices)
    claims: list[Claim] = []

    def layout(s: DictReplayBufferSamples) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        fields = [(f"obs/{k}", tuple(v.shape), v.dtype) for k, v in s.observations.items()]
        fields += [(f"next_obs/{k}", tuple(v.shape), v.dtype) for k, v in s.next_observations.items()]
        return fields + [(f, tuple(getattr(s, f).shape), getattr(s, f).dtype) for f in ("actions", "rewards", "dones")]

    claims.append(Claim(
        "DrQ samples have the same keys, shapes and dtypes as a plain DictReplayBuffer's",
        layout(first) == layout(raw),
        f"pixels {tuple(first.observations[PIXEL_KEY].shape)} {first.observations[PIXEL_KEY].dtype}, "
        f"{len(layout(raw))} fields compared"))

    pixel_diff = (first.observations[PIXEL_KEY] != second.observations[PIXEL_KEY]).flatten(1).any(dim=1)
    others_equal = all(torch.equal(first.observations[k], second.observations[k])
                       for k in first.observations if k != PIXEL_KEY) and torch.equal(first.actions, second.actions)
    claims.append(Claim(
        "two samples of the same indices get different shifts; non-pixel fields identical",
        float(pixel_diff.float().mean()) > 0.9 and others_equal,
        f"{int(pixel_diff.sum())}/{n} pixel obs differ between the two calls (P(same shift) = 1/81)"))

    # Independence: store coordinate images as both obs and next_obs, then read each shift off the pixels.
    pixel_only = pixel_observation_space(proprio_dim=0, goal_mode="none")
    coords = DrQDictReplayBuffer(HER_BATCH_SIZE, pixel_only, her_buffer.action_space, device="cpu")
    coords.observations[PIXEL_KEY][:] = coordinate_images(1).numpy()
    coords.next_observations[PIXEL_KEY][:] = coordinate_images(1).numpy()
    coords.full = True
    coord_batch = coords._get_samples(np.arange(HER_BATCH_SIZE))
    obs_shift = read_shifts(coord_batch.observations[PIXEL_KEY])[:, 0]
    next_shift = read_shifts(coord_batch.next_observations[PIXEL_KEY])[:, 0]
    differ = (obs_shift != next_shift).any(dim=1)
    claims.append(Claim(
        "obs and next_obs get independent shifts (read off coordinate images), all within +/-4 px",
        float(differ.float().mean()) > 0.9 and int(torch.cat([obs_shift, next_shift]).abs().max()) <= DRQ_PAD,
        f"{int(differ.sum())}/{HER_BATCH_SIZE} samples with different obs/next_obs shifts (expected 80/81 = "
        f"{80 / 81:.3f})"))

    claims.append(Claim(
        "uint8 storage preserved: buffer arrays stay uint8 and unchanged by sampling; samples stay uint8",
        drq.observations[PIXEL_KEY].dtype == np.uint8 and np.array_equal(drq.observations[PIXEL_KEY], stored_before)
        and first.observations[PIXEL_KEY].dtype == torch.uint8,
        f"{drq.observations[PIXEL_KEY].dtype}, {drq.observations[PIXEL_KEY][0, 0].nbytes:,} bytes per pixel obs"))
    return claims


def moving_goal_buffer(
    source: HerReplayBuffer, vec_env: Any, episodes: int = 4, seed: int = 0
) -> HerDrQDictReplayBuffer:
    """A second HER + DrQ buffer filled through ``add()`` with cheap synthetic episodes in which the puck MOVES.

    Under random actions the real puck rarely moves, so every relabelled goal is "reached" (reward 0) and a
    reward check could not tell a right threshold from a wrong one. Here the achieved goal does a random
    walk (~2 cm per step), so future goals land both inside and outside the 5 cm success radius. Pixels and
    proprioception are real frames copied from ``source``; rewards come from the real env's compute_reward.
    """
    rng = np.random.default_rng(seed)
    compute_reward = vec_env.envs[0].unwrapped.compute_reward
    buffer = HerDrQDictReplayBuffer(episodes * EPISODE_STEPS + 1, source.observation_space, source.action_space,
                                    env=vec_env, device="cpu", n_sampled_goal=4, goal_selection_strategy="future")
    n_source = source.pos
    for _ in range(episodes):
        achieved = rng.uniform([1.2, 0.6, 0.42], [1.4, 0.9, 0.42]).astype(np.float32)
        desired = rng.uniform([1.2, 0.6, 0.42], [1.4, 0.9, 0.42]).astype(np.float32)
        for t in range(EPISODE_STEPS):
            frame = int(rng.integers(n_source))
            next_achieved = (achieved + rng.normal(0.0, 0.02, 3) * [1, 1, 0]).astype(np.float32)
            obs = {k: v[frame] for k, v in source.observations.items()}  # (1, ...) = one env
            next_obs = {k: v[frame] for k, v in source.next_observations.items()}
            obs["achieved_goal"], next_obs["achieved_goal"] = achieved[None], next_achieved[None]
            obs["desired_goal"], next_obs["desired_goal"] = desired[None], desired[None]
            reward = compute_reward(next_achieved, desired, None)
            truncated = t == EPISODE_STEPS - 1
            buffer.add(obs, next_obs, rng.uniform(-1, 1, (1, 4)).astype(np.float32), np.array([reward]),
                       np.array([truncated]), [{"TimeLimit.truncated": truncated}])
            achieved = next_achieved
    return buffer


def her_relabel_stats(buffer: HerReplayBuffer, compute_reward: Any, seed: int = 0) -> dict[str, Any]:
    """Sample HER_SAMPLE_BATCHES batches and check each sample against the stored transition it came from."""
    n = buffer.pos
    stored_actions = buffer.actions[:n, 0]
    stored_goal = buffer.observations["desired_goal"][:n, 0]
    next_achieved = buffer.next_observations["achieved_goal"][:n, 0]
    episode_start, episode_length = buffer.ep_start[:n, 0], buffer.ep_length[:n, 0]

    np.random.seed(seed)  # SB3's HER draws indices and goals with NumPy's global RNG
    relabelled, rewards, future_ok, reward_ok = [], [], True, True
    for _ in range(HER_SAMPLE_BATCHES):
        batch = buffer.sample(HER_BATCH_SIZE)
        # Recover each sample's buffer index from its action (continuous random actions are unique).
        actions = batch.actions.numpy()
        index = np.abs(actions[:, None, :] - stored_actions[None, :, :]).sum(-1).argmin(axis=1)
        goal = batch.observations["desired_goal"].numpy()
        is_relabelled = ~np.isclose(goal, stored_goal[index]).all(axis=1)
        # A relabelled goal must be an achieved goal from the same episode, at or after this step ("future").
        for b in np.flatnonzero(is_relabelled):
            future = np.arange(index[b], episode_start[index[b]] + episode_length[index[b]])
            future_ok &= bool(np.isclose(goal[b], next_achieved[future]).all(axis=1).any())
        expected = compute_reward(batch.next_observations["achieved_goal"].numpy(), goal, None).astype(np.float32)
        reward_ok &= bool(np.array_equal(batch.rewards.numpy().ravel(), expected))
        relabelled.append(is_relabelled)
        rewards.append(expected)
    relabelled, rewards = np.concatenate(relabelled), np.concatenate(rewards)
    return {"total": len(relabelled), "relabelled": relabelled, "future_ok": future_ok, "reward_ok": reward_ok,
            "relabelled_reached": int((rewards[relabelled] == 0).sum()),
            "relabelled_missed": int((rewards[relabelled] < 0).sum())}


def verify_her_buffer(model: Any, vec_env: Any, training: dict[str, Any]) -> list[Claim]:
    """HER relabelling + DrQ in one buffer, against the real FetchPush compute_reward."""
    buffer: HerDrQDictReplayBuffer = model.replay_buffer
    claims: list[Claim] = []
    losses = training["losses"]
    claims.append(Claim(
        "SAC('MultiInputPolicy', pixel FetchPush, replay_buffer_class=HerDrQDictReplayBuffer) trains",
        isinstance(buffer, HerDrQDictReplayBuffer) and len(losses) > 0
        and all(math.isfinite(v) for v in losses.values()),
        f"{training['steps']} env steps + {training['gradient_steps']} updates in {training['seconds']:.1f} s, "
        + ", ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in losses.items())))

    # The raw Fetch env's own vectorised reward, reached directly (not through SB3's env_method call).
    fetch_compute_reward = vec_env.envs[0].unwrapped.compute_reward
    real = her_relabel_stats(buffer, fetch_compute_reward)  # random-action episodes: the puck barely moves
    moving = her_relabel_stats(moving_goal_buffer(buffer, vec_env), fetch_compute_reward)  # it moves ~2 cm/step

    claims.append(Claim(
        "sampled rewards equal the Fetch env's compute_reward(next achieved_goal, sampled desired_goal)",
        real["reward_ok"] and moving["reward_ok"] and moving["relabelled_missed"] > 0,
        f"{real['total'] + moving['total']} samples; relabelled ones reached/missed the goal: real episodes "
        f"{real['relabelled_reached']}/{real['relabelled_missed']}, moving-puck episodes "
        f"{moving['relabelled_reached']}/{moving['relabelled_missed']}"))
    claims.append(Claim(
        "every relabelled goal is an achieved goal from the same episode at or after that step ('future')",
        real["future_ok"] and moving["future_ok"] and real["relabelled"].any(),
        f"{int(real['relabelled'].sum() + moving['relabelled'].sum())} relabelled goals traced to their episode"))

    # Expected fraction p = k/(k+1). If each sample were relabelled independently, the fraction over N samples
    # would have std sqrt(p(1-p)/N); accept 3 std. SB3 2.9.2 splits every batch deterministically
    # (int(p * B) relabelled), so the measured value should sit within 1/B of p, well inside the bound.
    k = buffer.n_sampled_goal
    p = k / (k + 1)
    relabelled = np.concatenate([real["relabelled"], moving["relabelled"]])
    fraction, total = float(relabelled.mean()), len(relabelled)
    bound = 3 * math.sqrt(p * (1 - p) / total)
    claims.append(Claim(
        f"relabelled fraction ~ n_sampled_goal/(n_sampled_goal+1) = {p:.3f} within 3 binomial std",
        abs(fraction - p) <= bound, f"{fraction:.4f} over {total} samples, |diff| = {abs(fraction - p):.4f} "
        f"<= 3 * sqrt(p(1-p)/N) = {bound:.4f}"))

    np.random.seed(1)
    again_a = buffer.sample(HER_BATCH_SIZE)
    np.random.seed(1)
    again_b = buffer.sample(HER_BATCH_SIZE)
    same_goals = torch.equal(again_a.observations["desired_goal"], again_b.observations["desired_goal"]) and \
        torch.equal(again_a.rewards, again_b.rewards)
    pixels_differ = (again_a.observations[PIXEL_KEY] != again_b.observations[PIXEL_KEY]).flatten(1).any(dim=1)
    claims.append(Claim(
        "HER + DrQ: same NumPy seed -> same indices, goals and rewards, but freshly shifted uint8 pixels",
        same_goals and float(pixels_differ.float().mean()) > 0.9
        and again_a.observations[PIXEL_KEY].dtype == torch.uint8 and buffer.observations[PIXEL_KEY].dtype == np.uint8,
        f"{int(pixels_differ.sum())}/{HER_BATCH_SIZE} pixel obs differ, goals/rewards identical: {same_goals}"))
    return claims


def verify() -> list[Claim]:
    """Check every claim of this lab: the shift, the DrQ buffer, HER + DrQ on real pixel transitions."""
    torch.set_num_threads(1)
    claims = verify_random_shift()
    model, vec_env, training = collect_her_model()
    try:
        claims += verify_drq_buffer(model.replay_buffer)
        claims += verify_her_buffer(model, vec_env, training)
    finally:
        vec_env.close()  # explicit close: avoids EGLError noise from mujoco's __del__ at exit
    return claims


def main(argv: Sequence[str] | None = None) -> int:
    return lab_main(__doc__, {"verify": verify}, argv)


if __name__ == "__main__":
    sys.exit(run_guarded(main))
