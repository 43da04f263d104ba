"""Tests for scripts/ch09/engine/framestack_replay.py (FrameStackHerReplayBuffer) and scripts/bench_replay.py.

The central check is equivalence on a real stream: SAC drives a real pixel FetchPush env (2 envs with
different time limits, so episodes interleave and end in time-outs) through SB3's own ``_store_transition``,
a VecEnv wrapper records every observation the pixel wrapper produced, and every sampled obs/next_obs must
equal the recorded one at that (env, step), byte for byte. A spy on ``add()`` keeps the exact calls so the
same stream can be replayed into other buffers (a small ring that wraps, a reloaded copy, GPU storage).
The recording is conftest's ``stream`` fixture (test_fast_sac.py checks the device sampler on it too).
"""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import bench_replay
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3 import SAC

from ch09.engine import framestack_replay
from ch09.engine.framestack_replay import FrameStackHerReplayBuffer, GoalEnvReward, frame_stack_rows
from lab_support import available_memory
from pixel_wrapper import make_fetch_env, pixel_observation_space

N_SAMPLES = 1024  # enough to hit each of the ~65 finished transitions many times

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def replay_into(stream, **kwargs) -> FrameStackHerReplayBuffer:
    """A fresh buffer fed the same add() calls SB3 made."""
    kwargs = dict(buffer_size=1_000, n_sampled_goal=stream.n_sampled_goal) | kwargs
    buffer = FrameStackHerReplayBuffer(
        observation_space=stream.buffer.observation_space, action_space=stream.buffer.action_space,
        device="cpu", n_envs=len(stream.time_limits), compute_reward=stream.buffer.compute_reward, **kwargs,
    )
    for call in stream.add_calls:
        buffer.add(*copy.deepcopy(call))
    return buffer


def check_samples_match_stream(stream, buffer: FrameStackHerReplayBuffer, n_samples: int = N_SAMPLES) -> set:
    """Every sampled obs/next_obs equals the recorded one; HER goals and rewards are right. Returns (call, env)s."""
    idx = buffer._sample_indices(n_samples)
    samples = buffer._gather(idx)
    seen = set()
    for b in range(n_samples):
        env_idx = int(idx.envs[b])
        i = stream.locate(env_idx, samples.actions[b].numpy())
        seen.add((i, env_idx))
        assert stream.step[i, env_idx] == idx.step[b]
        for key in buffer.observation_space.spaces:
            got_obs, got_next = samples.observations[key][b].numpy(), samples.next_observations[key][b].numpy()
            if key == "desired_goal" and idx.relabelled[b]:
                continue
            where = f"[{key}] at step {i}, env {env_idx}"
            assert np.array_equal(got_obs, stream.obs[i][key][env_idx]), f"obs{where} differs"
            assert np.array_equal(got_next, stream.next_obs[i][key][env_idx]), f"next_obs{where} differs"
        reward = samples.rewards[b, 0].item()
        if idx.relabelled[b]:
            goal = samples.observations["desired_goal"][b].numpy()
            assert np.array_equal(goal, samples.next_observations["desired_goal"][b].numpy())
            # The new goal is an achieved goal of the same episode, at this step or later.
            same_episode_future = [
                j for j in range(len(stream.obs))
                if stream.episode[j, env_idx] == stream.episode[i, env_idx]
                and stream.step[j, env_idx] >= stream.step[i, env_idx]
            ]
            assert any(np.array_equal(goal, stream.next_obs[j]["achieved_goal"][env_idx]) for j in same_episode_future)
            expected = buffer.compute_reward(stream.next_obs[i]["achieved_goal"][env_idx][None], goal[None], [{}])
            assert reward == float(expected[0])
        else:
            assert reward == stream.rewards[i, env_idx]
        assert samples.dones[b, 0].item() == 0.0  # Fetch episodes only time out: never terminal
    return seen


# ---------------------------------------------------------------------------------------------------------
# Equivalence with the recorded stream
# ---------------------------------------------------------------------------------------------------------
def test_every_sampled_stack_equals_what_the_wrapper_produced(stream):
    np.random.seed(0)
    assert stream.dones.sum() >= 8, "the stream should hold several finished episodes per env"
    seen = check_samples_match_stream(stream, stream.buffer)
    # Every finished transition can be drawn; transitions of the running episodes cannot.
    assert seen == stream.finished()
    assert stream.buffer.size() == len(stream.finished())


