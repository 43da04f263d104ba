"""Visual encoder lab: the NatureCNN baseline and the networks of a visual SAC agent.

A pixel agent must turn a stack of camera frames into a feature vector before any SAC maths can
happen. This lab builds the obvious encoder first -- DQN's NatureCNN (Mnih et al. 2015), which is
also what stable-baselines3 uses by default for images -- and the small networks of a from-scratch
visual SAC agent:

    component                       call                                  output
    ------------------------------  ------------------------------------  -------------------------
    NatureCNN                       cnn(pixels (B, 12, 84, 84))           (B, 512)
    NormalizedCombinedExtractor     extractor(obs dict)   [SB3 extractor] (B, 512 + 16)
    VisualGoalEncoder               encoder(pixels, vectors (B, 16))      (B, 50 + 16)
    VisualGaussianPolicy            policy(pixels, vectors)               action (B, 4), log_prob (B,)
    VisualTwinQNetwork              q(pixels, vectors, action)            q1 (B,), q2 (B,)

Pixels arrive as stored, values 0..255 (uint8 from our buffers, or the same values as float after SB3's
cast), and the CNN divides by 255 itself: ONE conversion, inside the encoder, as in DrQ-v2. Every SAC of
the project passes ``policy_kwargs=dict(normalize_images=False)``, so SB3 only casts (faster). Left at SB3's
default, SB3 divides first; ``PixelScale`` sees that at the first batch and does not divide again.

NatureCNN's spatial arithmetic (no padding): out = floor((in - kernel) / stride) + 1

    84 --8x8/4--> 20 --4x4/2--> 9 --3x3/1--> 7;   64 channels x 7 x 7 = 3136 --Linear--> 512

The first layer looks at the image through 8x8 windows every 4 pixels, so a 5-pixel puck shrinks to
about one cell of a 20x20 grid. `manipulation_encoder.py` measures that and builds the fix. Almost all
of NatureCNN's parameters sit in the final Linear(3136, 512) (``--verify`` counts them), which must
learn *where* things are from a flattened grid.

Squashed Gaussian policy (SAC, Haarnoja et al. 2018, appendix C). Sample u, squash it into [-1, 1]:

    u ~ N(mu(s), sigma(s)^2),   a = tanh(u)
    log pi(a|s) = sum_i [ log N(u_i; mu_i, sigma_i) - log(1 - tanh(u_i)^2) ]

The change-of-variables term is computed in the numerically stable form

    log(1 - tanh(u)^2) = 2 * (log 2 - u - softplus(-2u))

which never takes log(0) when tanh(u) rounds to +-1 in float32 (|u| > ~9); the common
`log(1 - tanh(u)^2 + 1e-6)` shortcut drifts from the true value once tanh saturates (``--verify``
prints by how much, on log-probs of 4-D actions with |u| up to 8). FetchPush actions live in
[-1, 1]^4, so tanh(u) needs no rescaling.

Run it:

    bash docker/dev.sh python scripts/labs/visual_encoder.py --verify
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cli_guard import guard_entry_point, run_guarded

guard_entry_point(__name__)  # a refused mujoco, a missing package, an early SIGTERM: one line, no traceback

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3 import SAC
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, create_mlp
from stable_baselines3.sac.policies import LOG_STD_MAX, LOG_STD_MIN

from lab_support import Claim, lab_main
from pixel_wrapper import IMAGE_SIZE, PIXEL_KEY, make_fetch_env, pixel_observation_space

VECTOR_KEYS = ("proprioception", "achieved_goal", "desired_goal")
"""Vector entries in the order the extractors concatenate them (each used only when present)."""
NATURE_FEATURES_DIM = 512
"""NatureCNN's output width (Mnih et al. 2015)."""
TRUNK_LATENT_DIM = 50
"""Width of the image latent in VisualGoalEncoder (DrQ / DrQ-v2 use 50)."""
NORMALIZER_CLIP = 5.0
"""Normalised vector entries are clipped to +-this many running standard deviations."""
PIXEL_MAX = 255.0
"""Largest pixel value of a uint8 frame: the encoders divide by it."""


