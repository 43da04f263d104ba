"""Tests for scripts/bench_train.py (stock SB3 vs FastSAC throughput) and scripts/gpu_checks.sh.

The figures of a ``--quick`` run mean nothing (seconds-long budgets on shared cores); what is checked is that
the script trains both engines for real through the production script's ``build_agent`` and reports what
it measured, and that bad input ends in one sentence.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import bench_train
import pytest
import torch as th

from ch09.engine.fast_sac import UPDATE_SECTIONS

REPO_ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = not th.cuda.is_available()


def test_quick_bench_trains_both_engines_and_writes_its_table_as_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_train.main(["--quick", "--profile-updates", "3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {row["run"]: row for row in report["rows"]}
    assert set(rows) == {"state-sb3", "state-fast"}
    for row in rows.values():
        process = row["per_process"][0]
        assert process["steps"] > 0 and process["updates"] > 0 and row["env_steps_per_s"] > 0
        assert row["train_only_updates_per_s"] > 0 and row["bytes_per_transition"] > 0
    assert rows["state-sb3"]["x_stock"] == 1.0 and rows["state-fast"]["x_stock"] > 0
    assert rows["state-fast"]["device_sampler"] and rows["state-fast"]["cuda_graph"] == {  # CPU: eager step
        "state": "not-cuda", "reason": None, "max_deviation": None}
    assert rows["state-sb3"]["cuda_graph"] is None  # stock SB3 has no graph step
    sections = rows["state-fast"]["update_sections_ms"]  # --profile-updates: FastSAC's step, part by part
    assert list(sections) == list(UPDATE_SECTIONS) and min(sections.values()) > 0  # every part ran and was timed
    assert rows["state-sb3"]["update_sections_ms"] is None  # stock SB3's train() has no parts to time
    assert not rows["state-sb3"]["device_sampler"]
    for row in rows.values():  # the phases share out the timed window, each second counted once
        window_ms = 1000.0 / row["env_steps_per_s"]
        phases = [row["train_ms"], row["env_ms"], row["rest_ms"]]
        assert min(phases) > 0 and sum(phases) == pytest.approx(window_ms, rel=0.05)
        assert row["train_gpu_ms"] is None  # CUDA events only on a GPU
    printed = capsys.readouterr().out
    assert "env steps/s" in printed and "need a GPU" in printed and "Where the time goes" in printed
    assert "by part of the step (host time" in printed
    assert "| state-fast | 1 | 16 | fp32 | 1 | " + " | ".join(f"{sections[name]:,.3f}" for name in UPDATE_SECTIONS) \
        in bench_train.markdown_report(out)


def test_a_profiler_that_fails_costs_the_row_nothing_and_is_one_line_under_the_table(monkeypatch, tmp_path):
    """torch.profiler needs CUPTI on a GPU; where it fails, the measurement keeps its speeds and the report says
    why there is no by-part table."""
    from ch09 import benchmark
    from ch09.benchmark import Measurement, measure

    def no_cupti(engine, updates):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED\nmore detail")

    monkeypatch.setattr(benchmark, "profile_update", no_cupti)
    before_the_profile: list[dict] = []
    row = measure(Measurement(run="state-fast", n_envs=1, batch_size=16, precision="fp32", device="cpu", seed=0,
                              learning_starts=100, warmup_steps=5, seconds=0.5, max_steps=20,
                              train_only_updates=0, buffer_size=2_000, overlap=False, torch_threads=1,
                              profile_updates=3), measured=lambda result: before_the_profile.append(dict(result)))
    assert row["env_steps_per_s"] > 0 and row["update_sections_ms"] is None
    # the speeds were handed out before the profile started: a profile that hangs cannot take them with it
    assert [r["env_steps_per_s"] for r in before_the_profile] == [row["env_steps_per_s"]]
    assert row["update_sections_error"] == "RuntimeError: CUPTI_ERROR_NOT_INITIALIZED"
    assert bench_train.failure_lines([row]) == [
        "profile failed: state-fast, fp32: RuntimeError: CUPTI_ERROR_NOT_INITIALIZED"]


def test_a_measurement_that_fails_is_a_failed_row_and_the_bench_measures_the_next_one(tmp_path, capsys):
    """A real worker that stops with an error (at 2 envs, --learning-starts 50 ends before each env has finished
    an episode, which the worker refuses in train's sentence): its row says failed and why, the 1-env measurement
    after it is still made, and the bench exits 1."""
    out = tmp_path / "bench.json"
    code = bench_train.main(["--device", "cpu", "--runs", "state-fast", "--n-envs", "2", "1", "--batch-sizes", "16",
                             "--learning-starts", "50", "--warmup-steps", "20", "--seconds", "1", "--max-steps", "200",
                             "--train-only-updates", "0", "--buffer-size", "1000", "--out", str(out)])
    assert code == 1
    two_envs, one_env = json.loads(out.read_text())["rows"]
    assert two_envs["n_envs"] == 2 and "--learning-starts 50 comes before" in two_envs["failed"]
    assert "use --learning-starts 100 or more" in two_envs["stderr_tail"]
    assert "failed" not in one_env and one_env["n_envs"] == 1 and one_env["env_steps_per_s"] > 0
    assert "1 of 2 measurements gave no result" in capsys.readouterr().err
    markdown = bench_train.markdown_report(out)
    assert "| state-fast | 2 | 16 | fp32 | 1 | failed | - |" in markdown
    assert "- failed: state-fast, 2 env(s), batch 16, fp32: the worker exited 2: --learning-starts 50" in markdown


UPDATE_DELAY_S = 0.05
"""Added to every update call in the phase test below: far above a full-state env step (~2 ms, README's CPU table)."""


def test_overlapped_updates_count_as_updates_not_as_env_time(monkeypatch):
    """With overlap, ``train()`` only defers the updates, which run inside ``_UpdateWhileEnvsStep.step_async``: the
    clock must still put them under updates. Each update call is made UPDATE_DELAY_S slower, so the updates'
    ms per env step is at least that delay, and the env step's, measured around it, far below it. A clock on
    ``train()`` would show ~0 under updates; one that nests wrongly would put the delay under the env step."""
    from ch09.benchmark import Measurement, measure
    from ch09.engine.fast_sac import FastSAC

    train_now = FastSAC._train_now

    def delayed(self, gradient_steps, batch_size):
        time.sleep(UPDATE_DELAY_S)
        return train_now(self, gradient_steps, batch_size)

    monkeypatch.setattr(FastSAC, "_train_now", delayed)
    row = measure(Measurement(run="state-fast", n_envs=1, batch_size=16, precision="fp32", device="cpu", seed=0,
                              learning_starts=100, warmup_steps=5, seconds=1.0, max_steps=20,
                              train_only_updates=0, buffer_size=2_000, overlap=True, torch_threads=1))
    assert row["overlap"] and row["updates"] > 0
    delay_ms = 1000 * UPDATE_DELAY_S * row["updates"] / row["steps"]  # the delay's share of each env step
    assert row["train_ms"] >= delay_ms and row["env_ms"] < delay_ms / 2
    assert bench_train.run_label(row) == "state-fast +overlap"  # the README's tables tell the two apart


def test_frames_in_ram_is_measured_for_fastsac_pixel_runs_only_and_labelled():
    """--frames-in-ram False True doubles FastSAC's pixel runs (frames on the GPU, in RAM) and leaves the stock
    reference alone; the table tells the two apart."""
    cfg = bench_train.BenchConfig(device="cuda", runs=("step0-sb3", "step2-fast"), batch_sizes=(256,),
                                  frames_in_ram=(False, True))
    jobs = [(m.run, m.frames_in_ram) for m, _ in bench_train.measurements(cfg)]
    assert jobs == [("step0-sb3", False), ("step2-fast", False), ("step2-fast", True)]
    assert bench_train.run_label({"run": "step2-fast", "overlap": True, "frames_in_ram": True}) == (
        "step2-fast +overlap +frames-in-ram")


@pytest.mark.parametrize("argv, fragment", [
    (["--runs", "no-such-run", "--device", "cpu"], "unknown --runs"),
    (["--runs", "step2-fast", "--device", "cpu"], "need a GPU"),
    (["--device", "cpu", "--n-envs", "0"], "at least 1"),
    (["--report", "no/such/bench.json"], "does not exist"),
    (["--report", str(REPO_ROOT / "pyproject.toml")], "not readable JSON"),
    pytest.param(["--device", "cuda"], "no CUDA GPU", marks=pytest.mark.skipif(not NO_CUDA, reason="has a GPU")),
])
def test_bad_input_is_one_sentence_and_exit_2(argv, fragment, capsys):
    assert bench_train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_gpu_checks_refuses_an_unknown_stage_or_learning_run_and_a_machine_without_gpu(tmp_path):
    script = REPO_ROOT / "scripts" / "gpu_checks.sh"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "OUT": str(tmp_path)}
    unknown = subprocess.run(["bash", str(script), "juggle"], capture_output=True, text=True, env=env, timeout=60)
    assert unknown.returncode == 2 and "unknown stage 'juggle'" in unknown.stderr
    unknown_run = subprocess.run(["bash", str(script), "learn"], capture_output=True, text=True,
                                 env={**env, "LEARN_RUNS": "proxy proxi"}, timeout=60)
    assert unknown_run.returncode == 2 and unknown_run.stderr.strip() == (
        "error: unknown learning run 'proxi' in LEARN_RUNS; use any of: proxy proxy_bf16_overlap reach.")
    if NO_CUDA:
        no_gpu = subprocess.run(["bash", str(script), "tests"], capture_output=True, text=True, env=env, timeout=120)
        assert no_gpu.returncode == 2 and len(no_gpu.stderr.strip().splitlines()) == 1
        assert "no CUDA GPU" in no_gpu.stderr or "lacks" in no_gpu.stderr


MEASURED_BLOCK = re.compile(r"<!-- measured: (\S+) -->\n(.*?)\n<!-- end measured -->", re.S)


def test_every_measured_table_in_the_readme_is_what_its_file_renders():
    """README figures of the benchmarks are ``--report`` blocks of committed files: edit a number by hand, or
    replace a file without its table, and this fails."""
    blocks = MEASURED_BLOCK.findall((REPO_ROOT / "README.md").read_text())
    assert blocks, "the README has no <!-- measured: FILE --> block"
    for name, table in blocks:
        assert table.strip() == bench_train.markdown_report(REPO_ROOT / name), (
            f"the README's table of {name} is not what `python scripts/bench_train.py --report {name}` prints")
    renderable = []
    for path in sorted((REPO_ROOT / "docs" / "measurements").glob("*.json")):
        data = json.loads(path.read_text())
        if "rows" in data or "eval_success_rate" in data:
            renderable.append(path.relative_to(REPO_ROOT).as_posix())
    assert set(renderable) <= {name for name, _ in blocks}, "a committed measurement the README does not show"


def test_each_kernel_is_charged_to_the_part_whose_range_was_open_when_it_was_launched_from_any_thread():
    """On CUDA the autograd engine launches a backward's kernels from a thread of its own, so they are no children
    of the range around ``backward()``: they are charged by launch time. Events as torch.profiler gives them
    (time_range in µs, the launching op's own kernel time); one op launches outside every range."""
    from types import SimpleNamespace

    from ch09.benchmark import section_ms

    cpu, cuda = th.autograd.DeviceType.CPU, th.autograd.DeviceType.CUDA

    def event(name, start, end, kernel_us=0.0, device_type=cpu):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device_type,
                               self_device_time_total=kernel_us)

    events = [event("a~", 0, 10), event("L_Q", 10, 30),  # the host-side ranges of two parts
              event("aten::convolution", 2, 4, kernel_us=5.0),  # main thread, in a~
              event("autograd::engine::evaluate_function", 12, 20, kernel_us=7.0),  # autograd thread, in L_Q
              event("aten::mm", 40, 41, kernel_us=100.0),  # after every range: charged to none
              event("a~", 0, 10, kernel_us=50.0, device_type=cuda)]  # CUDA's copy of a range: not an op
    charged = section_ms(events, on_cuda=True, updates=1)
    assert charged["a~"] == pytest.approx(0.005) and charged["L_Q"] == pytest.approx(0.007)
    assert sum(charged.values()) == pytest.approx(0.012)
    assert section_ms(events, on_cuda=False, updates=2) == pytest.approx(  # CPU: host time of each range, per step
        {**dict.fromkeys(UPDATE_SECTIONS, 0.0), "a~": 0.005, "L_Q": 0.010})


