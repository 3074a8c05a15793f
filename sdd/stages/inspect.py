"""`sdd inspect`: one HTML page that shows where the dense signal lands, token by token.

Training logs give distill's reverse KL as one mean per step. This command takes a bridge stage of a
run dir (or any student and teacher checkpoints), lets the student answer N problems, and colours
every token of each answer by its KL to the teacher at that position; hovering a token shows the
teacher's top alternatives. Beside each answer: its verdict and the teacher's own answer to the same
problem. When the run holds both bridge stages (a warmup and the distill that starts from it) both
students are scored on the same problems, so the page shows how the KL moved between them.

The command reads top to bottom: which students and teachers (through the manifests), which problems
and sampling (the run's eval, as `sdd analyze` takes them: sdd/analysis/sampling.py), sample and
verify, score each token (sdd/analysis/tokens.py), write the page (sdd/analysis/inspect_page.py).
docs/inspect.md describes the page and what it shows on the toy.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

from sdd.analysis.pairs import Checkpoint, check_fingerprint, resolve_input
from sdd.analysis.sampling import SAMPLING_SEED, Settings, eval_settings, load_problems
from sdd.errors import SddError
from sdd.manifest import (
    MANIFEST_NAME,
    OutputIndex,
    RunDir,
    StageRecord,
    atomic_write_text,
    now_iso,
    recorded_checkpoint,
)
from sdd.names import slug

DEFAULT_PROBLEMS = 8
DEFAULT_TOP_K = 5
BRIDGE_STAGES = ("warmup", "distill")
# Samples per scoring forward pass: long samples of a large model must fit beside both models.
SCORE_BATCH = 4
# Token colours saturate at this quantile of every KL on the page, so one outlier does not wash out the rest.
COLOUR_QUANTILE = 0.99


@dataclasses.dataclass
class View:
    """One student scored against its teacher: a bridge stage's output, or a pair named on the command line."""

    label: str
    student: Checkpoint
    teacher: Checkpoint


def run(run_path: Path, *, stage: str | None = None, student: str | None = None, teacher: str | None = None,
        problems: int = DEFAULT_PROBLEMS, out: Path | None = None, top_k: int = DEFAULT_TOP_K, seed: int = SAMPLING_SEED,
        benchmark: str | None = None, data_dir: str | None = None, compare: bool = True) -> Path:
    """Write the page for `stage` (default distill) or for the --student/--teacher pair; returns its path."""
    run_dir = _check_request(Path(run_path), stage, student, teacher, problems, top_k)

    # 1. Who is scored against whom: the bridge stage (and its partner stage, when the run has both), or the pair.
    memo: dict[str, str] = {}
    if student:
        views = [View(_named(student, "student").label, _named(student, "student"), _named(teacher, "teacher"))]
        page_name = f"{slug(views[0].student.label)}__{slug(views[0].teacher.label)}"
    else:
        stage = stage or "distill"
        views = _bridge_views(run_dir, stage, compare)
        page_name = stage
    for view in views:
        check_fingerprint(view.student, memo)
        check_fingerprint(view.teacher, memo)
    selected = next(i for i, v in enumerate(views) if student or v.label == stage)

    # 2. The problems and the sampling, as the run's eval has them.
    settings = eval_settings(run_dir)
    problem_set = load_problems(run_dir, settings, benchmark, problems, data_dir, {})
    out = Path(out) if out else run_dir / "analysis" / f"inspect-{slug(page_name)}.html"

    # 3. Sample, verify and score: each teacher answers once; each student answers and is scored token by token.
    scored = _sample_and_score(views, problem_set.records, settings, seed, top_k)

    # 4. The page.
    from sdd.analysis import inspect_page

    document = _document(run_dir, views, selected, scored, problem_set, settings, seed, top_k,
                         command=_command(run_dir, stage, student, teacher, problems, out, top_k, seed, benchmark,
                                          data_dir, compare))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, inspect_page.render(document))
    for view in document["views"]:
        print(_summary_line(view))
    if document.get("change"):
        print(document["change"])
    print(f"page: {out}")
    return out


