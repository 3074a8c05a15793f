"""`sdd eval`: accuracy with error bars, recorded per problem so comparisons can be paired.

The paper reports avg@16 without spread; sdd reports avg@k as the mean over seeds with the
std over seeds, the std across the k sample sets, and unbiased pass@k. Every model is
sampled on the same problems with the same seeds (0..n-1), and every completion is kept
per problem, so `sdd report` can bootstrap paired differences between any two checkpoints.
A seed's samples are written atomically once done, so a killed eval resumes by seed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from sdd import data, model_card
from sdd import samples as sample_files
from sdd.config import to_jsonable
from sdd.errors import SddError, StageSkipped
from sdd.manifest import RunDir, atomic_write_text
from sdd.names import slug
from sdd.samples import SAMPLING
from sdd.stages import common
from sdd.train.lifecycle import finish, open_stage


def _data_option(name: str) -> dict:
    """The help of the training stages' data option of the same name: one text for both."""
    return {"help": common.cfg.help_for(common.DataOptions, name)}


@dataclasses.dataclass
class EvalOptions:
    role: str = dataclasses.field(default="student", metadata={"help": "Evaluate the newest checkpoint of this role."})
    model: str | None = dataclasses.field(default=None, metadata={"help": "Evaluate this path or hub id instead."})
    benchmark: list[str] = dataclasses.field(default_factory=lambda: ["math500"], metadata={
        "help": "math500, aime24, aime25, gsm8k, a file, a hub id, or a dataset the run registered; repeatable."})
    data_dir: str | None = dataclasses.field(default=None, metadata=_data_option("data_dir"))
    problem_column: str | None = dataclasses.field(default=None, metadata=_data_option("problem_column"))
    answer_column: str | None = dataclasses.field(default=None, metadata=_data_option("answer_column"))
    solution_column: str | None = dataclasses.field(default=None, metadata=_data_option("solution_column"))
    answer_format: str | None = dataclasses.field(default=None, metadata=_data_option("answer_format"))
    dataset_config: str | None = dataclasses.field(default=None, metadata=_data_option("dataset_config"))
    dataset_split: str | None = dataclasses.field(default=None, metadata=_data_option("dataset_split"))
    dataset_revision: str | None = dataclasses.field(default=None, metadata=_data_option("dataset_revision"))
    model_revision: str | None = dataclasses.field(default=None, metadata={
        "help": "Revision (branch, tag or commit) of a hub model to evaluate (TRL's model_revision)."})
    samples: int = dataclasses.field(default=16, metadata={"help": "Samples per problem (k of avg@k)."})
    seeds: int = dataclasses.field(default=1, metadata={
        "help": "Number of sampling seeds (0..n-1); spread is reported over them."})
    temperature: float = dataclasses.field(default=SAMPLING.temperature, metadata={"help": "Sampling temperature."})
    top_p: float = dataclasses.field(default=SAMPLING.top_p, metadata={"help": "Sampling top-p (1.0: off)."})
    top_k: int = dataclasses.field(default=SAMPLING.top_k, metadata={"help": "Sampling top-k (0: off)."})
    max_new_tokens: int = dataclasses.field(default=SAMPLING.max_new_tokens, metadata={
        "help": "Longest completion in tokens; a longer one is cut and counted as truncated."})
    greedy: bool = dataclasses.field(default=False, metadata={"help": "Also report greedy accuracy."})
    backend: str = dataclasses.field(default="hf", metadata={"help": "hf (transformers) or vllm."})
    vllm_tensor_parallel_size: int = dataclasses.field(default=1, metadata={
        "help": "vLLM engine (backend vllm): GPUs per engine (TRL's name in GRPO)."})
    vllm_gpu_memory_utilization: float = dataclasses.field(default=0.9, metadata={
        "help": "vLLM engine: share of the GPU it takes (TRL's name in GRPO)."})
    vllm_max_model_length: int | None = dataclasses.field(default=None, metadata={
        "help": "vLLM engine: longest prompt + completion (TRL's name in GRPO)."})
    batch_size: int | None = dataclasses.field(default=None, metadata={
        "help": "Sequences per generate call (default: the largest batch the free GPU memory holds, up to 256; 64 on CPU)."})
    limit: int | None = dataclasses.field(default=None, metadata=_data_option("limit"))
    dtype: str = dataclasses.field(default="auto", metadata={"help": "dtype the model is loaded in (auto: the checkpoint's)."})
    chat_template_kwargs: dict = dataclasses.field(default_factory=SAMPLING.chat_template_kwargs,
                                                   metadata=_data_option("chat_template_kwargs"))
    trust_remote_code: bool = dataclasses.field(default=False, metadata=_data_option("trust_remote_code"))
    # Evaluate one split of each benchmark (e.g. the held-out part of the training set).
    split: str | None = dataclasses.field(default=None, metadata=_data_option("split"))
    split_seed: int = dataclasses.field(default=42, metadata=_data_option("split_seed"))
    split_fraction: float = dataclasses.field(default=0.8, metadata=_data_option("split_fraction"))


