#!/usr/bin/env bash
# Cloud TPU VM launcher: create a TPU VM (one host or a multi-host slice), install this checkout on
# every worker, run an experiment on all workers, follow the log, stop, delete.
#
#   launch/tpu.sh up     --name NAME --zone ZONE --type v4-8 [--spot] --config CFG --workdir gs://B/DIR [-- ARGS]
#   launch/tpu.sh create --name NAME --zone ZONE --type v5litepod-8 [--version V] [--spot|--preemptible]
#   launch/tpu.sh setup  --name NAME --zone ZONE          # copy `git archive HEAD`, venv if missing, pip install
#   launch/tpu.sh run    --name NAME --zone ZONE --config configs/X.py --workdir gs://B/DIR [-- --config.a=b]
#   launch/tpu.sh check  --type v5litepod-8 --config configs/X.py [-- --config.a=b]   # here, no TPU needed
#   launch/tpu.sh logs   --name NAME --zone ZONE [--worker 0]
#   launch/tpu.sh stop   --name NAME --zone ZONE          # SIGTERM: checkpoint at the next step, exit 0
#   launch/tpu.sh delete --name NAME --zone ZONE
#
# Every command accepts --dry-run (print the exact gcloud commands, run nothing) and --project P.
# Arguments after `--` go to `python -m discreteflow_jax.main` unchanged. Before it starts training,
# `run` (and so `up`) compiles the experiment for the slice on worker 0 (discreteflow_jax.compile_check
# with the same config and --config.* overrides; JAX on the CPU there, the chips stay free) and stops
# if a program does not fit the HBM or does not compile; --no-preflight skips that. `check` runs the
# same compilation on this machine (needs `pip install -e .[tpu-compile]`; $PYTHON, default python3).
# The run always passes
# --distributed=on: JAX finds the other workers of a slice through the TPU metadata server (one
# process per host), and on a single host it is a no-op. Put --workdir on GCS (gs://...): orbax
# writes checkpoints there from all hosts together, and a rerun of `run` (e.g. after a spot VM
# was reclaimed and recreated) resumes from the newest checkpoint.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
# shellcheck source=launch/common.sh
. "$HERE/common.sh"

COMMAND="${1:-}"
check_command "$COMMAND" create setup check run up logs stop status delete
shift

NAME="${TPU_NAME:-discreteflow}"
ZONE="${TPU_ZONE:-}"
TYPE="${TPU_TYPE:-v4-8}"
VERSION=""
PROJECT="${TPU_PROJECT:-}"
CAPACITY=""
CONFIG=""
WORKDIR=""
WORKER="0"
PREFLIGHT=1
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --spot) CAPACITY="--spot"; shift ;;
    --preemptible) CAPACITY="--preemptible"; shift ;;
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --worker) WORKER="$2"; shift 2 ;;
    --no-preflight) PREFLIGHT=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (see launch/tpu.sh --help)" ;;
  esac
done

# Software image by TPU generation (Cloud TPU docs, "TPU software versions").
if [ -z "$VERSION" ]; then
  case "$TYPE" in
    v4-*) VERSION="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    *) die "no default --version for --type $TYPE; pass --version" ;;
  esac
fi
# A zone that offers the generation; pass --zone for your quota.
if [ -z "$ZONE" ]; then
  case "$TYPE" in
    v4-*) ZONE="us-central2-b" ;;
    v5litepod-*|v5e-*) ZONE="us-west4-a" ;;
    v5p-*) ZONE="us-east5-a" ;;
    *) ZONE="us-east1-d" ;;
  esac
fi

GCLOUD_FLAGS=(--zone="$ZONE")
[ -z "$PROJECT" ] || GCLOUD_FLAGS+=(--project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)
# The remote shell expands $HOME, not this one.
# shellcheck disable=SC2016
REMOTE_DIR='$HOME/discreteflow_jax'
# shellcheck disable=SC2016
REMOTE_LOG='$HOME/discreteflow_run.log'
# shellcheck disable=SC2016
REMOTE_PID='$HOME/discreteflow_run.pid'
ARCHIVE="${TMPDIR:-/tmp}/discreteflow_jax.tar.gz"

on_workers() {  # on_workers WORKERS COMMAND_STRING
  run "${TPU[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker="$1" --command="$2"
}

