"""Recipes: validation errors a user can act on, and the plan the paper's experiment needs."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sdd.errors import SddError
from sdd.experiment import recipe as recipes

REPO = Path(__file__).resolve().parents[2]
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
    a = planner.add(run_dir=tmp_path / "x", stage="eval", name="a", flags={}, options={}, after=["x:b"])
    planner.add(run_dir=tmp_path / "x", stage="eval", name="b", flags={"model": "other"}, options={}, after=[a.id])
    with pytest.raises(SddError, match="cycle"):
        planner.ordered()
    planner = recipes.Planner(recipes.load(TOY), tmp_path, 1)
    planner.add(run_dir=tmp_path / "x", stage="eval", name="a", flags={}, options={}, after=["x:nowhere"])
    with pytest.raises(SddError, match="missing stage x:nowhere"):
        planner.ordered()


def student_scope_toy(tmp_path) -> Path:
    """The toy recipe with `seed_scope: student`: teacher and bootstrap stages once, shared by every seed."""
    recipe = yaml.safe_load(TOY.read_text())
    recipe["seed_scope"] = "student"
    return write(tmp_path, **recipe)


def test_toy_plan_shares_what_is_shared(tmp_path):
    jobs, datasets = recipes.plan(recipes.load(student_scope_toy(tmp_path)), tmp_path, seeds=2)
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


def config_of(job) -> dict:
    return yaml.safe_load(Path(job.argv[job.argv.index("--config") + 1]).read_text())


def test_chain_scope_repeats_the_teacher_chain_per_seed_with_its_seed(tmp_path):
    recipe = recipes.load(TOY)
    assert recipe.seed_scope == "chain"  # the toy covers the whole chain
    jobs, _ = recipes.plan(recipe, tmp_path, seeds=3)
    by_id = {j.id: j for j in jobs}
    assert [j.id for j in jobs if j.stage == "toy-init"] == ["shared:toy-init"]  # task and base models: shared
    for name in ("sft-teacher", "teacher-rl", "teacher-sft", "sft-student"):
        chain = [by_id[f"shared/seed{k}:{name}"] for k in range(3)]
        assert [config_of(j)["seed"] for j in chain] == [0, 1, 2], name
        assert [j.seed for j in chain] == [0, 1, 2]
        configs = [config_of(j) for j in chain]
        for config in configs:
            config.pop("seed")
        assert configs[0] == configs[1] == configs[2], f"{name}: seeds differ in more than their seed"
    assert sum(j.stage == "teacher-rl" for j in jobs) == 3
    assert by_id["shared/seed1:teacher-rl"].after == ["shared/seed1:sft-teacher"]
    # seed k's variants start from chain k: its student bootstrap and its teachers, nothing of another chain
    for k in range(3):
        warmup = by_id[f"rl-teacher-bridge/seed{k}:warmup"]
        assert warmup.argv[warmup.argv.index("--teacher") + 1] == str(tmp_path / "shared" / f"seed{k}" / "teacher-rl" / "final")
        assert warmup.argv[warmup.argv.index("--student") + 1] == str(tmp_path / "shared" / f"seed{k}" / "sft-student" / "final")
        sft_bridge = by_id[f"sft-teacher-bridge/seed{k}:warmup"]
        assert sft_bridge.argv[sft_bridge.argv.index("--teacher") + 1].endswith(f"shared/seed{k}/teacher-sft/final")
        grpo = by_id[f"direct-grpo/seed{k}:student-rl"]
        assert grpo.argv[grpo.argv.index("--model") + 1] == str(tmp_path / "shared" / f"seed{k}" / "sft-student" / "final")
        assert f"shared/seed{k}:eval-teacher-rl" in by_id and f"shared/seed{k}:eval-student-base" in by_id
        others = {f"shared/seed{j}" for j in range(3) if j != k}
        assert not any(dep.split(":")[0] in others for j in jobs if j.seed == k for dep in j.after)
    with pytest.raises(SddError, match="'seed_scope' must be student"):
        recipes.load(write(tmp_path, toy=True, seed_scope="teacher"))


def test_only_selects_with_dependencies(tmp_path):
    from sdd.stages.run import select

    jobs, _ = recipes.plan(recipes.load(TOY), tmp_path, seeds=1)
    chosen = {j.id for j in select(jobs, ["direct-grpo"])}
    assert chosen == {"shared:toy-init", "shared/seed0:sft-student", "direct-grpo/seed0:student-rl",
                      "direct-grpo/seed0:eval"}
    with pytest.raises(SddError, match="matches no job"):
        select(jobs, ["nothing-like-this"])


def test_slurm_dry_run_prints_the_chain(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "sdd", "run", str(TOY), "--root", str(tmp_path / "exp"), "--seeds", "1",
         "--slurm", str(REPO / "examples" / "slurm" / "stage.sh"), "--dry-run", "--only", "no-warmup"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    assert all(line.startswith("sbatch --parsable") for line in out)
    distill = next(line for line in out if "no-warmup.seed0.distill --output" in line)
    assert "--dependency=afterok:<shared/seed0:teacher-rl>:<shared/seed0:sft-student>" in distill or \
        "--dependency=afterok:<shared/seed0:sft-student>:<shared/seed0:teacher-rl>" in distill


@pytest.mark.parametrize("script", sorted((REPO / "examples" / "slurm").glob("*.sh")), ids=lambda p: p.name)
def test_slurm_scripts_parse(script):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    subprocess.run(["bash", "-n", str(script)], check=True)


# -- the published recipe: every value checked against docs/recipe.md --------------------------------
QWEN = REPO / "examples" / "recipes" / "qwen3-8b-to-1.7b.yaml"
TABLE_JOBS = {  # docs/recipe.md "Stage" -> (job id in the Qwen plan, stage kind for sdd's defaults)
    "teacher-rl": ("shared:teacher-rl", "teacher-rl"),
    "teacher-rl-half": ("shared:teacher-rl-half", "teacher-rl"),
    "student-rl": ("direct-grpo/seed0:student-rl", "student-rl"),
    "stage3-new-labels": ("stage3-new-labels/seed0:student-rl", "student-rl"),
    "stage3-replay": ("stage3-replay/seed0:student-rl", "student-rl"),
    "warmup": ("rl-teacher-bridge/seed0:warmup", "warmup"),
    "distill": ("rl-teacher-bridge/seed0:distill", "distill"),
    "eval": ("rl-teacher-bridge/seed0:eval", "eval"),
    "eval-heldout": ("rl-teacher-bridge/seed0:eval-heldout", "eval"),
    "teacher-sft": ("shared:teacher-sft", "sft"),
}


def recipe_table() -> list[dict]:
    """The rows of docs/recipe.md's table, by column name."""
    lines = (REPO / "docs" / "recipe.md").read_text().split("## The table", 1)[1].splitlines()
    rows = [line for line in lines if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in row.strip("|").split("|")), strict=True)) for row in rows[2:]]


