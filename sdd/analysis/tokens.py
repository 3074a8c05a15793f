"""Where the dense signal lands: the per-token KL of a student's sample to its teacher, token by token.

On-policy distillation's point is that every token of a student's sample gets its own signal,
KL(p_S || p_T) at that position, where RL gets one bit per sequence. Training logs only show its mean.
This module keeps it per token: for each completion token t of a sample (prompt x, tokens y), with
p_S = p_S(. | x, y<t) and p_T likewise,

    kl_t        = sum_v p_S(v) [log p_S(v) - log p_T(v)]    (sdd.losses.token_divergence, beta = 1,
                                                              the readable torch path: the formula distill trains on)
    student_p_t = p_S(y_t),  teacher_p_t = p_T(y_t)          (sdd.losses.selected_token_logprobs)
    teacher_top = the teacher's k most likely tokens at t, with p_T

all at temperature 1 (the models' own distributions, what `sdd analyze` measures too), from one forward
pass of each model over prompt + completion. Then a few numbers that say how the mass is spread:
the share of the summed KL carried by the top 5% of tokens, the token-mean KL on correct and on
incorrect samples, and the token strings that carry the most of it.

Pure: models, a tokenizer and token ids in, records out; nothing is read or written here. The
command that samples, verifies and writes the page is sdd/stages/inspect.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import torch
import torch.nn.functional as F

from sdd.agreement import Sequence, last_hidden_states, pack
from sdd.losses import TILE_BYTES, selected_token_logprobs, token_divergence

# Shares of the summed KL reported for the highest-KL fraction of tokens; 0.05 is the headline.
MASS_FRACTIONS = (0.01, 0.05, 0.10, 0.20)
HEADLINE_FRACTION = 0.05
# Token strings listed as carrying the most KL mass, per summary.
TOP_STRINGS = 12


@dataclasses.dataclass
class TokenRecord:
    """One completion token of a student's sample and the teacher's view of that position."""

    token_id: int
    text: str  # the token's own characters in the decoded sample (pieces concatenate to the decoded text)
    kl: float  # KL(p_S || p_T) at this position, nats
    student_p: float  # p_S of the sampled token
    teacher_p: float  # p_T of the sampled token
    teacher_top: list[tuple[str, float]]  # the teacher's k most likely tokens here, most likely first
    teacher_rank: int  # the sampled token's place in teacher_top, -1 when it is not among them


@dataclasses.dataclass
class SampleRecord:
    """A student's sample, scored token by token, with its verdict."""

    prompt_ids: list[int]
    completion_ids: list[int]
    tokens: list[TokenRecord]
    correct: bool | None = None

    @property
    def kl_sum(self) -> float:
        return sum(t.kl for t in self.tokens)


def token_pieces(tokenizer, token_ids: list[int]) -> list[str]:
    """Each token's own text, such that the pieces joined are the decoded sequence.

    A token decoded alone can be half a UTF-8 character (byte-level BPE), and a SentencePiece token's
    leading space depends on what precedes it. So each token is decoded after the tokens since the last
    complete character (vLLM's incremental detokenizer does the same), and a token that only adds part
    of a character gets "" while the token completing it gets the whole character. Special tokens keep
    their names.
    """

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    pieces: list[str] = []
    prefix_start = read_start = 0  # tokens [prefix_start, read_start) are context already emitted
    for i in range(len(token_ids)):
        before = decode(token_ids[prefix_start:read_start])
        through = decode(token_ids[prefix_start : i + 1])
        if len(through) > len(before) and through.startswith(before) and not through.endswith("\ufffd"):
            pieces.append(through[len(before):])
            prefix_start, read_start = read_start, i + 1
        else:
            pieces.append("")
    if read_start < len(token_ids):  # ends inside a character: the replacement character goes to the last token
        before = decode(token_ids[prefix_start:read_start])
        pieces[-1] = decode(token_ids[prefix_start:])[len(before):]
    return pieces


