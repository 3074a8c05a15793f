"""sdd on a real Slurm (issue 14): examples/slurm/pipeline.sh and stage.sh against a single-node cluster.

The cluster is tests/slurm_cluster.py (Debian's slurmctld, slurmd and munge, started and stopped here;
skips with the reason where it cannot run). Every job is a real sbatch job running real sdd stages
on the toy, at sizes a shared 2-core CPU runs in minutes (TINY below); each job asks for one CPU, so
two run side by side on the node's two. One thing is sped up: Slurm holds a requeued job ~2 minutes
(its BeginTime) before starting it again; the requeue test releases it at once
(`scontrol update StartTime=now`), which changes when it starts, not what it runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import set_tiny
from slurm_cluster import SlurmCluster, Unavailable

from sdd.errors import SddError
from sdd.manifest import RunDir

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "examples" / "slurm" / "pipeline.sh"
STAGE = REPO / "examples" / "slurm" / "stage.sh"
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
# One variant's whole chain in ~12 jobs of ~20-40 s each (most of it is importing torch).
TINY = {
    "toy": True, "bootstrap": True, "train_dataset": "toy-train", "benchmarks": ["toy-test"], "seeds": 1,
    "variants": ["rl-teacher-bridge"],
    "eval": {"samples": 2, "max_new_tokens": 48, "limit": 24},
    "slurm": {"all": {"cpus": 1, "mem": "2G", "time": "00:20:00"}},
    "stages": {
        "sft": {"max_steps": 4, "per_device_train_batch_size": 8, "logging_steps": 2, "save_steps": 2, "limit": 64,
                "warmup_steps": 0},
        "sft-teacher": {"max_steps": 4}, "sft-student": {"max_steps": 4},
        "teacher-rl": {"max_steps": 2, "per_device_train_batch_size": 16, "num_generations": 8,
                       "max_completion_length": 48, "logging_steps": 1, "save_steps": 1, "limit": 32},
        "warmup": {"prompts": 24, "samples_per_prompt": 1, "max_new_tokens": 48, "max_steps": 3,
                   "per_device_train_batch_size": 8, "logging_steps": 1, "save_steps": 3},
        "distill": {"max_steps": 3, "per_device_train_batch_size": 8, "max_completion_length": 48,
                    "logging_steps": 1, "save_steps": 3, "limit": 32},
    },
}
PROGRESS_LINE = re.compile(r"^(?P<label>[\w.-]+): step (?P<step>\d+)/(?P<total>\d+) \(\d+%\)  .*elapsed \S+  eta \S+$")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        slurm.start()
    except Unavailable as why:
        pytest.skip(str(why))
    yield slurm
    slurm.stop()


def job_env(cluster: SlurmCluster, **extra: str) -> dict:
    """What a user's shell has on a login node: Slurm's config, the Python holding sdd first on PATH."""
    return {**cluster.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def write_recipe(path: Path, **changes) -> Path:
    recipe = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        recipe[key] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


def pipeline(cluster: SlurmCluster, recipe: Path, root: Path, *args: str, **env: str) -> dict[str, str]:
    """`bash examples/slurm/pipeline.sh` as a user runs it; returns {job id: slurm id} of what it submitted."""
    done = subprocess.run(["bash", str(PIPELINE), str(recipe), str(root), "--slurm-profile", "cpu", *args],
                          capture_output=True, text=True, env=job_env(cluster, **env), cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout)
    return submitted(done.stdout)


def submitted(output: str) -> dict[str, str]:
    return {m[2]: m[1] for m in re.finditer(r"^(\d+)  (\S+)  submitted$", output, re.M)}


def wait(cluster: SlurmCluster, ids, timeout: float) -> dict[str, str]:
    states = cluster.wait(list(ids), timeout=timeout, until=FINISHED)
    if not all(state in FINISHED for state in states.values()):
        cluster.run("scancel", *ids, check=False)
        raise AssertionError(f"jobs still not finished after {timeout:.0f}s: {states}")
    return states


def job_field(cluster: SlurmCluster, slurm_id: str, field: str) -> str:
    text = cluster.run("scontrol", "show", "job", "-o", slurm_id).stdout
    match = re.search(rf"\b{field}=(\S*)", text)
    return match[1] if match else ""


def log_of(root: Path, job_id: str, slurm_id: str) -> Path:
    return root / "logs" / f"{job_id.replace('/', '.').replace(':', '.')}-{slurm_id}.out"


@pytest.fixture(scope="module")
def experiment(cluster, tmp_path_factory):
    """The toy chain of rl-teacher-bridge, 1 seed, submitted by pipeline.sh with the cpu profile, run to the end."""
    base = tmp_path_factory.mktemp("experiment")
    recipe, root = write_recipe(base / "tiny.yaml"), base / "root"
    started = time.time()
    ids = pipeline(cluster, recipe, root)
    states = wait(cluster, ids.values(), timeout=900)
    print(f"toy chain: {len(ids)} jobs in {time.time() - started:.0f}s")
    return {"recipe": recipe, "root": root, "ids": ids, "states": states}


# -- reruns while jobs are queued ---------------------------------------------------------------------
def test_rerun_while_jobs_are_queued_submits_nothing_twice(cluster, tmp_path):
    recipe, root = write_recipe(tmp_path / "tiny.yaml"), tmp_path / "root"
    first = pipeline(cluster, recipe, root, SBATCH_ARGS="--hold")  # held: they stay queued while we rerun
    try:
        assert "shared:toy-init" in first and "report" in first and len(first) == 11, first
        # Rerun as a Slurm job itself, from a folder with no logs/ in it: its own log must still open.
        submit_dir = tmp_path / "elsewhere"
        submit_dir.mkdir()
        job = subprocess.run(["sbatch", "--parsable", str(PIPELINE), str(recipe), str(root), "--slurm-profile", "cpu"],
                             capture_output=True, text=True, env=job_env(cluster), cwd=submit_dir, check=True)
        pipeline_id = job.stdout.strip()
        assert wait(cluster, [pipeline_id], timeout=300) == {pipeline_id: "COMPLETED"}
        output = (submit_dir / f"sdd-pipeline-{pipeline_id}.out").read_text()
        assert submitted(output) == {}, output
        assert f"0 submitted, {len(first)} already queued or running, 0 done" in output, output
        again = pipeline(cluster, recipe, root)  # and once more from the login node
        assert again == {}
        names = [row["name"] for row in cluster.jobs() if row["state"] == "PENDING" and row["name"].startswith("sdd-")]
        assert len(names) == len(set(names)) == len(first), names
    finally:
        cluster.run("scancel", *first.values(), check=False)


# -- stage locks and Slurm job ids ----------------------------------------------------------------------
def test_lock_of_a_job_slurm_reports_finished_is_taken_over(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    quick = cluster.run("sbatch", "--parsable", "--cpus-per-task=1", "--mem=100M", f"--output={tmp_path}/q-%j.out",
                        "--wrap", "true").stdout.strip()
    running = cluster.run("sbatch", "--parsable", "--cpus-per-task=1", "--mem=100M", f"--output={tmp_path}/r-%j.out",
                          "--wrap", "sleep 300").stdout.strip()
    try:
        assert wait(cluster, [quick], timeout=120) == {quick: "COMPLETED"}
        cluster.wait([running], timeout=60, until=("RUNNING",))
        run = RunDir(tmp_path / "run")
        run.create()

        def held_by(slurm_job: str) -> None:
            lock = run.lock("sft-teacher")
            lock.path.parent.mkdir(parents=True, exist_ok=True)
            lock.path.write_text(json.dumps({"pid": 1, "host": "another-node", "since": "t", "slurm_job": slurm_job}))

        held_by(running)  # Slurm says that job still runs: it may be writing the stage
        with pytest.raises(SddError, match=f"Slurm job {running}"):
            run.lock("sft-teacher").acquire()
        for finished in (quick, "987654"):  # ended, and long gone from slurmctld's memory
            held_by(finished)
            with run.lock("sft-teacher") as lock:
                assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    finally:
        cluster.run("scancel", running, check=False)


# -- preemption: scontrol requeue, then the time-limit warning, of a running training stage ---------------
SFT = {"max_steps": 60, "save_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 16}


def progress_lines(log: Path, after: str = "") -> list[re.Match]:
    text = log.read_text() if log.exists() else ""
    text = text.split(after, 1)[1] if after and after in text else ("" if after else text)
    return [m for m in map(PROGRESS_LINE.match, text.splitlines()) if m]


def wait_for_line(log: Path, after: str, timeout: float = 300) -> re.Match:
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = progress_lines(log, after)
        if lines and int(lines[-1]["step"]) >= 3:
            return lines[-1]
        time.sleep(0.2)
    raise AssertionError(log.read_text() if log.exists() else "no log")


def release(cluster: SlurmCluster, job: str) -> None:
    """Start a requeued job now instead of after Slurm's ~2 minute hold."""
    cluster.wait([job], timeout=120, until=("PENDING",))
    time.sleep(1)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")


