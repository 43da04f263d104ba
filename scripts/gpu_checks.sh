#!/usr/bin/env bash
# The GPU checks of the project, in calls of a lent GPU machine (one H100 or one H200: the device tool lends
# either) of at most 9 minutes each.
#
# Prepare once, on the CPU machine, from the repository root (wheels the GPU image lacks and the EGL loaders;
# nothing else: the GPU image's own pytest and its plugins stay as they are; typing_extensions too, because tyro
# 1.0.17 fails to import with the 4.13 and older that the image may have):
#   EXTRA_WHEELS="typing_extensions==4.16.0" bash ../shared/device/prepare.sh
# Then the first device call:  run(carry=[".whl", ".gl"], timeout_s=540, command=
#   'T0=$(date +%s); source .gl/device_env.sh && GPU_CHECKS_T0=$T0 bash scripts/gpu_checks.sh')
# T0 is taken before the wheels install, so the deadline below counts from the start of the call.
#
# Stages, in order of value, with their planning estimates on a fresh H200 (the H200 run of 2026-12-04 measured
# prepare, tests, bench1 and the proxy's rate; the others are not measured yet; the log prints what each one took;
# an H100 has not run them: a slower stage is cut by the deadline below, keeping what it measured).
# Every stage runs under min(1.5 x its estimate, the time left before DEADLINE_S); a stage with less than
# MIN_STAGE_S left is skipped and named in the log.
#   stage      estimate  what
#   prepare      15 s    source .gl/device_env.sh: EGL loaders unpacked, the carried wheels installed
#   tests        40 s    pytest -m gpu: the captured step equals the eager one, bf16 tracks fp32, GPU replay storage
#   learn       390 s    three `train` runs side by side on the GPU (LEARN_RUNS), at learning rate 1e-3
#                        (CHECK_LEARNING_RATE), each evaluated and checkpointed as it goes:
#                        proxy: pixel FetchReach-v4 with Step 2's flags and train's defaults (fp32, no overlap),
#                          20K steps, eval success every 2K steps (10 episodes);
#                        proxy_bf16_overlap: the same with --precision bf16 --overlap-collection, the fastest
#                          settings bench1 measured: do they learn as the defaults do (which defaults to choose)?
#                        reach: full-state FetchReach-v4, 12K steps, eval every 1K steps (20 episodes), the frame-once
#                          replay drawn inside the graph as in the proxy; the README gives the same command's curves
#                          on a CPU: does the GPU engine learn where the CPU one does?
#                        Side by side, the three share the GPU: their env steps/s are not one run's speed (bench1's
#                        are). The stage stops in time for the probe: its limit keeps the probe's estimate in hand.
#   probe        40 s    reach_probe.py on the snapshots each learning run left (one per evaluation), the runs
#                        probed side by side: does the critic know the way to the goal, does the actor take it (why a
#                        flat curve is flat)
#   bench8       90 s    pixels, 8 envs: Step 0 stock vs Step 2 FastSAC fp32, 8 s windows
#   seeds3       80 s    pixels, 1 env, 3 runs side by side (3 seeds on one GPU): Step 0 stock vs Step 2 FastSAC fp32
#   selftest     45 s    ch09_pixel_push.py selftest on cuda: what a reader runs before a long run (short samples)
#   bench1      180 s    pixels, 1 env: Step 0 and Step 2 stock vs Step 2 FastSAC in fp32 and bf16, each without
#                        and with overlapped collection, 9 s windows; FastSAC's step profiled by part (20 steps;
#                        a measurement past 120 s is stopped, its speeds kept if only its profile was running)
# They do not all fit in one call. Without arguments the script runs DEFAULT_STAGES, the first call of a session:
#   call 1: tests learn probe  15 + 40 + 390 + 40 = 485 s, under DEADLINE_S = 510 s from T0 (call: 540 s)
#   call 2: bench8 seeds3 selftest  15 + 90 + 80 + 45 = 230 s, with DEADLINE_S from `status` (the rerun line below)
# bench1 measured the engine's speed on 2026-12-04; run it again (alone, a call of its own) after the engine changes.
#
# What comes back under $OUT (at most 8 files, one of them a curve's .tmp if the call ends as it is written; each
# written as it is made, so a stage cut off by its timeout or the deadline still leaves what it measured):
# gpu_checks.log (all output, free memory first, each learning run's lines prefixed with its name, and after each
# stage every crash-*.log the entry points' guard wrote during it), selftest.json, bench1.json, bench8.json and
# seeds3.json (bench_train.py writes after every measurement), one NAME.json per learning run (its eval curve with
# its rollout success, ent_coef and critic loss beside it, rewritten from its TensorBoard folder every CURVE_POLL_S
# and after the stage, whatever ended it), and one NAME_probe.json per learning run (its snapshots probed).
#
# After a call: copy each JSON but selftest.json to docs/measurements/<date>_<gpu>_<name>.json (<gpu>: h100 or
# h200, as the log's nvidia-smi line names it; the curves record the GPU's name) and put each into
# README.md as what `python scripts/bench_train.py --report FILE` prints, between `<!-- measured: FILE -->`
# and `<!-- end measured -->` (the tests check every such block against its file). bench1's second table says
# where each env step's time goes: the updates on the host and on the GPU, the env step, the rest; its third, where
# the GPU time of one gradient step goes (the draw, each loss with its encoder passes, Polyak). Its rows choose
# the defaults of train's --precision and --overlap-collection (bench8's, of --n-envs); the proxy trains with neither.
#
# Usage: bash scripts/gpu_checks.sh [STAGE ...]   (default: DEFAULT_STAGES; prepare is not a stage here)
# Call 2, or a rerun after a fix: the machine goes back 30 s after a call, so the next call starts a fresh one (1-2
# min of the session's device time) and needs 4 min left to start at all: run only the stages still to do, with
# DEADLINE_S = what `status` gives as budget_left_s, less 150 s, and timeout_s = DEADLINE_S + 30, e.g.
#   'T0=$(date +%s); source .gl/device_env.sh && GPU_CHECKS_T0=$T0 DEADLINE_S=120 bash scripts/gpu_checks.sh tests'
set -uo pipefail

