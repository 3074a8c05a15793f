#!/usr/bin/env bash
#SBATCH --job-name=sdd-stage
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# One sdd stage as one Slurm job: `sbatch [options] examples/slurm/stage.sh <sdd arguments>`,
# e.g. `sbatch examples/slurm/stage.sh distill --run runs/x` (log: sdd-stage-<job id>.out in the
# submit dir). `sdd run --slurm` (examples/slurm/pipeline.sh) submits it once per stage with the
# recipe's resources (`slurm:`, docs/slurm.md), which replace the #SBATCH defaults above (one 8-GPU
# node), and with its log in <root>/logs/. The log is appended to when the job is requeued.
#
# Training stages (SDD_STAGE_TRAINS=1) with more than one GPU start through `accelerate launch` on
# every node with ACCELERATE_CONFIG (default: examples/accelerate/zero3.yaml under the submit dir;
# also fsdp.yaml, ddp.yaml); other stages, and any stage on one GPU or on CPUs, run one process. On
# preemption (`scontrol requeue`) or 300 s before the time limit Slurm sends SIGTERM; the stage saves
# a checkpoint and exits, this script requeues the job, and the requeued job resumes the stage.
#
# Environment: ACCELERATE_CONFIG; GPUS_PER_NODE (processes per node, default 8; `sdd run` sets it from
# the recipe's gpus); MAIN_PORT (29500); set by `sdd run`: SDD_STAGE_TRAINS (default 1), SDD_DATASETS_FILE.
set -uo pipefail
if [[ $# -eq 0 || "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
  awk 'NR > 1 && /^#SBATCH/ { next } NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 0
fi
SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$SUBMIT_DIR/examples/accelerate/zero3.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${SLURM_NNODES:-1}
MAIN_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1)
MAIN_ADDR=${MAIN_ADDR:-localhost}
cd "$SUBMIT_DIR"
echo "$(date '+%F %T') job ${SLURM_JOB_ID:-?} on $(hostname -s) (restart ${SLURM_RESTART_COUNT:-0}): sdd $*"
# srun does not inherit the job's --cpus-per-task since Slurm 22.05: pass it on, or every task gets one CPU.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
  export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi
# The experiment's datasets (the toy's are written by its first job) registered in this stage's run dir.
if [[ -n "${SDD_DATASETS_FILE:-}" ]]; then
  python -m sdd.experiment.slurm "$SDD_DATASETS_FILE" "$@"
fi
# torchrun/accelerate SIGKILL workers 30 s after forwarding SIGTERM by default; a checkpoint of a
# large model needs longer.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}

if [[ "${SDD_STAGE_TRAINS:-1}" == 1 && $((NNODES * GPUS_PER_NODE)) -gt 1 ]]; then
  # SLURM_NODEID is expanded on each node by the inner shell, not here.
  launch="accelerate launch --config_file $ACCELERATE_CONFIG --num_machines $NNODES \
    --num_processes $((NNODES * GPUS_PER_NODE)) --machine_rank \$SLURM_NODEID \
    --main_process_ip $MAIN_ADDR --main_process_port ${MAIN_PORT:-29500} -m sdd"
  srun --kill-on-bad-exit=1 bash -c "$launch $(printf '%q ' "$@")" &
else
  # One process: torch would otherwise start a thread per core of the whole node.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  srun --ntasks=1 python -m sdd "$@" &
fi
child=$!
# Pass the early warning (--signal=B:TERM, sent to this shell only) on to the stage's processes through
# Slurm, then wait for the checkpoint to be written. Not to srun: srun takes a SIGTERM as "kill the step"
# and SIGKILLs the stage before it can save (measured on Slurm 22.05).
warned=""
trap 'warned=1; scancel --signal=TERM "${SLURM_JOB_ID:-0}" 2>/dev/null || kill -TERM "$child" 2>/dev/null' TERM
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
# A stage stopped by the signal (also one still starting up, which has nothing to save) is requeued and
# resumes. Only while the job is still RUNNING: that is the time-limit warning; after `scontrol requeue`
# or a preemption Slurm requeues the job itself, and after `scancel` it must stay cancelled (COMPLETING).
if [[ $status -ne 0 && ( $status -eq 75 || -n "$warned" || "$(stage_status "$@")" == interrupted ) ]]; then
  state=$(squeue -h -j "${SLURM_JOB_ID:-0}" -o %T 2>/dev/null)
  if [[ "$state" == RUNNING || -z "$state" ]]; then
    echo "$(date '+%F %T') stage stopped by the signal: requeueing job ${SLURM_JOB_ID:-?}"
    scontrol requeue "${SLURM_JOB_ID:-0}"
  else
    echo "$(date '+%F %T') stage stopped by the signal; job ${SLURM_JOB_ID:-?} is $state, Slurm requeues or ends it"
  fi
fi
echo "$(date '+%F %T') job ${SLURM_JOB_ID:-?} exits $status"
exit $status
