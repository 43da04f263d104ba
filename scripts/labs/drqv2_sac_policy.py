"""Critic-encoder gradient routing: the DrQ-v2 pattern as a stable-baselines3 SAC policy.

The idea
--------
A pixel agent has two learning problems: *seeing* (an encoder f_phi turns 84x84 frames into features) and
*acting* (actor and twin critics on top of those features). Which loss trains the encoder decides whether it
learns at all. SB3's `SACPolicy(share_features_extractor=True)` shares one encoder between actor and critic,
but it keeps the encoder out of the critic's optimizer and extracts the critic's features under
`th.set_grad_enabled(False)`: the encoder learns from the ACTOR loss only. DrQ-v2 (Yarats et al., 2021) does
the opposite: the encoder sits in the critic's optimizer and the actor sees detached features. The TD error
is the richer signal -- it says which pixels predict reward -- while the actor loss only says which way to
nudge an action.

With sg(.) = stop-gradient (`.detach()`), features z = f_phi(s) and target encoder phi_bar:

    critic:  L_Q(theta, phi) = E[ sum_j (Q_theta_j(f_phi(s), a) - y)^2 ] / 2,
             y = r + gamma * ( min_j Q_theta_bar_j(f_phi_bar(s'), a') - alpha * log pi(a'|s') ),  a' ~ pi(.|s')
    actor:   L_pi(psi) = E[ alpha * log pi_psi(a~|sg(z)) - min_j Q_theta_j(sg(z), a~) ],  a~ ~ pi_psi(.|sg(z))
    updates: phi, theta <- Adam(grad L_Q)      psi <- Adam(grad L_pi)      (phi is NOT in the actor's optimizer)
    target:  (theta_bar, phi_bar) <- tau * (theta, phi) + (1 - tau) * (theta_bar, phi_bar)   (SB3's polyak_update)

One difference from DrQ-v2, on purpose: DrQ-v2 encodes s' with the ONLINE encoder (under `no_grad`; its
target network holds only the critic's trunk and Q heads), while ours encodes s' with phi_bar, the target
critic's own Polyak-averaged copy of the encoder. That is SB3's design: the extractor lives inside the critic,
so `critic_target` carries a copy, and the stock `SAC.train()` computes y with `critic_target(next_obs, a')`.
Following SB3 keeps the stock training loop (and its checkpoints); the price is a second encoder's memory and
a target that lags the online features by the Polyak average.

Three small classes implement it inside SB3, so `SAC(DrQv2SACPolicy, env, ...)` trains with the stock
`SAC.train()` loop:

| class                 | overrides                      | effect                                                     |
|-----------------------|--------------------------------|------------------------------------------------------------|
| `CriticEncoderCritic` | `ContinuousCritic.forward`     | no grad gate: the TD loss reaches the shared encoder       |
| `CriticEncoderActor`  | `Actor.get_action_dist_params` | `features.detach()` before the policy MLP                  |
| `DrQv2SACPolicy`      | `SACPolicy._build`             | one encoder, in the critic's optimizer only (by identity); |
|                       |                                | the target critic has its own copy, Polyak-averaged        |

The routing lives in two methods that take features already extracted, `CriticEncoderActor.dist_params_from_features`
and `CriticEncoderCritic.q_values`: SB3's loop reaches them through `get_action_dist_params` and `forward`, and the
production engine (`ch09.engine.fast_sac`, which encodes each batch once) calls them directly. Edit a detach here and
both trainers see the edit.

The encoders divide the uint8 pixels by 255 themselves, so `DrQv2SACPolicy` defaults to
`normalize_images=False` (SB3 only casts the pixels to float).

How to run (from the repository root)
-------------------------------------
    bash docker/dev.sh python scripts/labs/drqv2_sac_policy.py --verify   # routing, save/load, SB3 smoke claims
    bash docker/dev.sh python scripts/labs/drqv2_sac_policy.py --probe    # SB3 shared encoder vs ours, gradients
    bash docker/dev.sh python scripts/labs/drqv2_sac_policy.py --bridge   # verify + probe + match-criteria table
    bash docker/dev.sh python scripts/labs/drqv2_sac_policy.py --demo     # 5,000 steps SAC+HER, pixel Push
    bash docker/dev.sh python scripts/labs/drqv2_sac_policy.py --demo --steps 1000

`--probe` prints the encoder gradient each loss sends at initialization (the critic's against the actor's).
`--demo` is a wiring test, not a learning run (pixel Push needs millions of steps); it prints steps/s and the
final losses. `--threads 2` helps on an idle 2-core machine; the README lists measured times.

Saving and loading: `SAC.save` pickles `DrQv2SACPolicy` by reference (module `drqv2_sac_policy`), so any
process that has the project installed (`pip install -e .`; `docker/dev.sh` does it) can load it.
`SAC.load(path)` needs no `custom_objects` for a model whose replay buffer is not a HER buffer (as in
`--verify`); a model trained with a `HerReplayBuffer` needs `SAC.load(path, env=env)`. When this file runs as
a script, `__main__` re-imports it under its module name first (see the bottom of the file): a class defined
in `__main__` would be pickled by value (cloudpickle), and loaded as a look-alike copy that is not
`drqv2_sac_policy.DrQv2SACPolicy`.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli_guard import guard_entry_point, run_guarded

guard_entry_point(__name__)  # a refused mujoco, a missing package, an early SIGTERM: one line, no traceback

import numpy as np
import torch as th
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3 import SAC
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import ContinuousCritic
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import DictReplayBufferSamples, PyTorchObs, Schedule
from stable_baselines3.common.utils import polyak_update
from stable_baselines3.her import HerReplayBuffer
from stable_baselines3.sac.policies import LOG_STD_MAX, LOG_STD_MIN, Actor, SACPolicy
from torch import nn

from lab_support import Claim, lab_main, report
from manipulation_encoder import ManipulationExtractor
from pixel_wrapper import make_fetch_env

ENV_ID = "FetchPush-v4"
GAMMA = 0.95  # the chapter's discount for 50-step Fetch episodes
INITIAL_ENT_COEF = 1.0  # SB3's ent_coef="auto" starts at alpha = 1.0: the value of the first SAC update
TAU = 0.005  # SB3's default Polyak coefficient
LEARNING_RATE = 3e-4  # SB3's default SAC learning rate
ROUTING_BATCH = 16  # real transitions used for the gradient-routing measurements
SAVE_LOAD_ATOL = 1e-6  # deterministic actions after SAC.save / SAC.load must match this closely
POLYAK_RTOL = 1e-4  # float32 tolerance on the (1 - tau) shrink of ||phi - phi_bar||
NO_LOG_DUMPS = 10**9  # log_interval for model.learn: never dump (and clear) the logged losses mid-run


# --8<-- [start:critic_encoder_critic]
class CriticEncoderCritic(ContinuousCritic):
    """Twin Q-networks whose TD loss trains the encoder shared with the actor.

    SB3's `ContinuousCritic.forward` extracts features under
    `th.set_grad_enabled(not self.share_features_extractor)`, so with a
    shared encoder the critic loss never reaches it. This forward has no
    such gate. What each call in `SAC.train()` sends into the encoder:

    | call in SAC.train()           | actions             | encoder gradient |
    |-------------------------------|---------------------|------------------|
    | `critic(obs, replay_actions)` | from the buffer     | dL_Q / dphi      |
    | `critic(obs, actions_pi)`     | the actor's (grad)  | none: detached   |
    | `critic_target(next_obs, a')` | in `th.no_grad()`   | none             |

    The middle row is DrQ-v2's `update_actor(obs.detach())`: Q(s, pi(s)) in
    the actor loss must move the actor, not the encoder. The only sign SB3's
    loop gives of that call is that its actions carry the actor's graph, so
    a custom loss that differentiates Q with respect to the actions also
    sees detached features.
    """

    def forward(
        self, obs: PyTorchObs, actions: th.Tensor
    ) -> tuple[th.Tensor, ...]:
        # No grad gate: L_Q reaches phi.
        features = self.extract_features(obs, self.features_extractor)
        return self.q_values(features, actions)

    def q_values(
        self, features: th.Tensor, actions: th.Tensor
    ) -> tuple[th.Tensor, ...]:
        """The twin heads on features already extracted (forward's routing)."""
        if actions.requires_grad:  # Q(s, pi(s)) in the actor loss: sg(f_phi(s))
            features = features.detach()
        q_input = th.cat([features, actions], dim=1)
        return tuple(q_net(q_input) for q_net in self.q_networks)
# --8<-- [end:critic_encoder_critic]


# --8<-- [start:critic_encoder_actor]
class CriticEncoderActor(Actor):
    """SAC actor that reads the shared encoder's features but never trains it.

    The one change to SB3's `Actor` is `.detach()` on the features (`forward`
    and `action_log_prob` both go through `get_action_dist_params`). It is
    not optional: `SAC.train()` samples `actions_pi` BEFORE the critic's
    optimizer steps the shared encoder in place, and backpropagates the
    actor loss AFTER. Without the detach, autograd finds encoder weights it
    saved for the backward pass already overwritten and raises "one of the
    variables needed for gradient computation has been modified by an
    inplace operation" -- the "gradient computation issues" SB3's own
    `_build` comment mentions.
    """

    def get_action_dist_params(
        self, obs: PyTorchObs
    ) -> tuple[th.Tensor, th.Tensor, dict[str, th.Tensor]]:
        features = self.extract_features(obs, self.features_extractor)
        return self.dist_params_from_features(features)

    def dist_params_from_features(
        self, features: th.Tensor
    ) -> tuple[th.Tensor, th.Tensor, dict[str, th.Tensor]]:
        """The policy head on features already extracted."""
        latent_pi = self.latent_pi(features.detach())  # sg(f_phi(s))
        mean_actions = self.mu(latent_pi)
        if self.use_sde:
            return mean_actions, self.log_std, dict(latent_sde=latent_pi)
        log_std = self.log_std(latent_pi)  # type: ignore[operator]
        return mean_actions, th.clamp(log_std, LOG_STD_MIN, LOG_STD_MAX), {}
# --8<-- [end:critic_encoder_actor]


def _refuse_separate_encoders(share_features_extractor: bool) -> None:
    """DrQv2SACPolicy's argument check, outside the printed listing."""
    if not share_features_extractor:
        raise ValueError(
            "DrQv2SACPolicy routes ONE encoder shared by actor and critic; for separate encoders use "
            "SB3's 'MultiInputPolicy' (share_features_extractor=False) instead."
        )


# --8<-- [start:drqv2_sac_policy]
class DrQv2SACPolicy(SACPolicy):
    """SAC policy with ONE encoder, trained by the critic only (DrQ-v2).

    | module                         | its encoder | what trains it           |
    |--------------------------------|-------------|--------------------------|
    | `actor` (CriticEncoderActor)   | the shared  | nothing: detached input  |
    | `critic` (CriticEncoderCritic) | same object | the TD loss: all N       |
    |                                |             | tensors in its optimizer |
    | `critic_target`                | own copy    | SB3's `polyak_update`    |

    Usage: `SAC(DrQv2SACPolicy, env, policy_kwargs=dict(
    features_extractor_class=ManipulationExtractor))`. `normalize_images`
    defaults to False: the encoder divides the uint8 pixels by 255 itself.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        features_extractor_class: type[BaseFeaturesExtractor] = (
            ManipulationExtractor
        ),
        normalize_images: bool = False,
        share_features_extractor: bool = True,
        **kwargs: Any,
    ):
        _refuse_separate_encoders(share_features_extractor)
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            features_extractor_class=features_extractor_class,
            normalize_images=normalize_images,
            share_features_extractor=True,
            **kwargs,
        )

    def make_actor(
        self, features_extractor: BaseFeaturesExtractor | None = None
    ) -> CriticEncoderActor:
        kwargs = self._update_features_extractor(
            self.actor_kwargs, features_extractor
        )
        return CriticEncoderActor(**kwargs).to(self.device)

    def make_critic(
        self, features_extractor: BaseFeaturesExtractor | None = None
    ) -> CriticEncoderCritic:
        kwargs = self._update_features_extractor(
            self.critic_kwargs, features_extractor
        )
        return CriticEncoderCritic(**kwargs).to(self.device)
    # --8<-- [end:drqv2_sac_policy]

    # --8<-- [start:drqv2_sac_policy_build]
    def _build(self, lr_schedule: Schedule) -> None:
        self.actor = self.make_actor()  # builds THE encoder
        encoder = self.actor.features_extractor
        # Filter by identity, not by name: the same tensor is called
        # "actor.features_extractor..." and "critic.features_extractor...",
        # and an optimizer holds tensors, not names.
        encoder_ids = {id(p) for p in encoder.parameters()}
        actor_parameters = [
            p for p in self.actor.parameters() if id(p) not in encoder_ids
        ]
        self.actor.optimizer = self.optimizer_class(
            actor_parameters, lr=lr_schedule(1), **self.optimizer_kwargs
        )

        # Shared: the same object, the same tensors.
        self.critic = self.make_critic(features_extractor=encoder)
        # qf0, qf1 AND the encoder: the TD loss trains what the agent sees.
        self.critic.optimizer = self.optimizer_class(
            self.critic.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs
        )

        # A fresh encoder for the target, then a copy of the weights.
        # SAC.train() Polyak-averages zip(critic.parameters(),
        # critic_target.parameters()), and both lists start with the encoder.
        self.critic_target = self.make_critic(features_extractor=None)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.set_training_mode(False)
    # --8<-- [end:drqv2_sac_policy_build]


# ======================================================================================================
# Plumbing for the checks: a small real batch, the routing report, the SAC losses as SAC.train() has them
# ======================================================================================================


def collect_real_batch(env: Any, n_transitions: int = ROUTING_BATCH, seed: int = 0) -> DictReplayBufferSamples:
    """`n_transitions` real pixel transitions (random actions from `reset(seed)`), shaped like an SB3 sample.

    | field             | shape                                          | dtype           |
    |-------------------|------------------------------------------------|-----------------|
    | observations      | dict: pixels (B, 12, 84, 84), vectors (B, d)   | uint8 / float32 |
    | actions           | (B, 4)                                         | float32         |
    | next_observations | like observations                              |                 |
    | dones, rewards    | (B, 1)                                         | float32         |

    Pixels stay uint8, as in SB3's `DictReplayBuffer`: the encoder divides by 255 (SB3 only casts to float).
    """
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    rows: list[tuple[dict, np.ndarray, float, dict]] = []
    for _ in range(n_transitions):
        action = env.action_space.sample().astype(np.float32)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rows.append((obs, action, float(reward), next_obs))
        obs = next_obs if not (terminated or truncated) else env.reset()[0]

    def stack(dicts: list[dict]) -> dict[str, th.Tensor]:
        return {key: th.as_tensor(np.stack([d[key] for d in dicts])) for key in dicts[0]}

    return DictReplayBufferSamples(
        observations=stack([r[0] for r in rows]),
        actions=th.as_tensor(np.stack([r[1] for r in rows])),
        next_observations=stack([r[3] for r in rows]),
        dones=th.zeros(n_transitions, 1),  # Fetch episodes only truncate; SB3 stores timeouts as not-done
        rewards=th.as_tensor([[r[2]] for r in rows], dtype=th.float32),
    )


def _encoder_ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def _count_in_optimizer(optimizer: th.optim.Optimizer, ids: set[int]) -> int:
    return sum(id(p) in ids for group in optimizer.param_groups for p in group["params"])


def _input_dim(*modules: nn.Module) -> int:
    """in_features of the first Linear layer: what an MLP really expects, whatever its net_arch."""
    return next(m.in_features for module in modules for m in module.modules() if isinstance(m, nn.Linear))


def routing_report(policy: SACPolicy) -> dict[str, Any]:
    """Who trains the encoder(s) of an SB3 SAC policy, read from the modules and optimizers (no data needed).

    Keys: policy_class, encoder_class, shared_encoder, encoder_tensors (N), encoder_params (numel),
    encoder_in_actor_optimizer / encoder_in_critic_optimizer (how many of the actor's / critic's encoder
    tensors each optimizer holds), target_encoder_separate, features_dim, actor_input_dim, critic_input_dim,
    trained_by ("critic loss", "actor loss", "actor loss (actor encoder) + critic loss (critic encoder)", ...).
    """
    actor_encoder = policy.actor.features_extractor
    critic_encoder = policy.critic.features_extractor
    target_encoder = policy.critic_target.features_extractor
    actor_ids, critic_ids = _encoder_ids(actor_encoder), _encoder_ids(critic_encoder)
    n_tensors = len(actor_ids)
    in_actor = _count_in_optimizer(policy.actor.optimizer, actor_ids)
    in_critic = _count_in_optimizer(policy.critic.optimizer, critic_ids)
    shared = critic_encoder is actor_encoder
    if shared:
        trainers = [name for name, k in (("actor loss", in_actor), ("critic loss", in_critic)) if k]
        trained_by = " + ".join(trainers) or "nothing"
    else:
        trained_by = "actor loss (actor encoder) + critic loss (critic encoder)"
    action_dim = int(np.prod(policy.action_space.shape))
    return {
        "policy_class": type(policy).__name__,
        "encoder_class": type(actor_encoder).__name__,
        "shared_encoder": shared,
        "encoder_tensors": n_tensors,
        "encoder_params": sum(p.numel() for p in actor_encoder.parameters()),
        "encoder_in_actor_optimizer": in_actor,
        "encoder_in_critic_optimizer": in_critic,
        "target_encoder_separate": target_encoder is not critic_encoder
        and _encoder_ids(target_encoder).isdisjoint(actor_ids | critic_ids),
        "features_dim": int(actor_encoder.features_dim),
        "actor_input_dim": _input_dim(policy.actor.latent_pi, policy.actor.mu),
        "critic_input_dim": _input_dim(policy.critic.q_networks[0]) - action_dim,
        "trained_by": trained_by,
    }


def sb3_shared_encoder_policy(observation_space: spaces.Space, action_space: spaces.Box) -> SACPolicy:
    """SB3's stock SAC policy with ONE shared encoder (`share_features_extractor=True`), our extractor."""
    return SACPolicy(
        observation_space,
        action_space,
        lambda _: LEARNING_RATE,
        features_extractor_class=ManipulationExtractor,
        normalize_images=False,  # ManipulationCNN divides by 255 itself
        share_features_extractor=True,
    )


def drqv2_policy(observation_space: spaces.Space, action_space: spaces.Box) -> DrQv2SACPolicy:
    """DrQv2SACPolicy with its default ManipulationExtractor, as SAC would build it."""
    return DrQv2SACPolicy(observation_space, action_space, lambda _: LEARNING_RATE)


# ======================================================================================================
# The measurement: one SAC update, step by step, exactly in SAC.train()'s order
# ======================================================================================================


@dataclass
class GradientFlow:
    """What one SAC update (in SAC.train()'s order) does to the encoder the actor acts through."""

    policy_class: str
    """Name of the measured policy class."""
    encoder_tensors: int
    """N: parameter tensors in the encoder (weights and biases of the 4 convolutions: 8)."""
    in_actor_optimizer: int
    """How many of the N tensors the actor's optimizer holds."""
    in_critic_optimizer: int
    """How many of the N tensors the critic's optimizer holds."""
    critic_grad_tensors: int
    """Encoder tensors with a non-zero gradient after critic_loss.backward()."""
    critic_grad_norm: float
    """L2 norm of the encoder gradient from the critic (TD) loss."""
    critic_step_change: float
    """max |delta phi| caused by critic.optimizer.step()."""
    actor_grad_tensors: int
    """Encoder tensors with a non-zero gradient after actor_loss.backward()."""
    actor_grad_norm: float
    """L2 norm of the encoder gradient from the actor loss."""
    actor_head_grad_norm: float
    """L2 norm of the actor MLP's gradient (proof that the actor loss did backpropagate)."""
    actor_step_change: float
    """max |delta phi| caused by actor.optimizer.step()."""
    target_separate: bool
    """The target critic's encoder shares no tensor with the online encoder."""
    polyak_gap_ratio: float
    """||phi - phi_bar|| after / before SB3's polyak_update: exactly (1 - tau) when the update covers the encoder."""


def _grad_norm(params: list[nn.Parameter]) -> tuple[int, float]:
    grads = [p.grad for p in params if p.grad is not None and bool(p.grad.abs().sum() > 0)]
    return len(grads), math.sqrt(sum(float(g.pow(2).sum()) for g in grads))


def _max_change(before: list[th.Tensor], params: list[nn.Parameter]) -> float:
    return max(float((p.detach() - b).abs().max()) for b, p in zip(before, params, strict=True))


def _distance(a: list[nn.Parameter], b: list[nn.Parameter]) -> float:
    return math.sqrt(sum(float((x.detach() - y.detach()).pow(2).sum()) for x, y in zip(a, b, strict=True)))


def verify_gradient_flow(
    policy: SACPolicy,
    batch: DictReplayBufferSamples,
    ent_coef: float = INITIAL_ENT_COEF,
    gamma: float = GAMMA,
    tau: float = TAU,
    seed: int = 0,
) -> GradientFlow:
    """Run one SAC update on `batch`, in `SAC.train()`'s order, and measure the encoder at every stage.

    The losses are SB3's, line for line: sample pi(s) first; critic loss -> zero_grad/backward/step; actor
    loss (alpha log pi - min Q(s, pi(s))) -> zero_grad/backward/step; then polyak_update. Mutates `policy`.
    `seed` fixes the actor's action samples, so two policies with equal weights see equal losses.
    """
    th.manual_seed(seed)
    policy.set_training_mode(True)
    encoder = list(policy.actor.features_extractor.parameters())
    routing = routing_report(policy)
    obs, next_obs = batch.observations, batch.next_observations

    actions_pi, log_prob = policy.actor.action_log_prob(obs)  # sampled before the critic step, as in SB3
    log_prob = log_prob.reshape(-1, 1)

    with th.no_grad():
        next_actions, next_log_prob = policy.actor.action_log_prob(next_obs)
        next_q = th.cat(policy.critic_target(next_obs, next_actions), dim=1).min(dim=1, keepdim=True)[0]
        next_q = next_q - ent_coef * next_log_prob.reshape(-1, 1)
        target_q = batch.rewards + (1 - batch.dones) * gamma * next_q
    current_q = policy.critic(obs, batch.actions)
    critic_loss = 0.5 * sum(F.mse_loss(q, target_q) for q in current_q)

    policy.zero_grad(set_to_none=True)
    critic_loss.backward()  # type: ignore[union-attr]
    critic_grad_tensors, critic_grad_norm = _grad_norm(encoder)
    before = [p.detach().clone() for p in encoder]
    policy.critic.optimizer.step()
    critic_step_change = _max_change(before, encoder)

    q_pi = th.cat(policy.critic(obs, actions_pi), dim=1).min(dim=1, keepdim=True)[0]
    actor_loss = (ent_coef * log_prob - q_pi).mean()
    policy.zero_grad(set_to_none=True)
    actor_loss.backward()
    actor_grad_tensors, actor_grad_norm = _grad_norm(encoder)
    _, actor_head_grad_norm = _grad_norm(list(policy.actor.latent_pi.parameters()))
    before = [p.detach().clone() for p in encoder]
    policy.actor.optimizer.step()
    actor_step_change = _max_change(before, encoder)

    online = list(policy.critic.parameters())
    target = list(policy.critic_target.parameters())
    online_encoder = list(policy.critic.features_extractor.parameters())
    target_encoder = list(policy.critic_target.features_extractor.parameters())
    gap_before = _distance(online_encoder, target_encoder)
    polyak_update(online, target, tau)  # the very call SAC.train() makes
    gap_after = _distance(online_encoder, target_encoder)

    return GradientFlow(
        policy_class=type(policy).__name__,
        encoder_tensors=len(encoder),
        in_actor_optimizer=routing["encoder_in_actor_optimizer"],
        in_critic_optimizer=_count_in_optimizer(policy.critic.optimizer, {id(p) for p in encoder}),
        critic_grad_tensors=critic_grad_tensors,
        critic_grad_norm=critic_grad_norm,
        critic_step_change=critic_step_change,
        actor_grad_tensors=actor_grad_tensors,
        actor_grad_norm=actor_grad_norm,
        actor_head_grad_norm=actor_head_grad_norm,
        actor_step_change=actor_step_change,
        target_separate=routing["target_encoder_separate"],
        polyak_gap_ratio=gap_after / gap_before if gap_before > 0 else math.nan,
    )


class LossRecorder(BaseCallback):
    """Collects SAC's logged losses after every update; optionally prints them with steps/s."""

    KEYS = ("train/critic_loss", "train/actor_loss", "train/ent_coef")

    def __init__(self, print_every: int = 0):
        super().__init__()
        self.print_every = print_every
        self.history: list[dict[str, float]] = []
        self._seen_updates = 0
        self._t0 = 0.0

    def _on_training_start(self) -> None:
        self._t0 = time.perf_counter()

    def _record(self) -> None:
        n_updates = getattr(self.model, "_n_updates", 0)
        if n_updates > self._seen_updates:  # a train() call happened since the last look
            self._seen_updates = n_updates
            values = self.logger.name_to_value
            self.history.append({key: float(values[key]) for key in self.KEYS if key in values})

    def _on_step(self) -> bool:
        self._record()
        if self.print_every and self.num_timesteps % self.print_every == 0 and self.history:
            last = self.history[-1]
            rate = self.num_timesteps / (time.perf_counter() - self._t0)
            print(
                f"step {self.num_timesteps:>6}  critic_loss {last.get('train/critic_loss', math.nan):8.4f}  "
                f"actor_loss {last.get('train/actor_loss', math.nan):8.4f}  "
                f"ent_coef {last.get('train/ent_coef', math.nan):.4f}  {rate:5.1f} steps/s"
            )
        return True

    def _on_training_end(self) -> None:
        self._record()  # the last train() call


def _deterministic_actions(model: SAC, obs: dict[str, th.Tensor]) -> np.ndarray:
    actions, _ = model.predict({key: value.numpy() for key, value in obs.items()}, deterministic=True)
    return actions


# ======================================================================================================
# --verify
# ======================================================================================================

CLAIM_SMOKE = f"SB3 SAC run on pixel {ENV_ID} gives finite losses and Q-values"
CLAIM_SAVE_LOAD = "SAC.save/SAC.load (no custom_objects) keeps the policy class, routing and actions"


@dataclass
class SmokeConfig:
    """The short SB3 run inside --verify (small, so the claims stay well under a minute on CPU)."""

    total_timesteps: int = 50
    """Env steps of the SB3 run: one FetchPush episode."""
    learning_starts: int = 10
    """Random-action steps before the first update."""
    train_freq: int = 2
    """Env steps per update: (50 - 10) / 2 = 20 updates, enough to show stability, cheap on a CPU."""
    batch_size: int = 16
    """Replay batch per update (SB3's default is 256; small keeps CPU time down)."""
    buffer_size: int = 100
    """Replay capacity in transitions (SB3 stores obs and next_obs whole: two 12x84x84 uint8 stacks each)."""
    seed: int = 0
    """Seeds SB3 (weights, env, action noise) and the real batch of the routing claims."""


@dataclass
class SmokeRun:
    """The outcome of `train_smoke`."""

    model: SAC
    """The trained model (its replay buffer still holds the run's transitions)."""
    losses: list[dict[str, float]]
    """SB3's logged train/critic_loss, train/actor_loss, train/ent_coef after every update."""
    q_values: th.Tensor
    """Twin Q-values of the trained critic on a replay sample, (batch, 2)."""
    encoder_change: float
    """max |delta phi| of the shared encoder over the whole run."""
    seconds: float
    """Wall-clock time of model.learn."""


def train_smoke(env: Any, config: SmokeConfig | None = None) -> SmokeRun:
    """A short real SB3 run: stock SAC.train() with DrQv2SACPolicy + ManipulationExtractor on the pixel env."""
    config = config or SmokeConfig()
    model = SAC(
        DrQv2SACPolicy,
        env,
        learning_rate=LEARNING_RATE,
        buffer_size=config.buffer_size,
        learning_starts=config.learning_starts,
        batch_size=config.batch_size,
        train_freq=config.train_freq,
        gamma=GAMMA,
        seed=config.seed,
        device="cpu",
        policy_kwargs=dict(features_extractor_class=ManipulationExtractor),
    )
    encoder = list(model.policy.actor.features_extractor.parameters())
    initial_encoder = [p.detach().clone() for p in encoder]
    recorder = LossRecorder()
    start = time.perf_counter()
    model.learn(config.total_timesteps, callback=recorder, log_interval=NO_LOG_DUMPS)
    seconds = time.perf_counter() - start
    with th.no_grad():
        sample = model.replay_buffer.sample(config.batch_size)  # type: ignore[union-attr]
        q_values = th.cat(model.policy.critic(sample.observations, sample.actions), dim=1)
    return SmokeRun(model, recorder.history, q_values, _max_change(initial_encoder, encoder), seconds)


def routing_claims(flow: GradientFlow) -> list[Claim]:
    """The routing claims (who trains the encoder) plus the target encoder, from one measured update."""
    n = flow.encoder_tensors
    return [
        Claim(
            "critic loss reaches every encoder parameter",
            flow.critic_grad_tensors == n and flow.critic_grad_norm > 0,
            f"{flow.critic_grad_tensors}/{n} tensors with grad, ||grad|| = {flow.critic_grad_norm:.3g}",
        ),
        Claim(
            "critic optimizer step changes the encoder",
            flow.critic_step_change > 0,
            f"max |delta phi| = {flow.critic_step_change:.1e}",
        ),
        Claim(
            "actor loss gives the encoder no gradient",
            flow.actor_grad_tensors == 0 and flow.actor_head_grad_norm > 0,
            f"{flow.actor_grad_tensors}/{n} tensors with grad; actor MLP ||grad|| = {flow.actor_head_grad_norm:.3g}",
        ),
        Claim(
            "actor optimizer step leaves the encoder unchanged",
            flow.actor_step_change == 0.0,
            f"max |delta phi| = {flow.actor_step_change:.1e}",
        ),
        Claim(
            "encoder tensors: 0/N in the actor optimizer, N/N in the critic optimizer",
            flow.in_actor_optimizer == 0 and flow.in_critic_optimizer == n,
            f"actor {flow.in_actor_optimizer}/{n}, critic {flow.in_critic_optimizer}/{n}",
        ),
        Claim(
            "target critic has its own encoder, moved by SB3's polyak_update",
            flow.target_separate and abs(flow.polyak_gap_ratio - (1 - TAU)) < POLYAK_RTOL,
            f"separate: {_yes(flow.target_separate)}, ||phi - phi_bar|| after/before = {flow.polyak_gap_ratio:.5f}, "
            f"1 - tau = {1 - TAU}",
        ),
    ]


def smoke_claim(run: SmokeRun, config: SmokeConfig) -> Claim:
    expected_updates = (config.total_timesteps - config.learning_starts) // config.train_freq
    losses = [row[key] for row in run.losses for key in ("train/critic_loss", "train/actor_loss") if key in row]
    last = run.losses[-1] if run.losses else {}
    passed = (
        len(run.losses) == expected_updates
        and len(losses) == 2 * expected_updates
        and all(math.isfinite(v) for v in losses)
        and bool(th.isfinite(run.q_values).all())
        and run.encoder_change > 0
    )
    return Claim(
        f"{config.total_timesteps}-step {CLAIM_SMOKE}",
        passed,
        f"{len(run.losses)} updates in {run.seconds:.1f} s, last critic_loss "
        f"{last.get('train/critic_loss', math.nan):.4f}, actor_loss {last.get('train/actor_loss', math.nan):.4f}, "
        f"Q in [{float(run.q_values.min()):.3f}, {float(run.q_values.max()):.3f}], "
        f"encoder moved {run.encoder_change:.1e}",
    )


def save_load_claim(model: SAC, obs: dict[str, th.Tensor]) -> Claim:
    """SAC.save / SAC.load WITHOUT custom_objects: same policy class, same deterministic actions, same routing."""
    before = _deterministic_actions(model, obs)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "drqv2_sac.zip"
        model.save(path)
        loaded = SAC.load(path, device="cpu")
    max_diff = float(np.abs(before - _deterministic_actions(loaded, obs)).max())
    routing = routing_report(loaded.policy)
    n = routing["encoder_tensors"]
    passed = (
        type(loaded.policy) is DrQv2SACPolicy
        and max_diff <= SAVE_LOAD_ATOL
        and routing["encoder_in_actor_optimizer"] == 0
        and routing["encoder_in_critic_optimizer"] == n
    )
    return Claim(
        CLAIM_SAVE_LOAD,
        passed,
        f"class {type(loaded.policy).__module__}.{type(loaded.policy).__name__}, max |delta action| = "
        f"{max_diff:.1e} (tol {SAVE_LOAD_ATOL:.0e}), actor {routing['encoder_in_actor_optimizer']}/{n}, "
        f"critic {routing['encoder_in_critic_optimizer']}/{n}",
    )


def verify(config: SmokeConfig | None = None) -> list[Claim]:
    """Routing claims on a fresh DrQv2SACPolicy and a real batch, then a short SB3 run and a save/load round trip."""
    config = config or SmokeConfig()
    env = make_fetch_env(ENV_ID, pixels=True, goal_mode="both")
    try:
        batch = collect_real_batch(env, ROUTING_BATCH, seed=config.seed)
        th.manual_seed(config.seed)
        flow = verify_gradient_flow(drqv2_policy(env.observation_space, env.action_space), batch)
        run = train_smoke(env, config)
        return [*routing_claims(flow), smoke_claim(run, config), save_load_claim(run.model, batch.observations)]
    finally:
        env.close()


# ======================================================================================================
# --probe: SB3's shared encoder vs ours, same weights, same real batch
# ======================================================================================================


@dataclass
class ProbeResult:
    """One measured SAC update for each routing, plus their static routing reports."""

    sb3: GradientFlow
    """SB3's SACPolicy(share_features_extractor=True)."""
    ours: GradientFlow
    """DrQv2SACPolicy, same initial weights, same batch."""
    sb3_report: dict[str, Any]
    """routing_report of SB3's policy (before the update)."""
    ours_report: dict[str, Any]
    """routing_report of DrQv2SACPolicy (before the update)."""
    obs_space_ok: bool
    """The real batch has exactly the shapes and dtypes of the env's (and the policy's) Dict space."""

    @property
    def critic_to_actor_ratio(self) -> float:
        """||dL_Q/dphi|| (ours) / ||dL_pi/dphi|| (SB3 shared: the actor loss's gradient before our detach)."""
        return self.ours.critic_grad_norm / self.sb3.actor_grad_norm if self.sb3.actor_grad_norm > 0 else math.inf

    @property
    def as_expected(self) -> bool:
        """SB3's shared encoder learns from the actor loss only; ours from the critic loss only."""
        sb3, ours, n = self.sb3, self.ours, self.ours.encoder_tensors
        sb3_actor_only = (sb3.in_actor_optimizer, sb3.in_critic_optimizer, sb3.critic_grad_tensors,
                          sb3.actor_grad_tensors) == (n, 0, 0, n)
        sb3_actor_only &= sb3.critic_step_change == 0 and sb3.actor_step_change > 0
        ours_critic_only = (ours.in_actor_optimizer, ours.in_critic_optimizer, ours.critic_grad_tensors,
                            ours.actor_grad_tensors) == (0, n, n, 0)
        ours_critic_only &= ours.critic_step_change > 0 and ours.actor_step_change == 0
        return sb3_actor_only and ours_critic_only and self.obs_space_ok


def _obs_matches_space(obs: dict[str, th.Tensor], space: spaces.Dict) -> bool:
    return set(obs) == set(space.spaces) and all(
        tuple(obs[key].shape[1:]) == box.shape and obs[key].numpy().dtype == box.dtype
        for key, box in space.spaces.items()
    )


def probe(seed: int = 0) -> ProbeResult:
    """Measure one SAC update on SB3's `SACPolicy(share_features_extractor=True)` and on `DrQv2SACPolicy`.

    Both start from the SAME weights (the module layout is identical, so ours' state_dict loads into SB3's)
    and see the SAME real batch: every difference in the table is routing, not luck.
    """
    env = make_fetch_env(ENV_ID, pixels=True, goal_mode="both")
    try:
        batch = collect_real_batch(env, ROUTING_BATCH, seed=seed)
        th.manual_seed(seed)
        ours = drqv2_policy(env.observation_space, env.action_space)
        sb3 = sb3_shared_encoder_policy(env.observation_space, env.action_space)
        sb3.load_state_dict(ours.state_dict())
        sb3_report, ours_report = routing_report(sb3), routing_report(ours)
        return ProbeResult(
            sb3=verify_gradient_flow(sb3, batch),
            ours=verify_gradient_flow(ours, batch),
            sb3_report=sb3_report,
            ours_report=ours_report,
            obs_space_ok=_obs_matches_space(batch.observations, env.observation_space)
            and ours.observation_space == env.observation_space,
        )
    finally:
        env.close()


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))