def test_samples_are_tensors_on_the_device_with_pixels_uint8(stream):
    samples = stream.buffer.sample(8)
    for key, space in stream.buffer.observation_space.spaces.items():
        for part in (samples.observations, samples.next_observations):
            assert part[key].shape == (8, *space.shape) and part[key].device.type == "cpu"
            assert part[key].dtype == th.from_numpy(np.zeros(0, space.dtype)).dtype  # pixels stay uint8
    assert samples.rewards.shape == samples.dones.shape == (8, 1)


def test_a_small_ring_wraps_and_keeps_only_intact_episodes(stream):
    np.random.seed(1)
    rows_per_env = 25  # fewer than the 40+ rows each env writes: the oldest episodes are overwritten
    buffer = replay_into(stream, buffer_size=rows_per_env * len(stream.time_limits))
    assert (buffer._rows_written > rows_per_env).all()
    seen = check_samples_match_stream(stream, buffer, n_samples=512)
    for env_idx in range(len(stream.time_limits)):
        episodes = {int(stream.episode[i, e]) for i, e in seen if e == env_idx}
        last_finished = int(stream.episode[np.flatnonzero(stream.dones[:, env_idx])[-1], env_idx])
        assert last_finished in episodes and 0 not in episodes  # newest kept, oldest retired
        for ep in episodes:  # a kept episode is kept whole
            steps = {i for i, e in seen if e == env_idx and stream.episode[i, e] == ep}
            assert len(steps) == stream.time_limits[env_idx]
    assert buffer.size() == sum(buffer.sampleable.sum(axis=0))


def test_relabelled_fraction_is_binomial_k_over_k_plus_1(stream):
    np.random.seed(2)
    n = 20 * 256
    relabelled = np.concatenate([stream.buffer._sample_indices(256).relabelled for _ in range(20)])
    p = stream.n_sampled_goal / (stream.n_sampled_goal + 1)
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(relabelled.mean() - p) < 4 * sigma, f"relabelled {relabelled.mean():.3f}, expected {p:.3f}"
    no_her = replay_into(stream, n_sampled_goal=0)
    assert not no_her._sample_indices(256).relabelled.any()


def test_goals_come_only_from_the_same_episode_future(stream):
    np.random.seed(3)
    idx = stream.buffer._sample_indices(2048)
    her = idx.relabelled
    goal_ep_start = stream.buffer.ep_start[idx.goal_rows[her], idx.envs[her]]
    goal_step = (idx.goal_rows[her] - goal_ep_start - 1) % stream.buffer.buffer_size
    assert np.array_equal(goal_ep_start, idx.ep_start[her])  # same episode
    assert (goal_step >= idx.step[her]).all()  # its future (inclusive, as SB3)
    assert (goal_step < stream.buffer.ep_length[idx.rows[her], idx.envs[her]]).all()


def test_frame_stack_rows_repeat_the_reset_frame():
    rows = frame_stack_rows(np.array([10, 98]), np.array([0, 5]), frame_stack=4, ring_rows=100)
    assert rows[0].tolist() == [10, 10, 10, 10, 11]  # k=0: obs = 4 x f_0, next = 3 x f_0 + f_1
    assert rows[1].tolist() == [0, 1, 2, 3, 4]  # start 98 + frames 2..6, wrapped round the ring


class WorkerVecEnv:
    """Stands in for a SubprocVecEnv: no ``envs`` attribute, attributes only through ``get_attr``."""

    def __init__(self, spec):
        self.spec = spec

    def get_attr(self, name, indices=None):
        return [getattr(self, name)]


def test_rewards_for_envs_in_worker_processes_are_computed_in_this_process():
    pixel_env = make_fetch_env("FetchPush-v4", pixels=True)
    try:
        space, spec = pixel_env.observation_space, pixel_env.spec
        buffer = FrameStackHerReplayBuffer(100, space, pixel_env.action_space, env=WorkerVecEnv(spec))
        assert isinstance(buffer.compute_reward, GoalEnvReward)
        assert "render_mode" not in buffer.compute_reward.env_kwargs
        rng = np.random.default_rng(0)
        achieved = rng.uniform(1.2, 1.4, (64, 3)).astype(np.float32)
        desired = achieved + rng.normal(0, 0.04, (64, 3)).astype(np.float32)
        expected = pixel_env.compute_reward(achieved, desired, None)
        assert 0 < (expected == 0).sum() < 64
        assert np.array_equal(buffer.compute_reward(achieved, desired, None), expected)
        assert len(pickle.dumps(buffer.compute_reward)) < 1_000  # pickles as (id, kwargs), never the env
    finally:
        pixel_env.close()


