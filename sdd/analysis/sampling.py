"""How analysis samples: eval's settings, the same problems for both checkpoints, and a cache of samples.

Analysis samples each checkpoint as `sdd eval` did (the run dir's newest finished eval, else its
config.yaml `eval` section, else the shared defaults in `sdd.samples.SAMPLING`), with eval's first
seed, so on the same problems the first samples of each problem are the ones eval drew. Samples are
cached one file per checkpoint (an `sdd.samples` file keyed by the checkpoint's fingerprint, the
problems and the sampling settings): a checkpoint that is the later model of one pair and the
earlier model or teacher of others is sampled once.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
from pathlib import Path

from sdd import data, samples
from sdd.analysis.pairs import ANALYSIS_DIR, Checkpoint
from sdd.errors import SddError
from sdd.manifest import RunDir
from sdd.names import slug
from sdd.samples import SAMPLING

# Same seed as eval's first seed: on the same problems, the first samples of each problem are the
# ones `sdd eval` drew (sampling is a pure function of seed, problem index and sample index).
SAMPLING_SEED = 0


@dataclasses.dataclass
class Settings:
    """How to sample: the run's eval configuration, so analysis sees what eval saw."""

    benchmark: str | None = None
    data_dir: str | None = None
    limit: int | None = None
    temperature: float = SAMPLING.temperature
    top_p: float = SAMPLING.top_p
    top_k: int = SAMPLING.top_k
    max_new_tokens: int = SAMPLING.max_new_tokens
    chat_template_kwargs: dict = dataclasses.field(default_factory=SAMPLING.chat_template_kwargs)
    batch_size: int | None = None
    # Always transformers: a vLLM engine keeps most of the GPU for its lifetime, which the teacher-agreement
    # forward passes that follow then cannot get; and the sampler is the one eval's hf backend uses.
    backend: str = "hf"
    dtype: str = "auto"
    trust_remote_code: bool = False
    taken_from: str = "sdd eval's defaults"


def eval_settings(run_dir: Path) -> Settings:
    """The run dir's config.yaml `eval` section, overlaid by its newest finished eval's resolved options."""
    from sdd import config as cfg

    settings = Settings()
    fields = {f.name for f in dataclasses.fields(Settings)} - {"benchmark", "taken_from", "backend"}

    def overlay(values: dict, where: str) -> None:
        known = {k: v for k, v in values.items() if k in fields}
        for key, value in known.items():
            setattr(settings, key, value)
        benchmarks = values.get("benchmark")
        if isinstance(benchmarks, str):
            benchmarks = [benchmarks]
        if benchmarks:
            settings.benchmark = benchmarks[0]
        if known or benchmarks:
            settings.taken_from = where

    overlay(cfg.run_defaults(run_dir, "eval"), f"{run_dir / 'config.yaml'} [eval]")
    evals = [(name, r) for name, r in RunDir(run_dir).records().items() if r.stage == "eval" and r.done]
    if evals:
        name, record = max(evals, key=lambda item: item[1].order)
        overlay(record.config.get("sdd") or {}, f"eval record '{name}' of {run_dir}")
        if record.metrics.get("benchmark"):
            settings.benchmark = record.metrics["benchmark"]
    return settings


def sampling_record(settings: Settings, samples_per_problem: int) -> dict:
    """The sampling settings as a pair document records them (`sampling`)."""
    return {"n": samples_per_problem, "temperature": settings.temperature, "top_p": settings.top_p,
            "top_k": settings.top_k, "max_new_tokens": settings.max_new_tokens, "seed": SAMPLING_SEED,
            "chat_template_kwargs": settings.chat_template_kwargs, "backend": settings.backend,
            "taken_from": settings.taken_from}


