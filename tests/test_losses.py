"""sdd.losses against float64 full-logits references written independently of it.

Sizes are small (V = 1,000, N = 61) but chunk sizes are forced smaller still (16 tokens, TRL's vocab
tiles 256 wide) so every test crosses chunk and tile boundaries, including ragged last chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sdd import losses
from sdd.losses import (
    divergence_loss,
    masked_mean,
    sampled_token_reverse_kl_loss,
    selected_token_logprobs,
    token_divergence,
    topk_forward_kl,
)

V = 1000  # shared vocabulary
PAD = 3  # extra lm_head rows on the teacher, like 151,936 vs 152,064
CHUNK = 16  # tokens per chunk; N = 61 leaves a ragged last chunk
VALUE_RTOL = 1e-5
GRAD_RTOL = 5e-5  # JSD gradients lose a little more to cancellation; TRL's measured up to 1.7e-5


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.fixture
def small_trl_tiles(monkeypatch):
    """Shrink TRL's tiles (module constants read at call time) so its online softmax crosses tiles."""
    divergence_kernel = pytest.importorskip("trl.kernels.chunked_divergence")
    logprob_kernel = pytest.importorskip("trl.kernels.chunked_logprob")
    monkeypatch.setattr(divergence_kernel, "TOKEN_CHUNK_SIZE", CHUNK)
    monkeypatch.setattr(divergence_kernel, "VOCAB_CHUNK_SIZE", 256)
    monkeypatch.setattr(logprob_kernel, "TOKEN_CHUNK_SIZE", CHUNK)
    monkeypatch.setattr(losses, "TRL_LOGPROB_VOCAB_CHUNK", 256)


@dataclass
class Case:
    student_hidden: torch.Tensor  # (N, Hs), requires grad
    student_head: torch.Tensor  # (V, Hs), requires grad
    student_bias: torch.Tensor  # (V,), requires grad
    teacher_hidden: torch.Tensor  # (N, Ht)
    teacher_head: torch.Tensor  # (V + PAD, Ht)
    teacher_bias: torch.Tensor  # (V + PAD,)

    def student_leaves(self):
        return [self.student_hidden, self.student_head, self.student_bias]