STAGES=(tests learn probe bench8 seeds3 selftest bench1)
DEFAULT_STAGES=(tests learn probe)
declare -A ESTIMATE_S=([prepare]=15 [tests]=40 [learn]=390 [probe]=40 [bench8]=90 [seeds3]=80 [selftest]=45
                       [bench1]=180)
DEADLINE_S="${DEADLINE_S:-510}"   # seconds from GPU_CHECKS_T0 (the call's start) after which no stage runs
CALL_TIMEOUT_S=540                # the device call's timeout_s
MIN_STAGE_S=20                    # a stage with less time than this left would measure nothing: skipped
KILL_AFTER_S=10                   # a stage that ignores SIGTERM is killed this long after it
LEARN_RUNS="${LEARN_RUNS:-proxy proxy_bf16_overlap reach}"   # the learning runs (learn_NAME below), side by side
PROXY_STEPS=20000
REACH_STEPS=12000
# The learning checks' Adam learning rate, chosen for the entropy coefficient's sake: from SB3's initial 1.0 it falls
# about as exp(-lr x updates), and on the CPU's full-state Reach runs success began once it was below about 0.07
# (README, "Fast training"): ~9K updates at train's 3e-4, ~3K at 1e-3, which leaves most of the proxy's steps to learn.
CHECK_LEARNING_RATE=1e-3
CURVE_POLL_S=20

# ---- the clock ---------------------------------------------------------------------------------------
time_left_s() { echo $(( START_S + DEADLINE_S - $(date +%s) )); }

# stage_limit_s NAME [KEEP_S]: seconds the stage may run, min(1.5 x estimate, time left - kill grace - KEEP_S,
# the time it leaves for a later stage); <= 0: none left
stage_limit_s() {
  local bound=$(( ESTIMATE_S[$1] * 3 / 2 )) left=$(( $(time_left_s) - KILL_AFTER_S - ${2:-0} ))
  echo $(( bound < left ? bound : left ))
}

say() { echo "[gpu_checks +$(( $(date +%s) - START_S ))s] $*" | tee -a "$LOG"; }

# project_on_path: the project's modules importable as `pip install -e .` would make them (pyproject.toml's
# package-dir: the labs from scripts/labs, ch09 from scripts/), for this shell and every process it starts. The
# GPU image's python3 gets no install step: building the project there needs nothing but these two folders.
project_on_path() {
  export PYTHONPATH="$PWD/scripts/labs:$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}"
}

# python3_lacks: what the stages import that python3 cannot, one entry per module with its error (exit 1 if any).
# lab_support first: it guards the mujoco pin and quiets gymnasium-robotics' import notices, as in every stage.
# Each module is imported, not only looked up: a package whose own dependency the GPU image lacks, or a tyro that
# fails with an older typing_extensions, is found here in seconds instead of failing every stage in turn.
STAGE_MODULES=(lab_support torch tensorboard pytest tyro gymnasium gymnasium_robotics mujoco stable_baselines3 cli_guard
               drqv2_sac_policy ch09.engine.fast_sac ch09.benchmark ch09.selftest bench_train ch09_pixel_push)
