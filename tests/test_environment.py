"""The environment on record: every stage's manifest record holds it, `sdd status --json` shows it, and
`sdd report` prints it and warns when the stages of one experiment ran under different ones."""

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from test_report import BENCH, draw, eval_stage_with, train_stage

from sdd import environment
from sdd.manifest import RunDir
from sdd.stages import report, status

REPO = Path(__file__).resolve().parents[1]


def test_capture_names_versions_processor_and_threads():
    captured = environment.capture()
    versions = captured["versions"]
    assert list(versions) == ["python", *environment.PACKAGES]
    assert versions["python"] == f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    assert versions["torch"] == metadata.version("torch") == torch.__version__
    assert versions["transformers"] == metadata.version("transformers") and versions["trl"] == metadata.version("trl")
    assert environment.versions(("no-such-distribution-sdd",))["no-such-distribution-sdd"] is None
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        assert captured["cpu"] in cpuinfo.read_text()
    if torch.cuda.is_available():
        assert torch.cuda.get_device_name(0) in captured["gpu"]
    else:
        assert captured["gpu"] is None
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert environment.capture()["threads"] == 3
    finally:
        torch.set_num_threads(before)
    assert captured["threads"] == before
    if sys.platform == "linux":
        assert captured["platform"].startswith("Linux")
    assert captured["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_cpu_capability_is_the_kernel_set_torch_dispatches_to():
    """ATEN_CPU_CAPABILITY lowers the instruction set torch's CPU kernels use; the record must follow it."""
    code = "import json; from sdd import environment; e = environment.capture(); print(json.dumps(e)); print(environment.describe(e))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    assert json.loads(out[0])["cpu_capability"] == "DEFAULT"
    if not torch.cuda.is_available():
        assert "(DEFAULT kernels)" in out[1]


def test_each_record_holds_its_environment_and_status_json_shows_it(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    run.create()
    run.begin("sft", stage="sft", role="student", config={}, inputs={})
    run.end("sft", "done")
    recorded = run.record("sft").environment
    assert recorded["versions"]["torch"] == torch.__version__ and recorded["threads"] == torch.get_num_threads()
    status.run(tmp_path / "run", as_json=True)
    shown = json.loads(capsys.readouterr().out)
    assert shown[str(tmp_path / "run")]["stages"]["sft"]["environment"] == recorded
    status.run(tmp_path / "run")
    assert f"environment: {environment.describe(recorded)}"[:60] in " ".join(capsys.readouterr().out.split())


def test_report_prints_the_environment_and_warns_when_stages_differ(tmp_path, capsys):
    root = tmp_path / "root"
    rng = np.random.default_rng(0)
    shared = RunDir(root / "shared")
    base = train_stage(shared, "sft-student", "sft", {}, "student base")
    for seed in (0, 1):
        run = RunDir(root / "direct-grpo" / f"seed{seed}")
        grpo = train_stage(run, "student-rl", "student-rl", {"model": base}, f"grpo {seed}")
        eval_stage_with(run, grpo, draw(rng, np.full(80, 0.5)))
    summary = report.run(root, out=tmp_path / "same", resamples=100)
    assert summary["environment"]["differences"] == {} and summary["environment"]["recorded"] == 5
    printed = capsys.readouterr()
    assert "warning" not in printed.err
    assert f"5 of 5 finished stages recorded their environment: {environment.describe(environment.capture())}" \
        in printed.out

    # One more stage, begun in another process that computes with 3 threads: a real second environment.
    code = ("import torch, sys; torch.set_num_threads(3); from sdd.manifest import RunDir; "
            "run = RunDir(sys.argv[1]); run.begin('analysis-probe', stage='sft', role='student', config={}, inputs={}); "
            "run.end('analysis-probe', 'done')")
    subprocess.run([sys.executable, "-c", code, str(root / "direct-grpo" / "seed1")], check=True,
                   env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    summary = report.run(root, out=tmp_path / "differ", resamples=100)
    threads = summary["environment"]["differences"]["threads"]
    assert threads == {str(torch.get_num_threads()): sorted(set(threads[str(torch.get_num_threads())])),
                       "3": ["direct-grpo/seed1:analysis-probe"]}
    printed = capsys.readouterr()
    assert (f"warning: stages ran under different environments: threads {torch.get_num_threads()} (5 stages) "
            "vs 3 (direct-grpo/seed1:analysis-probe)") in printed.err
    assert "**Warning:** stages ran under different environments: threads" in (tmp_path / "differ" / "report.md").read_text()
    assert BENCH in printed.out


def test_sdd_run_workers_take_the_thread_count_omp_num_threads_sets(tmp_path):
    """`make demo` sets OMP_NUM_THREADS=1 so a machine with more cores sums in the same order: the record says so.

    3 threads for each of 2 workers is not what cpu_count // jobs gives on the 2-core machine (1), so there
    the recorded count can only come from the variable.
    """
    recipe = tmp_path / "toy.yaml"
    recipe.write_text("toy: true\nvariants: [direct-grpo]\nseeds: 1\n")
    root = tmp_path / "root"
    done = subprocess.run([sys.executable, "-m", "sdd", "run", str(recipe), "--root", str(root), "--only", "toy-init",
                           "--jobs", "2"], capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                               "OMP_NUM_THREADS": "3"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert RunDir(root / "shared").record("toy-init").environment["threads"] == 3
