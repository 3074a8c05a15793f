"""The analysis measures, one registry entry each: how it is computed, headlined, tabulated and plotted.

A pair document (`<run dir>/analysis/<from>__<to>.json`) holds one section per entry of MEASURES,
under the entry's `key`. To add a measure, write one `Measure(...)` here, next to the others:

    compute(context) -> dict           its section of the pair document (the pure measure lives in
                                       weights.py / completions.py, or sdd/agreement.py)
    headline(section) -> str | None    its part of the one console line per pair (None: nothing to say)
    table(report) -> list[str]         its markdown table in `sdd report`, one row per pair
    report_drop                        keys of its section report.json leaves out (bulky per-item detail)
    panel                              optionally, a plot of it in the pair's figure

and document it in docs/analyze.md. Pair documents written before the measure existed lack its
section and are redone on the next `sdd analyze` (`same_analysis`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from sdd import data
from sdd.analysis import completions, weights
from sdd.analysis.pairs import (
    PAIR_KIND,
    SCHEMA,
    Pair,
    check_fingerprint,
    find_teacher,
    weights_dir,
)
from sdd.analysis.sampling import (
    Problems,
    Settings,
    cached_samples,
    load_model,
    release,
    sampling_record,
)
from sdd.analysis.text import fmt, pct, rel
from sdd.errors import SddError
from sdd.manifest import OutputIndex, library_versions, now_iso

# Samples per problem scored for teacher agreement: two forward passes (student and teacher) per
# sequence and direction, so the KL costs a fraction of the sampling instead of a multiple of it.
KL_SAMPLES_PER_PROBLEM = 4


@dataclasses.dataclass
class PairContext:
    """Everything a measure may use for one pair: the checkpoints, both sets of samples, and how they were drawn."""

    pair: Pair
    rows_from: list[dict]
    rows_to: list[dict]
    problems: Problems
    settings: Settings
    samples: int
    cache_dir: Path
    index: OutputIndex
    memo: dict  # checkpoint path -> fingerprint, computed once per run


@dataclasses.dataclass
class ReportContext:
    """What a measure's report table draws on: the analysed root, one row per pair document, the seed overlaps."""

    root: Path
    rows: list[dict]  # {"id", "file", "run", "label", "doc"}
    overlaps: list[tuple[Path, dict]]


@dataclasses.dataclass(frozen=True)
class Panel:
    draw: Callable  # (matplotlib Axes, pair document) -> None
    position: int  # left to right in the pair's figure


@dataclasses.dataclass(frozen=True)
class Measure:
    key: str
    compute: Callable[[PairContext], dict]
    headline: Callable[[dict], str | None]
    table: Callable[[ReportContext], list[str]]
    report_drop: tuple[str, ...] = ()
    panel: Panel | None = None


# --------------------------------------------------------------------------------------------------
# 1. Update sparsity (and, across seeds, its overlap).


def _sparsity(context: PairContext) -> dict:
    try:
        return weights.compare_weights(weights_dir(context.pair.before), weights_dir(context.pair.after))
    except SddError as err:
        return {"skipped": str(err)}


def _sparsity_headline(sparse: dict) -> str:
    if "skipped" in sparse:
        return "sparsity skipped"
    return f"changed {pct(sparse['total']['fraction'])} (bf16 res. {pct(sparse['total']['fraction_bf16'])})"


def _sparsity_table(report: ReportContext) -> list[str]:
    lines = ["", "### Update sparsity (share of parameters changed; per type at the stored dtype's resolution)", "",
             "| pair | all | all at bf16 res. | " + " | ".join(weights.LAYER_TYPES[:9]) + " | update eff. rank / max (median) |",
             "|---" * 13 + "|"]
    for row in report.rows:
        sparse = row["doc"]["sparsity"]
        if "skipped" in sparse:
            lines.append(f"| {row['id']} {row['label']} | skipped: {sparse['skipped']} |" + " |" * 11)
            continue
        by_type = sparse["by_type"]
        cells = [pct(by_type[k]["fraction"]) if k in by_type else "" for k in weights.LAYER_TYPES[:9]]
        lines.append(f"| {row['id']} {row['label']} | {pct(sparse['total']['fraction'])} | "
                     f"{pct(sparse['total']['fraction_bf16'])} | " + " | ".join(cells) +
                     f" | {fmt(sparse['effective_rank']['median_ratio'], 2)} |")
    if report.overlaps:
        lines += ["", "### Overlap of the changed sets across training seeds (Jaccard; chance = random placement "
                  "within each tensor)", "", "| variant | stage | seeds | same start | Jaccard | chance | Jaccard at "
                  "bf16 res. | chance at bf16 res. | checkpoints |", "|---|---|---|---|---|---|---|---|---|"]
        for _, doc in report.overlaps:
            total = doc["total"]
            lines.append(f"| {doc['variant']} | {doc['stage']} | {doc['a']['seed']}, {doc['b']['seed']} | "
                         f"{'yes' if doc['same_base'] else 'no'} | {fmt(total['jaccard'])} | "
                         f"{fmt(total['chance_jaccard'])} | {fmt(total['jaccard_bf16'])} | "
                         f"{fmt(total['chance_jaccard_bf16'])} | `{rel(report.root, doc['a']['to']['path'])}`, "
                         f"`{rel(report.root, doc['b']['to']['path'])}` |")
    return lines


