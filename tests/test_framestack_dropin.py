"""FrameStackHerReplayBuffer as a drop-in for SB3's HerReplayBuffer, driven the way an SB3 user drives it.

| what a user of SB3's HerReplayBuffer does                                   | checked by                          |
|-----------------------------------------------------------------------------|-------------------------------------|
| SAC, TD3, DDPG, DQN with 1 or 2 envs, DummyVecEnv or SubprocVecEnv; then     | test_off_policy_algorithm_learns_   |
| ``save_replay_buffer`` / ``load_replay_buffer`` and learn on                | saves_loads_and_continues           |
| an env SB3 builds from a function (``BitFlippingEnv``) in worker processes: | the same test, SubprocVecEnv cases  |
| rewards from ``env_method``, announced in one warning                       |                                     |
| Dict observations of any shape and dtype (bits, images, discrete states),   | test_every_key_is_stored_exactly,   |
| beside pixels too                                                           | test_other_keys_beside_pixels_...   |
| ``copy_info_dict=True``                                                     | test_copy_info_dict_rewards_...     |
| ``truncate_last_trajectory()`` on an unfinished episode                     | test_truncation_warns_as_sb3_does   |
| SB3's performance check: DQN + HER solves ``BitFlippingEnv(n_bits=10)``     | test_dqn_her_solves_ten_bits        |

Transitions are identified by their action: random continuous actions are unique, so a sampled action names
the ``add()`` call (and env) it came from, and what was sampled is compared with what ``add()`` received.
SubprocVecEnvs are started with ``fork`` (a worker starts in milliseconds; ``forkserver``, SB3's default,
imports torch again in each worker) and shared by the module. The performance check runs with this buffer
by default; its twin with SB3's own buffer, the reference, is marked slow (``pytest -m slow``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import bench_replay
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from gymnasium.wrappers import TimeLimit
from stable_baselines3 import DDPG, DQN, SAC, TD3
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import BitFlippingEnv
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv
from stable_baselines3.her.her_replay_buffer import HerReplayBuffer

from ch09.engine.framestack_replay import TRUNCATION_WARNING, FrameStackHerReplayBuffer
from pixel_wrapper import make_fetch_env, pixel_observation_space

N_BITS = 4
FALLBACK_WARNING = "cannot compute rewards in this process"
OBSERVATION_KINDS = {  # BitFlippingEnv's three observation spaces
    "bits": {},  # MultiBinary(4): int8
    "image": {"image_obs_space": True},  # (1, 36, 36) uint8 under every key
    "discrete": {"discrete_obs_space": True},  # Discrete(16): int64, stored (1,) as SB3 stores it
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def locate(calls: list[tuple], action: th.Tensor) -> tuple[int, int]:
    """(add() call, env) whose action is ``action``: a sampled transition's origin."""
    action = action.numpy()
    matches = [(i, env_idx) for i, call in enumerate(calls) for env_idx, stored in enumerate(call[2])
               if np.array_equal(stored, action)]
    assert len(matches) == 1, f"a sampled action matches {len(matches)} recorded transitions"
    return matches[0]


def replay(calls: list[tuple], buffer: Any) -> Any:
    for call in calls:
        buffer.add(*copy.deepcopy(call))
    return buffer


# ---------------------------------------------------------------------------------------------------------
# SAC, TD3, DDPG, DQN; 1 and 2 envs; DummyVecEnv and SubprocVecEnv; save, load, continue
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bit_flipping_envs():
    """``bit_flipping_envs(vec_env, n_envs, discrete_actions)``: one shared VecEnv of BitFlippingEnv per kind.

    2-env runs see images under every key (SB3's ``image_obs_space``), 1-env runs bits: both kinds train.
    """
    made: dict[tuple, Any] = {}

    def get(vec_env: str, n_envs: int, discrete_actions: bool):
        key = (vec_env, n_envs, discrete_actions)
        if key not in made:
            image = n_envs == 2
            made[key] = make_vec_env(
                lambda: BitFlippingEnv(n_bits=N_BITS, continuous=not discrete_actions, image_obs_space=image),
                n_envs=n_envs, vec_env_cls=DummyVecEnv if vec_env == "dummy" else SubprocVecEnv,
                vec_env_kwargs={"start_method": "fork"} if vec_env == "subproc" else None,
            )
        return made[key]

    yield get
    for env in made.values():
        env.close()