def make_case(*, close: bool, N: int = 61, Hs: int = 16, Ht: int = 24, dtype=torch.float32, seed: int = 0):
    """`close=False`: unrelated models (KL ~ 8 nats). `close=True`: the teacher's logits are the student's
    plus noise (KL ~ 0.08), the regime distillation ends in and where cancellation bites."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    student_hidden, student_head = randn(N, Hs), randn(V, Hs, scale=0.7)
    if close:
        teacher_hidden = torch.cat([student_hidden, randn(N, Ht - Hs)], dim=1)
        teacher_head = torch.cat([student_head, randn(V, Ht - Hs, scale=0.15)], dim=1)
    else:
        teacher_hidden, teacher_head = randn(N, Ht), randn(V, Ht, scale=0.6)
    # Padding rows with large logits: reading them would visibly change every softmax.
    teacher_head = torch.cat([teacher_head, randn(PAD, Ht, scale=5.0)])
    return Case(
        student_hidden=student_hidden.to(dtype).requires_grad_(),
        student_head=student_head.to(dtype).requires_grad_(),
        student_bias=randn(V, scale=0.1).to(dtype).requires_grad_(),
        teacher_hidden=teacher_hidden.to(dtype),
        teacher_head=teacher_head.to(dtype),
        teacher_bias=randn(V + PAD, scale=0.1).to(dtype),
    )


def reference_log_probs(case: Case, temperature: float):
    z_S = case.student_hidden.double() @ case.student_head.double().T + case.student_bias.double()
    z_T = case.teacher_hidden.double() @ case.teacher_head[:V].double().T + case.teacher_bias[:V].double()
    return F.log_softmax(z_S / temperature, -1), F.log_softmax(z_T / temperature, -1)


def reference_divergence(case: Case, *, beta: float, temperature: float = 1.0):
    """Full fp64 logits; KLs via F.kl_div and the mixture built from probabilities, not log-space."""
    log_p_S, log_p_T = reference_log_probs(case, temperature)

    def kl(log_p, log_q):  # F.kl_div(input=log q, target=log p) is KL(p || q)
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)

    if beta == 0.0:
        divergence = kl(log_p_T, log_p_S)
    elif beta == 1.0:
        divergence = kl(log_p_S, log_p_T)
    else:
        log_m = ((1 - beta) * log_p_S.exp() + beta * log_p_T.exp()).log()
        divergence = beta * kl(log_p_T, log_m) + (1 - beta) * kl(log_p_S, log_m)
    entropy = -(log_p_S.exp() * log_p_S).sum(-1)
    return divergence, entropy


def divergence_of(case: Case, *, beta, temperature=1.0, impl="torch", **kwargs):
    return token_divergence(
        case.student_hidden,
        case.student_head,
        case.teacher_hidden,
        case.teacher_head,
        beta=beta,
        temperature=temperature,
        vocab_size=V,
        student_head_bias=case.student_bias,
        teacher_head_bias=case.teacher_bias,
        impl=impl,
        chunk_tokens=CHUNK,
        **kwargs,
    )


def grads(per_token: torch.Tensor, leaves, weights: torch.Tensor):
    # Distinct per-token upstream weights, so a gradient routed to the wrong token would show
    return torch.autograd.grad((per_token * weights.to(per_token.dtype)).sum(), leaves)


# --------------------------------------------------------------------------------------------------
# token_divergence
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "trl"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0], ids=["forwardKL", "JSD0.3", "JSD0.5", "reverseKL"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("close", [False, True], ids=["far", "close"])
def test_token_divergence_matches_fp64_reference(impl, beta, temperature, close, small_trl_tiles):
    case = make_case(close=close)
    weights = torch.rand(case.student_hidden.shape[0], generator=torch.Generator().manual_seed(1))

    divergence, entropy = divergence_of(case, beta=beta, temperature=temperature, impl=impl)
    expected_divergence, expected_entropy = reference_divergence(case, beta=beta, temperature=temperature)

    assert divergence.dtype == torch.float32
    assert rel(divergence, expected_divergence) < VALUE_RTOL
    assert rel(entropy, expected_entropy) < VALUE_RTOL
    for got, expected in zip(
        grads(divergence, case.student_leaves(), weights),
        grads(expected_divergence, case.student_leaves(), weights),
        strict=True,
    ):
        assert rel(got, expected) < GRAD_RTOL


@pytest.mark.parametrize("impl", ["torch", "trl"])
def test_near_identical_models_keep_absolute_error_at_fp32_rounding(impl, small_trl_tiles, monkeypatch):
    """As KL -> 0 no fp32 method keeps a relative bound (the logits themselves carry ~1e-7 relative
    rounding); the absolute error per token must stay at that level instead."""
    case = make_case(close=True, seed=3)
    with torch.no_grad():
        case.teacher_head[:V, 16:] *= 0.02 / 0.15
        case.teacher_bias[:V] = case.student_bias  # KL ~ 1e-3 nats
    for beta in (0.0, 1.0):
        divergence, _ = divergence_of(case, beta=beta, impl=impl)
        expected, _ = reference_divergence(case, beta=beta)
        assert expected.mean() < 3e-3
        # measured: mean 1.1e-7 (torch) / 4.2e-7 (trl), max 3.2e-7 / 1.5e-6
        assert (divergence.double() - expected).abs().max() < 3e-6


def test_gradcheck_float64_torch_path():
    """The custom backward (recompute + fp32/fp64 accumulation) against finite differences."""
    g = torch.Generator().manual_seed(0)
    N, small_V, Hs, Ht = 5, 13, 3, 4
    student_hidden = torch.randn(N, Hs, generator=g, dtype=torch.float64, requires_grad=True)
    student_head = torch.randn(small_V, Hs, generator=g, dtype=torch.float64, requires_grad=True)
    student_bias = torch.randn(small_V, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(N, Ht, generator=g, dtype=torch.float64)
    teacher_head = torch.randn(small_V + 2, Ht, generator=g, dtype=torch.float64)
    ids = torch.randint(0, small_V, (N, 4), generator=g)
    cached = torch.randn(N, 4, generator=g, dtype=torch.float64)

    for beta in (0.0, 0.3, 1.0):

        def divergence(h, w, b, beta=beta):
            return token_divergence(
                h, w, teacher_hidden, teacher_head, beta=beta, temperature=0.7, vocab_size=small_V,
                student_head_bias=b, impl="auto", chunk_tokens=2,
            )[0]  # fmt: skip

        assert divergence(student_hidden, student_head, student_bias).dtype == torch.float64  # auto -> torch
        assert torch.autograd.gradcheck(divergence, (student_hidden, student_head, student_bias))

    def topk(h, w, b):
        return topk_forward_kl(h, w, ids, cached, temperature=0.7, student_head_bias=b, chunk_tokens=2)

    assert torch.autograd.gradcheck(topk, (student_hidden, student_head, student_bias))


@pytest.mark.parametrize("impl", ["torch", "trl"])
def test_bf16_inputs_are_projected_in_fp32(impl, small_trl_tiles, monkeypatch):
    """bf16 weights and hidden states, fp32 logits: as exact as fp32 inputs. Rounding the logits to
    bf16 instead (what `model(...).logits.float()` does) is ~1000x worse, which this would catch."""
    monkeypatch.setattr(losses, "UPCAST_ROWS", 256)  # several upcast slices per head
    case = make_case(close=True, dtype=torch.bfloat16)
    weights = torch.rand(case.student_hidden.shape[0])
    divergence, _ = divergence_of(case, beta=1.0, impl=impl)
    expected, _ = reference_divergence(case, beta=1.0)
    assert rel(divergence, expected) < VALUE_RTOL

    z_S = (case.student_hidden @ case.student_head.T + case.student_bias).float()
    z_T = (case.teacher_hidden @ case.teacher_head[:V].T + case.teacher_bias[:V]).float()
    log_p_S, log_p_T = F.log_softmax(z_S, -1), F.log_softmax(z_T, -1)
    bf16_logits_divergence = (log_p_S.exp() * (log_p_S - log_p_T)).sum(-1)
    assert rel(bf16_logits_divergence, expected) > 100 * rel(divergence, expected)

    for got, want in zip(
        grads(divergence, case.student_leaves(), weights),
        grads(expected, case.student_leaves(), weights),
        strict=True,
    ):
        assert got.dtype == torch.bfloat16
        assert rel(got, want) < 1e-2  # one bf16 rounding of an fp32-accumulated gradient


def test_teacher_gets_no_gradient_and_entropy_none():
    case = make_case(close=False)
    case.teacher_hidden.requires_grad_()
    case.teacher_head.requires_grad_()
    divergence, entropy = divergence_of(case, beta=0.5)
    assert not entropy.requires_grad
    divergence.sum().backward()
    assert case.teacher_hidden.grad is None and case.teacher_head.grad is None
    assert case.student_head.grad is not None


def test_vocab_and_argument_checks():
    case = make_case(close=False)
    with pytest.raises(ValueError, match="vocab_size"):
        token_divergence(
            case.student_hidden, case.student_head, case.teacher_hidden, case.teacher_head, beta=1.0
        )
    with pytest.raises(ValueError, match="vocab_size"):
        token_divergence(
            case.student_hidden, case.student_head, case.teacher_hidden, case.teacher_head, beta=1.0,
            vocab_size=V + 1,
        )  # fmt: skip
    with pytest.raises(ValueError, match="beta"):
        divergence_of(case, beta=1.5)
    with pytest.raises(ValueError, match="impl"):
        divergence_of(case, beta=1.0, impl="cuda")
    with pytest.raises(ValueError, match="same positions"):
        token_divergence(
            case.student_hidden, case.student_head, case.teacher_hidden[:-1], case.teacher_head, beta=1.0,
            vocab_size=V,
        )  # fmt: skip


def test_auto_uses_trl_for_fp32():
    pytest.importorskip("trl.kernels.chunked_divergence")
    case = make_case(close=False)
    with torch.no_grad():
        auto, _ = divergence_of(case, beta=0.0, impl="auto")
        trl, _ = divergence_of(case, beta=0.0, impl="trl")
        ours, _ = divergence_of(case, beta=0.0, impl="torch")
    assert torch.equal(auto, trl)
    assert not torch.equal(auto, ours)  # the two paths round differently, so this tells them apart


# --------------------------------------------------------------------------------------------------
# Memory: no (N, V) tensor in the chunked paths
# --------------------------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns, forward and backward (the autograd engine
    carries dispatch modes into backward)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self.numel = max(self.numel, item.numel())
        return out


@pytest.mark.parametrize("impl", ["torch", "trl"])
def test_chunked_paths_never_hold_tokens_by_vocab(impl, small_trl_tiles):
    N = 256
    case = make_case(close=False, N=N, Hs=8, Ht=12)
    ids = torch.randint(0, V, (N, 20))

    def run_all():
        divergence, _ = divergence_of(case, beta=0.5, impl=impl)
        logprobs = selected_token_logprobs(
            case.student_hidden, case.student_head, ids[:, 0], head_bias=case.student_bias, impl=impl,
            chunk_tokens=CHUNK,
        )  # fmt: skip
        topk = topk_forward_kl(
            case.student_hidden, case.student_head, ids, torch.randn(N, 20), chunk_tokens=CHUNK
        )
        (divergence.sum() + logprobs.sum() + topk.sum()).backward()

    largest = LargestTensor()
    with largest:
        run_all()
    assert largest.numel <= max(CHUNK * (V + PAD), V * 12)  # one chunk's tile, or a head
    assert largest.numel < N * V // 10

    naive = LargestTensor()
    with naive:
        reference_divergence(case, beta=0.5)[0].sum().backward()
    assert naive.numel >= N * V  # the detector does see a full logits tensor


# --------------------------------------------------------------------------------------------------
# divergence_loss / masked_mean
# --------------------------------------------------------------------------------------------------


def batch_case(seed=0):
    """(B=4, T=9) batch: one row fully masked, ragged completions, NaN in every masked position."""
    B, T = 4, 9
    case = make_case(close=True, N=B * T, seed=seed)
    mask_BT = torch.zeros(B, T, dtype=torch.bool)
    mask_BT[0, 2:] = True
    mask_BT[1, 5:8] = True
    mask_BT[3, :] = True
    with torch.no_grad():
        case.student_hidden[~mask_BT.reshape(-1)] = float("nan")
        case.teacher_hidden[~mask_BT.reshape(-1)] = float("nan")
    return case, mask_BT


def clean_copy(case: Case, mask_BT) -> Case:
    """The same tensors with the masked rows zeroed: the reference must not see the NaN either."""
    keep = mask_BT.reshape(-1, 1)
    fields = {name: tensor.detach().clone() for name, tensor in vars(case).items()}
    fields["student_hidden"] = fields["student_hidden"].where(keep, 0)
    fields["teacher_hidden"] = fields["teacher_hidden"].where(keep, 0)
    for name in ("student_hidden", "student_head", "student_bias"):
        fields[name].requires_grad_()
    return Case(**fields)


def loss_of(case, mask_BT, impl, rows=slice(None), **kwargs):
    B, T = mask_BT.shape
    return divergence_loss(
        case.student_hidden.reshape(B, T, -1)[rows],
        case.student_head,
        case.teacher_hidden.reshape(B, T, -1)[rows],
        case.teacher_head,
        mask_BT[rows],
        beta=1.0,
        temperature=0.7,
        vocab_size=V,
        student_head_bias=case.student_bias,
        teacher_head_bias=case.teacher_bias,
        impl=impl,
        chunk_tokens=CHUNK,
        **kwargs,
    )


@pytest.mark.parametrize("impl", ["torch", "trl"])
def test_divergence_loss_masks_padding_even_when_it_is_nan(impl, small_trl_tiles):
    case, mask_BT = batch_case()
    keep = mask_BT.reshape(-1)
    loss, stats = loss_of(case, mask_BT, impl)
    clean = clean_copy(case, mask_BT)
    expected, expected_entropy = reference_divergence(clean, beta=1.0, temperature=0.7)
    expected_loss = expected[keep].mean()

    assert abs(loss.item() - expected_loss.item()) < VALUE_RTOL * expected_loss.item()
    assert stats["num_tokens"].item() == keep.sum().item()
    assert stats["divergence_sum"].item() == pytest.approx(expected[keep].sum().item(), rel=VALUE_RTOL)
    assert stats["entropy_sum"].item() == pytest.approx(expected_entropy[keep].sum().item(), rel=VALUE_RTOL)

    grad_hidden, grad_head = torch.autograd.grad(loss, [case.student_hidden, case.student_head])
    assert torch.isfinite(grad_head).all()
    assert (grad_hidden[~keep] == 0).all() and torch.isfinite(grad_hidden[keep]).all()
    expected_grad_head = torch.autograd.grad(expected_loss, clean.student_head)[0]
    assert rel(grad_head, expected_grad_head) < GRAD_RTOL


@pytest.mark.parametrize("impl", ["torch", "trl"])
def test_num_items_in_batch_makes_accumulated_gradient_equal_full_batch(impl, small_trl_tiles):
    case, mask_BT = batch_case()
    total = int(mask_BT.sum())
    full_loss, _ = loss_of(case, mask_BT, impl)
    (full_grad,) = torch.autograd.grad(full_loss, case.student_head)

    def accumulated(num_items):
        grad = torch.zeros_like(case.student_head)
        for rows in (slice(0, 1), slice(1, 4)):  # 7 and 12 tokens: unequal micro-batches
            loss, _ = loss_of(case, mask_BT, impl, rows=rows, num_items_in_batch=num_items)
            grad += torch.autograd.grad(loss, case.student_head)[0] / (1 if num_items else 2)
        return grad

    assert rel(accumulated(torch.tensor(total)), full_grad) < GRAD_RTOL
    assert rel(accumulated(None), full_grad) > 1e-2  # per-micro-batch means weight tokens unequally


@pytest.mark.parametrize("impl", ["torch", "trl"])
def test_all_masked_batch_gives_zero_loss_and_gradient(impl, small_trl_tiles):
    case, mask_BT = batch_case()
    loss, stats = loss_of(case, mask_BT, impl, rows=slice(2, 3))
    assert loss.item() == 0.0 and stats["num_tokens"].item() == 0
    grad_hidden, grad_head = torch.autograd.grad(loss, [case.student_hidden, case.student_head])
    assert (grad_hidden == 0).all() and (grad_head == 0).all()


def test_masked_mean():
    values = torch.tensor([[1.0, float("nan"), 3.0], [4.0, 5.0, float("inf")]], requires_grad=True)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    loss = masked_mean(values, mask)
    assert loss.item() == pytest.approx(13 / 4)
    assert masked_mean(values, mask, num_items_in_batch=10).item() == pytest.approx(1.3)
    (grad,) = torch.autograd.grad(loss, values)
    assert torch.equal(grad, mask / 4)


# --------------------------------------------------------------------------------------------------
# selected_token_logprobs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "trl"])
def test_selected_token_logprobs_match_fp64_log_softmax(impl, small_trl_tiles):
    case = make_case(close=False)
    N = case.teacher_hidden.shape[0]
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
    # the teacher's head is padded: vocab_size keeps its padding rows out of the normaliser
    teacher_head = case.teacher_head.clone().requires_grad_()
    logprobs = selected_token_logprobs(
        case.teacher_hidden, teacher_head, ids, temperature=0.7, vocab_size=V, head_bias=case.teacher_bias,
        impl=impl, chunk_tokens=CHUNK,
    )  # fmt: skip
    z = case.teacher_hidden.double() @ teacher_head[:V].double().T + case.teacher_bias[:V].double()
    expected = F.log_softmax(z / 0.7, -1).gather(-1, ids[:, None])[:, 0]
    assert rel(logprobs, expected) < VALUE_RTOL

    weights = torch.rand(N)
    got = grads(logprobs, [teacher_head], weights)[0]
    want = grads(expected, [teacher_head], weights)[0]
    assert rel(got, want) < GRAD_RTOL
    assert (got[V:] == 0).all()


# --------------------------------------------------------------------------------------------------
# topk_forward_kl
# --------------------------------------------------------------------------------------------------


def teacher_cache(case: Case, K: int):
    """What warmup sampling would store: the untempered teacher's top-K ids and log-probs."""
    with torch.no_grad():
        _, log_p_T = reference_log_probs(case, temperature=1.0)
        logprobs, ids = log_p_T.topk(K, dim=-1)
    return ids, logprobs.float()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_topk_forward_kl_matches_fp64_reference(temperature):
    case = make_case(close=True)
    ids, cached = teacher_cache(case, K=20)
    divergence = topk_forward_kl(
        case.student_hidden, case.student_head, ids, cached, temperature=temperature,
        student_head_bias=case.student_bias, chunk_tokens=CHUNK,
    )  # fmt: skip
    log_p_S, _ = reference_log_probs(case, temperature)
    log_q_T = F.log_softmax(cached.double() / temperature, -1)
    expected = (log_q_T.exp() * (log_q_T - log_p_S.gather(-1, ids))).sum(-1)

    assert (expected > 0).all()
    assert rel(divergence, expected) < VALUE_RTOL
    weights = torch.rand(ids.shape[0])
    for got, want in zip(
        grads(divergence, case.student_leaves(), weights),
        grads(expected, case.student_leaves(), weights),
        strict=True,
    ):
        assert rel(got, want) < GRAD_RTOL


