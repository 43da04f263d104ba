"""``scripts/gpu_checks.sh``: one device call that fits, whose deadline cuts and skips stages but keeps their results.

The GPU stages themselves need the lent machine; what runs here is the script's own logic, in bash: its header
against its code, and its clock. The clock is checked by sourcing the script (``main`` runs only when it is
executed) and running its real ``run_stages`` on two stand-in stages under a deadline of a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import bench_train
import ch09_pixel_push as pixel_push
import pytest
import reach_probe
import tyro

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "gpu_checks.sh"
CALL_TIMEOUT_S = 540
"""The device call's limit the script is built for: 9 minutes, so a rerun after a fix fits in the 15 of a session."""
MAX_FILES_BACK = 8
"""The device tool brings back at most this many files from $OUT."""
REACH_REFERENCE_CURVES = "docs/measurements/*_cpu_reach_lr1e-3_seed*.json"
"""The reach run's command on a CPU, one file per seed: the curves the README reads the GPU's reach run against."""


def bash(script: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"source {SCRIPT}\n{script}"], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT, env=env)


def stand_in_python3(folder: Path, body: str) -> dict[str, str]:
    """An environment whose ``python3`` is a bash script with this body (the stages call ``python3``, the GPU
    image's interpreter)."""
    folder.mkdir()
    (folder / "python3").write_text(f"#!/usr/bin/env bash\n{body}\n")
    (folder / "python3").chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}


def learn_runs() -> list[str]:
    """LEARN_RUNS as the script sets it: the runs its learn stage trains side by side."""
    return bash('echo "$LEARN_RUNS"', env={k: v for k, v in os.environ.items() if k != "LEARN_RUNS"}).stdout.split()


def stage_files(text: str, stages: list[str]) -> dict[str, set[str]]:
    """The files under $OUT each stage writes, read from its functions (``stage_X`` and ``finish_X``): those named
    "$OUT/FILE", and for the learn stage and the probe loop over its runs, NAME.json and NAME_probe.json for each
    run of LEARN_RUNS (whose ``learn_NAME`` trains run NAME)."""
    runs = learn_runs()
    trained = dict(re.findall(r"^learn_(\w+)\(\) \{\s+(?:train_and_follow|pixel_proxy) (\w+)", text, re.M))
    assert set(trained) == set(runs) and all(name == run for run, name in trained.items()), (trained, runs)
    files: dict[str, set[str]] = {stage: set() for stage in stages}
    for match in re.finditer(r"^(?:stage|finish)_(\w+)\(\) \{(?: (.*?) \}$|\n(.*?)^\}$)", text, re.M | re.S):
        body = match[2] or match[3]
        named = set(re.findall(r'"\$OUT/([\w.]+)"', body))
        if re.search(r'learning_curve "\$name" ', body):
            named |= {f"{run}.json" for run in runs}
        if '"$OUT/${name}_probe.json"' in body:
            assert "for name in $LEARN_RUNS;" in body, "the probe stage probes the learning runs"
            named |= {f"{run}_probe.json" for run in runs}
        assert not any(name.endswith(".tmp") for name in named)
        if match[1] in files:  # not stage_limit_s
            files[match[1]] |= named
    return files