def print_probe(result: ProbeResult) -> None:
    sb3, ours, n = result.sb3, result.ours, result.ours.encoder_tensors

    def grad(norm: float, tensors: int) -> str:
        return f"{norm:.3g} ({tensors}/{n} tensors)"

    def moved(change: float) -> str:
        return f"{_yes(change > 0)} ({change:.1e})"

    print(f"One SAC update (SAC.train() order) on {ROUTING_BATCH} real {ENV_ID} pixel transitions, "
          "same initial weights")
    _print_table(
        ("", "SB3 SACPolicy(share=True)", "DrQv2SACPolicy"),
        [
            ("encoder in actor optimizer", f"{sb3.in_actor_optimizer}/{n}", f"{ours.in_actor_optimizer}/{n}"),
            ("encoder in critic optimizer", f"{sb3.in_critic_optimizer}/{n}", f"{ours.in_critic_optimizer}/{n}"),
            ("critic loss -> encoder ||grad||", grad(sb3.critic_grad_norm, sb3.critic_grad_tensors),
             grad(ours.critic_grad_norm, ours.critic_grad_tensors)),
            ("critic step moves encoder (max |dphi|)", moved(sb3.critic_step_change), moved(ours.critic_step_change)),
            ("actor loss -> encoder ||grad||", grad(sb3.actor_grad_norm, sb3.actor_grad_tensors),
             grad(ours.actor_grad_norm, ours.actor_grad_tensors)),
            ("actor step moves encoder (max |dphi|)", moved(sb3.actor_step_change), moved(ours.actor_step_change)),
            ("target critic has its own encoder", _yes(sb3.target_separate), _yes(ours.target_separate)),
            ("polyak: gap after/before (1 - tau)", f"{sb3.polyak_gap_ratio:.5f}", f"{ours.polyak_gap_ratio:.5f}"),
            ("encoder trained by", result.sb3_report["trained_by"], result.ours_report["trained_by"]),
        ],
    )
    print()
    print("Encoder gradient L2 norm at initialization, same weights and batch:")
    print(f"  from the critic loss (ours)                           {ours.critic_grad_norm:.4g}")
    print(f"  from the actor loss, before the detach (SB3 shared)   {sb3.actor_grad_norm:.4g}")
    print(f"  ratio critic / actor                                  {result.critic_to_actor_ratio:.1f}x")
    print("(SB3's true default, share_features_extractor=False, builds two encoders: the actor's learns from the "
          "actor loss, the critic's from the critic loss, at twice the encoder compute.)")
    print("probe: " + ("routing as expected" if result.as_expected else "UNEXPECTED routing, see the table"))