# ---------------------------------------------------------------------------------------------------------
# Edge cases on synthetic streams (fast: small frames, many episodes, many wraps)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frame_stack", [1, 4])
def test_synthetic_stream_with_many_wraps(frame_stack):
    np.random.seed(4)
    n_envs, image_size, steps = 3, 8, 300
    space = pixel_observation_space(frame_stack=frame_stack, image_size=image_size)
    buffer = FrameStackHerReplayBuffer(
        40 * n_envs, space, bench_replay.action_space(), n_envs=n_envs, frame_stack=frame_stack,
        compute_reward=lambda ag, g, info: -(np.linalg.norm(ag - g, axis=-1) > 0.05).astype(np.float32),
    )
    calls = list(bench_replay.synthetic_stream(steps, n_envs, (5, 7, 11), frame_stack, image_size, seed=4))
    for call in calls:
        buffer.add(*call)
    actions = np.array([call[2] for call in calls])
    idx = buffer._sample_indices(512)
    samples = buffer._gather(idx)
    for b in range(512):
        env_idx = int(idx.envs[b])
        (i,) = np.flatnonzero((actions[:, env_idx] == samples.actions[b].numpy()).all(axis=1))
        assert i >= steps - 40, "a transition older than the ring survived"
        assert np.array_equal(samples.observations["pixels"][b].numpy(), calls[i][0]["pixels"][env_idx])
        assert np.array_equal(samples.next_observations["pixels"][b].numpy(), calls[i][1]["pixels"][env_idx])


def test_a_reset_without_done_closes_the_running_episode():
    calls = list(bench_replay.synthetic_stream(20, 1, 50, image_size=8, seed=5))
    space = pixel_observation_space(image_size=8)
    buffer = FrameStackHerReplayBuffer(100, space, bench_replay.action_space(), n_sampled_goal=0)
    for call in calls[:6]:
        buffer.add(*call)
    assert buffer.size() == 0  # the episode is still running
    other_episode = list(bench_replay.synthetic_stream(1, 1, 50, image_size=8, seed=6))[0]
    with pytest.warns(UserWarning, match="does not continue"):
        buffer.add(*other_episode)
    assert buffer.size() == 6 and buffer.timeouts[6, 0]  # closed as a time-out after its 6 steps


def test_an_episode_longer_than_the_ring_is_refused():
    space = pixel_observation_space(image_size=8)
    buffer = FrameStackHerReplayBuffer(10, space, bench_replay.action_space(), n_sampled_goal=0)
    with pytest.raises(ValueError, match="longer than the 10 rows"):
        for call in bench_replay.synthetic_stream(20, 1, 50, image_size=8):
            buffer.add(*call)


# ---------------------------------------------------------------------------------------------------------
# Memory: bytes per transition, the preflight estimate, the refusal
# ---------------------------------------------------------------------------------------------------------
def test_bytes_per_transition_is_under_22000_for_pixels_proprio_and_goals():
    space, actions = pixel_observation_space(), bench_replay.action_space()
    per_row = FrameStackHerReplayBuffer.bytes_per_row_for(space, actions)
    buffer = FrameStackHerReplayBuffer(1_000, space, actions, n_sampled_goal=4, compute_reward=lambda *a: None)
    assert buffer.bytes_per_row == per_row
    assert buffer.allocated_bytes() == per_row * 1_000
    per_transition = per_row * 51 / 50  # 50-step episodes take 51 rows
    assert buffer.bytes_per_transition(50) == pytest.approx(per_transition) and per_transition <= 22_000
    (need,) = FrameStackHerReplayBuffer.memory_plan(1_000, space, actions, device="cpu")  # all in RAM on a CPU
    assert (need.items, need.bytes_per_item, need.device, need.unit) == (1_000, per_row, "cpu", "rows")


def test_a_buffer_that_does_not_fit_is_refused_naming_the_largest_that_does():
    space, actions = pixel_observation_space(), bench_replay.action_space()
    with pytest.raises(ValueError) as error:
        FrameStackHerReplayBuffer(10**9, space, actions, n_envs=2)
    message = str(error.value)
    assert "\n" not in message and message.count(". ") == 0 and " rows or fewer" in message
    largest = int(message.rsplit("use ", 1)[1].split(" rows or fewer")[0].replace(",", ""))
    per_row = FrameStackHerReplayBuffer.bytes_per_row_for(space, actions)
    assert 0 < largest * per_row <= available_memory().bytes_available


