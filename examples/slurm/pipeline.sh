#!/usr/bin/env bash
#SBATCH --job-name=sdd-pipeline
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# Submit a whole experiment as Slurm jobs, one per stage, chained with --dependency=afterok:
#   bash examples/slurm/pipeline.sh RECIPE [ROOT] [more `sdd run` options]     # from a login node
#   sbatch examples/slurm/pipeline.sh RECIPE [ROOT] ...     # the same as a job (log: sdd-pipeline-<id>.out here)
#   DRY_RUN=1 bash examples/slurm/pipeline.sh RECIPE        # print the sbatch chain, submit nothing
# ROOT defaults to runs/<recipe name>. Each job asks for the recipe's resources (`slurm:`; the toy
# uses the cpu profile, other recipes one 8-GPU node per training stage; `--slurm-profile cpu|gpu`
# picks one) and logs to ROOT/logs/<job>-<id>.out. Rerun the same command at any time: jobs done,
# queued or running are not submitted again, only what is missing, after the jobs it needs; a last
# job builds ROOT/report. SBATCH_ARGS adds sbatch options to every job (e.g. "--account=x").
# Details: docs/slurm.md.
set -euo pipefail
if [[ $# -eq 0 || "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
  awk 'NR > 1 && /^#SBATCH/ { next } NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
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
# The stage script beside this one; under sbatch this file is a copy in Slurm's spool, so ask Slurm
# where the original is.
if [[ -z "${STAGE_SCRIPT:-}" ]]; then
  here=$(dirname "${BASH_SOURCE[0]}")
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    here=$(dirname "$(scontrol show job -o "$SLURM_JOB_ID" | sed -n 's/.* Command=\([^ ]*\).*/\1/p')")
  fi
  STAGE_SCRIPT=$(cd "$here" && pwd)/stage.sh
fi
extra=()
for arg in ${SBATCH_ARGS:-}; do extra+=(--slurm-arg="$arg"); done
dry=()
if [[ -n "${DRY_RUN:-}" ]]; then dry=(--dry-run); fi
exec python -m sdd run "$RECIPE" --root "$ROOT" --slurm "$STAGE_SCRIPT" "${dry[@]}" "${extra[@]}" "$@"