def _check_request(run_dir: Path, stage, student, teacher, problems: int, top_k: int) -> Path:
    if not (run_dir / MANIFEST_NAME).is_file():
        raise SddError(f"{run_dir} is not a run dir (no {MANIFEST_NAME}); pass the run dir of the stage to inspect")
    if problems < 1:
        raise SddError(f"--problems must be at least 1, got {problems}")
    if top_k < 1:
        raise SddError(f"--top-k must be at least 1, got {top_k}")
    if bool(student) != bool(teacher):
        raise SddError("--student and --teacher go together: name both checkpoints, or neither and use --stage")
    if student and stage:
        raise SddError("--stage and --student/--teacher are two ways to name the models; use one")
    RunDir(run_dir).read()  # a corrupt manifest stops here, with its own message
    return run_dir


def _named(path: str, role: str) -> Checkpoint:
    """A checkpoint named on the command line: the stage that wrote it when a manifest above it says so."""
    found = recorded_checkpoint(path)
    if found:
        return Checkpoint.recorded(found)
    if not Path(path).exists() and not (path.count("/") == 1 and not path.startswith((".", "/", "~"))):
        raise SddError(f"--{role} {path} is neither a directory nor a hub id (owner/name)")
    return Checkpoint(slug(Path(path).name), path, role)


def _bridge_views(run_dir: Path, stage: str, compare: bool) -> list[View]:
    """The stage's student and teacher; with `compare`, also its partner (the warmup a distill starts from,
    or the distill that starts from a warmup), warmup first."""
    records = RunDir(run_dir).records()
    present = ", ".join(f"{n} ({r.stage})" for n, r in records.items() if r.stage in BRIDGE_STAGES) or "none"
    record = records.get(stage)
    if record is None:
        raise SddError(f"no stage '{stage}' in {run_dir}; bridge stages here: {present}; or pass --student and --teacher")
    if record.stage not in BRIDGE_STAGES:
        raise SddError(f"stage '{stage}' is a {record.stage} stage; inspect a warmup or distill stage (here: {present}), "
                       "or pass --student and --teacher")
    if not record.done:
        raise SddError(f"stage '{stage}' in {run_dir} is {record.status}, not done; finish it (rerun its command) first")
    index = OutputIndex([run_dir])
    view = _view(run_dir, stage, record, index)
    if not compare:
        return [view]
    if record.stage == "distill":
        partner = _warmup_before(run_dir, record, index)
        return [partner, view] if partner else [view]
    for name, later in sorted(records.items(), key=lambda item: item[1].order):
        if later.stage == "distill" and later.done and "student" in later.inputs:
            start = resolve_input(run_dir, later.inputs["student"], "student", index)
            if start.stage == stage and Path(start.run or run_dir).resolve() == run_dir.resolve():
                return [view, _view(run_dir, name, later, index)]
    return [view]


def _view(run_dir: Path, name: str, record: StageRecord, index: OutputIndex) -> View:
    if "teacher" not in record.inputs:
        raise SddError(f"stage '{name}' in {run_dir} records no teacher input; pass --student and --teacher")
    student = Checkpoint.recorded(RunDir(run_dir).checkpoint(name, record, record.main_output("student")[0]))
    return View(name, student, resolve_input(run_dir, record.inputs["teacher"], "teacher", index))


def _warmup_before(run_dir: Path, distill: StageRecord, index: OutputIndex) -> View | None:
    """The warmup stage the distill's student came from, in this run dir or the one that recorded it."""
    if "student" not in distill.inputs:
        return None
    start = resolve_input(run_dir, distill.inputs["student"], "student", index)
    if not start.stage or not start.run:
        return None
    record = RunDir(start.run).record(start.stage)
    if record is None or record.stage != "warmup" or not record.done:
        return None
    return _view(Path(start.run), start.stage, record, index)


