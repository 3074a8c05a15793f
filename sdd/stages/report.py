"""`sdd report`: the experiment's table with the error bars the paper lacked.

For every variant and benchmark: avg@k as mean ± std over training seeds, pass@k, and for the
differences that carry the paper's claims (bridge vs direct GRPO, vs a raw or SFT teacher,
each ablation vs the full bridge) a paired bootstrap 95% CI that resamples problems (paired:
every variant saw the same problems with the same sampling seeds) and training seeds. A
difference whose CI contains 0 is marked not significant, whatever its sign.

The CIs use the same numbers as the table: each problem's accuracy pools the samples of every eval
seed (samples-seed0.jsonl, samples-seed1.jsonl, ...). Training seeds are resampled independently per
variant, except when the manifests show that the two variants share a checkpoint seed by seed
(`no-distill` evaluates the warmup that `rl-teacher-bridge` distills from): then seed k of one is
drawn with seed k of the other (`stats.bootstrap_diff_ci(paired_seeds=True)`), since the shared
checkpoint's luck is in both and cancels in their difference. Variants that share only data per
seed (the warmup teacher samples of `sft-on-teacher-samples`) are not detected and stay independent:
their CIs err on the wide side.

What a training seed redraws is the recipe's `seed_scope`, and the report reads it from the manifests,
not the recipe: the training stages every seed of a variant descends from ran once (`student`: the
teacher bootstrap, teacher-rl, the student bootstrap), so the spread over seeds leaves out their luck
and every ± and CI is for that one draw of them. With `chain` no training stage is common to all
seeds: seed k is one chain, teacher and student, and two variants of seed k descend from the same
chain-k bootstrap, so chains are resampled as units, seed k of one variant with seed k of the other.
Every ± and CI says which of the two it is, and the report names the environment the stages ran under
and warns where they differ.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sdd import environment, samples, stats
from sdd.errors import SddError
from sdd.experiment.recipe import BUILTIN_VARIANTS, COMPARISONS
from sdd.manifest import MANIFEST_NAME, RunDir, atomic_write_text
from sdd.names import SHARED_DIR


def eval_records(run_dir: Path) -> dict[str, dict]:
    """Finished eval records of a run dir, by (stage name, benchmark); samples are read when needed."""
    out = {}
    for name, record in RunDir(run_dir).stages().items():
        metrics = record.get("metrics", {})
        if record.get("stage") != "eval" or record.get("status") != "done" or "benchmark" not in metrics:
            continue
        out[(name, metrics["benchmark"])] = {"metrics": metrics, "dir": run_dir / name, "record": record}
    return out


def eval_rows(entry: dict) -> list[dict]:
    """Per-problem correctness `{"id", "correct"}` pooled over every eval seed, as avg@k pools them."""
    if "rows" in entry:
        return entry["rows"]
    seeds = int(entry["metrics"].get("seeds", 1))
    pooled: dict[str, list[bool]] = {}
    for seed in range(seeds):
        path = entry["dir"] / f"samples-seed{seed}.jsonl"
        if not path.is_file():
            raise SddError(f"{path} is missing but its eval recorded {seeds} seeds; rerun that eval (it resumes) "
                           "or restore the file")
        for row in samples.rows(path):
            pooled.setdefault(row["id"], []).extend(row["correct"])
    entry["rows"] = [{"id": problem_id, "correct": correct} for problem_id, correct in pooled.items()]
    return entry["rows"]


def seed_dir(part: str) -> int | None:
    """k for a run dir named seed<k>, else None."""
    return int(part[4:]) if part.startswith("seed") and part[4:].isdigit() else None


def collect(root: Path) -> tuple[dict, dict]:
    """variants[variant][benchmark][seed] -> eval entry; reference[name][benchmark][seed] -> shared evals.

    A shared eval's seed is None, or k for the per-seed chain of `seed_scope: chain` (shared/seed<k>),
    whose evals of one stage name are gathered under one label across seeds.
    """
    variants: dict[str, dict[str, dict[int, dict]]] = {}
    reference: dict[str, dict[str, dict[int | None, dict]]] = {}
    for manifest in sorted(root.rglob(MANIFEST_NAME)):
        run_dir = manifest.parent
        rel = run_dir.relative_to(root).parts
        seed = seed_dir(rel[-1]) if len(rel) == 2 else None
        for (name, bench), entry in eval_records(run_dir).items():
            if seed is not None and rel[0] != SHARED_DIR:
                variants.setdefault(rel[0], {}).setdefault(bench, {})[seed] = entry
            else:
                where = rel[:-1] if seed is not None else rel
                label = name if not where else f"{'/'.join(where)}:{name}"
                reference.setdefault(label.removesuffix(f"-{bench}"), {}).setdefault(bench, {})[seed] = entry
    return variants, reference


def per_problem(entry: dict) -> list[float]:
    return [sum(row["correct"]) / len(row["correct"]) for row in eval_rows(entry)]


def matrix(by_seed: dict[int, dict]):
    """(training seeds, problems) accuracy matrix over all eval seeds, problems aligned by id across seeds."""
    import numpy as np

    seeds = sorted(by_seed)
    ids = [row["id"] for row in eval_rows(by_seed[seeds[0]])]
    table = []
    for seed in seeds:
        acc = {row["id"]: sum(row["correct"]) / len(row["correct"]) for row in eval_rows(by_seed[seed])}
        missing = [i for i in ids if i not in acc]
        if missing:
            raise SddError(f"{by_seed[seed]['dir']} has no samples for problem {missing[0]} that seed {seeds[0]} "
                           "evaluated; rerun that eval on the same problems")
        table.append([acc[i] for i in ids])
    return np.array(table), ids


def checkpoint_index(root: Path) -> dict[str, dict]:
    """fingerprint -> the finished stage record that wrote that checkpoint, over every manifest under root."""
    index: dict[str, dict] = {}
    for manifest in sorted(root.rglob(MANIFEST_NAME)):
        for record in RunDir(manifest.parent).stages().values():
            if record.get("status") != "done":
                continue
            for output in (record.get("outputs") or {}).values():
                if isinstance(output, dict) and output.get("fingerprint"):
                    index.setdefault(output["fingerprint"], record)
    return index


def lineage(record: dict, index: dict[str, dict]) -> set[str]:
    """Fingerprints of every checkpoint (and data file) a stage's inputs descend from, through the manifests."""
    seen: set[str] = set()
    frontier = [record]
    while frontier:
        current = frontier.pop()
        for entry in (current.get("inputs") or {}).values():
            found = entry.get("fingerprint") if isinstance(entry, dict) else None
            if found and found not in seen:
                seen.add(found)
                if found in index:
                    frontier.append(index[found])
    return seen


