"""Recipes: validation errors a user can act on, and the plan the paper's experiment needs."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sdd import recipe as recipes
from sdd.errors import SddError

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "examples" / "recipes" / "toy.yaml"


def write(tmp_path, **fields):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(fields))
    return path


@pytest.mark.parametrize("fields, message", [
    ({"toy": True, "variants": ["rl-teacher-bridge", "distill-everything"]}, "unknown variant 'distill-everything'"),
    ({"teacher": "Qwen/Qwen3-8B"}, "name the models"),
    ({"toy": True, "stages": {"destill": {}}}, "unknown stage 'destill'"),
    ({"toy": True, "seeds": 0}, "'seeds' must be a positive integer"),
    ({"toy": True, "learning_rate": 1e-5}, "unknown key 'learning_rate'"),
    ({"toy": True, "custom_variants": {"x": {"teacher": "rl", "steps": ["warmup", "pretrain"]}}, "variants": ["x"]},
     "unknown step 'pretrain'"),
    ({"toy": True, "custom_variants": {"x": {"teacher": None, "steps": ["distill"]}}, "variants": ["x"]},
     "names no teacher"),
])
def test_recipe_errors(tmp_path, fields, message):
    with pytest.raises(SddError, match=message):
        recipes.load(write(tmp_path, **fields))


def test_plan_cycle_and_missing_stage_are_errors(tmp_path):
    planner = recipes.Planner(recipes.load(TOY), tmp_path, 1)
    a = planner.add(run_dir=tmp_path / "x", stage="eval", name="a", args=[], options={}, after=["x:b"])
    planner.add(run_dir=tmp_path / "x", stage="eval", name="b", args=["--other"], options={}, after=[a.id])
    with pytest.raises(SddError, match="cycle"):
        planner.ordered()
    planner = recipes.Planner(recipes.load(TOY), tmp_path, 1)
    planner.add(run_dir=tmp_path / "x", stage="eval", name="a", args=[], options={}, after=["x:nowhere"])
    with pytest.raises(SddError, match="missing stage x:nowhere"):
        planner.ordered()


def test_toy_plan_shares_what_is_shared(tmp_path):
    jobs, datasets = recipes.plan(recipes.load(TOY), tmp_path, seeds=2)
    ids = [j.id for j in jobs]
    assert len(ids) == len(set(ids))
    position = {j.id: i for i, j in enumerate(jobs)}
    for job in jobs:  # dependencies come first
        assert all(position[d] < position[job.id] for d in job.after)
    # the teacher is trained once, for every variant and seed
    assert sum(j.stage == "teacher-rl" for j in jobs) == 1
    # no-distill evaluates the very warmup the full bridge distils from: planned once
    warmups = [j for j in jobs if j.stage == "warmup" and "--teacher" in j.argv
               and j.argv[j.argv.index("--teacher") + 1].endswith("teacher-rl/final") and j.name == "warmup"]
    assert len(warmups) == 2  # one per seed
    no_distill_eval = next(j for j in jobs if j.variant == "no-distill" and j.seed == 0)
    assert no_distill_eval.argv[no_distill_eval.argv.index("--model") + 1] == str(
        tmp_path / "rl-teacher-bridge" / "seed0" / "warmup" / "final")
    # seeds differ in their training seed and nothing else
    student_rl = sorted((j for j in jobs if j.stage == "student-rl"), key=lambda j: j.seed)
    configs = [yaml.safe_load(Path(j.argv[j.argv.index("--config") + 1]).read_text()) for j in student_rl]
    assert [c.pop("seed") for c in configs] == [0, 1] and configs[0] == configs[1]
    assert set(datasets) == {"toy-train", "toy-test"}


def test_only_selects_with_dependencies(tmp_path):
    from sdd.stages.run import select

    jobs, _ = recipes.plan(recipes.load(TOY), tmp_path, seeds=1)
    chosen = {j.id for j in select(jobs, ["direct-grpo"])}
    assert chosen == {"shared:toy-init", "shared:sft-student", "direct-grpo/seed0:student-rl", "direct-grpo/seed0:eval"}
    with pytest.raises(SddError, match="matches no job"):
        select(jobs, ["nothing-like-this"])


def test_slurm_dry_run_prints_the_chain(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "sdd", "run", str(TOY), "--root", str(tmp_path / "exp"), "--seeds", "1",
         "--slurm", str(REPO / "examples" / "slurm" / "stage.sh"), "--dry-run", "--only", "no-warmup"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    assert all(line.startswith("sbatch --parsable") for line in out)
    distill = next(line for line in out if "sdd:no-warmup/seed0:distill" in line)
    assert "--dependency=afterok:<shared:teacher-rl>:<shared:sft-student>" in distill or \
        "--dependency=afterok:<shared:sft-student>:<shared:teacher-rl>" in distill


@pytest.mark.parametrize("script", sorted((REPO / "examples" / "slurm").glob("*.sh")), ids=lambda p: p.name)
def test_slurm_scripts_parse(script):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    subprocess.run(["bash", "-n", str(script)], check=True)
