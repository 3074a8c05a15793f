"""Rollout throughput: completion tokens per second per generation backend, against the bandwidth bound.

Decoding a small model at a small batch is bound by reading its weights once per step, so the
bound is batch / ((weight bytes + KV cache bytes read per step) / memory bandwidth). Every setting runs
the same random-weight model (real Qwen3 shapes; speed does not depend on the weights' values) on the
same prompts, with every completion forced to full length (min_new_tokens = max_new_tokens), so all
settings count the same tokens.

Settings:
  untuned       plain model.generate, dynamic cache, one batch (what a script writes first)
  hf            sdd.generation.generate, backend "hf", hf_mode auto (static cache + compile on CUDA)
  hf-dynamic    sdd's hf backend with the dynamic cache (no compile)
  hf-static     sdd's hf backend with a static cache, eager
  hf-compiled   sdd's hf backend with a static cache and torch.compile, also on CPU
  trl-static    plain model.generate with cache_implementation="static" and compile off, which is what
                TRL's rollout loop does when a config sets cache_implementation="static"
  vllm          sdd's vllm backend (skipped when vLLM is not installed)

    python benchmarks/rollout.py --shape qwen3-0.6b --settings untuned,hf
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import statistics
import sys
import tempfile
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from sdd.generation import SamplingParams, generate, sample_tokens, uniform_noise

SHAPES = {
    "toy": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=512,
    ),
    "qwen3-0.6b": dict(
        hidden_size=1024,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=3072,
        vocab_size=151_936,
    ),
    "qwen3-1.7b": dict(
        hidden_size=2048,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=6144,
        vocab_size=151_936,
    ),
}
SETTINGS = ("untuned", "hf", "hf-dynamic", "hf-static", "hf-compiled", "trl-static", "vllm")
PAD_ID, EOS_ID = 0, 1


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose every id is one whitespace-separated word, so prompts round-trip."""
    words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(2, vocab_size)]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def build_model(shape: str, device: str, dtype: torch.dtype) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        **SHAPES[shape], tie_word_embeddings=True, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype).eval()
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    return model


def build_prompts(count: int, min_tokens: int, max_tokens: int, vocab_size: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_tokens, max_tokens + 1, (count,), generator=generator).tolist()
    return [
        " ".join(f"w{i}" for i in torch.randint(2, vocab_size, (length,), generator=generator).tolist())
        for length in lengths
    ]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def untuned_generate(model, tokenizer, prompts, params: SamplingParams, **extra) -> int:
    """The first thing a script writes: one left-padded batch through model.generate, global-RNG sampling."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(model.device)
    with torch.no_grad():
        sequences = model.generate(
            **batch,
            do_sample=True,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens,
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
            **extra,
        )
    return sequences[:, batch["input_ids"].shape[1] :].numel()  # every row is full length (min_new_tokens)


def run_setting(setting, model, model_path, tokenizer, prompts, params) -> int:
    """Generate once with `setting`; returns the completion tokens produced."""
    if setting == "untuned":
        return untuned_generate(model, tokenizer, prompts, params)
    if setting == "trl-static":
        return untuned_generate(
            model, tokenizer, prompts, params, cache_implementation="static", disable_compile=True
        )
    if setting == "vllm":
        results = generate(model_path, tokenizer, prompts, params, backend="vllm")
    else:
        hf_mode = {"hf": "auto", "hf-dynamic": "dynamic", "hf-static": "static", "hf-compiled": "compiled"}[
            setting
        ]
        results = generate(model, tokenizer, prompts, params, hf_mode=hf_mode)
    return sum(len(c.token_ids) for samples in results for c in samples)


def timed(device: str, function, *args) -> tuple[int, float]:
    synchronize(device)
    start = time.perf_counter()
    result = function(*args)
    synchronize(device)
    return result, time.perf_counter() - start


def parameter_bytes(model) -> int:
    """Bytes of distinct parameters: a tied embedding is read once per step, as the lm_head."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def kv_bytes_per_token(model) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * model.dtype.itemsize


