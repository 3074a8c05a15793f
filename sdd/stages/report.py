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
"""

from __future__ import annotations

import json
from pathlib import Path

from sdd import samples, stats
from sdd.errors import SddError
from sdd.experiment.recipe import BUILTIN_VARIANTS, COMPARISONS
from sdd.manifest import MANIFEST_NAME, RunDir, atomic_write_text


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


def collect(root: Path) -> tuple[dict, dict]:
    """variants[variant][benchmark][seed] -> eval entry; reference[name][benchmark] -> shared evals."""
    variants: dict[str, dict[str, dict[int, dict]]] = {}
    reference: dict[str, dict[str, dict]] = {}
    for manifest in sorted(root.rglob(MANIFEST_NAME)):
        run_dir = manifest.parent
        rel = run_dir.relative_to(root).parts
        for (name, bench), entry in eval_records(run_dir).items():
            if len(rel) == 2 and rel[1].startswith("seed") and rel[1][4:].isdigit():
                variants.setdefault(rel[0], {}).setdefault(bench, {})[int(rel[1][4:])] = entry
            else:
                label = name.removesuffix(f"-{bench}") if len(rel) == 0 else f"{'/'.join(rel)}:{name}"
                reference.setdefault(label.removesuffix(f"-{bench}"), {})[bench] = entry
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


def accuracy_key(metrics: dict) -> str:
    return next(k for k in metrics if k.startswith("avg@") and not k.endswith("_std_seeds"))


def summarize_variant(by_seed: dict[int, dict]) -> dict:
    key = accuracy_key(next(iter(by_seed.values()))["metrics"])
    values = [by_seed[s]["metrics"][key] for s in sorted(by_seed)]
    mean, std = stats.mean_std(values)
    passes = sorted({k for e in by_seed.values() for k in e["metrics"] if k.startswith("pass@")},
                    key=lambda k: int(k.split("@")[1]))
    top = passes[-1] if passes else None
    pass_mean = sum(by_seed[s]["metrics"][top] for s in by_seed) / len(by_seed) if top else None
    return {"metric": key, "mean": mean, "std": std, "seeds": len(values), "per_seed": values,
            "pass_metric": top, "pass_mean": pass_mean}


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
    for variant in sorted(variants, key=lambda v: (order.index(v) if v in order else len(order), v)):
        summary["variants"][variant] = {b: summarize_variant(by_seed) for b, by_seed in variants[variant].items()}
    for name, benches in sorted(reference.items()):
        summary["reference"][name] = {b: {"metric": accuracy_key(e["metrics"]), "mean": e["metrics"][accuracy_key(e["metrics"])],
                                          "std_seeds": e["metrics"].get(f"{accuracy_key(e['metrics'])}_std_seeds")}
                                      for b, e in benches.items()}
    index = checkpoint_index(root) if any(a in variants and b in variants for a, b in COMPARISONS) else {}
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
            summary["comparisons"].append({"variant": a, "reference": b, "benchmark": bench, **ci})
    summary["curves"] = training_curves(root)
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


def render_markdown(summary: dict, benchmarks: list[str]) -> str:
    lines = ["# sdd report", "", f"Root: `{summary['root']}`", ""]
    lines += ["## Accuracy per variant (mean ± std over training seeds)", ""]
    header = "| variant | " + " | ".join(benchmarks) + " |"
    lines += [header, "|---" * (len(benchmarks) + 1) + "|"]
    for variant, benches in summary["variants"].items():
        cells = []
        for bench in benchmarks:
            s = benches.get(bench)
            if not s:
                cells.append("")
                continue
            cell = f"{s['metric']} {100 * s['mean']:.1f} ± {100 * s['std']:.1f} (n={s['seeds']})"
            if s.get("pass_metric"):
                cell += f"; {s['pass_metric']} {100 * s['pass_mean']:.1f}"
            cells.append(cell)
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    if summary["reference"]:
        lines += ["", "## Shared checkpoints", "", "| checkpoint | " + " | ".join(benchmarks) + " |",
                  "|---" * (len(benchmarks) + 1) + "|"]
        for name, benches in summary["reference"].items():
            cells = [f"{benches[b]['metric']} {100 * benches[b]['mean']:.1f}" if b in benches else "" for b in benchmarks]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if summary["comparisons"]:
        lines += ["", "## Paired differences (bootstrap over problems and seeds, 95% CI)", "",
                  "Problems are paired; training seeds are paired where the two variants share a checkpoint "
                  "per seed, else resampled independently. Every eval seed's samples count.", "",
                  "| comparison | benchmark | difference (points) | 95% CI | significant | training seeds |",
                  "|---|---|---|---|---|---|"]
        for c in summary["comparisons"]:
            verdict = "yes" if c["significant"] else "no (CI contains 0)"
            seeds = "paired (shared checkpoint per seed)" if c.get("paired_seeds") else "independent"
            lines.append(f"| {c['variant']} − {c['reference']} | {c['benchmark']} | {100 * c['diff']:+.1f} | "
                         f"[{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}] | {verdict} | {seeds} |")
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
        ax.set_title(f"{bench}: mean ± std over seeds (dots: seeds)")
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