def pass_ks(samples: int) -> list[int]:
    ks, k = [], 1
    while k < samples:
        ks.append(k)
        k *= 2
    return [*ks, samples]


def sample_and_score(model, tokenizer, records: list[dict], options: EvalOptions, seed: int, *, greedy: bool,
                     label: str) -> list[dict]:
    """One seed's completions for every problem, verified, as per-problem rows."""
    from sdd.generation import SamplingParams, generate
    from sdd.progress import StageProgress
    from sdd.verify import score_completions

    n = 1 if greedy else options.samples
    params = SamplingParams(
        n=n, temperature=0.0 if greedy else options.temperature, top_p=1.0 if greedy else options.top_p,
        top_k=0 if greedy else options.top_k, max_new_tokens=options.max_new_tokens, seed=seed,
    )
    prompts = [data.render_prompt(tokenizer, r["problem"], options.chat_template_kwargs) for r in records]
    with StageProgress(label, len(prompts) * n, unit="completions", transient=True) as progress:
        completions = generate(model, tokenizer, prompts, params, backend=options.backend,
                               batch_size=options.batch_size, progress=progress.advance, vllm=_vllm_settings(options))
    texts = [c.text for group in completions for c in group]
    golds = [r["answer"] for r in records for _ in range(n)]
    scores = score_completions(texts, golds)
    rows = []
    for i, (record, group) in enumerate(zip(records, completions, strict=True)):
        rows.append({
            "id": record["id"], "answer": record["answer"],
            "correct": [bool(s) for s in scores[i * n:(i + 1) * n]],
            "truncated": [c.finish_reason == "length" for c in group],
            "lengths": [len(c.token_ids) for c in group],
            "completions": [c.text for c in group],
        })
    return rows


def _vllm_settings(options: EvalOptions):
    from sdd.generation import VllmSettings

    return VllmSettings(options.vllm_tensor_parallel_size, options.vllm_gpu_memory_utilization,
                        options.vllm_max_model_length)


def summarize(per_seed: dict[int, list[dict]], samples: int) -> dict:
    """avg@k mean/std over seeds, std across sample sets, pass@k, truncation, mean length."""
    from sdd import stats  # numpy: imported when needed, so the CLI that imports EvalOptions starts fast

    seed_acc, set_std, pass_curves = [], [], []
    ks = pass_ks(samples)
    for rows in per_seed.values():
        matrix = [row["correct"] for row in rows]
        mean, spread = stats.avg_at_k(matrix)
        seed_acc.append(mean)
        set_std.append(spread)
        pass_curves.append(stats.pass_at_k_curve(matrix, ks))
    mean, std = stats.mean_std(seed_acc)
    all_rows = [row for rows in per_seed.values() for row in rows]
    flags = [t for row in all_rows for t in row["truncated"]]
    lengths = [n for row in all_rows for n in row["lengths"]]
    return {
        f"avg@{samples}": mean,
        f"avg@{samples}_std_seeds": std,
        "sample_set_std": sum(set_std) / len(set_std),
        "seeds": len(seed_acc),
        "per_seed": seed_acc,
        **{f"pass@{k}": sum(c[k] for c in pass_curves) / len(pass_curves) for k in ks},
        "truncation_rate": sum(flags) / max(1, len(flags)),
        "mean_completion_tokens": sum(lengths) / max(1, len(lengths)),
        "problems": len(per_seed[next(iter(per_seed))]),
    }


