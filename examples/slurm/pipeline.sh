#!/usr/bin/env bash
#SBATCH --job-name=sdd-pipeline
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:30:00
#SBATCH --output=logs/%x-%j.out
# Submit a whole experiment as Slurm jobs, one per stage, chained with --dependency=afterok:
#   sbatch examples/slurm/pipeline.sh RECIPE [ROOT] [more `sdd run` options]
#   DRY_RUN=1 bash examples/slurm/pipeline.sh RECIPE     # print the sbatch chain, submit nothing
# ROOT defaults to runs/<recipe name>. Stages already done are not resubmitted, so the same
# command picks an interrupted experiment up. Per-stage resources live in examples/slurm/stage.sh;
# SBATCH_ARGS adds sbatch options to every stage job (e.g. "--account=x --partition=y").
set -euo pipefail
if [[ $# -eq 0 || "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
  sed -n '8,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
RECIPE=$1
shift
ROOT=runs/$(basename "$RECIPE" .yaml)
if [[ $# -gt 0 && "$1" != --* ]]; then
  ROOT=$1
  shift
fi
cd "${SLURM_SUBMIT_DIR:-$PWD}"
mkdir -p logs
extra=()
for arg in ${SBATCH_ARGS:-}; do extra+=(--slurm-arg="$arg"); done
dry=()
if [[ -n "${DRY_RUN:-}" ]]; then dry=(--dry-run); fi
exec sdd run "$RECIPE" --root "$ROOT" --slurm examples/slurm/stage.sh "${dry[@]}" "${extra[@]}" "$@"
