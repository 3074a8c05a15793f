"""`sdd run --slurm SCRIPT`: the plan as a chain of sbatch jobs, each depending on what it needs."""

from __future__ import annotations

import shlex
import subprocess

from sdd.errors import SddError
from sdd.experiment.execute import is_done, register_datasets
from sdd.experiment.recipe import Job


def submit_slurm(jobs: list[Job], datasets: dict[str, str], script: str, *, dry_run: bool,
                 extra: list[str]) -> None:
    """One sbatch per job, each depending (afterok) on the jobs it needs; done jobs are not resubmitted."""
    ids: dict[str, str] = {}
    for job in jobs:
        if not dry_run and is_done(job):
            continue
        deps = [ids[d] for d in job.after if d in ids]
        command = ["sbatch", "--parsable", f"--job-name=sdd:{job.id}", *extra]
        if deps:
            command.append("--dependency=afterok:" + ":".join(deps))
        command += ["--export=ALL,SDD_STAGE_TRAINS=" + ("1" if job.trains else "0"), script, *job.argv]
        if dry_run:
            ids[job.id] = f"<{job.id}>"
            print(shlex.join(command))
            continue
        register_datasets(job.run_dir, datasets)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise SddError(f"sbatch refused {job.id}: {result.stderr.strip() or result.stdout.strip()}")
        ids[job.id] = result.stdout.strip().split(";")[0]
        print(f"{ids[job.id]}  {job.id}")
