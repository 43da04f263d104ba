"""Tests of scripts/ch09_sweep.py: sweeps of real train runs on a real local Ray instance.

Ray runs on 2 CPUs and on loopback only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which the sweep also sets
for ``--address local``). The runs are tiny full-state FetchReach-v4 runs (300 env steps, a checkpoint every
100), started exactly as the sweep starts them for a reader: as ``python scripts/ch09_pixel_push.py train``
subprocesses. One module-scoped sweep of 2 seeds is shared by several tests; in it seed 1 SIGKILLs itself at
step 250 through the train script's test hook (``CH09_TEST_KILL_AT_STEP``), as the OOM killer would. A
second sweep is stopped with Ctrl-C (SIGINT to the driver's process group, as a terminal sends it) and
resumed (a slow test: ``pytest -m slow``). Errors a user can cause are checked in-process through
``main(argv)`` where no Ray instance is needed: each must be ONE line starting with "error:" and exit code 2,
never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ch09_sweep
import pytest

from ch09.sweep.plan import DiskState

REPO_ROOT = Path(__file__).resolve().parents[1]
SWEEP_SCRIPT = REPO_ROOT / "scripts" / "ch09_sweep.py"
README = REPO_ROOT / "README.md"
TOTAL_STEPS = 300
CHECKPOINT_FREQ = 100
KILL_AT_STEP = 250
KILLED_RUN = "ch09_fullstate_FetchReach-v4_seed1"
TINY_STATE_RUN = ["--full-state", "--env", "FetchReach-v4", "--buffer-size", "1000", "--batch-size", "32",
                  "--learning-starts", "100", "--eval-freq", "200", "--eval-episodes", "2", "--checkpoint-freq",
                  str(CHECKPOINT_FREQ), "--device", "cpu", "--no-progress", "--no-eval-video"]
"""A full-state run that trains, evaluates and checkpoints within seconds (add --total-steps); eval/video, which
renders and encodes an episode per evaluation, is tested in test_video.py."""
RUN_FLAGS = [*TINY_STATE_RUN, "--total-steps", str(TOTAL_STEPS)]
"""The train flags of one tiny run (after --seed N), as a reader would type them."""
SWEEP_FLAGS = ["--n-episodes", "2", "--num-cpus", "2"]


def sweep_environment(**extra: str) -> dict[str, str]:
    """EGL, one OpenMP thread per process (2 shared cores), unbuffered output, Ray on loopback only."""
    return {**os.environ, "MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **extra}


def run_sweep(*args: str, timeout: float = 400, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SWEEP_SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=sweep_environment(**env), cwd=REPO_ROOT)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                                  f"stderr:\n{proc.stderr[-4000:]}")


def assert_one_sentence_error(code: int, err: str, *fragments: str) -> str:
    assert code == 2, f"a user error must exit with code 2, got {code}: {err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, f"want one 'error: ...' line, got:\n{err}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} missing from: {lines[0]}"
    return lines[0]


def write_runs_file(folder: Path, seeds: list[int], flags: list[str] = RUN_FLAGS) -> Path:
    path = folder / "tiny.txt"
    path.write_text("# tiny full-state FetchReach runs\n" + "".join(
        " ".join(["--seed", str(seed), *flags]) + "\n" for seed in seeds))
    return path


def meta(root: Path, run: str) -> dict[str, Any]:
    return json.loads((root / "checkpoints" / f"{run}.meta.json").read_text())


def status(root: Path, sweep: str = "tiny") -> dict[str, Any]:
    return json.loads((root / "results" / f"{sweep}_status.json").read_text())


def status_rows(root: Path, sweep: str = "tiny") -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in status(root, sweep)["runs"]}


# ------------------------------------------------------------------------------------------------------
# The shared sweep: 2 seeds, seed 1 killed once at step 250 and retried
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sweep_artifacts")
    runs_file = write_runs_file(tmp_path_factory.mktemp("sweep_input"), [0, 1])
    started = time.time()
    proc = run_sweep("--runs", str(runs_file), "--artifact-root", str(root), *SWEEP_FLAGS,
                     CH09_TEST_KILL_AT_STEP=str(KILL_AT_STEP), CH09_TEST_KILL_RUN=KILLED_RUN)
    assert_ok(proc)
    return {"proc": proc, "root": root, "runs_file": runs_file, "seconds": time.time() - started}


def test_sweep_writes_what_hand_made_runs_write(swept: dict[str, Any]) -> None:
    root = swept["root"]
    for seed in (0, 1):
        result = json.loads((root / "results" / f"ch09_fullstate_FetchReach-v4_seed{seed}_eval.json").read_text())
        assert result["train_seed"] == seed and result["n_episodes"] == 2
        assert result["checkpoint_steps"] == TOTAL_STEPS
    aggregate = json.loads((root / "results" / "ch09_fullstate_FetchReach-v4_aggregate.json").read_text())
    assert sorted(aggregate["seeds"]) == [0, 1] and aggregate["steps"] == TOTAL_STEPS
    assert f"at {TOTAL_STEPS} steps" in swept["proc"].stdout  # aggregate's own line (its one rule), shown by the sweep
    rows = status_rows(root)
    assert status(root)["state"] == "done"
    for seed in (0, 1):
        row = rows[f"ch09_fullstate_FetchReach-v4_seed{seed}"]
        assert row["state"] == "done" and row["steps"] == TOTAL_STEPS
        # the very line a reader types by hand
        typed = " ".join(["python scripts/ch09_pixel_push.py train --seed", str(seed), *RUN_FLAGS,
                          "--artifact-root", str(root)])
        assert row["commands"][0] == typed


def test_killed_run_is_retried_from_its_checkpoint(swept: dict[str, Any]) -> None:
    root = swept["root"]
    killed = meta(root, KILLED_RUN)
    first, second = killed["sessions"]  # the killed session and the retry: two sessions exactly
    assert first["from_step"] == 0 and "to_step" not in first  # SIGKILL: the session never ended cleanly
    assert KILL_AT_STEP - CHECKPOINT_FREQ <= second["from_step"] <= KILL_AT_STEP  # steps lost <= one interval
    assert second["to_step"] == killed["steps_done"] == TOTAL_STEPS
    run_dir = root / "runs" / "ch09_fullstate" / "FetchReach-v4" / "seed1"
    assert len(list(run_dir.glob("events.out.tfevents*"))) == 2  # both sessions in the same folder
    assert not list(run_dir.parent.glob("seed1.old-*"))  # nothing was moved aside
    rows = status_rows(root)
    assert rows[KILLED_RUN]["retries"] == 1 and rows[KILLED_RUN]["sessions"] == 2
    assert rows["ch09_fullstate_FetchReach-v4_seed0"]["retries"] == 0
    assert len(meta(root, "ch09_fullstate_FetchReach-v4_seed0")["sessions"]) == 1
    log = (root / "results" / "tiny_logs" / f"{KILLED_RUN}.log").read_text()
    assert f"SIGKILL at step {KILL_AT_STEP}" in log
    retry_line = next(line for line in log.splitlines() if line.startswith("# attempt 2"))
    assert retry_line.endswith("--resume")
    output = swept["proc"].stdout + swept["proc"].stderr
    assert "Traceback" not in output and "retries remaining" not in output, output[-3000:]  # no Ray retry report
    assert "Token authentication" not in output  # Ray's note on its own default, on every local start


def test_rerun_of_a_finished_sweep_trains_nothing(swept: dict[str, Any]) -> None:
    root = swept["root"]
    watched = [*sorted((root / "checkpoints").glob("*.zip")), *sorted((root / "results").glob("*_eval.json"))]
    before = {path: path.stat().st_mtime_ns for path in watched}
    sessions = {run: len(meta(root, run)["sessions"]) for run in status_rows(root)}
    proc = run_sweep("--runs", str(swept["runs_file"]), "--artifact-root", str(root), *SWEEP_FLAGS)
    assert_ok(proc)
    assert {path: path.stat().st_mtime_ns for path in watched} == before
    assert {run: len(meta(root, run)["sessions"]) for run in sessions} == sessions
    rows = status_rows(root)
    assert {row["state"] for row in rows.values()} == {"skipped"}
    for run, row in rows.items():  # a finished run still shows its result: its final evaluation's
        final = json.loads((root / "results" / f"{run}_eval.json").read_text())["success_rate"]
        assert (row["success_rate"], row["success_source"]) == (final, "final eval")


@pytest.mark.slow  # over a minute on 2 cores, the default run's longest test: 1000 steps of training in two sessions
def test_ctrl_c_saves_each_run_and_a_rerun_resumes(tmp_path: Path) -> None:
    root, total = tmp_path / "artifacts", 1_000
    flags = [*TINY_STATE_RUN, "--total-steps", str(total)]
    runs_file = write_runs_file(tmp_path, [0], flags)
    run = "ch09_fullstate_FetchReach-v4_seed0"
    driver = subprocess.Popen([sys.executable, str(SWEEP_SCRIPT), "--runs", str(runs_file), "--artifact-root",
                               str(root), *SWEEP_FLAGS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=sweep_environment(), cwd=REPO_ROOT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None:
            try:
                # The checkpoint's metadata is written at the step itself (the status table lags behind the
                # TensorBoard flush, and an idle machine would finish the run before Ctrl-C arrived).
                if meta(root, run)["steps_done"] >= 2 * CHECKPOINT_FREQ:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        assert driver.poll() is None, driver.communicate()[0][-3000:]
        os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends: the whole foreground group
        output = driver.communicate(timeout=120)[0]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, output[-3000:]
    assert "Traceback" not in output
    stopped = meta(root, run)
    assert 2 * CHECKPOINT_FREQ <= stopped["steps_done"] < total  # saved where it stopped, not at a checkpoint
    assert stopped["sessions"][0]["to_step"] == stopped["steps_done"]
    assert status_rows(root)[run]["state"] == "stopped"

    proc = run_sweep("--runs", str(runs_file), "--artifact-root", str(root), *SWEEP_FLAGS)
    assert_ok(proc)
    resumed = meta(root, run)
    assert [s["from_step"] for s in resumed["sessions"]] == [0, stopped["steps_done"]]  # nothing lost
    assert resumed["steps_done"] == total
    assert (root / "results" / f"{run}_eval.json").is_file()


# ------------------------------------------------------------------------------------------------------
# --dry-run: exactly the README's Reproduce It block
# ------------------------------------------------------------------------------------------------------
def readme_reproduce_commands() -> list[str]:
    """The commands of README's Reproduce It block as bash would run them: loop unrolled, glob expanded."""
    block = README.read_text().split("**Reproduce It**", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [" ".join(line.split()) for line in block.replace("\\\n", " ").splitlines()]
    lines = [line.removeprefix("bash docker/dev.sh ") for line in lines if line and not line.startswith("#")]
    loop = re.fullmatch(r"for seed in ([\d ]+); do", lines[0])
    assert loop, f"the block no longer starts with the seed loop: {lines[0]}"
    seeds = loop.group(1).split()
    end = lines.index("done")
    commands = [line.replace("$seed", seed) for seed in seeds for line in lines[1:end]]
    for line in lines[end + 1:]:
        commands.append(" ".join(" ".join(word.replace("*", seed) for seed in seeds) if "*" in word else word
                                 for word in line.split()))
    return commands


def test_dry_run_prints_the_readme_reproduce_block(monkeypatch, capsys) -> None:
    """The README's block is what ``reproduce --dry-run`` prints on a fresh checkout. A reader's own runs under
    checkpoints/ would turn lines into --resume or '# done:' ones, so here the disk reads as fresh."""

    def fresh(run, n_episodes):
        return DiskState(0, 0, False, False, False, run.paths.checkpoint, False)

    monkeypatch.setattr(ch09_sweep, "disk_state", fresh)
    assert ch09_sweep.main(["reproduce", "--dry-run"]) == 0
    printed = [" ".join(line.split()) for line in capsys.readouterr().out.strip().splitlines()]
    expected = readme_reproduce_commands()
    assert len(expected) == 8  # 3 x (train, eval), aggregate, the figure
    assert printed == expected


# ------------------------------------------------------------------------------------------------------
# Bad input: one sentence, exit code 2
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "fragments"), [
    (["bogus"], ["Unknown sweep 'bogus'"]),
    ([], ["Name a sweep"]),
    (["investigation", "--steps", "9"], ["Unknown investigation step '9'"]),
    (["investigation", "--steps", "3"], ["reproduce"]),
    (["reproduce", "--address", "not an address"], ["not a Ray address"]),
    (["reproduce", "--address", "127.0.0.1:1"], ["did not answer"]),
    (["reproduce", "--address", "ray://127.0.0.1:1"], ["did not answer"]),
    (["reproduce", "--address", "auto", "--artifact-root", "relative/dir"], ["relative", "absolute"]),
    (["reproduce", "--gpus-per-run", "1.5"], ["--gpus-per-run"]),
])
def test_bad_input_is_one_sentence(argv: list[str], fragments: list[str], capsys: pytest.CaptureFixture) -> None:
    code = ch09_sweep.main(argv)
    assert_one_sentence_error(code, capsys.readouterr().err, *fragments)


