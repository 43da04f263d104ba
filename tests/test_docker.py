"""The Docker path, really built and run: ``DEV_MODE=native bash docker/dev.sh pytest -m docker``.

Excluded from the default run (marker ``docker``): it needs a Docker engine and builds a ~6 GB image on first
use (minutes; dev.sh reuses it afterwards). It goes through ``docker/dev.sh`` exactly as the chapter's first
command does: builds ``docker/Dockerfile``, then runs a lab's ``--verify`` and a tiny full-state ``train`` in the
container with the repository mounted. ``DOCKER_HOST`` picks the engine; ``DEV_BASE_IMAGE`` the Debian
bookworm base (default ``debian:bookworm-slim`` from Docker Hub; a local copy where no registry is reachable).

One test runs by default: with no engine answering, ``DEV_MODE=docker`` ends in one sentence.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ch09.run.checkpoints import load_for_acting

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 3600
"""A first build downloads PyTorch's CUDA wheels (GBs); later runs reuse the image."""


def dev_sh(*args: str, timeout: float = BUILD_TIMEOUT_S, **env: str) -> subprocess.CompletedProcess:
    """``DEV_MODE=docker bash docker/dev.sh ARGS`` from the repository root."""
    return subprocess.run(["bash", "docker/dev.sh", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT, env={**os.environ, "DEV_MODE": "docker", **env})


def dev_sh_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("[dev.sh]")]


@pytest.fixture(scope="module")
def engine() -> None:
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
        pytest.skip("no Docker engine answers `docker info` (set DOCKER_HOST to use another)")


def test_no_engine_is_one_sentence() -> None:
    proc = dev_sh("python", "--version", timeout=60, DOCKER_HOST="unix:///nonexistent/docker.sock")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "no Docker engine answers" in proc.stderr and "DEV_MODE=native bash docker/dev.sh python" in proc.stderr


@pytest.mark.docker
def test_build_context_is_what_the_install_needs(engine: None, tmp_path: Path) -> None:
    """.dockerignore sends requirements.txt, pyproject.toml and the code tree (for the editable install), and keeps
    checkpoints/, runs/, .venv/, tests and caches out of every build's context."""
    probe = (f"FROM {os.environ.get('DEV_BASE_IMAGE', 'debian:bookworm-slim')}\n"
             "COPY . /context\nRUN find /context -type f | sort && du -sb /context\n")
    image_id = tmp_path / "probe.iid"
    build = ["docker", "build", "--no-cache", "--iidfile", str(image_id), "-f-", "."]
    proc = subprocess.run([*build[:2], "--progress=plain", *build[2:]], input=probe, capture_output=True, text=True,
                          timeout=600, cwd=REPO_ROOT)
    if proc.returncode and "--progress" in proc.stderr:  # the legacy builder knows no --progress
        proc = subprocess.run(build, input=probe, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    if image_id.exists():
        subprocess.run(["docker", "rmi", image_id.read_text().strip()], capture_output=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    files = sorted({word for word in output.split() if word.startswith("/context/")})
    tracked = subprocess.run(["git", "ls-files", "scripts"], capture_output=True, text=True, cwd=REPO_ROOT,
                             check=True).stdout.split()
    assert set(files) >= {"/context/requirements.txt", "/context/pyproject.toml"} | {f"/context/{f}" for f in tracked}
    assert all(f.startswith("/context/scripts/") or f in ("/context/requirements.txt", "/context/pyproject.toml")
               for f in files), files
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files), files


@pytest.mark.docker
def test_lab_verify_in_the_container(engine: None) -> None:
    proc = dev_sh("python", "scripts/labs/pixel_wrapper.py", "--verify")
    assert proc.returncode == 0, (dev_sh_lines(proc), proc.stdout[-3000:], proc.stderr[-3000:])
    summary = [line for line in proc.stdout.splitlines() if line.endswith("claims passed")]
    n_passed, n_claims = summary[0].split()[0].split("/")
    assert n_passed == n_claims and "FAIL" not in proc.stdout


@pytest.mark.docker
def test_tiny_train_in_the_container(engine: None) -> None:
    root = REPO_ROOT / "runs" / f"docker-test-{os.getpid()}"  # inside the mounted repository (git ignores runs/)
    try:
        proc = dev_sh("python", "scripts/ch09_pixel_push.py", "train", "--env", "FetchReach-v4", "--full-state",
                      "--total-steps", "200", "--buffer-size", "1000", "--batch-size", "32", "--learning-starts", "100",
                      "--eval-freq", "100", "--eval-episodes", "2", "--checkpoint-freq", "100", "--device", "cpu",
                      "--no-progress", "--artifact-root", f"/workspace/{root.relative_to(REPO_ROOT)}")
        assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
        checkpoint = root / "checkpoints" / "ch09_fullstate_FetchReach-v4_seed0.zip"
        assert load_for_acting(checkpoint).num_timesteps == 200  # written in the container, loaded here
        assert os.stat(checkpoint).st_uid == os.getuid()  # dev.sh runs as the caller, not as root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.docker
def test_unbuildable_image_is_one_sentence(engine: None) -> None:
    proc = dev_sh("python", "--version", timeout=600, DEV_BASE_IMAGE="registry.invalid/no-such-base:0")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    failure = dev_sh_lines(proc)[-1]
    assert "could not be built" in failure and "registry.invalid/no-such-base:0" in failure
    assert "DEV_MODE=native bash docker/dev.sh python --version" in failure
    assert proc.stderr.strip().splitlines()[-1] == failure  # the build's own output went to its log file
