"""A fast SAC update inside stable-baselines3: the same losses, drawn and stepped on the device in one go.

Why
---
On a GPU, SB3's ``SAC.train()`` keeps the GPU waiting on the host: per gradient step it samples with NumPy,
copies the batch to the device, calls ``.item()`` four times (each a wait for the GPU) and launches every small
kernel of the update one by one from Python. ``FastSAC`` keeps SB3's algorithm object (collection, callbacks,
logger, ``save``/``load``) and replaces only ``train()``:

1. the batch of every gradient step is drawn on the device (``ch09.engine.her_sampler``: HER relabelling and the
   sparse Fetch reward in torch, frames gathered from the frame-once buffer where they live);
2. critic, actor, entropy coefficient and Polyak target update are ONE step function with no host sync (no
   ``.item()``, ``.cpu()`` or Python branch on a tensor value); the losses are summed on the device and read
   only when SB3's logger dumps (``record_train_metrics`` reads them earlier, on request);
3. on CUDA that function is captured once as a CUDA graph (capturable Adam, tensors at fixed addresses) and
   replayed for every gradient step; on the CPU the same function runs eagerly.

The update, as equations (a batch of (s, a, r, s', d); sg = stop-gradient; f_a the actor's encoder, f_c the
critic's, f_t the target critic's; Q_j the twin heads, Qt_j the target heads; H the target entropy)
--------------------------------------------------------------------------------------------------------------
::

    a~ = tanh(u),  u = mu(f_a(s)) + sigma(f_a(s)) * eps1            eps1 ~ N(0, I)    (log pi: SB3's formula)
    alpha = exp(sg(log alpha))
    L_alpha = -mean( log alpha * sg(log pi(a~|s) + H) )              -> Adam step on log alpha
    y = r + gamma (1 - d) (min_j Qt_j(f_t(s'), a') - alpha log pi(a'|s')),  a' ~ pi(.|f_a(s')), eps2  (no grad)
    L_Q = 1/2 sum_j mean( (Q_j(f_c(s), a) - y)^2 )                  -> Adam step on the critic optimizer
    L_pi = mean( alpha log pi(a~|s) - min_j Q'_j(sg(z_pi), a~) )    -> Adam step on the actor optimizer
    (f_t, Qt) <- (1 - tau) (f_t, Qt) + tau (f_c, Q)                 SB3's polyak_update (target_update_interval)

Q' are the heads after the critic's Adam step (SB3 and DrQ-v2 both do this). What ``z_pi`` is, is the one place
the default departs from SB3:

| features         | used for          | SB3 ``train()`` = ``sb3_order=True``   | default: fewer passes        |
|------------------|-------------------|----------------------------------------|------------------------------|
| f_a(s)           | a~, L_alpha, L_pi | pass 1                                 | pass 1                       |
| f_a(s'), no grad | a'                | pass 2                                 | pass 2                       |
| f_t(s'), no grad | y                 | pass 3                                 | pass 3                       |
| f_c(s)           | L_Q               | pass 4                                 | pass 1 if f_c is f_a, else 4 |
| z_pi             | Q' in L_pi        | pass 5: f_c'(s), AFTER the critic step | sg(f_c(s)), BEFORE the step  |

SB3 encodes s three times because each module call extracts its own features; with one shared encoder,
passes 1 and 4 are the same function of the same weights, so reusing pass 1 is exact. Pass 5 is the
departure: ``z_pi = sg(f_c(s))`` from before the critic step instead of ``sg(f_c'(s))`` after it, which is
DrQ-v2's ``update_actor(obs.detach())``. Where the critic step does not change f_c (SB3's
``share_features_extractor=True``, whose critic optimizer excludes the encoder) the two coincide. Encoder
passes per step: SB3 5; reduced 3 with a shared encoder (DrQv2SACPolicy), 4 with separate encoders
(MultiInputPolicy). ``sb3_order=True`` restores SB3's five passes in SB3's order; ``tests/test_fast_sac.py``
checks it against ``SAC.train()`` and the default against a plain implementation of the equations above.
Gradients flow where SB3 sends them and nowhere else. The routing is the policy's own: the engine maps features
to actions and Q values through the actor's and critic's feature heads where they define them (the lab's
``CriticEncoderActor.dist_params_from_features`` with its ``sg(f(s))``, ``CriticEncoderCritic.q_values``), so an
edit of the lab's detach reaches this engine exactly as it reaches ``SAC.train()``. f_c(s) carries a gradient
only if the critic optimizer holds f_c, and each backward computes only the gradients SB3's would that an
optimizer can step, plus the actor's encoder when the actor's head lets the loss reach it (``backward(inputs=...)``).

s and s' are not concatenated into one online-encoder pass by default: the gradient of pass 1 would then run
the backward over both halves. ``fuse_next_obs_pass=True`` does it anyway (fewer, larger kernels), for a
device where that measures faster.

Precision, CUDA graph, overlap
------------------------------
- ``precision="bf16"``: the encoder passes run under ``torch.autocast(bfloat16)`` (on CUDA also with
  channels_last weights and inputs); weights, Adam states, the MLP heads and every loss stay float32.
  ``"fp32"`` (the default) changes nothing.
- ``cuda_graph=True`` (used on CUDA only): the first ``GRAPH_WARMUP_STEPS`` gradient steps run eagerly on a
  side stream (real updates; they also create Adam's state), then one step is captured and replayed. The Adam
  optimizers become ``capturable`` with one tensor learning rate (SB3's schedule still sets it each call).
  Every capture is VERIFIED before it is used: the captured step is replayed once, the state is put back (weights,
  target nets, log alpha, Adam states, loss sums, the generator's state) and the same step runs eagerly with
  the same random draws; a capture that raises, gives a non-finite value or differs by more than
  ``GRAPH_VERIFY_RTOL`` is dropped and training goes on eagerly (``graph_status`` says why, one line on stderr).
  ``cuda_graph=False`` or ``CH09_NO_CUDA_GRAPH=1`` turns the graph off. ``RecordedStepGraph`` stands in for
  the graph on a CPU, so the tests run all of this logic without a GPU.
- ``overlap_collection=True``: the updates SB3 asks for after env step t are launched after the action of
  step t + 1 is chosen and its ``step_async`` sent, so the envs simulate and render step t + 1 while the GPU
  trains on step t. Still exactly ``gradient_steps`` updates per ``train_freq`` env steps (the last ones run
  when ``learn()`` returns), and the updates of step t still see transition t; the cost is a one-step POLICY
  LAG: the action of step t + 1 comes from the weights before step t's updates (SB3: after).

Checkpoints stay plain SB3
--------------------------
``save()`` writes what ``SAC.save`` writes (the engine is not part of it; optimizer states are saved with
``capturable=False`` and a float learning rate), so ``SAC.load(path, env=env)`` loads and resumes a
``FastSAC`` checkpoint in a process that never imports this module, and ``FastSAC.load`` loads a stock one.

Use
---
    from ch09.engine.fast_sac import FastSAC
    model = FastSAC(DrQv2SACPolicy, env, replay_buffer_class=FrameStackHerReplayBuffer, precision="fp32", ...)

Any SAC configuration this engine does not cover (gSDE, an actor or critic that overrides SB3's method without a
feature head) trains with SB3's own ``train()`` and a warning saying why. Tasks without a torch reward (not a Fetch
goal task), SB3's replay buffers and VecNormalize sample on the host with the buffer's own ``sample()``; the step
is the same.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, cast

import numpy as np
import torch as th
import torch.nn.functional as F
from stable_baselines3 import SAC
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.distributions import SquashedDiagGaussianDistribution
from stable_baselines3.common.logger import KVWriter
from stable_baselines3.common.policies import BaseModel, ContinuousCritic
from stable_baselines3.common.type_aliases import DictReplayBufferSamples
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecEnvWrapper
from stable_baselines3.sac.policies import LOG_STD_MAX, LOG_STD_MIN, Actor, SACPolicy

from ch09.engine.framestack_replay import FrameStackHerReplayBuffer
from ch09.engine.her_sampler import DeviceReplayView, TorchGoalReward, device_sampler_supported, sample_her_batch

PRECISIONS = ("fp32", "bf16")
GRAPH_WARMUP_STEPS = 3
"""Eager gradient steps (on a side stream) before the capture: cuDNN picks its kernels, Adam creates its state."""

ACTOR_FEATURE_HEAD = "dist_params_from_features"
"""The actor method that maps features to (mean, log_std, kwargs) through the actor's own routing (the lab's
CriticEncoderActor detaches there); SB3's Actor has none and routes nothing, so the engine writes its formula out."""
CRITIC_FEATURE_HEAD = "q_values"
"""The critic method that maps (features, actions) to the twin Q values through the critic's own routing (the lab's
CriticEncoderCritic detaches for Q(s, pi(s))); SB3's ContinuousCritic has none."""
GRAPH_VERIFY_RTOL = {"fp32": 1e-3, "bf16": 3e-2}
"""How far a replayed step may differ from the eager step it stands for, per precision.

Measured per state tensor x (weights and buffers, target nets, log alpha, Adam moments and step counters, loss
sums) as ``||x_replay - x_eager|| / ||x_eager - x_before||``: the difference relative to the step's OWN change
of x, so the bound means the same for a weight, a moment and a loss. ``max_deviation`` is the largest over all
tensors. Why these bounds: a correct capture replays the same kernels on the same data and the same random
draws, so the two can differ only where a kernel sums in a nondeterministic order (atomic adds in the backward of
an index, some cuDNN weight-gradient algorithms). In float32 that is a rounding of ~1e-7 of a gradient, which
Adam's normalised step passes on at about that size: 1e-3 is four orders above it. With bf16 encoder passes a
flipped last bit of an activation is 2**-8 (4e-3) of it and can travel through the encoder's backward: 3e-2
leaves room for several. A wrong capture moves the step by far more: a stale batch, pointer or noise draw feeds
Adam another gradient, which changes its step by the new gradient's share of the moment (1 - beta1 = 10%) and
more; a missing optimizer or Polyak step is 100% of that tensor's change."""