@pytest.mark.parametrize(("line", "fragment"), [
    ("--seed 0 --full-state --resume", "drop --resume"),
    ("--seed 0 --full-state --no-such-flag", "not a valid train command (unrecognized '--no-such-flag'"),
    ("--seed 0 --full-state --critic-encoder", "only applies to pixel runs"),
])
def test_bad_runs_file_line_is_one_sentence(line: str, fragment: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    runs_file = tmp_path / "runs.txt"
    runs_file.write_text(f"{line}\n")
    code = ch09_sweep.main(["--runs", str(runs_file), "--dry-run"])
    assert_one_sentence_error(code, capsys.readouterr().err, "runs.txt line 1", fragment)


def test_two_lines_with_the_same_artifact_names_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs_file = tmp_path / "runs.txt"
    runs_file.write_text("--seed 0 --full-state\n--seed 0 --full-state --batch-size 128\n")
    code = ch09_sweep.main(["--runs", str(runs_file), "--dry-run"])
    assert_one_sentence_error(code, capsys.readouterr().err, "both train ch09_fullstate_FetchPush-v4_seed0")


@pytest.mark.parametrize(("second", "flags"), [
    ("--seed 1 --full-state --batch-size 128 --gamma 0.9", "different --batch-size, --gamma"),
    ("--seed 1 --full-state --total-steps 600", "different --total-steps"),
])
def test_runs_of_one_configuration_in_other_settings_are_refused(second: str, flags: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """The sweep aggregates the seeds of one tag and env as one configuration: lines that differ in flags outside
    the tag would be pooled into one mean (or, trained as long, stop the aggregate after every run trained)."""
    runs_file = tmp_path / "runs.txt"
    runs_file.write_text(f"--seed 0 --full-state\n{second}\n")
    code = ch09_sweep.main(["--runs", str(runs_file), "--dry-run"])
    assert_one_sentence_error(code, capsys.readouterr().err, "runs.txt line 1 and runs.txt line 2 both train "
                              "fullstate on FetchPush-v4", flags)


def test_a_checkpoint_trained_with_other_flags_is_refused_before_the_sweep_resumes_it(
        swept: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The same tag and seed with another --batch-size: the sweep would resume the run on disk (which train
    refuses) or evaluate it as its own; the dry run said nothing and printed the command that fails."""
    flags = [flag if flag != "32" else "64" for flag in RUN_FLAGS]  # --batch-size 64
    runs_file = write_runs_file(tmp_path, [0], flags)
    code = ch09_sweep.main(["--runs", str(runs_file), "--artifact-root", str(swept["root"]), "--dry-run"])
    assert_one_sentence_error(code, capsys.readouterr().err, "tiny.txt line 2:",
                              "ch09_fullstate_FetchReach-v4_seed0.zip was trained with other flags",
                              "--batch-size 64 (checkpoint: 32)", "--move-old-run")


def test_a_bad_value_in_a_runs_line_points_to_help_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs_file = tmp_path / "runs.txt"
    runs_file.write_text("--seed 0 --full-state --batch-size many\n")
    code = ch09_sweep.main(["--runs", str(runs_file), "--dry-run"])
    err = capsys.readouterr().err
    assert_one_sentence_error(code, err, "runs.txt line 1", "--batch-size")
    assert err.count("--help") == 1, err


def test_gpu_fraction_that_cannot_be_placed(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so a fraction of one can be placed")
    runs_file = write_runs_file(tmp_path, [0])
    proc = run_sweep("--runs", str(runs_file), "--artifact-root", str(tmp_path), "--gpus-per-run", "0.33",
                     "--num-cpus", "2", timeout=120)
    assert_one_sentence_error(proc.returncode, proc.stderr, "--gpus-per-run 0.33 cannot be placed", "no GPU")
    assert not (tmp_path / "checkpoints").exists()  # refused before any run started


def test_ray_not_installed(tmp_path: Path) -> None:
    shadow = tmp_path / "no_ray" / "ray"
    shadow.mkdir(parents=True)  # a `ray` package that fails to import the way a missing one does
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n")
    runs_file = write_runs_file(tmp_path, [0])
    proc = run_sweep("--runs", str(runs_file), "--artifact-root", str(tmp_path), timeout=120,
                     PYTHONPATH=str(shadow.parent))
    assert_one_sentence_error(proc.returncode, proc.stderr, "Ray is not installed", "requirements.txt")