def test_the_header_gives_one_device_call_whose_stage_estimates_fit_under_its_deadline():
    text = SCRIPT.read_text()
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    header = text.split("\nset -uo pipefail", 1)[0]
    assert f"timeout_s={CALL_TIMEOUT_S}" in header and 'carry=[".whl", ".gl"]' in header
    assert "bash scripts/gpu_checks.sh" in header
    assert not re.search(r"EXTRA_WHEELS=[^\n]*\b(pytest|pluggy|iniconfig)\b", text)  # the image's pytest stays

    in_header = {name: int(seconds) for name, seconds in re.findall(r"^#   (\w+) +(\d+) s ", header, re.M)}
    code = bash('for name in prepare "${STAGES[@]}"; do echo "$name ${ESTIMATE_S[$name]}"; done\n'
                'echo "deadline $DEADLINE_S"; echo "call $CALL_TIMEOUT_S"; echo "default ${DEFAULT_STAGES[*]}"')
    values = dict(line.split(maxsplit=1) for line in code.stdout.splitlines())
    deadline, call = int(values.pop("deadline")), int(values.pop("call"))
    first_call = values.pop("default").split()
    assert in_header == {name: int(seconds) for name, seconds in values.items()}, "header and code disagree"
    order_of_value = ["tests", "learn", "probe", "bench8", "seeds3", "selftest", "bench1"]
    assert list(in_header)[1:] == order_of_value
    assert first_call == list(in_header)[1:4]
    assert in_header["prepare"] + sum(in_header[name] for name in first_call) < deadline < call == CALL_TIMEOUT_S
    assert all(in_header["prepare"] + seconds < deadline for seconds in in_header.values())  # each fits a call
    planned = re.search(r"^#   call 1: ([\w ]+?) +([\d + ]+) = (\d+) s", header, re.M)
    assert planned and planned[1].split() == first_call, "the header's first call is not DEFAULT_STAGES"
    assert [int(seconds) for seconds in planned[2].split("+")] == [in_header[n] for n in ("prepare", *first_call)]
    assert sum(int(seconds) for seconds in planned[2].split("+")) == int(planned[3])

    # What each planned call brings back: the log, the files its stages write, and a curve's .tmp if the call ends
    # as one is written. Call 1, call 2, and bench1 alone (the header's rerun) are each one call of the device's.
    files = stage_files(text, order_of_value)
    assert learn_runs() == ["proxy", "proxy_bf16_overlap", "reach"]
    assert files["probe"] == {"proxy_probe.json", "proxy_bf16_overlap_probe.json", "reach_probe.json"}
    assert files["learn"] == {"proxy.json", "proxy_bf16_overlap.json", "reach.json"}
    second_call = re.search(r"^#   call 2: ([\w ]+?) +[\d + ]+ = \d+ s", header, re.M)
    assert second_call, "the header plans a second call"
    calls = [first_call, second_call[1].split(), ["bench1"]]
    assert sorted(stage for call in calls for stage in call) == sorted(order_of_value)  # every stage has its call
    for call in calls:
        back = {"gpu_checks.log", *(name for stage in call for name in files[stage])}
        assert len(back) + 1 <= MAX_FILES_BACK, (call, sorted(back))


def test_each_stage_runs_under_min_of_its_bound_and_the_time_left():
    limits = bash('START_S=$(date +%s); DEADLINE_S=510; stage_limit_s tests; DEADLINE_S=30; stage_limit_s tests; '
                  'KILL_AFTER_S=10; DEADLINE_S=15; stage_limit_s bench8; DEADLINE_S=510; stage_limit_s learn 40; '
                  'echo "${ESTIMATE_S[tests]}"')
    bound, short, none_left, learn_keeping_40, estimate = map(int, limits.stdout.split())
    assert bound == estimate * 3 // 2  # 1.5 x the tests estimate, with plenty of time left
    assert 30 - 10 < estimate * 3 // 2  # (so the next bound is the time left)
    assert 19 <= short <= 20  # 30 s to the deadline, less the kill grace
    assert none_left <= 5
    assert 459 <= learn_keeping_40 <= 460  # 510 s left, less the kill grace and the 40 s kept for a later stage


