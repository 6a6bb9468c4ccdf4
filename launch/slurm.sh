#!/usr/bin/env bash
# Several GPU nodes under SLURM: submits itself with sbatch; inside the job, `srun` starts the
# processes and JAX detects SLURM (coordinator = first node, process ids from SLURM_PROCID).
#
#   launch/slurm.sh --nodes 2 --gpus-per-node 8 --config configs/X.py --workdir DIR \
#       [--per-gpu] [--partition P] [--account A] [--time 24:00:00] [--venv DIR] [--dry-run] [-- ARGS]
#
# One process per node (default): each process drives all GPUs of its node
# (JAX_LOCAL_DEVICE_IDS lists them; JAX would otherwise give each SLURM task one GPU).
# --per-gpu: one process per GPU (--ntasks-per-node = GPUs); each task sees every GPU of its
# node and JAX picks GPU number SLURM_LOCALID. Both give the same mesh and the same results.
#
# Preemption: sbatch --signal=TERM@120 delivers SIGTERM to every task 120 s before the time
# limit (scancel and preemption send it too); the run checkpoints at the next agreed step and
# exits 0. Submit the same command again (or add --requeue for preemptible partitions) to
# resume from the newest checkpoint in --workdir, which must be on a filesystem every node sees.
# The venv (default: .venv of this checkout, shared filesystem) is made by `launch/gpu.sh setup`.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
# shellcheck source=launch/common.sh
. "$HERE/common.sh"

NODES=1
GPUS_PER_NODE=8
PER_GPU=0
PARTITION=""
ACCOUNT=""
TIME="24:00:00"
VENV="$REPO/.venv"
CONFIG=""
WORKDIR=""
IN_JOB=0
REQUEUE=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --gpus-per-node) GPUS_PER_NODE="$2"; shift 2 ;;
    --per-gpu) PER_GPU=1; shift ;;
    --partition) PARTITION="$2"; shift 2 ;;
    --account) ACCOUNT="$2"; shift 2 ;;
    --time) TIME="$2"; shift 2 ;;
    --requeue) REQUEUE=1; shift ;;
    --venv) VENV="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --in-job) IN_JOB=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (see launch/slurm.sh --help)" ;;
  esac
done
[ -n "$CONFIG" ] || die "needs --config (e.g. configs/fineweb_baseline.py)"
[ -n "$WORKDIR" ] || die "needs --workdir (on a filesystem every node sees)"

TASKS_PER_NODE=1
[ "$PER_GPU" = 0 ] || TASKS_PER_NODE="$GPUS_PER_NODE"
MAIN=("$VENV/bin/python" -m discreteflow_jax.main --distributed=auto --config="$CONFIG" --workdir="$WORKDIR"
      "${EXTRA[@]}")

if [ "$IN_JOB" = 1 ]; then
  # Inside the allocation (the batch script's shell on the first node).
  cd "$REPO"
  export PYTHONUNBUFFERED=1
  if [ "$PER_GPU" = 0 ]; then
    JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((GPUS_PER_NODE - 1)))"
    export JAX_LOCAL_DEVICE_IDS
    echo "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"
  fi
  run srun --kill-on-bad-exit=1 --ntasks-per-node="$TASKS_PER_NODE" "${MAIN[@]}"
  exit 0
fi

SBATCH=(sbatch --job-name=discreteflow --nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE"
        --gpus-per-node="$GPUS_PER_NODE" --time="$TIME" --signal=TERM@120 --output="$WORKDIR/slurm-%j.out")
[ -z "$PARTITION" ] || SBATCH+=(--partition="$PARTITION")
[ -z "$ACCOUNT" ] || SBATCH+=(--account="$ACCOUNT")
[ "$REQUEUE" = 0 ] || SBATCH+=(--requeue)
JOB_ARGS=(--in-job --nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE" --venv "$VENV" --config "$CONFIG"
          --workdir "$WORKDIR")
[ "$PER_GPU" = 0 ] || JOB_ARGS+=(--per-gpu)
run mkdir -p "$WORKDIR"
# --wrap runs this script from its checkout (a submitted script would run from SLURM's spool folder).
run "${SBATCH[@]}" --wrap="$(quote_args "$HERE/slurm.sh" "${JOB_ARGS[@]}" -- "${EXTRA[@]}")"
if [ "$DRY_RUN" = 1 ]; then
  echo "# inside the job, on the first node:"
  TASKS=$((NODES * TASKS_PER_NODE))
  [ "$PER_GPU" = 1 ] || echo "+ export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS_PER_NODE - 1)))"
  printf '+ %s   # %s processes\n' "$(quote_args srun --kill-on-bad-exit=1 --ntasks-per-node="$TASKS_PER_NODE" \
    "${MAIN[@]}")" "$TASKS"
fi
