"""Manipulation encoder lab: a CNN that keeps small objects, and a head that reads *where* they are.

NatureCNN (visual_encoder.py) opens with an 8x8 stride-4 convolution. For Atari that is fine; for
FetchPush it is not: the puck is only a few pixels wide in an 84x84 frame, and after one stride-4 layer
a 5-pixel object spans about one cell of a 20x20 grid. Three ideas fix that:

1. ManipulationCNN -- small 3x3 kernels, stride 2 only twice, padding 1:

       84 --3x3/2--> 42 --3x3/1--> 42 --3x3/1--> 42 --3x3/2--> 21      output (B, 32, 21, 21)

   (DrQ and SAC-AE also use 32-channel 3x3 kernels, with stride 2 once and no padding:
   84 -> 41 -> 39 -> 37 -> 35.)

   A 5-pixel object still spans 2.5 cells per axis after the first layer (5 / stride 2) and 1.25
   after the last, instead of 1.25 and 0.6 for NatureCNN; `blob_reach` measures this layer by layer.

2. SpatialSoftmax (Levine et al. 2016, "End-to-End Training of Deep Visuomotor Policies"): for each
   feature channel c, a softmax over the H x W grid turns the activations into a probability map,
   and its expected pixel coordinate is a keypoint -- "where does feature c fire":

       p_c(i, j) = exp(f_c(i, j) / T) / sum_{i', j'} exp(f_c(i', j') / T)
       x_c = sum_{i, j} p_c(i, j) * X(j),   y_c = sum_{i, j} p_c(i, j) * Y(i),   X, Y in [-1, 1]

   32 channels -> 64 numbers in [-1, 1], no parameters (one, log T, if the temperature is learned).

3. ManipulationExtractor -- the SB3 features extractor the chapter trains with:

       features = [ SpatialSoftmax(ManipulationCNN(pixels)) (64), proprioception (10),
                    achieved_goal (3), desired_goal (3) ]                           = 80

   Like NatureCNN, ManipulationCNN divides the 0..255 pixels by 255 itself (``PixelScale``: at most
   once, also when SB3 divided first), so SAC gets the faster
   ``policy_kwargs=dict(features_extractor_class=ManipulationExtractor, normalize_images=False)``.

Run it:

    bash docker/dev.sh python scripts/labs/manipulation_encoder.py --verify
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from cli_guard import guard_entry_point, run_guarded

guard_entry_point(__name__)  # a refused mujoco, a missing package, an early SIGTERM: one line, no traceback

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3 import SAC, HerReplayBuffer
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

from lab_support import Claim, lab_main
from pixel_wrapper import IMAGE_SIZE, PIXEL_KEY, make_fetch_env, pixel_observation_space
from visual_encoder import (
    NatureCNN,
    PixelScale,
    conv_output_sizes,
    count_parameters,
    fake_observations,
    random_pixels,
    split_observation_keys,
)

CNN_CHANNELS = 32
"""Feature maps per ManipulationCNN layer."""
CNN_STRIDES = (2, 1, 1, 2)
"""Strides of the four 3x3 layers: 84 -> 42 -> 42 -> 42 -> 21."""
FLAT_FEATURES_DIM = 64
"""Width of the flatten + linear head of the --no-spatial-softmax ablation (= 2 x 32 keypoint coordinates)."""
BLOB_SIZE = 5
"""Side, in pixels, of the square test object of blob_reach (the chapter's "5-pixel puck")."""


# ----------------------------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------------------------
# --8<-- [start:spatial_softmax]
class SpatialSoftmax(nn.Module):
    """Feature maps -> one expected (x, y) keypoint per channel: "where".

    | call                      | output             | meaning              |
    |---------------------------|--------------------|----------------------|
    | ss(features (B, C, H, W)) | (B, 2C) in [-1, 1] | (x_0, y_0, x_1, ...) |
    | ss.attention(features)    | (B, C, H*W)        | softmax weights      |

    x runs left -> right, y top -> bottom; each attention row sums to 1, so
    each keypoint is a convex combination of grid coordinates in [-1, 1] and
    lies in [-1, 1] by construction. The temperature T sharpens (T < 1) or
    flattens (T > 1) the softmax; with `learnable_temperature=True` it is
    learned as log T (so T stays positive). ReLU features start near zero,
    which makes the initial softmax almost uniform (every keypoint near the
    centre); the network sharpens it by growing the activations, or faster
    with a learned T.
    """

    def __init__(
        self,
        num_channels: int,
        height: int,
        width: int,
        learnable_temperature: bool = False,
        temperature: float = 1.0,
    ):
        super().__init__()
        self.num_channels, self.height, self.width = num_channels, height, width
        grid_y, grid_x = torch.meshgrid(
            torch.linspace(-1.0, 1.0, height),
            torch.linspace(-1.0, 1.0, width),
            indexing="ij",
        )
        # Derived from the shape: they follow .to(device) but are not saved.
        self.register_buffer("pos_x", grid_x.reshape(-1), persistent=False)
        self.register_buffer("pos_y", grid_y.reshape(-1), persistent=False)
        log_temperature = torch.tensor(math.log(temperature))
        if learnable_temperature:
            self.log_temperature = nn.Parameter(log_temperature)
        else:
            self.register_buffer("log_temperature", log_temperature)

    def attention(self, features: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = features.shape
        expected = (self.num_channels, self.height, self.width)
        if (channels, height, width) != expected:
            raise ValueError(
                f"SpatialSoftmax was built for {expected} feature maps, got "
                f"{tuple(features.shape[1:])}; build it from the CNN's output "
                "shape (a dummy forward pass gives it)."
            )
        flat = features.reshape(batch, channels, height * width)
        return torch.softmax(flat / self.log_temperature.exp(), dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        attention = self.attention(features)  # (B, C, H*W)
        expected_x = (attention * self.pos_x).sum(dim=-1)  # (B, C)
        expected_y = (attention * self.pos_y).sum(dim=-1)
        keypoints = torch.stack([expected_x, expected_y], dim=-1)
        return keypoints.flatten(1)  # (B, 2C)
# --8<-- [end:spatial_softmax]


# --8<-- [start:manipulation_cnn]
class ManipulationCNN(nn.Module):
    """Four 3x3 convolutions that keep a 21x21 map: the right eyes.

    | call                        | output          | input                  |
    |-----------------------------|-----------------|------------------------|
    | ManipulationCNN(12)(pixels) | (B, 32, 21, 21) | (B, 12, 84, 84) 0..255 |

    out = floor((in + 2 * 1 - 3) / stride) + 1:  84 -> 42 -> 42 -> 42 -> 21.
    12 * 32 * 9 + 32 + 3 * (32 * 32 * 9 + 32) parameters for 12 input
    channels (4 stacked RGB frames): tens of times fewer than NatureCNN,
    whose Linear(3136, 512) alone is 3136 * 512 weights.
    """

    def __init__(self, in_channels: int = 12, channels: int = CNN_CHANNELS):
        super().__init__()

        def conv(n_in: int, stride: int) -> nn.Conv2d:
            return nn.Conv2d(n_in, channels, 3, stride=stride, padding=1)

        self.net = nn.Sequential(
            conv(in_channels, CNN_STRIDES[0]), nn.ReLU(),  # 84 -> 42
            conv(channels, CNN_STRIDES[1]), nn.ReLU(),  # 42 -> 42
            conv(channels, CNN_STRIDES[2]), nn.ReLU(),  # 42 -> 42
            conv(channels, CNN_STRIDES[3]), nn.ReLU(),  # 42 -> 21
        )
        self.pixel_scale = PixelScale()  # /255 once, knowing what SB3 did

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(self.pixel_scale(pixels))
# --8<-- [end:manipulation_cnn]


# --8<-- [start:manipulation_extractor]
class ManipulationExtractor(BaseFeaturesExtractor):
    """SB3 features extractor: ManipulationCNN -> SpatialSoftmax ++ vectors.

        SAC("MultiInputPolicy", env, policy_kwargs=dict(
            features_extractor_class=ManipulationExtractor,
            normalize_images=False))  # faster; SB3's default works too

    | input key      | shape           | route                        | out |
    |----------------|-----------------|------------------------------|-----|
    | pixels         | (B, 12, 84, 84) | ManipulationCNN -> keypoints | 64  |
    | proprioception | (B, 10)         | passed through               | 10  |
    | achieved_goal  | (B, 3)          | passed through               | 3   |
    | desired_goal   | (B, 3)          | passed through               | 3   |

    features_dim = 64 + 10 + 3 + 3 = 80 with all four keys; absent keys
    (goal_mode="desired", proprioception=False) are left out and
    features_dim shrinks accordingly.

    `spatial_softmax=False` is the --no-spatial-softmax ablation: the
    keypoint head becomes Flatten -> Linear(32*21*21, 64) -> LayerNorm ->
    tanh (DrQ-v2's trunk). 64 features in [-1, 1], like the 64 keypoint
    coordinates, so features_dim stays 80 and the policy and critic MLPs are
    identical: the ablation changes only *how* the map is summarised ("what"
    vs "where"), at the cost of that large Linear.
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        spatial_softmax: bool = True,
        cnn_channels: int = CNN_CHANNELS,
        flat_features_dim: int = FLAT_FEATURES_DIM,
        learnable_temperature: bool = False,
    ):
        pixel_space, vector_keys = split_observation_keys(observation_space)
        cnn = ManipulationCNN(pixel_space.shape[0], channels=cnn_channels)
        with torch.no_grad():  # a dummy forward pass gives the map shape
            dummy = torch.zeros(1, *pixel_space.shape)
            channels, height, width = cnn(dummy).shape[1:]
        if spatial_softmax:
            head: nn.Module = SpatialSoftmax(
                channels, height, width,
                learnable_temperature=learnable_temperature,
            )
            head_dim = 2 * channels
        else:
            head = nn.Sequential(
                nn.Flatten(),
                nn.Linear(channels * height * width, flat_features_dim),
                nn.LayerNorm(flat_features_dim),
                nn.Tanh(),
            )
            head_dim = flat_features_dim
        vector_dim = sum(observation_space[k].shape[0] for k in vector_keys)
        super().__init__(observation_space, features_dim=head_dim + vector_dim)
        self.cnn, self.head, self.vector_keys = cnn, head, vector_keys

    def forward(self, observations: Mapping[str, torch.Tensor]) -> torch.Tensor:
        image_features = self.head(self.cnn(observations[PIXEL_KEY]))
        vectors = [observations[key] for key in self.vector_keys]
        return torch.cat([image_features, *vectors], dim=1)
# --8<-- [end:manipulation_extractor]


# --8<-- [start:blob_reach]
def blob_reach(
    layers: nn.Module | Sequence[nn.Conv2d],
    image_size: int = IMAGE_SIZE,
    blob_size: int = BLOB_SIZE,
    blob_top_left: int | None = None,
) -> list[dict]:
    """How a blob_size x blob_size object shows up in every conv layer.

    The blob sits at (blob_top_left, blob_top_left), by default the image
    centre (pixels 39-43 of 84). One dict per Conv2d, in order:

    | key             | meaning                                               |
    |-----------------|-------------------------------------------------------|
    | layer           | "conv2 4x4/2": position, kernel, stride               |
    | size            | side of the layer's output grid                       |
    | receptive_field | side, in input pixels, of the window one cell sees    |
    | stride          | input pixels between neighbouring cells               |
    | footprint       | blob_size / stride: cells per axis the object spans   |
    | reached_cells   | cells whose window overlaps the blob                  |
    | changed_cells   | cells that change when the blob is drawn on black,    |
    |                 | all weights 1/fan_in, no bias: checks reached_cells   |
    | max_coverage    | largest share of one cell's window the blob fills     |

    `footprint` is what the chapter rounds to "~1 cell" vs "~3 cells";
    `max_coverage` says how much the object dominates the best cell's view
    instead of being averaged away. Pass an encoder (its Conv2d layers in
    order) or a list.
    """
    if isinstance(layers, nn.Module):
        convs = [m for m in layers.modules() if isinstance(m, nn.Conv2d)]
    else:
        convs = list(layers)
    centred = (image_size - blob_size) // 2
    first = centred if blob_top_left is None else blob_top_left
    last = first + blob_size - 1  # inclusive pixel range, same on both axes
    image = torch.zeros(1, convs[0].in_channels, image_size, image_size)
    image[..., first : last + 1, first : last + 1] = 1.0

    rows, activation = [], image
    # One input pixel "sees" itself: window 1, stride 1, starting at pixel 0.
    receptive_field, stride, window_first, size = 1, 1, 0, image_size
    for index, conv in enumerate(convs, start=1):
        (kernel, _), (step, _) = conv.kernel_size, conv.stride
        padding = conv.padding
        if isinstance(padding, str) or conv.dilation != (1, 1):
            raise ValueError("blob_reach handles Conv2d layers with integer "
                             "padding and no dilation.")
        window_first -= padding[0] * stride  # padding starts off the image
        receptive_field += (kernel - 1) * stride
        stride *= step
        size = (size + 2 * padding[0] - kernel) // step + 1
        # Cell i sees pixels [starts[i], starts[i] + receptive_field - 1].
        starts = window_first + stride * np.arange(size)
        ends = starts + receptive_field - 1
        overlap = np.minimum(ends, last) - np.maximum(starts, first) + 1
        overlap = np.clip(overlap, 0, None)

        # Positive weights: a cell changes exactly when the blob is in view.
        with torch.no_grad():
            weight = torch.full_like(conv.weight, 1.0 / conv.weight[0].numel())
            activation = F.conv2d(
                activation, weight, None, conv.stride, conv.padding
            ).relu()
        rows.append(
            {
                "layer": f"conv{index} {kernel}x{kernel}/{step}",
                "size": size,
                "receptive_field": receptive_field,
                "stride": stride,
                "footprint": blob_size / stride,
                "reached_cells": int((overlap > 0).sum()) ** 2,
                "changed_cells": int((activation[0].amax(dim=0) > 0).sum()),
                "max_coverage": float(overlap.max()) ** 2 / receptive_field**2,
            }
        )
    return rows
# --8<-- [end:blob_reach]


def format_blob_table(rows_by_encoder: Mapping[str, list[dict]], blob_size: int = BLOB_SIZE) -> str:
    """blob_reach results as a plain-text table, one line per layer."""
    lines = [
        f"A {blob_size}x{blob_size} blob at the image centre, layer by layer:",
        f"  {'encoder':<16}{'layer':<14}{'grid':>7}{'RF px':>7}{'stride':>8}{'footprint/axis':>16}"
        f"{'reached':>9}{'changed':>9}{'max RF coverage':>17}",
    ]
    for encoder, rows in rows_by_encoder.items():
        for row in rows:
            lines.append(
                f"  {encoder:<16}{row['layer']:<14}{row['size']:>4}^2 {row['receptive_field']:>6}"
                f"{row['stride']:>8}{row['footprint']:>16.2f}{row['reached_cells']:>9}{row['changed_cells']:>9}"
                f"{row['max_coverage']:>17.1%}"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Checks (--verify)
# ----------------------------------------------------------------------------------------------
BATCH = 4
"""Batch size of the shape checks."""
SB3_LEARN_STEPS = 60
"""Env steps of the SB3 smoke run: past the first 50-step episode, which HER needs before sampling."""


def check_manipulation_cnn() -> list[Claim]:
    cnn = ManipulationCNN(12)
    pixels = random_pixels(BATCH)
    sizes = conv_output_sizes(cnn, pixels)
    with torch.no_grad():
        maps = cnn(pixels)
    n_params, n_single_frame = count_parameters(cnn), count_parameters(ManipulationCNN(3))
    n_nature = count_parameters(NatureCNN(12))
    return [
        Claim(
            "ManipulationCNN: (B, 12, 84, 84) -> (B, 32, 21, 21) finite, spatial 84 -> 42 -> 42 -> 42 -> 21",
            sizes == [42, 42, 42, 21] and tuple(maps.shape) == (BATCH, 32, 21, 21) and bool(torch.isfinite(maps).all()),
            f"sizes 84 -> {' -> '.join(map(str, sizes))}, output {tuple(maps.shape)}",
        ),
        Claim(
            "ManipulationCNN has 12*32*9 + 32 + 3*(32*32*9 + 32) parameters, over 20x fewer than NatureCNN",
            n_params == 12 * 32 * 9 + 32 + 3 * (32 * 32 * 9 + 32) and n_nature > 20 * n_params,
            f"{n_params:,} with 12 input channels ({n_single_frame:,} with 3); NatureCNN {n_nature:,} = "
            f"{n_nature / n_params:.0f}x more",
        ),
    ]


def check_spatial_softmax() -> list[Claim]:
    generator = torch.Generator().manual_seed(0)
    softmax = SpatialSoftmax(32, 21, 21)
    features = 3.0 * torch.randn(BATCH, 32, 21, 21, generator=generator)
    keypoints = softmax(features)
    weight_sums = softmax.attention(features).sum(dim=-1)
    sum_err = float((weight_sums - 1).abs().max())

    # A single hot spot at (row 5, col 15) of a 21x21 map must land at x = -1 + 2*15/20 = 0.5, y = -0.5.
    spike = torch.zeros(1, 32, 21, 21)
    spike[:, :, 5, 15] = 50.0
    spike_xy = softmax(spike).reshape(32, 2)
    spike_err = float((spike_xy - torch.tensor([0.5, -0.5])).abs().max())

    # Gradient flows through the keypoints back into every CNN layer and into a learned temperature.
    cnn, learned = ManipulationCNN(12), SpatialSoftmax(32, 21, 21, learnable_temperature=True)
    loss = learned(cnn(random_pixels(BATCH, seed=1))).square().sum()
    loss.backward()
    conv_grads = [float(m.weight.grad.norm()) for m in cnn.modules() if isinstance(m, nn.Conv2d)]
    temperature_grad = float(learned.log_temperature.grad.abs())
    return [
        Claim(
            "SpatialSoftmax: (B, 32, 21, 21) -> (B, 64), every coordinate in [-1, 1]",
            tuple(keypoints.shape) == (BATCH, 64) and bool((keypoints.abs() <= 1).all()),
            f"output {tuple(keypoints.shape)}, range [{float(keypoints.min()):.3f}, {float(keypoints.max()):.3f}]",
        ),
        Claim("softmax weights sum to 1 over H x W for every channel", sum_err < 1e-5,
              f"max |sum - 1| {sum_err:.1e} over {weight_sums.numel()} channels"),
        Claim("a single hot spot at (row 5, col 15) gives keypoint (x, y) = (0.5, -0.5): it reads 'where'",
              spike_err < 1e-3, f"max error {spike_err:.1e}"),
        Claim("gradient flows through SpatialSoftmax into all 4 conv layers and the learned temperature",
              len(conv_grads) == 4 and min(conv_grads) > 0 and temperature_grad > 0,
              f"conv weight grad norms {', '.join(f'{g:.2e}' for g in conv_grads)}; d/d log T {temperature_grad:.2e}"),
    ]


def check_extractor() -> list[Claim]:
    space = pixel_observation_space()
    extractor = ManipulationExtractor(space)
    obs = fake_observations(space)
    with torch.no_grad():
        features = extractor(obs)
    vectors = torch.cat([obs["proprioception"], obs["achieved_goal"], obs["desired_goal"]], dim=1)
    passthrough = torch.equal(features[:, 64:], vectors)

    subsets = {  # name: (pixel_observation_space arguments, expected features_dim)
        "pixels+desired": (dict(proprio_dim=0, goal_mode="desired"), 67),
        "pixels+goals": (dict(proprio_dim=0, goal_mode="both"), 70),
        "pixels only": (dict(proprio_dim=0, goal_mode="none"), 64),
    }
    routed = {}
    for name, (space_kwargs, expected) in subsets.items():
        sub_space = pixel_observation_space(**space_kwargs)
        sub_extractor = ManipulationExtractor(sub_space)
        with torch.no_grad():
            out = sub_extractor(fake_observations(sub_space))
        routed[name] = (sub_extractor.features_dim, tuple(out.shape) == (BATCH, sub_extractor.features_dim), expected)

    flat = ManipulationExtractor(space, spatial_softmax=False)
    with torch.no_grad():
        flat_features = flat(obs)
    return [
        Claim(
            "ManipulationExtractor: features_dim 80 = 64 keypoints + 10 proprio + 3 ag + 3 dg; (B, 80) finite",
            extractor.features_dim == 80 and tuple(features.shape) == (BATCH, 80)
            and bool(torch.isfinite(features).all()) and passthrough,
            f"features_dim {extractor.features_dim}, output {tuple(features.shape)}, vectors passed through: "
            f"{passthrough}",
        ),
        Claim(
            "the extractor routes whichever keys are present",
            all(dim == expected and shape_ok for dim, shape_ok, expected in routed.values()),
            ", ".join(f"{name} -> {dim}" for name, (dim, _, _) in routed.items()),
        ),
        Claim(
            "spatial_softmax=False (flatten + linear ablation) keeps features_dim 80, finite",
            flat.features_dim == 80 and tuple(flat_features.shape) == (BATCH, 80)
            and bool(torch.isfinite(flat_features).all()),
            f"head {count_parameters(flat.head):,} params vs SpatialSoftmax {count_parameters(extractor.head)}",
        ),
    ]


def check_blob_reach() -> tuple[list[Claim], str]:
    nature = blob_reach(NatureCNN(12))
    manipulation = blob_reach(ManipulationCNN(12))
    table = format_blob_table({"NatureCNN": nature, "ManipulationCNN": manipulation})
    consistent = all(row["reached_cells"] == row["changed_cells"] for row in nature + manipulation)
    return [
        Claim(
            f"a {BLOB_SIZE}-pixel object spans about 1 cell per axis after NatureCNN layer 1, at least 2 after "
            "ManipulationCNN layer 1",
            nature[0]["footprint"] < 1.5 and manipulation[0]["footprint"] >= 2.0,
            f"{nature[0]['footprint']:.2f} vs {manipulation[0]['footprint']:.2f} cells per axis "
            f"(grids {nature[0]['size']}^2 vs {manipulation[0]['size']}^2)",
        ),
        Claim(
            "after the last conv the object still fills more of a ManipulationCNN cell's view than a NatureCNN cell's",
            manipulation[-1]["max_coverage"] > 2 * nature[-1]["max_coverage"],
            f"{manipulation[-1]['max_coverage']:.1%} of a {manipulation[-1]['receptive_field']}px window vs "
            f"{nature[-1]['max_coverage']:.1%} of a {nature[-1]['receptive_field']}px window",
        ),
        Claim(
            "receptive-field arithmetic agrees with the measured change in every layer (cells reached)",
            consistent,
            "NatureCNN " + "/".join(str(r["changed_cells"]) for r in nature)
            + ", ManipulationCNN " + "/".join(str(r["changed_cells"]) for r in manipulation),
        ),
    ], table


def check_sb3_sac(learn_steps: int = SB3_LEARN_STEPS) -> list[Claim]:
    """SB3 SAC + HER with ManipulationExtractor on the real pixel env: builds, learns a few steps."""
    env = make_fetch_env()
    try:
        model = SAC(
            "MultiInputPolicy", env, replay_buffer_class=HerReplayBuffer,
            replay_buffer_kwargs=dict(n_sampled_goal=4, goal_selection_strategy="future"),
            buffer_size=200, batch_size=8, learning_starts=learn_steps - 5,
            policy_kwargs=dict(features_extractor_class=ManipulationExtractor, normalize_images=False,
                               net_arch=[64, 64]),
            seed=0, device="cpu",
        )
        encoder_before = [p.detach().clone() for p in model.critic.features_extractor.parameters()]
        model.learn(total_timesteps=learn_steps)
        encoder_after = model.critic.features_extractor.parameters()
        encoder_moved = any(not torch.equal(a, b) for a, b in zip(encoder_before, encoder_after))
        critic_loss = model.logger.name_to_value.get("train/critic_loss", float("nan"))
        extractors = {type(model.actor.features_extractor).__name__, type(model.critic.features_extractor).__name__}
    finally:
        env.close()
    return [
        Claim(
            "SB3 SAC('MultiInputPolicy') + HER accepts ManipulationExtractor on the pixel env and trains",
            extractors == {"ManipulationExtractor"} and math.isfinite(critic_loss) and encoder_moved,
            f"{learn_steps} env steps, {model._n_updates} updates, critic_loss {critic_loss:.3f}, critic encoder "
            f"updated {encoder_moved}",
        )
    ]


def verify() -> list[Claim]:
    """Check every claim of this lab, in the order the chapter makes them (and print the blob table)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    blob_claims, table = check_blob_reach()
    print(table)
    return [*check_manipulation_cnn(), *check_spatial_softmax(), *check_extractor(), *blob_claims, *check_sb3_sac()]


def main(argv: Sequence[str] | None = None) -> int:
    return lab_main(__doc__, {"verify": verify}, argv)


if __name__ == "__main__":
    raise SystemExit(run_guarded(main))
