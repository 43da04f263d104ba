"""``artifacts.atomic_replace``: a rename is durable only once its folder is synced, so the folder is fsynced
after the rename, for a file and for a folder (the frame-stack buffer). The syscall order is what is under test,
so ``os.fsync`` and ``os.replace`` are wrapped to record what they were called on (the real calls still run).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from ch09.run import artifacts


@pytest.fixture
def syscalls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every fsync (the path its descriptor is open on) and every replace (the target), in call order."""
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        real_replace(src, dst)
        calls.append(("replace", str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_a_file_is_synced_then_renamed_then_its_folder_synced(tmp_path: Path, syscalls: list) -> None:
    target = tmp_path / "run.meta.json"
    artifacts.write_json(target, {"steps_done": 100})
    assert json.loads(target.read_text()) == {"steps_done": 100}
    assert [call[0] for call in syscalls] == ["fsync", "replace", "fsync"]
    assert artifacts.TEMPORARY_MARK in syscalls[0][1]  # the temporary's data, before it gets the name
    assert syscalls[1:] == [("replace", str(target)), ("fsync", str(tmp_path))]


def test_a_folder_is_renamed_then_its_parent_synced(tmp_path: Path, syscalls: list) -> None:
    target = tmp_path / "replay_buffer"
    for generation in ("first", "second"):  # the second replaces the first through the .old name
        syscalls.clear()
        with artifacts.atomic_replace(target) as tmp:
            tmp.mkdir()
            (tmp / "chunk").write_text(generation)
        assert (target / "chunk").read_text() == generation
        assert syscalls[-2:] == [("replace", str(target)), ("fsync", str(tmp_path))]
    assert not target.with_name("replay_buffer.old").exists()


def test_a_folder_that_cannot_be_synced_einval_is_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some network and FUSE file systems refuse to fsync a folder with EINVAL: the write still succeeds."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    artifacts.write_json(tmp_path / "result.json", {"ok": True})
    assert json.loads((tmp_path / "result.json").read_text()) == {"ok": True}
