"""`sdd distill`: on-policy distillation. The student samples one completion per prompt and is
trained toward the frozen teacher on its own samples with the analytic full-vocabulary
reverse KL per token:

    L = (1/N) Σ_t Σ_v p_S(v | x, y<t) [log p_S(v | ·) − log p_T(v | ·)],   y ~ p_S

Every token of every sample gets a dense signal, where RL gets one bit per sequence; and
because the samples are the student's own, it is corrected where it actually goes wrong. TRL's
DistillationTrainer does the rollouts and the optimisation; sdd swaps in its loss (padded
vocabularies sliced to the shared tokenizer, the sampled-token estimator as an alternative,
JSD(β) via TRL's `beta`) and logs what tells whether the bridge works: reverse KL, the
teacher's NLL of the student's samples, student entropy and truncation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sdd import data
from sdd.errors import SddError
from sdd.manifest import RunDir
from sdd.stages import common

ESTIMATORS = ("full-vocab", "sampled-token")


@dataclasses.dataclass
class DistillOptions(common.DataOptions):
    teacher: str | None = dataclasses.field(default=None, metadata={
        "help": "Teacher path, hub id or run dir (default: newest teacher in the run)."})
    student: str | None = dataclasses.field(default=None, metadata={
        "help": "Student path, hub id or run dir (default: warmup, else newest student)."})
    estimator: str = dataclasses.field(default="full-vocab", metadata={
        "help": "full-vocab (the analytic reverse KL over the shared vocabulary) or sampled-token (its "
                "estimate from the sampled token alone)."})
    backend: str = dataclasses.field(default="hf", metadata={"help": "The student's rollout engine: hf (transformers) or vllm."})
    dtype: str = dataclasses.field(default="auto", metadata={"help": "dtype the teacher is loaded in (auto: the checkpoint's)."})


# The authors' recipe (scripts/opd/train_opd.sh; docs/recipe.md has the sources): reverse KL on one
# student rollout per prompt at temperature 1.0, constant lr 1e-6 with no warmup, weight decay 0.1,
# gradient clipping at 1.0.
DEFAULTS = {
    **common.TRAINER_DEFAULTS,
    "beta": 1.0,  # TRL's convention: 1.0 = reverse KL(student || teacher), 0.0 = forward KL, between = JSD(β)
    "temperature": 1.0,
    "learning_rate": 1e-6,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "weight_decay": 0.1,
    "max_grad_norm": 1.0,
    "max_completion_length": 4096,
    "logging_steps": 5,
    "save_steps": 50,
}

HEADLINE = ("reverse_kl", "teacher_nll", "entropy")


def distillation_trainer(base_cls):
    """DistillationTrainer with sdd's loss; the teacher is set up here so padded vocabularies are allowed."""
    import torch

    from sdd.losses import sampled_token_reverse_kl_loss, selected_token_logprobs, token_divergence
    from sdd.models import head_for_loss

    class Distiller(base_cls):
        def __init__(self, *args, teacher_model, vocab_size: int, estimator: str, **kwargs):
            super().__init__(*args, teacher_model=None, **kwargs)
            self.vocab_size = vocab_size
            self.estimator = estimator
            self.teacher_model = common.prepare_teacher(self, teacher_model)

        def _log_mean(self, name: str, values_N: torch.Tensor) -> None:
            mode = "train" if self.model.training else "eval"
            total = self.accelerator.gather_for_metrics(values_N.detach().float().sum().reshape(1)).sum()
            count = self.accelerator.gather_for_metrics(torch.tensor([values_N.numel()], device=total.device)).sum()
            self._metrics[mode][name].append((total / count.clamp(min=1)).item())

        def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
            input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            mask_BC = inputs["completion_mask"].bool()
            completions = inputs["completion_ids"].size(1)
            h_student = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, completions)
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            self.teacher_model.eval()
            with torch.no_grad():
                h_teacher = self._forward_redirection(self.teacher_model, teacher, self._get_last_hidden_state, teacher,
                                                      input_ids, attention_mask, completions)
            h_student_N, h_teacher_N = h_student[mask_BC], h_teacher[mask_BC]
            tokens_N = inputs["completion_ids"][mask_BC]
            with head_for_loss(unwrapped_student, trainable=True) as head_s, \
                    head_for_loss(teacher, trainable=False) as head_t:
                with torch.no_grad():
                    teacher_logprobs_N = selected_token_logprobs(h_teacher_N, head_t, tokens_N,
                                                                 temperature=self.temperature, vocab_size=self.vocab_size)
                denominator = num_items_in_batch if num_items_in_batch is not None else max(1, tokens_N.numel())
                if self.estimator == "sampled-token":
                    student_logprobs_N = selected_token_logprobs(h_student_N, head_s, tokens_N,
                                                                 temperature=self.temperature, vocab_size=self.vocab_size)
                    loss, _ = sampled_token_reverse_kl_loss(
                        student_logprobs_N.unsqueeze(0), teacher_logprobs_N.unsqueeze(0),
                        torch.ones_like(student_logprobs_N, dtype=torch.bool).unsqueeze(0),
                        num_items_in_batch=denominator,
                    )
                    per_token_kl_N = (student_logprobs_N - teacher_logprobs_N).detach()  # the estimator's own KL sample
                    entropy_N = -student_logprobs_N.detach()
                else:
                    divergence_N, entropy_N = token_divergence(
                        h_student_N, head_s, h_teacher_N, head_t, beta=self.beta,
                        temperature=self.temperature, vocab_size=self.vocab_size,
                    )
                    loss = divergence_N.sum() / denominator
                    per_token_kl_N = divergence_N.detach()
            self._log_mean("reverse_kl" if self.estimator == "sampled-token" or self.beta == 1.0 else "divergence",
                           per_token_kl_N)
            self._log_mean("teacher_nll", -teacher_logprobs_N)
            ended = inputs["completion_ids"].gather(1, (mask_BC.sum(1, keepdim=True) - 1).clamp(min=0))
            eos = self.processing_class.eos_token_id
            self._log_mean("truncated", (ended.squeeze(1) != eos).float())
            return loss, entropy_N.detach().sum(), torch.tensor(float(tokens_N.numel()), device=loss.device)

    return Distiller


