#!/usr/bin/env bash
# The GPU checks of the fast update engine (issue 11), as one script for a session lent a GPU machine.
# Every result lands under $OUT (the device tool brings back at most 8 files): gpu_checks.log (all output),
# bench1.json, bench8.json, seeds.json (scripts/bench_train.py) and proxy.json (the learning proxy).
#
# Prepare once, on the CPU machine, from the repository root (wheels the GPU image lacks, EGL loaders):
#   EXTRA_WHEELS="tyro docstring-parser typeguard typing-extensions pytest pluggy iniconfig" \
#     bash ../shared/device/prepare.sh
# Then call the device tool with carry [".whl", ".gl"], each call under its 10-minute limit, e.g.
#   source .gl/device_env.sh && bash scripts/gpu_checks.sh tests bench1 seeds
#   source .gl/device_env.sh && bash scripts/gpu_checks.sh bench8 proxy
#
# Stages (each one bounded by its own timeout below; give them in any order, default: all of them):
#   tests   pytest -m gpu tests/test_fast_sac.py: the captured step equals the eager one, bf16 tracks fp32
#   bench1  pixels, 1 env:  Step 0 stock, Step 2 stock, Step 2 FastSAC in fp32 and bf16
#   bench8  pixels, 8 envs: Step 0 stock, Step 2 FastSAC in fp32 and bf16
#   seeds   Step 2 FastSAC, 1 env, 1 to 4 processes side by side (their env steps/s summed)
#   proxy   pixel FetchReach-v4 through the production script, --engine fast by default: the eval success
#           curve over 20K steps (the issue's bar: >= 0.9). PROXY_ENGINES="fast sb3" adds the stock engine,
#           which trains several times slower: give it a call of its own.
# BENCH_SECONDS (default 20) sets the timed seconds of every benchmark measurement.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-results/gpu_checks}"
LOG="$OUT/gpu_checks.log"
BENCH_SECONDS="${BENCH_SECONDS:-20}"
PROXY_ENGINES="${PROXY_ENGINES:-fast}"
PROXY_STEPS=20000
export PYTHONUNBUFFERED=1 MUJOCO_GL="${MUJOCO_GL:-egl}" PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-egl}"

say() { echo "[gpu_checks $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

# stage_timeout_s name: a bound per stage, so one stuck stage cannot eat the whole device budget.
stage_timeout_s() {
  case "$1" in
    tests) echo 300 ;; bench1) echo 420 ;; bench8) echo 420 ;; seeds) echo 420 ;; proxy) echo 540 ;;
  esac
}

bench() {  # bench <json name> <bench_train.py flags...>
  local name="$1"; shift
  python3 scripts/bench_train.py --device cuda --seconds "$BENCH_SECONDS" --out "$OUT/$name.json" "$@"
}

proxy() {
  local engine root
  for engine in $PROXY_ENGINES; do
    root=$(mktemp -d /tmp/gpu_proxy_XXXX)
    say "proxy: pixel FetchReach-v4, --engine $engine, $PROXY_STEPS steps"
    python3 scripts/ch09_pixel_push.py train --env FetchReach-v4 --critic-encoder --no-drq --engine "$engine" \
      --total-steps "$PROXY_STEPS" --eval-freq 2000 --eval-episodes 20 --checkpoint-freq "$PROXY_STEPS" \
      --buffer-size 100000 --device cuda --no-progress --artifact-root "$root" || return 1
    python3 - "$root" "$engine" "$OUT/proxy.json" <<'PY'
import json, sys
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
root, engine, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
run_dir = next(root.glob("runs/*/FetchReach-v4/seed0"))
events = EventAccumulator(str(run_dir)); events.Reload()
curve = [(e.step, e.value) for e in events.Scalars("eval/success_rate")]
meta = json.loads(next(root.glob("checkpoints/*_seed0.meta.json")).read_text())
report = json.loads(out.read_text()) if out.exists() else {}
report[engine] = {"eval_success_rate": curve, "steps_per_s": meta["steps_per_s"],
                  "wall_time_s": meta["wall_time_s"], "reaches_0.9": any(v >= 0.9 for _, v in curve)}
out.write_text(json.dumps(report, indent=1) + "\n")
print(f"proxy {engine}: success curve {curve}, {meta['steps_per_s']} steps/s")
PY
  done
}

run_stage() {
  case "$1" in
    tests) python3 -m pytest -m gpu tests/test_fast_sac.py -q -p no:cacheprovider ;;
    bench1) bench bench1 --n-envs 1 --runs step0-sb3 step2-sb3 step2-fast --precisions fp32 bf16 ;;
    bench8) bench bench8 --n-envs 8 --runs step0-sb3 step2-fast --precisions fp32 bf16 ;;
    seeds) bench seeds --n-envs 1 --runs step2-fast --concurrent 1 2 3 4 ;;
    proxy) proxy ;;
  esac
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests bench1 bench8 seeds proxy)
for stage in "${stages[@]}"; do
  if [ -z "$(stage_timeout_s "$stage")" ]; then
    echo "error: unknown stage '$stage'; use any of: tests bench1 bench8 seeds proxy." >&2
    exit 2
  fi
done
missing=$(python3 - <<'PY'
import importlib.util
need = ["torch", "gymnasium", "gymnasium_robotics", "mujoco", "stable_baselines3", "tyro", "tensorboard"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  echo "error: python3 here lacks ${missing}; run the prepare step in this script's header and source .gl/device_env.sh first." >&2
  exit 2
fi
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: torch sees no CUDA GPU here; these checks need the lent GPU machine." >&2
  exit 2
fi


mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
failed=()
for stage in "${stages[@]}"; do
  say "stage $stage (at most $(stage_timeout_s "$stage") s)"
  start=$(date +%s)
  export -f run_stage bench proxy say
  export OUT LOG BENCH_SECONDS PROXY_ENGINES PROXY_STEPS
  timeout --signal=TERM --kill-after=30 "$(stage_timeout_s "$stage")" bash -c "run_stage $stage" 2>&1 | tee -a "$LOG"
  status=${PIPESTATUS[0]}
  say "stage $stage: exit $status after $(( $(date +%s) - start )) s"
  [ "$status" -eq 0 ] || failed+=("$stage")
done
if [ ${#failed[@]} -gt 0 ]; then
  say "failed stages: ${failed[*]}"
  exit 1
fi
say "all stages passed; results in $OUT"