def _sample_and_score(views: list[View], records: list[dict], settings: Settings, seed: int, top_k: int) -> list[dict]:
    """Per view: the student's samples scored token by token, and the teacher's own samples, both verified."""
    from rich.progress import Progress
    from transformers import AutoConfig

    from sdd import data
    from sdd.analysis.sampling import load_model, release
    from sdd.analysis.tokens import score_samples
    from sdd.generation import SamplingParams, generate
    from sdd.models import load_tokenizer, shared_vocab_size
    from sdd.verify import score_completions

    trust = settings.trust_remote_code
    params = SamplingParams(n=1, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                            max_new_tokens=settings.max_new_tokens, seed=seed)
    golds = [r["answer"] for r in records]

    def answer(model, tokenizer, label: str):
        prompts = [data.render_prompt(tokenizer, r["problem"], settings.chat_template_kwargs) for r in records]
        with Progress(transient=True) as progress:
            task = progress.add_task(f"sampling {label}", total=len(prompts))
            completions = [group[0] for group in generate(model, tokenizer, prompts, params,
                                                          batch_size=settings.batch_size,
                                                          progress=lambda k: progress.advance(task, k))]
        verdicts = score_completions([c.text for c in completions], golds)
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        return prompt_ids, completions, [bool(v) for v in verdicts]

    results: list[dict] = [{} for _ in views]
    by_teacher: dict[str, list[int]] = {}
    for i, view in enumerate(views):
        by_teacher.setdefault(view.teacher.path, []).append(i)
    for indices in by_teacher.values():
        teacher = views[indices[0]].teacher
        teacher_tokenizer = load_tokenizer(teacher.path, trust_remote_code=trust)
        teacher_config = AutoConfig.from_pretrained(teacher.path, trust_remote_code=trust)
        teacher_model = load_model(teacher, settings)
        _, teacher_completions, teacher_verdicts = answer(teacher_model, teacher_tokenizer, f"teacher {teacher.label}")
        for i in indices:
            view = views[i]
            tokenizer = load_tokenizer(view.student.path, trust_remote_code=trust)
            vocab_size = shared_vocab_size(teacher_tokenizer, tokenizer, teacher_config,
                                           AutoConfig.from_pretrained(view.student.path, trust_remote_code=trust))
            student_model = load_model(view.student, settings)
            prompt_ids, completions, verdicts = answer(student_model, tokenizer, f"student {view.label}")
            samples = score_samples(student_model, teacher_model, tokenizer, prompt_ids,
                                    [c.token_ids for c in completions], vocab_size=vocab_size, top_k=top_k,
                                    batch_size=SCORE_BATCH)
            for sample, verdict in zip(samples, verdicts, strict=True):
                sample.correct = verdict
            results[i] = {"samples": samples, "completions": completions, "special": set(tokenizer.all_special_ids),
                          "teacher_completions": teacher_completions, "teacher_verdicts": teacher_verdicts}
            del student_model
            release()
        del teacher_model
        release()
    return results


def _document(run_dir: Path, views: list[View], selected: int, scored: list[dict], problem_set, settings: Settings,
              seed: int, top_k: int, *, command: str) -> dict:
    """Everything the page shows, as one JSON-able dict (embedded in the page)."""
    from sdd.analysis.tokens import summarize

    page_views = []
    every_kl = []
    for view, result in zip(views, scored, strict=True):
        samples = []
        for record, sample, completion, teacher_text, teacher_ok in zip(
                problem_set.records, result["samples"], result["completions"], result["teacher_completions"],
                result["teacher_verdicts"], strict=True):
            every_kl.extend(t.kl for t in sample.tokens)
            samples.append({
                "id": record["id"], "problem": record["problem"], "answer": record["answer"],
                "correct": sample.correct, "finish": completion.finish_reason, "kl_sum": sample.kl_sum,
                "special": [i for i, t in enumerate(sample.tokens) if t.token_id in result["special"]],
                "tokens": [[t.text, t.kl, t.student_p, t.teacher_p, [list(a) for a in t.teacher_top], t.teacher_rank]
                           for t in sample.tokens],
                "teacher": {"text": teacher_text.text, "correct": teacher_ok, "finish": teacher_text.finish_reason},
            })
        verdicts = result["teacher_verdicts"]
        page_views.append({"label": view.label, "student": _described(view.student, run_dir),
                           "teacher": _described(view.teacher, run_dir),
                           "summary": summarize(result["samples"]),
                           "teacher_accuracy": sum(verdicts) / len(verdicts), "samples": samples})
    scale = _quantile(every_kl, COLOUR_QUANTILE) or 1.0
    sampling = (f"temperature {settings.temperature}, top-p {settings.top_p}, top-k {settings.top_k}, at most "
                f"{settings.max_new_tokens} new tokens, seed {seed}, one sample per problem (taken from "
                f"{settings.taken_from})")
    return {
        "meta": {
            "title": f"sdd inspect: {run_dir.name} / " + " and ".join(v.label for v in views),
            "run": str(run_dir.resolve()),
            "problems": f"the first {len(problem_set.records)} problems of {problem_set.benchmark} ({problem_set.source})",
            "sampling": sampling,
            "kl": ("KL(p_student || p_teacher) at each token of the student's sample, temperature 1, nats; one forward "
                   "pass of each model over prompt + sample (sdd.losses.token_divergence, the formula distill trains "
                   f"on); hover: the teacher's top {top_k} next tokens"),
            "command": command,
            "made": now_iso(),
            "notes": (f"Token colour saturates at {scale:.3g} nats, the {COLOUR_QUANTILE:.0%} quantile of every token's "
                      "KL on the page. Correct = sdd.verify (math-verify on the last \\boxed{}) against the gold "
                      "answer. KL share, top 5% = the share of the summed KL carried by the 5% of tokens with the "
                      "highest KL. Mean KL on correct / incorrect samples is token-weighted."),
        },
        "selected": selected,
        "scale": scale,
        "change": _change(page_views) if len(page_views) == 2 else None,
        "views": page_views,
    }