def test_a_key_that_is_no_single_array_is_refused_in_one_sentence():
    space = spaces.Dict({**pixel_observation_space().spaces, "contacts": spaces.Dict({"left": spaces.Discrete(2)})})
    with pytest.raises(ValueError, match=r"observation_space\['contacts'\] must be a Box, Discrete, MultiDiscrete"):
        FrameStackHerReplayBuffer(100, space, bench_replay.action_space())


def test_infos_is_an_array_without_rows_without_copy_info_dict_also_in_an_older_pickle(stream):
    """HerReplayBuffer declares ``infos`` an array; a buffer pickled by an older version holds None there."""
    buffer = replay_into(stream)
    assert buffer.infos.shape == (0, buffer.n_envs)
    older = FrameStackHerReplayBuffer.__new__(FrameStackHerReplayBuffer)
    older.__setstate__(pickle.loads(pickle.dumps(buffer.__getstate__() | {"infos": None})))
    assert older.infos.shape == (0, buffer.n_envs) and older.sample(8).rewards.shape == (8, 1)


# ---------------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------------
def test_save_and_load_are_byte_identical_in_chunks(stream, tmp_path, monkeypatch):
    monkeypatch.setattr(framestack_replay, "SAVE_CHUNK_BYTES", 50_000)  # many chunks even for this small buffer
    stream.buffer.save(tmp_path / "buffer")
    state = json.loads((tmp_path / "buffer" / "state.json").read_text())
    assert state["open_start"] != [-1, -1]  # saved mid-episode
    copy_ = replay_into(stream, buffer_size=1_000)
    copy_.reset()
    copy_.load(tmp_path / "buffer", truncate_last_trajectory=False)
    for name, array in stream.buffer._arrays().items():
        assert np.array_equal(array, copy_._arrays()[name]), name
    for name in ("_next_row", "_rows_written", "_open_start", "_n_sampleable"):
        assert np.array_equal(getattr(stream.buffer, name), getattr(copy_, name)), name
    np.random.seed(5)
    a = stream.buffer.sample(64)
    np.random.seed(5)
    b = copy_.sample(64)
    for key in a.observations:
        assert th.equal(a.observations[key], b.observations[key])
        assert th.equal(a.next_observations[key], b.next_observations[key])

    resumed = replay_into(stream, buffer_size=1_000)
    with pytest.warns(UserWarning, match="last trajectory in the replay buffer will be truncated"):
        resumed.load(tmp_path / "buffer")  # default: running episodes are closed as time-outs (SB3's warning)
    running_steps = sum(int(stream.step[-1, e]) + 1 for e in range(len(stream.time_limits)) if not stream.dones[-1, e])
    assert (resumed._open_start == -1).all() and resumed.size() == stream.buffer.size() + running_steps
    with pytest.raises(ValueError, match="same buffer_size"):
        replay_into(stream, buffer_size=500).load(tmp_path / "buffer")


