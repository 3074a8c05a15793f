"""One generation layer for eval, warmup's teacher sampling, the GRPO difficulty gate and analysis.

Generation is the cost of every stage, so every caller goes through here and gets the same speed and the
same sampling semantics. Training stages do not: they use TRL's own rollout loop, configured with
`trainer_generation_options(backend)`.

Public API::

    @dataclass(frozen=True)
    class SamplingParams:
        n: int = 1                 # samples per prompt
        temperature: float = SAMPLING.temperature  # 0 -> greedy
        top_p: float = SAMPLING.top_p              # 1.0 -> off
        top_k: int = SAMPLING.top_k                # 0 or -1 -> off
        max_new_tokens: int = 1024
        min_new_tokens: int = 0    # stop tokens are masked out before this many tokens (vLLM's min_tokens)
        seed: int = 0

    @dataclass
    class Completion:
        text: str                  # decoded with skip_special_tokens=True
        token_ids: list[int]       # generated ids, no padding, ending with the stop token if it stopped
        finish_reason: str         # "stop" (EOS / a stop token) or "length"

    generate(model, tokenizer, prompts: list[str], params: SamplingParams, *, backend="hf",
             batch_size: int | None = None, progress: Callable[[int], None] | None = None,
             hf_mode: str = "auto", prompt_indices: Sequence[int] | None = None,
             vllm: VllmSettings | None = None) -> list[list[Completion]]
    trainer_generation_options(backend: str) -> dict
    vllm_sampling_kwargs(params: SamplingParams, prompt_index: int) -> dict
    VllmSettings(tensor_parallel_size=1, gpu_memory_utilization=0.9, max_model_len=None)
    release_vllm() -> None          # frees the cached engine and its GPU memory
    Ranks.current() -> Ranks        # this process's rank, rank count and device under a launcher
    ready_for_generation(model, device)   # context: the model on `device`, ZeRO-3 parameters gathered
    auto_batch_size(model, prompt_tokens: int, new_tokens: int) -> int
    sample_tokens(logits_BV, row_keys_B, step, temperature, top_k, top_p) -> token ids (B,)

`generate` takes prompts already rendered with the chat template (tokenized with add_special_tokens=False)
and returns, for each prompt in input order, its `n` completions. `model` is a loaded `PreTrainedModel`
for backend "hf" and a local path or hub id for "vllm". Prompt i's random numbers come from its index
`prompt_indices[i]` (default: i), so a rank that samples a slice of a larger prompt list passes the
slice's indices in that list and draws exactly what one process sampling the whole list would.

Data-parallel sampling (warmup's teacher samples, the GRPO gate) splits prompts across the ranks of a
launcher with `Ranks`; each rank generates on its own device. Under DeepSpeed ZeRO-3, transformers
loads a model already partitioned (every rank holds a 0-element shard of each weight), and a forward
outside the DeepSpeed engine fails; `ready_for_generation` gathers the full weights on every rank for
the duration (a collective: every rank must enter it) and partitions them again on exit.

Backend "hf" is transformers' `generate`, made fast rather than replaced:

* rows (prompt, sample) are sorted by prompt length, longest first, and cut into batches of similar
  length (length bucketing), left padded; results are put back in input order;
* each row stops at its own stop token: the ids of `model.generation_config.eos_token_id` (int or list)
  plus `tokenizer.eos_token_id`; finished rows are padded by `generate` and cut here;
* `batch_size=None` picks the largest batch the free CUDA memory holds for the KV cache (capped at
  256 rows), or 64 rows on CPU (`auto_batch_size`);
* `hf_mode="auto"` means, on CUDA with a model that supports it, a static KV cache and
  `torch.compile` with CUDA graphs (transformers' `cache_implementation="static"` + `CompileConfig`), and
  transformers' default dynamic cache elsewhere: on CPU at toy size no mode was measurably faster and
  compiling costs 5-40 s (docs/benchmarks-rollout.md). "dynamic", "static" (static cache, eager) and
  "compiled" force a mode. Compiling costs tens of seconds on the first call per model and batch
  shape; later calls in the process reuse it. To keep the shapes few, the static path runs every batch
  of a call at the same row count, a power of two (the last batch is filled up with copies of a real
  row, whose outputs are dropped: at small batches a decode step costs the same with more rows), and
  rounds prompt widths up to 64 tokens.

Determinism. Sampling does not use torch's global RNG: a logits processor draws Gumbel noise from a
counter-based hash of (seed, prompt index, sample index, decode step, token id) and hands `generate` a
one-hot row, which greedy decoding then follows. Hence:

* the same seed gives the same samples, run after run, on any machine;
* the random numbers of prompt i, sample j do not depend on the batch size, the batch's other rows or
  the device (the noise is integer arithmetic; `benchmarks/rollout.py --check` compares CUDA with CPU);
* the samples themselves are batch-independent as far as the logits are: batched and unbatched
  forward passes may differ in the last bits (padding, kernel choice, bf16), and a near-tie between two
  candidates can then flip. On fp32 CPU with a small model they matched exactly in our tests.

Sampling semantics match vLLM's (and TRL's rollouts): temperature scales the logits, then top-k keeps
the k most likely tokens, then top-p keeps the smallest set of those whose probability mass reaches
top_p; temperature 0 is greedy (argmax) and returns n copies of one decode.

Backend "vllm" is vLLM's offline engine (`vllm.LLM`), imported lazily and cached per model path and
`VllmSettings` (tensor parallel size, GPU memory share, maximum model length). Prompt i is submitted as
token ids with `vllm_sampling_kwargs(params, prompt_indices[i])`: same meaning of every option, a seed
derived from (seed, index). vLLM's samples are reproducible run to run but are not the same tokens as
the "hf" backend's; only their distribution is shared. Under a launcher with several ranks the engine
uses vLLM's "external_launcher" executor (as TRL's colocate mode does): each group of
`tensor_parallel_size` consecutive ranks runs one engine and must submit the same prompts. A caller
that trains afterwards calls `release_vllm()` first, so the engine's memory (by default 90% of the
GPU) is free for training. vLLM is not installed where sdd's tests run: this backend's option checks
are tested, its generation is not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import CompileConfig, GenerationConfig, LogitsProcessor, LogitsProcessorList

from sdd.errors import SddError
from sdd.samples import SAMPLING

BACKENDS = ("hf", "vllm")
HF_MODES = ("auto", "dynamic", "static", "compiled")

# CPU decoding is compute bound well before 64 rows at the sizes sdd runs on CPU (tests, toy runs).
CPU_BATCH_ROWS = 64
# Beyond a few hundred rows a small model's decode step stops being bound by reading the weights, so
# larger batches add memory pressure and little throughput.
CUDA_MAX_BATCH_ROWS = 256
# Share of the free CUDA memory the KV cache and activations may take; the rest covers compile
# workspaces, CUDA graph pools and allocator fragmentation.
CUDA_MEMORY_FRACTION = 0.5
# Prompt widths on the static-cache path are rounded up to this, so batches share cache shapes.
STATIC_WIDTH_MULTIPLE = 64

# TRL generates with disable_compile=True, so its only speed option is a static cache run eagerly. On
# CPU at toy size that was not measurably faster than TRL's default dynamic cache, and it has not been
# measured on a GPU yet (benchmarks/rollout.py --settings untuned,trl-static does), so training keeps
# TRL's default.
_TRAINER_HF_CACHE_IMPLEMENTATION: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    """How to sample; the same meaning on every backend (see the module docstring)."""

    n: int = 1
    temperature: float = SAMPLING.temperature
    top_p: float = SAMPLING.top_p
    top_k: int = SAMPLING.top_k
    max_new_tokens: int = 1024
    min_new_tokens: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.n < 1:
            raise SddError(f"n must be at least 1, got {self.n}")
        if self.temperature < 0:
            raise SddError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SddError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise SddError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise SddError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One sampled continuation; token_ids end with the stop token when finish_reason is "stop"."""

    text: str
    token_ids: list[int]
    finish_reason: str


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    params: SamplingParams,
    *,
    backend: str = "hf",
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    hf_mode: str = "auto",
    prompt_indices: Sequence[int] | None = None,
    vllm: VllmSettings | None = None,
) -> list[list[Completion]]:
    """Sample `params.n` completions for each rendered prompt; see the module docstring for guarantees.

    `progress(k)` is called with the number of completions just finished (per batch on "hf", per chunk
    of requests on "vllm"), so a caller can drive a progress bar over len(prompts) * n.
    `prompt_indices[i]` is the index prompt i's random numbers are drawn for (default i).
    """
    indices = list(range(len(prompts))) if prompt_indices is None else list(prompt_indices)
    if len(indices) != len(prompts):
        raise SddError(f"prompt_indices has {len(indices)} entries for {len(prompts)} prompts")
    if backend == "hf":
        return _generate_hf(model, tokenizer, list(prompts), params, batch_size, progress, hf_mode, indices)
    if backend == "vllm":
        return _generate_vllm(model, tokenizer, list(prompts), params, progress, indices, vllm or VllmSettings())
    raise SddError(f"unknown generation backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def trainer_generation_options(backend: str) -> dict:
    """TRL config fields (valid for both GRPOConfig and DistillationConfig) that pick `backend` in training.

    Training keeps TRL's own rollout loop: it must generate with the weights being trained, sync them
    into vLLM, and compute the importance-sampling corrections; re-implementing that is not worth it.
    """
    if backend == "hf":
        return {"use_vllm": False, "cache_implementation": _TRAINER_HF_CACHE_IMPLEMENTATION}
    if backend == "vllm":
        return {"use_vllm": True, "vllm_mode": "colocate"}
    raise SddError(f"unknown generation backend {backend!r}; choose one of {', '.join(BACKENDS)}")


# --------------------------------------------------------------------------------------------------
# Counter-based randomness: splitmix64 over (row key, step, token id).
#
# torch has no per-row generators that are cheap on CUDA (one kernel launch per row per step), so the
# random numbers are a pure function of integers instead, computed for all rows at once in int64
# arithmetic, which wraps modulo 2**64: tests/test_generation.py checks it against Python on CPU,
# `benchmarks/rollout.py --check` compares CUDA with CPU.

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX_1 = 0xBF58476D1CE4E5B9
_MIX_2 = 0x94D049BB133111EB
_TOKEN_BITS = 24  # token ids below 2**24; the step fills the bits above
_NOISE_BITS = 23  # k + 0.5 for k < 2**23 needs 24 significant bits: exact in float32


def _mix64(value: int) -> int:
    """splitmix64's finalizer on a Python int, modulo 2**64."""
    value &= _MASK64
    value = ((value ^ (value >> 30)) * _MIX_1) & _MASK64
    value = ((value ^ (value >> 27)) * _MIX_2) & _MASK64
    return value ^ (value >> 31)


def _as_int64(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned `value`."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right_logical(values: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; masking off the copied sign bits makes it logical.
    return (values >> bits) & ((1 << (64 - bits)) - 1)


def _mix64_tensor(values: torch.Tensor) -> torch.Tensor:
    values = (values ^ _shift_right_logical(values, 30)) * _as_int64(_MIX_1)
    values = (values ^ _shift_right_logical(values, 27)) * _as_int64(_MIX_2)
    return values ^ _shift_right_logical(values, 31)


def row_key(seed: int, prompt_index: int, sample_index: int) -> int:
    """The 64-bit key that alone decides the random numbers of one (prompt, sample) row."""
    return _mix64(_mix64(_mix64(seed) ^ prompt_index) ^ sample_index)


def uniform_noise(row_keys_B: torch.Tensor, step: int, token_ids_BC: torch.Tensor) -> torch.Tensor:
    """Uniform floats in (0, 1), one per (row, token), a pure function of (row key, step, token id).

    `row_keys_B` holds `row_key` values as int64 (`_as_int64`). The top 23 bits of splitmix64's output
    become (bits + 0.5) / 2**23, which float32 represents exactly, so every device computes the same float.
    """
    counters_BC = (step << _TOKEN_BITS) + token_ids_BC.to(torch.int64)
    states_BC = row_keys_B[:, None] + counters_BC * _as_int64(_GOLDEN_GAMMA)
    top_bits_BC = _shift_right_logical(_mix64_tensor(states_BC), 64 - _NOISE_BITS)
    return (top_bits_BC.to(torch.float32) + 0.5) * (2.0**-_NOISE_BITS)


def filter_candidates(
    logits_BV: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, then top-k, then top-p, as vLLM and transformers' warpers apply them.

    Returns (scaled logits of the candidates with -inf where top-p dropped one, their token ids), both
    (B, C) and sorted most likely first. Working on the k candidates instead of the whole vocabulary
    keeps the per-step cost small at 150k-token vocabularies.
    """
    vocab_size = logits_BV.shape[-1]
    if 0 < top_k < vocab_size:
        candidate_logits_BC, candidate_ids_BC = logits_BV.topk(top_k, dim=-1)
    elif top_p < 1.0:
        candidate_logits_BC, candidate_ids_BC = logits_BV.sort(dim=-1, descending=True)
    else:
        candidate_logits_BC = logits_BV
        candidate_ids_BC = torch.arange(vocab_size, device=logits_BV.device).expand_as(logits_BV)
    scaled_BC = candidate_logits_BC / temperature
    if top_p < 1.0:
        # A token is dropped when it and every less likely token together hold at most 1 - top_p of the
        # mass (transformers' TopPLogitsWarper and vLLM compute the same ascending cumulative sum).
        probs_BC = scaled_BC.softmax(dim=-1)
        mass_up_to_BC = probs_BC.flip(-1).cumsum(dim=-1).flip(-1)
        dropped_BC = mass_up_to_BC <= 1 - top_p
        dropped_BC[:, 0] = False
        scaled_BC = scaled_BC.masked_fill(dropped_BC, -math.inf)
    return scaled_BC, candidate_ids_BC


def sample_tokens(
    logits_BV: torch.Tensor, row_keys_B: torch.Tensor, step: int, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """One token per row, drawn from the filtered softmax by Gumbel-max with the counter-based noise."""
    scaled_BC, candidate_ids_BC = filter_candidates(logits_BV.float(), temperature, top_k, top_p)
    gumbel_BC = -torch.log(-torch.log(uniform_noise(row_keys_B, step, candidate_ids_BC)))
    choice_B = (scaled_BC + gumbel_BC).argmax(dim=-1, keepdim=True)
    return candidate_ids_BC.gather(-1, choice_B).squeeze(-1)


class _CounterSampler(LogitsProcessor):
    """Samples inside `generate` and returns a one-hot row that greedy decoding then picks.

    This keeps transformers' loop (cache, stopping, compile) and replaces only the draw: transformers'
    own sampling uses the global RNG, whose stream depends on the batch's size and composition.
    """

    def __init__(self, row_keys_B: torch.Tensor, prompt_width: int, params: SamplingParams):
        self.row_keys_B = row_keys_B
        self.prompt_width = prompt_width
        self.params = params

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_width
        p = self.params
        tokens_B = sample_tokens(scores, self.row_keys_B, step, p.temperature, p.top_k, p.top_p)
        one_hot = torch.full_like(scores, -math.inf)
        return one_hot.scatter_(-1, tokens_B[:, None], 0.0)


# --------------------------------------------------------------------------------------------------
# hf backend


def auto_batch_size(model, prompt_tokens: int, new_tokens: int) -> int:
    """Rows per batch: as many as the free CUDA memory holds (KV cache, prefill activations, logits).

    CPU gets a fixed `CPU_BATCH_ROWS`. The estimate is per row: the KV cache for prompt + new tokens,
    the prefill activations of the MLP, and fp32 logits with the sampler's temporaries.
    """
    if model.device.type != "cuda":
        return CPU_BATCH_ROWS
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dtype_bytes = model.dtype.itemsize
    kv_bytes_per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes
    prefill_bytes_per_token = (3 * config.intermediate_size + 8 * config.hidden_size) * dtype_bytes
    logits_bytes = 8 * config.vocab_size * 4
    bytes_per_row = (
        kv_bytes_per_token * (prompt_tokens + new_tokens)
        + prefill_bytes_per_token * prompt_tokens
        + logits_bytes
    )
    free_bytes, _ = torch.cuda.mem_get_info(model.device)
    rows = int(CUDA_MEMORY_FRACTION * free_bytes // bytes_per_row)
    rows = max(1, min(rows, CUDA_MAX_BATCH_ROWS))
    return rows - rows % 8 if rows >= 8 else rows


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the generation config's eos ids (int or list) and the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = []
    elif isinstance(configured, int):
        configured = [configured]
    ids = set(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _resolve_hf_mode(model, hf_mode: str) -> str:
    if hf_mode not in HF_MODES:
        raise SddError(f"unknown hf_mode {hf_mode!r}; choose one of {', '.join(HF_MODES)}")
    if hf_mode != "auto":
        return hf_mode
    if model.device.type == "cuda" and getattr(model, "_can_compile_fullgraph", False):
        return "compiled"
    return "dynamic"


def _plan_rows(prompt_lengths: Sequence[int], samples_per_prompt: int) -> list[tuple[int, int]]:
    """(prompt index, sample index) rows, longest prompt first, so neighbours in a batch have similar lengths.

    Longest first also makes the first batch the one with the largest static cache, whose size
    transformers (5.23) keeps for the shorter ones instead of recompiling, and surfaces an out-of-memory
    error before any work is wasted.
    """
    rows = [(i, j) for i in range(len(prompt_lengths)) for j in range(samples_per_prompt)]
    return sorted(rows, key=lambda row: (-prompt_lengths[row[0]], row))


def _to_completion(token_ids: list[int], stop_ids: set[int]) -> tuple[list[int], str]:
    """Cut a generated row after its first stop token; padding only ever follows one."""
    for position, token_id in enumerate(token_ids):
        if token_id in stop_ids:
            return token_ids[: position + 1], "stop"
    return token_ids, "length"


def _generate_hf(model, tokenizer, prompts, params, batch_size, progress, hf_mode, prompt_indices):
    mode = _resolve_hf_mode(model, hf_mode)
    if not prompts:
        return []
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    if any(len(ids) == 0 for ids in prompt_ids):
        raise SddError("a prompt tokenized to zero tokens; render it with the chat template first")
    vocab_size = model.get_output_embeddings().weight.shape[0]
    if vocab_size >= 1 << _TOKEN_BITS:
        raise SddError(f"vocabulary of {vocab_size} tokens is larger than the sampler supports (2**24)")

    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
    samples_per_prompt = 1 if params.greedy else params.n
    prompt_lengths = [len(ids) for ids in prompt_ids]
    rows = _plan_rows(prompt_lengths, samples_per_prompt)
    static = mode in ("static", "compiled")
    if batch_size is None:
        batch_size = auto_batch_size(model, max(prompt_lengths), params.max_new_tokens)
    if static:
        batch_size = max(1, min(batch_size, 1 << (len(rows) - 1).bit_length()))
    else:
        batch_size = max(1, min(batch_size, len(rows)))

    generation_config = GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        min_new_tokens=params.min_new_tokens,
        do_sample=False,  # the draw happens in _CounterSampler; greedy follows its one-hot row
        # Neutral values so that the model's own generation_config (e.g. Qwen's sampling defaults or a
        # repetition penalty) cannot add processors behind our back.
        temperature=1.0,
        top_p=1.0,
        top_k=50,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_return_sequences=1,
        eos_token_id=stop_ids or None,
        pad_token_id=pad_id,
        cache_implementation="static" if static else None,
        compile_config=CompileConfig(dynamic=False) if mode == "compiled" else None,
        disable_compile=mode != "compiled",
    )
    if mode == "compiled" and model.device.type != "cuda":
        generation_config.compile_config._compile_all_devices = True

    completions: dict[tuple[int, int], Completion] = {}
    stop_set = set(stop_ids)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            batch_rows = rows[start : start + batch_size]
            # Static shapes: every batch has batch_size rows; fillers repeat the last row and are dropped.
            padded_rows = (
                batch_rows + [batch_rows[-1]] * (batch_size - len(batch_rows)) if static else batch_rows
            )
            width = max(prompt_lengths[i] for i, _ in padded_rows)
            if static:
                width = -(-width // STATIC_WIDTH_MULTIPLE) * STATIC_WIDTH_MULTIPLE
            input_ids = torch.full((len(padded_rows), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(padded_rows), width), dtype=torch.long)
            for row_index, (i, _) in enumerate(padded_rows):
                length = prompt_lengths[i]
                input_ids[row_index, width - length :] = torch.tensor(prompt_ids[i])
                attention_mask[row_index, width - length :] = 1
            processors = None
            if not params.greedy:
                keys_B = torch.tensor(
                    [_as_int64(row_key(params.seed, prompt_indices[i], j)) for i, j in padded_rows], dtype=torch.int64
                )
                processors = LogitsProcessorList([_CounterSampler(keys_B.to(model.device), width, params)])
            sequences = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                generation_config=generation_config,
                logits_processor=processors,
            )
            new_ids = sequences[: len(batch_rows), width:].tolist()
            cut = [_to_completion(ids, stop_set) for ids in new_ids]
            texts = tokenizer.batch_decode([ids for ids, _ in cut], skip_special_tokens=True)
            for row, (ids, reason), text in zip(batch_rows, cut, texts, strict=True):
                completions[row] = Completion(text=text, token_ids=ids, finish_reason=reason)
            if progress is not None:
                progress(len(batch_rows) * (params.n if params.greedy else 1))
    finally:
        model.train(was_training)

    if params.greedy:
        return [[_copy(completions[(i, 0)]) for _ in range(params.n)] for i in range(len(prompts))]
    return [[completions[(i, j)] for j in range(params.n)] for i in range(len(prompts))]


def _copy(completion: Completion) -> Completion:
    return dataclasses.replace(completion, token_ids=list(completion.token_ids))


# --------------------------------------------------------------------------------------------------
# vllm backend

# Requests per vllm.LLM.generate call: large enough to keep vLLM's scheduler full, small enough for
# progress to move during a long eval.
VLLM_REQUESTS_PER_CALL = 512


def vllm_sampling_kwargs(params: SamplingParams, prompt_index: int) -> dict:
    """Keyword arguments of `vllm.SamplingParams` for prompt `prompt_index`, meaning what `params` means.

    Greedy asks for one sample (vLLM rejects n > 1 at temperature 0 in some versions; the caller copies
    it n times). The per-request seed is derived from (seed, prompt index), so a prompt's samples do not
    depend on which other prompts share the call.
    """
    greedy = params.greedy
    return {
        "n": 1 if greedy else params.n,
        "temperature": 0.0 if greedy else params.temperature,
        "top_p": 1.0 if greedy else params.top_p,
        "top_k": -1 if greedy or params.top_k <= 0 else params.top_k,
        "max_tokens": params.max_new_tokens,
        "min_tokens": params.min_new_tokens,
        "seed": row_key(params.seed, prompt_index, 0) >> 1,  # 63 bits: torch.Generator takes it
        "skip_special_tokens": True,
    }


@dataclass(frozen=True)
class VllmSettings:
    """How the vLLM engine is built: the options a large model needs, with vLLM's names.

    `gpu_memory_utilization` is the share of the whole GPU vLLM takes for weights and KV cache; at
    vLLM's 0.9 nothing else may hold GPU memory while the engine lives, so sdd loads no HF model onto
    the GPU before a vLLM sampling pass and releases the engine (`release_vllm`) before training.
    `max_model_len` caps prompt + completion tokens (vLLM otherwise sizes for the model's full
    context, which may not fit the KV cache). Under a launcher, `tensor_parallel_size` must divide the
    number of ranks.
    """

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None

    def __post_init__(self):
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise SddError(f"vllm_tensor_parallel_size must be a whole number >= 1, got {self.tensor_parallel_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise SddError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise SddError(f"vllm_max_model_length must be a whole number >= 1 or unset, got {self.max_model_len}")

    def check_fits(self, prompt_tokens: int, new_tokens: int) -> None:
        """Refuse before loading anything when a prompt plus its completion cannot fit `max_model_len`."""
        if self.max_model_len is not None and prompt_tokens + new_tokens > self.max_model_len:
            raise SddError(f"the longest prompt ({prompt_tokens} tokens) plus max_new_tokens ({new_tokens}) exceeds "
                           f"vllm_max_model_length ({self.max_model_len}); raise it or lower max_new_tokens")

    def engine_kwargs(self, model_path: str, seed: int, ranks: Ranks) -> dict:
        """Keyword arguments of `vllm.LLM` for this process.

        Under a launcher (several ranks) each group of `tensor_parallel_size` consecutive ranks runs one
        engine through vLLM's "external_launcher" executor, which reuses the launcher's processes instead
        of spawning its own; the ranks of a group share a seed (TRL's colocate mode does the same).
        """
        kwargs = {"model": model_path, "seed": seed, "tensor_parallel_size": self.tensor_parallel_size,
                  "gpu_memory_utilization": self.gpu_memory_utilization, "max_model_len": self.max_model_len}
        if ranks.count > 1:
            if ranks.count % self.tensor_parallel_size:
                raise SddError(f"vllm_tensor_parallel_size ({self.tensor_parallel_size}) must divide the number of "
                               f"processes ({ranks.count})")
            kwargs.update(distributed_executor_backend="external_launcher",
                          seed=seed + ranks.index // self.tensor_parallel_size)
        return kwargs

    def groups(self, ranks: Ranks) -> tuple[int, int, bool]:
        """(this rank's engine group, number of groups, whether this rank writes the group's results)."""
        if ranks.count == 1:
            return 0, 1, True
        if ranks.count % self.tensor_parallel_size:
            raise SddError(f"vllm_tensor_parallel_size ({self.tensor_parallel_size}) must divide the number of "
                           f"processes ({ranks.count})")
        size = self.tensor_parallel_size
        return ranks.index // size, ranks.count // size, ranks.index % size == 0


def _import_vllm():
    if importlib.util.find_spec("vllm") is None:
        raise SddError("--backend vllm needs vLLM: pip install vllm")
    import vllm

    return vllm


_VLLM_ENGINE: dict = {}  # at most one engine per process: (key, engine)


def _vllm_engine(model_path: str, settings: VllmSettings):
    """One engine per process: building it loads weights and captures CUDA graphs (tens of seconds).

    Asking for another model or other settings releases the old engine first: two would not fit. The
    engine's own seed is fixed: every request carries its seed (`vllm_sampling_kwargs`), so callers that
    change the sampling seed per chunk (warmup) reuse one engine.
    """
    ranks = Ranks.current()
    kwargs = settings.engine_kwargs(model_path, 0, ranks)
    key = repr(sorted(kwargs.items()))
    if _VLLM_ENGINE.get("key") == key:
        return _VLLM_ENGINE["engine"]
    release_vllm()
    vllm = _import_vllm()
    if ranks.count > 1:  # external_launcher reads the launcher's rendezvous from the environment
        os.environ.setdefault("LOCAL_RANK", str(ranks.local_index))
    engine = vllm.LLM(**kwargs)
    _VLLM_ENGINE.update(key=key, engine=engine)
    return engine


def release_vllm() -> None:
    """Drop the cached engine and return its GPU memory, so training can use it.

    vLLM holds `gpu_memory_utilization` of the GPU until its engine is garbage collected. Its
    model-parallel groups are destroyed too; the launcher's own process group is left alone (the
    trainer needs it). Not exercised by the test suite: vLLM is not installed there.
    """
    engine = _VLLM_ENGINE.pop("engine", None)
    _VLLM_ENGINE.pop("key", None)
    if engine is None:
        return
    del engine
    with contextlib.suppress(Exception):  # the module moved between vLLM versions; freeing memory is what matters
        from vllm.distributed.parallel_state import destroy_model_parallel

        destroy_model_parallel()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _generate_vllm(model, tokenizer, prompts, params, progress, prompt_indices, settings: VllmSettings):
    if not isinstance(model, str):
        raise SddError("--backend vllm takes the model as a path or hub id, not a loaded model")
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    settings.check_fits(max((len(ids) for ids in prompt_ids), default=0), params.max_new_tokens)
    vllm = _import_vllm()
    engine = _vllm_engine(model, settings)
    results: list[list[Completion]] = []
    for start in range(0, len(prompts), VLLM_REQUESTS_PER_CALL):
        indices = range(start, min(start + VLLM_REQUESTS_PER_CALL, len(prompts)))
        requests = [{"prompt_token_ids": prompt_ids[i]} for i in indices]
        sampling = [vllm.SamplingParams(**vllm_sampling_kwargs(params, prompt_indices[i])) for i in indices]
        outputs = engine.generate(requests, sampling_params=sampling, use_tqdm=False)
        for output in outputs:
            samples = [
                Completion(
                    text=tokenizer.decode(list(sample.token_ids), skip_special_tokens=True),
                    token_ids=list(sample.token_ids),
                    finish_reason="stop" if sample.finish_reason == "stop" else "length",
                )
                for sample in output.outputs
            ]
            if params.greedy:
                samples = [_copy(samples[0]) for _ in range(params.n)]
            results.append(samples)
        if progress is not None:
            progress(len(indices) * params.n)
    return results


# --------------------------------------------------------------------------------------------------
# data-parallel sampling


@dataclass(frozen=True)
class Ranks:
    """This process's place under a launcher: rank, number of ranks, and the device it owns.

    Read from accelerate's PartialState, which the launcher's environment configures (it sets each
    rank's CUDA device from LOCAL_RANK); without a launcher: rank 0 of 1 on the default device.
    """

    index: int = 0
    count: int = 1
    device: str = "cpu"
    local_index: int = 0

    @classmethod
    def current(cls) -> Ranks:
        from accelerate import PartialState

        state = PartialState()
        return cls(state.process_index, state.num_processes, str(state.device), state.local_process_index)

    def share(self, count: int) -> list[int]:
        """The positions in range(count) this rank handles: every `count`-th one from its own index."""
        return list(range(self.index, count, self.count))

    def all_gather(self, value):
        """Every rank's `value`, in rank order (a collective: every rank must call it)."""
        if self.count == 1:
            return [value]
        import torch.distributed as dist

        gathered: list = [None] * self.count
        dist.all_gather_object(gathered, value)
        return gathered


@contextlib.contextmanager
def ready_for_generation(model, device: str):
    """The model usable by `generate` on this rank: on `device`, with ZeRO-3 shards gathered if any.

    Gathering is a collective over the ranks (every rank must enter, each then holds the full weights
    until exit); leaving partitions the weights again without a collective. A model that is not
    partitioned is moved to `device` and stays there (the trainer would move it there anyway).
    """
    from sdd.models import is_zero3_partitioned, whole_models

    if any(is_zero3_partitioned(p) for p in model.parameters()):
        with whole_models(model):
            yield model
        return
    if model.device != torch.device(device):
        model.to(device)
    yield model