# ======================================================================================================
# --bridge: the chapter's match criteria, SB3's shared encoder vs ours
# ======================================================================================================


def print_bridge(claims: list[Claim] | None = None, result: ProbeResult | None = None) -> int:
    """Print the Bridging Proof's match criteria for SB3's shared encoder and for DrQv2SACPolicy.

    Runs (and prints) `verify()` and `probe()` when their results are not passed in, as `--bridge` does.
    Returns 0 when DrQv2SACPolicy meets every criterion, else 1.
    """
    if claims is None:
        claims = verify()
        report(claims)
        print()
    if result is None:
        result = probe()
        print_probe(result)
    sb3, ours, n = result.sb3, result.ours, result.ours.encoder_tensors
    smoke = next(c for c in claims if CLAIM_SMOKE in c.name)
    save_load = next(c for c in claims if c.name == CLAIM_SAVE_LOAD)
    routing = [c for c in claims if c is not smoke and c is not save_load]

    def dims(rep: dict[str, Any]) -> str:
        return f"{rep['features_dim']} = {rep['actor_input_dim']} = {rep['critic_input_dim']}"

    ours_rep = result.ours_report
    rows = [
        ("wrapper obs match SB3's Dict obs space", _yes(result.obs_space_ok), _yes(result.obs_space_ok),
         result.obs_space_ok),
        ("features_dim = actor in = critic in", dims(result.sb3_report), dims(ours_rep),
         ours_rep["features_dim"] == ours_rep["actor_input_dim"] == ours_rep["critic_input_dim"]),
        ("encoder in actor optimizer (want 0/N)", f"{sb3.in_actor_optimizer}/{n}", f"{ours.in_actor_optimizer}/{n}",
         ours.in_actor_optimizer == 0),
        ("encoder in critic optimizer (want N/N)", f"{sb3.in_critic_optimizer}/{n}",
         f"{ours.in_critic_optimizer}/{n}", ours.in_critic_optimizer == n),
        ("critic loss trains the encoder", _yes(sb3.critic_step_change > 0), _yes(ours.critic_step_change > 0),
         ours.critic_step_change > 0),
        ("actor loss leaves the encoder alone", _yes(sb3.actor_step_change == 0),
         _yes(ours.actor_step_change == 0), ours.actor_step_change == 0),
        ("routing claims of --verify", "-", f"{sum(c.passed for c in routing)}/{len(routing)}",
         all(c.passed for c in routing)),
        ("save/load: actions within 1e-6", "-", _yes(save_load.passed), save_load.passed),
        ("SB3 training: finite losses and Q", "-", _yes(smoke.passed), smoke.passed),
    ]
    print()
    print("Bridge (the chapter's match criteria): SB3 shared encoder vs DrQv2SACPolicy")
    _print_table(
        ("criterion", "SB3 share=True", "DrQv2SACPolicy", "ours"),
        [(name, left, right, "PASS" if ok else "FAIL") for name, left, right, ok in rows],
    )
    print(f"encoder gradient, critic loss / actor loss before the detach: {result.critic_to_actor_ratio:.1f}x "
          f"({ours.critic_grad_norm:.3g} / {sb3.actor_grad_norm:.3g})")
    n_met = sum(ok for *_, ok in rows)
    print(f"bridge: {n_met}/{len(rows)} criteria met by DrQv2SACPolicy")
    return 0 if n_met == len(rows) else 1


