"""`sdd warmup`: the off-policy bridge. The teacher writes completions; the student learns them
with full-vocabulary forward KL at every completion token:

    L = (1/N) Σ_t Σ_v p_T(v | x, y<t) [log p_T(v | ·) − log p_S(v | ·)]

This is not SFT on the teacher's sampled tokens: the student sees the teacher's whole
next-token distribution, including how sure it was. (`--set objective=sft` trains on the same
samples with hard labels, the control that tells the two apart.) Forward KL is mass-covering,
which is what a student far from its teacher needs before on-policy distillation, whose
reverse KL is only a useful signal once the student's own samples are near the teacher's.

Teacher sampling is the expensive step, so its output is a file in the stage folder with its
provenance (teacher fingerprint, data, sampling settings): a rerun reuses it when everything
matches, resumes it if it was cut short, and regenerates it when the teacher changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from pathlib import Path

from sdd import config as cfg
from sdd import data
from sdd import samples as sample_files
from sdd.errors import SddError
from sdd.manifest import RunDir, atomic_write_text, fingerprint
from sdd.samples import SAMPLING
from sdd.stages import common
from sdd.train.checkpoints import resume_point
from sdd.train.lifecycle import finish, open_stage

SAMPLES_FILE = "teacher-samples.jsonl"
OBJECTIVES = ("forward-kl", "sft")


@dataclasses.dataclass
class WarmupOptions(common.TrainingOptions):
    teacher: str | None = dataclasses.field(default=None, metadata={
        "help": "Teacher path, hub id or run dir (default: newest teacher in the run)."})
    student: str | None = dataclasses.field(default=None, metadata={
        "help": "Student path, hub id or run dir (default: newest student in the run)."})
    teacher_revision: str | None = common.teacher_revision_field()
    prompts: int | None = dataclasses.field(default=None, metadata={
        "help": "Prompts the teacher samples for training (default: every problem); heldout_prompts more are "
                "held out."})
    samples_per_prompt: int = dataclasses.field(default=1, metadata={"help": "Teacher samples per prompt."})
    sample_temperature: float = dataclasses.field(default=SAMPLING.temperature, metadata={"help": "Teacher sampling temperature."})
    sample_top_p: float = dataclasses.field(default=SAMPLING.top_p, metadata={"help": "Teacher sampling top-p (1.0: off)."})
    sample_top_k: int = dataclasses.field(default=SAMPLING.top_k, metadata={"help": "Teacher sampling top-k (0: off)."})
    max_new_tokens: int = dataclasses.field(default=4096, metadata={"help": "Longest teacher sample, in tokens."})
    max_prompt_length: int = dataclasses.field(default=2048, metadata={
        "help": "Longest prompt in tokens (the authors' max_prompt_length): with max_new_tokens it sets TRL's "
                "SFTConfig.max_length, so a teacher sample is never cut, unless a layer sets max_length itself."})
    sample_seed: int = dataclasses.field(default=0, metadata={"help": "Seed of the teacher's samples."})
    sample_batch_size: int | None = dataclasses.field(default=None, metadata={
        "help": "Sequences per generate call (default: the largest batch the free GPU memory holds, up to 256; 64 on CPU)."})
    sample_chunk: int = dataclasses.field(default=256, metadata={
        "help": "Prompts per flushed chunk of teacher samples: a kill loses at most one chunk, a SIGTERM waits "
                "for one."})
    sample_cache: str | None = dataclasses.field(default=None, metadata={
        "help": "A folder of teacher samples shared between stages: same teacher, data and settings, same file."})
    only_correct: bool = dataclasses.field(default=False, metadata={
        "help": "Train only on the teacher samples the verifier accepts."})
    heldout_prompts: int = dataclasses.field(default=32, metadata={
        "help": "Prompts kept out of training, on which the forward KL to the teacher is measured before and "
                "after."})
    objective: str = dataclasses.field(default="forward-kl", metadata={
        "help": "forward-kl (the teacher's whole next-token distribution) or sft (hard labels on the same "
                "samples: the control)."})
    kl_temperature: float = dataclasses.field(default=1.0, metadata={
        "help": "Temperature of both models' distributions in the forward KL."})
    kl_impl: str = dataclasses.field(default="auto", metadata={
        "help": "Who computes the loss that trains: auto (TRL's kernel; sdd's torch formula under ZeRO-3), trl, "
                "or torch (the readable formula in sdd/losses.py, whose docstring says which runs where)."})
    backend: str = dataclasses.field(default="hf", metadata={"help": "Teacher sampling engine: hf (transformers) or vllm."})
    vllm_tensor_parallel_size: int = dataclasses.field(default=1, metadata={
        "help": "vLLM engine for teacher sampling (backend vllm): GPUs per engine (TRL's name in GRPO)."})
    vllm_gpu_memory_utilization: float = dataclasses.field(default=0.9, metadata={
        "help": "vLLM engine for teacher sampling: share of the GPU it takes (TRL's name in GRPO)."})
    vllm_max_model_length: int | None = dataclasses.field(default=None, metadata={
        "help": "vLLM engine for teacher sampling: longest prompt + completion (TRL's name in GRPO)."})
    dtype: str = dataclasses.field(default="auto", metadata={"help": "dtype the teacher is loaded in (auto: the checkpoint's)."})

    def vllm_settings(self):
        from sdd.generation import VllmSettings

        return VllmSettings(self.vllm_tensor_parallel_size, self.vllm_gpu_memory_utilization, self.vllm_max_model_length)


DEFAULTS = {
    **common.TRAINER_DEFAULTS,
    "learning_rate": 1e-5,
    "num_train_epochs": 1,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "logging_steps": 10,
    "save_steps": 200,
}


def _model_identity(model: common.StageInput) -> str:
    if Path(model.path).exists():
        return fingerprint(model.path)
    return f"hub:{model.path}" + (f"@{model.revision}" if model.revision else "")


def teacher_samples(teacher, tokenizer, records: list[dict], options: WarmupOptions, path: Path,
                    provenance: dict, flag, ranks=None) -> list[dict] | None:
    """All teacher samples, reusing or resuming the sample file; None if stopped by a signal.

    `teacher` is the loaded model for backend "hf" and the model's path for "vllm". Under a launcher
    the ranks sample data-parallel: of each chunk of `sample_chunk` prompts, rank r of P takes the
    positions r, r + P, ... and draws them with the chunk's seed and their index in the chunk, so the
    union of the ranks' samples is what one process draws (the sampler is counter-based). Each rank
    writes its share to its own shard file; rank 0 merges the shards in prompt order into `path`, the
    same bytes a one-process run writes, and the other ranks read that. (With vLLM and a tensor-parallel
    size t, each group of t ranks samples one share and its first rank writes it.)

    Every shard file is written in chunks to a `.partial` file (one JSON line per prompt, flushed and
    fsynced) and renamed when complete, so a kill loses at most the chunk in flight, and a rerun with
    the same number of processes resumes each shard after its last whole chunk.
    """
    from sdd.generation import Ranks

    ranks = ranks or Ranks()
    finished = sample_files.read(path, provenance)
    if finished is not None:
        return finished
    if path.is_file() and ranks.index == 0:
        print(f"{path.name} was made from another teacher, data or sampling settings: sampling again")
    shard, shards, writer = (options.vllm_settings().groups(ranks) if options.backend == "vllm"
                             else (ranks.index, ranks.count, True))
    rows = _sample_shard(teacher, tokenizer, records, options, _shard_path(path, shard, shards), provenance,
                         flag, shard, shards, writer, ranks)
    if rows is None:
        return None
    if ranks.index != 0:  # another rank (rank 0) writes the sample file: read it when it is complete
        return _wait_for_samples(path, provenance, flag)
    if shards > 1:
        rows = _merge_shards(path, provenance, records, options.sample_chunk, shards, flag)
    if rows is not None:
        for leftover in [sample_files.partial_path(path), *path.parent.glob(path.name + ".shard*")]:
            leftover.unlink(missing_ok=True)  # shards merged, or left by a run with another number of processes
    return rows


def _shard_path(path: Path, shard: int, shards: int) -> Path:
    return path if shards == 1 else path.with_name(f"{path.name}.shard{shard}-of-{shards}")


def _shard_header(shard: int, shards: int) -> dict:
    """What a shard file's header adds to the provenance: its place among the shards (none for one shard)."""
    return {} if shards == 1 else {"shard": [shard, shards]}


