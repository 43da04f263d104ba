"""Reliability: each numbered case of issue 13, typed as a hostile user would, must end in one line.

Every case runs its exact command and checks the exit code (2 for a mistake the user can fix, 128 + the
signal for a signal), ONE line on stderr that names the fix, and no ``Traceback``. Where the process itself
matters (a failing import, a signal, a kill, a full disk) the command runs in a fresh interpreter; where it
does not, in-process through ``main(argv)``, which runs under the same top-level guard.

| case | what                                                        | test                                     |
|------|-------------------------------------------------------------|------------------------------------------|
| 1    | ``--seed -1`` / ``>= 2**32``                                | test_1_seed_out_of_range                 |
| 2    | ``--artifact-root`` a file, under a file, unwritable        | test_2_artifact_root_that_is_no_folder   |
| 3    | ``--device tpu``; ``--device cuda`` without CUDA            | test_3_device_that_does_not_exist        |
| 4    | ``--worker-timeout -1 --n-envs 2``                          | test_4_worker_timeout_not_positive       |
| 5    | a ``.meta.json`` of the wrong shape, on eval and on resume   | test_5_metadata_of_the_wrong_shape       |
| 6    | ``aggregate`` on a JSON list or a wrongly typed eval file   | test_6_aggregate_input_of_the_wrong_shape|
| 7    | a full disk during a checkpoint, then ``--resume`` on it;   | test_7_full_disk_during_a_checkpoint,    |
|      | one during its buffer: all of the last checkpoint stays     | test_7_a_failed_buffer_write_keeps_...   |
| 8    | mujoco >= 3.12 (and the file requirements.txt points to)    | test_8_mujoco_refusal_is_one_sentence    |
| 9    | ``--learning-starts 5000 --total-steps 300``, a first sample | test_9_run_that_would_never_train        |
|      | before any finished episode                                 |                                          |
| 10   | a kill during the periodic snapshot copy                    | test_10_interrupted_snapshot_is_repaired |
| 11   | SIGTERM, SIGINT at start-up; a kill before checkpoint one   | test_11_*                                |
| 12   | a damaged, or missing, saved replay buffer on ``--resume``  | test_12_a_damaged_or_missing_replay_...  |

Budgets are tiny full-state FetchReach-v4 runs (a few hundred env steps, seconds each).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stable_baselines3.common.vec_env import DummyVecEnv

import cli_guard
from ch09 import experiment
from ch09.run.checkpoints import load_for_acting, read_meta

REPO_ROOT = Path(__file__).resolve().parents[1]
REACH = ("--env", "FetchReach-v4", "--full-state", "--buffer-size", "1000", "--batch-size", "32",
         "--learning-starts", "100", "--eval-freq", "0", "--checkpoint-freq", "100", "--device", "cpu",
         "--no-progress")
"""A tiny full-state run: ~100-200 env steps/s here, a checkpoint every 100 steps."""
STEM = "ch09_fullstate_FetchReach-v4_seed0"


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------

def temporaries(folder: Path) -> list[Path]:
    """Files an interrupted write may leave: ``*.tmp``, ``*.tmp-<pid>-<n>``, ``*.old``."""
    return [p for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]


def wait_for(predicate, timeout: float, process: subprocess.Popen, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None or time.time() > deadline:
            out, err = process.communicate(timeout=30) if process.poll() is None else process.communicate()
            pytest.fail(f"{what} never happened (exit {process.returncode}):\n{out[-2000:]}\n{err[-2000:]}")
        time.sleep(0.02)


def steps_done(meta: Path) -> int:
    try:
        return int(json.loads(meta.read_text())["steps_done"])
    except (OSError, ValueError, KeyError):  # not written yet, or being replaced
        return -1


# ------------------------------------------------------------------------------------------------------
# 1-4, 9: flags checked where they are parsed, before any env or model exists
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["train", "--seed", "-1"], ["train", "--seed", str(2**32)],
                                  ["eval", "--checkpoint", "x.zip", "--seed", "-1"]])
def test_1_seed_out_of_range(cli, argv: list[str], tmp_path: Path) -> None:
    code, out, err = cli.run(*argv, "--artifact-root", str(tmp_path))
    cli.assert_one_line(code, err, 2, "--seed", "[0, 2**32)")
    assert out == ""  # refused before anything was built or printed


@pytest.mark.parametrize("kind", ["file", "under a file", "/proc"])
def test_2_artifact_root_that_is_no_folder(cli, kind: str, tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    root = {"file": a_file, "under a file": a_file / "sub", "/proc": Path("/proc/x")}[kind]
    code, out, err = cli.run("train", *REACH, "--artifact-root", str(root))
    line = cli.assert_one_line(code, err, 2, "--artifact-root", "pass a folder")
    assert {"file": "is a file", "under a file": "lies under", "/proc": "cannot be written"}[kind] in line
    assert out == ""  # no env, no preflight, no model: nothing printed


def test_3_device_that_does_not_exist(cli, tmp_path: Path) -> None:
    code, out, err = cli.run("train", *REACH, "--device", "tpu", "--artifact-root", str(tmp_path))
    cli.assert_one_line(code, err, 2, "--device 'tpu'", "cpu")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    code, out, err = cli.run("train", *REACH, "--device", "cuda", "--artifact-root", str(tmp_path))
    cli.assert_one_line(code, err, 2, "--device cuda", "--device cpu")
    assert out == "" and not (tmp_path / "checkpoints").exists()  # no run (and no metadata claiming cuda)


@pytest.mark.parametrize("timeout", ["-1", "0"])
def test_4_worker_timeout_not_positive(cli, timeout: str, tmp_path: Path) -> None:
    code, out, err = cli.run("train", *REACH, "--worker-timeout", timeout, "--n-envs", "2",
                              "--artifact-root", str(tmp_path))
    cli.assert_one_line(code, err, 2, "--worker-timeout must be a positive number")
    assert out == ""


@pytest.mark.parametrize("argv, fragments", [
    (["--learning-starts", "5000", "--total-steps", "300"], ["--learning-starts 5,000", "--total-steps 300",
                                                             "never update"]),
    (["--learning-starts", "30"], ["--learning-starts 30", "50-step episode", "--learning-starts 50"]),
    (["--n-envs", "2", "--buffer-size", "60"], ["--buffer-size 60", "2 env(s)", "--buffer-size 102"]),
])
def test_9_run_that_would_never_train(cli, argv: list[str], fragments: list[str], tmp_path: Path) -> None:
    """A run that would never update, or whose HER buffer would stop it at its first sample (no finished
    episode to draw from), is refused before anything is built."""
    code, out, err = cli.run("train", *argv, "--artifact-root", str(tmp_path))
    cli.assert_one_line(code, err, 2, *fragments)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------
# 5, 6: every file read back is checked for shape, not only for JSON syntax
# ------------------------------------------------------------------------------------------------------
WRONG_META = {
    "a list": lambda meta: [1, 2, 3],
    "config a string": lambda meta: {**meta, "config": "garbage"},
    "steps_done a string": lambda meta: {**meta, "steps_done": "many"},
}


@pytest.mark.parametrize("shape", list(WRONG_META))
@pytest.mark.parametrize("command", ["eval", "resume"])
def test_5_metadata_of_the_wrong_shape(cli, shape: str, command: str, tmp_path: Path) -> None:
    cfg = experiment.resolve_config(experiment.TrainConfig(env="FetchReach-v4", full_state=True,
                                                           artifact_root=tmp_path))
    paths = experiment.run_paths(cfg)
    paths.checkpoint_dir.mkdir(parents=True)
    paths.checkpoint.write_bytes(b"never unpickled: the metadata is refused first")
    paths.meta.write_text(json.dumps(WRONG_META[shape](experiment.new_meta(cfg, paths, memory=[])), default=str))
    if command == "eval":
        argv = ["eval", "--checkpoint", str(paths.checkpoint), "--artifact-root", str(tmp_path)]
    else:
        argv = ["train", *REACH, "--resume", "--total-steps", "300", "--artifact-root", str(tmp_path)]
    code, _, err = cli.run(*argv)
    line = cli.assert_one_line(code, err, 2, str(paths.meta), "restore it from a backup or start a fresh run")
    assert {"a list": "holds a JSON list", "config a string": "'config' should be an object",
            "steps_done a string": "'steps_done' should be an integer"}[shape] in line


@pytest.mark.parametrize("content, fragment", [
    ([1, 2, 3], "holds a JSON list"),
    ({"format": "ch09-eval-v1"}, "has no field 'name'"),
    ({"format": "ch09-eval-v1", "name": "x", "tag": "t", "env_id": "e", "train_seed": 0, "checkpoint_steps": 1,
      "n_episodes": 10, "success_rate": "high", "success_ci95": [0, 1], "mean_final_goal_distance": 0.1},
     "'success_rate' should be a number"),
])
def test_6_aggregate_input_of_the_wrong_shape(cli, content: object, fragment: str, tmp_path: Path) -> None:
    path = tmp_path / "ch09_x_seed0_eval.json"
    path.write_text(json.dumps(content))
    code, _, err = cli.run("aggregate", str(path), "--artifact-root", str(tmp_path))
    cli.assert_one_line(code, err, 2, str(path), fragment, "eval --checkpoint")


# ------------------------------------------------------------------------------------------------------
# 7: a full disk while checkpointing (a small tmpfs; as a normal user, a folder made read-only mid-run)
# ------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path):
    """(folder, how): a 16 MiB tmpfs when we may mount one, else a folder we can make read-only (non-root)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount"):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
                                 capture_output=True).returncode == 0
    if not mounted and os.geteuid() == 0:
        pytest.skip("root without permission to mount a tmpfs: no way to fill a disk or deny a write here")
    try:
        yield folder, "tmpfs" if mounted else "read-only"
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        else:
            for path in [folder, *folder.rglob("*")]:
                if path.is_dir():
                    path.chmod(0o755)