# ======================================================================================================
# --demo: SAC + HER + DrQv2SACPolicy + ManipulationExtractor on pixel FetchPush-v4
# ======================================================================================================


@dataclass
class DemoConfig:
    """A wiring test sized for a 2-core CPU: every piece of the chapter's pipeline, far too short to learn."""

    steps: int = 5_000
    """Environment steps (100 FetchPush episodes)."""
    learning_starts: int = 500
    """Random-action steps before the first update (HER needs at least one finished 50-step episode)."""
    batch_size: int = 32
    """Replay batch per update (the chapter's runs use 256 on a GPU)."""
    train_freq: int = 10
    """Env steps between updates: one update per 10 steps keeps the CPU demo short."""
    gradient_steps: int = 1
    """Updates per train_freq env steps."""
    buffer_size: int = 5_000
    """Replay capacity in transitions (all of the demo's steps)."""
    n_sampled_goal: int = 4
    """HER relabelled goals per real one ('future' strategy)."""
    print_every: int = 500
    """Print losses and steps/s every this many env steps."""
    seed: int = 0
    """Seeds SB3: weights, env resets, exploration."""


MIN_DEMO_STEPS = 200  # four episodes: updates start after two, so HER has finished episodes to relabel


def demo(config: DemoConfig | None = None) -> int:
    """Train SAC + HER + DrQv2SACPolicy + ManipulationExtractor with a progress bar; 0 if all losses are finite."""
    config = config or DemoConfig()
    env = make_fetch_env(ENV_ID, pixels=True, goal_mode="both")
    try:
        model = SAC(
            DrQv2SACPolicy,
            env,
            learning_rate=LEARNING_RATE,
            buffer_size=config.buffer_size,
            learning_starts=config.learning_starts,
            batch_size=config.batch_size,
            train_freq=config.train_freq,
            gradient_steps=config.gradient_steps,
            gamma=GAMMA,
            replay_buffer_class=HerReplayBuffer,
            replay_buffer_kwargs=dict(n_sampled_goal=config.n_sampled_goal, goal_selection_strategy="future"),
            seed=config.seed,
            device="cpu",
            policy_kwargs=dict(features_extractor_class=ManipulationExtractor),
        )
        routing = routing_report(model.policy)
        print(
            f"SAC + HER + DrQv2SACPolicy + {routing['encoder_class']} on pixel {ENV_ID}: {config.steps} steps, "
            f"update every {config.train_freq} steps (batch {config.batch_size}), encoder in actor optimizer "
            f"{routing['encoder_in_actor_optimizer']}/{routing['encoder_tensors']}, in critic optimizer "
            f"{routing['encoder_in_critic_optimizer']}/{routing['encoder_tensors']}"
        )
        recorder = LossRecorder(print_every=config.print_every)
        start = time.perf_counter()
        model.learn(config.steps, callback=recorder, log_interval=NO_LOG_DUMPS, progress_bar=True)
        seconds = time.perf_counter() - start
    finally:
        env.close()
    last = recorder.history[-1] if recorder.history else {}
    values = [v for row in recorder.history for v in row.values()]
    finite = bool(values) and all(math.isfinite(v) for v in values)
    print(
        f"demo: {config.steps} steps in {seconds:.0f} s ({config.steps / seconds:.1f} steps/s), "
        f"{len(recorder.history)} updates, final critic_loss {last.get('train/critic_loss', math.nan):.4f}, "
        f"actor_loss {last.get('train/actor_loss', math.nan):.4f}, losses finite: {_yes(finite)}"
    )
    return 0 if finite else 1


