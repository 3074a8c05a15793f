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

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

from sdd import data
from sdd.errors import SddError
from sdd.manifest import RunDir, atomic_write_text, fingerprint
from sdd.stages import common

SAMPLES_FILE = "teacher-samples.jsonl"
OBJECTIVES = ("forward-kl", "sft")


@dataclasses.dataclass
class WarmupOptions(common.DataOptions):
    teacher: str | None = None
    student: str | None = None
    prompts: int | None = None
    samples_per_prompt: int = 1
    sample_temperature: float = 0.7
    sample_top_p: float = 0.8
    sample_top_k: int = 20
    max_new_tokens: int = 4096
    # Longest prompt in tokens (the authors' max_prompt_length): with max_new_tokens it sets TRL's
    # SFTConfig.max_length, so a teacher sample is never cut, unless a layer sets max_length itself.
    max_prompt_length: int = 2048
    sample_seed: int = 0
    sample_batch_size: int | None = None
    # Prompts per flushed chunk of teacher samples: a kill loses at most one chunk, a SIGTERM waits for one.
    sample_chunk: int = 256
    sample_cache: str | None = None  # a folder shared between stages: same teacher + data + settings = same file
    only_correct: bool = False
    heldout_prompts: int = 32
    objective: str = "forward-kl"
    kl_temperature: float = 1.0
    backend: str = "hf"
    dtype: str = "auto"


DEFAULTS = {
    **common.TRAINER_DEFAULTS,
    "learning_rate": 1e-5,
    "num_train_epochs": 1,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "logging_steps": 10,
    "save_steps": 200,
}


def _model_identity(path: str) -> str:
    return fingerprint(path) if Path(path).exists() else f"hub:{path}"


def teacher_samples(teacher, tokenizer, records: list[dict], options: WarmupOptions, path: Path,
                    provenance: dict, flag) -> list[dict] | None:
    """All teacher samples, reusing or resuming the stage's sample file; None if stopped by a signal.

    Written in chunks to a `.partial` file (one JSON line per prompt, flushed and fsynced) and
    renamed when complete, so a kill loses at most the chunk in flight.
    """
    from sdd.generation import SamplingParams, generate
    from sdd.verify import score_completions

    header = {"provenance": provenance}
    finished = _finished_samples(path, header)
    if finished is not None:
        return finished
    if path.is_file():
        print(f"{path.name} was made from another teacher, data or sampling settings: sampling again")
    partial = path.with_name(path.name + ".partial")
    done: list[dict] = []
    chunk = options.sample_chunk
    kept_bytes = 0
    if partial.is_file():
        lines = partial.read_bytes().splitlines(keepends=True)
        if lines and lines[0].endswith(b"\n") and _header_matches(lines[0], header):
            ends = [len(lines[0])]
            for line in lines[1:]:
                try:
                    if not line.endswith(b"\n"):
                        break  # the line being written when the job died
                    done.append(json.loads(line))
                except ValueError:
                    break
                ends.append(ends[-1] + len(line))
            # Whole chunks only: each chunk's seed is tied to where it starts, so a resumed run samples
            # exactly what an uninterrupted one would have.
            del done[len(done) // chunk * chunk:]
            kept_bytes = ends[len(done)]
    if kept_bytes:  # cut the torn tail in place; rewriting the file would risk the chunks already sampled
        os.truncate(partial, kept_bytes)
    else:
        atomic_write_text(partial, json.dumps(header) + "\n")
    with open(partial, "a", encoding="utf-8") as handle:
        params = SamplingParams(
            n=options.samples_per_prompt, temperature=options.sample_temperature, top_p=options.sample_top_p,
            top_k=options.sample_top_k, max_new_tokens=options.max_new_tokens, seed=options.sample_seed,
        )
        engine = teacher if options.backend == "hf" else options.teacher
        for start in range(len(done), len(records), chunk):
            if flag.requested:
                return None
            batch = records[start : start + chunk]
            prompts = [data.render_prompt(tokenizer, r["problem"], options.chat_template_kwargs) for r in batch]
            # Seeds per chunk keep a resumed run's samples identical to an uninterrupted one.
            chunk_params = dataclasses.replace(params, seed=params.seed * 1_000_003 + start)
            groups = generate(engine, tokenizer, prompts, chunk_params, backend=options.backend,
                              batch_size=options.sample_batch_size)
            texts = [c.text for group in groups for c in group]
            scores = score_completions(texts, [r["answer"] for r in batch for _ in range(params.n)])
            for i, (record, prompt, group) in enumerate(zip(batch, prompts, groups, strict=True)):
                row = {
                    "id": record["id"], "answer": record["answer"],
                    "prompt_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"],
                    "completion_ids": [c.token_ids for c in group],
                    "correct": [bool(s) for s in scores[i * params.n : (i + 1) * params.n]],
                    "truncated": [c.finish_reason == "length" for c in group],
                }
                handle.write(json.dumps(row) + "\n")
                done.append(row)
            handle.flush()
            os.fsync(handle.fileno())
            print(f"teacher samples: {len(done)}/{len(records)} prompts", flush=True)
    os.replace(partial, path)
    return done