def _sample_shard(teacher, tokenizer, records, options, shard_path: Path, provenance: dict, flag,
                  shard: int, shards: int, writer: bool, ranks) -> list[dict] | None:
    """This rank's share of every chunk, resumed from and appended to its shard's `.partial` file."""
    from sdd.generation import SamplingParams, generate, ready_for_generation
    from sdd.verify import score_completions

    chunk = options.sample_chunk
    starts = range(0, len(records), chunk)
    # rows of this shard in each chunk; resuming keeps whole chunks only, since each chunk's seed is tied to
    # where it starts: a resumed run then samples exactly what an uninterrupted one would have
    per_chunk = [len(range(shard, min(chunk, len(records) - start), shards)) for start in starts]
    extra = _shard_header(shard, shards)
    partial = sample_files.Partial(shard_path, provenance, **extra)
    # a shard finished by an earlier launch
    done = sample_files.read(shard_path, provenance, **extra) if shards > 1 else None
    resumed = done is None
    if not resumed:
        chunks_done = len(per_chunk)
    else:
        done = partial.resume(whole=per_chunk, writer=writer)
        chunks_done, whole = 0, 0
        while chunks_done < len(per_chunk) and whole + per_chunk[chunks_done] <= len(done):
            whole += per_chunk[chunks_done]
            chunks_done += 1
    params = SamplingParams(
        n=options.samples_per_prompt, temperature=options.sample_temperature, top_p=options.sample_top_p,
        top_k=options.sample_top_k, max_new_tokens=options.max_new_tokens, seed=options.sample_seed,
    )
    # every rank enters (a ZeRO-3 gather is a collective), also one whose shard an earlier launch finished
    ready = ready_for_generation(teacher, ranks.device) if options.backend == "hf" else contextlib.nullcontext()
    appending = writer and chunks_done < len(per_chunk)
    from sdd.progress import StageProgress

    shown = StageProgress("teacher sampling", sum(per_chunk) * params.n, unit="completions",
                          completed=sum(per_chunk[:chunks_done]) * params.n) if ranks.index == 0 else None
    with ready, (partial.append() if appending else contextlib.nullcontext()) as out, \
            (shown.start() if shown else contextlib.nullcontext()):
        for start in list(starts)[chunks_done:]:
            if flag.requested:
                return None
            batch = records[start : start + chunk]
            positions = range(shard, len(batch), shards)
            mine = [batch[p] for p in positions]
            prompts = [data.render_prompt(tokenizer, r["problem"], options.chat_template_kwargs) for r in mine]
            # Seeds per chunk keep a resumed run's samples identical to an uninterrupted one.
            chunk_params = dataclasses.replace(params, seed=params.seed * 1_000_003 + start)
            groups = generate(teacher, tokenizer, prompts, chunk_params, backend=options.backend,
                              batch_size=options.sample_batch_size, prompt_indices=positions,
                              vllm=options.vllm_settings(), progress=shown.advance if shown else None) if prompts else []
            texts = [c.text for group in groups for c in group]
            scores = score_completions(texts, [r["answer"] for r in mine for _ in range(params.n)]) if texts else []
            rows = [{
                "id": record["id"], "answer": record["answer"],
                "prompt_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"],
                "completion_ids": [c.token_ids for c in group],
                "correct": [bool(s) for s in scores[i * params.n : (i + 1) * params.n]],
                "truncated": [c.finish_reason == "length" for c in group],
            } for i, (record, prompt, group) in enumerate(zip(mine, prompts, groups, strict=True))]
            if out is not None:
                out.write_rows(rows)
            done.extend(rows)
            if ranks.index == 0:
                print(f"teacher samples: {start + len(batch)}/{len(records)} prompts", flush=True)
    if writer and resumed:
        partial.finish()
    return done


