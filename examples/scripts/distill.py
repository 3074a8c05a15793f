# Copyright the sdd authors. Apache-2.0.
"""On-policy distillation from your own script, open-r1 style: TRL configs in, a model out, no run directory.

The student samples completions for each prompt; its loss is the per-token reverse KL to a frozen
teacher over the whole vocabulary, on its own samples (sdd's `OnPolicyDistiller`, a TRL
`DistillationTrainer` with sdd's loss). Every option is a field of `DistillationConfig`
(the teacher too: `--teacher_model_name_or_path`, `--teacher_model_revision`), `ModelConfig` (LoRA via
`--use_peft`) or the script arguments below, on the command line or in a
YAML file (`--config distill.yaml`):

    accelerate launch --config_file examples/accelerate/zero3.yaml examples/scripts/distill.py \\
        --model_name_or_path Qwen/Qwen3-1.7B --teacher_model_name_or_path Qwen/Qwen3-8B \\
        --dataset_name open-r1/DAPO-Math-17k-Processed --dataset_config en --dataset_prompt_column prompt \\
        --learning_rate 1e-6 --lr_scheduler_type constant --max_completion_length 4096 \\
        --output_dir runs/distill-qwen3

`sdd distill` runs the same trainer inside a run directory (manifest, resume, guards, model card);
this script is the bare trainer for a pipeline of your own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import load_dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl import DistillationConfig, ModelConfig, ScriptArguments, TrlParser, get_peft_config

from sdd.data import strip_dapo_wrapper, user_message
from sdd.models import shared_vocab_size
from sdd.train import OnPolicyDistiller


@dataclass
class DistillScriptArguments(ScriptArguments):
    dataset_prompt_column: str = field(default="problem", metadata={"help": "Column holding each problem's text."})
    estimator: str = field(default="full-vocab", metadata={
        "help": "full-vocab (analytic KL over the vocabulary) or sampled-token (the single-sample estimate)."})


def load_problems(script_args: DistillScriptArguments):
    """The training split as conversational prompts: sdd's one prompt (problem + boxed-answer instruction)."""
    name = script_args.dataset_name
    if name.endswith((".json", ".jsonl")):
        dataset = load_dataset("json", data_files=name, split=script_args.dataset_train_split)
    else:
        dataset = load_dataset(name, script_args.dataset_config, split=script_args.dataset_train_split)
    column = script_args.dataset_prompt_column

    def to_prompt(row: dict) -> dict:
        problem = strip_dapo_wrapper(row[column]) or row[column]  # DAPO's own answer wrapper asks for "Answer:"
        return {"prompt": user_message(problem)}

    return dataset.map(to_prompt, remove_columns=dataset.column_names)


def main(script_args: DistillScriptArguments, training_args: DistillationConfig, model_args: ModelConfig) -> None:
    teacher_name, teacher_revision = training_args.teacher_model_name_or_path, training_args.teacher_model_revision
    if not teacher_name:
        raise SystemExit("--teacher_model_name_or_path is required")
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_name, revision=teacher_revision)
    student = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision,
                                                   dtype=model_args.dtype)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_name, revision=teacher_revision, dtype=model_args.dtype)
    vocab_size = shared_vocab_size(teacher_tokenizer, tokenizer, teacher.config,
                                   AutoConfig.from_pretrained(model_args.model_name_or_path,
                                                              revision=model_args.model_revision))
    trainer = OnPolicyDistiller(
        model=student, teacher_model=teacher, args=training_args, train_dataset=load_problems(script_args),
        processing_class=tokenizer, vocab_size=vocab_size, estimator=script_args.estimator,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    tokenizer.save_pretrained(training_args.output_dir)


if __name__ == "__main__":
    parser = TrlParser((DistillScriptArguments, DistillationConfig, ModelConfig))
    main(*parser.parse_args_and_config())
