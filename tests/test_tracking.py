"""A toy experiment reporting to trackio logs one run per training job, named `<variant>/seed<k>/<stage>`
and grouped by the experiment, read back here from trackio's local store (no server, no account).
About 40 s on 2 CPU cores.

The experiment is the toy recipe at its smallest (one variant, one seed, tiny steps) run by the real
`sdd run` in a child process whose TRACKIO_DIR is a temporary folder.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
TRAINING = ("teacher-rl", "warmup", "distill")


def test_toy_experiment_logs_one_named_run_per_training_job(tmp_path):
    pytest.importorskip("trackio")
    recipe = yaml.safe_load((REPO / "examples" / "recipes" / "toy.yaml").read_text())
    recipe.update(variants=["rl-teacher-bridge"], seeds=1, bootstrap=False, eval={"samples": 1, "limit": 8})
    recipe["stages"] = {**recipe["stages"], **TINY}
    for kind in TRAINING:
        recipe["stages"][kind] = {**recipe["stages"][kind], "report_to": "trackio", "project": "sdd-test"}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(recipe))
    store = tmp_path / "trackio"
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "PYTHONPATH": str(REPO), "TRACKIO_DIR": str(store), "HOME": str(tmp_path)}
    root = tmp_path / "toy-exp"
    ran = subprocess.run([sys.executable, "-m", "sdd", "run", str(path), "--root", str(root), "--jobs", "1"],
                         capture_output=True, text=True, timeout=1800, env=env)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]

    read = subprocess.run([sys.executable, "-c", (
        "import json; from trackio.api import Api; from trackio.sqlite_storage import SQLiteStorage\n"
        "runs = {r.name: {'group': r.config.get('_Group'), 'steps': len(SQLiteStorage.get_logs('sdd-test', r.name))}"
        " for r in Api().runs('sdd-test')}\n"
        "print(json.dumps(runs))")], capture_output=True, text=True, timeout=120, env=env)
    assert read.returncode == 0, read.stderr[-3000:]
    import json

    runs = json.loads(read.stdout.strip().splitlines()[-1])
    # stages shared by the variants run in shared/seed<k> (one teacher per training seed)
    expected = {"shared/seed0/teacher-rl", "rl-teacher-bridge/seed0/warmup", "rl-teacher-bridge/seed0/distill"}
    assert set(runs) == expected, runs
    for name, run in runs.items():
        assert run["group"] == "toy-exp", (name, run)
        assert run["steps"] >= 1, (name, run)  # metrics were logged, not only a run opened