# ======================================================================================================
# main
# ======================================================================================================


@dataclass
class RunOptions:
    """Options shared by the modes of this lab."""

    steps: int = DemoConfig.steps
    """env steps for --demo (HER samples only finished 50-step episodes, so at least 200)"""
    threads: int = 1
    """torch CPU threads for every mode (1 is polite on a shared machine)"""

    def __post_init__(self) -> None:
        if self.steps < MIN_DEMO_STEPS:
            raise ValueError(f"--steps must be at least {MIN_DEMO_STEPS}: HER samples only finished 50-step "
                             f"episodes, and updates start after min({DemoConfig.learning_starts}, steps // 2) steps.")
        if self.threads < 1:
            raise ValueError("--threads must be at least 1.")


def verify_mode(options: RunOptions) -> list[Claim]:
    """Gradient-routing, save/load and SB3 smoke claims."""
    th.set_num_threads(options.threads)
    return verify()


def probe_mode(options: RunOptions) -> int:
    """SB3's shared encoder (share_features_extractor=True) vs ours, side by side."""
    th.set_num_threads(options.threads)
    result = probe()
    print_probe(result)
    return 0 if result.as_expected else 1


def bridge_mode(options: RunOptions) -> int:
    """Verify + probe, one match-criteria table."""
    th.set_num_threads(options.threads)
    return print_bridge()


def demo_mode(options: RunOptions) -> int:
    """SAC + HER + DrQv2SACPolicy on pixel FetchPush-v4 for --steps env steps (5,000 by default)."""
    th.set_num_threads(options.threads)
    learning_starts = min(DemoConfig.learning_starts, options.steps // 2)
    return demo(DemoConfig(steps=options.steps, learning_starts=learning_starts))


def main(argv: Sequence[str] | None = None) -> int:
    modes = {"verify": verify_mode, "probe": probe_mode, "bridge": bridge_mode, "demo": demo_mode}
    return lab_main(__doc__, modes, argv, options=RunOptions)


if __name__ == "__main__":
    # Run the module's own copy, imported by name: SAC.save pickles DrQv2SACPolicy by reference
    # ("drqv2_sac_policy.DrQv2SACPolicy"), which any process with the project installed can load.
    # Classes defined in __main__ would be pickled by value and loaded as look-alike copies.
    import drqv2_sac_policy

    sys.exit(run_guarded(drqv2_sac_policy.main))