@torch.no_grad()
def score_samples(student, teacher, tokenizer, prompt_ids: list[list[int]], completion_ids: list[list[int]], *,
                  vocab_size: int, top_k: int = 5, batch_size: int = 8) -> list[SampleRecord]:
    """Per-token KL(p_S || p_T), p_S and p_T of the sampled token, and the teacher's top-k, for each sample.

    `vocab_size` is the shared vocabulary both heads are cut to (sdd.models.shared_vocab_size). Both
    models see the same ids; empty completions give records without tokens.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = student.training, teacher.training
    student.eval()
    teacher.eval()
    records: list[SampleRecord] = []
    try:
        for start in range(0, len(prompt_ids), batch_size):
            batch = [Sequence(list(p), list(c)) for p, c in
                     zip(prompt_ids[start : start + batch_size], completion_ids[start : start + batch_size], strict=True)]
            scored = [s for s in batch if s.completion_ids]
            values = _score_batch(student, teacher, scored, pad_id, vocab_size, top_k) if scored else []
            per_sequence = iter(values)
            for sequence in batch:
                tokens: list[TokenRecord] = []
                if sequence.completion_ids:
                    kl, student_p, teacher_p, top_ids, top_p = next(per_sequence)
                    texts = token_pieces(tokenizer, sequence.completion_ids)
                    alternative_texts = _decode_each(tokenizer, {i for row in top_ids for i in row})
                    tokens = [TokenRecord(token_id, text, kl[t], student_p[t], teacher_p[t],
                                          [(alternative_texts[i], p) for i, p in zip(top_ids[t], top_p[t], strict=True)],
                                          top_ids[t].index(token_id) if token_id in top_ids[t] else -1)
                              for t, (token_id, text) in enumerate(zip(sequence.completion_ids, texts, strict=True))]
                records.append(SampleRecord(sequence.prompt_ids, sequence.completion_ids, tokens))
    finally:
        student.train(was_training[0])
        teacher.train(was_training[1])
    return records


def _score_batch(student, teacher, batch: list[Sequence], pad_id: int, vocab_size: int, top_k: int) -> list[list]:
    """One forward pass of each model over a padded batch; per sequence: the per-token lists in order."""
    student_device = next(student.parameters()).device
    teacher_device = next(teacher.parameters()).device
    student_head = student.get_output_embeddings().weight
    ids_BT, attention_BT, predicts_BT = pack(batch, pad_id, student_device)
    next_ids_BT = torch.roll(ids_BT, shifts=-1, dims=1)  # position t predicts token t+1
    h_student_NH = last_hidden_states(student, ids_BT, attention_BT)[predicts_BT]
    h_teacher_NH = last_hidden_states(teacher, ids_BT.to(teacher_device), attention_BT.to(teacher_device))
    h_teacher_NH = h_teacher_NH[predicts_BT.to(teacher_device)].to(student_device)
    tokens_N = next_ids_BT[predicts_BT]
    head_t = teacher.get_output_embeddings().weight.to(student_device)
    kl_N, _ = token_divergence(h_student_NH, student_head, h_teacher_NH, head_t, beta=1.0, vocab_size=vocab_size,
                               impl="torch")
    student_logp_N = selected_token_logprobs(h_student_NH, student_head, tokens_N, vocab_size=vocab_size, impl="torch")
    teacher_logp_N = selected_token_logprobs(h_teacher_NH, head_t, tokens_N, vocab_size=vocab_size, impl="torch")
    top_p_NK, top_ids_NK = _top_k(h_teacher_NH, head_t, vocab_size, top_k)
    columns = [kl_N.double().tolist(), student_logp_N.double().exp().tolist(), teacher_logp_N.double().exp().tolist(),
               top_ids_NK.tolist(), top_p_NK.double().tolist()]
    out, offset = [], 0
    for sequence in batch:
        n = len(sequence.completion_ids)
        out.append([column[offset : offset + n] for column in columns])
        offset += n
    return out


def _top_k(hidden_NH: torch.Tensor, head_VH: torch.Tensor, vocab_size: int, k: int):
    """The k most likely tokens under softmax(hidden @ head[:V].T), in fp32, a tile of rows at a time."""
    head = head_VH[:vocab_size].float()
    rows = max(1, TILE_BYTES // (4 * vocab_size))
    probs, ids = [], []
    for start in range(0, hidden_NH.shape[0], rows):
        logp = F.log_softmax(hidden_NH[start : start + rows].float() @ head.T, dim=-1)
        top = logp.topk(min(k, vocab_size), dim=-1)
        probs.append(top.values.exp())
        ids.append(top.indices)
    return torch.cat(probs), torch.cat(ids)


def _decode_each(tokenizer, token_ids: set[int]) -> dict[int, str]:
    return {i: tokenizer.decode([i], skip_special_tokens=False) for i in token_ids}


# --------------------------------------------------------------------------------------------------
# How the mass is spread.


def mass_share(kls: list[float], fraction: float) -> float | None:
    """Share of sum(kls) carried by the ceil(fraction * n) highest values; None without tokens or mass."""
    total = sum(kls)
    if not kls or total <= 0:
        return None
    top = sorted(kls, reverse=True)[: max(1, math.ceil(fraction * len(kls)))]
    return sum(top) / total


def summarize(samples: list[SampleRecord]) -> dict:
    """The page's numbers for one student: mass concentration, correct vs incorrect, the strings carrying the mass."""
    kls = [t.kl for s in samples for t in s.tokens]
    total = sum(kls)

    def group(members: list[SampleRecord]) -> dict:
        values = [t.kl for s in members for t in s.tokens]
        return {"samples": len(members), "tokens": len(values),
                "mean_kl": sum(values) / len(values) if values else None,
                "mean_sample_kl_sum": sum(s.kl_sum for s in members) / len(members) if members else None}

    by_string: dict[str, list[float]] = defaultdict(list)
    for sample in samples:
        for token in sample.tokens:
            by_string[token.text].append(token.kl)
    strings = sorted(by_string.items(), key=lambda item: -sum(item[1]))[:TOP_STRINGS]
    verdicts = [s.correct for s in samples if s.correct is not None]
    return {
        "samples": len(samples),
        "tokens": len(kls),
        "accuracy": sum(verdicts) / len(verdicts) if verdicts else None,
        "mean_kl": total / len(kls) if kls else None,
        "kl_sum": total,
        "top5_share": mass_share(kls, HEADLINE_FRACTION),
        "mass_share": {f"{fraction:g}": mass_share(kls, fraction) for fraction in MASS_FRACTIONS},
        "correct": group([s for s in samples if s.correct is True]),
        "incorrect": group([s for s in samples if s.correct is False]),
        "top_strings": [{"text": text, "count": len(values), "share": sum(values) / total if total > 0 else None,
                         "mean_kl": sum(values) / len(values)} for text, values in strings],
    }