def _finished_samples(path: Path, header: dict) -> list[dict] | None:
    """The rows of a complete sample file made with `header`; None if there is none (the file is renamed into place whole)."""
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines and _header_matches(lines[0], header):
        return [json.loads(line) for line in lines[1:]]
    return None


def _header_matches(line: str, header: dict) -> bool:
    try:
        return json.loads(line) == header
    except ValueError:  # torn by a kill mid-write
        return False


def cached_teacher_samples(teacher, tokenizer, records, options: WarmupOptions, stage, provenance: dict):
    """Teacher samples from the stage folder, or from `sample_cache` where stages share them.

    Variants that warm up from the same teacher on the same data and seed (forward KL and its
    hard-label control) then sample once; a lock serialises two stages asking at the same time.
    """
    from sdd.manifest import StageLock, is_main_process

    if options.sample_cache:
        key = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(options.sample_cache) / f"{key}.jsonl"
    else:
        path = stage.dir / SAMPLES_FILE
    if not is_main_process():
        return _wait_for_samples(path, provenance, stage.flag)
    if not options.sample_cache:
        return teacher_samples(teacher, tokenizer, records, options, path, provenance, stage.flag)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = StageLock(path.with_suffix(".lock"))
    lock.acquire(wait_s=24 * 3600, stop=lambda: stage.flag.requested is not None)
    if not lock.held:  # stopped while another stage held the cache: nothing sampled, nothing lost
        return None
    try:
        return teacher_samples(teacher, tokenizer, records, options, path, provenance, stage.flag)
    finally:
        lock.release()


def _wait_for_samples(path: Path, provenance: dict, flag) -> list[dict] | None:
    """Under a launcher only rank 0 samples and writes the file; the other ranks wait for it to be complete.

    No collective is used for the wait: sampling can outlast any collective timeout. A signal
    reaches every rank, so a waiting rank stops when rank 0 does.
    """
    header = {"provenance": provenance}
    while not flag.requested:
        finished = _finished_samples(path, header)
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