def _merge_shards(path: Path, provenance: dict, records: list[dict], chunk: int, shards: int, flag) -> list[dict] | None:
    """Rank 0: wait for every shard file, interleave them back into prompt order, write `path` atomically."""
    parts: list = [None] * shards
    while None in parts:
        if flag.requested:
            return None
        for s in range(shards):
            if parts[s] is None:
                parts[s] = sample_files.read(_shard_path(path, s, shards), provenance, **_shard_header(s, shards))
        if None in parts:
            time.sleep(1.0)
    merged, cursors = [], [0] * shards
    for start in range(0, len(records), chunk):
        for position in range(min(chunk, len(records) - start)):
            owner = position % shards
            merged.append(parts[owner][cursors[owner]])
            cursors[owner] += 1
    if cursors != [len(part) for part in parts] or [r["id"] for r in merged] != [r["id"] for r in records]:
        raise SddError(f"the shards of {path.name} do not add up to its {len(records)} prompts; delete "
                       f"{path.name}.shard* and rerun")
    sample_files.write(path, provenance, merged)
    return merged


def cached_teacher_samples(teacher, tokenizer, records, options: WarmupOptions, stage, provenance: dict, ranks=None):
    """Teacher samples from the stage folder, or from `sample_cache` where stages share them.

    Variants that warm up from the same teacher on the same data and seed (forward KL and its
    hard-label control) then sample once; a lock serialises two stages asking at the same time.
    Rank 0 takes the lock and then names this launch in an `.owner` file; the other ranks join the
    sampling once they see it (or use the finished file another stage wrote while they waited).
    """
    import uuid

    from sdd.generation import Ranks
    from sdd.manifest import StageLock

    ranks = ranks or Ranks()
    if not options.sample_cache:  # the stage folder: rank 0's stage lock already keeps other jobs out
        return teacher_samples(teacher, tokenizer, records, options, stage.dir / SAMPLES_FILE, provenance,
                               stage.flag, ranks)
    key = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(options.sample_cache) / f"{key}.jsonl"
    owner = path.with_suffix(".owner")
    launch = ranks.all_gather(uuid.uuid4().hex if ranks.index == 0 else None)[0]  # one name for this launch
    if ranks.index != 0:
        while not stage.flag.requested:
            finished = sample_files.read(path, provenance)
            if finished is not None:
                return finished
            with contextlib.suppress(OSError):
                if owner.read_text() == launch:
                    return teacher_samples(teacher, tokenizer, records, options, path, provenance, stage.flag, ranks)
            time.sleep(1.0)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = StageLock(path.with_suffix(".lock"))
    lock.acquire(wait_s=24 * 3600, stop=lambda: stage.flag.requested is not None)
    if not lock.held:  # stopped while another stage held the cache: nothing sampled, nothing lost
        return None
    try:
        atomic_write_text(owner, launch)
        return teacher_samples(teacher, tokenizer, records, options, path, provenance, stage.flag, ranks)
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def _wait_for_samples(path: Path, provenance: dict, flag) -> list[dict] | None:
    """A rank other than 0, its share sampled: wait for rank 0 to merge the shards into the complete file.

    No collective is used for the wait: sampling can outlast any collective timeout. A signal
    reaches every rank, so a waiting rank stops when rank 0 does.
    """
    while not flag.requested:
        finished = sample_files.read(path, provenance)
        if finished is not None:
            return finished
        time.sleep(1.0)
    return None