def test_topk_with_whole_vocabulary_is_forward_kl_at_any_temperature():
    """Caching every token reduces to full forward KL, which checks that tempering cached untempered
    log-probs by dividing and renormalising is exact."""
    case = make_case(close=True)
    ids, cached = teacher_cache(case, K=V)
    topk = topk_forward_kl(
        case.student_hidden, case.student_head, ids, cached, temperature=0.7,
        student_head_bias=case.student_bias, chunk_tokens=CHUNK,
    )  # fmt: skip
    full, _ = divergence_of(case, beta=0.0, temperature=0.7)
    assert rel(topk, full) < 1e-5


def test_topk_ignores_minus_inf_padding_entries():
    case = make_case(close=True)
    ids, cached = teacher_cache(case, K=8)
    padded_ids = torch.cat([ids, torch.zeros_like(ids[:, :3])], dim=1)
    padded = torch.cat([cached, torch.full_like(cached[:, :3], float("-inf"))], dim=1)
    plain = topk_forward_kl(case.student_hidden, case.student_head, ids, cached, chunk_tokens=CHUNK)
    with_padding = topk_forward_kl(
        case.student_hidden, case.student_head, padded_ids, padded, chunk_tokens=CHUNK
    )
    assert torch.allclose(plain, with_padding, rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(with_padding.sum(), case.student_head)
    assert torch.isfinite(grad).all()


# --------------------------------------------------------------------------------------------------
# sampled_token_reverse_kl_loss
# --------------------------------------------------------------------------------------------------


def test_sampled_token_estimator_is_unbiased_for_reverse_kl_gradient():
    """E_{y~p_S}[grad of the per-sample loss] = coef * grad KL(p_S || p_T), computed exactly by
    enumerating every token of a small vocabulary (no sampling noise)."""
    g = torch.Generator().manual_seed(0)
    T, small_V, coef = 3, 7, 0.5
    student_logits = torch.randn(T, small_V, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_logits = torch.randn(T, small_V, generator=g, dtype=torch.float64)
    log_p_T = F.log_softmax(teacher_logits, -1)
    p_S = F.softmax(student_logits, -1).detach()

    expected_grad = 0
    for y in range(small_V):
        log_p_S = F.log_softmax(student_logits, -1)
        loss, _ = sampled_token_reverse_kl_loss(
            log_p_S[None, :, y], log_p_T[None, :, y], torch.ones(1, T), coef=coef
        )
        (grad_y,) = torch.autograd.grad(loss, student_logits)
        expected_grad = expected_grad + p_S[:, y : y + 1] * grad_y  # row t weighted by p_S(y | t)

    log_p_S = F.log_softmax(student_logits, -1)
    reverse_kl = (log_p_S.exp() * (log_p_S - log_p_T)).sum(-1).mean()
    (true_grad,) = torch.autograd.grad(coef * reverse_kl, student_logits)
    assert rel(expected_grad, true_grad) < 1e-12


def test_sampled_token_loss_value_ratio_and_stats():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, generator=g, requires_grad=True)
    teacher = torch.randn(2, 5, generator=g, requires_grad=True)
    old = student.detach() + 0.1 * torch.randn(2, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        student[0, 4] = float("nan")  # padding: must not reach the loss, stats or gradient
    keep = mask.bool()

    loss, stats = sampled_token_reverse_kl_loss(student, teacher, mask, old_logprobs_BT=old, coef=2.0)
    k = old - teacher.detach()
    ratio = torch.exp(student.detach() - old)
    assert loss.item() == pytest.approx((ratio * 2.0 * k)[keep].mean().item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.allclose(grad, torch.where(keep, ratio * 2.0 * k / keep.sum(), 0.0), rtol=1e-6, atol=1e-8)
    assert stats["reverse_kl_sum"].item() == pytest.approx(k[keep].sum().item(), rel=1e-6)
    assert stats["teacher_nll_sum"].item() == pytest.approx(-teacher[keep].sum().item(), rel=1e-6)
    assert stats["ratio_sum"].item() == pytest.approx(ratio[keep].sum().item(), rel=1e-6)
    assert stats["num_tokens"].item() == 8

    # Without old log-probs: ratio is 1 in value, the loss is coef * mean k, the teacher gets no gradient
    loss, _ = sampled_token_reverse_kl_loss(student, teacher, mask, coef=2.0)
    assert loss.item() == pytest.approx(2.0 * (student - teacher).detach()[keep].mean().item(), rel=1e-6)
    grad_student, grad_teacher = torch.autograd.grad(loss, [student, teacher], allow_unused=True)
    assert grad_teacher is None
    assert torch.allclose(grad_student, torch.where(keep, 2.0 * (student - teacher).detach() / 8, 0.0))


@pytest.mark.parametrize("impl", ["torch", "trl"])
def test_sampled_token_loss_from_hidden_states(impl, small_trl_tiles):
    """The on-policy distill path end to end: chunked log-probs of the sampled tokens from both models,
    then the estimator; gradients against full fp64 logits."""
    case = make_case(close=True)
    N = case.student_hidden.shape[0]
    tokens = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(4))
    mask = torch.rand(N, generator=torch.Generator().manual_seed(5)) > 0.2
    student_logprobs = selected_token_logprobs(
        case.student_hidden, case.student_head, tokens, head_bias=case.student_bias, impl=impl,
        chunk_tokens=CHUNK,
    )  # fmt: skip
    with torch.no_grad():
        teacher_logprobs = selected_token_logprobs(
            case.teacher_hidden, case.teacher_head, tokens, vocab_size=V, head_bias=case.teacher_bias,
            impl=impl, chunk_tokens=CHUNK,
        )  # fmt: skip
    loss, _ = sampled_token_reverse_kl_loss(student_logprobs[None], teacher_logprobs[None], mask[None])

    log_p_S, log_p_T = reference_log_probs(case, temperature=1.0)
    chosen_S, chosen_T = log_p_S.gather(-1, tokens[:, None])[:, 0], log_p_T.gather(-1, tokens[:, None])[:, 0]
    expected_loss = ((chosen_S.detach() - chosen_T) * chosen_S.exp() / chosen_S.exp().detach())[mask].mean()
    assert loss.item() == pytest.approx(expected_loss.item(), rel=VALUE_RTOL)
    for got, want in zip(
        torch.autograd.grad(loss, case.student_leaves()),
        torch.autograd.grad(expected_loss, case.student_leaves()),
        strict=True,
    ):
        assert rel(got, want) < GRAD_RTOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["torch", "trl"])
def test_cuda_bf16_matches_fp64_reference(impl):
    """The CUDA-only branches (bf16 matmuls with fp32 outputs, Triton kernels) against fp64."""
    cpu_case = make_case(close=True, dtype=torch.bfloat16)
    case = Case(**{k: v.detach().cuda().requires_grad_(v.requires_grad) for k, v in vars(cpu_case).items()})
    divergence, _ = divergence_of(case, beta=1.0, impl=impl)
    expected, _ = reference_divergence(case, beta=1.0)
    assert rel(divergence, expected) < 1e-4
    weights = torch.rand(divergence.shape[0], device="cuda")
    for got, want in zip(
        grads(divergence, case.student_leaves(), weights),
        grads(expected, case.student_leaves(), weights),
        strict=True,
    ):
        assert rel(got, want) < 2e-2


# --------------------------------------------------------------------------------------------------
# The head a loss reads, under the engines (sdd.models.head_for_loss). ZeRO-3 and 2-rank FSDP2 run
# end to end in tests/test_sharded.py; here the one-process cases and an FSDP2 DTensor on a 1-rank mesh.
# --------------------------------------------------------------------------------------------------


def _tiny_lm(tie: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=tie)
    return Qwen3ForCausalLM(config)


def _kl_and_head_grad(model, teacher, ids, seen: list | None = None):
    """Forward KL's value and the student head's gradient, the loss run inside the model's own forward as
    the trainers run it (TRL's forward redirection): FSDP2's hooks unshard and reshard around it."""
    from trl.models.utils import _ForwardRedirection

    from sdd.agreement import last_hidden_states
    from sdd.models import head_for_loss

    def loss(student):
        from sdd.models import is_dtensor

        if seen is not None:
            seen.append(is_dtensor(student.get_output_embeddings().weight))
        attention = torch.ones_like(ids)
        h_s = last_hidden_states(student, ids, attention)[0]
        with torch.no_grad():
            h_t = last_hidden_states(teacher, ids, attention)[0]
        with head_for_loss(student, trainable=True) as head_s, head_for_loss(teacher, trainable=False) as head_t:
            divergence, _ = token_divergence(h_s, head_s, h_t, head_t, beta=1.0, vocab_size=37)  # 3 padding rows
        return divergence.sum()

    model.zero_grad()
    value = _ForwardRedirection()(model, model, loss, model)
    value.backward()
    grad = model.get_output_embeddings().weight.grad
    return float(value.detach()), (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).clone()


def test_head_for_loss_is_the_parameter_itself_without_an_engine():
    from sdd.models import head_for_loss, whole_models

    model, teacher = _tiny_lm(tie=True), _tiny_lm(tie=False)
    with head_for_loss(model, trainable=True) as head:
        assert head is model.get_output_embeddings().weight
    with whole_models(model, teacher):  # nothing to gather: a no-op
        pass
    value, grad = _kl_and_head_grad(model, teacher, torch.randint(0, 37, (1, 9)))
    assert value > 0 and grad[:37].abs().sum() > 0 and grad[37:].abs().sum() == 0  # padding rows get none


def test_head_for_loss_gathers_an_fsdp2_dtensor_and_the_gradient_reaches_the_shard(tmp_path):
    """fully_shard on a 1-rank gloo mesh: the head is a DTensor; the loss and the head's gradient equal
    the unsharded model's (the gradient flows back through full_tensor into the DTensor parameter)."""
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sdd.models import is_dtensor

    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model, teacher = _tiny_lm(tie=False), _tiny_lm(tie=True)
        ids = torch.randint(0, 37, (1, 9))
        expected_value, expected_grad = _kl_and_head_grad(copy.deepcopy(model), teacher, ids)
        mesh = init_device_mesh("cpu", (1,))
        fully_shard(model.lm_head, mesh=mesh)  # its own unit: still a DTensor while the root's forward runs
        fully_shard(model, mesh=mesh)
        assert is_dtensor(model.get_output_embeddings().weight)
        seen: list = []
        value, grad = _kl_and_head_grad(model, teacher, ids, seen)
        assert seen == [True]  # the loss met a DTensor head: head_for_loss's full_tensor() path ran
        assert value == pytest.approx(expected_value, rel=1e-6)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    finally:
        dist.destroy_process_group()
