"""The toy recipe end to end at its smallest: one variant, one seed, tiny steps, through `sdd run`.

In the style of tinker-cookbook's recipe tests: the shipped recipe (examples/recipes/toy.yaml) with
only its sizes shrunk, run by the real command (worker processes, the manifest, skip-if-done), then
`sdd report`. Checks that the variant's stages and its eval really ran and that the report holds it.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY

from sdd.manifest import RunDir

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_toy_recipe_runs_one_variant_and_reports(tmp_path):
    recipe = yaml.safe_load((REPO / "examples" / "recipes" / "toy.yaml").read_text())
    recipe.update(variants=["direct-grpo"], seeds=1, bootstrap=False, eval={"samples": 2})
    recipe["stages"] = {**recipe["stages"], **TINY}  # the toy's sections, each replaced by its tiny sizes
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(recipe))
    root = tmp_path / "exp"
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(REPO)}
    ran = subprocess.run([sys.executable, "-m", "sdd", "run", str(path), "--root", str(root), "--jobs", "1"],
                         capture_output=True, text=True, timeout=1800, env=env)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]

    variant = RunDir(root / "direct-grpo" / "seed0").stages()
    assert variant["student-rl"]["status"] == "done"
    assert variant["eval-toy-test"]["status"] == "done", sorted(variant)
    assert variant["eval-toy-test"]["metrics"], variant["eval-toy-test"]

    again = subprocess.run([sys.executable, "-m", "sdd", "run", str(path), "--root", str(root)],
                           capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "are done" in again.stdout, again.stdout + again.stderr

    reported = subprocess.run([sys.executable, "-m", "sdd", "report", str(root)], capture_output=True, text=True,
                              timeout=600, env=env)
    assert reported.returncode == 0, reported.stderr[-3000:]
    summary = json.loads((root / "report" / "report.json").read_text())
    assert "direct-grpo" in json.dumps(summary), summary