python3_lacks() {
  python3 - "${STAGE_MODULES[@]}" <<'PY'
import importlib, sys
lacking = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any failure to import is what this reports
        lacking.append(f"{name} ({type(exc).__name__}: {exc})")
print("; ".join(lacking))
sys.exit(1 if lacking else 0)
PY
}

# ---- the stages (each a function run under `timeout`, in its own process group) -----------------------
stage_tests() {
  local files
  files=$(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ')
  # Each test by name, and every thread's stack in the log if one runs past 60 s: a hang names its test.
  # `-o addopts=` drops pyproject's options, whose `-n` (pytest-xdist's workers) the image's pytest may not know:
  # the GPU tests run in this one process.
  # shellcheck disable=SC2086
  python3 -m pytest -o addopts= -m gpu $files -v -p no:cacheprovider -o faulthandler_timeout=60
}

stage_selftest() {
  python3 scripts/ch09_pixel_push.py selftest --device cuda --render-seconds 2 --speed-seconds 3 \
    --out "$OUT/selftest.json"
}

stage_bench1() {
  python3 scripts/bench_train.py --device cuda --n-envs 1 --runs step0-sb3 step2-sb3 step2-fast --precisions fp32 bf16 \
    --overlap False True --seconds 9 --learning-starts 300 --warmup-steps 30 --train-only-updates 100 \
    --profile-updates 20 --timeout 120 --out "$OUT/bench1.json"
}

stage_bench8() {
  python3 scripts/bench_train.py --device cuda --n-envs 8 --runs step0-sb3 step2-fast --precisions fp32 \
    --seconds 8 --learning-starts 800 --warmup-steps 16 --train-only-updates 0 --out "$OUT/bench8.json"
}

stage_seeds3() {
  python3 scripts/bench_train.py --device cuda --n-envs 1 --concurrent 3 --runs step0-sb3 step2-fast --precisions fp32 \
    --seconds 8 --learning-starts 300 --warmup-steps 30 --train-only-updates 0 --out "$OUT/seeds3.json"
}

# train_and_follow NAME STEPS EVAL_FREQ FLAG...: a `train` run on CUDA under $RUNS_ROOT/NAME, evaluated and
# checkpointed every EVAL_FREQ steps (the probe stage asks each snapshot), whose eval curve goes to $OUT/NAME.json
# every CURVE_POLL_S while it runs (a cut run keeps what it reached) and once more at the end
train_and_follow() {
  local name=$1 steps=$2 every=$3 poller status
  shift 3
  # The poller stays off the stage's pipe: tee must not wait for it.
  ( while sleep "$CURVE_POLL_S"; do learning_curve "$name" "$steps"; done ) >/dev/null 2>&1 &
  poller=$!
  python3 scripts/ch09_pixel_push.py train --engine fast --total-steps "$steps" --eval-freq "$every" \
    --checkpoint-freq "$every" --no-eval-video --device cuda --no-progress --artifact-root "$RUNS_ROOT/$name" "$@"
  status=$?
  kill "$poller" 2>/dev/null
  return $status
}

# pixel_proxy NAME FLAG...: run NAME, the pixel proxy (Step 2's flags) with these flags on top
pixel_proxy() {
  train_and_follow "$1" "$PROXY_STEPS" 2000 --env FetchReach-v4 --critic-encoder --no-drq \
    --eval-episodes 10 --buffer-size 100000 --learning-rate "$CHECK_LEARNING_RATE" "${@:2}"
}

# The learning runs of stage learn: learn_NAME trains run NAME (header: what each asks)
learn_proxy() { pixel_proxy proxy; }
learn_proxy_bf16_overlap() { pixel_proxy proxy_bf16_overlap --precision bf16 --overlap-collection; }
learn_reach() {
  train_and_follow reach "$REACH_STEPS" 1000 --env FetchReach-v4 --full-state --replay framestack \
    --eval-episodes 20 --learning-rate "$CHECK_LEARNING_RATE"
}

# Every run of LEARN_RUNS at once, each in a subshell that records its exit status in $RUNS_ROOT/NAME.exit, its
# lines prefixed with its name. The stage's limit TERMs the runs (they save a checkpoint, then exit) and interrupts
# `wait`, not the subshells (their traps) nor the prefixing sed (TERM ignored, so a run never writes into a closed
# pipe while it saves): the stage waits until every run has exited.
stage_learn() {
  local name status=0
  for name in $LEARN_RUNS; do
    ( trap : TERM
      { trap : TERM; "learn_$name"; } 2>&1 | { trap '' TERM; exec sed -u "s/^/[$name] /"; }
      echo "${PIPESTATUS[0]}" > "$RUNS_ROOT/$name.exit" ) &
  done
  while ! wait; do :; done
  for name in $LEARN_RUNS; do
    [ "$(cat "$RUNS_ROOT/$name.exit" 2>/dev/null)" = 0 ] || { echo "learn: the $name run did not finish"; status=1; }
  done
  return $status
}
finish_learn() {
  local name
  for name in $LEARN_RUNS; do
    if [ "$name" = reach ]; then learning_curve "$name" "$REACH_STEPS"; else learning_curve "$name" "$PROXY_STEPS"; fi
  done
}

# The snapshots of each learning run that left any (a run cut by the deadline keeps those it saved), probed on CUDA,
# the runs side by side
stage_probe() {
  local name pid snapshots status=0
  for name in $LEARN_RUNS; do
    snapshots=("$RUNS_ROOT/$name"/checkpoints/*_steps.zip)
    if [ ! -f "${snapshots[0]}" ]; then
      echo "probe: the $name run left no snapshots"
      continue
    fi
    python3 scripts/reach_probe.py "${snapshots[@]}" --device cuda --out "$OUT/${name}_probe.json" &
  done
  for pid in $(jobs -p); do wait "$pid" || status=1; done
  return $status
}

# learning_curve NAME STEPS: the eval success so far of run NAME, from its TensorBoard folder, into $OUT/NAME.json
# (atomically), with the run's own training curves beside it (TRAINING_TAGS): a policy that succeeds on its
# training episodes but not in eval, or an entropy coefficient or critic loss gone astray, tells why a curve is flat
learning_curve() {
  local side_by_side
  side_by_side=$(wc -w <<< "$LEARN_RUNS")
  python3 - "$RUNS_ROOT/$1" "$OUT/$1.json" "$2" "$side_by_side" <<'PY' 2>>"$LOG"
import json, os, sys
from pathlib import Path
TRAINING_TAGS = ("rollout/success_rate", "train/ent_coef", "train/critic_loss")
root, out, steps, side_by_side = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
run_dirs = sorted(root.glob("runs/*/FetchReach-v4/seed*"))  # one run: the stage's (seed 0 unless given)
curve, training = [], {}
if run_dirs:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dirs[0]))
    events.Reload()
    scalars = events.Tags()["scalars"]
    if "eval/success_rate" in scalars:
        curve = [[e.step, e.value] for e in events.Scalars("eval/success_rate")]
    training = {tag: [[e.step, e.value] for e in events.Scalars(tag)] for tag in TRAINING_TAGS if tag in scalars}
metas = sorted(root.glob(f"checkpoints/*_{run_dirs[0].name}.meta.json")) if run_dirs else []
meta = json.loads(metas[0].read_text()) if metas else {}  # written with each checkpoint: at the end, or when cut
config = meta.get("config", {})
report = {"run": run_dirs[0].parts[-3] if run_dirs else None, "engine": config.get("engine"),
          "seed": config.get("seed"), "learning_rate": config.get("learning_rate"),
          "batch_size": config.get("batch_size"), "precision": config.get("precision"),
          "overlap_collection": config.get("overlap_collection"), "device": config.get("device"),
          "gpu": meta.get("versions", {}).get("gpu"),
          "cuda_graph": (meta.get("cuda_graph") or {}).get("state"), "total_steps": steps,
          "eval_success_rate": curve, "reaches_0.9": any(value >= 0.9 for _, value in curve), "training": training,
          "finished": bool(meta.get("steps_done", 0) >= steps), "steps_done": meta.get("steps_done"),
          "steps_per_s": meta.get("steps_per_s"), "runs_side_by_side": side_by_side,
          "wall_time_s": meta.get("wall_time_s")}
tmp = out.with_name(out.name + ".tmp")
tmp.write_text(json.dumps(report, indent=1) + "\n")
os.replace(tmp, out)
PY
}

