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

from sdd import config as cfg
from sdd import data
from sdd.errors import SddError
from sdd.manifest import RunDir
from sdd.stages import common
from sdd.train.lifecycle import finish, open_stage

ESTIMATORS = ("full-vocab", "sampled-token")


@dataclasses.dataclass
class DistillOptions(common.TrainingOptions):
    teacher: str | None = dataclasses.field(default=None, metadata={
        "help": "Teacher path, hub id or run dir (default: newest teacher in the run)."})
    student: str | None = dataclasses.field(default=None, metadata={
        "help": "Student path, hub id or run dir (default: warmup, else newest student)."})
    teacher_revision: str | None = common.teacher_revision_field()
    estimator: str = dataclasses.field(default="full-vocab", metadata={
        "help": "full-vocab (the analytic reverse KL over the shared vocabulary) or sampled-token (its "
                "estimate from the sampled token alone)."})
    kl_impl: str = dataclasses.field(default="auto", metadata={
        "help": "Who computes the loss that trains: auto (TRL's kernel; sdd's torch formula under ZeRO-3), trl, "
                "or torch (the readable formula in sdd/losses.py, whose docstring says which runs where)."})
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


def configure(args: common.StageArgs):
    """(stage name, sdd options, DistillationConfig): every layer resolved, nothing loaded yet."""
    from trl import DistillationConfig

    from sdd.generation import trainer_generation_options
    from sdd.losses import KL_IMPLS

    name = args.name or "distill"
    options, trl_kwargs = common.resolve_options(("distill", name), DistillOptions, DistillationConfig, args, {
        **common.device_defaults(), **DEFAULTS,
    })
    if options.estimator not in ESTIMATORS:
        raise SddError(f"estimator must be one of {', '.join(ESTIMATORS)}, not {options.estimator!r}")
    if options.kl_impl not in KL_IMPLS:
        raise SddError(f"kl_impl must be one of {', '.join(KL_IMPLS)}, not {options.kl_impl!r}")
    trl_kwargs = {**trainer_generation_options(options.backend), **trl_kwargs,
                  **common.trainer_identity(args, name, trl_kwargs), "chat_template_kwargs": options.chat_template_kwargs}
    trl_config = cfg.build_trl_config(DistillationConfig, trl_kwargs)
    if options.estimator == "sampled-token" and trl_config.beta != 1.0:
        raise SddError("the sampled-token estimator is a reverse-KL estimator: leave beta at 1.0 with it")
    return name, options, trl_config


def run(args: common.StageArgs) -> dict:
    name, options, trl_config = configure(args)
    run_dir = RunDir(args.run)
    teacher_in = common.resolve_checkpoint(run_dir, "teacher", options.teacher, prefer=("teacher-rl",),
                                           revision=options.teacher_revision)
    student_in = common.resolve_checkpoint(run_dir, "student", options.student, exclude=name, prefer=("warmup",),
                                           revision=options.model_revision)
    source, records, skipped = options.problems(run_dir)

    from sdd.models import load_causal_lm, load_pair

    _, s_tok, vocab_size = load_pair(teacher_in.path, student_in.path, trust_remote_code=options.trust_remote_code,
                                     teacher_revision=teacher_in.revision, student_revision=student_in.revision)
    rows = [{"prompt": data.render_prompt(s_tok, r["problem"], options.chat_template_kwargs)} for r in records]
    resolved = {"sdd": options, "trl": trl_config.to_dict(), "shared_vocab_size": vocab_size}
    inputs = {"teacher": teacher_in, "student": student_in, "dataset": common.StageInput(source.describe())}
    with open_stage(args, name=name, stage="distill", role="student", config=resolved, inputs=inputs) as stage:
        # imported late: a bad option fails seconds sooner
        from datasets import Dataset

        from sdd.train.callbacks import make_callbacks, summarize_logs
        from sdd.train.trainers import OnPolicyDistiller, train

        teacher = load_causal_lm(teacher_in.path, dtype=options.dtype, trust_remote_code=options.trust_remote_code,
                                 revision=teacher_in.revision)
        student = load_causal_lm(student_in.path, dtype=options.train_dtype,
                                 trust_remote_code=options.trust_remote_code, revision=student_in.revision)
        trainer = OnPolicyDistiller(
            model=student, teacher_model=teacher, args=trl_config, train_dataset=Dataset.from_list(rows),
            processing_class=s_tok, vocab_size=vocab_size, estimator=options.estimator, kl_impl=options.kl_impl,
            callbacks=make_callbacks(stage.flag, stage.dir, name, HEADLINE), peft_config=options.peft_config(),
        )
        final = train(trainer, stage, merge_base=options.merge_base(student_in), run_group=options.run_group)
        if final is None:
            return {}
        history = trainer.state.log_history
        metrics = summarize_logs(history, {
            "reverse_kl": "reverse_kl", "divergence": "divergence", "teacher_nll": "teacher_nll",
            "entropy": "entropy", "truncation_rate": "truncated",
        })
        first = next((e for e in history if "reverse_kl" in e or "divergence" in e), {})
        metrics.update(reverse_kl_first=first.get("reverse_kl", first.get("divergence")),
                       steps=trainer.state.global_step, prompts=len(rows), skipped_unparsable_golds=skipped,
                       kl_impl=trainer.kl_impl_ran)
        finish(stage, outputs=stage.output("student", final), metrics=metrics, push=options.hub_target(trl_config))
        return metrics