def checks(model, tokenizer, prompts, params, device) -> list[str]:
    """Facts the docs state about determinism and the sampler's cost, measured on this device."""
    lines = []
    keys = torch.randint(-(2**63), 2**63 - 1, (64,), dtype=torch.int64)
    ids = torch.randint(0, model.config.vocab_size, (64, 32))
    same_noise = torch.equal(
        uniform_noise(keys, 7, ids), uniform_noise(keys.to(device), 7, ids.to(device)).cpu()
    )
    lines.append(f"noise on {device} equals noise on cpu: {same_noise}")

    # The timed "hf" setting's decode (static cache + compile on CUDA, one batch) against a dynamic-cache
    # decode in batches of 5: same random numbers, different kernels, padding and neighbours.
    reference = generate(model, tokenizer, prompts, params, hf_mode="auto")
    other = generate(model, tokenizer, prompts, params, batch_size=5, hf_mode="dynamic")
    pairs = [
        (a.token_ids, b.token_ids)
        for row_a, row_b in zip(reference, other, strict=True)
        for a, b in zip(row_a, row_b, strict=True)
    ]
    same = sum(a == b for a, b in pairs)
    prefix = statistics.mean(
        next((k for k, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a)) for a, b in pairs
    )
    lines.append(
        f"hf auto in one batch vs hf dynamic in batches of 5 ({model.dtype}, {params.max_new_tokens} tokens): "
        f"{same}/{len(pairs)} completions identical, mean common prefix {prefix:.1f} tokens"
    )

    logits = torch.randn(len(prompts), model.config.vocab_size, device=device)
    row_keys = keys[: len(prompts)].to(device)
    for _ in range(3):
        sample_tokens(logits, row_keys, 0, params.temperature, params.top_k, params.top_p)
    synchronize(device)
    start = time.perf_counter()
    for step in range(100):
        sample_tokens(logits, row_keys, step, params.temperature, params.top_k, params.top_p)
    synchronize(device)
    lines.append(f"sampler: {(time.perf_counter() - start) * 10:.3f} ms per step at {tuple(logits.shape)}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default=None,
        help="default: bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument(
        "--settings", default="untuned,hf,vllm", help=f"comma-separated, from {', '.join(SETTINGS)}"
    )
    parser.add_argument("--batch", type=int, default=16, help="prompts, each sampled once: the batch")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", default="64-192", help="prompt lengths, uniform in MIN-MAX")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed rounds over all settings after each one's first (warm-up) call",
    )
    parser.add_argument(
        "--bandwidth-gbs", type=float, default=3350.0, help="memory bandwidth; H100 SXM: 3350"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--check", action="store_true", help="also print determinism and sampler-cost checks")
    parser.add_argument("--json", help="also write the figures as JSON here (benchmarks/gpu_check.py reads it)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    )
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings: {', '.join(sorted(unknown))}")
    min_prompt, max_prompt = (int(x) for x in args.prompt_tokens.split("-"))

    model = build_model(args.shape, args.device, dtype)
    tokenizer = build_tokenizer(model.config.vocab_size)
    prompts = build_prompts(args.batch, min_prompt, max_prompt, model.config.vocab_size, seed=0)
    params = SamplingParams(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, seed=0)
    model_path = None
    if "vllm" in settings and importlib.util.find_spec("vllm") is not None:
        model_path = tempfile.mkdtemp(prefix="sdd-rollout-")
        model.save_pretrained(model_path)
        tokenizer.save_pretrained(model_path)

    weight_bytes = parameter_bytes(model)
    mean_context = statistics.mean(len(p.split()) for p in prompts) + args.new_tokens / 2
    kv_bytes_per_step = args.batch * mean_context * kv_bytes_per_token(model)
    bandwidth = args.bandwidth_gbs * 1e9
    bound_weights = args.batch / (weight_bytes / bandwidth)
    bound_weights_kv = args.batch / ((weight_bytes + kv_bytes_per_step) / bandwidth)
    device_name = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else platform.processor() or "cpu"
    )
    print(
        f"# {datetime.date.today()} {device_name}, torch {torch.__version__}, "
        f"transformers {sys.modules['transformers'].__version__}, threads {torch.get_num_threads()}"
    )
    print(f"# {' '.join(sys.argv)}")
    print(
        f"# shape {args.shape}: {sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) / 1e6:.1f}M "
        f"params, {weight_bytes / 1e9:.3f} GB of weights ({dtype}); KV cache read per step at mean context "
        f"{mean_context:.0f}: {kv_bytes_per_step / 1e9:.3f} GB"
    )
    print(
        f"# bandwidth bound at {args.bandwidth_gbs:.0f} GB/s, batch {args.batch}: {bound_weights:,.0f} tok/s "
        f"(weights only), {bound_weights_kv:,.0f} tok/s (weights + KV)"
    )
    runnable, first_call_s, skipped = [], {}, {}
    for setting in settings:
        if setting == "vllm" and model_path is None:
            skipped[setting] = "not installed"
            continue
        try:
            first_call_s[setting] = timed(
                args.device, run_setting, setting, model, model_path, tokenizer, prompts, params
            )[1]
            runnable.append(setting)
        except Exception as error:  # one failing setting must not hide the others' numbers
            skipped[setting] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    # Rounds interleave the settings, so that load from other processes on a shared machine hits all alike;
    # the best round is the least disturbed one.
    rates: dict[str, list[float]] = {setting: [] for setting in runnable}
    for _ in range(args.repeats):
        for setting in runnable:
            tokens, seconds = timed(
                args.device, run_setting, setting, model, model_path, tokenizer, prompts, params
            )
            rates[setting].append(tokens / seconds)
    print(
        "| setting | completion tok/s, best (median) | ms / step (incl. prefill) | first call (s) | vs untuned "
        "| of bound (weights + KV) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    untuned_rate = max(rates["untuned"]) if "untuned" in rates else None
    for setting in settings:
        if setting in skipped:
            print(f"| {setting} | {skipped[setting]} | | | | |")
            continue
        rate = max(rates[setting])
        speedup = f"{rate / untuned_rate:.1f}x" if untuned_rate else ""
        print(
            f"| {setting} | {rate:,.0f} ({statistics.median(rates[setting]):,.0f}) | "
            f"{1000 * args.batch / rate:.2f} | {first_call_s[setting]:.1f} | {speedup} | "
            f"{100 * rate / bound_weights_kv:.2f}% |",
            flush=True,
        )
    check_lines = checks(model, tokenizer, prompts, params, args.device) if args.check else []
    for line in check_lines:
        print(f"# check: {line}", flush=True)
    if args.json:
        import json

        best = {setting: max(values) for setting, values in rates.items()}
        with open(args.json, "w") as out:
            json.dump({
                "device": device_name, "shape": args.shape, "dtype": str(dtype), "batch": args.batch,
                "new_tokens": args.new_tokens, "repeats": args.repeats, "weight_bytes": weight_bytes,
                "bound_tok_s": bound_weights_kv, "best_tok_s": best,
                "median_tok_s": {s: statistics.median(v) for s, v in rates.items()},
                "first_call_s": first_call_s, "skipped": skipped,
                "hf_over_untuned": best["hf"] / best["untuned"] if {"hf", "untuned"} <= best.keys() else None,
                "checks": check_lines,
            }, out, indent=1)


if __name__ == "__main__":
    main()