def run(args: common.StageArgs) -> dict:
    """`sdd eval`: every benchmark evaluated (or reused when done), then the table of results."""
    from sdd.stages.status import print_eval

    results = evaluate(args)
    print_eval(results)
    return results


def evaluate(args: common.StageArgs) -> dict:
    options, _ = common.resolve_options(("eval",), EvalOptions, None, args, {})
    if options.samples < 1 or options.seeds < 1:
        raise SddError("--samples and --seeds must be at least 1")
    if options.split is not None and options.split not in common.DataOptions.SPLITS:
        raise SddError(f"split must be one of {', '.join(common.DataOptions.SPLITS)}, not {options.split!r}")
    if options.backend not in ("hf", "vllm"):
        raise SddError(f"--backend must be hf or vllm, not {options.backend!r}")
    _vllm_settings(options)  # a bad vLLM option fails here, before anything loads
    run_dir = RunDir(args.run)
    run_dir.create()
    checkpoint = common.resolve_checkpoint(run_dir, options.role, options.model, revision=options.model_revision)
    source_name = checkpoint.from_stage or slug(Path(checkpoint.path).name)
    benchmarks = {
        bench: common.DataOptions.load_problems(
            bench, run_dir.datasets(), data_dir=options.data_dir, limit=options.limit, split=options.split,
            split_seed=options.split_seed, split_fraction=options.split_fraction, **common.data_selection(options))
        for bench in options.benchmark
    }

    from sdd.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(checkpoint.path, trust_remote_code=options.trust_remote_code, revision=checkpoint.revision)
    model = None
    results = {}
    for bench, (source, records, skipped) in benchmarks.items():
        name = f"{args.name or 'eval-' + source_name}-{slug(bench)}"
        inputs = {"model": checkpoint, "dataset": common.StageInput(source.describe())}
        try:
            with open_stage(args, name=name, stage="eval", role=options.role,
                            config={"sdd": options}, inputs=inputs) as stage:
                if model is None and options.backend == "hf":
                    from sdd.generation import Ranks

                    model = load_causal_lm(checkpoint.path, dtype=options.dtype,
                                           trust_remote_code=options.trust_remote_code, revision=checkpoint.revision)
                    model.to(Ranks.current().device).eval()  # this process's device, cuda:<LOCAL_RANK> under a launcher
                engine = model if options.backend == "hf" else checkpoint.path
                provenance = {"model": stage.run.record(name).inputs["model"].fingerprint,
                              "options": to_jsonable(options)}
                sampling = (engine, tokenizer, records, options)
                per_seed = {}
                for seed in range(options.seeds):
                    per_seed[seed] = _seed_rows(stage.dir / f"samples-seed{seed}.jsonl", provenance, sampling, seed,
                                                greedy=False, label=f"{bench} seed {seed}")
                    if stage.flag.requested:
                        return results
                metrics = summarize(per_seed, options.samples)
                if options.greedy:
                    rows = _seed_rows(stage.dir / "samples-greedy.jsonl", provenance, sampling, 0,
                                      greedy=True, label=f"{bench} greedy")
                    metrics["greedy"] = sum(r["correct"][0] for r in rows) / len(rows)
                metrics.update(benchmark=bench if options.split is None else f"{bench}:{options.split}", evaluates=checkpoint.from_stage or checkpoint.path,
                               skipped_unparsable_golds=skipped)
                atomic_write_text(stage.dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
                finish(stage, metrics=metrics)
                model_card.after_eval(run_dir, name)  # the evaluated checkpoint's card gains these numbers
                results[bench] = metrics
        except StageSkipped as skip:
            record = run_dir.record(name)
            results[bench] = record.metrics if record else {}
            print(skip)
    return results


def _seed_rows(path: Path, provenance: dict, sampling: tuple, seed: int, *, greedy: bool, label: str) -> list[dict]:
    """Reuse a finished seed file written from the same model and options; else sample and write it."""
    rows = sample_files.read(path, provenance)
    if rows is None:
        rows = sample_and_score(*sampling, seed, greedy=greedy, label=label)
        sample_files.write(path, provenance, rows)
    return rows
