"""Shared test set-up, and the helpers several test files use to run the labs and the production script.

Imports need no set-up here: ``pytest.ini``'s ``pythonpath = scripts scripts/labs`` puts the scripts and the
labs on ``sys.path``, so tests import them by bare module name, exactly as when a reader runs them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

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
    """``ch09_pixel_push.main`` in this process, and the contract every refused command line keeps."""

    def __init__(self, capsys: pytest.CaptureFixture) -> None:
        self._capsys = capsys

    def run(self, *argv: str) -> tuple[int, str, str]:
        """Run ``main(argv)``: (exit code, stdout, stderr)."""
        import ch09_pixel_push

        code = ch09_pixel_push.main(list(argv))
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
