"""Several env processes, and a watchdog so a hung one ends the run with a sentence instead of silence.

SB3's ``SubprocVecEnv`` waits on each worker's pipe forever. A worker stuck inside an EGL call (upstream:
google-deepmind/mujoco#3444) would freeze a multi-day run without a word. ``TimeoutSubprocVecEnv`` awaits
every answer, start-up included, with a deadline and raises ``WorkerTimeoutError`` instead; the training
loop then saves a checkpoint and says how to continue.

| piece                    | what it does                                                            |
|--------------------------|-------------------------------------------------------------------------|
| ``make_vec_env``         | ``DummyVecEnv`` for one env, ``TimeoutSubprocVecEnv`` (spawn) for more   |
| ``TimeoutSubprocVecEnv`` | ``SubprocVecEnv`` whose workers must answer within ``worker_timeout`` s  |
| ``ignore_stop_signals``  | each worker's first call: Ctrl-C and SIGTERM are the main process's to handle |
| ``stop_signals_held``    | Ctrl-C and SIGTERM wait while a worker starts (they would cut its start-up) |
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import gymnasium as gym
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv
from stable_baselines3.common.vec_env.base_vec_env import CloudpickleWrapper
from stable_baselines3.common.vec_env.subproc_vec_env import _worker

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
REAP_TIMEOUT_S = 5.0
"""How long ``close()`` waits for each killed worker to be reaped: one stuck in a driver call can outlive its kill,
and the run must still end with its sentence."""


class WorkerTimeoutError(RuntimeError):
    """An env worker process did not answer in time, or died."""


def ignore_stop_signals() -> None:
    """Make this (worker) process ignore SIGINT and SIGTERM.

    Ctrl-C, ``timeout`` and Slurm's ``scancel`` signal the whole process group. The main process saves a
    checkpoint and then closes the workers itself, so they must not die first; a worker whose main
    process is gone still exits, on the EOFError of its closed pipe.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM that arrive in the block are handled when it ends, by the handlers in place before it.

    Around a worker's ``start()``: the new process reads its start-up data from a pipe the main process writes
    after launching it. Handled in between, the signal would end the main process before that write, and the
    worker would die on the pipe's EOFError with a traceback on the run's stderr. (Held by a Python handler, not
    a signal mask: a mask is per thread, and the kernel hands a process's signal to any thread that lets it in.)
    Outside the main thread, where Python sets no handlers, the block runs as it is.
    """
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    if threading.current_thread() is not threading.main_thread() or None in handlers.values():
        yield  # (None: a handler set outside Python, which signal.signal could not put back)
        return
    arrived: list[int] = []
    previous = {signum: signal.signal(signum, lambda number, frame: arrived.append(number)) for signum in handlers}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for held in arrived:
            signal.raise_signal(held)


class _WorkerEnvFn:
    """What a worker runs first: ``ignore_stop_signals``, then the env constructor (picklable, for spawn)."""

    def __init__(self, env_fn: Callable[[], gym.Env]) -> None:
        self.env_fn = env_fn

    def __call__(self) -> gym.Env:
        ignore_stop_signals()
        return self.env_fn()


class _TimedConnection:
    """A Pipe end whose ``recv`` gives up after ``worker_timeout`` seconds instead of blocking forever."""

    def __init__(self, connection: Any, index: int, owner: TimeoutSubprocVecEnv) -> None:
        self._connection, self._index, self._owner = connection, index, owner

    def recv(self) -> Any:
        timeout = self._owner.worker_timeout
        try:
            if self._connection.poll(timeout):
                return self._connection.recv()
        except (EOFError, ConnectionError, OSError) as exc:
            self._owner.failed = True
            raise WorkerTimeoutError(
                f"Env worker {self._index} of {self._owner.num_envs} exited unexpectedly ({type(exc).__name__})"
            ) from None
        self._owner.failed = True
        raise WorkerTimeoutError(
            f"Env worker {self._index} of {self._owner.num_envs} did not answer within {timeout:g} s (a hung EGL "
            "render is the usual cause, see google-deepmind/mujoco#3444)"
        )

    def __getattr__(self, name: str) -> Any:  # send, poll, close: unchanged
        return getattr(self._connection, name)


@contextmanager
def deadline(seconds: float, message: str) -> Iterator[None]:
    """Raise ``WorkerTimeoutError(message)`` if the block runs longer than ``seconds``.

    Uses SIGALRM, so it only acts in the main thread on POSIX; elsewhere the block simply runs.
    """
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise WorkerTimeoutError(message)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class TimeoutSubprocVecEnv(SubprocVecEnv):
    """SB3's ``SubprocVecEnv`` whose workers must answer within ``worker_timeout`` seconds.

    Every answer is awaited with ``poll(timeout)``; a silent worker raises ``WorkerTimeoutError`` and
    ``close()`` then terminates the workers instead of waiting on them.
    """

    def __init__(self, env_fns: list[Callable[[], gym.Env]], worker_timeout: float, start_method: str = "spawn",
                 startup_timeout: float | None = None) -> None:
        self.worker_timeout = worker_timeout
        self.failed = False
        self.num_envs = len(env_fns)
        startup_timeout = worker_timeout if startup_timeout is None else startup_timeout
        message = (f"The {len(env_fns)} env workers did not start within {startup_timeout:g} s (importing and "
                   "building the envs, EGL context included)")
        try:
            with deadline(startup_timeout, message):
                self._start_workers(env_fns, start_method)
                self.remotes[0].send(("get_spaces", None))
                observation_space, action_space = self.remotes[0].recv()
        except WorkerTimeoutError:
            self.failed = True
            self._terminate_workers()
            raise
        VecEnv.__init__(self, len(env_fns), observation_space, action_space)
        self.remotes = [_TimedConnection(remote, i, self) for i, remote in enumerate(self.remotes)]

    def _start_workers(self, env_fns: list[Callable[[], gym.Env]], start_method: str) -> None:
        """``SubprocVecEnv.__init__``'s worker start (SB3's own ``_worker`` loop), each ``start()`` with the stop
        signals held (``stop_signals_held``)."""
        self.waiting, self.closed = False, False
        ctx = mp.get_context(start_method)
        self.remotes, self.work_remotes = zip(*[ctx.Pipe() for _ in env_fns], strict=True)
        self.processes = []
        for work_remote, remote, env_fn in zip(self.work_remotes, self.remotes, env_fns, strict=True):
            args = (work_remote, remote, CloudpickleWrapper(_WorkerEnvFn(env_fn)))
            process = ctx.Process(target=_worker, args=args, daemon=True)  # type: ignore[attr-defined]  # (as SB3)
            with stop_signals_held():
                process.start()
            self.processes.append(process)
            work_remote.close()

    def _terminate_workers(self) -> None:
        """Kill the workers: they ignore SIGTERM (``ignore_stop_signals``), and a hung one answers nothing."""
        for process in getattr(self, "processes", []):
            if process.is_alive():
                process.kill()
        for process in getattr(self, "processes", []):
            process.join(timeout=REAP_TIMEOUT_S)
        self.closed = True

    def close(self) -> None:
        if self.closed:
            return
        if self.failed:
            self._terminate_workers()
            return
        try:
            super().close()
        except WorkerTimeoutError:
            self._terminate_workers()


def make_vec_env(env_fns: list[Callable[[], gym.Env]], worker_timeout: float) -> VecEnv:
    """``DummyVecEnv`` for one env (no processes); ``TimeoutSubprocVecEnv`` with the spawn start method
    for more: every worker starts a fresh interpreter with its own EGL context (a forked one is not safe)."""
    if len(env_fns) == 1:
        return DummyVecEnv(env_fns)
    return TimeoutSubprocVecEnv(env_fns, worker_timeout=worker_timeout, start_method="spawn")