def training_sequences(rows: list[dict], only_correct: bool) -> list[dict]:
    """Pre-tokenized prompt+completion rows: the teacher's exact tokens, EOS kept only where it stopped."""
    out = []
    for row in rows:
        for ids, correct in zip(row["completion_ids"], row["correct"], strict=True):
            if only_correct and not correct:
                continue
            out.append({
                "input_ids": row["prompt_ids"] + ids,
                "completion_mask": [0] * len(row["prompt_ids"]) + [1] * len(ids),
            })
    return out


def heldout_kl(student, teacher, rows: list[dict], vocab_size: int, pad_id: int, temperature: float) -> float:
    from sdd.agreement import Sequence, mean_divergence

    sequences = [Sequence(r["prompt_ids"], ids) for r in rows for ids in r["completion_ids"] if ids]
    if not sequences:
        return float("nan")
    from sdd.models import whole_models

    was_training = student.training
    student.eval()
    with whole_models(student, teacher):  # ZeRO-3 / FSDP2 shards gathered: this forward runs outside the engine
        result = mean_divergence(student, teacher, sequences, beta=0.0, vocab_size=vocab_size, pad_id=pad_id,
                                 temperature=temperature)
    student.train(was_training)
    return result["divergence"]


def _place(model, device: str):
    """The model on this rank's device; a ZeRO-3 model is already there, as partitions the engine will own."""
    from sdd.models import is_zero3_partitioned

    if not any(is_zero3_partitioned(p) for p in model.parameters()):
        model.to(device)
    return model


