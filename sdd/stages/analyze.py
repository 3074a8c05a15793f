"""`sdd analyze`: what each stage changed, and what it lost.

For a pair of checkpoints (a training stage's input and output, or two stages named with --from and
--to) this measures what the research behind sdd claims and no training log shows: which slice of
the parameters moved (update sparsity, and across seeds its overlap), which problems the model can
still solve at large k (capability boundary), how varied its answers and formats are (diversity),
and how close a student sits to its teacher before and after (teacher agreement). The measures are
in sdd/analysis.py; this module finds the checkpoints through the manifests, samples them once
(cached by checkpoint fingerprint and sampling settings), and writes one JSON per pair to
`<run dir of the later stage>/analysis/<from>__<to>.json`, which `sdd report` turns into tables and
plots (`report_section`). docs/analyze.md defines every number.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import itertools
import json
from pathlib import Path

from sdd import analysis, data
from sdd.errors import SddError
from sdd.manifest import MANIFEST_NAME, RunDir, atomic_write_text, fingerprint, library_versions, now_iso
from sdd.recipe import slug

TRAINING_STAGES = ("sft", "teacher-rl", "warmup", "distill", "student-rl")
DEFAULT_SAMPLES = 16
# Same seed as eval's first seed: on the same problems, the first samples of each problem are the
# ones `sdd eval` drew (sampling is a pure function of seed, problem index and sample index).
SAMPLING_SEED = 0
# Samples per problem scored for teacher agreement: two forward passes (student and teacher) per
# sequence and direction, so the KL costs a fraction of the sampling instead of a multiple of it.
KL_SAMPLES_PER_PROBLEM = 4
ANALYSIS_DIR = "analysis"
PAIR_KIND = "sdd-analysis-pair"
OVERLAP_KIND = "sdd-analysis-overlap"
SCHEMA = 1


@dataclasses.dataclass
class Checkpoint:
    """A model to analyse and where it came from, so every number can name it."""

    label: str  # the stage that wrote it, or the directory name of a path no manifest produced
    path: str  # local directory or hub id
    role: str | None
    stage: str | None = None
    run: str | None = None  # run dir of `stage`
    fingerprint: str | None = None

    @property
    def local(self) -> bool:
        return Path(self.path).exists()

    def describe(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Pair:
    """An earlier and a later checkpoint, and the manifest record of the stage that made the later one."""

    run_dir: Path
    record: dict
    before: Checkpoint
    after: Checkpoint

    @property
    def json_path(self) -> Path:
        return self.run_dir / ANALYSIS_DIR / f"{slug(self.before.label)}__{slug(self.after.label)}.json"

    @property
    def key(self) -> tuple[str, str]:
        return (self.before.fingerprint or self.before.path, self.after.fingerprint or self.after.path)


@dataclasses.dataclass
class Settings:
    """How to sample: the run's eval configuration, so analysis sees what eval saw."""

    benchmark: str | None = None
    data_dir: str | None = None
    limit: int | None = None
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    max_new_tokens: int = 8192
    chat_template_kwargs: dict = dataclasses.field(default_factory=lambda: {"enable_thinking": False})
    batch_size: int | None = None
    # Always transformers: a vLLM engine keeps most of the GPU for its lifetime, which the teacher-agreement
    # forward passes that follow then cannot get; and the sampler is the one eval's hf backend uses.
    backend: str = "hf"
    dtype: str = "auto"
    trust_remote_code: bool = False
    taken_from: str = "sdd eval's defaults"


# --------------------------------------------------------------------------------------------------
# Finding checkpoints through the manifests.


class Index:
    """Every finished stage output under the analysed root, by fingerprint.

    Inputs record absolute paths, which break when a run tree moves between machines; the fingerprint
    finds the same checkpoint at its new place.
    """

    def __init__(self, run_dirs: list[Path]):
        self.by_fingerprint: dict[str, Checkpoint] = {}
        for run_dir in run_dirs:
            run = RunDir(run_dir)
            for name, record in run.stages().items():
                if record.get("status") != "done":
                    continue
                for role, entry in (record.get("outputs") or {}).items():
                    if not entry.get("fingerprint"):
                        continue
                    with contextlib.suppress(SddError):  # an entry leading outside its run dir names nothing
                        self.by_fingerprint.setdefault(entry["fingerprint"], Checkpoint(
                            name, str(run.resolve_path(entry["path"])), role, name, str(run_dir.resolve()),
                            entry["fingerprint"]))


def _output(record: dict) -> tuple[str, dict]:
    outputs = record.get("outputs") or {}
    role = record.get("role") if record.get("role") in outputs else next(iter(outputs))
    return role, outputs[role]


def _model_input_key(record: dict) -> str | None:
    inputs = record.get("inputs") or {}
    return next((key for key in ("student", "model") if key in inputs), None)


