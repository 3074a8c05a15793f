"""The embedded toy default: a verifiable task, a tokenizer and two Qwen3-shaped models, all local.

Everything sdd does must be runnable on a laptop CPU without a model hub, so the toy mirrors
the real setting in miniature: a chat-templated tokenizer that splits digits one by one (as
Qwen's does), a teacher several times the student's size from the same architecture family,
and chained arithmetic whose worked solutions end in `\\boxed{}` so the real verifier grades
it. Chains are long enough that a per-step error rate compounds: supervised bootstrap leaves
both models well short of perfect, which is the room RL and distillation need to show an effect.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdd.data import user_message

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class ToyTask:
    """The difficulty dial: more terms means more steps where an error can creep in."""

    min_terms: int = 3
    max_terms: int = 6
    max_start: int = 99
    max_operand: int = 9
    n_train: int = 4000
    n_test: int = 200
    seed: int = 0
    # Share of training solutions with one arithmetic slip (a step off by one, carried to the end).
    # Demonstrations in the wild have errors; imitation copies them, a verifier does not reward them.
    slip_rate: float = 0.0


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int


@dataclass(frozen=True)
class ToySpec:
    task: ToyTask = field(default_factory=ToyTask)
    teacher: ModelShape = ModelShape(128, 4, 4, 2, 384, 32)
    student: ModelShape = ModelShape(64, 2, 4, 2, 192, 16)
    vocab_size: int = 384


def make_problem(rng: random.Random, task: ToyTask, slip_rate: float = 0.0) -> dict:
    """One chain `a ± d1 ± d2 ...` with its step-by-step solution; the running total never goes negative.

    With probability `slip_rate` one step of the worked solution is off by one and the rest of the
    solution carries the error on; `answer` is always the true result, so the verifier is right
    where the demonstration is not.
    """
    start = rng.randint(1, task.max_start)
    operations = []
    total = start
    for _ in range(rng.randint(task.min_terms, task.max_terms) - 1):
        operand = rng.randint(1, task.max_operand)
        op = "-" if operand <= total and rng.random() < 0.5 else "+"
        total = total - operand if op == "-" else total + operand
        operations.append((op, operand))
    slip_at = rng.randrange(len(operations)) if rng.random() < slip_rate else -1
    shown, steps = start, []
    for i, (op, operand) in enumerate(operations):
        result = shown - operand if op == "-" else shown + operand
        if i == slip_at:
            result += 1 if result == 0 or rng.random() < 0.5 else -1
        steps.append(f"{shown}{op}{operand}={result}")
        shown = result
    expression = str(start) + "".join(f"{op}{operand}" for op, operand in operations)
    solution = ". ".join(steps) + f". The answer is \\boxed{{{shown}}}."
    return {"problem": f"Compute {expression}.", "solution": solution, "answer": str(total)}


def make_split(task: ToyTask, split: str) -> list[dict]:
    """Deterministic by (seed, split); test problems never appear in train."""
    rng = random.Random(f"{task.seed}-{split}")
    n = task.n_train if split == "train" else task.n_test
    seen_elsewhere = set()
    if split == "test":
        seen_elsewhere = {r["problem"] for r in make_split(task, "train")}
    records, seen = [], set()
    while len(records) < n:
        record = make_problem(rng, task, task.slip_rate if split == "train" else 0.0)
        if record["problem"] in seen or record["problem"] in seen_elsewhere:
            continue
        seen.add(record["problem"])
        records.append({"id": f"{split}-{len(records)}", **record})
    return records


def build_tokenizer(corpus: list[str], vocab_size: int):
    """Byte-level BPE over the toy corpus, digits kept single like Qwen's, with a Qwen-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(shape: ModelShape, tokenizer, seed: int):
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **asdict(shape),
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=True
    )
    return model


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def build(out_dir: Path, spec: ToySpec) -> dict[str, Path]:
    """Write data, tokenizer and both untrained models under out_dir; returns what was written by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = make_split(spec.task, "train"), make_split(spec.task, "test")
    data_dir = out_dir / "data"
    data_dir.mkdir(exist_ok=True)
    write_jsonl(data_dir / "train.jsonl", train)
    write_jsonl(data_dir / "test.jsonl", test)

    # The corpus includes the rendered template so the fixed instruction and role markers become few tokens.
    template_text = f"<|im_start|>user\n{user_message('x')[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    corpus = [template_text] * 50 + [r["problem"] + "\n" + r["solution"] for r in train]
    tokenizer = build_tokenizer(corpus, spec.vocab_size)
    outputs = {"train": data_dir / "train.jsonl", "test": data_dir / "test.jsonl"}
    for role, shape, seed in (("teacher", spec.teacher, spec.task.seed), ("student", spec.student, spec.task.seed + 1)):
        model_dir = out_dir / f"{role}-base"
        build_model(shape, tokenizer, seed).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        outputs[role] = model_dir
    return outputs
