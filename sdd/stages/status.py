"""`sdd status`: what a run dir (or a root of run dirs) holds, for people and for scripts.

`--json` prints the manifests as they are, so each stage's record shows its environment too.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdd import environment
from sdd.errors import SddError
from sdd.manifest import MANIFEST_NAME, RunDir

# The one number worth a glance per stage kind, in order of preference.
KEY_METRICS = ("avg@", "reward", "reverse_kl", "forward_kl", "loss")


def key_metric(metrics: dict) -> str:
    for prefix in KEY_METRICS:
        for key, value in metrics.items():
            if key.startswith(prefix) and not key.endswith("_std_seeds") and isinstance(value, (int, float)):
                std = metrics.get(f"{key}_std_seeds")
                spread = f" ± {std:.3f}" if isinstance(std, (int, float)) and metrics.get("seeds", 1) > 1 else ""
                return f"{key} {value:.3f}{spread}"
    return ""


def run_dirs(path: Path) -> list[Path]:
    if (path / MANIFEST_NAME).is_file():
        return [path]
    found = sorted(p.parent for p in path.rglob(MANIFEST_NAME))
    if not found:
        raise SddError(f"{path} holds no sdd run dir (no {MANIFEST_NAME} in it or below it)")
    return found


def run(path: Path, *, as_json: bool = False) -> None:
    dirs = run_dirs(Path(path))
    if as_json:
        print(json.dumps({str(d): RunDir(d).read() for d in dirs}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for directory in dirs:
        table = Table(title=str(directory), title_justify="left")
        for column in ("stage", "role", "status", "checkpoint", "key metric", "ended"):
            table.add_column(column)
        for name, record in RunDir(directory).records().items():
            checkpoint = ", ".join(output.path for output in record.outputs.values())
            style = {"done": "green", "running": "yellow", "failed": "red", "interrupted": "magenta"}[record.status]
            table.add_row(name, record.role or "", f"[{style}]{record.status}[/]", checkpoint,
                          key_metric(record.metrics), (record.ended_at or "")[:19])
        console.print(table)
        recorded = {name: record.environment for name, record in RunDir(directory).records().items()}
        if any(recorded.values()):
            differ = environment.differences(recorded)
            first = next(env for env in recorded.values() if env)
            console.print(f"environment: {environment.describe(first)}" if not differ else
                          f"[red]stages ran under different environments ({', '.join(differ)}); `--json` shows each[/]",
                          highlight=False, markup=True)


def print_eval(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="eval")
    for column in ("benchmark", "model", "accuracy", "pass@k", "truncated"):
        table.add_column(column)
    for bench, metrics in results.items():
        if not metrics:
            continue
        passes = [k for k in metrics if k.startswith("pass@")]
        top = max(passes, key=lambda k: int(k.split("@")[1])) if passes else None
        table.add_row(bench, str(metrics.get("evaluates", "")), key_metric(metrics),
                      f"{top} {metrics[top]:.3f}" if top else "", f"{metrics.get('truncation_rate', 0):.1%}")
    Console().print(table)
