"""The memory preflight reads the memory this process can get: the host's, or less under a cgroup limit.

Under ``docker run --memory``, Slurm's ``--mem`` or a Kubernetes limit, /proc/meminfo still shows the host, and a
buffer that "fits" there is OOM-killed hours later. ``lab_support.available_memory`` takes the smaller of the
host's MemAvailable and what the process's cgroups allow. It is checked against cgroup files laid out in a folder
(v2, v2 without a limit, a parent's limit, v1, v1 outside its namespace, no cgroup), and against a real cgroup
made for the test where the machine lets one be created (as root, with a memory controller).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab_support import (
    MEMORY_RESERVE_BYTES,
    AvailableMemory,
    MemoryBudgetError,
    available_memory,
    check_memory_fits,
    host_memory_available,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
HOST_AVAILABLE = 64 * GiB
V1_UNLIMITED = "9223372036854771712"  # what cgroup v1 writes for "no limit"


def file_tree(root: Path, cgroup: str | None, files: dict[str, str]) -> Path:
    """A file-system root holding /proc/meminfo (64 GiB available), /proc/self/cgroup and the cgroup files."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/meminfo").write_text(f"MemTotal: {2 * HOST_AVAILABLE // 1024} kB\n"
                                       f"MemAvailable: {HOST_AVAILABLE // 1024} kB\n")
    if cgroup is not None:
        (root / "proc/self/cgroup").write_text(cgroup)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


