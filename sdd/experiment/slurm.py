"""`sdd run --slurm SCRIPT`: the plan as sbatch jobs chained by afterok, submitted so that reruns are safe.

Every job is named `sdd-<tag>-<job id>`, where the tag is a short hash of the experiment root (two
experiments never share names) and the job id has `/` and `:` made safe for names and file names
(`rl-teacher-bridge/seed0:warmup` -> `rl-teacher-bridge.seed0.warmup`). Its log is
`<root>/logs/<that id>-<slurm id>.out`, created here before sbatch, appended to across requeues.

Rerunning the same command is how an experiment is continued: a job whose records the manifests say
are done is skipped; one that Slurm has queued or running under its name is kept, and the jobs
submitted now depend on it (afterok); only the rest is submitted. A queued job that could never
start (its dependency failed, or was just resubmitted) is cancelled and submitted again. Last comes
one `sdd report` job after all of them.

The recipe's datasets (the toy's are written by its first job) are registered in a job's run dir
when the job starts, as `sdd run` does before each job: stage.sh runs this module first
(`python -m sdd.experiment.slurm DATASETS_FILE <stage argv>`).
"""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from sdd.errors import SddError
from sdd.experiment.execute import is_done, register_datasets
from sdd.experiment.recipe import Job, Recipe, sbatch_resource_args, slurm_resources
from sdd.manifest import StageLock, atomic_write_text

REPORT = "report"


def experiment_tag(root: Path) -> str:
    return hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:6]


def safe_id(job_id: str) -> str:
    """A job id as a Slurm job name part and a file name: no '/', no ':', nothing a shell would split."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", job_id.replace("/", ".").replace(":", "."))


def job_name(tag: str, job_id: str) -> str:
    return f"sdd-{tag}-{safe_id(job_id)}"


@dataclasses.dataclass
class Queued:
    """A job Slurm still has pending or running."""

    slurm_id: str
    state: str
    reason: str

    @property
    def can_start(self) -> bool:
        return self.reason != "DependencyNeverSatisfied"


def queued_jobs(tag: str, *, required: bool) -> dict[str, Queued]:
    """This user's pending and running jobs of this experiment, by name (squeue; no accounting needed)."""
    try:
        done = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-t", "all", "-o", "%i|%j|%T|%r"],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        if required:
            raise SddError(f"cannot ask Slurm what is queued (squeue: {err}); run this where squeue works") from None
        return {}
    if done.returncode != 0:
        if required:
            raise SddError(f"cannot ask Slurm what is queued: squeue said {done.stderr.strip() or done.returncode}")
        return {}
    queue: dict[str, Queued] = {}
    for line in done.stdout.splitlines():
        slurm_id, name, state, reason = (line.split("|", 3) + ["", "", ""])[:4]
        if name.startswith(f"sdd-{tag}-") and state in StageLock.SLURM_ACTIVE:
            queue.setdefault(name, Queued(slurm_id, state, reason))
    return queue


def submit_slurm(jobs: list[Job], datasets: dict[str, str], script: str, *, root: Path, recipe: Recipe,
                 profile: str | None, dry_run: bool, extra: list[str]) -> None:
    """Submit what is neither done nor queued, each job depending (afterok) on the ones it needs."""
    root = Path(root).resolve()
    slurm_resources(recipe, REPORT, profile)  # a wrong --slurm-profile is an error even when nothing is left to submit
    tag = experiment_tag(root)
    names = {job.id: job_name(tag, job.id) for job in jobs}
    clash = {n for n in names.values() if list(names.values()).count(n) > 1}
    if clash:
        same = [j for j, n in names.items() if n in clash]
        raise SddError(f"jobs {same[0]} and {same[1]} get the same Slurm name; rename one variant")
    logs = root / "logs"
    datasets_file = root / "plan" / "slurm-datasets.json"
    if "," in str(root):
        raise SddError(f"{root} has a comma in it, which sbatch --export cannot carry; choose another --root")
    if not dry_run:
        logs.mkdir(parents=True, exist_ok=True)  # sbatch opens --output before the job runs: it must exist
        atomic_write_text(datasets_file, json.dumps(datasets, indent=1, sort_keys=True) + "\n")
    queue = queued_jobs(tag, required=not dry_run)
    ids: dict[str, str] = {}  # job id -> slurm id of every job still to finish, queued or submitted now
    fresh: set[str] = set()
    counts = {"done": 0, "queued": 0, "submitted": 0}

    def submit(job_id: str, name: str, kind: str, argv: list[str], after: list[str], trains: bool) -> None:
        queued = queue.get(name)
        if queued and queued.can_start and not set(after) & fresh:
            ids[job_id] = queued.slurm_id
            counts["queued"] += 1
            print(f"{queued.slurm_id}  {job_id}  already {queued.state.lower()}")
            return
        if queued:  # its afterok names a job that failed or was replaced just now: it would never start
            cancel = ["scancel", queued.slurm_id]
            if dry_run:
                print(shlex.join(cancel))
            else:
                subprocess.run(cancel, capture_output=True, text=True, timeout=120)
        resources = slurm_resources(recipe, kind, profile)
        processes = (resources.get("gpus") or 1) if trains else 1
        command = ["sbatch", "--parsable", f"--job-name={name}",
                   f"--output={logs / (safe_id(job_id) + '-%j.out')}", "--open-mode=append",
                   "--kill-on-invalid-dep=yes", *sbatch_resource_args(resources), *extra]
        deps = [ids[d] for d in after if d in ids]
        if deps:
            command.append("--dependency=afterok:" + ":".join(deps))
        command += [f"--export=ALL,SDD_STAGE_TRAINS={int(trains)},GPUS_PER_NODE={processes},"
                    f"SDD_DATASETS_FILE={datasets_file}", script, *argv]
        if dry_run:
            ids[job_id] = f"<{job_id}>"
            print(shlex.join(command))
            return
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise SddError(f"sbatch refused {job_id}: {result.stderr.strip() or result.stdout.strip()} "
                           "(rerun the same command after fixing it: what was submitted is kept)")
        ids[job_id] = result.stdout.strip().split(";")[0]
        fresh.add(job_id)
        counts["submitted"] += 1
        print(f"{ids[job_id]}  {job_id}  submitted")

    for job in jobs:
        if is_done(job):
            counts["done"] += 1
            continue
        if not dry_run:
            register_datasets(job.run_dir, datasets)
        submit(job.id, names[job.id], job.stage, job.argv, job.after, job.trains)
    # The report reads every run dir under the root: after everything still to finish, or alone when nothing
    # is left to run but it was never built.
    if ids or not (root / REPORT / "report.json").is_file():
        submit(REPORT, job_name(tag, REPORT), REPORT, [REPORT, str(root)], sorted(ids), trains=False)
    if not dry_run:
        print(f"{counts['submitted']} submitted, {counts['queued']} already queued or running, {counts['done']} done; "
              f"jobs named sdd-{tag}-*, logs in {logs}")


def register_for_job(datasets_file: Path, argv: list[str]) -> None:
    """At a job's start: the experiment's datasets in the run dir its argv names (`--run`), if any."""
    if "--run" in argv[:-1] and Path(datasets_file).is_file():
        register_datasets(Path(argv[argv.index("--run") + 1]), json.loads(Path(datasets_file).read_text()))


if __name__ == "__main__":
    register_for_job(Path(sys.argv[1]), sys.argv[2:])
