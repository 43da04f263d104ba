"""Shared test set-up: the labs and scripts import by bare module name, exactly as when a reader runs them."""

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = REPO_ROOT / "scripts"
LABS_DIR = SCRIPTS_DIR / "labs"

# MuJoCo picks its GL backend at import time; the labs default to EGL too, this keeps tests explicit.
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

for path in (LABS_DIR, SCRIPTS_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