def _sparsity_panel(layers, doc: dict) -> None:
    """Per-layer share of parameters changed, by type and overall, at both resolutions."""
    import matplotlib.ticker

    sparse = doc["sparsity"]
    if "skipped" in sparse or not sparse["by_layer"]:
        layers.text(0.5, 0.5, "no per-layer sparsity\n" + sparse.get("skipped", "")[:80], ha="center", va="center",
                    fontsize=8, wrap=True)
        layers.set_axis_off()
        return
    indices = [entry["layer"] for entry in sparse["by_layer"]]
    kinds = sorted({k for entry in sparse["by_layer"] for k in entry["by_type"]})
    for kind in kinds:
        values = [100 * entry["by_type"][kind]["fraction"] if kind in entry["by_type"] else float("nan")
                  for entry in sparse["by_layer"]]
        layers.plot(indices, values, marker=".", linewidth=1, label=kind)
    layers.plot(indices, [100 * entry["fraction"] for entry in sparse["by_layer"]], "k-", linewidth=2, label="all")
    layers.plot(indices, [100 * entry["fraction_bf16"] for entry in sparse["by_layer"]], "k--", linewidth=1.5,
                label="all, at bf16 res.")
    layers.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    layers.set_xlabel("layer")
    layers.set_ylabel("parameters changed (%)")
    layers.set_ylim(0, 105)
    layers.legend(fontsize=6, ncol=2)
    layers.set_title("update sparsity per layer (by type: stored-dtype resolution)", fontsize=9)


# --------------------------------------------------------------------------------------------------
# 2. Capability boundary.


def _capability(context: PairContext) -> dict:
    rows_from, rows_to = context.rows_from, context.rows_to
    return completions.capability([r["id"] for r in rows_from], [r["correct"] for r in rows_from],
                                  [r["correct"] for r in rows_to])


def _capability_headline(cap: dict) -> str:
    k = cap["samples_per_problem"]
    return (f"pass@1 {fmt(cap['pass_at_k']['from'][0])}->{fmt(cap['pass_at_k']['to'][0])}, pass@{k} "
            f"{fmt(cap['pass_at_k']['from'][-1])}->{fmt(cap['pass_at_k']['to'][-1])}, lost {len(cap['lost'])}, "
            f"gained {len(cap['gained'])}")


def _capability_table(report: ReportContext) -> list[str]:
    lines = ["", "### Capability boundary (pass@k from K samples per problem, same prompts and seeds)", "",
             "| pair | prompts | pass@1 from → to | pass@K from → to | solved at some k ≤ K from → to | lost | gained "
             "| crossover k |", "|---|---|---|---|---|---|---|---|"]
    for row in report.rows:
        cap, prompts = row["doc"]["capability"], row["doc"]["prompts"]
        curve = cap["pass_at_k"]
        lines.append(
            f"| {row['id']} {row['label']} | {prompts['benchmark']} ({cap['problems']}) | {fmt(curve['from'][0])} → "
            f"{fmt(curve['to'][0])} | pass@{cap['samples_per_problem']} {fmt(curve['from'][-1])} → "
            f"{fmt(curve['to'][-1])} | {cap['solved']['from']} → {cap['solved']['to']} | {len(cap['lost'])} | "
            f"{len(cap['gained'])} | {cap['crossover_k'] or '–'} |")
    return lines


def _capability_panel(curves, doc: dict) -> None:
    """pass@k curves of both checkpoints on the same problems."""
    cap, prompts = doc["capability"], doc["prompts"]
    for side, style in (("from", "--"), ("to", "-")):
        curves.plot(cap["k"], cap["pass_at_k"][side], style, marker="o", markersize=3, label=doc[side]["label"])
    curves.set_xscale("log", base=2)
    curves.set_xlabel("k")
    curves.set_ylabel("pass@k")
    curves.set_ylim(0, 1)
    curves.legend(fontsize=8)
    curves.set_title(f"pass@k on {prompts['benchmark']} ({prompts['count']} problems)", fontsize=9)


# --------------------------------------------------------------------------------------------------
# 3. Diversity.


