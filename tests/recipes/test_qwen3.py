"""The Qwen3 recipe: its plan and every job's resolved config (no hub models here, so nothing trains).

In the style of tinker-cookbook's recipe tests: the shipped recipe, planned and resolved by the
real command (`sdd run --dry-run --json`), checked for the paper's shape.
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "examples" / "recipes" / "qwen3-8b-to-1.7b.yaml"


def test_qwen3_recipe_plans_and_resolves_every_job(tmp_path):
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    ran = subprocess.run([sys.executable, "-m", "sdd", "run", str(RECIPE), "--root", str(tmp_path / "exp"),
                          "--dry-run", "--json"], capture_output=True, text=True, timeout=600, env=env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    jobs = json.loads(ran.stdout)
    by_id = {j["id"]: j for j in jobs}
    assert not (tmp_path / "exp").exists() or not any((tmp_path / "exp").rglob("manifest.json"))
    # Dependencies point backwards in the printed order (the plan is topologically sorted).
    seen: set[str] = set()
    for job in jobs:
        assert set(job["after"]) <= seen, job["id"]
        seen.add(job["id"])
    stages = {j["stage"] for j in jobs}
    assert {"teacher-rl", "warmup", "distill", "student-rl", "eval"} <= stages, stages
    # Every training and eval job resolves to a config, with the models the recipe names.
    for job in jobs:
        if job["stage"] in ("sft", "teacher-rl", "student-rl", "warmup", "distill", "eval"):
            assert job["config"], job["id"]
    bridge = [j for j in jobs if j["variant"] == "rl-teacher-bridge" and j["stage"] == "distill"]
    assert bridge and all(by_id[d]["stage"] == "warmup" for d in bridge[0]["after"] if by_id[d]["variant"])