NO_CUDA_GRAPH_ENV = "CH09_NO_CUDA_GRAPH"
"""Environment variable: ``CH09_NO_CUDA_GRAPH=1`` trains eagerly on CUDA (library use; ``train --no-cuda-graph``)."""

GRAPH_FALLBACK_LINE = "CUDA-graph step disabled ({reason}); training eagerly, same losses, slower"
"""The one line printed (to stderr) when a capture is dropped."""

CAPTURABLE_OPTIMIZERS = (th.optim.Adam, th.optim.AdamW)

ENGINE_ATTRIBUTES = (
    "precision", "sb3_order", "overlap_collection", "cuda_graph", "fuse_next_obs_pass", "step_graph_class",
    "_engine", "_engine_unsupported", "_pending_updates", "_unread_update_steps", "_in_learn", "_overlap_env",
    "_overlap_declined", "_graph_fallback",
)
"""FastSAC's own attributes: kept out of the checkpoint, which stays exactly what SAC.save writes."""

METRIC_NAMES = ("train/critic_loss", "train/actor_loss", "train/ent_coef", "train/ent_coef_loss")

UPDATE_SECTIONS = {
    "batch": "the batch draw (device: HER relabelling, frame gather; host: the buffer's sample())",
    "a~": "f_a(s) with its gradient (pass 1; with fuse_next_obs_pass also pass 2), the actor's sample a~",
    "L_alpha": "the entropy coefficient's loss and Adam step",
    "y": "the target, no grad: f_a(s') and a' (pass 2), f_t(s') (pass 3), the target heads",
    "L_Q": "f_c(s) where it is not pass 1 (pass 4), the critic's loss, backward and Adam step",
    "L_pi": "z_pi (pass 5 with sb3_order), the actor's loss, backward and Adam step",
    "Polyak": "the target update (when target_update_interval is 1) and the loss sums",
}
"""The parts of one gradient step, in order: ``ch09.benchmark.profile_update`` times each."""


# ======================================================================================================
# The CUDA-graph step: its status, the real graph and the CPU stand-in
# ======================================================================================================
GraphState = Literal["not-cuda", "off", "warming-up", "captured", "fallback"]


@dataclass(frozen=True)
class GraphStatus:
    """What became of the CUDA-graph step: ``model.graph_status``, recorded in the run's ``.meta.json``.

    | state      | meaning                                                                          |
    |------------|----------------------------------------------------------------------------------|
    | not-cuda   | the device is not CUDA: the step runs eagerly, as it must                        |
    | off        | turned off (``reason``: ``cuda_graph=False``, ``CH09_NO_CUDA_GRAPH=1``, ...)     |
    | warming-up | eager steps before the (next) capture                                            |
    | captured   | captured, verified against an eager step, replayed for every gradient step      |
    | fallback   | a capture failed its verification (``reason``): training goes on eagerly         |
    """

    state: GraphState
    reason: str | None = None
    """Why the graph is off, or why it fell back; None otherwise."""
    max_deviation: float | None = None
    """The largest relative difference replay vs eager at the last verification (``GRAPH_VERIFY_RTOL``)."""


class CudaContextError(RuntimeError):
    """The CUDA context broke (a ``torch.cuda.synchronize()`` raised) while the graph step was in use.

    Nothing more can run on that device in this process; checkpoints written before are intact. The training
    session turns it into one sentence that names ``--no-cuda-graph``.
    """


def graph_disabled_by_environment() -> bool:
    """True when ``CH09_NO_CUDA_GRAPH`` is set to anything but empty or 0 (read here only)."""
    return os.environ.get(NO_CUDA_GRAPH_ENV, "").strip() not in ("", "0")


class StepGraph(Protocol):
    """What the engine uses of a CUDA graph: a warm-up run, a capture of the step, replays, a device sync."""

    def __init__(self, device: th.device) -> None: ...

    def warm_up(self, step: Callable[[], None]) -> None: ...

    def capture(self, step: Callable[[], None]) -> None: ...

    def replay(self) -> None: ...

    def synchronize(self) -> None: ...


def default_generator(device: th.device) -> th.Generator:
    """The device's default generator: the device draw, DrQ's shifts and the actor's noise use it."""
    if device.type == "cuda":
        return th.cuda.default_generators[device.index if device.index is not None else th.cuda.current_device()]
    return th.default_generator


class CudaStepGraph:
    """``torch.cuda.CUDAGraph`` behind the ``StepGraph`` surface: ``capture`` records the step's kernels (nothing
    runs), ``replay`` launches them all at once."""

    def __init__(self, device: th.device) -> None:
        self.device = device
        self._graph = th.cuda.CUDAGraph()

    def warm_up(self, step: Callable[[], None]) -> None:
        with th.cuda.device(self.device):  # the model's GPU, whichever is current (cuda:1 on a multi-GPU host)
            side = th.cuda.Stream(self.device)  # PyTorch's capture recipe: warm up on a side stream
            side.wait_stream(th.cuda.current_stream(self.device))
            with th.cuda.stream(side):
                step()
            th.cuda.current_stream(self.device).wait_stream(side)

    def capture(self, step: Callable[[], None]) -> None:
        """Record the step. A capture that raises (an op CUDA cannot record, e.g. a host read) leaves the process
        as it found it: ``th.cuda.graph`` does not restore the current stream when ending the broken capture
        raises, and the generator stays in capture mode, where the eager fallback's first random draw fails."""
        with th.cuda.device(self.device):
            stream = th.cuda.current_stream(self.device)
            try:
                # A capture stream on this GPU: th.cuda.graph's default one is made once per process, on the GPU of
                # its first capture, and the kernels of a second model on another GPU would run, not be recorded.
                with th.cuda.graph(self._graph, stream=th.cuda.Stream(self.device)):
                    step()
            except BaseException:
                th.cuda.set_stream(stream)
                generator = default_generator(self.device)
                generator.graphsafe_set_state(generator.clone_state())  # the same seed and offset, not capturing
                raise

    def replay(self) -> None:
        self._graph.replay()

    def synchronize(self) -> None:
        th.cuda.synchronize(self.device)


