"""`sdd report` under the two seed scopes: what the spread over seeds covers, and the CI that follows from it.

Two roots laid out as `sdd run` lays them out, with real manifests, checkpoint files whose
fingerprints link the stages, and eval samples drawn at known per-problem probabilities (the
builders of tests/test_report.py). In both, training the teacher with RL is worth +0.10 on every
problem, but each teacher-rl run has luck of its own (±0.2). Under `seed_scope: student` one teacher-rl
run is shared by every seed: its luck is one fixed draw and the spread over seeds never sees it.
Under `seed_scope: chain` every seed trains its own teacher (chain k), so the teacher's luck varies
between seeds, and the CI of rl-teacher-bridge − raw-teacher-bridge must be wider by about that much.
"""

import numpy as np
import pytest
from test_report import BENCH, PROBLEMS, draw, eval_stage_with, train_stage

from sdd import stats
from sdd.manifest import RunDir
from sdd.stages import report

SEEDS = (0, 1, 2)
TEACHER_LUCK = (-0.2, 0.0, 0.2)  # what each chain's teacher-rl run happened to get, on top of its +0.10
STUDENT_LUCK = (-0.01, 0.0, 0.01)  # the student stages' own luck, the same in both layouts


def build(root, scope: str):
    """raw-teacher-bridge and rl-teacher-bridge, 3 seeds; shared stages once (student) or per seed (chain)."""
    rng = np.random.default_rng(1)
    difficulty = rng.uniform(0.25, 0.6, size=PROBLEMS)
    chains = {}
    for seed in SEEDS:
        if scope == "chain" or not chains:
            run = RunDir(root / "shared" / f"seed{seed}") if scope == "chain" else RunDir(root / "shared")
            teacher = train_stage(run, "sft-teacher", "sft", {}, f"teacher bootstrap {seed}")
            rl = train_stage(run, "teacher-rl", "teacher-rl", {"model": teacher}, f"rl teacher {seed}")
            student = train_stage(run, "sft-student", "sft", {}, f"student bootstrap {seed}")
            luck = TEACHER_LUCK[seed] if scope == "chain" else TEACHER_LUCK[1]  # the one draw: the typical one
            eval_stage_with(run, rl, draw(rng, difficulty + 0.3 + luck), stage="eval-teacher-rl")
            chains[seed] = (teacher, rl, student, luck)
        teacher, rl, student, luck = chains[seed] if scope == "chain" else chains[0]
        for variant, which, effect in (("raw-teacher-bridge", teacher, 0.0), ("rl-teacher-bridge", rl, 0.1 + luck)):
            run = RunDir(root / variant / f"seed{seed}")
            warmup = train_stage(run, "warmup", "warmup", {"student": student, "teacher": which}, f"{variant} w {seed}")
            distill = train_stage(run, "distill", "distill", {"student": warmup, "teacher": which}, f"{variant} d {seed}")
            eval_stage_with(run, distill, draw(rng, difficulty + effect + STUDENT_LUCK[seed]))
    return root


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = {}
    for scope in ("student", "chain"):
        base = tmp_path_factory.mktemp(scope)
        out[scope] = (report.run(build(base / "root", scope), out=base / "report", resamples=4000), base)
    return out


def comparison(summary: dict) -> dict:
    return next(c for c in summary["comparisons"]
                if (c["variant"], c["reference"]) == ("rl-teacher-bridge", "raw-teacher-bridge"))


def test_the_scope_is_read_from_the_manifests(reports):
    student, _ = reports["student"]
    chain, _ = reports["chain"]
    shared = student["variants"]["rl-teacher-bridge"][BENCH]["seed_scope"]
    assert shared["scope"] == "student" and shared["shared_stages"] == ["sft-student", "sft-teacher", "teacher-rl"]
    assert student["variants"]["raw-teacher-bridge"][BENCH]["seed_scope"]["shared_stages"] == ["sft-student", "sft-teacher"]
    assert chain["variants"]["rl-teacher-bridge"][BENCH]["seed_scope"] == {
        "scope": "chain", "shared_stages": [], "unit": "chains",
        "words": "seed scope chain: 3 chains, every training stage (teacher and student) redrawn per seed"}
    assert comparison(student)["seed_scope"]["scope"] == "student"
    assert comparison(chain)["seed_scope"]["scope"] == "chain"
    # the teacher's eval, per chain, becomes one row with its spread over chains
    teacher = chain["reference"]["shared:eval-teacher-rl"][BENCH]
    assert teacher["chains"] == 3 and len(teacher["per_seed"]) == 3 and teacher["std"] > 0.1
    assert "chains" not in student["reference"]["shared:eval-teacher-rl"][BENCH]


def test_chains_are_resampled_as_units_and_their_variance_widens_the_ci(reports):
    student, chain = comparison(reports["student"][0]), comparison(reports["chain"][0])
    # both variants of seed k descend from chain k's bootstrap: chains are drawn as units, paired
    assert chain["paired_seeds"] is True
    width_student, width_chain = student["hi"] - student["lo"], chain["hi"] - chain["lo"]
    # three teacher draws of +-0.2 around the same mean: the interval holds their spread, the student scope's cannot
    assert width_chain > 2 * width_student, (width_student, width_chain)
    assert student["significant"] and student["lo"] > 0  # with one teacher run the gain looks certain...
    assert not chain["significant"] and chain["lo"] < 0  # ...across teacher runs it is not

    # The interval is the bootstrap of the report's own matrices, chains paired; unpaired it would be wider still
    variants, _ = report.collect(reports["chain"][1] / "root")
    m_rl, _ = report.matrix(variants["rl-teacher-bridge"][BENCH])
    m_raw, _ = report.matrix(variants["raw-teacher-bridge"][BENCH])
    again = stats.bootstrap_diff_ci(m_rl, m_raw, n_resamples=4000, seed=0, paired_seeds=True)
    assert (again["lo"], again["hi"]) == (chain["lo"], chain["hi"])


def test_every_spread_and_ci_states_its_scope(reports):
    for scope, unit, resampled in (("student", "student seeds", "independent"), ("chain", "chains", "paired")):
        summary, base = reports[scope]
        markdown = (base / "report" / "report.md").read_text()
        rows = [line for line in markdown.splitlines() if line.startswith("| rl-teacher-bridge")]
        spread_row, ci_row = rows
        assert f"(n=3 {unit})" in spread_row
        assert f"| {unit} {resampled}" in ci_row and f"seed scope {scope}:" in ci_row
    chain_md = (reports["chain"][1] / "report" / "report.md").read_text()
    assert "\nSeed scope chain: 3 chains, every training stage (teacher and student) redrawn per seed.\n" in chain_md
    assert "| shared:eval-teacher-rl |" in chain_md and "(n=3 chains)" in chain_md.split("## Shared checkpoints")[1]
    student_md = (reports["student"][1] / "report" / "report.md").read_text()
    assert "share sft-student, sft-teacher, teacher-rl (run once), whose luck the spread leaves out" in student_md