def fill(folder: Path, how: str) -> None:
    """Leave too little room for a checkpoint: fill the tmpfs but 256 KiB, or make checkpoints/ read-only.

    The run keeps writing (TensorBoard events, checkpoints) while the filler grows, so the free space is read again
    before every MiB, and whatever the run took meanwhile is given back at the end."""
    if how == "read-only":
        (folder / "checkpoints").chmod(0o555)
        return
    keep = 256 * 1024
    with open(folder / "filler", "wb", buffering=0) as handle:
        while (room := shutil.disk_usage(folder).free - keep) > 0:
            try:
                handle.write(b"\0" * min(room, 1 << 20))
            except OSError as error:  # the run wrote between the read and the write: the disk is full, see below
                if error.errno != errno.ENOSPC:
                    raise
                break
        handle.truncate(max(0, handle.tell() - max(0, keep - shutil.disk_usage(folder).free)))


def unfill(folder: Path, how: str) -> None:
    if how == "read-only":
        (folder / "checkpoints").chmod(0o755)
    else:
        (folder / "filler").unlink()


def test_7_full_disk_during_a_checkpoint(cli, small_disk: tuple[Path, str], production) -> None:
    root, how = small_disk
    argv = ["train", *REACH, "--total-steps", "3000", "--artifact-root", str(root)]
    process = production.popen(*argv)
    try:
        wait_for(lambda: steps_done(root / "checkpoints" / f"{STEM}.meta.json") >= 100, 180, process,
                 "the first checkpoint")
        fill(root, how)
        _, err = process.communicate(timeout=180)
    finally:
        process.kill()
    line = cli.assert_one_line(process.returncode, err, 2, "was not saved", str(root / "checkpoints"), "bytes needed",
                           "--resume")
    assert "No space left" in line or "Permission denied" in line
    assert temporaries(root) == [], "an interrupted write left its temporary behind"
    meta = read_meta(root / "checkpoints" / f"{STEM}.meta.json", "the test")
    assert meta["steps_done"] >= 100 and meta["periodic_checkpoints"]
    for name in [f"{STEM}.zip", *meta["periodic_checkpoints"]]:  # every checkpoint written before still loads
        assert load_for_acting(root / "checkpoints" / name).num_timesteps >= 100

    resume = ["train", *REACH, "--total-steps", "400", "--resume", "--artifact-root", str(root)]
    if how == "tmpfs":  # the still-full disk is refused before anything is built
        proc = production.run(*resume)
        cli.assert_one_line(proc.returncode, proc.stderr, 2, "--resume needs room", "bytes")
    unfill(root, how)
    production.check(*resume)  # once there is room, the same command continues
    assert load_for_acting(root / "checkpoints" / f"{STEM}.zip").num_timesteps == 400