# ----------------------------------------------------------------------------------------------
# Plumbing shared by the extractors: uint8 -> float, and which dict keys go where
# ----------------------------------------------------------------------------------------------
# --8<-- [start:pixel_scale]
class PixelScale(nn.Module):
    """Pixels -> float32 in [0, 1], divided by 255 at most once.

    uint8 pixels (our buffers) are divided. Float pixels come from SB3's
    preprocessing: only cast (normalize_images=False, the recommended and
    faster setting: one division, here) or already divided (SB3's default,
    normalize_images=True). The first batch that is not all black decides
    which: a real frame has bright pixels, so float pixels that all lie in
    [0, 1] were divided already. The decision is a buffer, saved with the
    model, so a loaded model scales its input as the trained one did.
    """

    def __init__(self) -> None:
        super().__init__()
        # 0: not decided yet; 255: raw 0..255 pixels; 1: SB3 divided them
        self.register_buffer("divisor", torch.zeros(()))
        self.known_divisor = 0.0  # the buffer's value, read without a sync

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype == torch.uint8:  # as stored: never divided
            return pixels.float() / PIXEL_MAX
        if not self.known_divisor:
            self.decide(pixels)
        return pixels.float() / (self.known_divisor or PIXEL_MAX)

    def decide(self, pixels: torch.Tensor) -> None:
        brightest = float(pixels.max())
        if brightest > 0.0:  # an all-black batch cannot tell: wait
            self.known_divisor = 1.0 if brightest <= 1.0 else PIXEL_MAX
            self.divisor.fill_(self.known_divisor)

    def _load_from_state_dict(self, state_dict: dict, prefix: str,
                              *args: Any) -> None:
        # A checkpoint saved before the decision was: decide on a batch.
        state_dict.setdefault(prefix + "divisor", torch.zeros(()))
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.known_divisor = float(self.divisor)
# --8<-- [end:pixel_scale]


def split_observation_keys(observation_space: spaces.Dict) -> tuple[spaces.Box, tuple[str, ...]]:
    """Return the "pixels" Box and the names of the 1-D vector entries, in concatenation order.

    Known vector keys come first in VECTOR_KEYS order, any other 1-D Box after them in the space's
    own order, so `goal_mode="desired"` or `proprioception=False` observations just work.
    """
    if not isinstance(observation_space, spaces.Dict) or PIXEL_KEY not in observation_space.spaces:
        raise ValueError(
            f"This extractor needs a Dict observation space with a {PIXEL_KEY!r} entry, got {observation_space}; "
            "build the env with pixel_wrapper.make_fetch_env(pixels=True) (state-only envs use SB3's "
            "CombinedExtractor)."
        )
    pixel_space = observation_space[PIXEL_KEY]
    shape = pixel_space.shape if isinstance(pixel_space, spaces.Box) else ()
    if len(shape) != 3 or shape[0] >= shape[1]:
        raise ValueError(
            f"{PIXEL_KEY!r} must be a channels-first (C, H, W) Box, got {pixel_space}; "
            "PixelObservationWrapper produces (3 * frame_stack, 84, 84) uint8."
        )
    others = [key for key in observation_space.spaces if key != PIXEL_KEY]
    for key in others:
        space = observation_space[key]
        if not (isinstance(space, spaces.Box) and len(space.shape) == 1):
            raise ValueError(f"Observation entry {key!r} must be a 1-D Box to be concatenated, got {space}.")
    ordered = [key for key in VECTOR_KEYS if key in others] + [key for key in others if key not in VECTOR_KEYS]
    return pixel_space, tuple(ordered)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable scalars in `module`."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------------------------
# --8<-- [start:nature_cnn]
class NatureCNN(nn.Module):
    """DQN's Atari encoder (Mnih et al. 2015): wrong eyes for manipulation.

    | call                  | output   | input                             |
    |-----------------------|----------|-----------------------------------|
    | NatureCNN(12)(pixels) | (B, 512) | pixels (B, 12, 84, 84), 0..255    |

    Spatial progression 84 -> 20 -> 9 -> 7. The 8x8 stride-4 first layer is
    built for Atari sprites tens of pixels wide; a 5-pixel puck ends up as
    about one cell of its 20x20 output. Takes the channel count or the
    "pixels" Box space (SB3 style).
    """

    def __init__(
        self,
        in_channels: int | spaces.Box = 12,
        features_dim: int = NATURE_FEATURES_DIM,
        image_size: int = IMAGE_SIZE,
    ):
        super().__init__()
        if isinstance(in_channels, spaces.Box):
            in_channels, height, width = in_channels.shape
        else:
            height = width = image_size
        self.cnn = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=8, stride=4),  # 84 -> 20
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2),  # 20 -> 9
            nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1),  # 9 -> 7
            nn.ReLU(),
            nn.Flatten(),
        )
        # A dummy forward pass finds the flattened size; no hand arithmetic.
        with torch.no_grad():
            dummy = torch.zeros(1, in_channels, height, width)
            n_flatten = self.cnn(dummy).shape[1]
        linear = nn.Linear(n_flatten, features_dim)
        self.linear = nn.Sequential(linear, nn.ReLU())
        self.features_dim = features_dim
        self.pixel_scale = PixelScale()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # /255 here, once (PixelScale knows whether SB3 divided)
        return self.linear(self.cnn(self.pixel_scale(pixels)))