JOB = "sys/fs/cgroup/system.slice/job.scope"
DOCKER_V1 = "sys/fs/cgroup/memory/docker/abc"
CASES = {
    # v2: limit - usage + reclaimable page cache
    "v2": ("0::/system.slice/job.scope\n",
           {f"{JOB}/memory.max": str(8 * GiB), f"{JOB}/memory.current": str(3 * GiB),
            f"{JOB}/memory.stat": f"anon {2 * GiB}\ninactive_file {GiB}"},
           6 * GiB, "the cgroup v2 limit /sys/fs/cgroup/system.slice/job.scope/memory.max minus memory.current, "
                    "below the host's MemAvailable"),
    # v2 'max' everywhere: no limit, the host decides
    "v2 max": ("0::/system.slice/job.scope\n",
               {f"{JOB}/memory.max": "max", f"{JOB}/memory.current": str(3 * GiB),
                "sys/fs/cgroup/system.slice/memory.max": "max", "sys/fs/cgroup/system.slice/memory.current": "0"},
               HOST_AVAILABLE, "the host's MemAvailable"),
    # a Slurm job: the step's cgroup has no limit, the job's (its parent) has one
    "v2 parent": ("0::/system.slice/job.scope\n",
                  {f"{JOB}/memory.max": "max", f"{JOB}/memory.current": str(GiB),
                   "sys/fs/cgroup/system.slice/memory.max": str(4 * GiB),
                   "sys/fs/cgroup/system.slice/memory.current": str(GiB)},
                  3 * GiB, "the cgroup v2 limit /sys/fs/cgroup/system.slice/memory.max minus memory.current, "
                           "below the host's MemAvailable"),
    # v1 (hybrid layout: a v2 line without files, a cpu line to ignore)
    "v1": ("12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/docker/abc\n",
           {f"{DOCKER_V1}/memory.limit_in_bytes": str(16 * GiB), f"{DOCKER_V1}/memory.usage_in_bytes": str(4 * GiB),
            f"{DOCKER_V1}/memory.stat": f"inactive_file 7\ntotal_inactive_file {2 * GiB}"},
           14 * GiB, "the cgroup v1 limit /sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes minus "
                     "memory.usage_in_bytes, below the host's MemAvailable"),
    # v1 inside a container without its own cgroup namespace: the path is not under the mount, its root is ours
    "v1 mount root": ("4:memory:/docker/abc\n",
                      {"sys/fs/cgroup/memory/memory.limit_in_bytes": str(2 * GiB),
                       "sys/fs/cgroup/memory/memory.usage_in_bytes": str(GiB)},
                      GiB, "the cgroup v1 limit /sys/fs/cgroup/memory/memory.limit_in_bytes minus "
                           "memory.usage_in_bytes, below the host's MemAvailable"),
    "v1 unlimited": ("4:memory:/docker/abc\n",
                     {f"{DOCKER_V1}/memory.limit_in_bytes": V1_UNLIMITED,
                      f"{DOCKER_V1}/memory.usage_in_bytes": str(GiB)},
                     HOST_AVAILABLE, "the host's MemAvailable"),
    # a v2 limit above the host's free memory: the host limits, and says so
    "v2 above the host": ("0::/\n", {"sys/fs/cgroup/memory.max": str(100 * GiB),
                                     "sys/fs/cgroup/memory.current": str(GiB)},
                          HOST_AVAILABLE, "the host's MemAvailable, below the cgroup v2 limit "
                                          "/sys/fs/cgroup/memory.max minus memory.current"),
    "no cgroup": (None, {}, HOST_AVAILABLE, "the host's MemAvailable"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_available_memory_from_cgroup_files(case: str, tmp_path: Path) -> None:
    cgroup, files, want_bytes, want_source = CASES[case]
    free = available_memory(file_tree(tmp_path, cgroup, files))
    assert free[:2] == (want_bytes, want_source)


def test_a_refusal_names_the_cgroup_limit(tmp_path: Path) -> None:
    """12 GiB fit the host's 64 but not a 8 GiB container: the sentence says which limit to raise."""
    cgroup, files, _, _ = CASES["v2"]
    free = available_memory(file_tree(tmp_path, cgroup, files))
    with pytest.raises(MemoryBudgetError) as refused:
        check_memory_fits("replay buffer", 12 * 1000, 2**20, free=free)
    assert "(the cgroup v2 limit /sys/fs/cgroup/system.slice/job.scope/memory.max minus memory.current" \
        in str(refused.value)
    assert str(refused.value).endswith("or fewer, or free memory or raise that limit.")
    host = AvailableMemory(HOST_AVAILABLE, "the host's MemAvailable")
    assert check_memory_fits("replay buffer", 12 * 1000, 2**20, free=host) == 12 * 1000 * 2**20


# ---------------------------------------------------------------------------------------------------------
# A real cgroup: the preflight run inside it reports its limit
# ---------------------------------------------------------------------------------------------------------
REAL_LIMIT = 2 * GiB
"""Room for a Python process that imports torch and SB3 (about 0.6 GB), far below the buffer asked for."""


def _make_cgroup(name: str, limit: int) -> tuple[Path, str]:
    """A new cgroup with a memory limit, in v2 where its memory controller is available, else v1."""
    v2 = next((Path(m) for m in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
               if Path(m, "cgroup.controllers").exists()), None)  # pure v2, or the v2 part of a hybrid layout
    if v2 is not None and "memory" in (v2 / "cgroup.controllers").read_text().split():
        if "memory" not in (v2 / "cgroup.subtree_control").read_text().split():
            (v2 / "cgroup.subtree_control").write_text("+memory")
        folder = v2 / name
        folder.mkdir()
        (folder / "memory.max").write_text(str(limit))
        return folder, "memory.max"
    v1 = Path("/sys/fs/cgroup/memory")
    if not (v1 / "memory.limit_in_bytes").exists():
        raise OSError("no cgroup v2 memory controller and no cgroup v1 memory hierarchy is mounted")
    folder = v1 / name
    folder.mkdir()
    (folder / "memory.limit_in_bytes").write_text(str(limit))
    return folder, "memory.limit_in_bytes"


@pytest.fixture
def memory_cgroup() -> Iterator[tuple[Path, str]]:
    """A cgroup limited to REAL_LIMIT bytes, removed afterwards; skipped only where none can be created."""
    try:
        folder, limit_file = _make_cgroup(f"ch09-test-{os.getpid()}", REAL_LIMIT)
    except OSError as exc:
        pytest.skip(f"this machine does not let the test create a memory cgroup ({exc}); the cgroup files in a "
                    "folder are still checked")
    try:
        yield folder, limit_file
    finally:
        for _ in range(50):  # the process inside may take a moment to be gone
            try:
                folder.rmdir()
                break
            except OSError:
                time.sleep(0.1)


PREFLIGHT_IN_CGROUP = """
import json
from ch09.engine.memory import MemoryNeed, memory_preflight
from lab_support import MemoryBudgetError, available_memory
print(json.dumps(available_memory()))
try:
    memory_preflight([MemoryNeed("replay buffer", {items}, 1000, "cpu")])
except MemoryBudgetError as exc:
    print("refused:", exc)
"""


def test_the_preflight_inside_a_real_cgroup_reports_its_limit(memory_cgroup: tuple[Path, str]) -> None:
    folder, limit_file = memory_cgroup
    items = REAL_LIMIT // 1000  # a buffer as large as the whole limit: refused inside, fits the host
    assert host_memory_available() - MEMORY_RESERVE_BYTES > items * 1000, "the host itself is too small to tell"
    join = f'echo $$ > {folder / "cgroup.procs"} && exec "$0" -c "$1"'  # the shell moves itself in, then runs Python
    proc = subprocess.run(["sh", "-c", join, sys.executable, PREFLIGHT_IN_CGROUP.format(items=items)],
                          capture_output=True, text=True, timeout=180, cwd=REPO_ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    bytes_available, limited_by, _fix = json.loads(lines[0])
    source = f"the cgroup {'v2' if limit_file == 'memory.max' else 'v1'} limit {folder / limit_file} minus "
    assert 0 < bytes_available < REAL_LIMIT and limited_by.startswith(source), lines[0]
    preflight = next(line for line in lines if line.startswith("[preflight] replay buffer"))
    assert f"GB free: {source}" in preflight and "below the host's MemAvailable" in preflight
    refusal = next(line for line in lines if line.startswith("refused:"))
    assert source in refusal and refusal.endswith("or free memory or raise that limit.")