def test_requeued_training_stage_resumes_to_the_uninterrupted_checkpoint(cluster, toy_template, tmp_path):
    """One job stopped twice: `scontrol requeue` (what preemption does), then the time-limit warning as
    `--signal=B:TERM` sends it, to the job script only (here at once with `scancel --batch --signal=TERM`;
    the timer's own warning was run by hand, docs/slurm.md). Its final weights against a job never stopped."""
    from test_faults import max_difference, weights

    runs = {}
    for which in ("reference", "requeued"):
        runs[which] = tmp_path / which
        shutil.copytree(toy_template, runs[which])
        set_tiny(runs[which], sft=SFT)
    env = job_env(cluster, SDD_PROGRESS_STEPS="1")  # a line per step, so the stops can be timed by the log

    def submit(which: str) -> str:
        return subprocess.run(
            ["sbatch", "--parsable", f"--job-name=sft-{which}", f"--output={tmp_path}/{which}-%j.out",
             "--cpus-per-task=1", "--gpus-per-node=0", "--mem=2G", "--export=ALL,SDD_STAGE_TRAINS=1,GPUS_PER_NODE=1",
             str(STAGE), "sft", "--run", str(runs[which]), "--role", "teacher"],
            capture_output=True, text=True, env=env, cwd=REPO, check=True).stdout.strip()

    reference, requeued = submit("reference"), submit("requeued")
    log = tmp_path / f"requeued-{requeued}.out"
    try:
        # Progress lines in the Slurm log while the stage trains (stdout is a file here, not a terminal).
        line = wait_for_line(log, "(restart 0)")
        assert cluster.job_state(requeued) == "RUNNING"
        assert RunDir(runs["requeued"]).stage("sft-teacher")["status"] == "running"
        assert line["label"] == "sft-teacher" and line["total"] == str(SFT["max_steps"])
        cluster.run("scontrol", "requeue", requeued)
        release(cluster, requeued)
        wait_for_line(log, "(restart 1)")
        cluster.run("scancel", "--batch", "--signal=TERM", requeued)
        release(cluster, requeued)
        states = wait(cluster, [reference, requeued], timeout=600)
    finally:
        cluster.run("scancel", reference, requeued, check=False)
    text = log.read_text()
    assert states == {reference: "COMPLETED", requeued: "COMPLETED"}, (states, text)
    assert job_field(cluster, requeued, "Restarts") == "2"
    # One log across the three runs (--open-mode=append): the earlier runs' lines and checkpoint messages stay.
    assert "DUE TO JOB REQUEUE" in text and "(restart 2)" in text, text
    saved = [int(step) for step in re.findall(r"sft-teacher stopped on SIGTERM; its checkpoint is saved "
                                              r"\(checkpoint-(\d+)\)", text)]
    assert len(saved) == 2 and 0 < saved[0] < saved[1] < SFT["max_steps"], text  # saved at each stop
    assert "stage stopped by the signal: requeueing job" in text  # the warning: stage.sh requeued the job itself
    record = RunDir(runs["requeued"]).stage("sft-teacher")
    assert record["status"] == "done" and record["attempts"] == 3, record
    steps, name = SFT["max_steps"], "sft-teacher"
    final, reference_final = (weights(runs[w] / name / "final") for w in ("requeued", "reference"))
    moved = max_difference(weights(runs["reference"] / name / f"checkpoint-{steps - 2}"), reference_final)
    assert moved > 0  # the comparison can fail: the last two steps change the weights
    assert max_difference(final, reference_final) == 0.0