# ---------------------------------------------------------------------------------------------------------
# Training with SAC, DrQ, GPU storage
# ---------------------------------------------------------------------------------------------------------
def test_sac_trains_with_this_buffer_and_drq(stream):
    th.manual_seed(0)
    model = SAC(
        "MultiInputPolicy", stream.vec_env, buffer_size=600, batch_size=8, learning_starts=24, seed=0, device="cpu",
        replay_buffer_class=FrameStackHerReplayBuffer, replay_buffer_kwargs=dict(n_sampled_goal=4, drq=True),
        policy_kwargs=dict(net_arch=[32, 32]),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.learn(2 * 60 if "pixels" in model.observation_space.spaces else 2 * 150)
    assert model.replay_buffer.size() > 0 and model._n_updates > 0
    model.train(gradient_steps=1, batch_size=8)  # records the losses of one more update
    assert np.isfinite(model.logger.name_to_value["train/critic_loss"])
    if "pixels" in model.observation_space.spaces:
        np.random.seed(6)
        idx = model.replay_buffer._sample_indices(32)
        shifted = model.replay_buffer._gather(idx).observations["pixels"]
        model.replay_buffer.drq = False
        plain = model.replay_buffer._gather(idx).observations["pixels"]
        assert shifted.dtype == th.uint8 and shifted.shape == plain.shape and not th.equal(shifted, plain)


@pytest.mark.gpu
def test_train_books_the_frames_on_the_gpu_and_in_ram_with_frames_in_ram():
    """train's memory plan for the Experiment Card on a GPU: the frames there by default, in RAM with --frames-in-ram
    (the way out its refusal names when the GPU has no room)."""
    from ch09 import experiment
    from ch09.engine.memory import memory_plan

    for frames_in_ram in (False, True):
        cfg = experiment.resolve_config(experiment.TrainConfig(critic_encoder=True, drq=False, device="cuda",
                                                               frames_in_ram=frames_in_ram))
        replay_class, replay_kwargs = experiment.replay_setup(cfg)
        plan = memory_plan(replay_class, replay_kwargs, cfg.buffer_size, *experiment.training_spaces(cfg),
                           n_envs=1, device=cfg.device)
        on_gpu = [need.what for need in plan if need.device.startswith("cuda")]
        assert on_gpu == ([] if frames_in_ram else ["replay frames"]), plan


@pytest.mark.gpu  # deselected by default (pyproject.toml); on a CUDA machine: pytest -m gpu
def test_gpu_storage_samples_the_same_bytes_as_cpu_storage(stream):
    gpu = replay_into(stream, storage_device="cuda")
    if gpu.frame_shape is None:  # the state stream: nothing to store on the GPU
        assert gpu.frames is None and [need.device for need in gpu.memory_plan(
            1_000, gpu.observation_space, gpu.action_space, storage_device="cuda")] == ["cpu"]
    else:
        assert gpu.frames.device.type == "cuda"
    np.random.seed(7)
    a = stream.buffer.sample(128)
    np.random.seed(7)
    b = gpu.sample(128)
    for key in a.observations:
        assert th.equal(a.observations[key], b.observations[key].cpu())
        assert th.equal(a.next_observations[key], b.next_observations[key].cpu())


# ---------------------------------------------------------------------------------------------------------
# The benchmark script
# ---------------------------------------------------------------------------------------------------------
def test_bench_quick_runs_and_reports_the_memory_ratio(tmp_path):
    out = tmp_path / "bench.json"
    assert bench_replay.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    sb3, ours = report["buffers"]
    # SB3's HerReplayBuffer stores obs and next_obs whole: 169,524 bytes per pixel transition (README, measured)
    assert sb3["bytes_per_transition"] >= 169_000
    assert report["ratios_sb3_over_framestack"]["bytes_per_transition"] > 7


# ---------------------------------------------------------------------------------------------------------
# The production script with --replay framestack (the pixel default; the pixel runs of
# tests/test_ch09_pixel_push.py use it already)
# ---------------------------------------------------------------------------------------------------------
def test_full_state_training_with_framestack_on_two_worker_envs_resumes_with_its_buffer(tmp_path, production):
    common = ["--replay", "framestack", "--n-envs", "2", "--save-replay-buffer", *production.STATE_BUDGET,
              "--artifact-root", str(tmp_path)]
    production.check("train", "--seed", "0", "--total-steps", "200", *common)
    stem = tmp_path / "checkpoints/ch09_fullstate_FetchPush-v4_seed0"
    meta = json.loads(stem.with_suffix(".meta.json").read_text())
    assert meta["policy"]["replay_buffer"] == "FrameStackHerReplayBuffer"
    assert (tmp_path / "checkpoints" / f"{stem.name}_replay_buffer" / "state.json").is_file()

    resumed = production.check("train", "--seed", "0", "--total-steps", "300", "--resume", *common)
    assert "replay buffer restored" in resumed.stdout
    meta = json.loads(stem.with_suffix(".meta.json").read_text())
    assert meta["steps_done"] == 300 and meta["sessions"][1]["replay_restored"] is True
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.suffix in (".tmp", ".old")]
    assert not leftovers, "the atomic buffer-folder swap leaves nothing behind"


@pytest.mark.slow
def test_full_state_reach_learns_with_framestack_on_four_envs(tmp_path, production, tensorboard_scalars):
    """As test_ch09_pixel_push's Reach learning test, on this buffer with --n-envs 4 (SubprocVecEnv, UTD 1)."""
    production.check("train", "--full-state", "--replay", "framestack", "--env", "FetchReach-v4", "--seed", "0",
                     "--total-steps", "12000", "--n-envs", "4", "--eval-freq", "1000", "--eval-episodes", "20",
                     "--checkpoint-freq", "12000", "--buffer-size", "100000", "--device", "cpu", "--no-progress",
                     "--artifact-root", str(tmp_path), timeout=1800,
                     OMP_NUM_THREADS=production.learning_threads())
    curve = tensorboard_scalars(tmp_path / "runs/ch09_fullstate/FetchReach-v4/seed0")["eval/success_rate"]
    assert max(v for _, v in curve) >= 0.9, curve
