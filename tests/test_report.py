"""`sdd report`'s CIs: every eval seed counts, and variants that share a checkpoint per seed are paired.

The roots here are built the way `sdd run` lays them out (<root>/<variant>/seed<k>/ plus shared/),
with real manifests written through RunDir, real checkpoint files whose fingerprints link the
stages, and samples files in the eval stage's format with metrics from the eval stage's own
`summarize`. Only the models are missing: the correctness of each sample is drawn from a known
per-problem, per-seed probability, so the effects the report must find are known.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from sdd import stats
from sdd.manifest import RunDir
from sdd.stages import eval as eval_stage
from sdd.stages import report

BENCH = "toy-test"
PROBLEMS = 80
SAMPLES = 4
EVAL_SEEDS = 2
TRAINING_SEEDS = (0, 1, 2)


def checkpoint(run: RunDir, name: str, content: str) -> dict:
    """A real (tiny) checkpoint directory, and its manifest output entry with its fingerprint."""
    path = run.path / name / "final"
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_text(content)
    return run.output_entry(path)


def train_stage(run: RunDir, name: str, kind: str, inputs: dict, content: str) -> dict:
    run.create()
    run.begin(name, stage=kind, role="student", config={}, inputs=inputs)
    output = checkpoint(run, name, content)
    run.end(name, "done", outputs={"student": output})
    return {"path": str(run.resolve_path(output["path"])), "from_stage": name, "run": str(run.path),
            "fingerprint": output["fingerprint"]}


def eval_stage_with(run: RunDir, model: dict, correct_by_seed: dict[int, np.ndarray], stage: str = "eval") -> None:
    """An eval stage: samples-seed<j>.jsonl for every eval seed, metrics from eval's own summarize."""
    run.create()
    name = f"{stage}-{BENCH}"
    run.begin(name, stage="eval", role="student", config={}, inputs={"model": model})
    (run.path / name).mkdir(exist_ok=True)
    per_seed = {}
    for seed, correct_ps in correct_by_seed.items():
        rows = [{"id": f"p{i}", "correct": [bool(c) for c in correct_ps[i]], "truncated": [False] * SAMPLES,
                 "lengths": [32] * SAMPLES} for i in range(PROBLEMS)]
        per_seed[seed] = rows
        text = json.dumps({"provenance": {"model": model.get("fingerprint")}}) + "\n"
        (run.path / name / f"samples-seed{seed}.jsonl").write_text(text + "".join(json.dumps(r) + "\n" for r in rows))
    metrics = {**eval_stage.summarize(per_seed, SAMPLES), "benchmark": BENCH}
    run.end(name, "done", metrics=metrics)


def draw(rng, probability_p: np.ndarray) -> dict[int, np.ndarray]:
    """Correctness (problems, samples) per eval seed at the given per-problem probabilities."""
    p = np.clip(probability_p, 0.0, 1.0)[:, None]
    return {seed: rng.random((PROBLEMS, SAMPLES)) < p for seed in range(EVAL_SEEDS)}


def build_root(root: Path, *, seed1_override: np.ndarray | None = None) -> Path:
    """rl-teacher-bridge, no-distill (evaluates bridge's warmup of the same seed) and direct-grpo.

    Each training seed's warmup has its own luck (-0.2, 0, +0.2 on every problem), which the bridge
    and no-distill both inherit; distill adds 0.1. direct-grpo's seeds have luck of their own.
    `seed1_override` replaces eval seed 1's samples of rl-teacher-bridge training seed 0.
    """
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0.25, 0.75, size=PROBLEMS)
    shared = RunDir(root / "shared")
    base = train_stage(shared, "sft-student", "sft", {}, "student base")
    teacher = train_stage(shared, "teacher-rl", "teacher-rl", {}, "rl teacher")
    for seed, luck in zip(TRAINING_SEEDS, (-0.2, 0.0, 0.2), strict=True):
        bridge_run = RunDir(root / "rl-teacher-bridge" / f"seed{seed}")
        warmup = train_stage(bridge_run, "warmup", "warmup", {"student": base, "teacher": teacher}, f"warmup {seed}")
        distill = train_stage(bridge_run, "distill", "distill", {"student": warmup, "teacher": teacher}, f"distill {seed}")
        bridge_samples = draw(rng, difficulty + luck + 0.1)
        if seed == 0 and seed1_override is not None:
            bridge_samples[1] = seed1_override
        eval_stage_with(bridge_run, distill, bridge_samples)
        eval_stage_with(RunDir(root / "no-distill" / f"seed{seed}"), warmup, draw(rng, difficulty + luck))
        grpo_run = RunDir(root / "direct-grpo" / f"seed{seed}")
        grpo = train_stage(grpo_run, "student-rl", "student-rl", {"model": base}, f"grpo {seed}")
        eval_stage_with(grpo_run, grpo, draw(rng, difficulty + (0.1, -0.1, 0.0)[seed]))
    return root