class RecordedStepGraph:
    """A CPU stand-in for ``CudaStepGraph``: ``capture`` records the step function, ``replay`` calls it.

    ``FastSAC(step_graph_class=RecordedStepGraph)`` (any device) runs everything around the graph -- warm-up
    counting, the static batch, recapture triggers, verification and fallback -- without a GPU. It captures no
    kernels, so it cannot show what only CUDA can (a stale pointer read by a replay); ``pytest -m gpu`` does.
    """

    def __init__(self, device: th.device) -> None:
        self.device = device
        self._step: Callable[[], None] | None = None

    def warm_up(self, step: Callable[[], None]) -> None:
        step()

    def capture(self, step: Callable[[], None]) -> None:
        self._step = step

    def replay(self) -> None:
        if self._step is None:
            raise RuntimeError("replay() before capture()")
        self._step()

    def synchronize(self) -> None:
        pass


@contextlib.contextmanager
def cudnn_benchmark() -> Iterator[None]:
    """``cudnn.benchmark`` on for the engine's work (fixed shapes: cuDNN times its kernels once), and put back
    after, so the rest of the process keeps its own setting."""
    previous = th.backends.cudnn.benchmark
    th.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        th.backends.cudnn.benchmark = previous


# ======================================================================================================
# The pieces of SB3's losses, written out so no torch.distributions object (which validates its arguments
# with a host sync) is built inside the step
# ======================================================================================================
def squashed_gaussian_sample(mean: th.Tensor, log_std: th.Tensor, epsilon: float) -> tuple[th.Tensor, th.Tensor]:
    """a = tanh(mean + std * eps), eps ~ N(0, I), and log pi(a): SB3's SquashedDiagGaussianDistribution, op by op.

    | argument / output | shape  | meaning                                                       |
    |-------------------|--------|---------------------------------------------------------------|
    | mean, log_std     | (B, A) | the actor's outputs (log_std already clamped to [-20, 2])     |
    | return a          | (B, A) | the squashed action                                           |
    | return log_prob   | (B,)   | Gaussian log-density of u minus sum log(1 - a^2 + epsilon)   |

    The noise is drawn with ``normal_`` on a tensor like ``mean``, as ``Normal.rsample`` does, so the same
    generator state gives the same action as SB3.
    """
    std = th.ones_like(mean) * log_std.exp()
    gaussian = mean + th.empty_like(mean).normal_() * std
    actions = th.tanh(gaussian)
    log_prob = (-((gaussian - mean) ** 2) / (2 * std**2) - std.log() - math.log(math.sqrt(2 * math.pi))).sum(dim=1)
    log_prob = log_prob - th.log(1 - actions**2 + epsilon).sum(dim=1)
    return actions, log_prob