def shares_checkpoint_per_seed(by_seed_a: dict[int, dict], by_seed_b: dict[int, dict], index: dict[str, dict]) -> bool:
    """Whether, for every seed k, a's and b's evaluated models descend from one checkpoint that is seed k's alone.

    A checkpoint every seed descends from (the student base, the RL teacher) is no reason to pair:
    it moves all seeds alike. One made by seed k (the warmup of rl-teacher-bridge/seed<k>, which
    no-distill/seed<k> evaluates) puts seed k's luck into both variants.
    """
    seeds = sorted(by_seed_a)
    if seeds != sorted(by_seed_b) or len(seeds) < 2:
        return False
    lineage_a = {s: lineage(by_seed_a[s].get("record", {}), index) for s in seeds}
    lineage_b = {s: lineage(by_seed_b[s].get("record", {}), index) for s in seeds}
    for seed in seeds:
        elsewhere = set().union(*(lineage_a[other] | lineage_b[other] for other in seeds if other != seed))
        if not (lineage_a[seed] & lineage_b[seed]) - elsewhere:
            return False
    return True


TRAINING_STAGES = ("sft", "teacher-rl", "warmup", "distill", "student-rl")


def shared_stages(by_seed: dict[int, dict], index: dict[str, dict]) -> list[str]:
    """Training stages every seed's evaluated model descends from: what the seeds did not redraw.

    Empty under `seed_scope: chain` (seed k repeats every training stage); under `seed_scope:
    student` the teacher bootstrap, teacher-rl and the student bootstrap, which ran once.
    """
    lineages = [lineage(by_seed[s].get("record", {}), index) for s in sorted(by_seed)]
    common = set.intersection(*lineages) if lineages else set()
    return sorted({index[f]["name"] for f in common if f in index and index[f].get("stage") in TRAINING_STAGES})


