"""Shared test set-up: the labs and scripts import by bare module name, exactly as when a reader runs them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = REPO_ROOT / "scripts"
LABS_DIR = SCRIPTS_DIR / "labs"

# MuJoCo picks its GL backend at import time; the labs default to EGL too, this keeps tests explicit.
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

for path in (LABS_DIR, SCRIPTS_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


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
