"""`sdd analyze`: what each stage changed, and what it lost.

For a pair of checkpoints (a training stage's input and output, or two stages named with --from and
--to) this measures what the research behind sdd claims and no training log shows: which slice of
the parameters moved (update sparsity, and across seeds its overlap), which problems the model can
still solve at large k (capability boundary), how varied its answers and formats are (diversity),
and how close a student sits to its teacher before and after (teacher agreement).

The command reads top to bottom: find the pairs through the manifests (sdd/analysis/pairs.py), take
each pair's problems and sampling from the run's eval (sampling.py), skip a pair whose JSON already
answers the request, else measure it (measures.py: one registry entry per measure) and write
`<run dir of the later stage>/analysis/<from>__<to>.json`; under a root, then compare seeds.
`sdd report` turns the JSON into tables and plots (sdd/analysis/report.py). docs/analyze.md defines
every number.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdd.analysis.measures import analyse_pair, headline, missing_measures, same_analysis
from sdd.analysis.pairs import Pair, named_pair, read_document, seed_overlaps, stage_pairs
from sdd.analysis.report import report_section
from sdd.analysis.sampling import eval_settings, load_problems, sample_cache_dir
from sdd.errors import SddError
from sdd.manifest import MANIFEST_NAME, OutputIndex, RunDir, atomic_write_text

__all__ = ["report_section", "run"]  # report_section: what `sdd report` (sdd/stages/report.py) imports from here

DEFAULT_SAMPLES = 16


def run(path: Path, *, from_stage: str | None = None, to_stage: str | None = None, samples: int | None = None,
        limit: int | None = None, benchmark: str | None = None, data_dir: str | None = None,
        force: bool = False) -> list[dict]:
    """Analyse one pair (--to, optionally --from) or every training stage under `path`; returns the pair documents."""
    path = Path(path)
    samples = DEFAULT_SAMPLES if samples is None else samples
    run_dirs = _check_request(path, from_stage, to_stage, samples)
    is_run_dir = (path / MANIFEST_NAME).is_file()

    # 1. The pairs: one named pair, or every finished training stage under the path (each pair once).
    index = OutputIndex(sorted({m.parent for m in path.rglob(MANIFEST_NAME)}))
    if to_stage:
        pairs = [named_pair(path, from_stage, to_stage, index)]
    else:
        pairs = _every_stage_pair(path, run_dirs, index)

    # 2. Each pair: its problems and sampling as eval saw them; skip it if its JSON answers this request.
    cache_dir = sample_cache_dir(path)
    memo: dict = {}
    problem_memo: dict = {}
    documents = []
    for pair in pairs:
        label = f"{_where(path, pair.run_dir)}: {pair.before.label} -> {pair.after.label}"
        settings = eval_settings(pair.run_dir)
        if settings.benchmark is None and not benchmark:
            # a variant whose eval has not run yet: sample as the rest of the tree was evaluated
            settings = next((s for s in map(eval_settings, run_dirs) if s.benchmark), settings)
        problems = load_problems(pair.run_dir, settings, benchmark, limit, data_dir, problem_memo)
        existing = read_document(pair.json_path)
        if existing and not force:
            if same_analysis(existing, pair, problems, settings, samples):
                print(f"skip {label}: {pair.json_path} exists (--force to redo it)")
                documents.append(existing)
                continue
            missing = missing_measures(existing)
            print(f"{label}: {pair.json_path} " + (f"lacks {', '.join(missing)}" if missing else
                  "was made from other checkpoints, problems or sampling settings") + "; redoing it")

        # 3. Measure it (every measure in the registry) and write its JSON.
        document = analyse_pair(pair, problems=problems, settings=settings, samples=samples, cache_dir=cache_dir,
                                index=index, memo=memo)
        pair.json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(pair.json_path, json.dumps(document, indent=1) + "\n")
        print(f"{label}: {headline(document)} -> {pair.json_path}")
        documents.append(document)

    # 4. Under a root of `sdd run`: the same stage across training seeds.
    if not is_run_dir:
        seed_overlaps(path, pairs, force)
    return documents


def _check_request(path: Path, from_stage: str | None, to_stage: str | None, samples: int) -> list[Path]:
    """The run dirs to analyse, after refusing a request that cannot be answered (one line saying what to fix)."""
    if not path.is_dir():
        raise SddError(f"{path} does not exist; pass a run dir or the --root of `sdd run`")
    if samples < 1:
        raise SddError(f"--samples must be at least 1, got {samples}")
    is_run_dir = (path / MANIFEST_NAME).is_file()
    if from_stage and not to_stage:
        raise SddError("--from needs --to (the later stage); --to alone compares a stage with its own input")
    if to_stage and not is_run_dir:
        raise SddError(f"{path} is not a run dir (no {MANIFEST_NAME}); --from/--to name stages of one run dir, "
                       "e.g. ROOT/shared or ROOT/<variant>/seed0")
    run_dirs = [path] if is_run_dir else sorted(m.parent for m in path.rglob(MANIFEST_NAME))
    if not run_dirs:
        raise SddError(f"{path} holds no run dir (no {MANIFEST_NAME} under it); pass a run dir or the --root of `sdd run`")
    for run_dir in run_dirs:
        RunDir(run_dir).read()  # a corrupt manifest stops here, with its own message
    return run_dirs


def _every_stage_pair(path: Path, run_dirs: list[Path], index: OutputIndex) -> list[Pair]:
    pairs, seen = [], set()
    for run_dir in run_dirs:
        for pair in stage_pairs(run_dir, index):
            if pair.key not in seen:
                seen.add(pair.key)
                pairs.append(pair)
    if not pairs:
        raise SddError(f"no finished training stage under {path}; run one (sdd sft/teacher-rl/warmup/distill/"
                       "student-rl) before analysing")
    return pairs


def _where(root: Path, run_dir: Path) -> str:
    try:
        return run_dir.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(run_dir)
