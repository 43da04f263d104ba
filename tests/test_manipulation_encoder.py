"""manipulation_encoder lab beyond its --verify claims (those run once, in test_labs_cli.py): the pieces the
figures reuse, and SpatialSoftmax's errors and temperature."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import manipulation_encoder as lab

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