def seed_scope(seeds: int, shared: list[str]) -> dict:
    """The seed scope of a set of seeds, in words for every ± and CI: what the spread over seeds covers."""
    if seeds < 2:
        return {"scope": "single", "shared_stages": shared, "unit": "seed",
                "words": "one seed: no spread over training runs"}
    if not shared:
        return {"scope": "chain", "shared_stages": [], "unit": "chains",
                "words": f"seed scope chain: {seeds} chains, every training stage (teacher and student) redrawn per seed"}
    return {"scope": "student", "shared_stages": shared, "unit": "student seeds",
            "words": f"seed scope student: {seeds} seeds share {', '.join(shared)} (run once), whose luck the spread leaves out"}


def accuracy_key(metrics: dict) -> str:
    return next(k for k in metrics if k.startswith("avg@") and not k.endswith("_std_seeds"))


def summarize_variant(by_seed: dict[int, dict], index: dict[str, dict] | None = None) -> dict:
    key = accuracy_key(next(iter(by_seed.values()))["metrics"])
    values = [by_seed[s]["metrics"][key] for s in sorted(by_seed)]
    mean, std = stats.mean_std(values)
    passes = sorted({k for e in by_seed.values() for k in e["metrics"] if k.startswith("pass@")},
                    key=lambda k: int(k.split("@")[1]))
    top = passes[-1] if passes else None
    pass_mean = sum(by_seed[s]["metrics"][top] for s in by_seed) / len(by_seed) if top else None
    return {"metric": key, "mean": mean, "std": std, "seeds": len(values), "per_seed": values,
            "pass_metric": top, "pass_mean": pass_mean,
            "seed_scope": seed_scope(len(values), shared_stages(by_seed, index or {}))}


def summarize_reference(by_seed: dict[int | None, dict]) -> dict:
    """A shared checkpoint's eval: one value, or with `seed_scope: chain` mean ± std over its chains."""
    if list(by_seed) == [None]:
        metrics = by_seed[None]["metrics"]
        key = accuracy_key(metrics)
        return {"metric": key, "mean": metrics[key], "std_seeds": metrics.get(f"{key}_std_seeds")}
    by_chain = {seed: entry for seed, entry in by_seed.items() if seed is not None}
    key = accuracy_key(next(iter(by_chain.values()))["metrics"])
    values = [by_chain[s]["metrics"][key] for s in sorted(by_chain)]
    mean, std = stats.mean_std(values)
    return {"metric": key, "mean": mean, "std": std, "chains": len(values), "per_seed": values,
            "seed_scope": seed_scope(len(values), [])}


def run(root: Path, *, out: Path | None = None, resamples: int = 10_000) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise SddError(f"{root} does not exist")
    variants, reference = collect(root)
    if not variants and not reference:
        raise SddError(f"{root} holds no finished eval; run `sdd run` or `sdd eval` first")
    out = Path(out or root / "report")
    out.mkdir(parents=True, exist_ok=True)
    benchmarks = sorted({b for v in variants.values() for b in v} | {b for r in reference.values() for b in r})
    summary: dict = {"root": str(root), "variants": {}, "reference": {}, "comparisons": []}
    order = list(BUILTIN_VARIANTS)  # the paper's order: full method, controls, then ablations
    index = checkpoint_index(root) if variants else {}
    for variant in sorted(variants, key=lambda v: (order.index(v) if v in order else len(order), v)):
        summary["variants"][variant] = {b: summarize_variant(by_seed, index) for b, by_seed in variants[variant].items()}
    for name, benches in sorted(reference.items()):
        summary["reference"][name] = {b: summarize_reference(by_seed) for b, by_seed in benches.items()}
    summary["environment"] = environments(root)
    for a, b in COMPARISONS:
        for bench in benchmarks:
            if bench not in variants.get(a, {}) or bench not in variants.get(b, {}):
                continue
            m_a, ids_a = matrix(variants[a][bench])
            m_b, ids_b = matrix(variants[b][bench])
            if ids_a != ids_b:
                raise SddError(f"{a} and {b} were evaluated on different {bench} problems; re-run their evals")
            paired = shares_checkpoint_per_seed(variants[a][bench], variants[b][bench], index)
            ci = stats.bootstrap_diff_ci(m_a, m_b, n_resamples=resamples, seed=0, paired_seeds=paired)
            scopes = [summary["variants"][v][bench]["seed_scope"] for v in (a, b)]
            shared = sorted(set(scopes[0]["shared_stages"]) | set(scopes[1]["shared_stages"]))
            scope = seed_scope(min(len(m_a), len(m_b)), shared)
            summary["comparisons"].append({"variant": a, "reference": b, "benchmark": bench, **ci, "seed_scope": scope})
    summary["curves"] = training_curves(root)
    for line in environment_warnings(summary["environment"]):
        print(f"warning: {line}", file=sys.stderr)
    markdown = render_markdown(summary, benchmarks)
    plots = plot(summary, benchmarks, out)
    from sdd.stages.analyze import report_section  # what each stage changed, where `sdd analyze` ran

    analysis_markdown, analysis_data, analysis_plots = report_section(root, out)
    if analysis_markdown:
        markdown += "\n" + analysis_markdown
        summary["analysis"] = analysis_data
    plots += analysis_plots
    atomic_write_text(out / "report.json", json.dumps(summary, indent=2, default=float) + "\n")
    markdown += "".join(f"\n![{p.stem}]({p.name})\n" for p in plots)
    atomic_write_text(out / "report.md", markdown)
    print(markdown)
    print(f"written: {out / 'report.md'}, {out / 'report.json'}" + "".join(f", {p}" for p in plots))
    return summary


