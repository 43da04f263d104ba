"""Shared test set-up, and the helpers several test files use to run the labs and the production script.

Imports need no set-up here: the project is installed (``pip install -e .``, done by ``docker/dev.sh``), so the
``ch09`` package and the labs import by name; pyproject.toml's pytest ``pythonpath = scripts`` adds the entry
scripts (programs, not part of the package) for the tests that call them in-process.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gymnasium.wrappers import TimeLimit
from stable_baselines3 import SAC
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnvWrapper

from ch09.engine.framestack_replay import FrameStackHerReplayBuffer

REPO_ROOT = Path(__file__).resolve().parents[1]

# MuJoCo picks its GL backend at import time; the labs default to EGL too, this keeps tests explicit.
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])


class ProductionScript:
    """``scripts/ch09_pixel_push.py`` in a fresh interpreter, exactly as a reader types it."""

    path = REPO_ROOT / "scripts" / "ch09_pixel_push.py"
    STATE_BUDGET = ("--full-state", "--buffer-size", "1000", "--batch-size", "32", "--learning-starts", "100",
                    "--eval-freq", "200", "--eval-episodes", "2", "--checkpoint-freq", "100", "--device", "cpu",
                    "--no-progress", "--no-eval-video")
    """A tiny full-state run: a few hundred steps train, evaluate and checkpoint in seconds (eval/video, which
    renders and encodes an episode per evaluation, is tested in test_video.py)."""

    @staticmethod
    def environment(**extra: str) -> dict[str, str]:
        """The process environment: EGL, one OpenMP thread (2 shared cores), unbuffered output."""
        return {**os.environ, "MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl", "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1", **extra}

    @staticmethod
    def learning_threads() -> str:
        """OMP_NUM_THREADS for a learning run: this machine's cores shared among the pytest-xdist workers. Two runs
        of two threads each on two cores, more threads than cores, went past their time limit (README, "The two
        commands", has the times)."""
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        return str(max(1, (os.cpu_count() or 1) // workers))

    def run(self, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(self.path), *args], capture_output=True, text=True,
                              timeout=timeout, env=self.environment(**env), cwd=REPO_ROOT)

    def check(self, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
        """``run``, asserting exit code 0 (the failure shows the output's tail)."""
        proc = self.run(*args, timeout=timeout, **env)
        assert proc.returncode == 0, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                                      f"stderr:\n{proc.stderr[-3000:]}")
        return proc

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(self.path), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.environment(), cwd=REPO_ROOT)


class CommandLine:
    """``ch09_pixel_push.main`` (or another entry script's ``main``) in this process, and the contract every refused
    command line keeps."""

    def __init__(self, capsys: pytest.CaptureFixture) -> None:
        self._capsys = capsys

    def run(self, *argv: str, main: Callable[[list[str]], int] | None = None) -> tuple[int, str, str]:
        """Run ``main(argv)`` (default: the production script's): (exit code, stdout, stderr); a ``SystemExit``
        (the command-line parser's) gives its code, as ``sys.exit(main())`` would."""
        if main is None:
            import ch09_pixel_push

            main = ch09_pixel_push.main
        try:
            code = main(list(argv))
        except SystemExit as exit_request:
            code = exit_request.code
        captured = self._capsys.readouterr()
        return code, captured.out, captured.err

    @staticmethod
    def assert_one_line(code: int, err: str, want_code: int, *fragments: str) -> str:
        """Exit code ``want_code``, exactly one non-empty stderr line, starting 'error:' and holding ``fragments``."""
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert "Traceback" not in err, err
        assert code == want_code, f"exit {code}, want {want_code}; stderr:\n{err}"
        assert len(lines) == 1 and lines[0].startswith("error: "), f"want one 'error: ...' line, got:\n{err}"
        for fragment in fragments:
            assert fragment in lines[0], f"{fragment!r} missing from: {lines[0]}"
        return lines[0]

    def assert_user_error(self, code: int, err: str, *fragments: str) -> str:
        """A user error: exit code 2 and one sentence naming the fix."""
        return self.assert_one_line(code, err, 2, *fragments)


@pytest.fixture(scope="session", autouse=True)
def sb3_default_log_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """SB3's ``learn()`` without a logger of the caller's makes an empty ``/tmp/SB3-<time>`` folder; here, and in
    the processes the tests start, it makes this one session folder instead (``SB3_LOGDIR``)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SB3_LOGDIR", str(tmp_path_factory.mktemp("sb3_default_logs")))
        yield


@pytest.fixture
def cli(capsys: pytest.CaptureFixture) -> CommandLine:
    """``cli.run("train", ...)`` runs the production script in-process; ``cli.assert_user_error(...)`` checks."""
    return CommandLine(capsys)


@pytest.fixture(scope="session")
def production() -> ProductionScript:
    """Runs ``scripts/ch09_pixel_push.py`` as a subprocess: ``production.check("train", ...)``."""
    return ProductionScript()


def _tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


@pytest.fixture(scope="session")
def tensorboard_scalars() -> Any:
    """``tensorboard_scalars(run_dir)``: every scalar of a TensorBoard folder as {tag: [(step, value), ...]}."""
    return _tensorboard_scalars


class LabScript:
    """A lab, ``scripts/labs/<name>.py``, in a fresh interpreter, exactly as a reader types it."""

    labs_dir = REPO_ROOT / "scripts" / "labs"

    def run(self, lab: str, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
        """``python scripts/labs/<lab>.py ARGS`` with EGL (``env`` overrides variables, e.g. MUJOCO_GL)."""
        environment = {**os.environ, "MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl", **env}
        return subprocess.run([sys.executable, str(self.labs_dir / f"{lab}.py"), *args], capture_output=True,
                              text=True, timeout=timeout, env=environment, cwd=REPO_ROOT)


@pytest.fixture(scope="session")
def lab_script() -> LabScript:
    """Runs a lab as a subprocess: ``lab_script.run("pixel_wrapper", "--verify")``."""
    return LabScript()


TIME_LIMITS = (7, 10)  # per env: episodes of different lengths interleave and end in time-outs
STREAM_VEC_STEPS = 36  # 72 env steps: 5 + 3 finished episodes, one running episode per env
N_SAMPLED_GOAL = 4


# ---------------------------------------------------------------------------------------------------------
# A real replay stream, recorded through SB3's own collection path (test_framestack_replay, test_fast_sac)
# ---------------------------------------------------------------------------------------------------------
class Recorder(VecEnvWrapper):
    """Keeps a copy of every observation the VecEnv returned (reset and step), with dones and infos."""

    def __init__(self, venv):
        super().__init__(venv)
        self.returned: list[dict[str, np.ndarray]] = []
        self.dones: list[np.ndarray] = []
        self.infos: list[list[dict]] = []

    def reset(self):
        obs = self.venv.reset()
        self.returned.append(copy.deepcopy(obs))
        return obs

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        self.returned.append(copy.deepcopy(obs))
        self.dones.append(dones.copy())
        self.infos.append(copy.deepcopy(infos))
        return obs, rewards, dones, infos


@dataclass
class Stream:
    """What the env produced, per add() call i and env e, and the add() calls themselves."""

    vec_env: Recorder
    buffer: FrameStackHerReplayBuffer
    obs: list[dict[str, np.ndarray]]  # the observation the policy saw before step i
    next_obs: list[dict[str, np.ndarray]]  # what step i led to (the terminal observation at a done)
    actions: np.ndarray  # (T, E, A) the buffer actions add() received
    rewards: np.ndarray  # (T, E)
    dones: np.ndarray  # (T, E)
    episode: np.ndarray  # (T, E) episode counter per env
    step: np.ndarray  # (T, E) index inside the episode
    add_calls: list[tuple] = field(default_factory=list)
    time_limits: tuple[int, ...] = TIME_LIMITS  # per env
    n_sampled_goal: int = N_SAMPLED_GOAL  # the buffer's HER k

    def locate(self, env_idx: int, action: np.ndarray) -> int:
        """The add() call whose action for env ``env_idx`` is ``action`` (random actions are unique tags)."""
        matches = np.flatnonzero((self.actions[:, env_idx] == action).all(axis=1))
        assert len(matches) == 1, f"sampled action of env {env_idx} matches {len(matches)} recorded steps"
        return int(matches[0])

    def finished(self) -> set[tuple[int, int]]:
        """(call, env) of every transition whose episode ended within the stream."""
        result = set()
        for env_idx in range(self.dones.shape[1]):
            last_done = np.flatnonzero(self.dones[:, env_idx])[-1]
            result |= {(i, env_idx) for i in range(last_done + 1)}
        return result


def recording_add(buffer: Any) -> list[tuple]:
    """Make ``buffer.add`` keep a deep copy of every call's arguments, in order; returns that list
    (``del buffer.add`` restores the class's method)."""
    calls: list[tuple] = []
    real_add = buffer.add

    def add(*args):
        calls.append(copy.deepcopy(args))
        real_add(*args)

    buffer.add = add
    return calls


@pytest.fixture(name="recording_add", scope="session")
def recording_add_fixture() -> Any:
    """``recording_add(buffer)`` for the test modules (the add() spy of the recorded streams)."""
    return recording_add


def record_stream(pixels: bool, buffer_size: int = 1_000) -> Stream:
    """SAC (random actions, no updates) drives 2 Fetch envs into a FrameStackHerReplayBuffer; a spy keeps add()."""
    from pixel_wrapper import make_fetch_env  # loads mujoco: only for the tests that record a stream

    def make(limit: int):
        return lambda: TimeLimit(make_fetch_env("FetchPush-v4", pixels=pixels, goal_mode="both"), limit)

    vec_env = Recorder(DummyVecEnv([make(limit) for limit in TIME_LIMITS]))
    model = SAC("MultiInputPolicy", vec_env, buffer_size=buffer_size, learning_starts=10**6, seed=0, device="cpu",
                replay_buffer_class=FrameStackHerReplayBuffer,
                replay_buffer_kwargs=dict(n_sampled_goal=N_SAMPLED_GOAL))
    buffer = model.replay_buffer
    add_calls = recording_add(buffer)
    model.learn(STREAM_VEC_STEPS * len(TIME_LIMITS))
    del buffer.add

    dones = np.array(vec_env.dones)
    next_obs = []
    for returned, done, infos in zip(vec_env.returned[1:], vec_env.dones, vec_env.infos):
        nxt = copy.deepcopy(returned)
        for env_idx in np.flatnonzero(done):
            for key in nxt:
                nxt[key][env_idx] = infos[env_idx]["terminal_observation"][key]
        next_obs.append(nxt)
    episode = np.zeros_like(dones, dtype=np.int64)
    step = np.zeros_like(dones, dtype=np.int64)
    for i in range(1, len(dones)):
        episode[i] = episode[i - 1] + dones[i - 1]
        step[i] = np.where(dones[i - 1], 0, step[i - 1] + 1)
    return Stream(
        vec_env=vec_env, buffer=buffer, obs=vec_env.returned[:-1], next_obs=next_obs,
        actions=np.array([call[2] for call in add_calls]), rewards=np.array([call[3] for call in add_calls]),
        dones=dones, episode=episode, step=step, add_calls=add_calls,
    )


@pytest.fixture(scope="module", params=["pixels", "state"])
def stream(request: pytest.FixtureRequest) -> Iterator[Stream]:
    """A recorded real stream (pixel and full-state FetchPush), one per test module that asks for it."""
    recorded = record_stream(pixels=request.param == "pixels")
    yield recorded
    recorded.vec_env.close()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """The CI machine has 2 shared cores: one torch thread avoids oversubscription in in-process SAC runs
    (``pytestmark = pytest.mark.usefixtures("one_torch_thread")`` in the modules that train)."""
    import torch as th

    threads = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(threads)