def rewards_follow_the_task(samples, reward_env: BitFlippingEnv) -> bool:
    """Every sampled reward, real or relabelled, is BitFlippingEnv's reward of (next achieved goal, goal)."""
    expected = reward_env.compute_reward(samples.next_observations["achieved_goal"].numpy(),
                                         samples.observations["desired_goal"].numpy(), None)
    return np.array_equal(samples.rewards.numpy().ravel(), expected)


IN_THE_DEFAULT_RUN = {(SAC, "dummy", 1), (TD3, "subproc", 1), (DDPG, "dummy", 2), (DQN, "subproc", 2)}
"""Four of the sixteen runs below hold every algorithm, every VecEnv kind and env count, and every (VecEnv kind,
env count) pair; the other twelve run with ``pytest -m slow``."""


@pytest.mark.parametrize(("algorithm", "vec_env", "n_envs"), [
    pytest.param(algorithm, vec_env, n_envs, id=f"{algorithm.__name__}-{vec_env}-{n_envs}",
                 marks=() if (algorithm, vec_env, n_envs) in IN_THE_DEFAULT_RUN else pytest.mark.slow)
    for algorithm in (SAC, TD3, DDPG, DQN) for vec_env in ("dummy", "subproc") for n_envs in (1, 2)
])
def test_off_policy_algorithm_learns_saves_loads_and_continues(algorithm, vec_env, n_envs, bit_flipping_envs,
                                                               tmp_path):
    env = bit_flipping_envs(vec_env, n_envs, discrete_actions=algorithm is DQN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = algorithm(
            "MultiInputPolicy", env, replay_buffer_class=FrameStackHerReplayBuffer,
            replay_buffer_kwargs=dict(n_sampled_goal=2, goal_selection_strategy="future", copy_info_dict=True),
            learning_starts=40, train_freq=4, gradient_steps=n_envs, batch_size=32, buffer_size=2_000,
            policy_kwargs=dict(net_arch=[32]), seed=0, device="cpu",
        )
    fallback = [str(w.message) for w in caught if FALLBACK_WARNING in str(w.message)]
    buffer = model.replay_buffer
    if vec_env == "subproc":  # BitFlippingEnv is not registered: no in-process copy, one warning saying so
        assert len(fallback) == 1 and "NameNotFound" in fallback[0] and "round trip" in fallback[0]
        assert buffer.compute_reward is None
    else:
        assert fallback == [] and buffer.compute_reward is not None

    model.learn(120)
    assert model._n_updates > 0 and buffer.size() > 0
    reward_env = BitFlippingEnv(n_bits=N_BITS, image_obs_space=n_envs == 2)
    reward_env.reset(seed=0)  # its compute_reward reads the size of its state
    assert rewards_follow_the_task(buffer.sample(64), reward_env)

    running = bool((buffer._open_start >= 0).any())
    model.save_replay_buffer(tmp_path / "buffer.pkl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_replay_buffer(tmp_path / "buffer.pkl", truncate_last_traj=True)
    truncation = [w for w in caught if str(w.message) == TRUNCATION_WARNING]
    assert len(truncation) == int(running)  # SB3 warns only when an episode is cut
    loaded = model.replay_buffer
    assert loaded is not buffer and loaded.env is model.env
    for name, array in buffer._arrays().items():
        if name not in ("dones", "timeouts", "ep_length", "sampleable"):  # the truncation closes episodes
            assert np.array_equal(array, loaded._arrays()[name]), name
    assert (loaded.infos == buffer.infos).all()
    assert loaded.size() >= buffer.size() and (loaded._open_start == -1).all()

    updates = model._n_updates
    model.learn(80, reset_num_timesteps=True)
    assert model._n_updates > updates and loaded.size() > buffer.size()
    assert rewards_follow_the_task(loaded.sample(64), reward_env)


# ---------------------------------------------------------------------------------------------------------
# Every key of any shape and dtype, stored exactly
# ---------------------------------------------------------------------------------------------------------
def bit_flipping_stream(recording_add: Callable, kind: str, env_fn: Any = BitFlippingEnv,
                        copy_info_dict: bool = False):
    """SB3's own collection (SAC's ``_store_transition``, random actions) on 2 envs whose episodes end
    at different steps; returns (buffer, recorded add() calls, vec env)."""
    options = OBSERVATION_KINDS[kind]
    vec_env = DummyVecEnv([lambda steps=steps: env_fn(n_bits=N_BITS, continuous=True, max_steps=steps, **options)
                           for steps in (3, 5)])
    model = SAC("MultiInputPolicy", vec_env, learning_starts=10**6, buffer_size=1_000, seed=0, device="cpu",
                replay_buffer_class=FrameStackHerReplayBuffer,
                replay_buffer_kwargs=dict(n_sampled_goal=2, copy_info_dict=copy_info_dict))
    calls = recording_add(model.replay_buffer)
    model.learn(2 * 30)
    return model.replay_buffer, calls, vec_env


@pytest.mark.parametrize("kind", list(OBSERVATION_KINDS))
def test_every_key_is_stored_exactly(recording_add, kind):
    np.random.seed(0)
    buffer, calls, vec_env = bit_flipping_stream(recording_add, kind)
    sb3 = replay(calls, HerReplayBuffer(1_000, buffer.observation_space, buffer.action_space, env=vec_env,
                                        device="cpu", n_envs=2, n_sampled_goal=2))
    assert buffer.vector_keys == [] and buffer.array_keys == list(buffer.observation_space.spaces)  # no float key
    ours, theirs = buffer.sample(256), sb3.sample(256)
    for key in buffer.observation_space.spaces:
        for part in ("observations", "next_observations"):
            got, expected = getattr(ours, part)[key], getattr(theirs, part)[key]
            assert (got.dtype, got.shape) == (expected.dtype, expected.shape), f"{part}[{key}]"
    for b in range(256):
        i, env_idx = locate(calls, ours.actions[b])
        obs, next_obs = calls[i][0], calls[i][1]
        for key, space in buffer.observation_space.spaces.items():
            if key == "desired_goal":  # HER may have replaced it, in both
                assert th.equal(ours.observations[key][b], ours.next_observations[key][b])
                continue
            shape = (1,) if isinstance(space, spaces.Discrete) else space.shape  # SB3's shape of a Discrete key
            assert np.array_equal(ours.observations[key][b].numpy(), np.reshape(obs[key][env_idx], shape))
            assert np.array_equal(ours.next_observations[key][b].numpy(), np.reshape(next_obs[key][env_idx], shape))
    assert rewards_follow_the_task(ours, vec_env.envs[0].unwrapped)
    vec_env.close()


def test_other_keys_beside_pixels_are_stored_exactly_and_only_pixels_frame_by_frame():
    """A depth image and a discrete id next to the pixel stack: only the pixel key is deduplicated."""
    np.random.seed(1)
    image_size, n_envs = 8, 2
    space = spaces.Dict({**pixel_observation_space(image_size=image_size).spaces,
                         "depth": spaces.Box(0, 255, (1, image_size, image_size), np.uint8),
                         "object_id": spaces.Discrete(5)})

    def with_other_keys(observation: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        newest = observation["pixels"][:, -3:]  # derived from the newest frame: obs(t+1) is next_obs(t)
        return observation | {"depth": 255 - newest[:, :1], "object_id": newest[:, 0, 0, 0].astype(np.int64) % 5}

    calls = [(with_other_keys(obs), with_other_keys(next_obs), *rest)
             for obs, next_obs, *rest in bench_replay.synthetic_stream(80, n_envs, (6, 9), image_size=image_size)]
    buffer = replay(calls, FrameStackHerReplayBuffer(
        200, space, bench_replay.action_space(), device="cpu", n_envs=n_envs,
        compute_reward=lambda ag, g, info: -(np.linalg.norm(ag - g, axis=-1) > 0.05).astype(np.float32)))
    assert buffer.array_keys == ["depth", "object_id"] and buffer.key_arrays["depth"].dtype == np.uint8
    assert buffer.frames.shape[2:] == (3, image_size, image_size)  # one frame per row, not the stack
    samples = buffer.sample(128)
    for b in range(128):
        i, env_idx = locate(calls, samples.actions[b])
        obs, next_obs = calls[i][:2]
        for key in ("pixels", "depth", "proprioception"):
            assert np.array_equal(samples.observations[key][b].numpy(), obs[key][env_idx]), key
            assert np.array_equal(samples.next_observations[key][b].numpy(), next_obs[key][env_idx]), key
        assert samples.observations["object_id"][b].tolist() == [obs["object_id"][env_idx]]
    assert samples.observations["object_id"].dtype == th.int64


# ---------------------------------------------------------------------------------------------------------
# copy_info_dict
# ---------------------------------------------------------------------------------------------------------
class InfoRewardBitFlippingEnv(BitFlippingEnv):
    """BitFlippingEnv whose reward also charges a cost the step reports in its info: without the info dicts,
    ``compute_reward`` cannot be evaluated (a KeyError)."""

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        info["step_cost"] = 0.125 * self.current_step
        return obs, reward - info["step_cost"], terminated, truncated, info

    def compute_reward(self, achieved_goal, desired_goal, info):
        task_reward = super().compute_reward(achieved_goal, desired_goal, None)
        if info is None:  # step() asks for the task reward alone and subtracts its cost itself
            return task_reward
        cost = np.array([entry["step_cost"] for entry in info], dtype=np.float32)
        for entry in info:
            entry["step_cost"] = None  # the buffer must hand out copies: this must not reach its kept infos
        return task_reward - cost


def test_copy_info_dict_rewards_equal_sb3s(recording_add):
    np.random.seed(2)
    buffer, calls, vec_env = bit_flipping_stream(recording_add, "bits", InfoRewardBitFlippingEnv,
                                                 copy_info_dict=True)
    sb3 = replay(calls, HerReplayBuffer(1_000, buffer.observation_space, buffer.action_space, env=vec_env,
                                        device="cpu", n_envs=2, n_sampled_goal=2, copy_info_dict=True))
    reward_env = vec_env.envs[0].unwrapped
    for samples in (buffer.sample(256), sb3.sample(256)):  # ours, then SB3's, against the same formula
        for b in range(256):
            i, env_idx = locate(calls, samples.actions[b])
            info = [copy.deepcopy(calls[i][5][env_idx])]  # what add() got with this transition
            expected = reward_env.compute_reward(samples.next_observations["achieved_goal"][b].numpy()[None],
                                                 samples.observations["desired_goal"][b].numpy()[None], info)
            assert samples.rewards[b, 0].item() == float(expected[0]), f"sample {b}"
    kept = [info for info in buffer.infos[buffer.sampleable] if info is not None]
    assert kept and all(isinstance(info["step_cost"], float) for info in kept)  # compute_reward got copies
    assert all("terminal_observation" not in info for info in kept)  # the last row holds that observation
    vec_env.close()


# ---------------------------------------------------------------------------------------------------------
# The pixel FetchPush stream: copy_info_dict, the truncation warning, the bytes per row
# ---------------------------------------------------------------------------------------------------------
PIXEL_TIME_LIMITS = (4, 6)  # both envs end an episode together at step 12
PIXEL_VEC_STEPS = 14


@pytest.fixture(scope="module")
def pixel_stream(recording_add):
    """(buffer, add() calls, vec env) of 2 pixel FetchPush envs through SAC's collection, copy_info_dict on."""
    def make(limit: int):
        return lambda: TimeLimit(make_fetch_env("FetchPush-v4", pixels=True, goal_mode="both"), limit)

    vec_env = DummyVecEnv([make(limit) for limit in PIXEL_TIME_LIMITS])
    model = SAC("MultiInputPolicy", vec_env, learning_starts=10**6, buffer_size=200, seed=0, device="cpu",
                replay_buffer_class=FrameStackHerReplayBuffer,
                replay_buffer_kwargs=dict(n_sampled_goal=4, copy_info_dict=True))
    calls = recording_add(model.replay_buffer)
    model.learn(PIXEL_VEC_STEPS * len(PIXEL_TIME_LIMITS))
    yield model.replay_buffer, calls, vec_env
    vec_env.close()


def test_copy_info_dict_on_pixels_keeps_the_bytes_per_row_and_the_rewards(pixel_stream):
    buffer, calls, vec_env = pixel_stream
    plain = FrameStackHerReplayBuffer(200, buffer.observation_space, buffer.action_space, device="cpu", n_envs=2)
    assert buffer.bytes_per_row == plain.bytes_per_row  # the infos live outside the rows
    dones = np.array([call[4] for call in calls])
    for i, call in enumerate(calls):  # the infos SB3 gave, minus the terminal observation, at their rows
        for env_idx, info in enumerate(call[5]):
            row = i + 1 + dones[:i, env_idx].sum()  # each episode started so far has a reset row
            expected = {key: value for key, value in info.items() if key != "terminal_observation"}
            assert buffer.infos[row, env_idx] == expected
    np.random.seed(3)
    samples = buffer.sample(128)
    expected = vec_env.envs[0].unwrapped.compute_reward(samples.next_observations["achieved_goal"].numpy(),
                                                        samples.observations["desired_goal"].numpy(), None)
    assert np.array_equal(samples.rewards.numpy().ravel(), expected)


def test_truncation_warns_as_sb3_does(pixel_stream):
    buffer, calls, vec_env = pixel_stream
    both_done = next(i for i, call in enumerate(calls) if call[4].all())  # both episodes ended at this call

    def warnings_of_truncating(make_buffer, n_calls: int) -> list[str]:
        fed = replay(calls[:n_calls], make_buffer())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fed.truncate_last_trajectory()
        return [str(w.message) for w in caught]

    def ours():
        return FrameStackHerReplayBuffer(200, buffer.observation_space, buffer.action_space, device="cpu", n_envs=2,
                                         compute_reward=buffer.compute_reward)

    def sb3s():
        return HerReplayBuffer(200, buffer.observation_space, buffer.action_space, env=vec_env, device="cpu",
                               n_envs=2)

    mid_episode = warnings_of_truncating(sb3s, both_done + 2)
    assert mid_episode == [TRUNCATION_WARNING]  # the constant is SB3's text
    assert warnings_of_truncating(ours, both_done + 2) == mid_episode
    assert warnings_of_truncating(ours, both_done + 1) == warnings_of_truncating(sb3s, both_done + 1) == []


# ---------------------------------------------------------------------------------------------------------
# SB3's performance check (tests/test_her.py::test_performance_her), with both buffers
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("buffer_class", [
    FrameStackHerReplayBuffer,
    pytest.param(HerReplayBuffer, marks=pytest.mark.slow),  # the reference: run it with -m slow to compare
], ids=lambda c: c.__name__)
def test_dqn_her_solves_ten_bits(buffer_class):
    """DQN + HER on BitFlippingEnv(n_bits=10), SB3's settings: over 90% of the last training episodes succeed."""
    env = make_vec_env(lambda: BitFlippingEnv(n_bits=10, continuous=False), n_envs=2)
    model = DQN("MultiInputPolicy", env, replay_buffer_class=buffer_class,
                replay_buffer_kwargs=dict(n_sampled_goal=5, goal_selection_strategy="future"),
                learning_rate=5e-4, train_freq=1, gradient_steps=2, learning_starts=100, exploration_final_eps=0.02,
                target_update_interval=500, seed=0, batch_size=32, buffer_size=100_000, device="cpu")
    model.learn(total_timesteps=5_000)
    success = float(np.mean(model.ep_success_buffer))
    print(f"{buffer_class.__name__}: success over the last {len(model.ep_success_buffer)} episodes {success:.2f}")
    assert success > 0.90
