"""`sdd analyze` on a real toy run tree: the pairs found through the manifests, the sample cache, every
measure against a direct computation, skipping and --force, bad requests, and the report section."""

import itertools
import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from sdd import analysis
from sdd.errors import SddError
from sdd.manifest import RunDir


def brute_force_pass_at_k(correct: list[bool], k: int) -> float:
    """Share of the k-subsets of one problem's samples that hold a correct one: what pass@k estimates."""
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in subset) for subset in subsets) / len(subsets)


# --------------------------------------------------------------------------------------------------
# The command on a real toy run tree: shared bootstrap SFT, and one bridge stage at two training seeds.

SFT_STEPS = 100


def tiny_config(run: Path) -> dict:
    """The toy's config.yaml cut to seconds: a short student SFT that learns the answer format (the sums
    take thousands of steps), a 3-step warmup, and a small eval section (whose settings analyze samples with)."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    for section in ("sft-teacher", "sft-student", "teacher-sft"):
        config.pop(section, None)
    config["sft"].update({"max_steps": SFT_STEPS, "per_device_train_batch_size": 32, "save_steps": 1000,
                          "logging_steps": 40, "warmup_steps": 10,
                          "lr_scheduler_kwargs": {"num_decay_steps": 50, "min_lr_ratio": 0.05}})
    config["warmup"].update({"prompts": 24, "heldout_prompts": 8, "samples_per_prompt": 1, "max_new_tokens": 48,
                             "max_steps": 3, "per_device_train_batch_size": 8, "logging_steps": 1, "save_steps": 3,
                             "learning_rate": 3e-3})
    config["eval"] = {"benchmark": ["toy-test"], "samples": 2, "max_new_tokens": 48, "limit": 24}
    return config


def sdd(*argv) -> None:
    from sdd.cli import run_in_process
    from sdd.experiment.execute import OK

    outcome, message = run_in_process([str(a) for a in argv])
    assert outcome == OK, message


@pytest.fixture(scope="module")
def analysed_root(tmp_path_factory) -> Path:
    """ROOT/shared: toy (one-step sums) + student SFT; ROOT/bridge/seed{0,1}: warmup on the untrained toy
    teacher, so the warmup visibly moves the student toward it. The layout of `sdd run`; then `sdd analyze ROOT`."""
    from sdd.stages import toy_init

    root = tmp_path_factory.mktemp("analyze") / "root"
    shared = root / "shared"
    toy_init.run(shared, seed=0, min_terms=2, max_terms=2, n_train=1000, n_test=40)
    (shared / "config.yaml").write_text(yaml.safe_dump(tiny_config(shared)))
    sdd("sft", "--run", shared, "--role", "student")
    for seed in (0, 1):
        run = root / "bridge" / f"seed{seed}"
        RunDir(run).create()
        for name in ("train", "test"):
            RunDir(run).register_dataset(f"toy-{name}", shared / "toy" / "data" / f"{name}.jsonl")
        shutil.copy(shared / "config.yaml", run / "config.yaml")
        sdd("warmup", "--run", run, "--teacher", shared / "toy" / "teacher-base",
            "--student", shared / "sft-student" / "final", "--set", f"seed={seed}", "--set", f"sample_seed={seed}")
    sdd("eval", "--run", shared, "--role", "student", "--limit", "16")  # what `sdd report` tabulates
    sdd("analyze", root, "--samples", "6", "--limit", "16")
    return root


def pair_json(root: Path, run: str, name: str) -> dict:
    return json.loads((root / run / "analysis" / name).read_text())


def cached_rows(root: Path, checkpoint: dict) -> list[dict]:
    matches = []
    for file in (root / "analysis" / "samples").glob("*.jsonl"):
        lines = file.read_text().splitlines()
        if json.loads(lines[0])["provenance"]["checkpoint"] == checkpoint["fingerprint"]:
            matches.append([json.loads(line) for line in lines[1:]])
    assert len(matches) == 1
    return matches[0]


def test_every_training_stage_is_analysed_once_and_samples_once_per_checkpoint(analysed_root):
    root = analysed_root
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("analysis/*.json")) == [
        "analysis/overlap__bridge__warmup__seed0-seed1.json",
        "bridge/seed0/analysis/sft-student__warmup.json",
        "bridge/seed1/analysis/sft-student__warmup.json",
        "shared/analysis/toy-init__sft-student.json",
    ]
    # toy-init student, sft-student, two warmups, the toy teacher: each sampled once for all pairs
    assert len(list((root / "analysis" / "samples").glob("*.jsonl"))) == 5
    doc = pair_json(root, "bridge/seed0", "sft-student__warmup.json")
    assert doc["from"]["stage"] == "sft-student" and doc["from"]["run"] == str((root / "shared").resolve())
    assert doc["to"]["path"] == str((root / "bridge" / "seed0" / "warmup" / "final").resolve())
    assert doc["prompts"]["benchmark"] == "toy-test" and doc["prompts"]["count"] == 16
    assert doc["sampling"] | {"taken_from": None} == {
        "n": 6, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_new_tokens": 48, "seed": 0,
        "chat_template_kwargs": {"enable_thinking": False}, "backend": "hf", "taken_from": None}


def test_sparsity_and_seed_overlap_match_a_direct_comparison(analysed_root):
    root = analysed_root
    base = load_file(root / "shared" / "sft-student" / "final" / "model.safetensors")
    seeds = [load_file(root / "bridge" / f"seed{s}" / "warmup" / "final" / "model.safetensors") for s in (0, 1)]
    changed = [{k: seed[k] != base[k] for k in base} for seed in seeds]  # fp32 files: the rule is exact inequality
    doc = pair_json(root, "bridge/seed0", "sft-student__warmup.json")["sparsity"]
    total = sum(t.numel() for t in base.values())
    assert doc["total"]["parameters"] == total
    assert doc["total"]["changed"] == sum(int(m.sum()) for m in changed[0].values())
    for tensor in doc["tensors"]:
        assert tensor["changed"] == int(changed[0][tensor["name"]].sum()), tensor["name"]
    assert sum(t["parameters"] for t in doc["by_type"].values()) == total
    assert sum(e["parameters"] for e in doc["by_layer"]) == sum(t.numel() for k, t in base.items() if ".layers." in k)
    assert 0 < doc["effective_rank"]["sampled"] <= analysis.RANK_MATRICES
    both = sum(int((changed[0][k] & changed[1][k]).sum()) for k in base)
    either = sum(int((changed[0][k] | changed[1][k]).sum()) for k in base)
    overlap = json.loads((root / "analysis" / "overlap__bridge__warmup__seed0-seed1.json").read_text())
    assert overlap["same_base"] and overlap["total"]["jaccard"] == pytest.approx(both / either)


def test_capability_is_what_the_verifier_says_about_the_cached_samples(analysed_root):
    from sdd.verify import is_correct

    root = analysed_root
    doc = pair_json(root, "shared", "toy-init__sft-student.json")
    curves = {}
    for side in ("from", "to"):
        rows = cached_rows(root, doc[side])
        assert [r["id"] for r in rows] == doc["capability"]["ids"]
        for row in rows:
            assert row["correct"] == [is_correct(text, row["answer"]) for text in row["completions"]]
        curves[side] = [sum(brute_force_pass_at_k(r["correct"], k) for r in rows) / len(rows) for k in range(1, 7)]
        assert doc["capability"]["pass_at_k"][side] == pytest.approx(curves[side])
    assert curves["from"][-1] == 0.0  # the random base model never writes a boxed answer
    counts = doc["capability"]["correct_counts"]
    assert doc["capability"]["gained"] == [i for i, a, b in zip(doc["capability"]["ids"], counts["from"], counts["to"],
                                                                strict=True) if a == 0 < b]
    assert doc["capability"]["lost"] == [i for i, a, b in zip(doc["capability"]["ids"], counts["from"], counts["to"],
                                                              strict=True) if a > 0 == b]
    # SFT taught the format whatever the arithmetic: the boxed share jumps from none to most samples
    assert doc["diversity"]["from"]["answered_rate"] == 0.0 and doc["diversity"]["to"]["answered_rate"] > 0.5


def test_samples_are_the_seeded_samples_of_that_checkpoint(analysed_root):
    """The cache holds what sampling that checkpoint with the recorded settings gives, prompt by prompt."""
    from sdd import data
    from sdd.generation import SamplingParams, generate
    from sdd.models import load_causal_lm, load_tokenizer

    root = analysed_root
    doc = pair_json(root, "bridge/seed1", "sft-student__warmup.json")
    rows = cached_rows(root, doc["to"])
    model, tokenizer = load_causal_lm(doc["to"]["path"]), load_tokenizer(doc["to"]["path"])
    problems = data.load(data.resolve("toy-test", registered=RunDir(root / "bridge" / "seed1").datasets()), limit=16)
    s = doc["sampling"]
    params = SamplingParams(n=s["n"], temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"],
                            max_new_tokens=s["max_new_tokens"], seed=s["seed"])
    # a prompt's samples depend on its index in the list (and nothing else), so the first two match
    fresh = generate(model, tokenizer, [data.render_prompt(tokenizer, p["problem"]) for p in problems[:2]], params)
    assert [[c.token_ids for c in group] for group in fresh] == [r["token_ids"] for r in rows[:2]]


def test_teacher_agreement_shows_warmup_moving_toward_its_teacher(analysed_root):
    root = analysed_root
    bootstrap = pair_json(root, "shared", "toy-init__sft-student.json")["teacher_agreement"]
    assert bootstrap == {"skipped": "sft trains without a teacher"}
    agreement = pair_json(root, "bridge/seed0", "sft-student__warmup.json")["teacher_agreement"]
    assert agreement["teacher"]["path"] == str((root / "shared" / "toy" / "teacher-base").resolve())
    for where in ("on_student_samples", "on_teacher_samples"):
        for side in ("from", "to"):
            values = agreement[where][side]
            assert values["tokens"] > 0 and values["reverse_kl"] >= 0 and values["forward_kl"] >= 0
    # warmup minimises forward KL on teacher samples (of training prompts); on test prompts it must fall too
    teacher_samples = agreement["on_teacher_samples"]
    assert teacher_samples["to"]["forward_kl"] < teacher_samples["from"]["forward_kl"]


def test_rerun_skips_and_force_recomputes_without_resampling(analysed_root, capsys):
    root = analysed_root
    files = sorted(root.rglob("analysis/*.json"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    samples = {f: f.stat().st_mtime_ns for f in (root / "analysis" / "samples").glob("*.jsonl")}
    sdd("analyze", root, "--samples", "6", "--limit", "16")
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert capsys.readouterr().out.count("skip") == len(files)
    sdd("analyze", root / "bridge" / "seed0", "--from", "sft-student", "--to", "warmup", "--samples", "6",
        "--limit", "16", "--force")
    target = root / "bridge" / "seed0" / "analysis" / "sft-student__warmup.json"
    assert target.stat().st_mtime_ns != stamps[target]
    assert {f: f.stat().st_mtime_ns for f in (root / "analysis" / "samples").glob("*.jsonl")} == samples
    assert not (root / "bridge" / "seed0" / "analysis" / "samples").exists()


def test_bad_requests_say_what_to_fix(analysed_root):
    from sdd.stages import analyze

    run = analysed_root / "bridge" / "seed0"
    with pytest.raises(SddError, match=r"no stage 'distil' in .*stages present: warmup"):
        analyze.run(run, to_stage="distil")
    with pytest.raises(SddError, match=r"no stage 'sft' .*inputs of warmup: teacher: toy-init, student: sft-student"):
        analyze.run(run, from_stage="sft", to_stage="warmup")
    with pytest.raises(SddError, match="--from needs --to"):
        analyze.run(run, from_stage="warmup")
    with pytest.raises(SddError, match="not a run dir"):
        analyze.run(analysed_root, to_stage="warmup")
    RunDir(run).begin("distill", stage="distill", role="student", config={}, inputs={})
    RunDir(run).end("distill", "failed", error="boom")
    try:
        with pytest.raises(SddError, match=r"stage 'distill' in .* is failed, not done"):
            analyze.run(run, to_stage="distill")
    finally:
        RunDir(run).update(lambda manifest: manifest["stages"].pop("distill"))


def test_report_carries_the_analysis_naming_checkpoints_prompts_and_seeds(analysed_root, tmp_path):
    from sdd.stages import report
    from sdd.stages.analyze import report_section

    summary = report.run(analysed_root, out=tmp_path / "report", resamples=100)
    written = (tmp_path / "report" / "report.md").read_text()
    assert "## What each stage changed" in written and len(summary["analysis"]["pairs"]) == 3
    assert "![analysis-P2-bridge-seed0-sft-student__warmup](analysis-P2-bridge-seed0-sft-student__warmup.png)" in written
    markdown, data_out, plots = report_section(analysed_root, tmp_path)
    for heading in ("Update sparsity", "Overlap of the changed sets", "Capability boundary", "Diversity",
                    "Teacher agreement"):
        assert f"### {heading}" in markdown
    assert "| P2 | bridge/seed0 | sft-student (`shared/sft-student/final`) | warmup (`bridge/seed0/warmup/final`) " \
           "| toy-test (16 problems) | 6 | seed 0," in markdown
    assert len(data_out["pairs"]) == 3 and len(data_out["overlaps"]) == 1
    assert len(plots) == 3 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    assert report_section(analysed_root / "shared" / "toy", tmp_path) == ("", {}, [])


def test_student_rl_finds_its_teacher_through_the_manifests(analysed_root, tmp_path):
    """student-rl names no teacher: after a bridge it is the bridge's teacher, found by walking the inputs back;
    on the base student (direct GRPO) there is none. Records are written as the stages write them."""
    from sdd.analysis.pairs import find_teacher, named_pair
    from sdd.manifest import OutputIndex as Index

    root = analysed_root
    warmup_dir = root / "bridge" / "seed0"
    warmup_out = RunDir(warmup_dir).stage("warmup")["outputs"]["student"]
    sft_out = RunDir(root / "shared").stage("sft-student")["outputs"]["student"]
    cases = {
        "after-bridge": {"path": str(warmup_dir / warmup_out["path"]), "from_stage": "warmup",
                         "run": str(warmup_dir), "fingerprint": warmup_out["fingerprint"]},
        "direct": {"path": str(root / "shared" / sft_out["path"]), "from_stage": "sft-student",
                   "run": str(root / "shared"), "fingerprint": sft_out["fingerprint"]},
    }
    found = {}
    for case, model_input in cases.items():
        run = RunDir(tmp_path / case)
        run.create()
        run.begin("student-rl", stage="student-rl", role="student", config={}, inputs={})
        run.update(lambda manifest, model_input=model_input: manifest["stages"]["student-rl"].update(
            inputs={"model": model_input}))
        shutil.copytree(root / "bridge" / "seed1" / "warmup" / "final", run.path / "student-rl" / "final")
        run.end("student-rl", "done", outputs={"student": run.output_entry(run.path / "student-rl" / "final")})
        found[case] = find_teacher(named_pair(run.path, None, "student-rl", Index([run.path])), Index([run.path]))
    teacher, how = found["after-bridge"]
    assert teacher.path == str((root / "shared" / "toy" / "teacher-base").resolve()) and "warmup" in how
    assert found["direct"][0] is None and "never learned from one" in found["direct"][1]


def test_a_new_measure_is_one_registry_entry(analysed_root, tmp_path, monkeypatch, capsys):
    """One more Measure in the registry, and nothing else: the next `sdd analyze` redoes the pair files that lack
    it (from the cached samples) and puts it in each pair's JSON and console line; `sdd report` gets its table
    and its report.json section, without the keys it drops."""
    from sdd.analysis import measures
    from sdd.stages.analyze import report_section

    def solved_share(context: measures.PairContext) -> dict:
        return {side: sum(any(r["correct"]) for r in rows) / len(rows)
                for side, rows in (("from", context.rows_from), ("to", context.rows_to))} | {
            "per_problem": [any(r["correct"]) for r in context.rows_to]}

    def table(report: measures.ReportContext) -> list[str]:
        return ["", "### Solved at some k", "", "| pair | from → to |", "|---|---|",
                *(f"| {row['id']} | {row['doc']['solved']['from']:.3f} → {row['doc']['solved']['to']:.3f} |"
                  for row in report.rows)]

    new = measures.Measure("solved", solved_share, lambda s: f"solved share {s['from']:.3f}->{s['to']:.3f}", table,
                           report_drop=("per_problem",))
    monkeypatch.setattr(measures, "MEASURES", (*measures.MEASURES, new))
    samples = {f: f.stat().st_mtime_ns for f in (analysed_root / "analysis" / "samples").glob("*.jsonl")}
    sdd("analyze", analysed_root, "--samples", "6", "--limit", "16")
    console = capsys.readouterr().out
    assert console.count("lacks solved; redoing it") == 3 and console.count("solved share ") == 3
    assert {f: f.stat().st_mtime_ns for f in (analysed_root / "analysis" / "samples").glob("*.jsonl")} == samples
    for run, name in (("shared", "toy-init__sft-student.json"), ("bridge/seed0", "sft-student__warmup.json")):
        doc = pair_json(analysed_root, run, name)
        cap = doc["capability"]
        assert doc["solved"]["from"] == cap["solved"]["from"] / cap["problems"]
        assert doc["solved"]["to"] == cap["solved"]["to"] / cap["problems"]
        assert doc["solved"]["per_problem"] == [count > 0 for count in cap["correct_counts"]["to"]]
    markdown, data_out, _ = report_section(analysed_root, tmp_path)
    assert "### Solved at some k" in markdown and "| P1 | " in markdown
    assert all(set(pair["solved"]) == {"from", "to"} for pair in data_out["pairs"])
