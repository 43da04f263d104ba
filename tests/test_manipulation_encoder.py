"""manipulation_encoder lab beyond its --verify claims (those run once, in test_labs_cli.py): the pieces the
figures reuse, SpatialSoftmax's errors and temperature, and the extractor on SB3's default path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from stable_baselines3 import SAC, HerReplayBuffer
from stable_baselines3.common.utils import obs_as_tensor

import manipulation_encoder as lab
from pixel_wrapper import PIXEL_KEY, make_fetch_env
from visual_encoder import PIXEL_MAX, PixelScale

BLOB_KEYS = {"layer", "size", "receptive_field", "stride", "footprint", "reached_cells", "changed_cells",
             "max_coverage"}


def test_blob_reach_api_for_figures():
    rows = lab.blob_reach(lab.ManipulationCNN(12))
    assert [row["size"] for row in rows] == [42, 42, 42, 21]
    assert all(set(row) == BLOB_KEYS for row in rows)
    # A list of Conv2d layers, another blob size and a corner position work too.
    convs = [nn.Conv2d(3, 4, kernel_size=8, stride=4)]
    corner = lab.blob_reach(convs, blob_size=3, blob_top_left=0)
    assert corner[0]["reached_cells"] == corner[0]["changed_cells"] == 1


def test_spatial_softmax_rejects_a_mismatched_feature_map():
    with pytest.raises(ValueError, match="dummy forward pass"):
        lab.SpatialSoftmax(32, 21, 21)(torch.zeros(1, 32, 42, 42))


def test_spatial_softmax_temperature_sharpens_keypoints():
    features = torch.zeros(1, 1, 21, 21)
    features[0, 0, 0, 0] = 1.0  # a weak activation in the top-left corner
    warm = lab.SpatialSoftmax(1, 21, 21, temperature=1.0)(features)
    cold = lab.SpatialSoftmax(1, 21, 21, temperature=0.05)(features)
    assert cold[0, 0] < warm[0, 0] < 0  # a low temperature pulls the keypoint towards (-1, -1)
    assert float(cold[0, 0]) < -0.9


def test_sb3_default_path_divides_pixels_once_and_keeps_the_decision(tmp_path: Path, one_torch_thread) -> None:
    """SB3's documented line for a custom extractor, normalize_images left at SB3's default (True): SAC + HER on
    the pixel env trains; every encoder decided at its first batch that SB3 had divided already, so its
    features equal those of the raw uint8 pixels; a saved and reloaded model keeps that decision."""
    env = make_fetch_env("FetchPush-v4")
    try:
        model = SAC("MultiInputPolicy", env, policy_kwargs=dict(features_extractor_class=lab.ManipulationExtractor),
                    replay_buffer_class=HerReplayBuffer, buffer_size=1_000, batch_size=32, learning_starts=100,
                    train_freq=25, seed=0, device="cpu")  # 4 updates in 200 steps: pixel updates are slow on a CPU
        model.learn(200)
        assert model.policy.normalize_images and model.logger.name_to_value["train/n_updates"] == 4
        scales = [m for m in model.policy.modules() if isinstance(m, PixelScale)]
        assert len(scales) == 3  # actor, critic, target critic: one encoder each
        assert [(s.known_divisor, float(s.divisor)) for s in scales] == [(1.0, 1.0)] * 3

        obs, _ = env.reset(seed=1)
        extractor = model.policy.actor.features_extractor
        raw = {key: value[None] for key, value in obs_as_tensor(obs, "cpu").items()}  # uint8 pixels
        with torch.no_grad():
            from_sb3 = model.policy.actor.extract_features(raw, extractor)  # SB3 divides by 255 first
            from_raw = extractor(raw)
        assert from_sb3.shape == (1, 80) and torch.allclose(from_sb3, from_raw, atol=1e-6)
        assert float(model.policy.obs_to_tensor(obs)[0][PIXEL_KEY].max()) > 1  # the env gives 0..255 pixels

        model.save(tmp_path / "default_path.zip")
        loaded = SAC.load(tmp_path / "default_path.zip", env=env, device="cpu")
        loaded_scales = [m for m in loaded.policy.modules() if isinstance(m, PixelScale)]
        assert [s.known_divisor for s in loaded_scales] == [1.0] * 3  # before any batch
    finally:
        env.close()


def test_pixel_scale_waits_for_a_batch_that_can_tell_and_loads_old_checkpoints() -> None:
    """An all-black batch cannot show whether SB3 divided: it decides nothing. A state_dict saved before the
    decision was saved (no divisor) loads, undecided."""
    scale = PixelScale()
    assert torch.equal(scale(torch.zeros(2, 12, 84, 84)), torch.zeros(2, 12, 84, 84)) and scale.known_divisor == 0
    assert float(scale(torch.full((1, 3, 2, 2), 200.0)).max()) == pytest.approx(200.0 / PIXEL_MAX)
    assert scale.known_divisor == PIXEL_MAX
    assert float(scale(torch.full((1, 3, 2, 2), 0.5)).max()) == pytest.approx(0.5 / PIXEL_MAX)  # decided: raw
    old = lab.ManipulationCNN(12)
    state = {k: v for k, v in old.state_dict().items() if not k.endswith("divisor")}
    old.load_state_dict(state)
    assert old.pixel_scale.known_divisor == 0
