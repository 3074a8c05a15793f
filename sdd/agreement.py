"""How far a student is from its teacher, per token, on given sequences.

Measured, not trained: warmup reports forward KL on held-out teacher samples before and after,
distill reports reverse KL on a fixed batch of student samples, and `sdd analyze` reports both
directions so the bridge's trust-region condition (student close to the teacher before
on-policy distillation) is visible. Hidden states go through the same chunked divergence as
training, so no (tokens x vocab) tensor is built even at a 152k vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sequence:
    """One prompt+completion as token ids; only completion tokens are scored."""

    prompt_ids: list[int]
    completion_ids: list[int]


def last_hidden_states(model, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Backbone output before the lm_head: what the chunked divergence projects tile by tile.

    A PEFT model's `base_model` is its tuner (LoRA layers around the whole causal LM); the backbone, LoRA
    layers in place, is that causal LM's own `base_model`."""
    from accelerate.utils import is_peft_model

    if is_peft_model(model):
        model = model.get_base_model()
    return model.base_model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False).last_hidden_state


def pack(sequences: list[Sequence], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and a mask of positions whose *next* token is a completion token."""
    width = max(len(s.prompt_ids) + len(s.completion_ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    predicts_completion = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        tokens = seq.prompt_ids + seq.completion_ids
        ids[row, : len(tokens)] = torch.tensor(tokens)
        attention[row, : len(tokens)] = 1
        # position t predicts token t+1: completion tokens are predicted from len(prompt)-1 on
        predicts_completion[row, len(seq.prompt_ids) - 1 : len(tokens) - 1] = True
    return ids.to(device), attention.to(device), predicts_completion.to(device)


@torch.no_grad()
def mean_divergence(student, teacher, sequences: list[Sequence], *, beta: float, vocab_size: int, pad_id: int,
                    batch_size: int = 16, temperature: float = 1.0) -> dict[str, float]:
    """Token-mean divergence (beta=0 forward KL(T||S), beta=1 reverse KL(S||T)) and student entropy."""
    from sdd.losses import token_divergence

    device = next(student.parameters()).device
    total = entropy_total = 0.0
    count = 0
    for start in range(0, len(sequences), batch_size):
        ids, attention, scored = pack(sequences[start : start + batch_size], pad_id, device)
        h_student = last_hidden_states(student, ids, attention)[scored]
        h_teacher = last_hidden_states(teacher, ids.to(next(teacher.parameters()).device), attention)[scored]
        divergence_N, entropy_N = token_divergence(
            h_student, student.get_output_embeddings().weight, h_teacher.to(device),
            teacher.get_output_embeddings().weight.to(device), beta=beta, temperature=temperature,
            vocab_size=vocab_size,
        )
        total += float(divergence_N.double().sum())
        entropy_total += float(entropy_N.double().sum())
        count += divergence_N.numel()
    return {"divergence": total / max(1, count), "student_entropy": entropy_total / max(1, count), "tokens": count}