# -- the whole chain -----------------------------------------------------------------------------------
def test_toy_chain_on_the_cpu_profile_ends_with_its_eval_and_the_report(cluster, experiment):
    root, ids, states = experiment["root"], experiment["ids"], experiment["states"]
    assert set(states.values()) == {"COMPLETED"}, states
    assert {"shared:toy-init", "shared:teacher-rl", "rl-teacher-bridge/seed0:warmup",
            "rl-teacher-bridge/seed0:distill", "rl-teacher-bridge/seed0:eval", "report"} <= set(ids)
    assert RunDir(root / "rl-teacher-bridge" / "seed0").stage("eval-toy-test")["status"] == "done"
    report = json.loads((root / "report" / "report.json").read_text())
    assert "toy-test" in report["variants"]["rl-teacher-bridge"]
    # The cpu profile with the recipe's overrides: one CPU, no GPU, its memory and time limit.
    eval_id = ids["rl-teacher-bridge/seed0:eval"]
    assert job_field(cluster, eval_id, "NumCPUs") == "1" and job_field(cluster, eval_id, "TimeLimit") == "00:20:00"
    assert "gres" not in job_field(cluster, eval_id, "TRES") and "mem=2G" in job_field(cluster, eval_id, "TRES")
    # Every job wrote its log under <root>/logs, the per-seed ones included ('/' and ':' made safe).
    warmup_log = log_of(root, "rl-teacher-bridge/seed0:warmup", ids["rl-teacher-bridge/seed0:warmup"]).read_text()
    assert re.search(r"^teacher sampling: completions (\d+)/\1 \(100%\)", warmup_log, re.M), warmup_log
    assert [m["label"] for m in map(PROGRESS_LINE.match, warmup_log.splitlines()) if m][-1] == "warmup"
    rerun = pipeline(cluster, experiment["recipe"], root)
    assert rerun == {}  # everything done, the report built: nothing to submit


