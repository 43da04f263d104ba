"""Tests for scripts/labs/image_augmentation.py (DrQ random shifts and the DrQ / HER+DrQ replay buffers).

The lab's claims run once, as its `--verify` command line, in tests/test_labs_cli.py. These tests cover behaviour
the claims do not: device- and dtype-agnostic shifting, and the one-sentence errors.
"""

import numpy as np
import pytest
import torch
from gymnasium import spaces

from image_augmentation import DrQDictReplayBuffer, HerDrQDictReplayBuffer, random_shift_aug
from pixel_wrapper import pixel_observation_space


def test_shift_creates_every_tensor_on_the_input_device():
    # The "meta" device has no data: any tensor the function built on a hard-coded device (e.g. the CPU)
    # would fail to combine with it. Passing here is what lets the same code run on a GPU unchanged.
    x = torch.empty(8, 12, 84, 84, dtype=torch.uint8, device="meta")
    out, shifts = random_shift_aug(x, return_shifts=True)
    assert out.device.type == "meta" and shifts.device.type == "meta"
    assert out.shape == x.shape and out.dtype == torch.uint8


def test_cpu_generator_works_for_an_input_on_another_device():
    # A seeded CPU generator is the common way to make GPU augmentation reproducible across machines.
    x = torch.empty(8, 12, 84, 84, device="meta")
    out, shifts = random_shift_aug(x, generator=torch.Generator().manual_seed(0), return_shifts=True)
    assert out.device.type == "meta" and shifts.device.type == "meta" and out.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32, torch.float64])
def test_shift_keeps_dtype_and_values(dtype):
    x = torch.randint(0, 256, (4, 6, 16, 16)).to(dtype)
    out = random_shift_aug(x, pad=2, generator=torch.Generator().manual_seed(0))
    assert out.dtype == dtype
    # A shift only moves pixels around: every output value already existed in the same sample.
    for sample_in, sample_out in zip(x, out):
        assert set(sample_out.unique().tolist()) <= set(sample_in.unique().tolist())


def test_non_contiguous_input_gives_the_same_result():
    x = torch.randint(0, 256, (4, 12, 20, 20), dtype=torch.uint8)
    channels_last = x.to(memory_format=torch.channels_last)
    a = random_shift_aug(x, generator=torch.Generator().manual_seed(3))
    b = random_shift_aug(channels_last, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_zero_pad_is_the_identity():
    x = torch.randint(0, 256, (3, 12, 10, 10), dtype=torch.uint8)
    assert torch.equal(random_shift_aug(x, pad=0), x)


@pytest.mark.parametrize("bad_input, pad, message", [
    (torch.zeros(12, 84, 84), 4, "batch"),
    (torch.zeros(2, 12, 84, 84), -1, "pad"),
])
def test_shift_rejects_bad_arguments_with_a_clear_message(bad_input, pad, message):
    with pytest.raises(ValueError, match=message):
        random_shift_aug(bad_input, pad=pad)


def _dict_space(pixel_dtype=np.uint8, pixel_key="pixels"):
    """The pixel env's space (goals, no proprioception), with the image's dtype or key changed."""
    entries = dict(pixel_observation_space(proprio_dim=0).spaces)
    pixels = entries.pop("pixels")
    return spaces.Dict({pixel_key: spaces.Box(0, 255, pixels.shape, pixel_dtype), **entries})


ACTION_SPACE = spaces.Box(-1, 1, (4,), np.float32)


@pytest.mark.parametrize("space, message", [
    (_dict_space(pixel_dtype=np.float32), "uint8"),
    (_dict_space(pixel_key="image"), "pixel_key"),
])
def test_buffers_reject_spaces_without_uint8_pixels(space, message):
    with pytest.raises(ValueError, match=message):
        DrQDictReplayBuffer(4, space, ACTION_SPACE, device="cpu")
    with pytest.raises(ValueError, match=message):
        HerDrQDictReplayBuffer(4, space, ACTION_SPACE, env=None, device="cpu")


def test_buffers_accept_a_custom_pixel_key_and_pad():
    space = _dict_space(pixel_key="image")
    buffer = DrQDictReplayBuffer(4, space, ACTION_SPACE, device="cpu", pixel_key="image", drq_pad=2)
    her = HerDrQDictReplayBuffer(4, space, ACTION_SPACE, env=None, device="cpu", pixel_key="image", drq_pad=2,
                                 n_sampled_goal=8)
    assert (buffer.pixel_key, buffer.drq_pad) == ("image", 2)
    assert (her.pixel_key, her.drq_pad, her.n_sampled_goal) == ("image", 2, 8)