do_create() {
  local cmd=("${TPU[@]}" create "$NAME" "${GCLOUD_FLAGS[@]}" --accelerator-type="$TYPE" --version="$VERSION")
  [ -z "$CAPACITY" ] || cmd+=("$CAPACITY")
  run "${cmd[@]}"
}

do_setup() {
  # Ships the committed tree (HEAD); uncommitted edits are not copied.
  if [ "$DRY_RUN" != 1 ] && [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]; then
    echo "warning: uncommitted changes are not shipped (git archive HEAD)" >&2
  fi
  run git -C "$REPO" archive --format=tar.gz -o "$ARCHIVE" HEAD
  run "${TPU[@]}" scp "$ARCHIVE" "$NAME:discreteflow_jax.tar.gz" "${GCLOUD_FLAGS[@]}" --worker=all
  local jax_tpu
  jax_tpu="$(jax_spec tpu)"
  # Idempotent: unpack over the old copy, create the venv only if missing, pip skips what is installed.
  on_workers all "set -e; mkdir -p $REMOTE_DIR; tar -xzf \$HOME/discreteflow_jax.tar.gz -C $REMOTE_DIR; \
cd $REMOTE_DIR; [ -x .venv/bin/python ] || python3 -m venv .venv || \
{ sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && python3 -m venv .venv; }; \
.venv/bin/pip install -q -U pip; .venv/bin/pip install -q -e . \"$jax_tpu\" gcsfs google-cloud-storage; \
.venv/bin/python -c \"import jax; print(jax.local_device_count(), jax.local_devices()[0].device_kind)\""
}

# The compile_check command line for this slice: the config and only the --config.* overrides of
# EXTRA (main's other flags, e.g. --data_dir, mean nothing to a compilation).
check_args() {
  local arg
  CHECK_ARGS=(--topology="$TYPE" --config="$CONFIG")
  for arg in "${EXTRA[@]}"; do
    case "$arg" in
      --config.*) CHECK_ARGS+=("$arg") ;;
    esac
  done
}

do_check() {
  [ -n "$CONFIG" ] || die "check needs --config (e.g. configs/fineweb_baseline.py)"
  check_args
  run "${PYTHON:-python3}" -m discreteflow_jax.compile_check "${CHECK_ARGS[@]}"
}

do_preflight() {
  check_args
  # Exit status 1 (a program does not fit) stops this script before any training starts.
  on_workers 0 "cd $REMOTE_DIR && .venv/bin/python -m discreteflow_jax.compile_check $(quote_args "${CHECK_ARGS[@]}") \
|| { echo 'pre-flight compilation failed: change the config as above, or pass --no-preflight'; exit 1; }"
}

do_run() {
  [ -n "$CONFIG" ] || die "run needs --config (e.g. configs/fineweb_baseline.py)"
  [ -n "$WORKDIR" ] || die "run needs --workdir (gs://BUCKET/DIR, shared by all workers)"
  case "$WORKDIR" in
    gs://*) ;;
    *) echo "warning: --workdir $WORKDIR is not on GCS; a multi-host slice needs a folder every worker sees" >&2 ;;
  esac
  [ "$PREFLIGHT" != 1 ] || do_preflight
  local args
  args="$(quote_args --distributed=on --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}")"
  # nohup + no stdin: the ssh session may end; the PID file lets `stop` signal exactly this process.
  on_workers all "cd $REMOTE_DIR && PYTHONUNBUFFERED=1 nohup .venv/bin/python -m discreteflow_jax.main $args \
> $REMOTE_LOG 2>&1 < /dev/null & echo \$! > $REMOTE_PID; echo started on \$(hostname)"
}

case "$COMMAND" in
  create) do_create ;;
  setup) do_setup ;;
  check) do_check ;;
  run) do_run ;;
  up) do_create; do_setup; do_run ;;
  logs) on_workers "$WORKER" "tail -n 200 -F $REMOTE_LOG" ;;
  stop) on_workers all "kill -TERM \$(cat $REMOTE_PID) && echo sent SIGTERM on \$(hostname)" ;;
  status) run "${TPU[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}" ;;
  delete) run "${TPU[@]}" delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet ;;
esac