def forward_kl_trainer(base_cls):
    """An SFTTrainer whose loss is forward KL to a frozen teacher instead of cross-entropy on tokens."""
    import torch
    from trl.models.utils import _ForwardRedirection

    from sdd.agreement import last_hidden_states
    from sdd.losses import divergence_loss

    class ForwardKLTrainer(base_cls):
        def __init__(self, *args, teacher_model, vocab_size: int, kl_temperature: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.vocab_size = vocab_size
            self.kl_temperature = kl_temperature
            self._redirect = _ForwardRedirection()
            if self.is_deepspeed_enabled:
                from trl.models.utils import prepare_deepspeed

                self.teacher_model = prepare_deepspeed(teacher_model, self.accelerator)
            else:
                self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
            self.teacher_model.eval()

        def _kl(self, student, inputs, num_items_in_batch):
            ids, attention, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
            scored_BT = labels[:, 1:] != -100  # position t is scored when it predicts a completion token t+1
            h_student_BTH = last_hidden_states(student, ids, attention)[:, :-1]
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            with torch.no_grad():
                h_teacher_BTH = self._redirect(self.teacher_model, teacher, last_hidden_states, teacher, ids, attention)
            return divergence_loss(
                h_student_BTH, student.get_output_embeddings().weight,
                h_teacher_BTH[:, :-1], teacher.get_output_embeddings().weight, scored_BT,
                beta=0.0, temperature=self.kl_temperature, vocab_size=self.vocab_size,
                num_items_in_batch=num_items_in_batch,
            )

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            student = self.accelerator.unwrap_model(model)
            loss, stats = self._redirect(model, student, self._kl, student, inputs, num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            tokens, kl_sum, ent_sum = (self.accelerator.gather_for_metrics(stats[key].reshape(1)).sum()
                                       for key in ("num_tokens", "divergence_sum", "entropy_sum"))
            self._metrics[mode]["forward_kl"].append((kl_sum / tokens.clamp(min=1)).item())
            self._metrics[mode]["entropy"].append((ent_sum / tokens.clamp(min=1)).item())
            return (loss, None) if return_outputs else loss

    return ForwardKLTrainer


def heldout_kl(student, teacher, rows: list[dict], vocab_size: int, pad_id: int, temperature: float) -> float:
    from sdd.agreement import Sequence, mean_divergence

    sequences = [Sequence(r["prompt_ids"], ids) for r in rows for ids in r["completion_ids"] if ids]
    if not sequences:
        return float("nan")
    was_training = student.training
    student.eval()
    result = mean_divergence(student, teacher, sequences, beta=0.0, vocab_size=vocab_size, pad_id=pad_id,
                             temperature=temperature)
    student.train(was_training)
    return result["divergence"]


def configure(args: common.StageArgs):
    """(stage name, sdd options, SFTConfig): every layer resolved, nothing loaded yet."""
    from trl import SFTConfig

    name = args.name or "warmup"
    options, trl_kwargs = common.resolve_options(("warmup", name), WarmupOptions, SFTConfig, args, {
        **common.device_defaults(), **DEFAULTS,
    })
    if options.objective not in OBJECTIVES:
        raise SddError(f"objective must be one of {', '.join(OBJECTIVES)}, not {options.objective!r}")
    if options.sample_chunk < 1:
        raise SddError(f"sample_chunk must be at least 1, not {options.sample_chunk}")
    trl_kwargs = {**trl_kwargs, "max_length": sequence_limit(options, trl_kwargs.get("max_length", _UNSET))}
    # The dataset is pre-tokenized (the teacher's exact tokens), so TRL cannot infer completion-only
    # training from prompt/completion columns: without this the loss would also fit the prompt tokens.
    trl_config = common.cfg.build_trl_config(SFTConfig, {**trl_kwargs, "output_dir": str(Path(args.run) / name),
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
    run_dir = RunDir(args.run)
    teacher_in = common.resolve_checkpoint(run_dir, "teacher", options.teacher, prefer=("teacher-rl",))
    student_in = common.resolve_checkpoint(run_dir, "student", options.student, exclude=name)
    source, records, skipped = options.problems(run_dir)
    wanted = (options.prompts or len(records)) + options.heldout_prompts
    records = records[:wanted]
    if len(records) <= options.heldout_prompts:
        raise SddError(f"{source.describe()} has {len(records)} usable problems; warmup holds out "
                       f"{options.heldout_prompts} and needs more (lower heldout_prompts or use more data)")

    from transformers import AutoConfig

    from sdd.models import load_causal_lm, load_tokenizer, shared_vocab_size

    t_tok = load_tokenizer(teacher_in.path, trust_remote_code=options.trust_remote_code)
    s_tok = load_tokenizer(student_in.path, trust_remote_code=options.trust_remote_code)
    vocab_size = shared_vocab_size(
        t_tok, s_tok, AutoConfig.from_pretrained(teacher_in.path, trust_remote_code=options.trust_remote_code),
        AutoConfig.from_pretrained(student_in.path, trust_remote_code=options.trust_remote_code),
    )
    resolved = {"sdd": options, "trl": trl_config.to_dict(), "shared_vocab_size": vocab_size}
    inputs = {"teacher": teacher_in, "student": student_in, "dataset": common.StageInput(source.describe())}
    with common.open_stage(args, name=name, stage="warmup", role="student", config=resolved, inputs=inputs) as stage:
        import torch
        from datasets import Dataset
        from trl import SFTTrainer  # imported late: a bad option fails seconds sooner

        device = "cuda" if torch.cuda.is_available() else "cpu"
        teacher = load_causal_lm(teacher_in.path, dtype=options.dtype, trust_remote_code=options.trust_remote_code)
        teacher.to(device).eval()
        provenance = {
            "teacher": _model_identity(teacher_in.path),
            "data": data.problems_fingerprint(records),
            "sampling": [options.samples_per_prompt, options.sample_temperature, options.sample_top_p,
                         options.sample_top_k, options.max_new_tokens, options.sample_seed,
                         options.chat_template_kwargs, options.sample_chunk],  # chunk: it sets the seeds
        }
        rows = cached_teacher_samples(teacher, t_tok, records, options, stage, provenance)
        if rows is None:
            return {}
        heldout, train_rows = rows[: options.heldout_prompts], rows[options.heldout_prompts :]
        sequences = training_sequences(train_rows, options.only_correct)
        if not sequences:
            raise SddError("no teacher samples left to train on (only_correct kept none); sample more or drop only_correct")
        longest = max(len(seq["input_ids"]) for seq in sequences)
        if trl_config.max_length is not None and longest > trl_config.max_length:
            raise SddError(f"a teacher sample is {longest} tokens, over max_length {trl_config.max_length}, and would be cut; "
                           f"raise max_prompt_length (prompts are longer than {options.max_prompt_length} tokens) or max_length")
        student = load_causal_lm(student_in.path, trust_remote_code=options.trust_remote_code)
        student.to(device)
        pad_id = s_tok.pad_token_id
        metrics: dict = {
            "teacher_solve_rate": sum(c for r in rows for c in r["correct"]) / sum(len(r["correct"]) for r in rows),
            "teacher_truncation_rate": sum(t for r in rows for t in r["truncated"]) / sum(len(r["truncated"]) for r in rows),
            "train_sequences": len(sequences), "heldout_prompts": len(heldout), "skipped_unparsable_golds": skipped,
        }
        resume = common.resume_point(stage.dir)
        before_path = stage.dir / "heldout-kl-before.json"  # measured once, before any update, kept across resumes
        if resume is None or not before_path.is_file():
            before = heldout_kl(student, teacher, heldout, vocab_size, pad_id, options.kl_temperature)
            atomic_write_text(before_path, json.dumps({"heldout_forward_kl_before": before}))
        metrics.update(json.loads(before_path.read_text()))
        callbacks = common.make_callbacks(stage.flag, stage.dir, name, ("forward_kl", "loss"))
        common_kwargs = dict(model=student, args=trl_config, train_dataset=Dataset.from_list(sequences),
                             processing_class=s_tok, callbacks=callbacks)
        if options.objective == "sft":
            trainer = common.guarded(SFTTrainer)(**common_kwargs)
        else:
            trainer = forward_kl_trainer(common.guarded(SFTTrainer))(
                **common_kwargs, teacher_model=teacher, vocab_size=vocab_size, kl_temperature=options.kl_temperature,
            )
        final = common.train(trainer, stage, resume)
        if final is None:
            return {}
        metrics["heldout_forward_kl_after"] = heldout_kl(student, teacher, heldout, vocab_size, pad_id,
                                                        options.kl_temperature)
        metrics.update(common.summarize_logs(trainer.state.log_history, {"loss": "loss", "forward_kl": "forward_kl"}))
        metrics["steps"] = trainer.state.global_step
        common.finish(stage, outputs=stage.output("student", final), metrics=metrics)
        return metrics