def test_failed_stage_leaves_its_dependents_unrun_and_the_rerun_completes(cluster, experiment, tmp_path):
    root = experiment["root"]
    stages = json.loads(json.dumps(TINY["stages"]))
    broken = dict(stages, distill={**stages["distill"], "learning_rat": 1e-3})  # a typo the stage refuses
    recipe = write_recipe(tmp_path / "no-warmup.yaml", variants=["no-warmup"], stages=broken)
    first = pipeline(cluster, recipe, root, "--only", "no-warmup")
    assert set(first) == {"no-warmup/seed0:distill", "no-warmup/seed0:eval", "report"}, first  # shared stages done
    distill, evaluation = first["no-warmup/seed0:distill"], first["no-warmup/seed0:eval"]
    states = wait(cluster, first.values(), timeout=600)
    assert states[distill] == "FAILED" and states[evaluation] == "CANCELLED", states
    assert states[first["report"]] == "CANCELLED"
    assert "learning_rat" in log_of(root, "no-warmup/seed0:distill", distill).read_text()
    assert not log_of(root, "no-warmup/seed0:eval", evaluation).exists()  # never started
    assert "eval-toy-test" not in RunDir(root / "no-warmup" / "seed0").stages()

    write_recipe(recipe, variants=["no-warmup"])  # the fix
    second = pipeline(cluster, recipe, root, "--only", "no-warmup")
    assert set(second) == {"no-warmup/seed0:distill", "no-warmup/seed0:eval", "report"}, second
    states = wait(cluster, second.values(), timeout=600)
    assert set(states.values()) == {"COMPLETED"}, states
    assert RunDir(root / "no-warmup" / "seed0").stage("eval-toy-test")["status"] == "done"
    assert "no-warmup" in json.loads((root / "report" / "report.json").read_text())["variants"]
