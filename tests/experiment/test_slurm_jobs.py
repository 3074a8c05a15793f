"""Slurm submission without a cluster (issue 14): job names, log paths, resources per stage kind, stage locks
under a Slurm job id. The same things on a real Slurm are in tests/test_slurm.py (slow)."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sdd.errors import SddError
from sdd.experiment import recipe as recipes
from sdd.experiment.slurm import experiment_tag, job_name, safe_id
from sdd.manifest import RunDir

REPO = Path(__file__).resolve().parents[2]
TOY = REPO / "examples" / "recipes" / "toy.yaml"
QWEN = REPO / "examples" / "recipes" / "qwen3-8b-to-1.7b.yaml"
STAGE = REPO / "examples" / "slurm" / "stage.sh"


def dry_run(recipe: Path, root: Path, *args: str) -> list[list[str]]:
    """`sdd run --slurm --dry-run`: the sbatch command lines, split as the shell would."""
    done = subprocess.run([sys.executable, "-m", "sdd", "run", str(recipe), "--root", str(root), "--seeds", "1",
                           "--slurm", str(STAGE), "--dry-run", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [shlex.split(line) for line in done.stdout.splitlines()]


def option(command: list[str], name: str) -> str | None:
    values = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"{name}=")]
    return values[-1] if values else None


# -- names and logs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("job_id", ["shared:sft-teacher", "rl-teacher-bridge/seed0:warmup",
                                    "my variant (v2)/seed11:distill", "ünïcode/seed0:eval"])
def test_job_names_are_safe_for_any_variant_and_seed(job_id):
    name = job_name("abc123", job_id)
    assert re.fullmatch(r"sdd-abc123-[A-Za-z0-9._-]+", name), name
    assert "/" not in safe_id(job_id) and ":" not in safe_id(job_id)


def test_the_tag_tells_experiments_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert experiment_tag(Path("runs/a")) == experiment_tag(tmp_path / "runs" / "a")  # relative or not: same root
    assert experiment_tag(tmp_path / "runs" / "a") != experiment_tag(tmp_path / "runs" / "b")


def test_every_job_logs_under_the_root_with_a_name_slurm_can_open(tmp_path):
    root = tmp_path / "exp"
    commands = dry_run(TOY, root, "--only", "rl-teacher-bridge")
    names = [option(c, "--job-name") for c in commands]
    assert len(names) == len(set(names)) and all(n.startswith(f"sdd-{experiment_tag(root)}-") for n in names)
    for command in commands:
        log = Path(option(command, "--output"))
        assert log.parent == root / "logs" and "/" not in log.name and log.name.endswith("-%j.out")
        assert "--open-mode=append" in command and "--kill-on-invalid-dep=yes" in command
    warmup = next(c for c in commands if option(c, "--job-name").endswith("rl-teacher-bridge.seed0.warmup"))
    assert Path(option(warmup, "--output")).name == "rl-teacher-bridge.seed0.warmup-%j.out"
    report = commands[-1]
    assert report[-2:] == ["report", str(root.resolve())] and option(report, "--dependency").count("<") == len(commands) - 1
    assert not (root / "logs").exists()  # a dry run creates nothing there


def test_two_jobs_with_the_same_safe_name_are_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"toy": True, "variants": ["a.b", "a:b"], "seeds": 1, "custom_variants": {
        "a.b": {"teacher": None, "steps": ["student-rl"]}, "a:b": {"teacher": "rl", "steps": ["distill"]}}}))
    done = subprocess.run([sys.executable, "-m", "sdd", "run", str(recipe), "--root", str(tmp_path / "x"),
                           "--slurm", str(STAGE), "--dry-run"], capture_output=True, text=True)
    assert done.returncode == 2, done.stdout
    assert "jobs a.b/seed0:eval and a:b/seed0:eval get the same Slurm name; rename one variant" in done.stderr


def test_a_job_registers_the_experiments_datasets_in_its_run_dir_when_it_starts(tmp_path):
    from sdd.experiment.slurm import register_for_job

    data = tmp_path / "shared" / "toy" / "data" / "train.jsonl"  # written by the experiment's first job
    listing = tmp_path / "plan" / "slurm-datasets.json"
    listing.parent.mkdir()
    listing.write_text(json.dumps({"toy-train": str(data)}))
    run = tmp_path / "variant" / "seed0"
    register_for_job(listing, ["warmup", "--run", str(run), "--dataset", "toy-train"])
    assert RunDir(run).datasets() == {}  # not there yet: nothing to register
    data.parent.mkdir(parents=True)
    data.write_text('{"problem": "1+1", "answer": "2"}\n')
    register_for_job(listing, ["warmup", "--run", str(run), "--dataset", "toy-train"])
    assert RunDir(run).datasets() == {"toy-train": str(data)}


# -- resources ----------------------------------------------------------------------------------------
def test_published_recipe_asks_for_an_8_gpu_node_per_training_stage_and_one_gpu_for_eval(tmp_path):
    commands = dry_run(QWEN, tmp_path / "q", "--only", "direct-grpo")
    train, evaluation = (next(c for c in commands if c[c.index(str(STAGE)) + 1] == kind) for kind in ("student-rl", "eval"))
    assert [option(train, k) for k in ("--gpus-per-node", "--cpus-per-task", "--nodes", "--time")] == \
        ["8", "64", "1", "48:00:00"]
    assert "SDD_STAGE_TRAINS=1,GPUS_PER_NODE=8," in option(train, "--export")
    assert [option(evaluation, k) for k in ("--gpus-per-node", "--cpus-per-task")] == ["1", "8"]
    assert "SDD_STAGE_TRAINS=0,GPUS_PER_NODE=1," in option(evaluation, "--export")


def test_the_toy_runs_on_the_cpu_profile_and_a_flag_overrides_a_recipe(tmp_path):
    toy = dry_run(TOY, tmp_path / "t", "--only", "direct-grpo")
    assert {option(c, "--gpus-per-node") for c in toy} == {"0"} and {option(c, "--mem") for c in toy} == {"4G"}
    assert all("GPUS_PER_NODE=1," in option(c, "--export") for c in toy)  # one process per stage
    as_gpu = dry_run(TOY, tmp_path / "t", "--only", "direct-grpo", "--slurm-profile", "gpu")
    assert option(as_gpu[1], "--gpus-per-node") == "8"


def test_recipe_sections_go_over_the_profile_all_then_the_stage_kind(tmp_path):
    recipe = recipes.Recipe(path=tmp_path / "r.yaml", toy=True, slurm={
        "profile": "gpu", "all": {"partition": "big", "account": "proj", "sbatch": ["--exclusive"]},
        "eval": {"time": "02:00:00", "partition": "small", "mem": None}})
    assert recipes.slurm_resources(recipe, "distill") == {"nodes": 1, "gpus": 8, "cpus": 64, "time": "48:00:00",
                                                          "partition": "big", "account": "proj",
                                                          "sbatch": ["--exclusive"]}
    evaluation = recipes.slurm_resources(recipe, "eval")
    assert (evaluation["gpus"], evaluation["time"], evaluation["partition"]) == (1, "02:00:00", "small")
    assert recipes.sbatch_resource_args(evaluation) == [
        "--nodes=1", "--gpus-per-node=1", "--cpus-per-task=8", "--time=02:00:00", "--partition=small",
        "--account=proj", "--exclusive"]  # mem: None leaves it to the cluster
    on_cpus = recipes.slurm_resources(recipe, "eval", "cpu")  # another profile under the same recipe sections
    assert (on_cpus["gpus"], on_cpus["time"], on_cpus["partition"]) == (0, "02:00:00", "small")


@pytest.mark.parametrize(("section", "message"), [
    ({"profile": "tpu"}, "slurm.profile is 'tpu'; use one of gpu, cpu"),
    ({"evaluation": {}}, "slurm has unknown key 'evaluation'"),
    ({"eval": {"gpu": 1}}, "slurm.eval has unknown resource 'gpu'"),
    ({"all": {"cpus": "many"}}, "slurm.all.cpus must be a whole number"),
    ({"all": {"nodes": 0}}, "slurm.all.nodes must be a whole number >= 1"),
    ({"sft": {"sbatch": "--exclusive"}}, "slurm.sft.sbatch must be a list"),
])
def test_a_wrong_slurm_section_is_one_line_naming_the_key(tmp_path, section, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"toy": True, "slurm": section}))
    with pytest.raises(SddError, match=re.escape(message)):
        recipes.load(recipe)


def test_an_unknown_profile_flag_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sdd", "run", str(TOY), "--root", str(tmp_path / "x"), "--slurm",
                           str(STAGE), "--dry-run", "--slurm-profile", "tpu"], capture_output=True, text=True)
    assert done.returncode == 2 and "Slurm profile 'tpu' does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_stage_script_passes_the_cpus_on_to_srun():
    text = STAGE.read_text()
    assert "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK" in text and "--open-mode=append" in text


# -- stage locks under Slurm --------------------------------------------------------------------------
def hold(run: RunDir, **owner) -> Path:
    lock = run.lock("sft-teacher").path
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"since": "2026-12-03T00:00:00Z", **owner}))
    return lock


def test_a_lock_of_our_own_slurm_job_is_ours_after_a_requeue_to_another_node(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.create()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    hold(run, pid=12345, host="node-that-ran-it-before", slurm_job="4242")
    with run.lock("sft-teacher") as lock:
        owner = json.loads(lock.path.read_text())
    assert owner["pid"] == os.getpid() and owner["slurm_job"] == "4242" and owner["host"] == socket.gethostname()


def test_a_lock_of_another_job_slurm_cannot_be_asked_about_is_refused(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.create()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue here: nobody can tell whether job 77 ended
    hold(run, pid=12345, host="another-node", slurm_job="77")
    with pytest.raises(SddError, match=r"pid 12345 on another-node \(Slurm job 77\)"):
        run.lock("sft-teacher").acquire()


def test_a_live_process_of_our_own_job_on_this_host_keeps_its_lock(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.create()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        hold(run, pid=other.pid, host=socket.gethostname(), slurm_job="4242")
        with pytest.raises(SddError, match=f"pid {other.pid}"):
            run.lock("sft-teacher").acquire()
    finally:
        other.kill()
        other.wait()