def checked(cell: str):
    """A backticked cell's value (YAML), or None for plain text, which the test does not check."""
    if not (cell.startswith("`") and cell.endswith("`")):
        return None
    return ("value", yaml.safe_load(cell.strip("`")))


def same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))
    return a == b


def lookup(config: dict, key: str):
    part, field = key.split(".", 1)
    return config[part][field]


def test_recipe_table_matches(tmp_path):
    """Every checked value in docs/recipe.md is the one sdd resolves (recipe and defaults), and every
    row whose authors' value differs from sdd's gives a reason."""
    from sdd.stages import common, resolved
    from sdd.stages.run import resolved_config

    table = recipe_table()
    assert len(table) > 80 and {r["Stage"] for r in table} <= set(TABLE_JOBS)
    jobs = {j.id: j for j in recipes.plan(recipes.load(QWEN), tmp_path / "q3")[0]}
    configs = {stage: resolved_config(jobs[job_id]) for stage, (job_id, _) in TABLE_JOBS.items()}
    defaults = {kind: resolved.resolve(kind, common.StageArgs(run=str(tmp_path / "empty")))
                for kind in {kind for _, kind in TABLE_JOBS.values()}}
    assert not (tmp_path / "empty").exists()  # resolving writes nothing
    problems = []
    for row in table:
        where = f"{row['Stage']} {row['Hyperparameter']}"
        authors, default, recipe = checked(row["Authors"]), checked(row["sdd default"]), checked(row["Recipe"])
        if row["Key"] != "-":
            if recipe and not same(lookup(configs[row["Stage"]], row["Key"]), recipe[1]):
                problems.append(f"{where}: recipe resolves {lookup(configs[row['Stage']], row['Key'])!r}, table says {recipe[1]!r}")
            kind = TABLE_JOBS[row["Stage"]][1]
            if default and not same(lookup(defaults[kind], row["Key"]), default[1]):
                problems.append(f"{where}: sdd default is {lookup(defaults[kind], row['Key'])!r}, table says {default[1]!r}")
        differs = authors and any(other and not same(authors[1], other[1]) for other in (default, recipe))
        if differs and not row["Why different"]:
            problems.append(f"{where}: differs from the authors' value with no reason given")
    assert not problems, "\n".join(problems)