# collect_crash_logs: every crash-*.log written since the stage began (STAGE_MARK; in repository logs/, the runs'
# artifact roots, the temp folder cli_guard falls back to), appended to the log after the stage that wrote it
collect_crash_logs() {
  local dir file
  for dir in "${CRASH_LOG_DIRS[@]}"; do
    for file in "$dir"/crash-*.log; do
      [ -f "$file" ] && [ "$file" -nt "$STAGE_MARK" ] || continue
      { printf '===== crash log %s\n' "$file"; cat "$file"; echo; } >> "$LOG"
    done
  done
}

# run_stage NAME [KEEP_S]: the stage under its limit (keeping KEEP_S for a later stage), output into the log; then
# its finish step and the crash logs
run_stage() {
  local name=$1 limit start status
  limit=$(stage_limit_s "$name" "${2:-0}")
  if [ "$limit" -lt "$MIN_STAGE_S" ]; then
    say "stage $name: skipped, $(time_left_s) s left before the deadline (estimate ${ESTIMATE_S[$name]} s)"
    skipped+=("$name")
    return 0
  fi
  say "stage $name: at most $limit s (estimate ${ESTIMATE_S[$name]} s)"
  start=$(date +%s)
  touch "$STAGE_MARK"
  export -f $(compgen -A function)
  # The trap keeps the stage's bash alive through the TERM (until its child exits), so timeout's KILL still comes
  # for a Python that survives a TERM (stuck in a CUDA or EGL call, or an env worker that ignores TERM) and holds
  # the pipe to tee: without it, bash dies at once, timeout sends no KILL, and the stage runs on to the call's end.
  timeout --signal=TERM --kill-after="$KILL_AFTER_S" "$limit" bash -c "trap : TERM; stage_$name" 2>&1 | tee -a "$LOG"
  status=${PIPESTATUS[0]}
  if declare -F "finish_$name" >/dev/null; then "finish_$name"; fi
  collect_crash_logs
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    say "stage $name: TIMED OUT after $(( $(date +%s) - start )) s (limit $limit s); its partial results are in $OUT"
    failed+=("$name")
  elif [ "$status" -ne 0 ]; then
    say "stage $name: FAILED with exit $status after $(( $(date +%s) - start )) s"
    failed+=("$name")
  else
    say "stage $name: passed in $(( $(date +%s) - start )) s"
  fi
}