def environments(root: Path) -> dict:
    """The environments the finished stages under root recorded: the first, and the keys on which they differ."""
    by_stage: dict[str, dict] = {}
    for manifest in sorted(root.rglob(MANIFEST_NAME)):
        where = manifest.parent.relative_to(root).as_posix()
        for name, record in RunDir(manifest.parent).stages().items():
            if record.get("status") == "done":
                by_stage[name if where == "." else f"{where}:{name}"] = record.get("environment") or {}
    recorded = [env for env in by_stage.values() if env]
    return {"stages": len(by_stage), "recorded": len(recorded), "first": recorded[0] if recorded else None,
            "differences": environment.differences(by_stage)}


def environment_warnings(found: dict) -> list[str]:
    """One line per environment key on which stages differ, naming the stages of every value but the commonest."""
    lines = []
    for key, by_value in found["differences"].items():
        ranked = sorted(by_value.items(), key=lambda item: -len(item[1]))
        parts = [f"{ranked[0][0]} ({len(ranked[0][1])} stages)"]
        for value, stages in ranked[1:]:
            named = ", ".join(stages[:3]) + (f" and {len(stages) - 3} more" if len(stages) > 3 else "")
            parts.append(f"{value} ({named})")
        lines.append(f"stages ran under different environments: {key} " + " vs ".join(parts))
    if found["recorded"] < found["stages"]:
        lines.append(f"{found['stages'] - found['recorded']} of {found['stages']} stages recorded no environment "
                     "(they ran under an sdd that did not record it)")
    return lines


def spread(s: dict, *, n_key: str = "seeds") -> str:
    """"mean ± std (n=3 chains)": every ± says what its seeds redrew."""
    unit = s["seed_scope"]["unit"]
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} (n={s[n_key]} {unit})"