@pytest.mark.parametrize("replay", ["framestack", "sb3"])
def test_7_a_failed_buffer_write_keeps_the_whole_previous_checkpoint(cli, replay: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills while the replay buffer of the step-200 checkpoint is written (the zip already is): the
    zip, the buffer and the metadata all stay at step 100, the sentence says so, and the resume continues with
    the step-100 buffer instead of throwing it away."""
    from ch09.run import checkpoints
    from ch09.run.digest import sha256_file

    write_replay_buffer = checkpoints.write_replay_buffer
    calls = []

    def fails_the_second_time(model, path: Path) -> None:
        calls.append(model.num_timesteps)
        write_replay_buffer(model, path)  # a partial file or folder is left at the temporary path
        if len(calls) == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "write_replay_buffer", fails_the_second_time)
    argv = ["train", *REACH, "--replay", replay, "--save-replay-buffer", "--artifact-root", str(tmp_path)]
    code, _, err = cli.run(*argv, "--total-steps", "300")
    cli.assert_one_line(code, err, 2, "The checkpoint of step 200 was not saved", "_replay_buffer",
                        "No space left", "the checkpoint files of step 100 are intact", "--resume")
    assert calls == [100, 200] and temporaries(tmp_path) == []
    folder = tmp_path / "checkpoints"
    meta = read_meta(folder / f"{STEM}.meta.json", "the test")
    assert meta["steps_done"] == 100 and meta["replay_buffer"]["steps"] == 100
    assert load_for_acting(folder / f"{STEM}.zip").num_timesteps == 100
    assert meta["sha256"][f"{STEM}.zip"] == sha256_file(folder / f"{STEM}.zip")

    monkeypatch.setattr(checkpoints, "write_replay_buffer", write_replay_buffer)
    code, out, err = cli.run(*argv, "--total-steps", "300", "--resume")
    assert code == 0, err
    assert "[resume] replay buffer restored" in out and "no replay buffer saved" not in out
    assert "truncate" not in err  # the loads' warning about the closed episode is for code that would continue it


class KilledBetweenRenames(BaseException):
    """Stands for a SIGKILL between two renames of a checkpoint's commit."""


@pytest.mark.parametrize("renames_done", [1, 2])
@pytest.mark.parametrize("replay", ["framestack", "sb3"])
def test_7_a_kill_between_the_renames_never_resumes_with_a_buffer_of_another_step(
        replay: str, renames_done: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step-150 checkpoint's zip, buffer and metadata are renamed into place one after another. Killed after
    the first or the second rename, the resume either restores the buffer of the zip's own step or none (and
    collects fresh steps): never the buffer of another step, which it would take as the zip's."""
    from ch09.run import artifacts
    from ch09.run.checkpoints import Checkpointer

    cfg = experiment.resolve_config(experiment.TrainConfig(
        env="FetchReach-v4", full_state=True, buffer_size=1_000, batch_size=32, learning_starts=100, device="cpu",
        replay=replay, save_replay_buffer=True, eval_freq=0, artifact_root=str(tmp_path)))
    paths = experiment.run_paths(cfg)
    env = DummyVecEnv([experiment.env_factory(cfg)])
    model = experiment.build_agent(cfg, env)
    checkpointer = Checkpointer(paths, experiment.new_meta(cfg, paths, []), experiment.saved_replay_buffer(cfg, paths))
    model.learn(100)
    checkpointer.save(model)
    model.learn(50, reset_num_timesteps=False)

    publish, published = artifacts._publish, []

    def killed_after_the_renames_done(tmp: Path, path: Path) -> None:
        if len(published) == renames_done:
            raise KilledBetweenRenames
        publish(tmp, path)
        published.append(path.name)

    monkeypatch.setattr(artifacts, "_publish", killed_after_the_renames_done)
    with pytest.raises(KilledBetweenRenames):
        checkpointer.save(model)
    monkeypatch.setattr(artifacts, "_publish", publish)

    resume = dataclasses.replace(cfg, resume=True)
    resumed, restored = experiment.resume_agent(resume, paths, env, read_meta(paths.meta, "the test"))
    assert resumed.num_timesteps in (100, 150)
    if restored:
        assert resumed.replay_buffer.size() == resumed.num_timesteps, f"renamed first: {published}"
    else:
        assert resumed.learning_starts == resumed.num_timesteps + cfg.learning_starts
    env.close()


@pytest.mark.parametrize("replay, damage", [("framestack", "state.json"), ("sb3", "truncated")])
def test_12_a_damaged_or_missing_replay_buffer_on_resume(cli, replay: str, damage: str, tmp_path: Path) -> None:
    """A damaged saved buffer ends the resume in one sentence (nothing is lost: delete it to go on); a missing
    one is named, and the resume collects fresh steps first, saying so when that leaves it no update."""
    argv = ["train", *REACH, "--replay", replay, "--save-replay-buffer", "--artifact-root", str(tmp_path)]
    code, _, err = cli.run(*argv, "--total-steps", "200")
    assert code == 0, err
    buffer = tmp_path / "checkpoints" / f"{STEM}_replay_buffer{'.pkl' if replay == 'sb3' else ''}"
    if damage == "state.json":
        (buffer / "state.json").write_text('{"not": "finished')
    else:
        buffer.write_bytes(buffer.read_bytes()[:1000])
    code, _, err = cli.run(*argv, "--total-steps", "300", "--resume")
    cli.assert_one_line(code, err, 2, str(buffer), "cannot be loaded", "delete it and run the same command again")

    if buffer.is_dir():
        shutil.rmtree(buffer)
    else:
        buffer.unlink()
    code, out, err = cli.run(*argv, "--total-steps", "250", "--resume")
    assert code == 0, err
    assert f"the replay buffer saved at step 200 is missing ({buffer})" in out
    assert "collects --learning-starts 100 fresh steps before updating (to step 300), so it ends at --total-steps " \
           "250 without an update" in out
    session = read_meta(tmp_path / "checkpoints" / f"{STEM}.meta.json", "the test")["sessions"][-1]
    assert session["learning_starts"] == 300 and session["replay_restored"] is False
    code, out, err = cli.run(*argv, "--total-steps", "400", "--resume")  # the buffer saved at step 250 is back
    assert code == 0, err
    assert "replay buffer restored" in out and "without an update" not in out


# ------------------------------------------------------------------------------------------------------
# 8: mujoco >= 3.12 is refused in one sentence (an installed-package record that says 3.12.0)
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mujoco_3_12(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment whose PYTHONPATH puts a ``mujoco-3.12.0.dist-info`` record first: what
    ``importlib.metadata.version("mujoco")`` reports after ``pip install mujoco==3.12.0``."""
    site = tmp_path_factory.mktemp("mujoco_3_12")
    record = site / "mujoco-3.12.0.dist-info"
    record.mkdir()
    (record / "METADATA").write_text("Metadata-Version: 2.1\nName: mujoco\nVersion: 3.12.0\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("script", ["scripts/labs/pixel_wrapper.py --verify", "scripts/ch09_pixel_push.py train"])
def test_8_mujoco_refusal_is_one_sentence(cli, script: str, mujoco_3_12: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, *script.split()], capture_output=True, text=True, timeout=300,
                          cwd=REPO_ROOT, env={**os.environ, **mujoco_3_12})
    cli.assert_one_line(proc.returncode, proc.stderr, 2, "mujoco 3.12.0", "pip install mujoco==3.11.0")


def test_8_requirements_point_to_the_file_with_the_check() -> None:
    text = (REPO_ROOT / "requirements.txt").read_text()
    pointed = [word.strip("()`,;.") for word in text.split() if word.strip("()`,;.").endswith(".py")]
    assert pointed, "requirements.txt should say which file refuses a newer mujoco"
    for name in pointed:
        assert "MujocoVersionError" in (REPO_ROOT / name).read_text(), f"{name} holds no mujoco version check"


# ------------------------------------------------------------------------------------------------------
# 10: a kill during the periodic snapshot copy
# ------------------------------------------------------------------------------------------------------
def test_10_interrupted_snapshot_is_repaired(tmp_path: Path, production) -> None:
    """The state a SIGKILL during the copy of ``_200_steps.zip`` leaves: the checkpoint of step 200 committed
    (zip and metadata), the metadata not yet listing the snapshot, a partial temporary of it and no snapshot.
    A resume removes the temporary and writes the missed snapshot."""
    production.check("train", *REACH, "--total-steps", "200", "--artifact-root", str(tmp_path))
    checkpoints = tmp_path / "checkpoints"
    snapshot = checkpoints / f"{STEM}_200_steps.zip"
    dead_writer = subprocess.Popen(["true"])  # a pid that no longer runs, like the killed writer's
    dead_writer.wait()
    partial = checkpoints / f"{snapshot.name}.tmp-{dead_writer.pid}-0"
    partial.write_bytes(snapshot.read_bytes()[:1000])
    snapshot.unlink()
    legacy = checkpoints / f"{snapshot.name}.tmp"  # the name earlier versions used
    legacy.write_bytes(b"partial")
    meta_path = checkpoints / f"{STEM}.meta.json"
    meta = json.loads(meta_path.read_text())
    meta["periodic_checkpoints"] = [f"{STEM}_100_steps.zip"]
    del meta["sha256"][snapshot.name]
    meta_path.write_text(json.dumps(meta))

    proc = production.check("train", *REACH, "--total-steps", "400", "--resume", "--artifact-root", str(tmp_path))
    assert f"removed {partial.name}" in proc.stdout and f"removed {legacy.name}" in proc.stdout
    assert f"wrote the periodic snapshot {snapshot.name}" in proc.stdout
    assert temporaries(tmp_path) == []
    assert load_for_acting(snapshot).num_timesteps == 200
    assert load_for_acting(checkpoints / f"{STEM}_300_steps.zip").num_timesteps == 300
    repaired = read_meta(meta_path, "the test")
    assert snapshot.name in repaired["periodic_checkpoints"]
    from ch09.run.digest import sha256_file

    assert repaired["sha256"][snapshot.name] == sha256_file(snapshot)  # what a published snapshot is checked against


def test_stale_temporary_of_a_live_writer_is_kept(tmp_path: Path) -> None:
    """Another process still writing (its pid alive) keeps its temporary; seed10's files are not seed1's."""
    from ch09.run.artifacts import clean_interrupted_writes

    live = tmp_path / f"run_seed1.zip.tmp-{os.getppid()}-3"
    other_seed = tmp_path / "run_seed10.zip.tmp"
    for path in (live, other_seed):
        path.write_bytes(b"x")
    assert clean_interrupted_writes(tmp_path, "run_seed1") == []
    assert live.exists() and other_seed.exists()


# ------------------------------------------------------------------------------------------------------
# 11: SIGTERM in the first seconds; a kill before the first checkpoint
# ------------------------------------------------------------------------------------------------------
def handles_signal(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has installed a handler for ``signum`` (Linux: the SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # not started yet, or gone
        return False
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) >> (signum - 1) & 1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_11_a_signal_during_the_imports_is_one_line(cli, signum: int, tmp_path: Path, production) -> None:
    """From the guard's first line on, SIGTERM and Ctrl-C end the start-up with one line and 128 + the signal,
    SIGINT even when inherited ignored (a job started with `&` from a script). The signal is sent as soon as
    the process handles both, while torch, SB3 and MuJoCo (seconds of imports) still load."""
    process = subprocess.Popen(
        [sys.executable, str(production.path), "train", *REACH, "--total-steps", "100000", "--artifact-root",
         str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=production.environment(),
        cwd=REPO_ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_for(lambda: handles_signal(process.pid, signal.SIGTERM) and handles_signal(process.pid, signal.SIGINT),
                 60, process, "the guard's signal handlers")
        process.send_signal(signum)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert "[train]" not in out, "the signal came after the imports"
    cli.assert_one_line(process.returncode, err, 128 + signum, signal.Signals(signum).name, "before it started",
                        "run the same command again")


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_11_sigterm_while_the_run_is_set_up(cli, tmp_path: Path, production) -> None:
    """SIGTERM while the run starts its env workers (--n-envs 2): the imports are done, training cannot have begun
    (it waits for the workers, each importing MuJoCo and torch), and the run ends in one sentence."""
    process = production.popen("train", *REACH, "--n-envs", "2", "--total-steps", "100000",
                               "--artifact-root", str(tmp_path))
    try:
        wait_for(lambda: len(children(process.pid)) >= 2, 120, process, "the env worker processes")
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    cli.assert_one_line(process.returncode, err, 128 + signal.SIGTERM, "SIGTERM", "run the same command again")


def test_11_kill_before_the_first_checkpoint_restarts_with_the_same_command(cli, tmp_path: Path, production) -> None:
    """--resume says nothing was saved yet and points to the same command without it, which starts afresh."""
    argv = ["train", *REACH, "--total-steps", "200", "--artifact-root", str(tmp_path)]
    run_dir = tmp_path / "runs" / "ch09_fullstate" / "FetchReach-v4" / "seed0"
    process = production.popen(*argv)
    try:
        wait_for(lambda: any(run_dir.glob("events.out.tfevents*")), 180, process, "the TensorBoard events file")
        process.send_signal(signal.SIGKILL)  # as the OOM killer would: no handler runs
        process.communicate(timeout=60)
    finally:
        process.kill()
    assert not (tmp_path / "checkpoints" / f"{STEM}.zip").exists(), "the kill came after the first checkpoint"

    code, _, err = cli.run(*argv, "--resume")
    cli.assert_user_error(code, err, "stopped before its first checkpoint", "nothing was saved yet",
                          "the same command without --resume", "moved aside automatically")
    assert any(run_dir.glob("events.out.tfevents*")), "the refused --resume must leave the run's folder alone"

    proc = production.check(*argv)  # the same command, no --resume, no --move-old-run
    assert "no checkpoint" in proc.stdout and "moved them to" in proc.stdout
    assert len(list(run_dir.parent.glob("seed0.old-*"))) == 1
    assert load_for_acting(tmp_path / "checkpoints" / f"{STEM}.zip").num_timesteps == 200


# ------------------------------------------------------------------------------------------------------
# the guard itself: a bug is one line pointing to a log file with the whole traceback
# ------------------------------------------------------------------------------------------------------
def test_a_bug_is_one_line_and_a_crash_log(cli, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def buggy() -> int:
        return {}["missing"]

    code = cli_guard.run_guarded(buggy, log_dir=tmp_path / "logs")
    line = cli.assert_one_line(code, capsys.readouterr().err, cli_guard.BUG_EXIT, "unexpected KeyError", "report")
    log = next((tmp_path / "logs").glob("crash-*.log"))
    assert str(log) in line
    text = log.read_text()
    assert "Traceback" in text and "buggy" in text and "KeyError" in text


@pytest.mark.parametrize("where", ["in main", "before main"])
def test_a_reader_that_closes_the_pipe_is_no_bug(where: str, tmp_path: Path) -> None:
    """`... --help | head -3`: the output outlives its reader. That is not a bug: no crash log, no error line.

    10 MB of output overflows any pipe buffer, so the write after the reader left fails for certain.
    """
    flood = "[print('x' * 100) for _ in range(100_000)]"
    body = f"sys.exit(cli_guard.run_guarded(lambda: {flood} and 0))" if where == "in main" else flood
    script = ("import sys; import cli_guard; "
              f"cli_guard.guard_entry_point('__main__'); {body}")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=tmp_path)
    proc.stdout.readline()
    proc.stdout.close()  # what `head` does after its lines
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == cli_guard.BROKEN_PIPE_EXIT, err.decode()[-2000:]
    assert err == b""


@pytest.mark.parametrize("script, argv, fragments", [
    ("bench_replay", ["--devise", "cpu"], ["'--devise cpu'", "did you mean --device?"]),
    ("bench_train", ["--seconds", "soon"], ["--seconds", "'soon'"]),
    ("ch09_sweep", ["--no-such-flag"], ["'--no-such-flag'", "ch09_sweep.py --help"]),
    ("ch09_figures", ["juggle"], ["invalid choice: 'juggle'", "'env-frame'", "'rollout'"]),
])
def test_every_command_line_refuses_in_one_sentence(cli, script: str, argv: list[str], fragments: list[str],
                                                   capsys: pytest.CaptureFixture) -> None:
    """The tyro (and argparse) command lines beside ch09_pixel_push's and the labs' follow the same rule,
    through cli_guard.parse_with_one_line_errors; --help still prints the whole help."""
    main = __import__(script).main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    cli.assert_user_error(exit_info.value.code, capsys.readouterr().err, *fragments)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.count("\n") > 5


@pytest.mark.parametrize("script", ["ch09_pixel_push", "ch09_figures", "ch09_sweep", "bench_train", "bench_replay",
                                    "snippets"])
def test_an_entry_script_in_a_python_without_the_project_says_so_in_one_sentence(script: str) -> None:
    """This Python with ``-S`` (no site processing: not the editable install's .pth file), its packages on
    PYTHONPATH: the project is not importable, as in a Python where `pip install -e .` never ran."""
    site_packages = ":".join(path for path in sys.path if path.endswith("site-packages"))
    proc = subprocess.run([sys.executable, "-S", str(REPO_ROOT / "scripts" / f"{script}.py"), "--help"],
                          capture_output=True, text=True, timeout=120, cwd="/",
                          env={**os.environ, "PYTHONPATH": site_packages})
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr == ("error: this project is not installed in this Python; run `pip install -e .` in the "
                           "repository, or run the command through `bash docker/dev.sh python ...`.\n")


def test_every_entry_point_installs_the_guard() -> None:
    entry_points = ["scripts/ch09_pixel_push.py", "scripts/ch09_figures.py", "scripts/bench_replay.py",
                    "scripts/snippets.py", *(f"scripts/labs/{lab}.py" for lab in (
                        "pixel_wrapper", "visual_encoder", "manipulation_encoder", "image_augmentation",
                        "drqv2_sac_policy"))]
    entry_points += [p for p in ("scripts/bench_train.py", "scripts/ch09_sweep.py") if (REPO_ROOT / p).exists()]
    sources = {p: (REPO_ROOT / p).read_text() for p in entry_points}
    missing = [p for p, text in sources.items()
               if "guard_entry_point(__name__)" not in text or "run_guarded" not in text]
    assert not missing, f"entry points without the top-level guard: {missing}"
