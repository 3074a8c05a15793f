#!/usr/bin/env bash
#SBATCH --job-name=sdd-stage
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@300
#SBATCH --output=logs/%x-%j.out
# One sdd stage as one Slurm job: `sbatch [options] examples/slurm/stage.sh <sdd arguments>`,
# e.g. `sbatch examples/slurm/stage.sh distill --run runs/x`. `sdd run --slurm` submits it once
# per stage, chained with --dependency=afterok.
#
# Training stages (SDD_STAGE_TRAINS=1, set by `sdd run`) start through `accelerate launch` on every
# node with ACCELERATE_CONFIG (default: examples/accelerate/zero3.yaml under the submit dir; also
# fsdp.yaml, ddp.yaml). Eval runs one process. On preemption or time limit Slurm sends SIGTERM 300 s
# early; the stage saves a checkpoint, exits 75, and this script requeues the job, which resumes.
#
# Environment: ACCELERATE_CONFIG, GPUS_PER_NODE (default 8), MAIN_PORT (29500), SDD_STAGE_TRAINS.
set -uo pipefail
if [[ $# -eq 0 || "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
  sed -n '11,22p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$SUBMIT_DIR/examples/accelerate/zero3.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${SLURM_NNODES:-1}
MAIN_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1)
MAIN_ADDR=${MAIN_ADDR:-localhost}
cd "$SUBMIT_DIR"
mkdir -p logs
# torchrun/accelerate SIGKILL workers 30 s after forwarding SIGTERM by default; a checkpoint of a
# large model needs longer.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}

if [[ "${SDD_STAGE_TRAINS:-1}" == 1 ]]; then
  # SLURM_NODEID is expanded on each node by the inner shell, not here.
  launch="accelerate launch --config_file $ACCELERATE_CONFIG --num_machines $NNODES \
    --num_processes $((NNODES * GPUS_PER_NODE)) --machine_rank \$SLURM_NODEID \
    --main_process_ip $MAIN_ADDR --main_process_port ${MAIN_PORT:-29500} -m sdd"
  srun --kill-on-bad-exit=1 bash -c "$launch $(printf '%q ' "$@")" &
else
  srun --ntasks=1 python -m sdd "$@" &
fi
child=$!
# Forward the early-warning SIGTERM to the stage, then wait for its checkpoint to be written.
trap 'kill -TERM "$child" 2>/dev/null' TERM
wait "$child"
status=$?
if kill -0 "$child" 2>/dev/null; then wait "$child"; status=$?; fi
# Launchers exit 1 whatever their workers exited with, so ask the manifest whether the stage stopped
# cleanly on the signal (status "interrupted") rather than trusting the exit code alone.
stage_status() {
  local run="" name="" prev=""
  for arg in "$@"; do
    [[ "$prev" == "--run" ]] && run=$arg
    [[ "$prev" == "--name" ]] && name=$arg
    prev=$arg
  done
  [[ -z "$name" ]] && name=$1
  python -c 'import json,sys; print(json.load(open(sys.argv[1] + "/manifest.json"))["stages"].get(sys.argv[2], {}).get("status", ""))' \
    "$run" "$name" 2>/dev/null
}
if [[ $status -eq 75 || ( $status -ne 0 && "$(stage_status "$@")" == interrupted ) ]]; then
  echo "stage interrupted with its checkpoint saved: requeueing job ${SLURM_JOB_ID:-?}"
  scontrol requeue "${SLURM_JOB_ID}"
fi
exit $status
