"""The `sdd report` section on what each stage changed: a pairs table, each measure's table, a figure per pair.

It reads the analysis JSON files under a root wherever they lie now (run trees move between
machines), so a report can be made on another machine than the analysis.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdd.analysis import measures
from sdd.analysis.pairs import ANALYSIS_DIR, OVERLAP_KIND, PAIR_KIND
from sdd.analysis.text import rel
from sdd.names import SHARED_DIR, slug


def _documents(root: Path, kind: str) -> list[tuple[Path, dict]]:
    found = []
    for file in sorted(root.rglob(f"{ANALYSIS_DIR}/*.json")):
        try:
            document = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(document, dict) and document.get("kind") == kind:
            found.append((file, document))
    return found


def report_section(root: Path, out: Path) -> tuple[str, dict, list[Path]]:
    """Markdown, JSON-able data and plot paths for `sdd report`; empty where nothing was analysed."""
    root, out = Path(root), Path(out)
    # The run dir is where the JSON lies (ROOT/<run>/analysis/x.json), not the path recorded when it was written:
    # run trees move between machines. Shared stages (ROOT/shared, then each chain's ROOT/shared/seed<k>) first,
    # then the variants', then by time.
    def order(item: tuple[Path, dict]) -> tuple:
        run = rel(root, str(item[0].parent.parent))
        return run.split("/")[0] != SHARED_DIR, len(Path(run).parts), run, item[1]["created_at"]

    pairs = sorted(_documents(root, PAIR_KIND), key=order)
    overlaps = _documents(root, OVERLAP_KIND)
    if not pairs and not overlaps:
        return "", {}, []
    rows = []
    for number, (file, doc) in enumerate(pairs, 1):
        rows.append({"id": f"P{number}", "file": rel(root, str(file)), "run": rel(root, str(file.parent.parent)),
                     "label": f"{doc['from']['label']} → {doc['to']['label']}", "doc": doc})
    lines = ["## What each stage changed (`sdd analyze`)", "",
             "Definitions: docs/analyze.md. Pairs (every table below names its pair by id):", "",
             "| id | run dir | from (path) | to (path) | prompts | samples (K) | sampling |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        doc = row["doc"]
        prompts, sampling = doc["prompts"], doc["sampling"]
        lines.append(
            f"| {row['id']} | {row['run']} | {doc['from']['label']} (`{rel(root, doc['from']['path'])}`) | "
            f"{doc['to']['label']} (`{rel(root, doc['to']['path'])}`) | {prompts['benchmark']} ({prompts['count']} "
            f"problems) | {sampling['n']} | seed {sampling['seed']}, T {sampling['temperature']}, top-p "
            f"{sampling['top_p']}, top-k {sampling['top_k']}, ≤{sampling['max_new_tokens']} tokens |")
    context = measures.ReportContext(root, rows, overlaps)
    for measure in measures.MEASURES:
        lines += measure.table(context)
    plots = [_plot_pair(root, row, out) for row in rows]
    data_out = {
        "pairs": [{"id": row["id"], "file": row["file"], "run_dir": row["run"], "from": row["doc"]["from"],
                   "to": row["doc"]["to"], "prompts": row["doc"]["prompts"], "sampling": row["doc"]["sampling"],
                   **{m.key: {k: v for k, v in row["doc"][m.key].items() if k not in m.report_drop}
                      for m in measures.MEASURES}}
                  for row in rows],
        "overlaps": [{k: v for k, v in doc.items() if k != "skipped_tensors"} for _, doc in overlaps],
    }
    return "\n".join(lines) + "\n", data_out, plots


def _plot_pair(root: Path, row: dict, out: Path) -> Path:
    """One figure per pair, a panel per measure that draws one, titled with its checkpoints, prompts and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = row["doc"]
    sampling = doc["sampling"]
    names = (doc["from"]["label"], doc["to"]["label"])
    panels = sorted((m.panel for m in measures.MEASURES if m.panel), key=lambda panel: panel.position)
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 4.2), squeeze=False)
    for panel, ax in zip(panels, axes[0], strict=True):
        panel.draw(ax, doc)
    fig.suptitle(f"{row['id']} {row['run']}: {names[0]} → {names[1]}; K={sampling['n']}, sampling seed "
                 f"{sampling['seed']}", fontsize=10)
    fig.text(0.01, 0.01, f"from {rel(root, doc['from']['path'])}   to {rel(root, doc['to']['path'])}", fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 0.94))
    path = out / f"analysis-{row['id']}-{slug(row['run'])}-{slug(names[0])}__{slug(names[1])}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
