"""Time and peak memory of one forward + backward of the token-level KL loss, three ways:

  sdd    `sdd.losses.token_divergence(impl="torch")`: chunks of tokens, full-vocabulary rows, recompute
  trl    `impl="trl"`: TRL's ChunkedDivergenceFunction (Triton on CUDA, torch tiles on CPU)
  naive  full (N, V) logits for both models, `.float()`, log_softmax, the formula; autograd keeps it all

Inputs are what a distillation step sees: student and teacher hidden states (N, H) and lm_head weights
(V, H); the student's hidden states and head get gradients, the teacher is frozen. The loss is the mean
over tokens of the divergence selected by --beta (TRL's convention; 1.0 = reverse KL, the default of
TRL's DistillationTrainer and sdd distill).

Peak memory: on CUDA the allocator's peak (total, and above what was allocated before the call: inputs
and weights); on CPU the process's peak RSS above its RSS before the call, read from VmHWM after
resetting it through /proc/self/clear_refs (Linux), else by polling RSS with psutil; glibc is told
to return freed memory to the OS so RSS follows live tensors.

    python benchmarks/kl_loss.py --device cpu --vocab 151936 --tokens 64,128,256,512 \\
        --student-hidden 256 --teacher-hidden 512 --dtype float32 --out cpu.md
    python benchmarks/kl_loss.py --device cuda --vocab 151936 --tokens 4096,8192,16384,32768 \\
        --student-hidden 2048 --teacher-hidden 4096 --dtype bfloat16 --out gpu.md
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import os
import platform
import shlex
import statistics
import sys
import threading
import time

import torch
import torch.nn.functional as F

from sdd.losses import token_divergence

METHODS = ("sdd", "trl", "naive")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def naive_divergence(
    student_hidden_NH, student_head_VH, teacher_hidden_NH, teacher_head_VH, *, beta, temperature
):
    """What a trainer computes without fusion: both models' logits in full, upcast, then the formula."""
    log_p_S = F.log_softmax((student_hidden_NH @ student_head_VH.T).float() / temperature, dim=-1)
    log_p_T = F.log_softmax((teacher_hidden_NH @ teacher_head_VH.T).float() / temperature, dim=-1)

    def kl(log_p, log_q):
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    if beta == 0.0:
        return kl(log_p_T, log_p_S)
    if beta == 1.0:
        return kl(log_p_S, log_p_T)
    log_m = torch.logaddexp(log_p_S + torch.tensor(1 - beta).log(), log_p_T + torch.tensor(beta).log())
    return beta * kl(log_p_T, log_m) + (1 - beta) * kl(log_p_S, log_m)


class PeakMemory:
    """Peak bytes during a block, total and above the bytes in use when it started."""

    def __init__(self, device: torch.device):
        self.device = device
        self.total = self.above_start = 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            _release_freed_memory_to_os()
            self.start = _rss()
            self._poller = None if _reset_peak_rss() else _RssPoller()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.total = torch.cuda.max_memory_allocated()
        else:
            self.total = self._poller.stop() if self._poller else _peak_rss()
        self.above_start = self.total - self.start
        return False