def _actor_head(actor: Actor, features: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """get_action_dist_params after the features: (mean, clamped log_std), through the actor's own feature head
    when it has one (the lab's, with its detach), else SB3's Actor formula."""
    feature_head = getattr(actor, ACTOR_FEATURE_HEAD, None)
    if feature_head is not None:
        mean, log_std, _ = feature_head(features)
        return mean, log_std
    latent = actor.latent_pi(features)
    # SB3 types log_std as gSDE's Parameter; without gSDE (which the engine leaves to SB3) it is a Linear layer.
    log_std_layer = cast(th.nn.Linear, actor.log_std)
    return actor.mu(latent), th.clamp(log_std_layer(latent), LOG_STD_MIN, LOG_STD_MAX)


def _q_values(critic: ContinuousCritic, features: th.Tensor, actions: th.Tensor) -> list[th.Tensor]:
    """The twin Q values after the features, through the critic's own feature head when it has one (the lab's)."""
    feature_head = getattr(critic, CRITIC_FEATURE_HEAD, None)
    if feature_head is not None:
        return list(feature_head(features, actions))
    q_input = th.cat([features, actions], dim=1)
    return [q_net(q_input) for q_net in critic.q_networks]


def _head_passes_gradient(actor: Actor) -> bool:
    """Whether the actor's head lets a gradient through to its features: asked of the head itself, once, on a
    probe batch (the lab's CriticEncoderActor answers no: its detach)."""
    probe = th.zeros(2, actor.features_dim, device=next(actor.parameters()).device, requires_grad=True)
    mean, log_std = _actor_head(actor, probe)
    return th.autograd.grad((mean.sum() + log_std.sum()), probe, allow_unused=True)[0] is not None


def _optimizer_params(optimizer: th.optim.Optimizer) -> list[th.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


@dataclass(frozen=True)
class Routing:
    """Which loss reaches which encoder: the optimizers say what each step updates, the actor's head says whether
    the actor loss differentiates its features at all (the lab's detach), so it holds for any layout.

    | layout                                   | shared | actor optimizer | critic optimizer | actor head   |
    |------------------------------------------|--------|-----------------|------------------|--------------|
    | MultiInputPolicy (separate encoders)     | no     | holds f_a       | holds f_c        | passes grad  |
    | DrQv2SACPolicy (DrQ-v2 routing)          | yes    | not f           | holds f          | detaches     |
    | SACPolicy(share_features_extractor=True) | yes    | holds f         | not f            | passes grad  |
    """

    shared_encoder: bool
    actor_trains_encoder: bool
    critic_trains_encoder: bool
    actor_head_passes_gradient: bool = True

    @classmethod
    def of(cls, policy: Any) -> Routing:
        actor_encoder, critic_encoder = policy.actor.features_extractor, policy.critic.features_extractor
        actor_held = {id(p) for p in _optimizer_params(policy.actor.optimizer)}
        critic_held = {id(p) for p in _optimizer_params(policy.critic.optimizer)}
        return cls(
            shared_encoder=actor_encoder is critic_encoder,
            actor_trains_encoder=any(id(p) in actor_held for p in actor_encoder.parameters()),
            critic_trains_encoder=any(id(p) in critic_held for p in critic_encoder.parameters()),
            actor_head_passes_gradient=_head_passes_gradient(policy.actor),
        )

    @property
    def critic_may_reuse_actor_pass(self) -> bool:
        """f_c(s) = f_a(s) is pass 1 again, unless both losses would backpropagate through that one pass."""
        return self.shared_encoder and not (self.critic_trains_encoder and self.actor_head_passes_gradient)


def _defining_class(cls: type, name: str) -> type | None:
    return next((klass for klass in cls.__mro__ if name in vars(klass)), None)


def _routing_unknown(module: Any, sb3_class: type, sb3_method: str, feature_head: str) -> bool:
    """True when the class overrides SB3's method below its feature head (or has none): then the engine could not
    call its routing without bypassing the override."""
    override = _defining_class(type(module), sb3_method)
    if override is sb3_class:
        return False
    head = _defining_class(type(module), feature_head)
    if head is None:
        return True
    assert override is not None, f"module is a {sb3_class.__name__}, which defines {sb3_method}"
    return not issubclass(head, override)


def unsupported_reason(model: SAC) -> str | None:
    """None if the engine reproduces this model's SB3 update; otherwise why not (one sentence fragment)."""
    policy = model.policy
    if model.use_sde:
        return "gSDE exploration (use_sde=True)"
    if _routing_unknown(policy.actor, Actor, "get_action_dist_params", ACTOR_FEATURE_HEAD):
        return (f"the actor class {type(policy.actor).__name__} overrides get_action_dist_params without a "
                f"{ACTOR_FEATURE_HEAD} method")
    for name in ("critic", "critic_target"):
        if _routing_unknown(getattr(policy, name), ContinuousCritic, "forward", CRITIC_FEATURE_HEAD):
            return (f"the {name} class {type(getattr(policy, name)).__name__} overrides forward without a "
                    f"{CRITIC_FEATURE_HEAD} method")
    if not isinstance(policy.actor.action_dist, SquashedDiagGaussianDistribution):
        return f"the action distribution is {type(policy.actor.action_dist).__name__}"
    return None


# ======================================================================================================
# Optimizers: capturable for a CUDA graph, portable in a checkpoint
# ======================================================================================================
def make_capturable(optimizer: th.optim.Optimizer, device: th.device,
                    learning_rate: th.Tensor | None = None) -> None:
    """Turn an SB3-built Adam into a capturable one in place: step counters and the learning rate on the device.

    A captured graph replays fixed kernels; a Python float learning rate would be frozen into it, and a CPU
    step counter cannot be incremented inside it. SB3's schedule keeps working through ``fill_`` (see
    ``FastSAC._update_learning_rate``). ``learning_rate``: one device tensor to share (SB3 gives all three
    optimizers the same schedule, so one ``fill_`` per call sets them all).
    """
    for group in optimizer.param_groups:
        group["capturable"] = True
        if learning_rate is not None:
            learning_rate.fill_(float(group["lr"]))
            group["lr"] = learning_rate
        elif not isinstance(group["lr"], th.Tensor):
            group["lr"] = th.tensor(float(group["lr"]), dtype=th.float32, device=device)
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = state["step"].to(device=device, dtype=th.float32)


def portable_optimizer_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state_dict as stock SB3 writes it: ``capturable=False``, float lr, CPU step counters.

    ``Adam.load_state_dict`` copies the saved hyper-parameters into the optimizer, so a saved
    ``capturable=True`` would make a CPU run of plain SB3 fail at its first step.
    """
    groups = []
    for group in state_dict["param_groups"]:
        lr = group["lr"]
        groups.append({**group, "capturable": False, "lr": float(lr) if isinstance(lr, th.Tensor) else lr})
    state = {}
    for index, values in state_dict["state"].items():
        values = dict(values)  # a copy: the live optimizer shares these dicts
        if isinstance(values.get("step"), th.Tensor):
            values["step"] = values["step"].detach().to("cpu", th.float32)
        state[index] = values
    return {**state_dict, "param_groups": groups, "state": state}


# ======================================================================================================
# The engine: everything the fast update holds at run time (never saved)
# ======================================================================================================
def planned_graph_status(model: FastSAC) -> GraphStatus:
    """What the engine will do with the CUDA graph, before its first capture (also its starting state).

    A fallback stays for the model's life: a new engine (another batch size, reloaded parameters) does not try
    again and does not warn again.
    """
    if model._graph_fallback is not None:
        return model._graph_fallback
    if not model.cuda_graph:
        return GraphStatus("off", "cuda_graph=False (train --no-cuda-graph)")
    if graph_disabled_by_environment():
        return GraphStatus("off", f"{NO_CUDA_GRAPH_ENV}={os.environ[NO_CUDA_GRAPH_ENV]}")
    if model.device.type != "cuda" and model.step_graph_class is None:
        return GraphStatus("not-cuda")
    reason = unsupported_reason(model)
    if reason is not None:
        return GraphStatus("off", f"SB3's own train() runs because of {reason}")
    optimizers = [model.actor.optimizer, model.critic.optimizer, model.ent_coef_optimizer]
    if not all(isinstance(opt, CAPTURABLE_OPTIMIZERS) for opt in optimizers if opt is not None):
        return GraphStatus("off", "a CUDA graph needs Adam or AdamW (capturable) optimizers")
    return GraphStatus("warming-up")


class SacUpdateEngine:
    """The step function of the module docstring, its batch source, and on CUDA its captured, verified graph."""

    def __init__(self, model: FastSAC, batch_size: int) -> None:
        policy = model.policy
        self.model, self.batch_size, self.device = model, batch_size, model.device
        self.actor, self.critic, self.critic_target = policy.actor, policy.critic, policy.critic_target
        self.routing = Routing.of(policy)
        self.sb3_order, self.fuse_next_obs_pass = model.sb3_order, model.fuse_next_obs_pass
        self.bf16 = model.precision == "bf16"
        self.verify_rtol = GRAPH_VERIFY_RTOL[model.precision]
        self.channels_last = self.bf16 and self.device.type == "cuda"
        self.status = planned_graph_status(model)
        self.use_graph = self.status.state == "warming-up"
        self.graph_class: type[StepGraph] = model.step_graph_class or CudaStepGraph
        self.epsilon = self.actor.action_dist.epsilon
        self.gamma, self.tau = model.gamma, model.tau
        self.polyak_every_step = model.target_update_interval == 1
        self.optimizers = [self.actor.optimizer, self.critic.optimizer]
        if model.ent_coef_optimizer is not None:
            self.optimizers.append(model.ent_coef_optimizer)
        self.actor_params: list[th.Tensor] = _optimizer_params(self.actor.optimizer)
        if self.routing.actor_head_passes_gradient and not self.routing.actor_trains_encoder:
            # What SB3's actor_loss.backward() differentiates too: the actor's encoder, stepped by no optimizer.
            self.actor_params += list(self.actor.features_extractor.parameters())
        self.critic_params: list[th.Tensor] = _optimizer_params(self.critic.optimizer)
        self.polyak_sources: list[th.Tensor] = list(self.critic.parameters())
        self.polyak_targets: list[th.Tensor] = list(self.critic_target.parameters())
        self.norm_stat_sources, self.norm_stat_targets = model.batch_norm_stats, model.batch_norm_stats_target
        self.metric_sums = th.zeros(len(METRIC_NAMES), device=self.device)

        assert model.replay_buffer is not None, "SAC._setup_model creates the buffer before any train()"
        self.buffer: FrameStackHerReplayBuffer | ReplayBuffer = model.replay_buffer
        self.view, self.reward_fn, self.host_sampling_reason = self._device_sampler(model)
        if self.channels_last:
            self._encoders_to_channels_last()
        if self.use_graph and self.device.type == "cuda":  # (Adam refuses capturable=True on a CPU)
            learning_rate = th.zeros((), dtype=th.float32, device=self.device)
            for optimizer in self.optimizers:
                make_capturable(optimizer, self.device, learning_rate)
        self.graph: StepGraph | None = None  # set only once a capture has been verified
        self.static_batch: DictReplayBufferSamples | None = None
        self.warmup_steps_left = GRAPH_WARMUP_STEPS
        self._captured_addresses: list[int] | None = None
        self._next_graph: StepGraph | None = None  # the graph being warmed up for the next capture
        self.profiling = False  # True only in eager_steps_in_sections: the step's parts in named profiler ranges

    # ---- batch source ----------------------------------------------------------------------------
    def _device_sampler(self, model: FastSAC) -> tuple[DeviceReplayView | None, TorchGoalReward | None, str | None]:
        buffer = self.buffer
        reason = device_sampler_supported(buffer, model._vec_normalize_env, self.device)
        if reason is not None:
            return None, None, reason
        assert isinstance(buffer, FrameStackHerReplayBuffer), "device_sampler_supported accepts no other buffer"
        reward_fn = None
        if buffer.n_sampled_goal > 0:
            reward_fn = TorchGoalReward.for_env(model.env) if model.env is not None else None
            numpy_reward = buffer.compute_reward
            if reward_fn is None or numpy_reward is None:
                return None, None, "the task has no torch compute_reward (not a Fetch goal task)"
            goal_shape = buffer.observation_space["achieved_goal"].shape
            assert goal_shape is not None, "a float Box: device_sampler_supported admits no other key"
            dtype = buffer.vectors.dtype
            if not reward_fn.matches(numpy_reward, int(np.prod(goal_shape)), dtype):
                return None, None, "the torch reward differs from the env's compute_reward on random goals"
        return DeviceReplayView(buffer, self.device), reward_fn, None

    def _sample(self) -> DictReplayBufferSamples:
        """One batch: drawn on the device (inside the graph), or the buffer's own host ``sample()``."""
        if self.view is not None:
            return sample_her_batch(self.view, self.batch_size, self.reward_fn)[0]
        # SB3 types sample() for any buffer; the engine's tasks have dict (goal) observations, so a DictReplayBuffer.
        return cast(DictReplayBufferSamples, self.buffer.sample(self.batch_size, env=self.model._vec_normalize_env))

    def stale(self) -> bool:
        """The model swapped its buffer, or the buffer an array: build a new engine."""
        return self.model.replay_buffer is not self.buffer or (self.view is not None and self.view.is_stale())

    # ---- precision -------------------------------------------------------------------------------
    def _encoders_to_channels_last(self) -> None:
        encoders = {id(m): m for m in (self.actor.features_extractor, self.critic.features_extractor,
                                       self.critic_target.features_extractor)}
        for encoder in encoders.values():
            # swaps .data: the optimizers keep the same Parameters (torch's stubs lack Module.to(memory_format=))
            encoder.to(memory_format=th.channels_last)  # type: ignore[call-overload]
        for optimizer in self.optimizers:  # Adam moments in the same layout as their weights
            for param, state in optimizer.state.items():
                for key, value in state.items():
                    if isinstance(value, th.Tensor) and value.dim() == 4 and value.shape == param.shape:
                        state[key] = value.contiguous(memory_format=th.channels_last)

    def _encode(self, module: Any, obs: dict[str, th.Tensor]) -> th.Tensor:
        """module.extract_features (SB3's preprocessing, then the module's encoder), float32 out."""
        if self.channels_last:
            obs = {k: v.contiguous(memory_format=th.channels_last) if v.dim() == 4 else v for k, v in obs.items()}
        with th.autocast(self.device.type, dtype=th.bfloat16, enabled=self.bf16, cache_enabled=False):
            features = module.extract_features(obs, module.features_extractor)
        return features.float()

    def _encode_with_next(self, module: Any, obs: dict[str, th.Tensor],
                          next_obs: dict[str, th.Tensor]) -> tuple[th.Tensor, th.Tensor]:
        """One pass over [s; s']: (f(s) with gradient, sg(f(s')))."""
        both = {key: th.cat([obs[key], next_obs[key]]) for key in obs}
        features = self._encode(module, both)
        return features[: self.batch_size], features[self.batch_size:].detach()

    # ---- the step --------------------------------------------------------------------------------
    def _zero_grad(self, optimizer: th.optim.Optimizer) -> None:
        # Inside a graph the gradients must stay at fixed addresses: zero them instead of freeing them.
        optimizer.zero_grad(set_to_none=not self.use_graph)

    def _section(self, name: str) -> contextlib.AbstractContextManager[Any]:
        """A named torch.profiler range around one part of the step in ``eager_steps_in_sections``; else nothing."""
        assert name in UPDATE_SECTIONS, name
        return th.profiler.record_function(name) if self.profiling else contextlib.nullcontext()

    def update(self, batch: DictReplayBufferSamples | None) -> None:
        """One gradient step: the equations of the module docstring. No host sync anywhere in here."""
        model, actor, critic, routing = self.model, self.actor, self.critic, self.routing
        if batch is None:
            with self._section("batch"):
                batch = self._sample()
        obs, next_obs = batch.observations, batch.next_observations
        batch_discounts: th.Tensor | None = getattr(batch, "discounts", None)
        discounts = batch_discounts if batch_discounts is not None else self.gamma

        with self._section("a~"):
            actor_z = next_actor_z = critic_z = None
            if self.sb3_order or not self.fuse_next_obs_pass:
                actor_z = self._encode(actor, obs)  # pass 1
            else:
                actor_z, next_actor_z = self._encode_with_next(actor, obs, next_obs)  # passes 1 + 2 as one
            if not self.sb3_order and routing.critic_may_reuse_actor_pass:
                critic_z = actor_z if routing.critic_trains_encoder else actor_z.detach()  # pass 4 = pass 1
            # The actor's head routes its features (the lab's CriticEncoderActor: sg(f(s))), exactly as in
            # SAC.train().
            actions_pi, log_prob = squashed_gaussian_sample(*_actor_head(actor, actor_z), self.epsilon)  # eps1
            log_prob = log_prob.reshape(-1, 1)

        with self._section("L_alpha"):
            if model.ent_coef_optimizer is not None:
                assert model.log_ent_coef is not None, "SAC._setup_model creates log_ent_coef with its optimizer"
                # SB3 types target_entropy str | float ("auto"); _setup_model has turned it into a float.
                target_entropy = cast(float, model.target_entropy)
                ent_coef = th.exp(model.log_ent_coef.detach())
                ent_coef_loss = -(model.log_ent_coef * (log_prob + target_entropy).detach()).mean()
                self._zero_grad(model.ent_coef_optimizer)
                ent_coef_loss.backward(inputs=[model.log_ent_coef])
                model.ent_coef_optimizer.step()
            else:
                ent_coef = model.ent_coef_tensor
                ent_coef_loss = th.zeros((), device=self.device)

        with self._section("y"), th.no_grad():
            if next_actor_z is None:
                next_actor_z = self._encode(actor, next_obs)  # pass 2
            next_actions, next_log_prob = squashed_gaussian_sample(*_actor_head(actor, next_actor_z), self.epsilon)
            target_z = self._encode(self.critic_target, next_obs)  # pass 3
            next_q = th.cat(_q_values(self.critic_target, target_z, next_actions), dim=1)
            next_q, _ = th.min(next_q, dim=1, keepdim=True)
            next_q = next_q - ent_coef * next_log_prob.reshape(-1, 1)
            target_q = batch.rewards + (1 - batch.dones) * discounts * next_q

        with self._section("L_Q"):
            if critic_z is None:
                critic_z = self._encode(critic, obs)  # pass 4
                if not routing.critic_trains_encoder:
                    critic_z = critic_z.detach()
            current_q = _q_values(critic, critic_z, batch.actions)
            # A tensor: the twin heads' losses are never the empty sum (typeshed's sum() allows its int 0).
            critic_loss = 0.5 * cast(th.Tensor, sum(F.mse_loss(q, target_q) for q in current_q))
            self._zero_grad(critic.optimizer)
            critic_loss.backward(inputs=self.critic_params)
            critic.optimizer.step()

        with self._section("L_pi"):
            if self.sb3_order:
                with th.no_grad():
                    q_features = self._encode(critic, obs)  # pass 5: f_c after its step
            else:
                q_features = critic_z.detach()  # the departure: f_c(s) from before the critic step
            q_pi = th.cat(_q_values(critic, q_features, actions_pi), dim=1)
            min_q_pi, _ = th.min(q_pi, dim=1, keepdim=True)
            actor_loss = (ent_coef * log_prob - min_q_pi).mean()
            self._zero_grad(actor.optimizer)
            actor_loss.backward(inputs=self.actor_params)
            actor.optimizer.step()

        with self._section("Polyak"), th.no_grad():
            if self.polyak_every_step:
                self.polyak_update()
            self.metric_sums.add_(th.stack([critic_loss.detach(), actor_loss.detach(),
                                            ent_coef.detach().reshape(-1)[0], ent_coef_loss.detach()]))

    @th.no_grad()
    def polyak_update(self) -> None:
        """SB3's polyak_update over all critic parameters (encoder included), as two foreach kernels."""
        th._foreach_mul_(self.polyak_targets, 1 - self.tau)
        th._foreach_add_(self.polyak_targets, self.polyak_sources, alpha=self.tau)
        if self.norm_stat_targets:  # SB3 copies batch-norm running statistics (polyak with tau = 1)
            th._foreach_copy_(self.norm_stat_targets, self.norm_stat_sources)

    # ---- running gradient steps ------------------------------------------------------------------
    def run(self, gradient_steps: int) -> None:
        """``gradient_steps`` updates; the losses are summed into ``metric_sums`` (zeroed here first, on the
        device: this call's sums are what SB3 would log for it)."""
        if self.view is not None:
            self.view.sync()
            self.view.buffer.raise_if_nothing_to_sample()  # host side: a captured draw cannot raise
        if self.graph is not None and self._addresses() != self._captured_addresses:
            self._set_status("warming-up")  # a captured pointer went stale: capture again, after a warm-up
            self.graph, self.warmup_steps_left = None, GRAPH_WARMUP_STEPS
        self.metric_sums.zero_()
        with cudnn_benchmark():
            for gradient_step in range(gradient_steps):
                if self.use_graph:
                    self._graph_step()
                else:
                    self.update(None)
                if not self.polyak_every_step and gradient_step % self.model.target_update_interval == 0:
                    self.polyak_update()

    def eager_steps_in_sections(self, updates: int) -> None:
        """``updates`` eager gradient steps (real ones: they train the model), each part of each step in a named
        torch.profiler range (UPDATE_SECTIONS): what ``ch09.benchmark.profile_update`` times."""
        if self.view is not None:
            self.view.sync()
            self.view.buffer.raise_if_nothing_to_sample()
        self.profiling = True
        try:
            with cudnn_benchmark():
                for _ in range(updates):
                    self.update(None)
        finally:
            self.profiling = False

    def _graph_step(self) -> None:
        if self.view is None:  # host sampling: the graph reads its batch from fixed tensors
            batch = self._sample()
            if self.static_batch is None:
                self.static_batch = _clone_batch(batch)
            _copy_batch(self.static_batch, batch)
        if self.graph is not None:
            self.graph.replay()
            return
        if self._next_graph is None:
            self._next_graph = self.graph_class(self.device)
        if self.warmup_steps_left > 0:
            self._next_graph.warm_up(self._static_step)
            self.warmup_steps_left -= 1
        else:
            graph, self._next_graph = self._next_graph, None
            self._capture_verified(graph)

    def _static_step(self) -> None:
        """The step a graph records: its batch from the fixed tensors, or drawn inside it (device draw)."""
        self.update(self.static_batch)

    # ---- the verified capture --------------------------------------------------------------------
    def _capture_verified(self, graph: StepGraph) -> None:
        """Capture the step, replay it once, then run the same step eagerly from the same state and draws.

        This gradient step's result is the eager one. The graph is kept (``self.graph``) only if the capture
        worked and the replay matched; otherwise it is dropped, one line says why, and training goes on eagerly.
        """
        state, before = self._snapshot()
        replayed: list[th.Tensor] | None = None
        failure = None
        try:
            graph.capture(self._static_step)
            self._restore(state, before)  # a capture records and runs nothing; if it ran the step, the check sees it
            graph.replay()
            replayed = [t.detach().clone() for t in state]
        except Exception as exc:  # noqa: BLE001 -- whatever the capture refuses, the eager step still works
            self._raise_if_context_broken(exc)
            failure = f"the capture raised {type(exc).__name__}: {_first_line(exc)}"
        self._restore(state, before)
        self._static_step()  # the eager step: this gradient step's result
        if failure is None:
            assert replayed is not None, "the capture and replay ran without raising, so replayed was set"
            deviation, finite = self._deviation(before[0], replayed, state)
            if not finite:
                failure = "the replayed step gave non-finite values"
            elif deviation > self.verify_rtol:
                failure = (f"the replayed step differs from the eager one by {deviation:.2g} of the step's size, "
                           f"tolerance {self.verify_rtol:g}")
            self.status = replace(self.status, max_deviation=deviation if math.isfinite(deviation) else None)
        if failure is not None:
            self._fall_back(failure)
            return
        self.graph, self._captured_addresses = graph, self._addresses()
        self._set_status("captured")

    def replay_deviation(self) -> float:
        """One more gradient step (as ``run(1)``: the loss sums start over), taken both ways from the same state
        and draws: the captured graph's replay, then the eager step, whose result stays. Returns how far the replay
        was from it, measured as the capture's check measures it (inf if a replayed value is not finite).

        The capture's check compares the first replay only; this compares one at any later point, so a step that
        replays a stale input (a batch, an Adam step count, alpha) shows here however long after the capture. Two
        whole runs cannot show it as sharply: Adam grows rounding-sized differences between them step by step.
        """
        if self.graph is None:
            raise RuntimeError(f"no captured graph to compare (graph status: {self.status.state})")
        if self._addresses() != self._captured_addresses:  # a replay would read the replaced tensors' memory
            raise RuntimeError("no captured graph to compare: tensors it reads were replaced since the capture "
                               "(the next train() captures it again)")
        if self.view is None:  # host draw: the batch both steps read
            assert self.static_batch is not None, "the capture filled the fixed batch tensors"
            _copy_batch(self.static_batch, self._sample())
        self.metric_sums.zero_()
        state, before = self._snapshot()
        with cudnn_benchmark():  # the kernels of run()'s steps, on both sides
            self.graph.replay()
            replayed = [t.detach().clone() for t in state]
            self._restore(state, before)
            self._static_step()
        deviation, finite = self._deviation(before[0], replayed, state)
        return deviation if finite else math.inf

    def _state_tensors(self) -> list[th.Tensor]:
        """Every tensor a step changes: weights and buffers (target nets too), log alpha, Adam states, loss sums."""
        tensors: dict[int, th.Tensor] = {}
        for tensor in self.model.policy.state_dict(keep_vars=True).values():
            tensors.setdefault(id(tensor), tensor)  # a shared encoder is listed under actor and critic
        if self.model.log_ent_coef is not None:
            tensors.setdefault(id(self.model.log_ent_coef), self.model.log_ent_coef)
        for optimizer in self.optimizers:
            for values in optimizer.state.values():
                for value in values.values():
                    if isinstance(value, th.Tensor):
                        tensors.setdefault(id(value), value)
        tensors.setdefault(id(self.metric_sums), self.metric_sums)
        return list(tensors.values())

    def _snapshot(self) -> tuple[list[th.Tensor], tuple[list[th.Tensor], th.Tensor]]:
        """(the tensors a step changes, (a copy of their values, the generator's state)): what ``_restore`` puts
        back."""
        state = self._state_tensors()
        return state, ([t.detach().clone() for t in state], default_generator(self.device).get_state())

    def _restore(self, state: list[th.Tensor], saved: tuple[list[th.Tensor], th.Tensor]) -> None:
        """Put the saved values back IN PLACE (a captured graph holds these addresses) and the generator state."""
        values, generator_state = saved
        with th.no_grad():
            for tensor, value in zip(state, values):
                tensor.copy_(value)
        default_generator(self.device).set_state(generator_state)

    def _deviation(self, before: list[th.Tensor], replayed: list[th.Tensor],
                   eager: list[th.Tensor]) -> tuple[float, bool]:
        """(max over tensors of ||replay - eager|| / ||eager - before||, all replayed values finite): one read."""
        with th.no_grad():
            ratios, finite = [], []
            for x0, xr, xe in zip(before, replayed, eager):
                x0, xr, xe = x0.double(), xr.double(), xe.double()
                difference, change = (xr - xe).norm(), (xe - x0).norm()
                ratios.append(th.where(change > 0, difference / change.clamp(min=1e-300),
                                       th.where(difference > 0, math.inf, 0.0)))
                finite.append(th.isfinite(xr).all())
            deviation, all_finite = th.stack(ratios).max(), th.stack(finite).all()
            deviation, all_finite = th.stack([deviation, all_finite.double()]).tolist()
        return (deviation if math.isfinite(deviation) else math.inf), bool(all_finite)

    def _fall_back(self, reason: str) -> None:
        self.graph, self.use_graph = None, False
        self._set_status("fallback", reason)
        self.model._graph_fallback = self.status
        print(GRAPH_FALLBACK_LINE.format(reason=reason), file=sys.stderr, flush=True)

    def _set_status(self, state: GraphState, reason: str | None = None) -> None:
        self.status = replace(self.status, state=state, reason=reason)

    def _raise_if_context_broken(self, error: BaseException) -> None:
        """Raise ``CudaContextError`` if the device no longer answers a synchronize (a sticky CUDA error)."""
        if isinstance(error, CudaContextError) or not self.use_graph:
            return
        try:
            (self.graph or self.graph_class(self.device)).synchronize()
        except Exception as sync_error:  # noqa: BLE001 -- any failure of the sync means the same
            raise CudaContextError(
                f"the CUDA context broke while the CUDA-graph step was in use ({_first_line(sync_error)})"
            ) from error

    def _addresses(self) -> list[int]:
        """Where the graph's persistent tensors live (weights, gradients, Adam states, learning rates); a change
        (an optimizer reloaded, a ``zero_grad()`` that freed the gradients) means a captured pointer went stale."""
        params = [*self.actor_params, *self.critic_params, *self.polyak_targets]
        if self.model.log_ent_coef is not None:
            params.append(self.model.log_ent_coef)
        tensors: list[th.Tensor | None] = [*params, *(p.grad for p in params)]
        for optimizer in self.optimizers:
            for state in optimizer.state.values():
                tensors.extend(v for v in state.values() if isinstance(v, th.Tensor))
            tensors.extend(g["lr"] for g in optimizer.param_groups if isinstance(g["lr"], th.Tensor))
        return [t.data_ptr() if t is not None else 0 for t in tensors]

    def mean_metrics(self, steps: int) -> dict[str, float]:
        """The mean of each logged loss over the last ``run``: the one device-to-host read of the losses."""
        values = (self.metric_sums / max(steps, 1)).tolist()
        return dict(zip(METRIC_NAMES, values))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _clone_batch(batch: DictReplayBufferSamples) -> DictReplayBufferSamples:
    discounts = getattr(batch, "discounts", None)
    return DictReplayBufferSamples(
        observations={k: v.clone() for k, v in batch.observations.items()},
        actions=batch.actions.clone(),
        next_observations={k: v.clone() for k, v in batch.next_observations.items()},
        dones=batch.dones.clone(),
        rewards=batch.rewards.clone(),
        **({"discounts": discounts.clone()} if discounts is not None else {}),
    )


def _copy_batch(static: DictReplayBufferSamples, batch: DictReplayBufferSamples) -> None:
    for key, value in batch.observations.items():
        static.observations[key].copy_(value)
    for key, value in batch.next_observations.items():
        static.next_observations[key].copy_(value)
    for name in ("actions", "dones", "rewards", "discounts"):
        field_value = getattr(batch, name, None)
        if field_value is not None:
            getattr(static, name).copy_(field_value)


def _runs_in_process(env: VecEnv | None) -> bool:
    """True if ``env`` steps its envs in this process (DummyVecEnv under any VecEnv wrappers)."""
    return env is not None and isinstance(env.unwrapped, DummyVecEnv)


class _UpdateWhileEnvsStep(VecEnvWrapper):
    """``step_async`` sends the actions, then runs the updates SB3 deferred; ``step_wait`` collects the envs."""

    def __init__(self, venv: VecEnv, model: FastSAC) -> None:
        super().__init__(venv)
        self.model = model

    def step_async(self, actions: np.ndarray) -> None:
        self.venv.step_async(actions)
        self.model._run_pending_updates()  # the GPU trains on step t while the envs simulate step t + 1

    def step_wait(self) -> Any:
        return self.venv.step_wait()

    def reset(self) -> Any:
        return self.venv.reset()


class _LossesAtDump(KVWriter):
    """A logger output that records the model's unread losses when the logger dumps, before any writer runs.

    SB3's ``Logger.dump`` hands every output the same dict in order; this one sits first, so the losses it
    records (``FastSAC.record_train_metrics``, the one device-to-host read) reach every output after it -- also
    on dumps that SB3's algorithm does not start, such as an evaluation callback's ``logger.dump()``.
    """

    def __init__(self, model: FastSAC) -> None:
        self.model = model

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]], step: int = 0) -> None:
        self.model.record_train_metrics()

    def close(self) -> None:
        pass

    @classmethod
    def attach(cls, model: FastSAC) -> None:
        """Put one in front of ``model.logger``'s outputs (learn() may have set up a new logger)."""
        outputs = model.logger.output_formats
        if not any(isinstance(output, cls) and output.model is model for output in outputs):
            outputs.insert(0, cls(model))


