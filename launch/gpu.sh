#!/usr/bin/env bash
# One GPU node, all its GPUs driven by one process (JAX's single-controller view of a node).
#
#   launch/gpu.sh setup [--cuda 12|13] [--venv DIR]          # venv if missing, pip install -e . jax[cudaXX]
#   launch/gpu.sh run --config configs/X.py --workdir DIR [--gpus 0,1,2,3] [--background] [-- ARGS]
#   launch/gpu.sh logs --workdir DIR                         # follow the log of a --background run
#   launch/gpu.sh stop --workdir DIR                         # SIGTERM: checkpoint at the next step, exit 0
#
# Every command accepts --dry-run (print the exact commands, run nothing). Arguments after `--`
# go to `python -m discreteflow_jax.main` unchanged. Run from the repository root (config paths
# are relative to it). Rerunning `run` with the same --workdir resumes from its newest
# checkpoint. For several nodes use launch/slurm.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
# shellcheck source=launch/common.sh
. "$HERE/common.sh"

COMMAND="${1:-}"
check_command "$COMMAND" setup run logs stop
shift

CUDA="12"
VENV="$REPO/.venv"
CONFIG=""
WORKDIR=""
GPUS=""
BACKGROUND=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) CUDA="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --gpus) GPUS="$2"; shift 2 ;;
    --background) BACKGROUND=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (see launch/gpu.sh --help)" ;;
  esac
done

need_workdir() {
  [ -n "$WORKDIR" ] || die "$COMMAND needs --workdir"
}

case "$COMMAND" in
  setup)
    # Idempotent: the venv is created only when missing; pip skips what is already installed.
    if [ ! -x "$VENV/bin/python" ]; then
      run python3 -m venv "$VENV"
    fi
    run "$VENV/bin/pip" install -q -U pip
    run "$VENV/bin/pip" install -q -e "$REPO" "$(jax_spec "cuda$CUDA")"
    run "$VENV/bin/python" -c "import jax; print(jax.device_count(), jax.devices()[0].device_kind)"
    ;;
  run)
    [ -n "$CONFIG" ] || die "run needs --config (e.g. configs/fineweb_baseline.py)"
    need_workdir
    cmd=(env PYTHONUNBUFFERED=1)
    [ -z "$GPUS" ] || cmd+=(CUDA_VISIBLE_DEVICES="$GPUS")
    # --distributed=off: one process owns every visible GPU, even inside a multi-task SLURM allocation.
    cmd+=("$VENV/bin/python" -m discreteflow_jax.main --distributed=off --config="$CONFIG" --workdir="$WORKDIR"
          "${EXTRA[@]}")
    if [ "$BACKGROUND" = 1 ]; then
      run mkdir -p "$WORKDIR"
      printf '+ %s > %s 2>&1 < /dev/null &  (PID in %s)\n' "$(quote_args nohup "${cmd[@]}")" \
        "$(shell_quote "$WORKDIR/run.log")" "$(shell_quote "$WORKDIR/run.pid")"
      if [ "$DRY_RUN" != 1 ]; then
        nohup "${cmd[@]}" > "$WORKDIR/run.log" 2>&1 < /dev/null &
        echo $! > "$WORKDIR/run.pid"
        echo "started (PID $!); follow with: launch/gpu.sh logs --workdir $WORKDIR"
      fi
    else
      run "${cmd[@]}"
    fi
    ;;
  logs)
    need_workdir
    run tail -n 200 -F "$WORKDIR/run.log"
    ;;
  stop)
    need_workdir
    if [ "$DRY_RUN" = 1 ]; then
      run kill -TERM "<PID from $WORKDIR/run.pid>"
    else
      run kill -TERM "$(cat "$WORKDIR/run.pid")"
    fi
    ;;
esac
