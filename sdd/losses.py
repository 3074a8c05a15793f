"""Token-level divergences for distilling a teacher into a student, without (tokens x vocab) logits.

At Qwen scale (V = 151,936) one fp32 logits tensor for 16k tokens is 10 GB, and the naive loss keeps
several of them alive for backward. Every function here therefore takes *hidden states and lm_head
weights* and projects them a chunk of tokens at a time, recomputing the chunk in backward, so memory is
one chunk however many tokens there are.

Notation (shape suffixes on tensor names): N tokens (flattened completion positions), V vocabulary,
H hidden width (student and teacher may differ), K cached teacher candidates per position, B x T a
padded batch, n the rows of one chunk. With z = hidden @ head.T (+ bias) over the first `vocab_size`
rows and temperature tau, p_S = softmax(z_S / tau) and p_T = softmax(z_T / tau).

The divergences, per token t (`beta` follows TRL's DistillationTrainer exactly):

    beta = 0   forward KL (warmup)          D_t = sum_v p_T(v) [log p_T(v) - log p_S(v)]
    beta = 1   reverse KL (on-policy)       D_t = sum_v p_S(v) [log p_S(v) - log p_T(v)]
    0<beta<1   generalized JSD              m = (1 - beta) p_S + beta p_T
                                            D_t = beta KL(p_T || m) + (1 - beta) KL(p_S || m)

    loss = (1 / N) sum_t mask_t D_t,   N = sum_t mask_t, or `num_items_in_batch` when given.

The JSD family goes to 0 at both ends (m becomes p_S or p_T), so beta = 0 and beta = 1 are the KLs by
definition, not as limits. No tau^2 factor is applied (TRL applies none either). The teacher is frozen:
no gradient ever reaches its hidden states or head.

Public API:

    token_divergence(student_hidden_NH, student_head_VH, teacher_hidden_NH, teacher_head_VH, *, beta,
                     temperature=1.0, vocab_size=None, student_head_bias=None, teacher_head_bias=None,
                     impl="auto", chunk_tokens=None) -> (divergence_N, student_entropy_N)
    divergence_loss(student_hidden_BTH, student_head_VH, teacher_hidden_BTH, teacher_head_VH, mask_BT, *,
                    beta, temperature=1.0, vocab_size=None, student_head_bias=None,
                    teacher_head_bias=None, num_items_in_batch=None, impl="auto", chunk_tokens=None)
                    -> (loss, stats)
    masked_mean(values, mask, num_items_in_batch=None) -> loss
    selected_token_logprobs(hidden_NH, head_VH, token_ids_N, *, temperature=1.0, vocab_size=None,
                            head_bias=None, impl="auto", chunk_tokens=None) -> logprobs_N
    sampled_token_reverse_kl_loss(student_logprobs_BT, teacher_logprobs_BT, mask_BT,
                                  old_logprobs_BT=None, coef=1.0, num_items_in_batch=None)
                                  -> (loss, stats)
    topk_forward_kl(student_hidden_NH, student_head_VH, teacher_topk_ids_NK, teacher_topk_logprobs_NK, *,
                    temperature=1.0, vocab_size=None, student_head_bias=None, chunk_tokens=None)
                    -> divergence_N

`impl` picks who computes the full-vocabulary passes: "trl" calls TRL's fused kernels
(`trl.kernels.chunked_divergence.ChunkedDivergenceFunction`, `chunked_logprob.ChunkedLogProbFunction`:
Triton on CUDA, torch tiles elsewhere), "torch" is this module's chunked PyTorch path, and "auto" takes
TRL whenever it is importable, the inputs are not float64 (TRL's buffers are fp32) and DeepSpeed ZeRO-3
is off (TRL's kernels then want the unsliced ZeRO Parameter; sdd.models.head_for_loss gives whole heads). The torch path
exists so the formulas can be read here line for line, run in float64 (gradcheck), and keep working
without TRL.

Which runs where in training: warmup's loss (sdd.train.ForwardKLTrainer -> `divergence_loss`, beta 0) and
distill's (sdd.train.OnPolicyDistiller -> `token_divergence`, or `selected_token_logprobs` for the
sampled-token estimator) pass the stage option `kl_impl` (auto, trl or torch; recorded in the stage's
resolved config) as `impl`, and record the one that ran as the metric `kl_impl`. With the default, auto,
TRL's kernel computes the loss that trains, on CPU and on CUDA, except under DeepSpeed ZeRO-3, where this
module's chunked torch path does; `kl_impl: torch` trains with the readable formula (`_divergence_from_logits`)
everywhere. Both compute the same divergence: tests/test_losses.py holds TRL's kernel to the torch path.
The held-out KL that warmup measures (sdd.agreement) and analysis take `impl="auto"`.

Stats are raw detached sums plus a token count, not means: under gradient accumulation or DDP the
right mean is sum-over-everything / count-over-everything, which only the caller can form.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

Impl = Literal["auto", "torch", "trl"]
KL_IMPLS = ("auto", "trl", "torch")  # the values of the warmup/distill option `kl_impl`

# fp32 bytes of one (rows, V) logits tile in the torch path. The working set is a few such tiles
# (both models' log-probs, a product, autograd's saved tensors in backward), ~0.5 GB at 64 MB.
TILE_BYTES = 64 * 2**20
# Head rows upcast to fp32 at a time when bf16/fp16 weights meet an fp32 matmul (CPU): upcasting a whole
# 152k x 4096 head would itself cost 2.5 GB.
UPCAST_ROWS = 16384
# Vocabulary width of TRL's log-prob tiles (its `chunk_size` argument).
TRL_LOGPROB_VOCAB_CHUNK = 32768

_HALF = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------
# The math, on one chunk of logits. Everything else in this module only moves chunks around.
# --------------------------------------------------------------------------------------------------


def _tempered(logits_nV: torch.Tensor, temperature: float) -> torch.Tensor:
    # z / tau, minus one (n, V) copy when tau = 1
    return logits_nV if temperature == 1.0 else logits_nV / temperature


def _kl(log_p_nV: torch.Tensor, log_q_nV: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p(v) [log p(v) - log q(v)], per row."""
    return (log_p_nV.exp() * (log_p_nV - log_q_nV)).sum(-1)