def _described(checkpoint: Checkpoint, run_dir: Path) -> dict:
    """The checkpoint's record, and the name the page calls it by: its path from the run dir, or its hub id."""
    import os

    local = Path(checkpoint.path).exists()
    return {**checkpoint.describe(), "name": os.path.relpath(checkpoint.path, run_dir) if local else checkpoint.path}


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _fmt(value, pattern: str = "{:.3g}") -> str:
    return "–" if value is None else pattern.format(value)


def _change(views: list[dict]) -> str:
    a, b = views[0], views[1]
    sa, sb = a["summary"], b["summary"]
    pct = "{:.0%}"
    return (f"{a['label']} → {b['label']} on the same problems: token-mean KL {_fmt(sa['mean_kl'])} → "
            f"{_fmt(sb['mean_kl'])} nats; share of the KL in the top 5% of tokens {_fmt(sa['top5_share'], pct)} → "
            f"{_fmt(sb['top5_share'], pct)}; student accuracy {_fmt(sa['accuracy'], pct)} → {_fmt(sb['accuracy'], pct)}; "
            f"token-mean KL on correct samples {_fmt(sa['correct']['mean_kl'])} → {_fmt(sb['correct']['mean_kl'])}, "
            f"on incorrect ones {_fmt(sa['incorrect']['mean_kl'])} → {_fmt(sb['incorrect']['mean_kl'])}.")


def _summary_line(view: dict) -> str:
    s = view["summary"]
    pct = "{:.0%}"
    return (f"{view['label']}: {s['samples']} samples, {s['tokens']} tokens, accuracy {_fmt(s['accuracy'], pct)} "
            f"(teacher {_fmt(view['teacher_accuracy'], pct)}); token-mean KL {_fmt(s['mean_kl'])} nats; top 5% of "
            f"tokens carry {_fmt(s['top5_share'], pct)} of the KL; correct {_fmt(s['correct']['mean_kl'])} "
            f"({s['correct']['samples']}) vs incorrect {_fmt(s['incorrect']['mean_kl'])} ({s['incorrect']['samples']})")


def _command(run_dir, stage, student, teacher, problems, out, top_k, seed, benchmark, data_dir, compare) -> str:
    """The command line that makes this page again, every option spelled out."""
    argv = ["sdd", "inspect", str(run_dir)]
    argv += ["--student", student, "--teacher", teacher] if student else ["--stage", stage]
    argv += ["--problems", str(problems), "--top-k", str(top_k), "--seed", str(seed), "--out", str(out)]
    argv += ["--benchmark", benchmark] if benchmark else []
    argv += ["--data-dir", str(data_dir)] if data_dir else []
    argv += [] if compare else ["--no-compare"]
    return shlex.join(argv)