def test_dry_run_json_shows_resolved_config_and_writes_no_run_dir(tmp_path):
    root = tmp_path / "exp"
    out = subprocess.run([sys.executable, "-m", "sdd", "run", str(TOY), "--root", str(root), "--seeds", "1",
                          "--dry-run", "--json", "--only", "direct-grpo"], capture_output=True, text=True, check=True)
    import json

    jobs = {j["id"]: j for j in json.loads(out.stdout)}
    rl = jobs["direct-grpo/seed0:student-rl"]["config"]
    assert rl["trl_class"] == "GRPOConfig" and rl["sdd"]["dataset"] == "toy-train"
    assert rl["trl"]["learning_rate"] == 2.0e-4 and rl["trl"]["max_steps"] == 40  # the toy's own values
    assert any(layer.endswith(".yaml") for layer in rl["layers"]) and "sdd defaults" in rl["layers"]
    assert jobs["shared:toy-init"]["config"] is None
    assert not (root / "shared").exists() and not (root / "direct-grpo").exists()


def test_print_config_every_stage_exits_0_and_writes_nothing(tmp_path):
    """Each stage subcommand through the CLI's own parser (in-process, as `sdd run` runs jobs), one as a process."""
    import contextlib
    import io
    import json

    from sdd.cli import app

    run = tmp_path / "run"
    for stage in ("sft", "teacher-rl", "student-rl", "warmup", "distill", "eval"):
        setting = "samples=4" if stage == "eval" else "learning_rate=3e-6"
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            app(args=[stage, "--run", str(run), "--set", setting, "--print-config", "--json"], standalone_mode=False)
        config = json.loads(out.getvalue())
        assert config["stage"] == stage and "--set" in config["layers"]
        if stage == "eval":
            assert config["sdd"]["samples"] == 4 and "trl" not in config
        else:
            assert config["trl"]["learning_rate"] == 3e-6
    result = subprocess.run([sys.executable, "-m", "sdd", "distill", "--run", str(run), "--print-config"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["trl"]["weight_decay"] == 0.1
    assert not run.exists()


# -- the data protocols --------------------------------------------------------------------------------
def test_split_is_the_authors_seeded_80_20_and_halves_partition_it(toy_run):
    from datasets import Dataset

    from sdd.manifest import RunDir
    from sdd.stages.common import DataOptions

    run = RunDir(toy_run)
    ids = {split: [r["id"] for r in DataOptions(dataset="toy-train", split=split).problems(run)[1]]
           for split in (None, "train", "heldout", "train-a", "train-b")}
    everything = ids[None]
    assert len(ids["train"]) == int(len(everything) * 0.8) and len(ids["heldout"]) == len(everything) - len(ids["train"])
    assert sorted(ids["train"] + ids["heldout"]) == sorted(everything) and not set(ids["train"]) & set(ids["heldout"])
    assert ids["train-a"] + ids["train-b"] == ids["train"] and abs(len(ids["train-a"]) - len(ids["train-b"])) <= 1
    # the same order as the authors' `datasets.Dataset.shuffle(seed=42)` (prepare_grpo_data.py)
    shuffled = Dataset.from_list([{"id": i} for i in everything]).shuffle(seed=42)["id"]
    assert ids["train"] + ids["heldout"] == shuffled
    other_seed = [r["id"] for r in DataOptions(dataset="toy-train", split="train", split_seed=7).problems(run)[1]]
    assert other_seed != ids["train"]
    with pytest.raises(ValueError, match="split must be one of"):
        DataOptions(split="validation")


def test_heldout_eval_scores_only_heldout_problems(toy_run):
    import json

    from conftest import sdd

    from sdd.manifest import RunDir
    from sdd.stages.common import DataOptions

    sdd("eval", "--run", toy_run, "--role", "student", "--benchmark", "toy-train", "--samples", "1",
        "--max-new-tokens", "4", "--limit", "6", "--name", "eval-heldout", "--set", "split=heldout")
    record = RunDir(toy_run).stage("eval-heldout-toy-train")
    assert record["status"] == "done" and record["metrics"]["benchmark"] == "toy-train:heldout"
    rows = (toy_run / "eval-heldout-toy-train" / "samples-seed0.jsonl").read_text().splitlines()[1:]
    scored = [json.loads(line)["id"] for line in rows]
    heldout = [r["id"] for r in DataOptions(dataset="toy-train", split="heldout").problems(RunDir(toy_run))[1]]
    assert scored == heldout[:6]


def test_stage3_variants_plan(tmp_path):
    path = write(tmp_path, toy=True, bootstrap=True, train_dataset="toy-train", benchmarks=["toy-test"], seeds=1,
                 split={"seed": 42, "fraction": 0.8, "heldout_eval": {"samples": 2}},
                 variants=["rl-teacher-bridge", "stage3-new-labels", "stage3-replay"])
    jobs = {j.id: j for j in recipes.plan(recipes.load(path), tmp_path / "exp")[0]}

    def options(job_id):
        job = jobs[job_id]
        return yaml.safe_load(Path(job.argv[job.argv.index("--config") + 1]).read_text())

    assert options("shared:teacher-rl")["split"] == "train"
    assert options("shared:teacher-rl-half")["split"] == "train-a"
    assert options("rl-teacher-bridge/seed0:warmup")["split"] == "train"
    # the bridge is shared by the two stage-3 variants (one job), on the teacher's half
    assert "stage3-replay/seed0:warmup" not in jobs and options("stage3-new-labels/seed0:distill")["split"] == "train-a"
    new, replay = options("stage3-new-labels/seed0:student-rl"), options("stage3-replay/seed0:student-rl")
    assert (new.pop("split"), replay.pop("split")) == ("train-b", "train-a") and new == replay  # same updates
    student_of = {v: jobs[f"{v}/seed0:student-rl"].argv for v in ("stage3-new-labels", "stage3-replay")}
    assert {a[a.index("--model") + 1] for a in student_of.values()} == {
        str(tmp_path / "exp" / "stage3-new-labels" / "seed0" / "distill" / "final")}
    heldout = options("stage3-replay/seed0:eval-heldout")
    assert heldout["split"] == "heldout" and heldout["benchmark"] == ["toy-train"] and heldout["samples"] == 2
    assert jobs["stage3-replay/seed0:eval-heldout"].records == ["eval-heldout-toy-train"]
    assert "shared:eval-heldout-teacher-rl-half" in jobs
    # without a split the stage-3 variants have no halves to use
    with pytest.raises(SddError, match="add 'split:"):
        recipes.load(write(tmp_path, toy=True, variants=["stage3-replay"]))
    with pytest.raises(SddError, match="split.fraction"):
        recipes.load(write(tmp_path, toy=True, split={"fraction": 1.5}))
