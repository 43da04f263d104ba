#!/usr/bin/env bash
# Run any command in the chapter's reference environment, from the repository root.
#
#   bash docker/dev.sh python scripts/labs/pixel_wrapper.py --verify
#   bash docker/dev.sh pytest
#   bash docker/dev.sh              # an interactive shell in the environment
#
# Where a Docker engine answers (`docker info`), the command runs in the image built from
# docker/Dockerfile (built once, rebuilt when the Dockerfile or requirements.txt change), with the
# repository mounted at /workspace, the GPUs passed through when the NVIDIA runtime exists, and your
# uid/gid so files written to checkpoints/, results/ and runs/ are yours, not root's.
# Otherwise it uses a local virtual environment in .venv/, created on first use and reinstalled
# only when requirements.txt or pyproject.toml change. Both install the project itself editable
# (`pip install -e .`: the ch09 package and the labs importable from any folder). DEV_MODE=docker|native
# forces one of the two.
# DEV_BASE_IMAGE names the Debian bookworm image the Dockerfile starts from (default debian:bookworm-slim),
# e.g. a local copy on a machine that cannot reach Docker Hub.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

image_name="robotics-rl-ch09"
requirements="$repo_root/requirements.txt"
project="$repo_root/pyproject.toml"

fingerprint() {  # a short hash of the files the environment is built from
  cat "$@" | sha256sum | cut -c1-12
}

docker_available() {
  command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1
}

build_image() {  # TAG BASE CMD...: one sentence, and the way out, when the image cannot be built
  local tag="$1" base="$2" log
  shift 2
  log="${TMPDIR:-/tmp}/${image_name}-build-${tag#*:}.log"
  echo "[dev.sh] building $tag from $base (once, several minutes; later runs reuse it; log: $log)" >&2
  # The context is requirements.txt, pyproject.toml and scripts/ (.dockerignore): the repository itself is
  # mounted at run time over the copy the editable install was made from.
  if ! docker build --build-arg "BASE_IMAGE=$base" -t "$tag" -f docker/Dockerfile "$repo_root" >"$log" 2>&1; then
    local reason
    reason="$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-200)"
    echo "[dev.sh] the Docker image could not be built from docker/Dockerfile on base $base (${reason:-no output}," \
         "full log: $log); without Docker run DEV_MODE=native bash docker/dev.sh $*" >&2
    exit 1
  fi
}

run_in_docker() {
  if ! docker_available; then
    echo "[dev.sh] DEV_MODE=docker, but no Docker engine answers \`docker info\`; start one, or run" \
         "DEV_MODE=native bash docker/dev.sh ${*}" >&2
    exit 1
  fi
  local base="${DEV_BASE_IMAGE:-debian:bookworm-slim}" tag
  tag="$image_name:$(fingerprint docker/Dockerfile "$requirements" "$project" <(echo "$base"))"
  if ! docker image inspect "$tag" >/dev/null 2>&1; then
    build_image "$tag" "$base" "$@"
  fi
  local -a flags=(--rm --init -v "$repo_root:/workspace" -w /workspace
                  -u "$(id -u):$(id -g)" -e HOME=/tmp -e "MUJOCO_GL=${MUJOCO_GL:-egl}"
                  --shm-size=8g)
  if docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia; then
    flags+=(--gpus all)
  fi
  if [ -t 0 ] && [ -t 1 ]; then flags+=(-it); fi
  if [ "$#" -eq 0 ]; then set -- bash; fi
  exec docker run "${flags[@]}" "$tag" "$@"
}

run_native() {
  local venv="$repo_root/.venv"
  local stamp="$venv/.requirements.sha256"
  local want
  want="$(fingerprint "$requirements" "$project")"
  if [ ! -x "$venv/bin/python" ]; then
    echo "[dev.sh] creating $venv (first use)" >&2
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[dev.sh] installing requirements.txt and the project (editable) into .venv (they changed or are new)" >&2
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    "$venv/bin/python" -m pip install -q -r "$requirements" >&2
    "$venv/bin/python" -m pip install -q --no-deps -e "$repo_root" >&2
    echo "$want" > "$stamp"
  fi
  export MUJOCO_GL="${MUJOCO_GL:-egl}"
  export PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-$MUJOCO_GL}"
  export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
  if [ "$#" -eq 0 ]; then set -- "${SHELL:-bash}"; fi
  exec "$@"
}

case "${DEV_MODE:-auto}" in
  docker) run_in_docker "$@" ;;
  native) run_native "$@" ;;
  auto) if docker_available; then run_in_docker "$@"; else run_native "$@"; fi ;;
  *) echo "[dev.sh] DEV_MODE must be 'docker', 'native' or unset (auto), not '${DEV_MODE}'." >&2; exit 2 ;;
esac
