"""visual_encoder lab beyond its --verify claims (those run once, in test_labs_cli.py): the errors a user can
cause, and the extractor's key routing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces

import visual_encoder as lab
from pixel_wrapper import pixel_observation_space


def test_extractor_rejects_state_only_space_with_a_clear_message():
    state_space = spaces.Dict({"observation": spaces.Box(-np.inf, np.inf, (25,), np.float32)})
    with pytest.raises(ValueError, match="make_fetch_env"):
        lab.NormalizedCombinedExtractor(state_space)


def test_extractor_rejects_channels_last_pixels():
    space = spaces.Dict({lab.PIXEL_KEY: spaces.Box(0, 255, (84, 84, 12), np.uint8)})
    with pytest.raises(ValueError, match="channels-first"):
        lab.NormalizedCombinedExtractor(space)


def test_pixels_only_space_gives_cnn_features_only():
    space = pixel_observation_space(proprio_dim=0, goal_mode="none")
    extractor = lab.NormalizedCombinedExtractor(space)
    assert extractor.features_dim == lab.NATURE_FEATURES_DIM
    with torch.no_grad():
        out = extractor(lab.fake_observations(space, batch=2))
    assert out.shape == (2, lab.NATURE_FEATURES_DIM)