def comparison(summary: dict, variant: str, reference: str) -> dict:
    return next(c for c in summary["comparisons"] if (c["variant"], c["reference"]) == (variant, reference))


def test_every_eval_seed_enters_the_ci(tmp_path):
    """Only eval seed 1 of one training seed differs between the two roots: the CI must move with it."""
    all_wrong = np.zeros((PROBLEMS, SAMPLES), dtype=bool)
    first = report.run(build_root(tmp_path / "a"), out=tmp_path / "report-a", resamples=2000)
    second = report.run(build_root(tmp_path / "b", seed1_override=all_wrong), out=tmp_path / "report-b", resamples=2000)
    for summary in (first, second):
        c = comparison(summary, "rl-teacher-bridge", "direct-grpo")
        table = summary["variants"]
        # The CI is about the table's own numbers: the mean over training seeds of avg@k over eval seeds.
        expected = table["rl-teacher-bridge"][BENCH]["mean"] - table["direct-grpo"][BENCH]["mean"]
        assert c["diff"] == pytest.approx(expected, abs=1e-12)
    a, b = comparison(first, "rl-teacher-bridge", "direct-grpo"), comparison(second, "rl-teacher-bridge", "direct-grpo")
    assert b["diff"] < a["diff"] - 0.05
    assert (b["lo"], b["hi"]) != (a["lo"], a["hi"])
    # And the pooled rows really are all of the samples of both eval seeds.
    rows = report.eval_rows(report.eval_records(tmp_path / "b" / "rl-teacher-bridge" / "seed0")[(f"eval-{BENCH}", BENCH)])
    assert len(rows) == PROBLEMS and all(len(row["correct"]) == SAMPLES * EVAL_SEEDS for row in rows)


def test_shared_checkpoint_per_seed_is_paired_and_narrows_the_ci(tmp_path):
    root = build_root(tmp_path / "root")
    summary = report.run(root, out=tmp_path / "report", resamples=4000)
    shared = comparison(summary, "no-distill", "rl-teacher-bridge")
    unrelated = comparison(summary, "rl-teacher-bridge", "direct-grpo")
    assert shared["paired_seeds"] is True
    assert unrelated["paired_seeds"] is False  # the student base is shared by every seed: no reason to pair

    variants, _ = report.collect(root)
    m_a, _ = report.matrix(variants["no-distill"][BENCH])
    m_b, _ = report.matrix(variants["rl-teacher-bridge"][BENCH])
    independent = stats.bootstrap_diff_ci(m_a, m_b, n_resamples=4000, seed=0)
    assert shared["diff"] == pytest.approx(independent["diff"])
    # The warmup luck (+-0.2) is in both; paired, it cancels and the interval is several times narrower.
    assert (shared["hi"] - shared["lo"]) < 0.5 * (independent["hi"] - independent["lo"])
    assert shared["hi"] < 0 and independent["lo"] < 0 < independent["hi"]
    written = (tmp_path / "report" / "report.md").read_text()
    assert "| no-distill − rl-teacher-bridge | toy-test |" in written
    assert "| student seeds paired (shared checkpoint per seed) |" in written and "| student seeds independent |" in written


def test_a_missing_eval_seed_file_is_named(tmp_path):
    from sdd.errors import SddError

    root = build_root(tmp_path / "root")
    (root / "direct-grpo" / "seed2" / f"eval-{BENCH}" / "samples-seed1.jsonl").unlink()
    with pytest.raises(SddError, match=r"seed2/eval-toy-test/samples-seed1.jsonl is missing but its eval recorded 2 seeds"):
        report.run(root, out=tmp_path / "report", resamples=100)
