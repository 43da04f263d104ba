"""Benchmark: training throughput of stock SB3 SAC against FastSAC, on one machine, in one run.

Each measurement is a separate process that builds the agent exactly as ``ch09_pixel_push.py train`` does
(``build_agent`` from the same flags, ``--engine sb3`` or ``--engine fast`` and ``--precision`` included), collects
``--learning-starts`` random steps, trains ``--warmup-steps`` more (cuDNN autotuning, the CUDA-graph capture),
and then trains for ``--seconds`` (at most ``--max-steps`` env steps) while it is timed. Then
``--train-only-updates`` gradient steps run without any env, timed alone. Concurrent runs (``--concurrent 3``)
start that many processes of the same measurement with different seeds, which wait for each other before
timing; their env steps/s add up.

| column               | meaning                                                                     |
|----------------------|-----------------------------------------------------------------------------|
| run                  | the run's name (below); ``+overlap``: collection overlapped (``--overlap``);  |
|                      | ``+frames-in-ram``: the replay frames in RAM (``--frames-in-ram``)          |
| seeds                | concurrent processes of the measurement (``--concurrent``)                  |
| env steps/s          | env steps trained per second (summed over concurrent processes)             |
| x stock              | env steps/s over the stock run's at the same envs and batch                 |
| updates/s            | gradient steps per second during that training (summed)                     |
| train-only updates/s | gradient steps per second of ``model.train()`` alone (mean per process)      |
| (with --repeats)     | each speed is the median over the interleaved rounds; the JSON keeps every round |
| peak GPU GB          | ``torch.cuda.max_memory_allocated`` of the process (largest of the concurrent) |
| replay B/transition  | replay bytes per stored transition (frame-once buffer: rows and the device copy) |
| GPU util %           | mean of ``nvidia-smi`` utilization.gpu samples while timed (where it answers) |
| CUDA graph           | FastSAC's CUDA-graph step (``graph_status``: state here, reason in the JSON) |
| h per 5M steps       | the Experiment Card's steps at the env steps/s of one seed                  |
| ms per env step      | a second table: updates (host, GPU), env step, rest (``PhaseClock``)         |
| ms per gradient step | a third table (``--profile-updates N``): FastSAC's step by part, ms each    |

Runs (``--runs``; the defaults depend on ``--device``)
------------------------------------------------------
| name                 | engine | what                                                                    |
|----------------------|--------|-------------------------------------------------------------------------|
| step0-sb3            | sb3    | Step 0: MultiInputPolicy, NatureCNN, DrQ, ``--replay sb3`` (the stock reference) |
| step2-sb3            | sb3    | Step 2: ``--critic-encoder --no-drq --replay sb3``                       |
| step2-fast           | fast   | Step 2 through FastSAC, ``--replay framestack`` (frames on the GPU)      |
| state-sb3            | sb3    | full-state Push, ``--replay sb3`` (the CPU reference)                    |
| state-fast           | fast   | full-state Push through FastSAC, ``--replay framestack`` (device draw)   |
| state-fast-sb3replay | fast   | full-state Push through FastSAC, ``--replay sb3`` (host draw)            |

On a GPU the pixel runs are the point. ``--device cpu`` runs the full-state ones at a small and the full
batch: a proxy for the Python and host overhead the engine removes (on a CPU the update is compute-bound,
so the pixel figures need a GPU).

Run it
------
    bash docker/dev.sh python scripts/bench_train.py --device cpu          # CPU proxy, a few minutes
    python scripts/bench_train.py --device cuda --n-envs 1 8 --precisions fp32 bf16
    python scripts/bench_train.py --device cuda --runs step2-fast --concurrent 1 2 3 4
    python scripts/bench_train.py --quick                                  # seconds: checks the script works
    python scripts/bench_train.py --report docs/measurements/<date>_<machine>_bench1.json   # README markdown

It prints the table and writes JSON to ``results/bench_train_<device>.json`` (or ``--out``) after every
measurement. A measurement that gives no result (its worker stops with an error, or it runs past ``--timeout``
before it has printed its speeds: one past it in its ``--profile-updates`` keeps them) is a row marked
``failed``, with the reason under the table and the worker's stderr in the JSON; the bench goes on with the next
one and exits 1 at the end. A figure goes into the README as the ``--report`` markdown of a JSON
committed under ``docs/measurements/``, between ``<!-- measured: FILE -->`` and ``<!-- end measured -->``; the
tests check that every such block is still what its file renders.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

SCRIPTS_DIR = Path(__file__).resolve().parent

try:
    from cli_guard import guard_entry_point, parse_with_one_line_errors, run_guarded
except ModuleNotFoundError:  # the project is not installed in this Python: one sentence, not a traceback
    print("error: this project is not installed in this Python; run `pip install -e .` in the repository, or run "
          "the command through `bash docker/dev.sh python ...`.", file=sys.stderr)
    sys.exit(2)  # a mistake the user can fix, as cli_guard would say it (it is what could not be imported)

guard_entry_point(__name__)  # before the heavy imports: a failing import or an early SIGTERM is one line

import numpy as np  # noqa: E402
import torch as th  # noqa: E402
import tyro  # noqa: E402

from ch09.benchmark import CPU_RUNS, GPU_RUNS, PHASES, REFERENCE_RUN, RUNS, Measurement, measure  # noqa: E402
from ch09.errors import UserError  # noqa: E402
from ch09.probe import probe_markdown  # noqa: E402
from ch09.run.artifacts import REPO_ROOT, write_json  # noqa: E402
from ch09.run.validation import read_json_object  # noqa: E402
from ch09.selftest import EXPERIMENT_CARD_STEPS  # noqa: E402

RESULT_PREFIX = "BENCH_RESULT "
"""A worker prints its measurement as one JSON line after this prefix."""
CPU_BATCHES = (32, 256)
GPU_BATCHES = (256,)


@dataclass
class BenchConfig:
    """Training throughput of stock SB3 SAC vs FastSAC (see the module docstring for the columns)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Torch device of every run: auto (cuda when available), cuda, cpu."""
    runs: tuple[str, ...] = ()
    """Which runs (module docstring); default: the pixel runs on a GPU, the full-state runs on the CPU."""
    n_envs: tuple[int, ...] = (1,)
    """Env counts to measure (one update per env step at each)."""
    batch_sizes: tuple[int, ...] = ()
    """Batch sizes; default 256 on a GPU, 32 and 256 on the CPU."""
    precisions: tuple[Literal["fp32", "bf16"], ...] = ("fp32",)
    """FastSAC precisions to measure (stock runs are fp32)."""
    concurrent: tuple[int, ...] = (1,)
    """Numbers of processes to run side by side for each measurement (their env steps/s add up)."""
    repeats: int = 1
    """Rounds over all measurements, interleaved; the table shows each figure's median over the rounds
    (on a shared machine the load changes between measurements)."""
    overlap: tuple[bool, ...] = (False,)
    """FastSAC without (False) and with (True) overlapped collection (``train --overlap-collection``: one-step
    policy lag); ``--overlap False True`` measures both (stock runs have no overlap)."""
    frames_in_ram: tuple[bool, ...] = (False,)
    """FastSAC's pixel runs with the replay frames on the GPU (False) or in RAM (True: ``train --frames-in-ram``,
    the batch drawn on the host); ``--frames-in-ram False True`` measures both (other runs: False)."""
    learning_starts: int = 1_000
    """Random-action env steps collected before training (not timed)."""
    warmup_steps: int = 200
    """Env steps trained before the timing starts (cuDNN autotuning, CUDA-graph capture)."""
    seconds: float = 30.0
    """Seconds of timed training per measurement."""
    max_steps: int = 20_000
    """At most this many timed env steps, whatever --seconds says."""
    train_only_updates: int = 200
    """Gradient steps timed alone (no env) after the timed training; 0 skips it."""
    profile_updates: int = 0
    """Eager FastSAC gradient steps profiled after that, by part of the step (the third table; rows without
    overlap: it does not change the step); 0 skips it."""
    buffer_size: int = 20_000
    """Replay capacity of every run (small enough for SB3's pixel buffer: ~3.4 GB of RAM)."""
    timeout: float = 1_800.0
    """Seconds a measurement (all its concurrent processes) may take before it is stopped."""
    out: str = ""
    """JSON output (default: results/bench_train_<device>.json)."""
    quick: bool = False
    """Seconds-long budgets on the CPU: checks that the script works (its figures mean nothing)."""
    report: str = ""
    """Measure nothing: print the README's markdown of a saved result, this script's JSON or the proxy.json of
    scripts/gpu_checks.sh (README tables are these blocks, checked against their files by the tests)."""
    worker: str = ""
    """Internal: run ONE measurement described by this JSON and print its result."""


# ======================================================================================================
# One measurement, in its own process
# ======================================================================================================


def print_result(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def worker_main(payload: str) -> int:
    """One measurement; its result as a line of stdout (a first one before the profile: the parent keeps the last)."""
    print_result(measure(Measurement(**json.loads(payload)), measured=print_result))
    return 0


# ======================================================================================================
# The parent: which measurements, processes side by side, the table and the JSON
# ======================================================================================================
def resolve(cfg: BenchConfig) -> BenchConfig:
    """Defaults that depend on the device, and one-sentence refusals of impossible requests."""
    if cfg.quick:
        cfg = replace(cfg, device="cpu", runs=cfg.runs or ("state-sb3", "state-fast"), batch_sizes=(16,),
                      learning_starts=100 * max(cfg.n_envs), warmup_steps=20, seconds=2.0, max_steps=400,
                      train_only_updates=10, buffer_size=2_000)  # two episodes per env before the first update
    device = cfg.device
    if device == "auto":
        device = "cuda" if th.cuda.is_available() else "cpu"
    if device == "cuda" and not th.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU here; use --device cpu.")
    runs = cfg.runs or (GPU_RUNS if device == "cuda" else CPU_RUNS)
    unknown = [run for run in runs if run not in RUNS]
    if unknown:
        raise UserError(f"unknown --runs {', '.join(unknown)}; choose from {', '.join(RUNS)}.")
    if device == "cpu" and any(RUNS[run].pixels for run in runs):
        raise UserError("the pixel runs need a GPU to mean anything; on the CPU use the full-state runs "
                        f"({', '.join(CPU_RUNS)}).")
    for name in ("n_envs", "batch_sizes", "concurrent"):
        if any(value < 1 for value in getattr(cfg, name)):
            raise UserError(f"every --{name.replace('_', '-')} value must be at least 1.")
    if cfg.seconds <= 0 or min(cfg.max_steps, cfg.learning_starts, cfg.repeats) < 1:
        raise UserError("--seconds must be positive and --max-steps, --learning-starts, --repeats at least 1.")
    batches = cfg.batch_sizes or (GPU_BATCHES if device == "cuda" else CPU_BATCHES)
    return replace(cfg, device=device, runs=tuple(runs), batch_sizes=tuple(batches))


def measurements(cfg: BenchConfig) -> list[tuple[Measurement, int]]:
    """(measurement, processes side by side), stock runs first at each (n_envs, batch)."""
    jobs = []
    cpus = os.cpu_count() or 1
    for n_envs in cfg.n_envs:
        for batch_size in cfg.batch_sizes:
            for run in sorted(cfg.runs, key=lambda r: RUNS[r].engine != "sb3"):
                fast = RUNS[run].engine == "fast"
                precisions, overlaps = (cfg.precisions, cfg.overlap) if fast else (("fp32",), (False,))
                frame_places = cfg.frames_in_ram if fast and RUNS[run].pixels else (False,)
                for precision, overlap, in_ram, concurrent in itertools.product(precisions, overlaps, frame_places,
                                                                                cfg.concurrent):
                    jobs.append((Measurement(
                        run=run, n_envs=n_envs, batch_size=batch_size, precision=precision,
                        device=cfg.device, seed=0, learning_starts=cfg.learning_starts,
                        warmup_steps=cfg.warmup_steps, seconds=cfg.seconds, max_steps=cfg.max_steps,
                        train_only_updates=cfg.train_only_updates, buffer_size=cfg.buffer_size, overlap=overlap,
                        torch_threads=max(1, cpus // (concurrent * (n_envs + 1))), frames_in_ram=in_ram,
                        profile_updates=cfg.profile_updates if fast and not overlap else 0), concurrent))
    return jobs


class MeasurementFailed(Exception):
    """A measurement that ended without a result: a worker failed (``reason``: its one-line error, ``detail``:
    the end of its stderr) or it ran past ``--timeout``. The bench records a failed row and goes on."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def run_processes(measurement: Measurement, concurrent: int, timeout: float) -> list[dict[str, Any]]:
    """``concurrent`` worker processes of one measurement (seeds 0, 1, ...); their results."""
    with tempfile.TemporaryDirectory(prefix="bench_train_") as barrier:
        procs = []
        for seed in range(concurrent):
            job = replace(measurement, seed=seed, barrier_dir=barrier, barrier_count=concurrent)
            procs.append(subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(job))],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT))
        deadline, results = time.monotonic() + timeout, []
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                late = results_before_the_profile(procs[len(results):])  # this worker and the ones after it
                if late is None:
                    raise MeasurementFailed(f"took longer than --timeout {timeout:g} s (give it more time or fewer "
                                            "--seconds)") from None
                return results + [{**result, "update_sections_error": f"the profile ran past --timeout {timeout:g} s"}
                                  for result in late]
            result = last_result(out)
            if proc.returncode != 0 or result is None:
                said = [line for line in err.splitlines() if line.strip()]
                raise MeasurementFailed(f"the worker exited {proc.returncode}: "
                                        f"{said[-1].removeprefix('error: ') if said else 'it printed nothing'}",
                                        err[-3000:])
            results.append(result)
    return results


def last_result(out: str) -> dict[str, Any] | None:
    """The last result a worker printed on its stdout (``print_result``), None if it printed none."""
    lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else None


def results_before_the_profile(procs: list[subprocess.Popen]) -> list[dict[str, Any]] | None:
    """Stop these workers of a measurement past its --timeout (still running, or cut off waiting for them); the
    result each printed before its profile, if every one of them did (None otherwise: the measurement failed)."""
    results = []
    for proc in procs:
        proc.kill()
        results.append(last_result(proc.communicate()[0]))
    return results if all(result is not None for result in results) else None


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row from the concurrent processes of a measurement."""
    first = results[0]
    peak = [r["peak_gpu_memory_bytes"] for r in results if r["peak_gpu_memory_bytes"] is not None]
    utilization = [r["gpu_utilization_percent"] for r in results if r["gpu_utilization_percent"] is not None]
    train_only = [r["train_only_updates_per_s"] for r in results if r["train_only_updates_per_s"] is not None]
    return {
        "run": first["run"], "engine": first["engine"], "what": RUNS[first["run"]].what,
        "n_envs": first["n_envs"], "batch_size": first["batch_size"], "precision": first["precision"],
        "overlap": first["overlap"], "concurrent": len(results),
        "env_steps_per_s": sum(r["env_steps_per_s"] for r in results),
        "updates_per_s": sum(r["updates_per_s"] for r in results),
        "train_only_updates_per_s": float(np.mean(train_only)) if train_only else None,
        "peak_gpu_memory_bytes": max(peak) if peak else None,
        "bytes_per_transition": first["bytes_per_transition"],
        "gpu_utilization_percent": float(np.mean(utilization)) if utilization else None,
        **{phase: _mean([r[phase] for r in results]) for phase in PHASES},
        "cuda_graph": first["cuda_graph"], "device_sampler": first["device_sampler"],
        "update_sections_ms": first["update_sections_ms"], "update_sections_error": first["update_sections_error"],
        "cudnn_deterministic": first["cudnn_deterministic"],
        "per_process": results,
    }


def failed_row(measurement: Measurement, concurrent: int, failure: MeasurementFailed) -> dict[str, Any]:
    """The row of a measurement that gave no result: its setup, why, and the end of the worker's stderr."""
    return {"run": measurement.run, "engine": RUNS[measurement.run].engine, "what": RUNS[measurement.run].what,
            "n_envs": measurement.n_envs, "batch_size": measurement.batch_size, "precision": measurement.precision,
            "overlap": measurement.overlap, "concurrent": concurrent, "failed": failure.reason,
            "stderr_tail": failure.detail}


def _mean(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return float(np.mean(present)) if present else None


MEDIAN_FIELDS = ("env_steps_per_s", "updates_per_s", "train_only_updates_per_s", "gpu_utilization_percent", *PHASES)


def median_row(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the rounds of a measurement: the median of each speed, every round kept."""
    row = dict(rounds[-1])
    for name in MEDIAN_FIELDS:
        values = [r[name] for r in rounds if r[name] is not None]
        row[name] = float(np.median(values)) if values else None
    peaks = [r["peak_gpu_memory_bytes"] for r in rounds if r["peak_gpu_memory_bytes"] is not None]
    row["peak_gpu_memory_bytes"] = max(peaks) if peaks else None
    row["rounds"] = [{name: r[name] for name in MEDIAN_FIELDS} for r in rounds]
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        if "failed" in row:
            continue
        reference = REFERENCE_RUN[RUNS[row["run"]].pixels]
        stock = [r for r in rows if r["run"] == reference and r["n_envs"] == row["n_envs"]
                 and r["batch_size"] == row["batch_size"] and r["concurrent"] == 1 and "failed" not in r]
        row["x_stock"] = row["env_steps_per_s"] / stock[0]["env_steps_per_s"] if stock else None
        row["stock_reference"] = reference if stock else None


def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def run_label(row: dict[str, Any]) -> str:
    """The run's name, and whether its collection overlapped the updates (``--overlap True``) and its frames were
    kept in RAM (``--frames-in-ram True``; older files have no such field)."""
    return row["run"] + (" +overlap" if row["overlap"] else "") + (" +frames-in-ram" if row.get("frames_in_ram")
                                                                    else "")


def print_aligned(table: list[tuple[str, ...]]) -> None:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))


SETUP_HEADER = ("run", "envs", "batch", "precision", "seeds")
SPEED_HEADER = (*SETUP_HEADER, "env steps/s", "x stock", "updates/s", "train-only updates/s", "peak GPU GB",
                "replay B/transition", "GPU util %", "CUDA graph",
                f"h per {EXPERIMENT_CARD_STEPS / 1e6:g}M steps (each seed)")
PHASE_HEADER = (*SETUP_HEADER, "updates (host)", "updates (GPU)", "env step", "rest")


def section_title(device: str) -> str:
    what = "GPU time: the sum of each part's kernels" if device == "cuda" else "host time, the profiler's included"
    return (f"ms per gradient step, by part of the step ({what}; eager steps under torch.profiler, parts: "
            "UPDATE_SECTIONS in scripts/ch09/engine/fast_sac.py; train-only step: 1000 / train-only updates/s, "
            "on CUDA one graph replay):")


def _setup_cells(row: dict[str, Any]) -> tuple[str, ...]:
    return run_label(row), str(row["n_envs"]), str(row["batch_size"]), row["precision"], str(row["concurrent"])


def speed_cells(row: dict[str, Any]) -> tuple[str, ...]:
    """One row of the speed table (console and README); a failed measurement's says so and measures nothing."""
    if "failed" in row:
        return (*_setup_cells(row), "failed", *["-"] * (len(SPEED_HEADER) - len(SETUP_HEADER) - 1))
    peak = row["peak_gpu_memory_bytes"] / 1e9 if row["peak_gpu_memory_bytes"] is not None else None
    per_seed = row["env_steps_per_s"] / row["concurrent"]  # concurrent seeds share out the summed speed
    return (*_setup_cells(row), _cell(row["env_steps_per_s"]), _cell(row["x_stock"], 2), _cell(row["updates_per_s"]),
            _cell(row["train_only_updates_per_s"]), _cell(peak, 2), _cell(row["bytes_per_transition"], 0),
            _cell(row["gpu_utilization_percent"], 0), row["cuda_graph"]["state"] if row["cuda_graph"] else "-",
            f"{EXPERIMENT_CARD_STEPS / per_seed / 3600:,.1f}")


def phase_cells(row: dict[str, Any]) -> tuple[str, ...]:
    """One row of the where-the-time-goes table: ms per env step of each ``PhaseClock`` phase."""
    return (*_setup_cells(row), *(_cell(row.get(phase), 2) for phase in PHASES))


def section_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that profiled their gradient step (older files have no such field)."""
    return [row for row in rows if row.get("update_sections_ms") or row.get("update_sections_error")]


def section_table(rows: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """The by-part table, header first: ms per gradient step in each part (the engine's UPDATE_SECTIONS, in the
    order the JSON keeps them), their sum, and the captured step's time."""
    profiled = section_rows(rows)
    parts = next(list(row["update_sections_ms"]) for row in profiled if row.get("update_sections_ms"))
    table = [(*SETUP_HEADER, *parts, "sum", "train-only step")]
    for row in profiled:
        sections = row["update_sections_ms"] or {}
        train_only = row["train_only_updates_per_s"]
        table.append((*_setup_cells(row), *(_cell(sections.get(name), 3) for name in parts),
                      _cell(sum(sections.values()), 3) if sections else "-",
                      _cell(1000 / train_only if train_only else None, 3)))
    return table


def failure_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Why each failed measurement gave no result, one line each (under the speed table)."""
    return [f"failed: {run_label(row)}, {row['n_envs']} env(s), batch {row['batch_size']}, {row['precision']}: "
            f"{row['failed']}" for row in rows if "failed" in row] + [
            f"profile failed: {run_label(row)}, {row['precision']}: {row['update_sections_error']}"
            for row in rows if row.get("update_sections_error")]


def print_table(rows: list[dict[str, Any]], device: str) -> None:
    print_aligned([SPEED_HEADER, *map(speed_cells, rows)])
    for line in failure_lines(rows):
        print(line)
    print()
    print("Where the time goes, ms per env step (PhaseClock in scripts/ch09/benchmark.py):")
    print_aligned([PHASE_HEADER, *map(phase_cells, rows)])
    if any(row.get("update_sections_ms") for row in rows):
        print()
        print(section_title(device))
        print_aligned(section_table(rows))
    if device == "cpu":
        print("CPU proxy: full-state Push only. The pixel figures (Step 0 stock vs Step 2 FastSAC) need a GPU: "
              "python scripts/bench_train.py --device cuda")


def machine_info() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": th.__version__, "cpus": os.cpu_count(),
            "platform": platform.platform()}
    if th.cuda.is_available():
        info["gpu"] = th.cuda.get_device_name(0)
    return info


def bench(cfg: BenchConfig) -> int:
    cfg = resolve(cfg)
    out = Path(cfg.out) if cfg.out else REPO_ROOT / "results" / f"bench_train_{cfg.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "config": asdict(cfg), "machine": machine_info(),
                              "rows": []}
    jobs = measurements(cfg)
    rounds: list[list[dict[str, Any]]] = [[] for _ in jobs]
    failures: dict[int, dict[str, Any]] = {}  # the last failure of each measurement
    for repeat in range(cfg.repeats):
        for number, (measurement, concurrent) in enumerate(jobs):
            print(f"[round {repeat + 1}/{cfg.repeats}, {number + 1}/{len(jobs)}] {measurement.run}: n_envs "
                  f"{measurement.n_envs}, batch {measurement.batch_size}, {measurement.precision}, "
                  f"{concurrent} process(es)", flush=True)
            try:
                rounds[number].append(combine(run_processes(measurement, concurrent, cfg.timeout)))
            except MeasurementFailed as failure:  # the next measurements may still work: measure them
                print(f"  failed: {failure.reason}", flush=True)
                failures[number] = failed_row(measurement, concurrent, failure)
            # a measurement with no result in any round is a failed row, in its place
            report["rows"] = [median_row(done) if done else failures[number]
                              for number, done in enumerate(rounds) if done or number in failures]
            add_ratios(report["rows"])
            write_json(out, report)  # atomically: a deadline that kills the bench keeps the last one whole
    print()
    print_table(report["rows"], cfg.device)
    print(f"results: {out}")
    failed = [row for row in report["rows"] if "failed" in row]
    if failed:
        print(f"error: {len(failed)} of {len(jobs)} measurements gave no result (the rows marked failed; the JSON "
              "keeps each worker's stderr).", file=sys.stderr)
    return 1 if failed else 0


# ======================================================================================================
# The README's tables, from the saved JSON
# ======================================================================================================
def _markdown(header: Sequence[str], lines: list[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(line) + " |"
                                                                            for line in lines]


def bench_markdown(report: dict[str, Any]) -> str:
    """Two tables: the speeds, and where each env step's time goes (``PhaseClock``)."""
    lines = _markdown(SPEED_HEADER, [speed_cells(row) for row in report["rows"]])
    failures = failure_lines(report["rows"])
    if failures:
        lines += ["", *(f"- {line}" for line in failures)]
    lines += ["", "ms per env step:", ""]
    lines += _markdown(PHASE_HEADER, [phase_cells(row) for row in report["rows"]])
    if any(row.get("update_sections_ms") for row in report["rows"]):
        header, *cells = section_table(report["rows"])
        lines += ["", section_title(report["config"]["device"]), ""] + _markdown(header, cells)
    return "\n".join(lines)


TRAINING_COLUMNS = {"rollout/success_rate": ("rollout success rate (last 100 episodes)", "{:.2f}"),
                    "train/ent_coef": ("ent_coef", "{:.3g}"), "train/critic_loss": ("critic loss", "{:.3g}")}
"""The training curves a learning curve's JSON may carry beside its evaluations (gpu_checks.sh's TRAINING_TAGS;
older files have none), each shown at its last point at or before the evaluation's step."""


def _at_or_before(points: list[list[float]], step: int, template: str) -> str:
    earlier = [value for at, value in points if at <= step]
    return template.format(earlier[-1]) if earlier else "-"


def proxy_markdown(report: dict[str, Any]) -> str:
    """The proxy's eval success curve, one row per evaluation (with the run's own training curves where the file
    has them), and how far and how fast the run went."""
    curves = report.get("training") or {}
    training = {tag: curves[tag] for tag in TRAINING_COLUMNS if tag in curves}
    header = ("env steps", "eval success rate", *(TRAINING_COLUMNS[tag][0] for tag in training))
    lines = _markdown(header, [(f"{step:,}", f"{rate:.2f}",
                                *(_at_or_before(points, step, TRAINING_COLUMNS[tag][1])
                                  for tag, points in training.items()))
                               for step, rate in report["eval_success_rate"]])
    done = "finished" if report["finished"] else "cut short"
    reaches = "yes" if report["reaches_0.9"] else "no"
    where = ""  # (recorded since the reach run: the device, and on CUDA what became of the graph)
    if report.get("device"):
        graph = report.get("cuda_graph")
        device = report.get("gpu") or report["device"]  # the GPU's name recorded since H100s are lent too
        where = f" on {device}" + (f", CUDA graph {graph}" if graph and graph != "not-cuda" else "")
    if report.get("learning_rate") is not None:  # (recorded since the training curves)
        where += f", seed {report['seed']}, learning rate {report['learning_rate']:g}"
    if report.get("batch_size") is not None:  # (recorded since the CPU's batch-64 runs)
        where += f", batch {report['batch_size']}"
    if report.get("precision") is not None:  # (recorded since the learn stage ran its runs side by side)
        where += f", {report['precision']}" + (", overlapped collection" if report["overlap_collection"] else "")
    if report["steps_done"] is None:  # read mid-run, or killed, before its first checkpoint's meta was written
        progress = (f"no checkpoint yet when read (of {report['total_steps']:,} env steps): steps done and speed "
                    "not recorded")
    else:
        progress = (f"{_cell(report['steps_done'])} of {report['total_steps']:,} env steps ({done}) at "
                    f"{_cell(report['steps_per_s'])} env steps/s")
        if report.get("runs_side_by_side", 1) > 1:  # the runs shared the device: not one run's speed
            progress += f" ({report['runs_side_by_side']} runs side by side)"
    lines += ["", f"{progress}{where}; reaches 0.9: {reaches}"]
    return "\n".join(lines)


def markdown_report(path: Path) -> str:
    """The markdown of a saved result: a bench JSON, a learning curve of gpu_checks.sh, or a reach_probe.py JSON."""
    fix = "pass a JSON file written by bench_train.py, scripts/gpu_checks.sh or reach_probe.py"
    data = read_json_object(path, "--report", fix)
    if isinstance(data.get("rows"), list):
        return bench_markdown(data)
    if isinstance(data.get("eval_success_rate"), list):
        return proxy_markdown(data)
    if isinstance(data.get("probes"), list):
        return probe_markdown(data)
    raise UserError(f"--report {path} holds no bench rows, learning curve or probes; {fix}.")


def print_report(path: Path) -> int:
    print(markdown_report(path))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_with_one_line_errors(lambda: tyro.cli(BenchConfig, args=argv, description=__doc__.split("\n")[0]))
    if cfg.report:
        return run_guarded(functools.partial(print_report, Path(cfg.report)))
    return run_guarded(functools.partial(worker_main, cfg.worker) if cfg.worker else functools.partial(bench, cfg))


if __name__ == "__main__":
    sys.exit(main())
