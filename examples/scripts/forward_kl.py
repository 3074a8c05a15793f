# Copyright the sdd authors. Apache-2.0.
"""Forward-KL distillation on fixed completions from your own script, open-r1 style: no run directory.

The student learns each completion with the full-vocabulary forward KL to a frozen teacher at every
completion token (sdd's `ForwardKLTrainer`, a TRL `SFTTrainer` whose loss is KL(teacher || student)
instead of cross-entropy on the tokens). It is the off-policy bridge `sdd warmup` runs before
on-policy distillation; here the completions come from the dataset (teacher samples you generated,
e.g. with vLLM, or worked solutions). Every option is a field of `SFTConfig`, `ModelConfig` (LoRA via
`--use_peft`) or the script arguments below, on the command line or in `--config file.yaml`:

    accelerate launch examples/scripts/forward_kl.py \\
        --model_name_or_path Qwen/Qwen3-1.7B --teacher_model_name_or_path Qwen/Qwen3-8B \\
        --dataset_name teacher-samples.jsonl --dataset_prompt_column problem --dataset_completion_column completion \\
        --learning_rate 1e-5 --output_dir runs/forward-kl-qwen3
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import load_dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser, get_peft_config

from sdd.data import user_message
from sdd.models import shared_vocab_size
from sdd.train import ForwardKLTrainer


@dataclass
class ForwardKLScriptArguments(ScriptArguments):
    teacher_model_name_or_path: str | None = field(default=None, metadata={"help": "The teacher: hub id or path."})
    teacher_model_revision: str = field(default="main", metadata={"help": "The teacher's revision (branch, tag, commit)."})
    dataset_prompt_column: str = field(default="problem", metadata={"help": "Column holding each problem's text."})
    dataset_completion_column: str = field(default="solution", metadata={"help": "Column holding the completion to learn."})
    kl_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of both models in the KL."})


def load_pairs(script_args: ForwardKLScriptArguments):
    """Conversational prompt/completion pairs; SFTTrainer then scores only the completion tokens."""
    name = script_args.dataset_name
    if name.endswith((".json", ".jsonl")):
        dataset = load_dataset("json", data_files=name, split=script_args.dataset_train_split)
    else:
        dataset = load_dataset(name, script_args.dataset_config, split=script_args.dataset_train_split)

    def to_pair(row: dict) -> dict:
        return {"prompt": user_message(row[script_args.dataset_prompt_column]),
                "completion": [{"role": "assistant", "content": row[script_args.dataset_completion_column]}]}

    return dataset.map(to_pair, remove_columns=dataset.column_names)


def main(script_args: ForwardKLScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> None:
    if not script_args.teacher_model_name_or_path:
        raise SystemExit("--teacher_model_name_or_path is required")
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    teacher_tokenizer = AutoTokenizer.from_pretrained(script_args.teacher_model_name_or_path,
                                                      revision=script_args.teacher_model_revision)
    student = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision,
                                                   dtype=model_args.dtype)
    teacher = AutoModelForCausalLM.from_pretrained(script_args.teacher_model_name_or_path,
                                                   revision=script_args.teacher_model_revision, dtype=model_args.dtype)
    vocab_size = shared_vocab_size(teacher_tokenizer, tokenizer, teacher.config,
                                   AutoConfig.from_pretrained(model_args.model_name_or_path,
                                                              revision=model_args.model_revision))
    trainer = ForwardKLTrainer(
        model=student, teacher_model=teacher, args=training_args, train_dataset=load_pairs(script_args),
        processing_class=tokenizer, vocab_size=vocab_size, kl_temperature=script_args.kl_temperature,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    tokenizer.save_pretrained(training_args.output_dir)


if __name__ == "__main__":
    parser = TrlParser((ForwardKLScriptArguments, SFTConfig, ModelConfig))
    main(*parser.parse_args_and_config())