def _divergence_from_logits(
    student_logits_nV: torch.Tensor,
    teacher_logits_nV: torch.Tensor,
    *,
    beta: float,
    temperature: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, ...]:
    log_p_S = F.log_softmax(_tempered(student_logits_nV, temperature), dim=-1)
    log_p_T = F.log_softmax(_tempered(teacher_logits_nV, temperature), dim=-1)
    if beta == 0.0:
        divergence_n = _kl(log_p_T, log_p_S)
    elif beta == 1.0:
        divergence_n = _kl(log_p_S, log_p_T)
    else:
        log_m = torch.logaddexp(log_p_S + math.log(1 - beta), log_p_T + math.log(beta))
        divergence_n = beta * _kl(log_p_T, log_m) + (1 - beta) * _kl(log_p_S, log_m)
    if not with_entropy:
        return (divergence_n,)
    student_entropy_n = -(log_p_S.exp() * log_p_S).sum(-1)
    return divergence_n, student_entropy_n


def _logprobs_at(student_logits_nV: torch.Tensor, ids_nK: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p_S(ids) under the full-vocabulary softmax."""
    return F.log_softmax(_tempered(student_logits_nV, temperature), dim=-1).gather(-1, ids_nK)


# --------------------------------------------------------------------------------------------------
# Projections that keep logits and gradient accumulators in (at least) fp32.
# bf16 logits keep ~3 significant digits: enough to make a KL between close distributions ~100x less
# accurate (tests/test_losses.py measures it), and TRL's kernels record that rounding each chunk's
# weight gradient to bf16 before summing drifts training. Both TRL and this module keep fp32.
# --------------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _cuda_half_pair(a: torch.Tensor, b: torch.Tensor) -> bool:
    # `torch.mm(..., out_dtype=torch.float32)` on bf16/fp16: fp32 results at bf16 tensor-core speed.
    # CUDA-only in torch (no CPU kernel), so CPU takes the sliced-upcast path instead.
    return a.is_cuda and a.dtype in _HALF and b.dtype == a.dtype


def _logits(hidden_nH: torch.Tensor, head_VH: torch.Tensor, bias_V: torch.Tensor | None) -> torch.Tensor:
    dtype = _compute_dtype(hidden_nH, head_VH)
    with torch.autocast(hidden_nH.device.type, enabled=False):
        if hidden_nH.dtype == head_VH.dtype == dtype:
            logits_nV = hidden_nH @ head_VH.T
        elif _cuda_half_pair(hidden_nH, head_VH):
            logits_nV = torch.mm(hidden_nH, head_VH.T, out_dtype=dtype)
        else:
            hidden_nH = hidden_nH.to(dtype)
            logits_nV = hidden_nH.new_empty((hidden_nH.shape[0], head_VH.shape[0]))
            for v in range(0, head_VH.shape[0], UPCAST_ROWS):
                logits_nV[:, v : v + UPCAST_ROWS] = hidden_nH @ head_VH[v : v + UPCAST_ROWS].to(dtype).T
        if bias_V is not None:
            logits_nV += bias_V.to(dtype)
    return logits_nV


def _hidden_grad(grad_logits_nV: torch.Tensor, head_VH: torch.Tensor) -> torch.Tensor:
    """d loss / d hidden = d loss / d logits @ head."""
    dtype = grad_logits_nV.dtype
    if head_VH.dtype == dtype:
        return grad_logits_nV @ head_VH
    if _cuda_half_pair(head_VH, head_VH):
        # the logits gradient is rounded to bf16 (as in TRL's kernel); the product accumulates in fp32
        return torch.mm(grad_logits_nV.to(head_VH.dtype), head_VH, out_dtype=dtype)
    grad_hidden_nH = grad_logits_nV.new_zeros((grad_logits_nV.shape[0], head_VH.shape[1]))
    for v in range(0, head_VH.shape[0], UPCAST_ROWS):
        grad_hidden_nH.addmm_(grad_logits_nV[:, v : v + UPCAST_ROWS], head_VH[v : v + UPCAST_ROWS].to(dtype))
    return grad_hidden_nH


def _accumulate_head_grad_(
    grad_head_VH: torch.Tensor, grad_logits_nV: torch.Tensor, hidden_nH: torch.Tensor
) -> None:
    """grad_head += (d loss / d logits).T @ hidden, accumulated in fp32 across chunks."""
    if _cuda_half_pair(hidden_nH, hidden_nH):
        torch.addmm(
            grad_head_VH,
            grad_logits_nV.T.to(hidden_nH.dtype),
            hidden_nH,
            out_dtype=grad_head_VH.dtype,
            out=grad_head_VH,
        )
    else:
        grad_head_VH.addmm_(grad_logits_nV.T, hidden_nH.to(grad_head_VH.dtype))


# --------------------------------------------------------------------------------------------------
# One engine: apply a per-chunk function of the student's logits, recompute it in backward.
# --------------------------------------------------------------------------------------------------

# math_fn(student_logits_nV, rows, with_aux) -> (value_n..., *aux_n); only `value` is differentiable.
ChunkFn = Callable[[torch.Tensor, slice, bool], tuple[torch.Tensor, ...]]


def _token_chunks(num_tokens: int, rows_per_chunk: int) -> list[slice]:
    # At least one (possibly empty) chunk, so an all-masked batch still flows through autograd.
    return [
        slice(start, min(start + rows_per_chunk, num_tokens))
        for start in range(0, max(num_tokens, 1), rows_per_chunk)
    ]


def _rows_per_chunk(vocab_size: int, chunk_tokens: int | None) -> int:
    if chunk_tokens is not None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        return chunk_tokens
    return max(1, TILE_BYTES // (4 * vocab_size))


class _ChunkedOverStudentLogits(torch.autograd.Function):
    """`math_fn` over the student's logits, one token chunk at a time, never holding all N x V.

    Plain autograd over a loop of chunks would keep every chunk's (n, V) intermediates until
    backward, i.e. N x V again. Here forward keeps only the per-token outputs; backward re-projects
    each chunk (one extra student and teacher matmul, the trade TRL's kernel makes too), lets autograd
    differentiate `math_fn` on that chunk alone, and folds the logits gradient into fp32 accumulators
    for the hidden states, head and bias. Differentiating the same `math_fn` that produced the forward
    value means the backward cannot drift from the formula.
    """

    @staticmethod
    def forward(ctx, hidden_NH, head_VH, bias_V, math_fn: ChunkFn, rows_per_chunk: int):
        ctx.set_materialize_grads(False)
        outputs = [
            math_fn(_logits(hidden_NH[rows], head_VH, bias_V), rows, True)
            for rows in _token_chunks(hidden_NH.shape[0], rows_per_chunk)
        ]
        value_N, *aux_N = (torch.cat(parts) for parts in zip(*outputs, strict=True))
        ctx.save_for_backward(hidden_NH, head_VH, bias_V)
        ctx.math_fn, ctx.rows_per_chunk = math_fn, rows_per_chunk
        ctx.mark_non_differentiable(*aux_N)
        return (value_N, *aux_N)

    @staticmethod
    def backward(ctx, grad_value_N, *_):
        hidden_NH, head_VH, bias_V = ctx.saved_tensors
        needs_hidden, needs_head, needs_bias = ctx.needs_input_grad[:3]
        if grad_value_N is None:
            return None, None, None, None, None
        dtype = _compute_dtype(hidden_NH, head_VH)
        grad_hidden_NH = hidden_NH.new_zeros(hidden_NH.shape, dtype=dtype) if needs_hidden else None
        grad_head_VH = head_VH.new_zeros(head_VH.shape, dtype=dtype) if needs_head else None
        grad_bias_V = bias_V.new_zeros(bias_V.shape, dtype=dtype) if needs_bias else None
        for rows in _token_chunks(hidden_NH.shape[0], ctx.rows_per_chunk):
            hidden_nH = hidden_NH[rows]
            student_logits_nV = _logits(hidden_nH, head_VH, bias_V).requires_grad_()
            with torch.enable_grad():
                value_n = ctx.math_fn(student_logits_nV, rows, False)[0]
            (grad_logits_nV,) = torch.autograd.grad(value_n, student_logits_nV, grad_value_N[rows].to(dtype))
            if needs_hidden:
                grad_hidden_NH[rows] = _hidden_grad(grad_logits_nV, head_VH)
            if needs_head:
                _accumulate_head_grad_(grad_head_VH, grad_logits_nV, hidden_nH)
            if needs_bias:
                grad_bias_V += grad_logits_nV.sum(0)
        return (
            None if grad_hidden_NH is None else grad_hidden_NH.to(hidden_NH.dtype),
            None if grad_head_VH is None else grad_head_VH.to(head_VH.dtype),
            None if grad_bias_V is None else grad_bias_V.to(bias_V.dtype),
            None,
            None,
        )


# --------------------------------------------------------------------------------------------------
# Shared checks.
# --------------------------------------------------------------------------------------------------


def _shared_vocab(vocab_size: int | None, *heads_VH: torch.Tensor) -> int:
    """Rows the heads have in common. Checkpoints pad lm_head to a multiple of 64 or 128 (Qwen2.5: 151,936
    vs 152,064 rows); the padding rows are untrained, so comparing them would be noise, and a silent
    mismatch would shift every token id. Hence: equal sizes, or an explicit `vocab_size`."""
    rows = [head.shape[0] for head in heads_VH]
    if vocab_size is None:
        if len(set(rows)) > 1:
            raise ValueError(
                f"lm_head sizes differ ({' vs '.join(map(str, rows))} rows); pass vocab_size= the tokenizer's "
                "vocabulary size (rows past it are padding)"
            )
        return rows[0]
    if not 0 < vocab_size <= min(rows):
        raise ValueError(f"vocab_size={vocab_size} must be in 1..{min(rows)} (the smallest lm_head)")
    return vocab_size


def _sliced(bias_V: torch.Tensor | None, vocab_size: int) -> torch.Tensor | None:
    return None if bias_V is None else bias_V[:vocab_size]


@functools.cache
def _trl_kernels_available() -> bool:
    try:
        import trl.kernels.chunked_divergence  # noqa: F401
        import trl.kernels.chunked_logprob  # noqa: F401
    except ImportError:
        return False
    return True


def _zero3_enabled() -> bool:
    import sys

    if "deepspeed" not in sys.modules:  # nothing can be partitioned without DeepSpeed imported
        return False
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def resolve_impl(impl: str, *tensors: torch.Tensor) -> str:
    """"trl" or "torch": who computes the vocabulary passes for these tensors when `impl` is asked for."""
    if impl not in ("auto", "torch", "trl"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'trl', got {impl!r}")
    if impl != "auto":
        return impl
    if any(tensor.dtype == torch.float64 for tensor in tensors):
        return "torch"  # TRL's tiles are fp32; float64 inputs are asked for float64 answers
    if _zero3_enabled():
        # TRL's kernels gather the head themselves under ZeRO-3 and so accept only the unsliced ZeRO Parameter;
        # sdd hands the loss a head already whole (sdd.models.head_for_loss), sliced to the shared vocabulary.
        return "torch"
    return "trl" if _trl_kernels_available() else "torch"


def _denominator(num_tokens: torch.Tensor, num_items_in_batch: torch.Tensor | int | None):
    if num_items_in_batch is None:
        return num_tokens.clamp(min=1)  # an all-masked micro-batch gives 0, not 0/0
    if isinstance(num_items_in_batch, torch.Tensor):
        return num_items_in_batch.to(num_tokens.device)
    return num_items_in_batch


# --------------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------------


def token_divergence(
    student_hidden_NH: torch.Tensor,
    student_head_VH: torch.Tensor,
    teacher_hidden_NH: torch.Tensor,
    teacher_head_VH: torch.Tensor,
    *,
    beta: float,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    student_head_bias: torch.Tensor | None = None,
    teacher_head_bias: torch.Tensor | None = None,
    impl: Impl = "auto",
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token divergence D_t (see module docstring for beta) and the student's entropy, in nats.

    Taking hidden states and heads rather than logits is what lets the projection be chunked; both
    heads are cut to the first `vocab_size` rows. Gradients flow to the student's hidden states, head
    and bias only; the entropy is for logging and has none. `chunk_tokens` overrides the torch path's
    rows per chunk (default: a `TILE_BYTES` fp32 tile); TRL's kernel has its own fixed tiles.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_hidden_NH.shape[0] != teacher_hidden_NH.shape[0]:
        raise ValueError(
            f"student and teacher hidden states cover {student_hidden_NH.shape[0]} and "
            f"{teacher_hidden_NH.shape[0]} tokens; they must be the same positions"
        )
    V = _shared_vocab(vocab_size, student_head_VH, teacher_head_VH)
    student_head_VH, student_bias_V = student_head_VH[:V], _sliced(student_head_bias, V)
    teacher_hidden_NH, teacher_head_VH = teacher_hidden_NH.detach(), teacher_head_VH[:V].detach()
    teacher_bias_V = None if teacher_head_bias is None else teacher_head_bias[:V].detach()

    if resolve_impl(impl, student_hidden_NH, student_head_VH) == "trl":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        return ChunkedDivergenceFunction.apply(
            student_hidden_NH, student_head_VH, student_bias_V,
            teacher_hidden_NH, teacher_head_VH, teacher_bias_V,
            beta, temperature,
        )  # fmt: skip

    def divergence_on_chunk(student_logits_nV, rows, with_entropy):
        teacher_logits_nV = _logits(teacher_hidden_NH[rows], teacher_head_VH, teacher_bias_V)
        return _divergence_from_logits(
            student_logits_nV,
            teacher_logits_nV,
            beta=beta,
            temperature=temperature,
            with_entropy=with_entropy,
        )

    divergence_N, student_entropy_N = _ChunkedOverStudentLogits.apply(
        student_hidden_NH,
        student_head_VH,
        student_bias_V,
        divergence_on_chunk,
        _rows_per_chunk(V, chunk_tokens),
    )
    return divergence_N, student_entropy_N


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """sum(mask * values) / N, with N = sum(mask) or `num_items_in_batch`.

    Pass `num_items_in_batch` (the token count of the whole optimizer step, as the HF Trainer hands
    to `compute_loss`) under gradient accumulation: each micro-batch's own mean would weight a token in
    a short micro-batch more than one in a long one. Masked positions are filled, not multiplied, so a
    NaN or inf under padding cannot reach the loss or its gradient.
    """
    keep = mask.bool()
    total = values.masked_fill(~keep, 0).sum()
    return total / _denominator(keep.sum(), num_items_in_batch)


def divergence_loss(
    student_hidden_BTH: torch.Tensor,
    student_head_VH: torch.Tensor,
    teacher_hidden_BTH: torch.Tensor,
    teacher_head_VH: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    beta: float,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    student_head_bias: torch.Tensor | None = None,
    teacher_head_bias: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    impl: Impl = "auto",
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss = (1/N) sum_t mask_t D_t over a padded batch, for a trainer's `compute_loss`.

    Only the masked-in positions are projected: prompts and padding never cost a vocabulary pass (and
    whatever the hidden states hold there, NaN included, cannot leak in). Returns the loss and detached
    `divergence_sum`, `entropy_sum`, `num_tokens` for logging.
    """
    keep_BT = mask_BT.bool()
    divergence_N, student_entropy_N = token_divergence(
        student_hidden_BTH[keep_BT],
        student_head_VH,
        teacher_hidden_BTH[keep_BT],
        teacher_head_VH,
        beta=beta,
        temperature=temperature,
        vocab_size=vocab_size,
        student_head_bias=student_head_bias,
        teacher_head_bias=teacher_head_bias,
        impl=impl,
        chunk_tokens=chunk_tokens,
    )
    num_tokens = keep_BT.sum()
    loss = divergence_N.sum() / _denominator(num_tokens, num_items_in_batch)
    stats = {
        "divergence_sum": divergence_N.detach().sum(),
        "entropy_sum": student_entropy_N.detach().sum(),
        "num_tokens": num_tokens,
    }
    return loss, stats


def selected_token_logprobs(
    hidden_NH: torch.Tensor,
    head_VH: torch.Tensor,
    token_ids_N: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    head_bias: torch.Tensor | None = None,
    impl: Impl = "auto",
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """log p(token_ids_N) under softmax(hidden @ head.T / tau), without the N x V logits.

    What the sampled-token estimator needs from the student (with gradient) and the teacher (without),
    and the teacher NLL of student samples worth logging. TRL's kernel ("trl") projects in the inputs'
    dtype, so bf16 inputs give bf16-rounded logits there; the torch path keeps fp32 logits.
    """
    V = _shared_vocab(vocab_size, head_VH)
    head_VH, bias_V = head_VH[:V], _sliced(head_bias, V)
    if resolve_impl(impl, hidden_NH, head_VH) == "trl":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        # positional: softcap None, logit scale 1.0, no optional outputs (entropy etc.)
        logprobs_N, *_ = ChunkedLogProbFunction.apply(
            hidden_NH, head_VH, bias_V, token_ids_N, temperature, TRL_LOGPROB_VOCAB_CHUNK, None, 1.0, ()
        )
        return logprobs_N
    token_ids_N1 = token_ids_N[:, None]
    return _student_logprobs_at(hidden_NH, head_VH, bias_V, token_ids_N1, temperature, chunk_tokens)[:, 0]


def _student_logprobs_at(hidden_NH, head_VH, bias_V, ids_NK, temperature, chunk_tokens) -> torch.Tensor:
    def logprobs_on_chunk(student_logits_nV, rows, with_aux):
        return (_logprobs_at(student_logits_nV, ids_NK[rows], temperature),)

    (logprobs_NK,) = _ChunkedOverStudentLogits.apply(
        hidden_NH, head_VH, bias_V, logprobs_on_chunk, _rows_per_chunk(head_VH.shape[0], chunk_tokens)
    )
    return logprobs_NK


def sampled_token_reverse_kl_loss(
    student_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor | None = None,
    coef: float = 1.0,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """On-policy distillation as a policy gradient on the student's own samples y_t ~ p_S_old:

        reverse-KL estimate   k_t = log p_S_old(y_t) - log p_T(y_t)
        advantage             A_t = -coef * k_t                                   (detached)
        importance ratio      r_t = exp(log p_S(y_t) - log p_S_old(y_t))
        loss                  L   = -(1/N) sum_t mask_t r_t A_t

    Why it is the reverse-KL gradient: at r = 1, grad L = coef (1/N) sum_t k_t grad log p_S(y_t), and
    E_{y~p_S}[(log p_S(y) - log p_T(y)) grad log p_S(y)] = grad KL(p_S || p_T) because
    E[grad log p_S] = 0. Only the sampled token's log-prob is needed from each model, so it costs no
    vocabulary-wide divergence, but each token's estimate is noisy where `token_divergence` is exact.

    The advantage is a property of the sample, computed with the policy that drew it (tinker-cookbook's
    convention); without `old_logprobs_BT` that is the current policy, detached, so r = 1 in value and
    carries the gradient. At r = 1 the loss value is coef times the mean of k_t. `teacher_logprobs_BT`
    is detached whatever is passed. Stats: detached `reverse_kl_sum` (sum of k_t), `teacher_nll_sum`,
    `ratio_sum`, `num_tokens`.
    """
    # Zero padding first: a NaN there would otherwise reach the gradient through exp() (0 * NaN).
    keep_BT = mask_BT.bool()
    student_logprobs_BT = student_logprobs_BT.masked_fill(~keep_BT, 0)
    if old_logprobs_BT is None:
        old_logprobs_BT = student_logprobs_BT
    old_logprobs_BT = old_logprobs_BT.detach().masked_fill(~keep_BT, 0)
    teacher_logprobs_BT = teacher_logprobs_BT.detach().masked_fill(~keep_BT, 0)

    reverse_kl_BT = old_logprobs_BT - teacher_logprobs_BT
    advantage_BT = -coef * reverse_kl_BT
    ratio_BT = torch.exp(student_logprobs_BT - old_logprobs_BT)
    loss = masked_mean(-ratio_BT * advantage_BT, keep_BT, num_items_in_batch)

    stats = {
        "reverse_kl_sum": reverse_kl_BT.sum(),
        "teacher_nll_sum": -teacher_logprobs_BT.sum(),
        "ratio_sum": ratio_BT.detach().masked_fill(~keep_BT, 0).sum(),
        "num_tokens": keep_BT.sum(),
    }
    return loss, stats


def topk_forward_kl(
    student_hidden_NH: torch.Tensor,
    student_head_VH: torch.Tensor,
    teacher_topk_ids_NK: torch.Tensor,
    teacher_topk_logprobs_NK: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    student_head_bias: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Forward KL against a teacher cached as its top-K tokens per position, no teacher forward needed:

        q_T(v) = p_T(v)^(1/tau) / sum_{u in topK} p_T(u)^(1/tau)            (v in topK)
        D_t    = sum_{v in topK} q_T(v) [log q_T(v) - log p_S(v)]

    with p_S the student's full-vocabulary softmax at temperature tau.

    Why renormalise the teacher over its top-K: q_T is then a distribution, so D_t is a true KL from
    q_T to the student's (sub-normalised) mass on those tokens: D_t >= 0, zero iff p_S = q_T, and its
    gradient in the student's logits is (p_S - q_T) / tau exactly as in full forward KL with q_T as the
    teacher. Left unnormalised, each position's weight would be the teacher's top-K mass (confident
    positions would count more) and the value could go negative. The cost: the teacher's tail is
    treated as 0, so the student is pushed to put no mass outside the cached top-K. When that tail is
    ~0 (K = 20 usually holds >0.99 of a sharp teacher) D_t matches the full forward KL.

    Pass the teacher's *untempered* log-probs: dividing them by tau and renormalising is then exactly
    the tempered teacher restricted to its top-K (the log-normaliser is a per-row constant). Entries
    with log-prob -inf are padding and contribute nothing.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    V = _shared_vocab(vocab_size, student_head_VH)
    log_p_S_NK = _student_logprobs_at(
        student_hidden_NH,
        student_head_VH[:V],
        _sliced(student_head_bias, V),
        teacher_topk_ids_NK,
        temperature,
        chunk_tokens,
    )
    log_q_T_NK = F.log_softmax(teacher_topk_logprobs_NK.detach().to(log_p_S_NK.dtype) / temperature, dim=-1)
    q_T_NK = log_q_T_NK.exp()
    return torch.where(q_T_NK > 0, q_T_NK * (log_q_T_NK - log_p_S_NK), 0.0).sum(-1)