def configure(args: common.StageArgs):
    """(stage name, sdd options, SFTConfig): every layer resolved, nothing loaded yet."""
    from trl import SFTConfig

    from sdd.losses import KL_IMPLS

    name = args.name or "warmup"
    options, trl_kwargs = common.resolve_options(("warmup", name), WarmupOptions, SFTConfig, args, {
        **common.device_defaults(), **DEFAULTS,
    })
    if options.objective not in OBJECTIVES:
        raise SddError(f"objective must be one of {', '.join(OBJECTIVES)}, not {options.objective!r}")
    if options.kl_impl not in KL_IMPLS:
        raise SddError(f"kl_impl must be one of {', '.join(KL_IMPLS)}, not {options.kl_impl!r}")
    if options.sample_chunk < 1:
        raise SddError(f"sample_chunk must be at least 1, not {options.sample_chunk}")
    trl_kwargs = {**trl_kwargs, "max_length": sequence_limit(options, trl_kwargs.get("max_length", _UNSET))}
    if options.backend not in ("hf", "vllm"):
        raise SddError(f"backend must be hf or vllm, not {options.backend!r}")
    options.vllm_settings()  # a bad vLLM option fails here, before anything loads
    # The dataset is pre-tokenized (the teacher's exact tokens), so TRL cannot infer completion-only
    # training from prompt/completion columns: without this the loss would also fit the prompt tokens.
    trl_config = cfg.build_trl_config(SFTConfig, {**trl_kwargs, **common.trainer_identity(args, name, trl_kwargs),
                                                 "completion_only_loss": True})
    return name, options, trl_config


_UNSET = object()


def sequence_limit(options: WarmupOptions, max_length) -> int | None:
    """SFTConfig.max_length: prompt + completion limits added up, or a set value checked against them.

    TRL truncates longer sequences silently (the EOS and the answer go first); a limit that could
    cut a teacher sample is refused instead. `max_length: null` means no limit at all.
    """
    needed = options.max_prompt_length + options.max_new_tokens
    if max_length is _UNSET:
        return needed
    if max_length is not None and max_length < needed:
        raise SddError(f"max_length {max_length} would cut teacher samples (max_prompt_length {options.max_prompt_length} "
                       f"+ max_new_tokens {options.max_new_tokens} = {needed}); raise max_length, or leave it unset")
    return max_length


