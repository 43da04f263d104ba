"""visual_encoder lab: the --verify claims in-process (the command line: test_labs_cli.py), and the errors a user can cause."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from gymnasium import spaces

import visual_encoder as lab


def test_verify_claims_pass():
    claims = lab.verify()
    assert len(claims) >= 10
    failed = [f"{claim.name}: {claim.detail}" for claim in claims if not claim.passed]
    assert not failed, "\n".join(failed)


def test_extractor_rejects_state_only_space_with_a_clear_message():
    state_space = spaces.Dict({"observation": spaces.Box(-np.inf, np.inf, (25,), np.float32)})
    with pytest.raises(ValueError, match="make_fetch_env"):
        lab.NormalizedCombinedExtractor(state_space)


def test_extractor_rejects_channels_last_pixels():
    space = spaces.Dict({lab.PIXEL_KEY: spaces.Box(0, 255, (84, 84, 12), np.uint8)})
    with pytest.raises(ValueError, match="channels-first"):
        lab.NormalizedCombinedExtractor(space)


def test_pixels_only_space_gives_cnn_features_only():
    space = lab.pixel_dict_space((lab.PIXEL_KEY,))
    extractor = lab.NormalizedCombinedExtractor(space)
    assert extractor.features_dim == lab.NATURE_FEATURES_DIM
    with torch.no_grad():
        out = extractor(lab.fake_observations(space, batch=2))
    assert out.shape == (2, lab.NATURE_FEATURES_DIM)


def test_nature_cnn_accepts_uint8_and_float_pixels_alike():
    cnn = lab.NatureCNN(12).eval()
    pixels = torch.randint(0, 256, (2, 12, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(cnn(pixels), cnn(pixels.float() / 255.0))