IGNORES_TERM = (f"{sys.executable} -c 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "time.sleep(60)'")
"""A stage's process that outlives a TERM, as a Python stuck in a CUDA or EGL call does (its handler never runs)."""


@pytest.mark.parametrize("hang", ["sleep 60", IGNORES_TERM], ids=["stops-on-term", "ignores-term"])
def test_the_deadline_cuts_a_running_stage_keeps_its_partial_results_and_skips_the_stages_left(hang, tmp_path):
    out, crash_dir = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    started = time.monotonic()
    proc = bash(f"""
OUT={out}; LOG={out}/gpu_checks.log; START_S=$(date +%s); DEADLINE_S=6; KILL_AFTER_S=1; MIN_STAGE_S=2
STAGE_MARK=$(mktemp); CRASH_LOG_DIRS=({crash_dir})
export OUT LOG
stage_tests() {{ echo '{{"rows": ["first measurement"]}}' > "$OUT/bench1.json"; mkdir -p {crash_dir}
                 echo 'Traceback: boom' > {crash_dir}/crash-1.log; {hang}; }}
finish_tests() {{ echo 'finish_tests ran after the cut' >> "$LOG"; }}  # as finish_learn writes the curves
stage_selftest() {{ echo 'selftest ran'; }}
run_stages tests selftest
""")
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    assert elapsed < 6 + 1 + 5  # the stage and its grandchild were stopped at the deadline (KILLed 1 s later)
    log = (out / "gpu_checks.log").read_text()
    assert "stage tests: TIMED OUT" in log and "stage selftest: skipped" in log
    assert log.index("finish_tests ran after the cut") < log.index("stage tests: TIMED OUT")
    assert "selftest ran" not in log and "1 failed (tests), 1 skipped (selftest)" in log
    assert (out / "bench1.json").read_text().startswith('{"rows"')  # what the cut stage wrote is kept
    assert log.count("Traceback: boom") == 1  # the crash log, once, after the stage that wrote it


SAVES_ON_TERM = """\
import signal, sys, time
def stop(*_):
    print("saving", flush=True)
    time.sleep(0.3)
    print("saved", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
print("started", flush=True)
time.sleep(60)
"""
"""A learning run as ``train`` behaves when the stage's limit TERMs it: it saves a checkpoint, then exits."""


def test_the_learn_stage_runs_side_by_side_and_waits_for_each_run_to_save_when_its_limit_cuts_them(tmp_path):
    out, runs, run = tmp_path / "out", tmp_path / "runs", tmp_path / "run.py"
    out.mkdir()
    runs.mkdir()
    run.write_text(SAVES_ON_TERM)
    proc = bash(f"""
OUT={out}; LOG={out}/gpu_checks.log; START_S=$(date +%s); DEADLINE_S=12; KILL_AFTER_S=1; MIN_STAGE_S=1
RUNS_ROOT={runs}; STAGE_MARK=$(mktemp); CRASH_LOG_DIRS=(); LEARN_RUNS="a b stuck"; ESTIMATE_S[probe]=3
export OUT LOG RUNS_ROOT LEARN_RUNS
learn_a() {{ {sys.executable} {run}; }}
learn_b() {{ {sys.executable} {run}; }}
learn_stuck() {{ {IGNORES_TERM}; }}
finish_learn() {{ echo 'finish_learn ran' >> "$LOG"; }}
stage_probe() {{ echo 'probe ran'; }}
run_stages learn probe
""", timeout=30)
    log = (out / "gpu_checks.log").read_text()
    assert proc.returncode == 1, proc.stderr
    # Its limit keeps the probe's estimate: 12 s to the deadline, less the 1 s kill grace and the probe's 3 s
    assert re.search(r"stage learn: at most [78] s", log), log
    first_stop = log.index("saving")
    assert log.index("[a] started") < first_stop and log.index("[b] started") < first_stop  # side by side
    # Each run saved after its TERM, its lines still prefixed (the sed outlived the TERM), before the stage ended
    assert "[a] saved" in log and "[b] saved" in log
    assert max(log.index("[a] saved"), log.index("[b] saved")) < log.index("finish_learn ran") < log.index(
        "stage learn: TIMED OUT")
    assert (runs / "a.exit").read_text().strip() == (runs / "b.exit").read_text().strip() == "143"
    # The stage's shell waited through the TERM, so the run that ignored it was KILLed with the stage a second later
    assert not (runs / "stuck.exit").exists() and re.search(r"stage learn: TIMED OUT after [89] s", log), log
    assert "probe ran" in log and "1 failed (learn), 0 skipped" in log  # the time kept was the probe's


def test_the_learning_curve_is_read_from_the_tensorboard_folder_of_a_run(production, tmp_path):
    """What ``learning_curve`` writes for each run of the learn stage (every CURVE_POLL_S during the stage and after
    it), on a real tiny run: full-state FetchReach-v4 as in the reach run, so it takes seconds on a CPU."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    out.mkdir()
    production.check("train", "--env", "FetchReach-v4", *production.STATE_BUDGET, "--total-steps", "200",
                     "--eval-freq", "100", "--artifact-root", str(runs / "reach"))
    python_dir = Path(sys.executable).parent
    proc = bash(f"export PATH={python_dir}:$PATH OUT={out} LOG={out}/gpu_checks.log RUNS_ROOT={runs}\n"
                "learning_curve reach 200")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "reach.json").read_text())
    assert [step for step, _ in report["eval_success_rate"]] == [100, 200]
    assert all(0.0 <= rate <= 1.0 for _, rate in report["eval_success_rate"])
    assert report["finished"] is True and report["steps_done"] == 200 and report["steps_per_s"] > 0
    assert report["run"].startswith("ch09_fullstate")  # the run's tag: which of the learn stage's runs this is
    assert (report["device"], report["engine"], report["cuda_graph"]) == ("cpu", "fast", "not-cuda")
    assert "gpu" in report and report["gpu"] is None  # the GPU's name where there is one (the run meta's versions)
    # The run's own training curves beside it: SB3 logs them every LOG_INTERVAL_EPISODES episodes (4 x 50 steps)
    assert set(report["training"]) == set(bench_train.TRAINING_COLUMNS)  # every tag recorded is one --report shows
    assert all([step for step, _ in points] == [200] for points in report["training"].values())
    table = bench_train.markdown_report(out / "reach.json").splitlines()  # what goes into the README
    assert table[0] == ("| env steps | eval success rate | rollout success rate (last 100 episodes) | ent_coef | "
                        "critic loss |")
    assert [line.split(" | ")[0] for line in table[2:4]] == ["| 100", "| 200"]
    assert table[2].endswith(" | - | - | - |")  # nothing logged yet at step 100
    assert table[3].count(" - ") == 0
    assert table[-1].startswith("200 of 200 env steps (finished) at ")
    # as run, side by side with the learn stage's other runs (LEARN_RUNS): not one run's speed
    assert report["runs_side_by_side"] == 3 and (report["precision"], report["overlap_collection"]) == ("fp32", False)
    assert (" env steps/s (3 runs side by side) on cpu, seed 0, learning rate 0.0003, batch 32, fp32; "
            in table[-1]), table[-1]


def test_every_command_of_the_stages_parses_with_the_real_command_line(tmp_path):
    """The stages' commands as the GPU machine would run them, recorded by a stand-in ``python3``, then read by the
    real parsers: a misspelt flag or run name would otherwise cost the lent machine's only call."""
    calls = tmp_path / "calls"
    calls.mkdir()
    env = stand_in_python3(tmp_path / "bin", f'printf "%s\\0" "$@" > {calls}/$(date +%s%N)')
    for name in learn_runs():  # what the stand-in's train runs would have left for the probe stage
        (tmp_path / "runs" / name / "checkpoints").mkdir(parents=True)
        (tmp_path / "runs" / name / "checkpoints" / f"ch09_{name}_FetchReach-v4_seed0_1K_steps.zip").touch()
    proc = bash(f"export OUT={tmp_path} RUNS_ROOT={tmp_path}/runs CURVE_POLL_S=600 LEARN_RUNS\n"
                "stage_tests && stage_selftest && stage_bench1 && stage_learn && stage_probe && "
                "stage_bench8 && stage_seeds3", env=env)
    assert proc.returncode == 0, proc.stderr
    commands = [call.read_text().rstrip("\0").split("\0") for call in sorted(calls.iterdir())]
    # (the learn stage's runs start side by side, and the probes too: in either order within each stage)
    assert [argv[0] for argv in commands] == ["-m", "scripts/ch09_pixel_push.py", "scripts/bench_train.py",
                                              *["scripts/ch09_pixel_push.py"] * 3, *["scripts/reach_probe.py"] * 3,
                                              "scripts/bench_train.py", "scripts/bench_train.py"]

    pytest_argv = commands[0][2:]  # -m pytest ...
    # -p no:xdist: the GPU image's pytest may lack the plugin this project's addopts use (pytest-xdist)
    collected = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "--collect-only", "-qqq",
                                *pytest_argv],
                               capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert collected.returncode == 0, collected.stdout[-2000:]
    per_file = dict(re.findall(r"^(tests/test_\w+\.py): (\d+)$", collected.stdout, re.M))  # -qqq against the stage's -v
    assert per_file and all(int(count) > 0 for count in per_file.values()), collected.stdout[-2000:]

    # The learning checks train at the rate of the CPU curves the README reads the GPU's reach run against
    references = sorted(REPO_ROOT.glob(REACH_REFERENCE_CURVES))
    reference_rates = {json.loads(path.read_text())["learning_rate"] for path in references}
    assert len(references) >= 2 and len(reference_rates) == 1, references
    trained = {}
    for argv in commands[1:]:
        try:
            if argv[0] == "scripts/bench_train.py":
                cfg = tyro.cli(bench_train.BenchConfig, args=argv[1:])
                assert set(cfg.runs) <= set(bench_train.RUNS) and cfg.device == "cuda", argv
            elif argv[0] == "scripts/reach_probe.py":
                cfg = tyro.cli(reach_probe.ProbeConfig, args=argv[1:])
                run = cfg.checkpoints[0].parents[1].name
                assert cfg.device == "cuda" and cfg.out == tmp_path / f"{run}_probe.json", argv
            else:
                cfg = pixel_push.parse_command_line(argv[1:])
                assert type(cfg).__name__.lower().startswith(argv[1][:4]) and cfg.device == "cuda", argv
                if argv[1] == "train":
                    assert {cfg.learning_rate} == reference_rates, argv
                    assert cfg.checkpoint_freq == cfg.eval_freq, argv  # a snapshot of every evaluation, probed
                    trained[cfg.artifact_root.name] = cfg
        except SystemExit as exc:
            pytest.fail(f"gpu_checks.sh's `{' '.join(argv)}` does not parse (exit {exc.code})")
    # The two proxies differ only in the settings the second asks about (train's defaults against the fastest)
    proxy, fastest = trained["proxy"], trained["proxy_bf16_overlap"]
    assert (proxy.precision, proxy.overlap_collection) == ("fp32", False)
    assert (fastest.precision, fastest.overlap_collection) == ("bf16", True)
    assert replace(fastest, precision="fp32", overlap_collection=False, artifact_root=proxy.artifact_root) == proxy
    assert set(trained) == set(learn_runs())