def run(args: common.StageArgs) -> dict:
    name, options, trl_config = configure(args)
    vllm_settings = options.vllm_settings()
    from sdd.generation import Ranks, release_vllm

    ranks = Ranks.current()  # the launcher's process group is up now (the TRL config started it)
    if options.backend == "vllm":
        vllm_settings.groups(ranks)  # tensor_parallel_size must divide the number of processes
        if options.teacher_revision:
            raise SddError("teacher_revision is not handed to vLLM's engine: sample with backend hf, or download that "
                           "revision and name its folder as --teacher")
    run_dir = RunDir(args.run)
    teacher_in = common.resolve_checkpoint(run_dir, "teacher", options.teacher, prefer=("teacher-rl",),
                                           revision=options.teacher_revision)
    student_in = common.resolve_checkpoint(run_dir, "student", options.student, exclude=name,
                                           revision=options.model_revision)
    source, records, skipped = options.problems(run_dir)
    wanted = (options.prompts or len(records)) + options.heldout_prompts
    records = records[:wanted]
    if len(records) <= options.heldout_prompts:
        raise SddError(f"{source.describe()} has {len(records)} usable problems; warmup holds out "
                       f"{options.heldout_prompts} and needs more (lower heldout_prompts or use more data)")

    from sdd.models import load_causal_lm, load_pair

    t_tok, s_tok, vocab_size = load_pair(teacher_in.path, student_in.path, trust_remote_code=options.trust_remote_code,
                                         teacher_revision=teacher_in.revision, student_revision=student_in.revision)
    resolved = {"sdd": options, "trl": trl_config.to_dict(), "shared_vocab_size": vocab_size}
    inputs = {"teacher": teacher_in, "student": student_in, "dataset": common.StageInput(source.describe())}
    with open_stage(args, name=name, stage="warmup", role="student", config=resolved, inputs=inputs) as stage:
        # imported late: a bad option fails seconds sooner
        from datasets import Dataset

        from sdd.train.callbacks import make_callbacks, summarize_logs
        from sdd.train.trainers import ForwardKLTrainer, GuardedSFTTrainer, train

        provenance = {
            "teacher": _model_identity(teacher_in),
            "data": data.problems_fingerprint(records),
            "sampling": [options.samples_per_prompt, options.sample_temperature, options.sample_top_p,
                         options.sample_top_k, options.max_new_tokens, options.sample_seed,
                         options.chat_template_kwargs, options.sample_chunk],  # chunk: it sets the seeds
        }
        # The HF teacher trains the student too, so with backend "hf" it is loaded once and samples first. With
        # "vllm" no HF copy exists while vLLM's engine holds its GPU share, and the engine is released before
        # the teacher and student load for training. Each rank works on its own device (`ranks.device`).
        if options.backend == "hf":
            teacher = load_causal_lm(teacher_in.path, dtype=options.dtype, trust_remote_code=options.trust_remote_code,
                                     revision=teacher_in.revision)
            rows = cached_teacher_samples(teacher, t_tok, records, options, stage, provenance, ranks)
        else:
            rows = cached_teacher_samples(teacher_in.path, t_tok, records, options, stage, provenance, ranks)
            release_vllm()
            teacher = load_causal_lm(teacher_in.path, dtype=options.dtype, trust_remote_code=options.trust_remote_code,
                                     revision=teacher_in.revision)
        if rows is None:
            return {}
        _place(teacher, ranks.device).eval()
        heldout, train_rows = rows[: options.heldout_prompts], rows[options.heldout_prompts :]
        sequences = training_sequences(train_rows, options.only_correct)
        if not sequences:
            raise SddError("no teacher samples left to train on (only_correct kept none); sample more or drop only_correct")
        longest = max(len(seq["input_ids"]) for seq in sequences)
        if trl_config.max_length is not None and longest > trl_config.max_length:
            raise SddError(f"a teacher sample is {longest} tokens, over max_length {trl_config.max_length}, and would be cut; "
                           f"raise max_prompt_length (prompts are longer than {options.max_prompt_length} tokens) or max_length")
        student = _place(load_causal_lm(student_in.path, trust_remote_code=options.trust_remote_code,
                                        dtype=options.train_dtype, revision=student_in.revision), ranks.device)
        pad_id = s_tok.pad_token_id
        metrics: dict = {
            "teacher_solve_rate": sum(c for r in rows for c in r["correct"]) / sum(len(r["correct"]) for r in rows),
            "teacher_truncation_rate": sum(t for r in rows for t in r["truncated"]) / sum(len(r["truncated"]) for r in rows),
            "train_sequences": len(sequences), "heldout_prompts": len(heldout), "skipped_unparsable_golds": skipped,
        }
        resume = resume_point(stage.dir)
        before_path = stage.dir / "heldout-kl-before.json"  # measured once, before any update, kept across resumes
        if resume is None or not before_path.is_file():
            before = heldout_kl(student, teacher, heldout, vocab_size, pad_id, options.kl_temperature)
            atomic_write_text(before_path, json.dumps({"heldout_forward_kl_before": before}))
        metrics.update(json.loads(before_path.read_text()))
        callbacks = make_callbacks(stage.flag, stage.dir, name, ("forward_kl", "loss"))
        common_kwargs = dict(model=student, args=trl_config, train_dataset=Dataset.from_list(sequences),
                             processing_class=s_tok, callbacks=callbacks, peft_config=options.peft_config())
        if options.objective == "sft":
            trainer = GuardedSFTTrainer(**common_kwargs)
        else:
            trainer = ForwardKLTrainer(
                **common_kwargs, teacher_model=teacher, vocab_size=vocab_size, kl_temperature=options.kl_temperature,
                kl_impl=options.kl_impl,
            )
        final = train(trainer, stage, resume, merge_base=options.merge_base(student_in), run_group=options.run_group)
        if final is None:
            return {}
        metrics["heldout_forward_kl_after"] = heldout_kl(student, teacher, heldout, vocab_size, pad_id,
                                                        options.kl_temperature)
        metrics.update(summarize_logs(trainer.state.log_history, {"loss": "loss", "forward_kl": "forward_kl"}))
        metrics["steps"] = trainer.state.global_step
        if options.objective == "forward-kl":
            metrics["kl_impl"] = trainer.kl_impl_ran
        finish(stage, outputs=stage.output("student", final), metrics=metrics, push=options.hub_target(trl_config))
        return metrics