run_stages() {
  failed=() skipped=()
  local stage
  for stage in "$@"; do
    # learn leaves the probe of its snapshots its estimate, when the probe is still to run
    if [ "$stage" = learn ] && [[ " $* " == *" probe "* ]]; then
      run_stage "$stage" "${ESTIMATE_S[probe]}"
    else
      run_stage "$stage"
    fi
  done
  say "done: ${#failed[@]} failed (${failed[*]:-none}), ${#skipped[@]} skipped (${skipped[*]:-none}); results in $OUT"
  [ ${#failed[@]} -eq 0 ]
}

main() {
  cd "$(dirname "$0")/.." || exit 2
  local stages=("$@") stage run known missing
  [ ${#stages[@]} -eq 0 ] && stages=("${DEFAULT_STAGES[@]}")
  for stage in "${stages[@]}"; do
    if [[ ! " ${STAGES[*]} " == *" $stage "* ]]; then
      echo "error: unknown stage '$stage'; use any of: ${STAGES[*]}." >&2
      exit 2
    fi
  done
  for run in $LEARN_RUNS; do
    if ! declare -F "learn_$run" >/dev/null; then
      known=$(declare -F | sed -n 's/^declare -f learn_//p' | xargs)
      echo "error: unknown learning run '$run' in LEARN_RUNS; use any of: $known." >&2
      exit 2
    fi
  done
  export OUT="${OUT:-results/gpu_checks}" PYTHONUNBUFFERED=1 MUJOCO_GL="${MUJOCO_GL:-egl}"
  export PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-egl}" LOG="$OUT/gpu_checks.log"
  export START_S="${GPU_CHECKS_T0:-$(date +%s)}" RUNS_ROOT LEARN_RUNS PROXY_STEPS REACH_STEPS CURVE_POLL_S \
    CHECK_LEARNING_RATE
  mkdir -p "$OUT"
  RUNS_ROOT=$(mktemp -d /tmp/gpu_runs_XXXX)
  STAGE_MARK=$(mktemp /tmp/gpu_checks_stage_XXXX)
  CRASH_LOG_DIRS=("$PWD/logs" "${TMPDIR:-/tmp}")
  for run in $LEARN_RUNS; do CRASH_LOG_DIRS+=("$RUNS_ROOT/$run/logs"); done

  say "free memory first (deadline ${DEADLINE_S} s from the call's start, $(time_left_s) s left):"
  { free -g; nvidia-smi --query-gpu=name,memory.total,memory.used,memory.free,driver_version --format=csv; } \
    2>&1 | tee -a "$LOG"
  project_on_path
  if ! missing=$(python3_lacks); then
    echo "error: python3 here cannot import ${missing}; run the prepare step in this script's header and source .gl/device_env.sh first." >&2
    exit 2
  fi
  if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: torch sees no CUDA GPU here; these checks need the lent GPU machine." >&2
    exit 2
  fi
  run_stages "${stages[@]}"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