class FlatModeSwitch:
    """``SACPolicy.set_training_mode`` as one loop over the modules it reaches: the same ``training`` flags.

    SB3 switches the policy's mode up to three times per env step (``collect_rollouts`` and ``predict`` to eval,
    ``train`` back to training). Each switch walks the actor's and the critic's module trees through
    ``nn.Module.train`` and ``nn.Module.__setattr__``: host time that a GPU run spends on every env step.
    ``install`` puts this switch on a policy instance (in place of the method) only where that walk is all the
    switch does: SAC's policy switch, the actor's and critic's are SB3's own, and no module overrides
    ``nn.Module.train``. Otherwise the policy keeps its own.
    """

    def __init__(self, policy: SACPolicy) -> None:
        reached = [*policy.actor.modules(), *policy.critic.modules(), policy]  # critic_target stays as it is
        self.modules = list({id(module): module for module in reached}.values())  # a shared encoder once

    def __call__(self, mode: bool) -> None:
        for module in self.modules:
            object.__setattr__(module, "training", mode)  # as nn.Module.__init__ sets it: a bool needs no checks

    @staticmethod
    def exact_for(policy: Any) -> bool:
        """Whether the flat loop sets exactly what ``policy.set_training_mode`` would."""
        if type(policy).set_training_mode is not SACPolicy.set_training_mode:
            return False
        parts = (policy.actor, policy.critic)
        return (all(type(part).set_training_mode is BaseModel.set_training_mode for part in parts)
                and all(type(module).train is th.nn.Module.train for part in parts for module in part.modules()))

    @classmethod
    def install(cls, policy: Any) -> None:
        if cls.exact_for(policy):
            policy.set_training_mode = cls(policy)