def render_markdown(summary: dict, benchmarks: list[str]) -> str:
    lines = ["# sdd report", "", f"Root: `{summary['root']}`", ""]
    found = summary.get("environment")
    if found:
        lines += ["## Environment", ""]
        if found["first"]:
            lines += [f"{found['recorded']} of {found['stages']} finished stages recorded their environment: "
                      f"{environment.describe(found['first'])}.", ""]
        lines += [f"**Warning:** {line}." for line in environment_warnings(found)]
        lines += [""] if environment_warnings(found) else []
    scopes = {s["seed_scope"]["words"] for benches in summary["variants"].values() for s in benches.values()}
    lines += ["## Accuracy per variant (mean ± std over training seeds)", ""]
    lines += [f"{next(iter(scopes))[0].upper()}{next(iter(scopes))[1:]}." if len(scopes) == 1 else
              "Seed scopes differ between variants: see each row.", ""] if scopes else []
    header = "| variant | " + " | ".join(benchmarks) + " | seed scope |"
    lines += [header, "|---" * (len(benchmarks) + 2) + "|"]
    for variant, benches in summary["variants"].items():
        cells = []
        for bench in benchmarks:
            s = benches.get(bench)
            if not s:
                cells.append("")
                continue
            cell = f"{s['metric']} {spread(s)}"
            if s.get("pass_metric"):
                cell += f"; {s['pass_metric']} {100 * s['pass_mean']:.1f}"
            cells.append(cell)
        scope = sorted({s["seed_scope"]["scope"] + (f" (shared: {', '.join(s['seed_scope']['shared_stages'])})"
                                                    if s["seed_scope"]["scope"] == "student" else "")
                        for s in benches.values()})
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {'; '.join(scope)} |")
    if summary["reference"]:
        lines += ["", "## Shared checkpoints", "", "One eval, or with seed scope chain mean ± std over the chains "
                  "(each chain trains its own teacher and student bootstrap).", "",
                  "| checkpoint | " + " | ".join(benchmarks) + " |", "|---" * (len(benchmarks) + 1) + "|"]
        for name, benches in summary["reference"].items():
            cells = []
            for b in benchmarks:
                r = benches.get(b)
                cells.append("" if not r else f"{r['metric']} {spread(r, n_key='chains')}" if "chains" in r
                             else f"{r['metric']} {100 * r['mean']:.1f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if summary["comparisons"]:
        lines += ["", "## Paired differences (bootstrap over problems and seeds, 95% CI)", "",
                  "Problems are paired. Seeds are drawn as units, paired where the two variants share a checkpoint "
                  "per seed (with seed scope chain, the chain: teacher and student of one seed), else independently. "
                  "Every eval seed's samples count.", "",
                  "| comparison | benchmark | difference (points) | 95% CI | significant | seeds resampled | seed scope |",
                  "|---|---|---|---|---|---|---|"]
        for c in summary["comparisons"]:
            verdict = "yes" if c["significant"] else "no (CI contains 0)"
            scope = c["seed_scope"]
            unit = scope["unit"]
            seeds = ("one seed each" if scope["scope"] == "single" else
                     f"{unit} paired (shared checkpoint per seed)" if c.get("paired_seeds") else f"{unit} independent")
            lines.append(f"| {c['variant']} − {c['reference']} | {c['benchmark']} | {100 * c['diff']:+.1f} | "
                         f"[{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}] | {verdict} | {seeds} | {scope['words']} |")
    return "\n".join(lines) + "\n"


CURVE_KEYS = {"sft": "loss", "teacher-rl": "reward", "student-rl": "reward", "warmup": "forward_kl",
              "distill": "reverse_kl"}


def training_curves(root: Path) -> dict:
    """Logged training curves per stage kind, keyed by run dir and stage, for the plots."""
    curves: dict[str, dict[str, list]] = {}
    for manifest in sorted(root.rglob(MANIFEST_NAME)):
        run_dir = manifest.parent
        for name, record in RunDir(run_dir).stages().items():
            key = CURVE_KEYS.get(record.get("stage"))
            log = run_dir / name / "log.jsonl"
            if not key or not log.is_file():
                continue
            points = [(e["step"], e[key]) for e in map(json.loads, log.read_text().splitlines()) if key in e]
            if points:
                label = f"{run_dir.relative_to(root).as_posix()}/{name}".lstrip("./")
                curves.setdefault(f"{record['stage']}:{key}", {})[label] = points
    return curves


def plot(summary: dict, benchmarks: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for bench in benchmarks:
        names = [v for v, b in summary["variants"].items() if bench in b]
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
        means = [100 * summary["variants"][v][bench]["mean"] for v in names]
        stds = [100 * summary["variants"][v][bench]["std"] for v in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="#4477aa")
        for i, v in enumerate(names):
            ax.scatter([i] * len(summary["variants"][v][bench]["per_seed"]),
                       [100 * x for x in summary["variants"][v][bench]["per_seed"]], color="black", s=10, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel(f"{summary['variants'][names[0]][bench]['metric']} (%)")
        units = sorted({summary["variants"][v][bench]["seed_scope"]["unit"] for v in names})
        ax.set_title(f"{bench}: mean ± std over {' / '.join(units)} (dots: seeds)")
        fig.tight_layout()
        path = out / f"accuracy-{bench}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    for curve, series in summary["curves"].items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, points in sorted(series.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, linewidth=1)
        stage, key = curve.split(":")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"{stage}: {key}")
        if len(series) <= 12:
            ax.legend(fontsize=6)
        fig.tight_layout()
        path = out / f"curve-{stage}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