def resolve_input(run_dir: Path, entry: dict, role: str | None, index: Index) -> Checkpoint:
    """The checkpoint an input entry names: the recorded stage's output when it still matches, else the path."""
    recorded_fp, stage, other_run = entry.get("fingerprint"), entry.get("from_stage"), entry.get("run")
    candidates = []
    if other_run:
        candidates += [Path(other_run), run_dir / other_run]
    candidates.append(run_dir)
    for candidate in candidates:
        if not stage or not (candidate / MANIFEST_NAME).is_file():
            continue
        record = RunDir(candidate).stage(stage)
        if not record or record.get("status") != "done":
            continue
        outputs = record.get("outputs", {})
        for out_role, out in sorted(outputs.items(), key=lambda item: item[0] != role):
            if recorded_fp is None or out.get("fingerprint") == recorded_fp:
                with contextlib.suppress(SddError):
                    return Checkpoint(stage, str(RunDir(candidate).resolve_path(out["path"])), out_role, stage,
                                      str(candidate.resolve()), out.get("fingerprint"))
    if recorded_fp and recorded_fp in index.by_fingerprint:
        return index.by_fingerprint[recorded_fp]
    path = entry.get("path", "")
    if Path(path).exists() or (path.count("/") == 1 and not path.startswith((".", "/", "~"))):
        return Checkpoint(stage or slug(Path(path).name), path, role, stage, other_run, recorded_fp)
    raise SddError(f"{path}, an input recorded in {run_dir / MANIFEST_NAME}, no longer exists; restore it or rerun "
                   f"{'stage ' + repr(stage) if stage else 'the stage that made it'}")


def _check_fingerprint(checkpoint: Checkpoint, memo: dict[str, str]) -> None:
    """Refuse a checkpoint whose files changed after its stage recorded them: its numbers would name the wrong model."""
    if not checkpoint.local:
        return
    if checkpoint.path not in memo:
        memo[checkpoint.path] = fingerprint(checkpoint.path)
    actual = memo[checkpoint.path]
    if checkpoint.fingerprint and checkpoint.fingerprint != actual:
        raise SddError(f"{checkpoint.path} changed since stage '{checkpoint.stage}' wrote it (fingerprint "
                       f"{checkpoint.fingerprint} -> {actual}); rerun that stage, or analyse another checkpoint")
    checkpoint.fingerprint = actual


def _after(run_dir: Path, name: str, record: dict) -> Checkpoint:
    role, out = _output(record)
    return Checkpoint(name, str(RunDir(run_dir).resolve_path(out["path"])), role, name, str(run_dir.resolve()),
                      out.get("fingerprint"))


def stage_pairs(run_dir: Path, index: Index) -> list[Pair]:
    """(input, output) of every finished training stage of a run dir, in the order they finished."""
    pairs = []
    stages = RunDir(run_dir).stages()
    for name, record in sorted(stages.items(), key=lambda item: item[1].get("done_seq", 0)):
        if record.get("stage") not in TRAINING_STAGES or record.get("status") != "done" or not record.get("outputs"):
            continue
        key = _model_input_key(record)
        if key is None:
            continue
        after = _after(run_dir, name, record)
        before = resolve_input(run_dir, record["inputs"][key], after.role, index)
        pairs.append(Pair(run_dir, record, before, after))
    return pairs


def named_pair(run_dir: Path, from_stage: str | None, to_stage: str, index: Index) -> Pair:
    """--from/--to: `to_stage` of this run dir, against its own input or against `from_stage`.

    `from_stage` may be a stage of this run dir or the stage an input of `to_stage` came from (in
    another run dir, such as `<root>/shared`), which is the common case.
    """
    stages = RunDir(run_dir).stages()
    present = ", ".join(sorted(stages)) or "none"
    record = stages.get(to_stage)
    if record is None:
        raise SddError(f"no stage '{to_stage}' in {run_dir}; stages present: {present}")
    if record.get("status") != "done":
        raise SddError(f"stage '{to_stage}' in {run_dir} is {record.get('status')}, not done; finish it (rerun its "
                       "command) before analysing it")
    if not record.get("outputs"):
        raise SddError(f"stage '{to_stage}' ({record.get('stage')}) wrote no checkpoint; --to must name a training "
                       f"stage (stages present: {present})")
    after = _after(run_dir, to_stage, record)
    inputs = {k: v for k, v in (record.get("inputs") or {}).items() if k in ("model", "student", "teacher")}
    if from_stage is None:
        key = _model_input_key(record)
        if key is None:
            raise SddError(f"stage '{to_stage}' records no input model; name the earlier stage with --from")
        return Pair(run_dir, record, resolve_input(run_dir, inputs[key], after.role, index), after)
    if from_stage == to_stage:
        raise SddError(f"--from and --to both name '{to_stage}'; name two different stages")
    ordered = sorted(inputs.items(), key=lambda item: item[0] == "teacher")
    for _, entry in ordered:
        if entry.get("from_stage") == from_stage:
            return Pair(run_dir, record, resolve_input(run_dir, entry, after.role, index), after)
    earlier = stages.get(from_stage)
    if earlier is None:
        sources = ", ".join(f"{k}: {v.get('from_stage') or v.get('path')}" for k, v in inputs.items()) or "none"
        raise SddError(f"no stage '{from_stage}' in {run_dir} and no input of '{to_stage}' came from it; stages "
                       f"present: {present}; inputs of {to_stage}: {sources}")
    if earlier.get("status") != "done" or not earlier.get("outputs"):
        raise SddError(f"stage '{from_stage}' in {run_dir} is {earlier.get('status')} with no checkpoint; --from "
                       "must name a finished stage that wrote one")
    outputs = earlier["outputs"]
    role = after.role if after.role in outputs else next(iter(outputs))
    out = outputs[role]
    before = Checkpoint(from_stage, str(RunDir(run_dir).resolve_path(out["path"])), role, from_stage,
                        str(run_dir.resolve()), out.get("fingerprint"))
    return Pair(run_dir, record, before, after)