@dataclasses.dataclass
class Problems:
    benchmark: str
    source: str
    records: list[dict]
    skipped: int
    limit: int | None

    def describe(self) -> dict:
        ids = [r["id"] for r in self.records]
        return {"benchmark": self.benchmark, "source": self.source, "count": len(self.records), "limit": self.limit,
                "skipped_unparsable_golds": self.skipped,
                "ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]}


def load_problems(run_dir: Path, settings: Settings, benchmark: str | None, limit: int | None,
                  data_dir: str | None, memo: dict) -> Problems:
    name = benchmark or settings.benchmark
    if not name:
        raise SddError(f"{run_dir} has no eval to take the problems from; pass --benchmark (e.g. math500 or a "
                       "dataset registered in the run dir)")
    limit = limit if limit is not None else settings.limit
    if limit is not None and limit < 1:
        raise SddError(f"--limit must be at least 1, got {limit}")
    source = data.resolve(name, data_dir=data_dir or settings.data_dir, registered=RunDir(run_dir).datasets())
    key = (source.describe(), limit)
    if key not in memo:
        _, records, skipped = data.usable_problems(name, data_dir=data_dir or settings.data_dir,
                                                   registered=RunDir(run_dir).datasets(), limit=limit)
        memo[key] = Problems(name, source.describe(), records, skipped, limit)
    return memo[key]


def sample_cache_dir(path: Path) -> Path:
    """The nearest existing sample cache at `path` or up to three levels above it (ROOT from ROOT/variant/seed0).

    So `sdd analyze ROOT/<variant>/seed0 --from a --to b` after `sdd analyze ROOT` reuses ROOT's samples.
    Entries are keyed by checkpoint fingerprint, so a cache found higher up can never serve another model.
    """
    for candidate in [path.resolve(), *path.resolve().parents][:4]:
        if (candidate / ANALYSIS_DIR / "samples").is_dir():
            return candidate / ANALYSIS_DIR / "samples"
    return path / ANALYSIS_DIR / "samples"


def cached_samples(checkpoint: Checkpoint, problems: Problems, settings: Settings, samples_per_problem: int,
                   cache_dir: Path) -> list[dict]:
    """K verified samples per problem from one checkpoint, reused from the cache when nothing changed.

    The cache key is the checkpoint's fingerprint, the problems and the sampling settings: the same
    checkpoint is the `to` of one pair and the `from` (or teacher) of others, and is sampled once.
    """
    provenance = {
        "checkpoint": checkpoint.fingerprint or checkpoint.path,
        "problems": data.problems_fingerprint(problems.records),
        "sampling": {k: v for k, v in sampling_record(settings, samples_per_problem).items() if k != "taken_from"},
    }
    key = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"{slug(checkpoint.label)}-{key}.jsonl"
    rows = samples.read(path, provenance)  # a damaged cache file reads as None and is regenerated
    if rows is not None:
        return rows
    rows = _sample(checkpoint, problems, settings, samples_per_problem)
    cache_dir.mkdir(parents=True, exist_ok=True)
    samples.write(path, provenance, rows, checkpoint=checkpoint.describe())
    return rows


def _sample(checkpoint: Checkpoint, problems: Problems, settings: Settings, n: int) -> list[dict]:
    from rich.progress import Progress

    from sdd.generation import SamplingParams, generate
    from sdd.models import load_tokenizer
    from sdd.verify import score_completions

    tokenizer = load_tokenizer(checkpoint.path, trust_remote_code=settings.trust_remote_code)
    params = SamplingParams(n=n, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                            max_new_tokens=settings.max_new_tokens, seed=SAMPLING_SEED)
    prompts = [data.render_prompt(tokenizer, r["problem"], settings.chat_template_kwargs) for r in problems.records]
    model = load_model(checkpoint, settings) if settings.backend == "hf" else checkpoint.path
    with Progress(transient=True) as progress:
        task = progress.add_task(f"sampling {checkpoint.label}", total=len(prompts) * n)
        completions = generate(model, tokenizer, prompts, params, backend=settings.backend,
                               batch_size=settings.batch_size, progress=lambda k: progress.advance(task, k))
    del model
    release()
    scores = score_completions([c.text for group in completions for c in group],
                               [r["answer"] for r in problems.records for _ in range(n)])
    rows = []
    for i, (record, group) in enumerate(zip(problems.records, completions, strict=True)):
        rows.append({"id": record["id"], "answer": record["answer"],
                     "correct": [bool(s) for s in scores[i * n:(i + 1) * n]],
                     "truncated": [c.finish_reason == "length" for c in group],
                     "completions": [c.text for c in group],
                     "token_ids": [list(c.token_ids) for c in group]})
    return rows


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(checkpoint: Checkpoint, settings: Settings):
    from sdd.models import load_causal_lm

    model = load_causal_lm(checkpoint.path, dtype=settings.dtype, trust_remote_code=settings.trust_remote_code)
    return model.to(_device()).eval()


def release() -> None:
    """Return a dropped model's memory now: the next checkpoint is loaded right after."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