def _release_freed_memory_to_os() -> None:
    """Make RSS track live tensors on glibc: allocations above 128 KiB get their own mmap (returned on
    free; glibc otherwise raises that threshold after the first large free and keeps freed memory
    resident), and what the heap still holds is trimmed before each measurement."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_MMAP_THRESHOLD = -3
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    libc.malloc_trim(0)


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current RSS
        _proc_status_bytes("VmHWM")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    return _proc_status_bytes("VmHWM")


class _RssPoller:
    """Fallback without /proc/self/clear_refs: sample RSS every millisecond (torch releases the GIL)."""

    def __init__(self):
        self.peak, self._done = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._done.wait(0.001):
            self.peak = max(self.peak, _rss())

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self.peak, _rss())


def make_inputs(args, tokens: int, device: torch.device, dtype: torch.dtype):
    g = torch.Generator(device="cpu").manual_seed(tokens)

    def randn(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    # logits with a standard deviation of ~3: peaked but not one-hot distributions
    Hs, Ht, V = args.student_hidden, args.teacher_hidden, args.vocab
    return {
        "student_hidden_NH": randn(tokens, Hs, scale=1.0).requires_grad_(),
        "student_head_VH": randn(V, Hs, scale=3 / Hs**0.5).requires_grad_(),
        "teacher_hidden_NH": randn(tokens, Ht, scale=1.0),
        "teacher_head_VH": randn(V, Ht, scale=3 / Ht**0.5),
    }


def step(method: str, inputs: dict, args) -> float:
    """One forward + backward; returns the loss."""
    for tensor in inputs.values():
        tensor.grad = None
    if method == "naive":
        divergence_N = naive_divergence(**inputs, beta=args.beta, temperature=args.temperature)
    else:
        impl = "torch" if method == "sdd" else "trl"
        divergence_N, _ = token_divergence(**inputs, beta=args.beta, temperature=args.temperature, impl=impl)
    loss = divergence_N.mean()
    loss.backward()
    return loss.item()  # also synchronizes CUDA


def is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return (
        isinstance(error, RuntimeError) and "alloc" in str(error).lower() and "memory" in str(error).lower()
    )


def measure(method: str, inputs: dict, args, device: torch.device) -> dict:
    tokens = inputs["student_hidden_NH"].shape[0]
    if method == "naive" and device.type == "cpu":
        # Several fp32 (N, V) tensors live until backward; on CPU an overcommitted allocation is not an
        # exception but the OOM killer, so refuse up front instead of taking the machine down.
        need = 6 * tokens * args.vocab * 4  # measured: ~4.5 fp32 (N, V) tensors at peak
        if need > args.cpu_naive_limit_gb * 2**30:
            return {"status": f"skipped (needs ~{need / 2**30:.0f} GB)"}
    try:
        for _ in range(args.warmup):
            step(method, inputs, args)
        times, peaks, peaks_above = [], [], []
        for _ in range(args.repeats):
            with PeakMemory(device) as memory:
                start = time.perf_counter()
                loss = step(method, inputs, args)
                times.append(time.perf_counter() - start)
            peaks.append(memory.total)
            peaks_above.append(memory.above_start)
    except Exception as error:  # noqa: BLE001 - report OOM as a result, re-raise anything else
        if not is_oom(error):
            raise
        return {"status": "OOM"}
    finally:
        for tensor in inputs.values():
            tensor.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "status": "ok",
        "ms": 1000 * statistics.median(times),
        "peak_gb": max(peaks) / 1e9,
        "above_gb": max(peaks_above) / 1e9,
        "loss": loss,
    }


def trl_available() -> bool:
    try:
        import trl.kernels.chunked_divergence  # noqa: F401
    except ImportError:
        return False
    return True


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads"


def markdown(results: list[dict], args, device: torch.device) -> str:
    cuda = device.type == "cuda"
    lines = [
        f"Command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`  ",
        f"Device: {device_name(device)}; torch {torch.__version__}; "
        f"{datetime.date.today().isoformat()}; median of {args.repeats} after {args.warmup} warm-up",
        "",
        "| tokens | method | fwd+bwd (ms) | peak above inputs (GB) |"
        + (" peak total (GB) |" if cuda else "")
        + " loss |",
        "|---:|:---|---:|---:|" + ("---:|" if cuda else "") + "---:|",
    ]
    for row in results:
        if row["status"] == "ok":
            cells = [f"{row['ms']:.1f}", f"{row['above_gb']:.2f}"]
            cells += [f"{row['peak_gb']:.2f}"] if cuda else []
            cells += [f"{row['loss']:.6g}"]
        else:
            cells = [row["status"]] + ["—"] * (3 if cuda else 2)
        lines.append(f"| {row['tokens']:,} | {row['method']} | " + " | ".join(cells) + " |")
    by_tokens: dict[int, dict[str, dict]] = {}
    for row in results:
        by_tokens.setdefault(row["tokens"], {})[row["method"]] = row
    ratios = [
        f"{tokens:,}: {m['sdd']['ms'] / m['trl']['ms']:.2f}x time, {m['sdd']['above_gb'] / m['trl']['above_gb']:.2f}x memory"
        for tokens, m in by_tokens.items()
        if m.get("sdd", {}).get("status") == "ok" and m.get("trl", {}).get("status") == "ok"
    ]
    if ratios:
        lines += ["", "sdd / trl (peak above inputs): " + "; ".join(ratios)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--tokens", default="256,1024,4096", help="comma-separated token counts")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="bfloat16 on CUDA, float32 on CPU"
    )
    parser.add_argument("--student-hidden", type=int, default=2048)
    parser.add_argument("--teacher-hidden", type=int, default=4096)
    parser.add_argument("--beta", type=float, default=1.0, help="0 forward KL, 1 reverse KL, between: JSD")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-naive-limit-gb", type=float, default=8.0)
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--json", help="also write the rows as JSON here (benchmarks/gpu_check.py reads it)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    methods = args.methods.split(",")
    if "trl" in methods and not trl_available():
        print("trl is not importable: skipping the trl rows", file=sys.stderr)
        methods.remove("trl")

    results = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        inputs = make_inputs(args, tokens, device, dtype)
        for method in methods:
            row = {"tokens": tokens, "method": method, **measure(method, inputs, args, device)}
            results.append(row)
            print(row, file=sys.stderr, flush=True)
        del inputs
        gc.collect()

    table = markdown(results, args, device)
    print(table)
    if args.out:
        with open(args.out, "w") as out:
            out.write(table)
    if args.json:
        import json

        with open(args.json, "w") as out:
            json.dump({"device": device_name(device), "dtype": str(dtype), "vocab": args.vocab,
                       "student_hidden": args.student_hidden, "teacher_hidden": args.teacher_hidden,
                       "rows": results}, out, indent=1)


if __name__ == "__main__":
    main()