def find_teacher(pair: Pair, index: Index) -> tuple[Checkpoint | None, str]:
    """The teacher a student stage answers to, and how it was found (or why there is none).

    warmup and distill name theirs. student-rl does not, so the chain of inputs is followed back to
    the bridge stage that trained its starting point, then the run dir's own bridge stages are tried.
    """
    record = pair.record
    if "teacher" in (record.get("inputs") or {}):
        return (resolve_input(pair.run_dir, record["inputs"]["teacher"], "teacher", index),
                f"the teacher input of {pair.after.label}")
    if record.get("stage") != "student-rl":
        return None, f"{record.get('stage')} trains without a teacher"
    run_dir, current = pair.run_dir, record
    for _ in range(32):  # a chain of stages; the bound only guards against a manifest that loops
        key = _model_input_key(current)
        if key is None:
            break
        start = resolve_input(run_dir, current["inputs"][key], "student", index)
        if not start.stage or not start.run or not (Path(start.run) / MANIFEST_NAME).is_file():
            break
        run_dir, current = Path(start.run), RunDir(start.run).stage(start.stage)
        if current is None:
            break
        if "teacher" in (current.get("inputs") or {}):
            return (resolve_input(run_dir, current["inputs"]["teacher"], "teacher", index),
                    f"the teacher of {start.stage} ({run_dir}), which {pair.after.label} starts from")
    bridges = [(name, r) for name, r in RunDir(pair.run_dir).stages().items()
               if r.get("stage") in ("warmup", "distill") and r.get("status") == "done" and "teacher" in r.get("inputs", {})]
    if bridges:
        name, bridge = max(bridges, key=lambda item: item[1].get("done_seq", 0))
        return (resolve_input(pair.run_dir, bridge["inputs"]["teacher"], "teacher", index),
                f"the teacher of {name} in the same run dir")
    return None, "no teacher found through the manifests: this student never learned from one (e.g. direct GRPO)"


# --------------------------------------------------------------------------------------------------
# Settings, problems and samples.


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
    evals = [(name, r) for name, r in RunDir(run_dir).stages().items()
             if r.get("stage") == "eval" and r.get("status") == "done"]
    if evals:
        name, record = max(evals, key=lambda item: item[1].get("done_seq", 0))
        overlay((record.get("config") or {}).get("sdd") or {}, f"eval record '{name}' of {run_dir}")
        if (record.get("metrics") or {}).get("benchmark"):
            settings.benchmark = record["metrics"]["benchmark"]
    return settings


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


def sampling_record(settings: Settings, samples: int) -> dict:
    return {"n": samples, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k,
            "max_new_tokens": settings.max_new_tokens, "seed": SAMPLING_SEED,
            "chat_template_kwargs": settings.chat_template_kwargs, "backend": settings.backend,
            "taken_from": settings.taken_from}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_model(checkpoint: Checkpoint, settings: Settings):
    from sdd.models import load_causal_lm

    model = load_causal_lm(checkpoint.path, dtype=settings.dtype, trust_remote_code=settings.trust_remote_code)
    return model.to(_device()).eval()