# ======================================================================================================
# The algorithm: SB3's SAC with train() replaced
# ======================================================================================================
class FastSAC(SAC):
    """SB3's SAC whose ``train()`` runs the device-side update of the module docstring.

    Everything else is SAC's: pass the same arguments, plus

    Args:
        precision: "fp32" (default) or "bf16" (encoder passes under bfloat16 autocast; losses in float32).
        sb3_order: True runs SB3's five encoder passes in SB3's order (the checks compare it with
            ``SAC.train()``); False (default) reuses features as the module docstring's table says.
        overlap_collection: launch the updates of env step t while the envs run step t + 1 (one-step policy
            lag, see the module docstring). Off by default.
        cuda_graph: capture the step as a CUDA graph on CUDA (ignored on the CPU); each capture is verified
            against an eager step first (``graph_status`` says what became of it). ``CH09_NO_CUDA_GRAPH=1``
            in the environment turns it off too.
        fuse_next_obs_pass: one actor-encoder pass over [s; s'] instead of two (default off).
        step_graph_class: what captures the step; None: ``CudaStepGraph`` on CUDA, no graph elsewhere.
            ``RecordedStepGraph`` (the CPU stand-in) runs the graph logic on any device, for tests.
    """

    def __init__(
        self,
        *args: Any,
        precision: str = "fp32",
        sb3_order: bool = False,
        overlap_collection: bool = False,
        cuda_graph: bool = True,
        fuse_next_obs_pass: bool = False,
        step_graph_class: type[StepGraph] | None = None,
        **kwargs: Any,
    ) -> None:
        self.precision, self.sb3_order = precision, sb3_order
        self.overlap_collection, self.cuda_graph = overlap_collection, cuda_graph
        self.fuse_next_obs_pass, self.step_graph_class = fuse_next_obs_pass, step_graph_class
        self._graph_fallback: GraphStatus | None = None
        self._engine: SacUpdateEngine | None = None
        self._engine_unsupported: str | None = None
        self._pending_updates: list[tuple[int, int]] = []
        self._overlap_declined = False
        self._unread_update_steps = 0
        self._in_learn = False
        self._overlap_env: _UpdateWhileEnvsStep | None = None
        super().__init__(*args, **kwargs)

    def _setup_model(self) -> None:
        # Checked here, not in __init__: FastSAC.load(path, precision=...) sets the options after __init__.
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}.")
        super()._setup_model()
        FlatModeSwitch.install(self.policy)
        self._engine = None

    @classmethod
    def from_sac(cls, model: SAC, **engine_options: Any) -> FastSAC:
        """A FastSAC with ``model``'s hyper-parameters, weights, optimizer states and env (a new, empty buffer).

        Goes through an in-memory checkpoint, exactly the ``SAC.save`` / ``FastSAC.load`` path a resume takes.
        """
        checkpoint = io.BytesIO()
        model.save(checkpoint)
        checkpoint.seek(0)
        return cls.load(checkpoint, env=model.get_env(), device=model.device, **engine_options)

    # ---- training --------------------------------------------------------------------------------
    @property
    def graph_status(self) -> GraphStatus:
        """What became of the CUDA-graph step (see ``GraphStatus``)."""
        if self._engine is not None:
            return self._engine.status
        return planned_graph_status(self)

    def train(self, gradient_steps: int, batch_size: int = 64) -> None:
        if self.overlap_collection and self._in_learn and self._may_defer(batch_size):
            self._pending_updates.append((gradient_steps, batch_size))  # run inside the next step_async
            return
        self._train_now(gradient_steps, batch_size)

    def _may_defer(self, batch_size: int) -> bool:
        """Whether updates may run inside ``step_async``, while env worker processes are mid-step: only if they
        send nothing down the workers' pipes (a message there would be answered by the step's results). Envs in
        this process are always safe; with worker processes, only a device draw is (SB3's HER sampling asks a
        worker for ``compute_reward``). The engine is built here, between steps: building it asks env 0 for
        its reward. Otherwise the updates run now, as without overlap, and one warning says why."""
        engine = self._engine_for(batch_size)
        if (engine is not None and engine.view is not None) or _runs_in_process(self.get_env()):
            return True
        if not self._overlap_declined:
            self._overlap_declined = True
            reason = self._engine_unsupported if engine is None else engine.host_sampling_reason
            warnings.warn("FastSAC runs the updates between env steps, not overlapped with them: with envs in "
                          f"worker processes that needs the batch drawn on the device, and here {reason}.",
                          stacklevel=2)
        return False

    def _train_now(self, gradient_steps: int, batch_size: int) -> None:
        engine = self._engine_for(batch_size)
        if engine is None:
            super().train(gradient_steps, batch_size)
            return
        self.policy.set_training_mode(True)
        self._update_learning_rate(engine.optimizers)
        engine.run(gradient_steps)  # no read of the losses here: they stay on the device until SB3 logs
        self._n_updates += gradient_steps
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self._unread_update_steps = gradient_steps
        _LossesAtDump.attach(self)

    def _engine_for(self, batch_size: int) -> SacUpdateEngine | None:
        if self._engine is not None and self._engine.batch_size == batch_size and not self._engine.stale():
            return self._engine
        reason = unsupported_reason(self)
        if reason is not None:
            if reason != self._engine_unsupported:
                warnings.warn(f"FastSAC trains with SB3's own train() because of {reason}.", stacklevel=2)
            self._engine_unsupported = reason
            return None
        self.record_train_metrics()  # the old engine's last losses, before it goes
        self._engine = SacUpdateEngine(self, batch_size)
        return self._engine

    def record_train_metrics(self) -> None:
        """Record the last ``train()`` call's mean losses under SB3's keys: the one device-to-host read of them.

        SB3's dumps call it (``dump_logs``, and any ``logger.dump()`` through ``_LossesAtDump``), so the values
        SB3 writes are the ones its own ``train()`` would have recorded last; call it to read them earlier.
        """
        if not self._unread_update_steps or self._engine is None:
            return
        metrics = self._engine.mean_metrics(self._unread_update_steps)
        self._unread_update_steps = 0
        for key, value in metrics.items():
            if key != "train/ent_coef_loss" or self.ent_coef_optimizer is not None:
                self.logger.record(key, value)

    def replay_deviation(self) -> float:
        """How far a replay of the captured CUDA graph is from the eager step now, however many replays after the
        capture: one more gradient step, taken both ways from the same state (``SacUpdateEngine.replay_deviation``;
        compare with ``GRAPH_VERIFY_RTOL[precision]``). The step counts as a ``train()`` call of one step."""
        self._run_pending_updates()
        self.record_train_metrics()  # the last call's losses, before the sums start over
        if self._engine is None:
            raise RuntimeError("no captured graph to compare: no train() since the model was built or loaded")
        deviation = self._engine.replay_deviation()
        self._n_updates += 1
        self._unread_update_steps = 1
        return deviation

    def _update_learning_rate(self, optimizers: list[th.optim.Optimizer] | th.optim.Optimizer) -> None:
        """SB3's schedule, written into a capturable optimizer's tensor learning rate in place (one ``fill_`` per
        tensor: the engine's optimizers share one)."""
        learning_rate = self.lr_schedule(self._current_progress_remaining)
        self.logger.record("train/learning_rate", learning_rate)
        filled: set[int] = set()
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            for group in optimizer.param_groups:
                if not isinstance(group["lr"], th.Tensor):
                    group["lr"] = learning_rate
                elif id(group["lr"]) not in filled:
                    group["lr"].fill_(learning_rate)
                    filled.add(id(group["lr"]))

    def dump_logs(self) -> None:
        self.record_train_metrics()
        super().dump_logs()

    def _raise_if_cuda_context_broken(self, error: BaseException) -> None:
        if self._engine is not None and isinstance(error, Exception):
            self._engine._raise_if_context_broken(error)

    # ---- overlapped collection -------------------------------------------------------------------
    def learn(self, *args: Any, **kwargs: Any) -> FastSAC:
        self._in_learn = True
        try:
            super().learn(*args, **kwargs)
            self._in_learn = False
            self._run_pending_updates()  # the updates of the last env step
            self.record_train_metrics()  # one read per learn() call, so name_to_value has them after it
        except BaseException as exc:
            self._pending_updates.clear()  # a crashed or interrupted run does not owe these updates
            self._raise_if_cuda_context_broken(exc)
            raise
        finally:
            self._in_learn = False
        return self

    def collect_rollouts(self, env: VecEnv, *args: Any, **kwargs: Any) -> Any:
        if self.overlap_collection:
            if self._overlap_env is None or self._overlap_env.venv is not env:
                self._overlap_env = _UpdateWhileEnvsStep(env, self)
            env = self._overlap_env
        return super().collect_rollouts(env, *args, **kwargs)

    @property
    def deferred_update_steps(self) -> int:
        """Gradient steps ``train()`` has left to the next ``step_async`` (overlapped collection); 0 otherwise."""
        return sum(gradient_steps for gradient_steps, _ in self._pending_updates)

    def _run_pending_updates(self) -> None:
        while self._pending_updates:
            gradient_steps, batch_size = self._pending_updates.pop(0)
            self._train_now(gradient_steps, batch_size)

    # ---- checkpoints: exactly what SAC.save writes -----------------------------------------------
    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), *ENGINE_ATTRIBUTES]

    def get_parameters(self) -> dict[str, dict]:
        params = super().get_parameters()
        return {name: portable_optimizer_state(value) if "param_groups" in value else value
                for name, value in params.items()}

    def save(self, *args: Any, **kwargs: Any) -> None:
        try:
            self._run_pending_updates()
            super().save(*args, **kwargs)
        except Exception as exc:
            self._raise_if_cuda_context_broken(exc)  # the weights cannot be read back from a broken context
            raise

    def set_parameters(self, *args: Any, **kwargs: Any) -> None:
        super().set_parameters(*args, **kwargs)
        self._engine = None  # optimizer states were replaced: a captured graph would point at the old ones
