"""`sdd sft`: supervised fine-tuning on worked solutions (TRL SFTTrainer).

Two jobs: bootstrap the toy models to partial competence (GRPO gets no signal from a model
that never writes `\\boxed{}`), and the paper's SFT-teacher control, a teacher trained on the
same labelled data by imitation instead of by reward.
"""

from __future__ import annotations

import dataclasses

from sdd import config as cfg
from sdd import data
from sdd.errors import SddError
from sdd.manifest import RunDir
from sdd.models import load_causal_lm, load_tokenizer
from sdd.stages import common
from sdd.train.lifecycle import finish, open_stage

ROLES = ("teacher", "student")


@dataclasses.dataclass
class SftOptions(common.TrainingOptions):
    role: str = dataclasses.field(default="teacher", metadata={
        "help": "teacher or student: which model to train and whose checkpoint it makes."})
    model: str | None = dataclasses.field(default=None, metadata={
        "help": "Start from this path or hub id (default: newest checkpoint of the role)."})


DEFAULTS = {
    **common.TRAINER_DEFAULTS,
    "learning_rate": 1e-5,
    "num_train_epochs": 1,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "logging_steps": 10,
    "save_steps": 500,
}


def configure(args: common.StageArgs):
    """(stage name, sdd options, SFTConfig): every layer resolved, nothing loaded yet."""
    from trl import SFTConfig

    role = args.cli.get("role") or args.recipe.get("role") or "teacher"
    if role not in ROLES:
        raise SddError(f"--role must be teacher or student, not {role!r}")
    name = args.name or f"sft-{role}"
    options, trl_kwargs = common.resolve_options(
        ("sft", name), SftOptions, SFTConfig, args, {**common.device_defaults(), **DEFAULTS}
    )
    trl_kwargs = {**trl_kwargs, **common.trainer_identity(args, name, trl_kwargs)}
    return name, options, cfg.build_trl_config(SFTConfig, trl_kwargs)


def run(args: common.StageArgs) -> dict:
    name, options, trl_config = configure(args)
    run_dir = RunDir(args.run)
    start = common.resolve_checkpoint(run_dir, options.role, options.model, revision=options.model_revision)
    source = options.source(run_dir)
    records = options.split_records(data.load(source, limit=None if options.split else options.limit,
                                              require_solution=True))[: options.limit]

    tokenizer = load_tokenizer(start.path, trust_remote_code=options.trust_remote_code, revision=start.revision)
    rows = [
        {"prompt": data.render_prompt(tokenizer, r["problem"], options.chat_template_kwargs), "completion": r["solution"]}
        for r in records
    ]
    resolved = {"sdd": options, "trl": trl_config.to_dict()}
    inputs = {"model": start, "dataset": common.StageInput(source.describe())}
    with open_stage(args, name=name, stage="sft", role=options.role, config=resolved, inputs=inputs) as stage:
        # imported late: a bad option fails seconds sooner
        from datasets import Dataset

        from sdd.train.callbacks import make_callbacks, summarize_logs
        from sdd.train.trainers import GuardedSFTTrainer, train

        model = load_causal_lm(start.path, dtype=options.train_dtype, trust_remote_code=options.trust_remote_code,
                               revision=start.revision)
        trainer = GuardedSFTTrainer(
            model=model, args=trl_config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
            callbacks=make_callbacks(stage.flag, stage.dir, name, ("loss", "mean_token_accuracy")),
            peft_config=options.peft_config(),
        )
        final = train(trainer, stage, merge_base=options.merge_base(start), run_group=options.run_group)
        if final is None:
            return {}
        metrics = summarize_logs(
            trainer.state.log_history, {"loss": "loss", "token_accuracy": "mean_token_accuracy"}
        )
        metrics.update(steps=trainer.state.global_step, examples=len(rows))
        finish(stage, outputs=stage.output(options.role, final), metrics=metrics, push=options.hub_target(trl_config))
        return metrics