def test_the_stages_find_the_project_in_a_python_where_it_is_not_installed(tmp_path):
    """The GPU image's python3 has the packages (the image's and the carried wheels) but not this project: no
    ``pip install -e .`` runs there. Stood in for by this Python with ``-S`` (no site processing, so not the
    editable install's .pth file) and its site-packages on PYTHONPATH."""
    site_packages = ":".join(path for path in sys.path if path.endswith("site-packages"))
    env = stand_in_python3(tmp_path / "bin", f'PYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{site_packages}" '
                                             f'exec {sys.executable} -S "$@"')
    env.pop("PYTHONPATH", None)
    bare = subprocess.run(["python3", "-c", "import ch09"], capture_output=True, text=True, env=env)
    assert bare.returncode != 0 and "No module named 'ch09'" in bare.stderr  # the stand-in lacks the project

    proc = bash("project_on_path\n"
                "python3 -c 'import ch09, cli_guard, drqv2_sac_policy; print(ch09.__file__)' && "
                "python3 scripts/bench_train.py --help >/dev/null && "
                "python3 scripts/ch09_pixel_push.py selftest --help >/dev/null", env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == str(REPO_ROOT / "scripts" / "ch09" / "__init__.py")


ON_THE_GPU_MACHINE = {
    # the GPU image's own python3 (FACTS.md; shared/device/prepare.sh leaves them out of the wheels it carries)
    "torch", "numpy", "tensorboard", "matplotlib", "pillow", "imageio", "rich", "tqdm", "pytest",
    "typing-extensions", "markdown",
    # carried as wheels by the prepare step in gpu_checks.sh's header
    "mujoco", "gymnasium", "gymnasium-robotics", "stable-baselines3", "tyro",
}
"""The packages of requirements.txt that python3 has on the lent GPU machine; the rest it lacks."""


def required_imports_the_gpu_machine_lacks() -> set[str]:
    names = set()
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"([A-Za-z0-9_.-]+)", line.strip())
        if match and not line.lstrip().startswith("#"):
            names.add(match.group(1).lower())
    lacking = names - ON_THE_GPU_MACHINE
    imports = {"pymdown-extensions": "pymdownx", "imageio-ffmpeg": "imageio_ffmpeg"}
    return {imports.get(name, name.replace("-", "_")) for name in lacking}