def configure(args: common.StageArgs):
    """(stage name, sdd options, DistillationConfig): every layer resolved, nothing loaded yet."""
    from trl import DistillationConfig

    from sdd.generation import trainer_generation_options

    name = args.name or "distill"
    options, trl_kwargs = common.resolve_options(("distill", name), DistillOptions, DistillationConfig, args, {
        **common.device_defaults(), **DEFAULTS,
    })
    if options.estimator not in ESTIMATORS:
        raise SddError(f"estimator must be one of {', '.join(ESTIMATORS)}, not {options.estimator!r}")
    trl_kwargs = {**trainer_generation_options(options.backend), **trl_kwargs,
                  "output_dir": str(Path(args.run) / name), "chat_template_kwargs": options.chat_template_kwargs}
    trl_config = common.cfg.build_trl_config(DistillationConfig, trl_kwargs)
    if options.estimator == "sampled-token" and trl_config.beta != 1.0:
        raise SddError("the sampled-token estimator is a reverse-KL estimator: leave beta at 1.0 with it")
    return name, options, trl_config


def run(args: common.StageArgs) -> dict:
    name, options, trl_config = configure(args)
    run_dir = RunDir(args.run)
    teacher_in = common.resolve_checkpoint(run_dir, "teacher", options.teacher, prefer=("teacher-rl",))
    student_in = common.resolve_checkpoint(run_dir, "student", options.student, exclude=name, prefer=("warmup",))
    source, records, skipped = options.problems(run_dir)

    from transformers import AutoConfig

    from sdd.models import load_causal_lm, load_tokenizer, shared_vocab_size

    t_tok = load_tokenizer(teacher_in.path, trust_remote_code=options.trust_remote_code)
    s_tok = load_tokenizer(student_in.path, trust_remote_code=options.trust_remote_code)
    vocab_size = shared_vocab_size(
        t_tok, s_tok, AutoConfig.from_pretrained(teacher_in.path, trust_remote_code=options.trust_remote_code),
        AutoConfig.from_pretrained(student_in.path, trust_remote_code=options.trust_remote_code),
    )
    rows = [{"prompt": data.render_prompt(s_tok, r["problem"], options.chat_template_kwargs)} for r in records]
    resolved = {"sdd": options, "trl": trl_config.to_dict(), "shared_vocab_size": vocab_size}
    inputs = {"teacher": teacher_in, "student": student_in, "dataset": common.StageInput(source.describe())}
    with common.open_stage(args, name=name, stage="distill", role="student", config=resolved, inputs=inputs) as stage:
        from datasets import Dataset
        from trl import DistillationTrainer  # imported late: a bad option fails seconds sooner

        teacher = load_causal_lm(teacher_in.path, dtype=options.dtype, trust_remote_code=options.trust_remote_code)
        student = load_causal_lm(student_in.path, dtype=options.train_dtype,
                                 trust_remote_code=options.trust_remote_code)
        trainer = distillation_trainer(common.guarded(DistillationTrainer))(
            model=student, teacher_model=teacher, args=trl_config, train_dataset=Dataset.from_list(rows),
            processing_class=s_tok, vocab_size=vocab_size, estimator=options.estimator,
            callbacks=common.make_callbacks(stage.flag, stage.dir, name, HEADLINE),
        )
        final = common.train(trainer, stage)
        if final is None:
            return {}
        history = trainer.state.log_history
        metrics = common.summarize_logs(history, {
            "reverse_kl": "reverse_kl", "divergence": "divergence", "teacher_nll": "teacher_nll",
            "entropy": "entropy", "truncation_rate": "truncated",
        })
        first = next((e for e in history if "reverse_kl" in e or "divergence" in e), {})
        metrics.update(reverse_kl_first=first.get("reverse_kl", first.get("divergence")),
                       steps=trainer.state.global_step, prompts=len(rows), skipped_unparsable_golds=skipped)
        common.finish(stage, outputs=stage.output("student", final), metrics=metrics)
        return metrics