def _diversity(context: PairContext) -> dict:
    return {"from": completions.diversity(context.rows_from), "to": completions.diversity(context.rows_to)}


def _diversity_headline(div: dict) -> str:
    return f"distinct answers {fmt(div['from']['distinct_answer_rate'], 2)}->{fmt(div['to']['distinct_answer_rate'], 2)}"


def _diversity_table(report: ReportContext) -> list[str]:
    lines = ["", "### Diversity over the K samples of each problem (mean over problems)", "",
             "| pair | distinct answers | boxed | distinct-2 | distinct-3 | mean length (tokens) | truncated | "
             "format entropy (bits, max log2 K) |", "|---|---|---|---|---|---|---|---|"]
    for row in report.rows:
        div = row["doc"]["diversity"]
        a, b = div["from"], div["to"]
        lines.append(
            f"| {row['id']} {row['label']} | {fmt(a['distinct_answer_rate'], 2)} → {fmt(b['distinct_answer_rate'], 2)} | "
            f"{pct(a['answered_rate'])} → {pct(b['answered_rate'])} | {fmt(a['distinct_2'], 2)} → "
            f"{fmt(b['distinct_2'], 2)} | {fmt(a['distinct_3'], 2)} → {fmt(b['distinct_3'], 2)} | "
            f"{a['length']['mean']:.1f} → {b['length']['mean']:.1f} | {pct(a['length']['truncation_rate'])} → "
            f"{pct(b['length']['truncation_rate'])} | {fmt(a['format']['entropy_bits'], 2)} → "
            f"{fmt(b['format']['entropy_bits'], 2)} (max {fmt(b['format']['entropy_bits_max'], 2)}) |")
    return lines


# --------------------------------------------------------------------------------------------------
# 4. Teacher agreement.


def _teacher_agreement(context: PairContext) -> dict:
    """Token-mean reverse KL(S||T) and forward KL(T||S) of each student, on its own and on the teacher's samples."""
    pair, settings, problems = context.pair, context.settings, context.problems
    if pair.after.role != "student":
        return {"skipped": f"{pair.after.label} is a {pair.after.role} checkpoint; teacher agreement is measured "
                           "for students"}
    teacher, how = find_teacher(pair, context.index)
    if teacher is None:
        return {"skipped": how}
    check_fingerprint(teacher, context.memo)
    from transformers import AutoConfig

    from sdd.agreement import Sequence, mean_divergence
    from sdd.models import load_tokenizer, shared_vocab_size

    trust = settings.trust_remote_code
    teacher_tokenizer = load_tokenizer(teacher.path, trust_remote_code=trust)
    teacher_config = AutoConfig.from_pretrained(teacher.path, trust_remote_code=trust)
    rows_teacher = cached_samples(teacher, problems, settings, context.samples, context.cache_dir)
    per_problem = min(KL_SAMPLES_PER_PROBLEM, context.samples)
    result = {"teacher": teacher.describe(), "found": how, "samples_per_problem": per_problem,
              "teacher_pass_at_1": completions.pass_at_k_curve([r["correct"] for r in rows_teacher], 1)[0],
              "on_student_samples": {}, "on_teacher_samples": {}}
    teacher_model = None
    for side, student, own_rows in (("from", pair.before, context.rows_from), ("to", pair.after, context.rows_to)):
        tokenizer = load_tokenizer(student.path, trust_remote_code=trust)
        try:
            vocab_size = shared_vocab_size(teacher_tokenizer, tokenizer, teacher_config,
                                           AutoConfig.from_pretrained(student.path, trust_remote_code=trust))
        except SddError as err:
            result[f"skipped_{side}"] = str(err)
            continue
        if teacher_model is None:
            teacher_model = load_model(teacher, settings)
        student_model = load_model(student, settings)
        prompt_ids = [tokenizer(data.render_prompt(tokenizer, r["problem"], settings.chat_template_kwargs),
                                add_special_tokens=False)["input_ids"] for r in problems.records]
        for where, rows in (("on_student_samples", own_rows), ("on_teacher_samples", rows_teacher)):
            sequences = [Sequence(ids, completion) for ids, row in zip(prompt_ids, rows, strict=True)
                         for completion in row["token_ids"][:per_problem]]
            common = dict(vocab_size=vocab_size, pad_id=tokenizer.pad_token_id)
            reverse = mean_divergence(student_model, teacher_model, sequences, beta=1.0, **common)
            forward = mean_divergence(student_model, teacher_model, sequences, beta=0.0, **common)
            result[where][side] = {"reverse_kl": reverse["divergence"], "forward_kl": forward["divergence"],
                                   "student_entropy": reverse["student_entropy"], "tokens": reverse["tokens"]}
        del student_model
        release()
    del teacher_model
    release()
    return result