def test_the_stages_import_nothing_the_gpu_machine_lacks(tmp_path):
    """A stage that imports a package the GPU image lacks (Ray, the video codecs, the linters) would fail on the
    device after its 1-2 minute start. Stood in for by this Python with those packages made unimportable: the
    script's own import check must pass, and it must name a lacking package when a stage module needs one."""
    lacking = required_imports_the_gpu_machine_lacks()
    assert {"ray", "imageio_ffmpeg"} <= lacking, lacking  # the list is derived, not empty
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        f"LACKING = {sorted(lacking)!r}\n"
        "class Lacking(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in LACKING:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Lacking())\n")
    env = stand_in_python3(tmp_path / "bin", f'exec {sys.executable} "$@"')
    env |= {"PYTHONPATH": str(blocker), "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    proc = bash("project_on_path\npython3 -c 'import ray' 2>&1 | tail -1\npython3_lacks", env=env, timeout=180)
    assert "No module named 'ray'" in proc.stdout  # the stand-in really lacks them
    assert proc.returncode == 0, proc.stdout + proc.stderr

    proc = bash("project_on_path\nSTAGE_MODULES+=(ray.tune)\npython3_lacks", env=env, timeout=180)
    assert proc.returncode == 1 and proc.stdout.strip().startswith("ray.tune (ModuleNotFoundError"), proc.stdout