def test_a_measurement_past_its_timeout_keeps_the_speeds_its_workers_printed_before_their_profile() -> None:
    """Real processes standing in for two workers past --timeout: one printed its result before a profile that
    never returns, the other printed nothing. The first one's speeds are kept; the second fails the measurement."""
    line = bench_train.RESULT_PREFIX + json.dumps({"run": "step2-fast", "env_steps_per_s": 300.0})

    def worker(prints: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", f"print({prints!r}, flush=True); import time; time.sleep(60)"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    profiled = worker(line)
    time.sleep(1.0)  # it has printed its line and is "profiling"
    assert bench_train.results_before_the_profile([profiled]) == [{"run": "step2-fast", "env_steps_per_s": 300.0}]
    assert profiled.returncode is not None  # stopped, not left running
    printed, silent = worker(line), worker("still starting")
    time.sleep(1.0)
    assert bench_train.results_before_the_profile([printed, silent]) is None


def test_a_learning_curve_read_before_its_first_checkpoint_says_so_instead_of_empty_cells(tmp_path):
    """A curve read mid-run, or of a run killed, before its first checkpoint has no meta: no step count, speed,
    device or learning rate."""
    curve = tmp_path / "proxy.json"
    curve.write_text(json.dumps({"run": "ch09_manip_noDrQ_criticEnc", "engine": None, "seed": None,
                                 "learning_rate": None, "device": None, "cuda_graph": None, "total_steps": 20000,
                                 "eval_success_rate": [[2000, 0.1]], "reaches_0.9": False, "training": {},
                                 "finished": False, "steps_done": None, "steps_per_s": None, "wall_time_s": None}))
    table = bench_train.markdown_report(curve).splitlines()
    assert table[:3] == ["| env steps | eval success rate |", "|---|---|", "| 2,000 | 0.10 |"]
    assert table[-1] == ("no checkpoint yet when read (of 20,000 env steps): steps done and speed not recorded; "
                         "reaches 0.9: no")


def test_a_learning_curve_names_the_gpu_it_ran_on(tmp_path):
    """The device tool lends H100s and H200s: a curve's line says which, from the GPU name its run's meta records."""
    curve = tmp_path / "proxy.json"
    curve.write_text(json.dumps({"run": "ch09_manip_noDrQ_criticEnc", "engine": "fast", "seed": 0,
                                 "learning_rate": 0.001, "device": "cuda", "gpu": "NVIDIA H100 80GB HBM3",
                                 "cuda_graph": "captured", "total_steps": 20000, "eval_success_rate": [[2000, 0.1]],
                                 "reaches_0.9": False, "training": {}, "finished": False, "steps_done": 2000,
                                 "steps_per_s": 61.2, "wall_time_s": 33.0}))
    line = bench_train.markdown_report(curve).splitlines()[-1]
    assert " on NVIDIA H100 80GB HBM3, CUDA graph captured, seed 0, learning rate 0.001;" in line, line