def _agreement_headline(agreement: dict) -> str | None:
    own = agreement.get("on_student_samples", {})
    if "skipped" in agreement or "from" not in own or "to" not in own:
        return None
    return f"reverse KL to teacher {fmt(own['from']['reverse_kl'])}->{fmt(own['to']['reverse_kl'])}"


def _agreement_table(report: ReportContext) -> list[str]:
    lines = ["", "### Teacher agreement (token-mean KL in nats; reverse = KL(student ‖ teacher), forward = "
             "KL(teacher ‖ student))", "",
             "| pair | teacher (path) | on student's samples: reverse | forward | on teacher's samples: reverse | "
             "forward |", "|---|---|---|---|---|---|"]
    for row in report.rows:
        agreement = row["doc"]["teacher_agreement"]
        if "skipped" in agreement:
            lines.append(f"| {row['id']} {row['label']} | skipped: {agreement['skipped']} | | | | |")
            continue
        teacher = agreement["teacher"]

        def cell(where: str, key: str, agreement=agreement) -> str:
            sides = agreement[where]
            return " → ".join(fmt(sides[s][key]) if s in sides else "n/a" for s in ("from", "to"))

        lines.append(f"| {row['id']} {row['label']} | {teacher['label']} (`{rel(report.root, teacher['path'])}`) | "
                     f"{cell('on_student_samples', 'reverse_kl')} | {cell('on_student_samples', 'forward_kl')} | "
                     f"{cell('on_teacher_samples', 'reverse_kl')} | {cell('on_teacher_samples', 'forward_kl')} |")
    return lines


# --------------------------------------------------------------------------------------------------
# The registry, in the order of the pair document, the console line and the report's tables.

MEASURES: tuple[Measure, ...] = (
    Measure("sparsity", _sparsity, _sparsity_headline, _sparsity_table, report_drop=("tensors", "by_layer"),
            panel=Panel(_sparsity_panel, position=1)),
    Measure("capability", _capability, _capability_headline, _capability_table,
            report_drop=("ids", "correct_counts"), panel=Panel(_capability_panel, position=0)),
    Measure("diversity", _diversity, _diversity_headline, _diversity_table),
    Measure("teacher_agreement", _teacher_agreement, _agreement_headline, _agreement_table),
)


# --------------------------------------------------------------------------------------------------
# One pair's document.


def analyse_pair(pair: Pair, *, problems: Problems, settings: Settings, samples: int, cache_dir: Path,
                 index: OutputIndex, memo: dict) -> dict:
    """The pair document: which checkpoints, prompts and sampling, then one section per measure."""
    for checkpoint in (pair.before, pair.after):
        check_fingerprint(checkpoint, memo)
    rows_from = cached_samples(pair.before, problems, settings, samples, cache_dir)
    rows_to = cached_samples(pair.after, problems, settings, samples, cache_dir)
    context = PairContext(pair, rows_from, rows_to, problems, settings, samples, cache_dir, index, memo)
    return {
        "kind": PAIR_KIND,
        "schema": SCHEMA,
        "created_at": now_iso(),
        "versions": library_versions(),
        "run_dir": str(pair.run_dir.resolve()),
        "stage": {"name": pair.after.label, "kind": pair.record.stage},
        "from": pair.before.describe(),
        "to": pair.after.describe(),
        "prompts": problems.describe(),
        "sampling": sampling_record(settings, samples),
        **{measure.key: measure.compute(context) for measure in MEASURES},
    }


def same_analysis(document: dict, pair: Pair, problems: Problems, settings: Settings, samples: int) -> bool:
    """Whether a pair's existing JSON answers this request: same checkpoints, problems and sampling, every measure."""
    same_models = all(
        document.get(side, {}).get("fingerprint") == (checkpoint.fingerprint or document.get(side, {}).get("fingerprint"))
        and document.get(side, {}).get("path") == checkpoint.path
        for side, checkpoint in (("from", pair.before), ("to", pair.after)))

    def how(sampling: dict) -> dict:
        return {k: v for k, v in sampling.items() if k != "taken_from"}

    return (same_models and document.get("prompts") == problems.describe()
            and how(document.get("sampling") or {}) == how(sampling_record(settings, samples))
            and not missing_measures(document))


def missing_measures(document: dict) -> list[str]:
    """Measures registered since a pair document was written: it is redone to add them."""
    return [measure.key for measure in MEASURES if measure.key not in document]


def headline(document: dict) -> str:
    """One line per pair for the console: the number each measure is about."""
    parts = (measure.headline(document[measure.key]) for measure in MEASURES)
    return "; ".join(part for part in parts if part is not None)