# --8<-- [end:nature_cnn]


# --8<-- [start:running_normalizer]
class RunningNormalizer(nn.Module):
    """Per-dimension running mean/std: x -> clip((x - mean) / std, -5, 5).

    Statistics update only in training mode (like BatchNorm's running
    stats), from every batch the module sees, with Chan et al.'s parallel
    mean/variance merge; in eval mode they are frozen, so acting never
    changes the network. The count is capped at `max_count`: after that the
    statistics become an exponential moving average that follows the slowly
    drifting replay data, and a float32 count never stops growing. The
    buffers are named `running_*` on purpose: SB3's SAC copies every
    `running_*` tensor of the critic into its target critic after each
    update, as it does for BatchNorm.
    """

    def __init__(
        self,
        dim: int,
        epsilon: float = 1e-6,
        clip: float = NORMALIZER_CLIP,
        max_count: float = 1e6,
    ):
        super().__init__()
        self.epsilon, self.clip, self.max_count = epsilon, clip, max_count
        # Buffers, not attributes: they follow .to(device) and land in the
        # state_dict, so SB3's save()/load() restores them with the weights.
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("running_count", torch.zeros(()))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        batch_count = x.shape[0]
        batch_mean, batch_var = x.mean(dim=0), x.var(dim=0, correction=0)
        total = self.running_count + batch_count
        delta = batch_mean - self.running_mean
        count = self.running_count
        sum_sq = self.running_var * count + batch_var * batch_count
        sum_sq = sum_sq + delta.square() * count * batch_count / total
        self.running_mean.add_(delta * batch_count / total)
        self.running_var.copy_(sum_sq / total)
        self.running_count.copy_(total.clamp(max=self.max_count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update(x)
        std = torch.sqrt(self.running_var + self.epsilon)
        return ((x - self.running_mean) / std).clamp(-self.clip, self.clip)
# --8<-- [end:running_normalizer]


# --8<-- [start:normalized_combined_extractor]
class NormalizedCombinedExtractor(BaseFeaturesExtractor):
    """SB3 features extractor: NatureCNN(pixels) ++ normalise(vectors).

    The Step 0 baseline of the chapter:

        SAC("MultiInputPolicy", env, policy_kwargs=dict(
            features_extractor_class=NormalizedCombinedExtractor,
            normalize_images=False))  # faster; SB3's default works too

    | input key      | shape           | route                   | output |
    |----------------|-----------------|-------------------------|--------|
    | pixels         | (B, 12, 84, 84) | NatureCNN (0..255 in)   | 512    |
    | proprioception | (B, 10)         | running mean/std        | 10     |
    | achieved_goal  | (B, 3)          | running mean/std        | 3      |
    | desired_goal   | (B, 3)          | running mean/std        | 3      |

    features_dim = 512 + (the vector entries present) = 528 with all four.

    Why normalise the vectors: Fetch positions are world coordinates in
    metres, far from zero, while the puck and goal move by centimetres and the
    gripper velocities are smaller still. Raw, they reach the MLP as a nearly
    constant offset beside 512 image features. Why a *running mean/std* (per
    dimension, VecNormalize style) and not the alternatives:
    - LayerNorm normalises across the entries of one sample: a 3-D goal
      loses its mean and scale, i.e. two of its three degrees of freedom.
    - VecNormalize on the env would also rewrite the goals stored in the
      replay buffer, but HER's `compute_reward` must compare raw goals in
      metres (the 0.05 m threshold). Normalising in the network keeps them.
    - Fixed constants would be FetchPush-specific; running statistics
      adapt to any Fetch task.
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        cnn_output_dim: int = NATURE_FEATURES_DIM,
    ):
        pixel_space, vector_keys = split_observation_keys(observation_space)
        vector_dim = sum(observation_space[k].shape[0] for k in vector_keys)
        super().__init__(observation_space, cnn_output_dim + vector_dim)
        self.vector_keys = vector_keys
        self.cnn = NatureCNN(pixel_space, features_dim=cnn_output_dim)
        self.vector_normalizer = (
            RunningNormalizer(vector_dim) if vector_dim else None
        )

    def forward(self, observations: Mapping[str, torch.Tensor]) -> torch.Tensor:
        image_features = self.cnn(observations[PIXEL_KEY])
        if self.vector_normalizer is None:
            return image_features
        vectors = torch.cat([observations[k] for k in self.vector_keys], dim=1)
        vector_features = self.vector_normalizer(vectors)
        return torch.cat([image_features, vector_features], dim=1)
# --8<-- [end:normalized_combined_extractor]


# --8<-- [start:visual_goal_encoder]
class VisualGoalEncoder(nn.Module):
    """(pixels, goal vectors) -> z, the state the visual SAC networks read.

        z = [ tanh(LayerNorm(W * cnn(pixels))) , normalise(vectors) ]

    | call                     | output                        |
    |--------------------------|-------------------------------|
    | encoder(pixels, vectors) | (B, latent_dim + vector_dim)  |

    pixels: (B, C, H, W), values 0..255; vectors: (B, vector_dim), the
    proprioception, achieved and desired goal, concatenated.

    The trunk (Linear -> LayerNorm -> tanh, from DrQ-v2) squeezes the CNN's
    features into a small bounded latent, so image and goal enter the MLPs on
    comparable scales. LayerNorm is right here (a 50-D learned latent) and
    wrong for a raw 3-D goal (see NormalizedCombinedExtractor). `cnn` is any
    module mapping pixels to (B, D): NatureCNN by default, or e.g.
    nn.Sequential(ManipulationCNN(), SpatialSoftmax(32, 21, 21)).
    """

    def __init__(
        self,
        in_channels: int = 12,
        vector_dim: int = 16,
        latent_dim: int = TRUNK_LATENT_DIM,
        image_size: int = IMAGE_SIZE,
        cnn: nn.Module | None = None,
    ):
        super().__init__()
        if cnn is None:
            cnn = NatureCNN(in_channels, image_size=image_size)
        self.cnn = cnn
        with torch.no_grad():
            dummy = torch.zeros(1, in_channels, image_size, image_size)
            cnn_dim = self.cnn(dummy).flatten(1).shape[1]
        self.trunk = nn.Sequential(
            nn.Linear(cnn_dim, latent_dim), nn.LayerNorm(latent_dim), nn.Tanh()
        )
        self.vector_normalizer = RunningNormalizer(vector_dim)
        self.features_dim = latent_dim + vector_dim

    def forward(
        self, pixels: torch.Tensor, vectors: torch.Tensor
    ) -> torch.Tensor:
        image_latent = self.trunk(self.cnn(pixels).flatten(1))
        vector_features = self.vector_normalizer(vectors)
        return torch.cat([image_latent, vector_features], dim=1)
# --8<-- [end:visual_goal_encoder]


# --8<-- [start:visual_gaussian_policy]
class VisualGaussianPolicy(nn.Module):
    """Tanh-squashed Gaussian actor: a = tanh(u), u ~ N(mu(z), sigma(z)^2).

    | call                                     | output                      |
    |------------------------------------------|-----------------------------|
    | policy(pixels, vectors)                  | a (B, A) in [-1, 1], log_pi |
    | policy(pixels, vectors, deterministic=1) | tanh(mu), its log-prob (B,) |
    | policy.distribution_params(pixels, vec)  | mu (B, A), log_std (B, A)   |

    z = encoder(pixels, vectors) is the VisualGoalEncoder's output.
    """

    def __init__(
        self,
        encoder: VisualGoalEncoder,
        action_dim: int = 4,
        hidden_dims: Sequence[int] = (256, 256),
    ):
        super().__init__()
        self.encoder = encoder
        in_dim = encoder.features_dim
        hidden = list(hidden_dims)
        self.latent_pi = nn.Sequential(*create_mlp(in_dim, -1, hidden))
        last_dim = hidden_dims[-1] if hidden_dims else in_dim
        self.mu = nn.Linear(last_dim, action_dim)
        self.log_std = nn.Linear(last_dim, action_dim)

    def distribution_params(
        self, pixels: torch.Tensor, vectors: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.latent_pi(self.encoder(pixels, vectors))
        # SB3's bounds: sigma in [2e-9, 7.4]; a collapsing sigma would make
        # log_prob explode.
        log_std = self.log_std(hidden).clamp(LOG_STD_MIN, LOG_STD_MAX)
        return self.mu(hidden), log_std

    def forward(
        self,
        pixels: torch.Tensor,
        vectors: torch.Tensor,
        deterministic: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.distribution_params(pixels, vectors)
        # Reparameterisation: u = mu + sigma * eps stays differentiable.
        noise = torch.randn_like(mean)
        u = mean if deterministic else mean + log_std.exp() * noise
        return torch.tanh(u), self.squashed_log_prob(u, mean, log_std)

    @staticmethod
    def squashed_log_prob(
        u: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor
    ) -> torch.Tensor:
        """log pi(tanh(u)) = sum_i [log N(u_i; mu_i, sigma_i) - log(1 - tanh^2)]

        with log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)).
        """
        gaussian = torch.distributions.Normal(mean, log_std.exp()).log_prob(u)
        # log(1 - tanh(u)^2), never log(0) once tanh(u) rounds to +-1.
        log_det_jacobian = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
        return (gaussian - log_det_jacobian).sum(dim=-1)
# --8<-- [end:visual_gaussian_policy]


# --8<-- [start:visual_twin_q_network]
class VisualTwinQNetwork(nn.Module):
    """Clipped double-Q critic: one encoder, two *independent* Q heads.

    | call                       | output           |
    |----------------------------|------------------|
    | q(pixels, vectors, action) | q1 (B,), q2 (B,) |

    SAC's target uses min(Q1, Q2) to curb overestimation; that only works if
    the two heads are separately initialised and separately parameterised.
    Building one head and using it twice (`self.q2 = self.q1`) silently turns
    the min into a no-op -- easy to overlook, so --verify checks it by
    parameter identity. The encoder runs once and feeds both heads (DrQ-v2).
    """

    def __init__(
        self,
        encoder: VisualGoalEncoder,
        action_dim: int = 4,
        hidden_dims: Sequence[int] = (256, 256),
    ):
        super().__init__()
        self.encoder = encoder
        in_dim = encoder.features_dim + action_dim
        self.q1 = nn.Sequential(*create_mlp(in_dim, 1, list(hidden_dims)))
        self.q2 = nn.Sequential(*create_mlp(in_dim, 1, list(hidden_dims)))

    def forward(
        self, pixels: torch.Tensor, vectors: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([self.encoder(pixels, vectors), action], dim=1)
        return self.q1(z).squeeze(-1), self.q2(z).squeeze(-1)
# --8<-- [end:visual_twin_q_network]


# ----------------------------------------------------------------------------------------------
# Checks (--verify)
# ----------------------------------------------------------------------------------------------
BATCH = 4
"""Batch size of the shape checks."""


def random_pixels(batch: int = BATCH, channels: int = 12, size: int = IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    """A (batch, channels, size, size) uint8 batch of random frames, as our buffers hand them out."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, generator=generator)