def _release() -> None:
    """Return a dropped model's memory now: the next checkpoint is loaded right after."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cached_samples(checkpoint: Checkpoint, problems: Problems, settings: Settings, samples: int,
                   cache_dir: Path) -> list[dict]:
    """K verified samples per problem from one checkpoint, reused from the cache when nothing changed.

    The cache key is the checkpoint's fingerprint, the problems and the sampling settings: the same
    checkpoint is the `to` of one pair and the `from` (or teacher) of others, and is sampled once.
    """
    provenance = {
        "checkpoint": checkpoint.fingerprint or checkpoint.path,
        "problems": data.problems_fingerprint(problems.records),
        "sampling": {k: v for k, v in sampling_record(settings, samples).items() if k != "taken_from"},
    }
    key = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"{slug(checkpoint.label)}-{key}.jsonl"
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        try:
            if json.loads(lines[0]).get("provenance") == provenance:
                return [json.loads(line) for line in lines[1:]]
        except (ValueError, IndexError):
            pass  # a damaged cache file is regenerated
    rows = _sample(checkpoint, problems, settings, samples)
    cache_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"provenance": provenance, "checkpoint": checkpoint.describe()}) + "\n"
    atomic_write_text(path, text + "".join(json.dumps(row) + "\n" for row in rows))
    return rows


def _sample(checkpoint: Checkpoint, problems: Problems, settings: Settings, samples: int) -> list[dict]:
    from rich.progress import Progress

    from sdd.generation import SamplingParams, generate
    from sdd.models import load_tokenizer
    from sdd.verify import score_completions

    tokenizer = load_tokenizer(checkpoint.path, trust_remote_code=settings.trust_remote_code)
    params = SamplingParams(n=samples, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                            max_new_tokens=settings.max_new_tokens, seed=SAMPLING_SEED)
    prompts = [data.render_prompt(tokenizer, r["problem"], settings.chat_template_kwargs) for r in problems.records]
    model = _load_model(checkpoint, settings) if settings.backend == "hf" else checkpoint.path
    with Progress(transient=True) as progress:
        task = progress.add_task(f"sampling {checkpoint.label}", total=len(prompts) * samples)
        completions = generate(model, tokenizer, prompts, params, backend=settings.backend,
                               batch_size=settings.batch_size, progress=lambda k: progress.advance(task, k))
    del model
    _release()
    scores = score_completions([c.text for group in completions for c in group],
                               [r["answer"] for r in problems.records for _ in range(samples)])
    rows = []
    for i, (record, group) in enumerate(zip(problems.records, completions, strict=True)):
        rows.append({"id": record["id"], "answer": record["answer"],
                     "correct": [bool(s) for s in scores[i * samples:(i + 1) * samples]],
                     "truncated": [c.finish_reason == "length" for c in group],
                     "completions": [c.text for c in group],
                     "token_ids": [list(c.token_ids) for c in group]})
    return rows


# --------------------------------------------------------------------------------------------------
# The four analyses of one pair.


def _weights_dir(checkpoint: Checkpoint) -> Path:
    """A local directory of safetensors files: the checkpoint itself, or a hub model's cached snapshot."""
    if checkpoint.local:
        return Path(checkpoint.path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(checkpoint.path, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as err:  # noqa: BLE001 - the hub client raises many types; the user needs one line
        raise SddError(f"cannot get the weights of {checkpoint.path} ({type(err).__name__}); download it first") from None


def sparsity(pair: Pair) -> dict:
    try:
        return analysis.compare_weights(_weights_dir(pair.before), _weights_dir(pair.after))
    except SddError as err:
        return {"skipped": str(err)}


def teacher_agreement(pair: Pair, rows_from: list[dict], rows_to: list[dict], problems: Problems, settings: Settings,
                      samples: int, cache_dir: Path, index: Index, memo: dict) -> dict:
    """Token-mean reverse KL(S||T) and forward KL(T||S) of each student, on its own and on the teacher's samples."""
    if pair.after.role != "student":
        return {"skipped": f"{pair.after.label} is a {pair.after.role} checkpoint; teacher agreement is measured "
                           "for students"}
    teacher, how = find_teacher(pair, index)
    if teacher is None:
        return {"skipped": how}
    _check_fingerprint(teacher, memo)
    from transformers import AutoConfig

    from sdd.agreement import Sequence, mean_divergence
    from sdd.models import load_tokenizer, shared_vocab_size

    trust = settings.trust_remote_code
    teacher_tokenizer = load_tokenizer(teacher.path, trust_remote_code=trust)
    teacher_config = AutoConfig.from_pretrained(teacher.path, trust_remote_code=trust)
    rows_teacher = cached_samples(teacher, problems, settings, samples, cache_dir)
    per_problem = min(KL_SAMPLES_PER_PROBLEM, samples)
    result = {"teacher": teacher.describe(), "found": how, "samples_per_problem": per_problem,
              "teacher_pass_at_1": analysis.pass_at_k_curve([r["correct"] for r in rows_teacher], 1)[0],
              "on_student_samples": {}, "on_teacher_samples": {}}
    teacher_model = None
    for side, student, own_rows in (("from", pair.before, rows_from), ("to", pair.after, rows_to)):
        tokenizer = load_tokenizer(student.path, trust_remote_code=trust)
        try:
            vocab_size = shared_vocab_size(teacher_tokenizer, tokenizer, teacher_config,
                                           AutoConfig.from_pretrained(student.path, trust_remote_code=trust))
        except SddError as err:
            result[f"skipped_{side}"] = str(err)
            continue
        if teacher_model is None:
            teacher_model = _load_model(teacher, settings)
        student_model = _load_model(student, settings)
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
        _release()
    del teacher_model
    _release()
    return result


def analyse_pair(pair: Pair, *, problems: Problems, settings: Settings, samples: int, cache_dir: Path, index: Index,
                 memo: dict) -> dict:
    for checkpoint in (pair.before, pair.after):
        _check_fingerprint(checkpoint, memo)
    rows_from = cached_samples(pair.before, problems, settings, samples, cache_dir)
    rows_to = cached_samples(pair.after, problems, settings, samples, cache_dir)
    return {
        "kind": PAIR_KIND,
        "schema": SCHEMA,
        "created_at": now_iso(),
        "versions": library_versions(),
        "run_dir": str(pair.run_dir.resolve()),
        "stage": {"name": pair.after.label, "kind": pair.record.get("stage")},
        "from": pair.before.describe(),
        "to": pair.after.describe(),
        "prompts": problems.describe(),
        "sampling": sampling_record(settings, samples),
        "sparsity": sparsity(pair),
        "capability": analysis.capability([r["id"] for r in rows_from], [r["correct"] for r in rows_from],
                                          [r["correct"] for r in rows_to]),
        "diversity": {"from": analysis.diversity(rows_from), "to": analysis.diversity(rows_to)},
        "teacher_agreement": teacher_agreement(pair, rows_from, rows_to, problems, settings, samples, cache_dir,
                                               index, memo),
    }


# --------------------------------------------------------------------------------------------------
# Overlap across seeds.


def _variant_seed(root: Path, run_dir: Path) -> tuple[str, int] | None:
    try:
        parts = run_dir.resolve().relative_to(root.resolve()).parts
    except ValueError:
        return None
    if len(parts) == 2 and parts[1].startswith("seed") and parts[1][4:].isdigit():
        return parts[0], int(parts[1][4:])
    return None


def seed_overlaps(root: Path, pairs: list[Pair], force: bool) -> list[Path]:
    """Jaccard of the changed sets of one stage across training seeds (`<root>/<variant>/seed<k>`)."""
    groups: dict[tuple[str, str], dict[int, Pair]] = {}
    for pair in pairs:
        where = _variant_seed(root, pair.run_dir)
        if where:
            groups.setdefault((where[0], pair.after.label), {})[where[1]] = pair
    written = []
    for (variant, stage), by_seed in sorted(groups.items()):
        for seed_a, seed_b in itertools.combinations(sorted(by_seed), 2):
            out = root / ANALYSIS_DIR / f"overlap__{slug(variant)}__{slug(stage)}__seed{seed_a}-seed{seed_b}.json"
            a, b = by_seed[seed_a], by_seed[seed_b]
            existing = _read_json(out) if not force else None
            recorded = [(existing or {}).get(k, {}).get(side, {}).get("fingerprint") for k in "ab" for side in ("from", "to")]
            if existing and recorded == [a.before.fingerprint, a.after.fingerprint, b.before.fingerprint,
                                         b.after.fingerprint]:
                print(f"skip: {out} exists (--force to redo it)")
                written.append(out)
                continue
            try:
                result = analysis.overlap_weights((_weights_dir(a.before), _weights_dir(a.after)),
                                                  (_weights_dir(b.before), _weights_dir(b.after)))
            except SddError as err:
                print(f"overlap of {variant}/{stage} seeds {seed_a} and {seed_b} skipped: {err}")
                continue
            document = {"kind": OVERLAP_KIND, "schema": SCHEMA, "created_at": now_iso(), "root": str(root.resolve()),
                        "variant": variant, "stage": stage,
                        "a": {"seed": seed_a, "run_dir": str(a.run_dir.resolve()), "from": a.before.describe(),
                              "to": a.after.describe()},
                        "b": {"seed": seed_b, "run_dir": str(b.run_dir.resolve()), "from": b.before.describe(),
                              "to": b.after.describe()},
                        **result}
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out, json.dumps(document, indent=1) + "\n")
            total = result["total"]
            print(f"overlap {variant}/{stage} seed{seed_a} vs seed{seed_b}: Jaccard {_fmt(total['jaccard'])} "
                  f"(chance {_fmt(total['chance_jaccard'])}) -> {out}")
            written.append(out)
    return written


# --------------------------------------------------------------------------------------------------
# The command.


def run(path: Path, *, from_stage: str | None = None, to_stage: str | None = None, samples: int | None = None,
        limit: int | None = None, benchmark: str | None = None, data_dir: str | None = None,
        force: bool = False) -> list[dict]:
    """Analyse one pair (--to, optionally --from) or every training stage under `path`; returns the pair documents."""
    path = Path(path)
    if not path.is_dir():
        raise SddError(f"{path} does not exist; pass a run dir or the --root of `sdd run`")
    samples = DEFAULT_SAMPLES if samples is None else samples
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
    index = Index(sorted({m.parent for m in path.rglob(MANIFEST_NAME)}))
    if to_stage:
        pairs = [named_pair(path, from_stage, to_stage, index)]
    else:
        pairs, seen = [], set()
        for run_dir in run_dirs:
            for pair in stage_pairs(run_dir, index):
                if pair.key not in seen:
                    seen.add(pair.key)
                    pairs.append(pair)
        if not pairs:
            raise SddError(f"no finished training stage under {path}; run one (sdd sft/teacher-rl/warmup/distill/"
                           "student-rl) before analysing")
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
        existing = _read_json(pair.json_path)
        if existing and not force:
            if _same_analysis(existing, pair, problems, settings, samples):
                print(f"skip {label}: {pair.json_path} exists (--force to redo it)")
                documents.append(existing)
                continue
            print(f"{label}: {pair.json_path} was made from other checkpoints, problems or sampling settings; redoing it")
        document = analyse_pair(pair, problems=problems, settings=settings, samples=samples, cache_dir=cache_dir,
                                index=index, memo=memo)
        pair.json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(pair.json_path, json.dumps(document, indent=1) + "\n")
        print(f"{label}: {headline(document)} -> {pair.json_path}")
        documents.append(document)
    if not is_run_dir:
        seed_overlaps(path, pairs, force)
    return documents


def _read_json(path: Path) -> dict | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _same_analysis(document: dict, pair: Pair, problems: Problems, settings: Settings, samples: int) -> bool:
    """Whether a pair's existing JSON answers this request: same checkpoints, problems and sampling."""
    same_models = all(
        document.get(side, {}).get("fingerprint") == (checkpoint.fingerprint or document.get(side, {}).get("fingerprint"))
        and document.get(side, {}).get("path") == checkpoint.path
        for side, checkpoint in (("from", pair.before), ("to", pair.after)))
    def how(sampling: dict) -> dict:
        return {k: v for k, v in sampling.items() if k != "taken_from"}

    return (same_models and document.get("prompts") == problems.describe()
            and how(document.get("sampling") or {}) == how(sampling_record(settings, samples)))


def sample_cache_dir(path: Path) -> Path:
    """The nearest existing sample cache at `path` or up to three levels above it (ROOT from ROOT/variant/seed0).

    So `sdd analyze ROOT/<variant>/seed0 --from a --to b` after `sdd analyze ROOT` reuses ROOT's samples.
    Entries are keyed by checkpoint fingerprint, so a cache found higher up can never serve another model.
    """
    for candidate in [path.resolve(), *path.resolve().parents][:4]:
        if (candidate / ANALYSIS_DIR / "samples").is_dir():
            return candidate / ANALYSIS_DIR / "samples"
    return path / ANALYSIS_DIR / "samples"


def _where(root: Path, run_dir: Path) -> str:
    try:
        return run_dir.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(run_dir)


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def headline(document: dict) -> str:
    """One line per pair for the console: the number each analysis is about."""
    parts = []
    sparse = document["sparsity"]
    if "skipped" in sparse:
        parts.append("sparsity skipped")
    else:
        parts.append(f"changed {_pct(sparse['total']['fraction'])} (bf16 res. {_pct(sparse['total']['fraction_bf16'])})")
    cap = document["capability"]
    k = cap["samples_per_problem"]
    parts.append(f"pass@1 {_fmt(cap['pass_at_k']['from'][0])}->{_fmt(cap['pass_at_k']['to'][0])}, pass@{k} "
                 f"{_fmt(cap['pass_at_k']['from'][-1])}->{_fmt(cap['pass_at_k']['to'][-1])}, lost {len(cap['lost'])}, "
                 f"gained {len(cap['gained'])}")
    div = document["diversity"]
    parts.append(f"distinct answers {_fmt(div['from']['distinct_answer_rate'], 2)}->"
                 f"{_fmt(div['to']['distinct_answer_rate'], 2)}")
    agreement = document["teacher_agreement"]
    if "skipped" not in agreement and "from" in agreement["on_student_samples"] and "to" in agreement["on_student_samples"]:
        own = agreement["on_student_samples"]
        parts.append(f"reverse KL to teacher {_fmt(own['from']['reverse_kl'])}->{_fmt(own['to']['reverse_kl'])}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# The report section.


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


def _rel(root: Path, path: str | None) -> str:
    if not path:
        return "?"
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix() or "."
    except ValueError:
        return str(path)


def report_section(root: Path, out: Path) -> tuple[str, dict, list[Path]]:
    """Markdown, JSON-able data and plot paths for `sdd report`; empty where nothing was analysed."""
    root, out = Path(root), Path(out)
    # The run dir is where the JSON lies (ROOT/<run>/analysis/x.json), not the path recorded when it was written:
    # run trees move between machines. Shared stages (ROOT/shared) first, then the variants', then by time.
    pairs = sorted(_documents(root, PAIR_KIND), key=lambda item: (
        len(Path(_rel(root, str(item[0].parent.parent))).parts), _rel(root, str(item[0].parent.parent)),
        item[1]["created_at"]))
    overlaps = _documents(root, OVERLAP_KIND)
    if not pairs and not overlaps:
        return "", {}, []
    rows = []
    for number, (file, doc) in enumerate(pairs, 1):
        rows.append({"id": f"P{number}", "file": _rel(root, str(file)), "run": _rel(root, str(file.parent.parent)),
                     "label": f"{doc['from']['label']} → {doc['to']['label']}", "doc": doc})
    lines = ["## What each stage changed (`sdd analyze`)", "",
             "Definitions: docs/analyze.md. Pairs (every table below names its pair by id):", "",
             "| id | run dir | from (path) | to (path) | prompts | samples (K) | sampling |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        doc = row["doc"]
        prompts, sampling = doc["prompts"], doc["sampling"]
        lines.append(
            f"| {row['id']} | {row['run']} | {doc['from']['label']} (`{_rel(root, doc['from']['path'])}`) | "
            f"{doc['to']['label']} (`{_rel(root, doc['to']['path'])}`) | {prompts['benchmark']} ({prompts['count']} "
            f"problems) | {sampling['n']} | seed {sampling['seed']}, T {sampling['temperature']}, top-p "
            f"{sampling['top_p']}, top-k {sampling['top_k']}, ≤{sampling['max_new_tokens']} tokens |")
    lines += ["", "### Update sparsity (share of parameters changed; per type at the stored dtype's resolution)", "",
              "| pair | all | all at bf16 res. | " + " | ".join(analysis.LAYER_TYPES[:9]) + " | update eff. rank / max (median) |",
              "|---" * 13 + "|"]
    for row in rows:
        sparse = row["doc"]["sparsity"]
        if "skipped" in sparse:
            lines.append(f"| {row['id']} {row['label']} | skipped: {sparse['skipped']} |" + " |" * 11)
            continue
        by_type = sparse["by_type"]
        cells = [_pct(by_type[k]["fraction"]) if k in by_type else "" for k in analysis.LAYER_TYPES[:9]]
        lines.append(f"| {row['id']} {row['label']} | {_pct(sparse['total']['fraction'])} | "
                     f"{_pct(sparse['total']['fraction_bf16'])} | " + " | ".join(cells) +
                     f" | {_fmt(sparse['effective_rank']['median_ratio'], 2)} |")
    if overlaps:
        lines += ["", "### Overlap of the changed sets across training seeds (Jaccard; chance = random placement "
                  "within each tensor)", "", "| variant | stage | seeds | same start | Jaccard | chance | Jaccard at "
                  "bf16 res. | chance at bf16 res. | checkpoints |", "|---|---|---|---|---|---|---|---|---|"]
        for _, doc in overlaps:
            total = doc["total"]
            lines.append(f"| {doc['variant']} | {doc['stage']} | {doc['a']['seed']}, {doc['b']['seed']} | "
                         f"{'yes' if doc['same_base'] else 'no'} | {_fmt(total['jaccard'])} | "
                         f"{_fmt(total['chance_jaccard'])} | {_fmt(total['jaccard_bf16'])} | "
                         f"{_fmt(total['chance_jaccard_bf16'])} | `{_rel(root, doc['a']['to']['path'])}`, "
                         f"`{_rel(root, doc['b']['to']['path'])}` |")
    lines += ["", "### Capability boundary (pass@k from K samples per problem, same prompts and seeds)", "",
              "| pair | prompts | pass@1 from → to | pass@K from → to | solved at some k ≤ K from → to | lost | gained "
              "| crossover k |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cap, prompts = row["doc"]["capability"], row["doc"]["prompts"]
        curve = cap["pass_at_k"]
        lines.append(
            f"| {row['id']} {row['label']} | {prompts['benchmark']} ({cap['problems']}) | {_fmt(curve['from'][0])} → "
            f"{_fmt(curve['to'][0])} | pass@{cap['samples_per_problem']} {_fmt(curve['from'][-1])} → "
            f"{_fmt(curve['to'][-1])} | {cap['solved']['from']} → {cap['solved']['to']} | {len(cap['lost'])} | "
            f"{len(cap['gained'])} | {cap['crossover_k'] or '–'} |")
    lines += ["", "### Diversity over the K samples of each problem (mean over problems)", "",
              "| pair | distinct answers | boxed | distinct-2 | distinct-3 | mean length (tokens) | truncated | "
              "format entropy (bits, max log2 K) |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        div = row["doc"]["diversity"]
        a, b = div["from"], div["to"]
        lines.append(
            f"| {row['id']} {row['label']} | {_fmt(a['distinct_answer_rate'], 2)} → {_fmt(b['distinct_answer_rate'], 2)} | "
            f"{_pct(a['answered_rate'])} → {_pct(b['answered_rate'])} | {_fmt(a['distinct_2'], 2)} → "
            f"{_fmt(b['distinct_2'], 2)} | {_fmt(a['distinct_3'], 2)} → {_fmt(b['distinct_3'], 2)} | "
            f"{a['length']['mean']:.1f} → {b['length']['mean']:.1f} | {_pct(a['length']['truncation_rate'])} → "
            f"{_pct(b['length']['truncation_rate'])} | {_fmt(a['format']['entropy_bits'], 2)} → "
            f"{_fmt(b['format']['entropy_bits'], 2)} (max {_fmt(b['format']['entropy_bits_max'], 2)}) |")
    lines += ["", "### Teacher agreement (token-mean KL in nats; reverse = KL(student ‖ teacher), forward = "
              "KL(teacher ‖ student))", "",
              "| pair | teacher (path) | on student's samples: reverse | forward | on teacher's samples: reverse | "
              "forward |", "|---|---|---|---|---|---|"]
    for row in rows:
        agreement = row["doc"]["teacher_agreement"]
        if "skipped" in agreement:
            lines.append(f"| {row['id']} {row['label']} | skipped: {agreement['skipped']} | | | | |")
            continue
        teacher = agreement["teacher"]

        def cell(where: str, key: str, agreement=agreement) -> str:
            sides = agreement[where]
            return " → ".join(_fmt(sides[s][key]) if s in sides else "n/a" for s in ("from", "to"))

        lines.append(f"| {row['id']} {row['label']} | {teacher['label']} (`{_rel(root, teacher['path'])}`) | "
                     f"{cell('on_student_samples', 'reverse_kl')} | {cell('on_student_samples', 'forward_kl')} | "
                     f"{cell('on_teacher_samples', 'reverse_kl')} | {cell('on_teacher_samples', 'forward_kl')} |")
    plots = [_plot_pair(root, row, out) for row in rows]
    data_out = {
        "pairs": [{"id": row["id"], "file": row["file"], "run_dir": row["run"], "from": row["doc"]["from"],
                   "to": row["doc"]["to"], "prompts": row["doc"]["prompts"], "sampling": row["doc"]["sampling"],
                   "sparsity": {k: v for k, v in row["doc"]["sparsity"].items() if k not in ("tensors", "by_layer")},
                   "capability": {k: v for k, v in row["doc"]["capability"].items() if k not in ("ids", "correct_counts")},
                   "diversity": row["doc"]["diversity"], "teacher_agreement": row["doc"]["teacher_agreement"]}
                  for row in rows],
        "overlaps": [{k: v for k, v in doc.items() if k != "skipped_tensors"} for _, doc in overlaps],
    }
    return "\n".join(lines) + "\n", data_out, plots


def _plot_pair(root: Path, row: dict, out: Path) -> Path:
    """pass@k curves and per-layer sparsity of one pair, titled with its checkpoints, prompts and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    doc = row["doc"]
    cap, prompts, sampling = doc["capability"], doc["prompts"], doc["sampling"]
    names = (doc["from"]["label"], doc["to"]["label"])
    fig, (curves, layers) = plt.subplots(1, 2, figsize=(11, 4.2))
    for side, name, style in (("from", names[0], "--"), ("to", names[1], "-")):
        curves.plot(cap["k"], cap["pass_at_k"][side], style, marker="o", markersize=3, label=name)
    curves.set_xscale("log", base=2)
    curves.set_xlabel("k")
    curves.set_ylabel("pass@k")
    curves.set_ylim(0, 1)
    curves.legend(fontsize=8)
    curves.set_title(f"pass@k on {prompts['benchmark']} ({prompts['count']} problems)", fontsize=9)
    sparse = doc["sparsity"]
    if "skipped" in sparse or not sparse["by_layer"]:
        layers.text(0.5, 0.5, "no per-layer sparsity\n" + sparse.get("skipped", "")[:80], ha="center", va="center",
                    fontsize=8, wrap=True)
        layers.set_axis_off()
    else:
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
    fig.suptitle(f"{row['id']} {row['run']}: {names[0]} → {names[1]}; K={sampling['n']}, sampling seed "
                 f"{sampling['seed']}", fontsize=10)
    fig.text(0.01, 0.01, f"from {_rel(root, doc['from']['path'])}   to {_rel(root, doc['to']['path'])}", fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 0.94))
    path = out / f"analysis-{row['id']}-{slug(row['run'])}-{slug(names[0])}__{slug(names[1])}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