def fake_observations(space: spaces.Dict, batch: int = BATCH, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch shaped like the pixel env's: pixels uint8 (as stored), vectors float32 near Fetch's scale."""
    generator = torch.Generator().manual_seed(seed)
    obs: dict[str, torch.Tensor] = {}
    for key, box in space.spaces.items():
        if key == PIXEL_KEY:
            obs[key] = torch.randint(0, 256, (batch, *box.shape), dtype=torch.uint8, generator=generator)
        else:
            obs[key] = 1.0 + 0.1 * torch.randn((batch, *box.shape), generator=generator)
    return obs


def conv_output_sizes(model: nn.Module, pixels: torch.Tensor) -> list[int]:
    """Spatial size after each Conv2d of ``model`` on ``pixels``, recorded with forward hooks."""
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.shape[-1]))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(pixels)
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def check_nature_cnn() -> list[Claim]:
    cnn = NatureCNN(12)
    sizes = conv_output_sizes(cnn, random_pixels())
    with torch.no_grad():
        features = cnn(random_pixels())
    convs = [m for m in cnn.modules() if isinstance(m, nn.Conv2d)]
    expected = sum(c.in_channels * c.out_channels * c.kernel_size[0] * c.kernel_size[1] + c.out_channels for c in convs)
    expected += 3136 * NATURE_FEATURES_DIM + NATURE_FEATURES_DIM
    n_params = count_parameters(cnn)
    linear_share = count_parameters(cnn.linear) / n_params
    return [
        Claim(
            "NatureCNN: (B, 12, 84, 84) uint8 -> (B, 512) finite, spatial 84 -> 20 -> 9 -> 7",
            sizes == [20, 9, 7] and tuple(features.shape) == (BATCH, 512) and bool(torch.isfinite(features).all()),
            f"sizes 84 -> {' -> '.join(map(str, sizes))}, output {tuple(features.shape)}",
        ),
        Claim(
            "NatureCNN has ~1.7M parameters, almost all in Linear(3136, 512)",
            n_params == expected and abs(n_params - 1.7e6) / 1.7e6 < 0.05 and linear_share > 0.9,
            f"{n_params:,} parameters; Linear(3136, 512) holds {linear_share:.1%}",
        ),
    ]


def check_pixel_scaling() -> list[Claim]:
    """The one uint8 -> float conversion, in the encoder: whatever SB3's normalize_images, pixels are divided
    by 255 exactly once, and the decision is saved with the model."""
    from stable_baselines3.common.preprocessing import preprocess_obs

    space = pixel_observation_space()
    obs = fake_observations(space)
    features, divisors = {}, {}
    for name, pixels_in in {"uint8": obs, "SB3 cast (normalize_images=False)": preprocess_obs(obs, space, False),
                            "SB3 divided (normalize_images=True)": preprocess_obs(obs, space, True)}.items():
        torch.manual_seed(0)  # the same weights for each
        extractor = NormalizedCombinedExtractor(space).eval()
        with torch.no_grad():
            features[name] = extractor(pixels_in)
        divisors[name] = extractor.cnn.pixel_scale
    same = all(torch.allclose(f, features["uint8"], atol=1e-6) for f in features.values())
    reloaded = PixelScale()
    reloaded.load_state_dict(divisors["SB3 divided (normalize_images=True)"].state_dict())
    return [
        Claim(
            "the encoder divides by 255 exactly once: uint8 pixels, SB3's float cast and SB3's own division give "
            "the same features; the first batch decides, and a reloaded encoder keeps the decision",
            same and divisors["SB3 cast (normalize_images=False)"].known_divisor == PIXEL_MAX
            and divisors["SB3 divided (normalize_images=True)"].known_divisor == 1.0
            and reloaded.known_divisor == 1.0,
            f"features equal: {same}; divisor after the first batch: "
            + ", ".join(f"{name} {scale.known_divisor:g}" for name, scale in divisors.items())
            + f"; reloaded {reloaded.known_divisor:g}",
        )
    ]


def check_normalized_extractor() -> list[Claim]:
    space = pixel_observation_space()
    extractor = NormalizedCombinedExtractor(space)
    obs = fake_observations(space)
    extractor.eval()
    with torch.no_grad():
        features = extractor(obs)
    shape_ok = (extractor.features_dim == 528 and tuple(features.shape) == (BATCH, 528)
                and bool(torch.isfinite(features).all()))

    # The normaliser on its own: batches of Fetch-like vectors (offsets ~1.3, scales 0.01-0.1).
    # Chan's merge must reproduce the mean/variance of everything seen, and fresh data from the same
    # distribution must come out standardised.
    generator = torch.Generator().manual_seed(1)
    offset = 1.3 + 0.3 * torch.rand(16, generator=generator)
    scale = 0.01 + 0.1 * torch.rand(16, generator=generator)
    normalizer = RunningNormalizer(16).train()
    seen = [offset + scale * torch.randn(512, 16, generator=generator) for _ in range(8)]
    for batch in seen:
        normalizer(batch)
    seen_all = torch.cat(seen).double()
    merge_err = max(
        float(((normalizer.running_mean - seen_all.mean(0)) / seen_all.std(0)).abs().max()),
        float((normalizer.running_var / seen_all.var(0, correction=0) - 1).abs().max()),
    )
    normalizer.eval()
    fresh = normalizer(offset + scale * torch.randn(4096, 16, generator=generator))
    mean_err, std_err = float(fresh.mean(0).abs().max()), float((fresh.std(0) - 1).abs().max())

    # Inside the extractor: a training-mode forward updates the statistics, an eval-mode one does
    # not, and the last 16 features are exactly the normalised vectors.
    extractor.train()
    with torch.no_grad():
        extractor(fake_observations(space, seed=2))
    extractor.eval()
    count_after_train = float(extractor.vector_normalizer.running_count)
    test = fake_observations(space, seed=3)
    with torch.no_grad():
        vector_part = extractor(test)[:, 512:]
        expected_part = extractor.vector_normalizer(torch.cat([test[k] for k in VECTOR_KEYS], dim=1))
    count_after_eval = float(extractor.vector_normalizer.running_count)
    frozen = count_after_train == BATCH and count_after_eval == count_after_train
    routed = torch.equal(vector_part, expected_part)

    # The statistics are buffers: a fresh extractor loading the state_dict reproduces the features.
    state = extractor.state_dict()
    clone = NormalizedCombinedExtractor(space)
    clone.load_state_dict(state)
    clone.eval()
    with torch.no_grad():
        reloaded_equal = torch.equal(clone(test), extractor(test))
    buffer_names = sorted(k for k in state if "running_" in k)
    return [
        Claim("NormalizedCombinedExtractor: dict obs -> (B, 528) = 512 image + 16 vector features, finite",
              shape_ok, f"features_dim {extractor.features_dim}, output {tuple(features.shape)}"),
        Claim("running mean/std matches the data seen and standardises Fetch-scale vectors (mean ~0, std ~1)",
              merge_err < 1e-4 and mean_err < 0.1 and std_err < 0.1,
              f"merge error {merge_err:.1e}; fresh data: max |mean| {mean_err:.3f}, max |std - 1| {std_err:.3f}"),
        Claim("the extractor updates its statistics in train mode only and outputs the normalised vectors",
              frozen and routed, f"count {count_after_train:.0f} after one train batch of {BATCH}, "
              f"{count_after_eval:.0f} after eval forwards; vector features == normaliser(vectors): {routed}"),
        Claim("normaliser statistics are registered buffers that survive state_dict save/load",
              reloaded_equal and len(buffer_names) == 3,
              f"buffers {buffer_names}, reloaded output identical: {reloaded_equal}"),
    ]


def check_sb3_baseline(learn_steps: int = 24) -> list[Claim]:
    """Build the Step 0 baseline SAC on the real pixel env, learn a few steps, save and reload it."""
    env = make_fetch_env()
    try:
        model = SAC(
            "MultiInputPolicy", env, buffer_size=200, batch_size=8, learning_starts=learn_steps - 8,
            policy_kwargs=dict(features_extractor_class=NormalizedCombinedExtractor, normalize_images=False,
                               net_arch=[64, 64]),
            seed=0, device="cpu",
        )
        model.learn(total_timesteps=learn_steps)
        policy = model.policy
        actor_norm = policy.actor.features_extractor.vector_normalizer
        critic_norm = policy.critic.features_extractor.vector_normalizer
        target_norm = policy.critic_target.features_extractor.vector_normalizer
        learned = float(actor_norm.running_count) > 0 and float(critic_norm.running_count) > 0
        target_synced = torch.equal(critic_norm.running_mean, target_norm.running_mean)
        obs = env.observation_space.sample()
        action_before, _ = model.predict(obs, deterministic=True)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "baseline.zip"
            model.save(path)
            loaded = SAC.load(path, device="cpu")
        action_after, _ = loaded.predict(obs, deterministic=True)
        loaded_norm = loaded.policy.actor.features_extractor.vector_normalizer
        stats_equal = torch.equal(loaded_norm.running_mean, actor_norm.running_mean)
        predictions_equal = bool(np.allclose(action_before, action_after, atol=1e-6))
        raw_pixels = not loaded.policy.normalize_images
    finally:
        env.close()
    return [
        Claim(
            "SB3 SAC('MultiInputPolicy') trains with NormalizedCombinedExtractor; save/load keeps its statistics",
            isinstance(policy.actor.features_extractor, NormalizedCombinedExtractor) and learned and target_synced
            and stats_equal and predictions_equal and raw_pixels,
            f"{learn_steps} steps; actor/critic counts {float(actor_norm.running_count):.0f}/"
            f"{float(critic_norm.running_count):.0f}; target stats synced {target_synced}; reload: stats equal "
            f"{stats_equal}, actions equal {predictions_equal}, normalize_images=False kept {raw_pixels}",
        )
    ]


def check_visual_sac_networks() -> list[Claim]:
    encoder_pi, encoder_q = VisualGoalEncoder(), VisualGoalEncoder()
    policy = VisualGaussianPolicy(encoder_pi)
    critic = VisualTwinQNetwork(encoder_q)
    pixels = random_pixels()
    vectors = 1.0 + 0.1 * torch.randn(BATCH, 16)
    with torch.no_grad():
        z = encoder_pi(pixels, vectors)
        action, log_prob = policy(pixels, vectors)
        q1, q2 = critic(pixels, vectors, action)
    shapes_ok = (
        tuple(z.shape) == (BATCH, 66) and tuple(action.shape) == (BATCH, 4) and tuple(log_prob.shape) == (BATCH,)
        and tuple(q1.shape) == (BATCH,) and tuple(q2.shape) == (BATCH,)
    )
    finite = all(bool(torch.isfinite(t).all()) for t in (z, action, log_prob, q1, q2))

    # Push the pre-tanh mean to 30: actions must still be in [-1, 1] and the log-prob finite
    # (tanh(30) is exactly 1.0 in float32, where log(1 - tanh^2) without the stable form is -inf).
    saturated = VisualGaussianPolicy(VisualGoalEncoder())
    with torch.no_grad():
        saturated.mu.bias.fill_(30.0)
        saturated_action, saturated_log_prob = saturated(pixels, vectors)
    in_bounds = bool((action.abs() <= 1).all()) and bool((saturated_action.abs() <= 1).all())
    in_bounds = in_bounds and bool(torch.isfinite(saturated_log_prob).all())

    # The squashed log-prob against torch.distributions, on u from tiny to |u| = 8.
    generator = torch.Generator().manual_seed(3)
    mean = 2.0 * torch.randn(512, 4, generator=generator)
    log_std = torch.empty(512, 4).uniform_(-3, 1, generator=generator)
    u = mean + log_std.exp() * torch.randn(512, 4, generator=generator)
    u[:8] = torch.linspace(-8, 8, 32).reshape(8, 4)  # saturated tanh: where the naive formula breaks
    mean[:8], log_std[:8] = u[:8] + 0.1, 0.0
    ours = VisualGaussianPolicy.squashed_log_prob(u, mean, log_std)
    tanh = torch.distributions.TanhTransform(cache_size=1)
    normal = torch.distributions.Normal(mean, log_std.exp())
    reference_dist = torch.distributions.TransformedDistribution(normal, [tanh])
    reference = reference_dist.log_prob(tanh(u)).sum(-1)  # the cache hands log_prob the exact u back
    max_diff = float((ours - reference).abs().max())
    naive = (torch.distributions.Normal(mean, log_std.exp()).log_prob(u).sum(-1)
             - torch.log(1 - torch.tanh(u) ** 2 + 1e-6).sum(-1))
    naive_diff = float((naive[:8] - reference[:8]).abs().max())
    with torch.no_grad():  # the forward pass uses the same formula (deterministic: u = mu)
        mu_pi, log_std_pi = policy.distribution_params(pixels, vectors)
        action_det, log_prob_det = policy(pixels, vectors, deterministic=True)
        ref_det = torch.distributions.TransformedDistribution(
            torch.distributions.Normal(mu_pi, log_std_pi.exp()), [tanh]).log_prob(tanh(mu_pi)).sum(-1)
    forward_diff = float((log_prob_det - ref_det).abs().max())

    q1_ids = {id(p) for p in critic.q1.parameters()}
    q2_ids = {id(p) for p in critic.q2.parameters()}
    shared = len(q1_ids & q2_ids)
    heads_differ = not torch.allclose(q1, q2)
    counts = {
        "encoder": count_parameters(encoder_pi),
        "policy heads": count_parameters(policy) - count_parameters(encoder_pi),
        "each Q head": count_parameters(critic.q1),
    }
    return [
        Claim(
            "VisualGoalEncoder/Policy/TwinQ: shapes (B, 66), (B, 4), (B,), (B,), (B,); all finite",
            shapes_ok and finite,
            f"z {tuple(z.shape)}, action {tuple(action.shape)}, log_prob {tuple(log_prob.shape)}, q {tuple(q1.shape)}; "
            + ", ".join(f"{k} {v:,} params" for k, v in counts.items()),
        ),
        Claim("tanh-squashed actions lie in [-1, 1]; log-prob stays finite when tanh saturates (mu = 30)", in_bounds,
              f"max |a| {float(action.abs().max()):.4f}; saturated: max |a| {float(saturated_action.abs().max()):.1f}, "
              f"log_prob {float(saturated_log_prob.mean()):.1f}"),
        Claim(
            "squashed log-prob equals TransformedDistribution(Normal, TanhTransform) within 1e-5",
            max_diff < 1e-5 and forward_diff < 1e-5,
            f"max |diff| {max_diff:.1e} (policy forward {forward_diff:.1e}); naive log(1 - tanh^2 + 1e-6) is off by "
            f"{naive_diff:.2f} nats at |u| <= 8",
        ),
        Claim("twin Q heads share no parameters (by identity) and give different values", shared == 0 and heads_differ,
              f"{len(q1_ids)} + {len(q2_ids)} parameter tensors, {shared} shared"),
    ]


def verify() -> list[Claim]:
    """Check every claim of this lab, in the order the chapter makes them."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return [*check_nature_cnn(), *check_pixel_scaling(), *check_normalized_extractor(), *check_visual_sac_networks(),
            *check_sb3_baseline()]


def main(argv: Sequence[str] | None = None) -> int:
    return lab_main(__doc__, {"verify": verify}, argv)


if __name__ == "__main__":
    raise SystemExit(run_guarded(main))
