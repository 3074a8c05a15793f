"""The environment a stage ran under, for its manifest record and for `sdd report`.

Two runs of one recipe with the same seeds give the same numbers only under the same library
versions, the same kernels and the same thread count. 2 threads instead of 1 (a matmul then sums in
another order), or torch's AVX2 kernels instead of AVX512 on the same CPU (`cpu_capability` here: torch
picks them by the instruction set it finds), each changed every weight of a 100-step toy run; a
library release can too, though transformers 5.23 -> 5.24 did not (docs/results.md). From a changed
low bit the sampled completions diverge. So every stage records what it ran under, and the report
says when the stages of one experiment did not all run under the same.
"""

from __future__ import annotations

import contextlib
import platform
from importlib import metadata

# Libraries whose version changes a result; None in the record where one is not installed.
PACKAGES = ("torch", "transformers", "trl", "accelerate", "datasets", "math-verify", "deepspeed")


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """{"python": ..., package: its installed version or None}."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        found[name] = None
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform module knows."""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpu_model() -> str | None:
    """"<count> x <name>" of the visible CUDA devices, None without any."""
    import torch

    if not torch.cuda.is_available():
        return None
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return ", ".join(f"{names.count(name)} x {name}" for name in dict.fromkeys(names))


def capture() -> dict:
    """What this process computes with: versions, processors and torch's CPU kernels, thread count, determinism, OS."""
    import torch

    return {
        "versions": versions(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": gpu_model(),
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "platform": platform.platform(),
    }


def describe(environment: dict) -> str:
    """One line for people: versions, the processor (with its kernel set on a CPU), threads."""
    names = ", ".join(f"{name} {version}" for name, version in (environment.get("versions") or {}).items() if version)
    device = environment.get("gpu") or environment.get("cpu") or "unknown processor"
    if not environment.get("gpu") and environment.get("cpu_capability"):
        device += f" ({environment['cpu_capability']} kernels)"
    threads = environment.get("threads")
    return f"{names}; {device}; {threads} thread{'s' if threads != 1 else ''}; {environment.get('platform', '')}"


def differences(by_stage: dict[str, dict]) -> dict[str, dict[str, list[str]]]:
    """{key: {value: [stages]}} for every environment key on which the stages disagree.

    Keys are flat ("versions.trl", "cpu", "threads"); a stage recorded before environments were
    recorded (no entry) is left out rather than counted as different.
    """
    flat: dict[str, dict[str, str]] = {}
    for stage, environment in by_stage.items():
        if not environment:
            continue
        for key, value in environment.items():
            if isinstance(value, dict):
                for inner, inner_value in value.items():
                    flat.setdefault(f"{key}.{inner}", {})[stage] = str(inner_value)
            else:
                flat.setdefault(key, {})[stage] = str(value)
    recorded = {stage for stage, environment in by_stage.items() if environment}
    out: dict[str, dict[str, list[str]]] = {}
    for key, values in flat.items():
        by_value: dict[str, list[str]] = {}
        for stage in sorted(recorded):
            by_value.setdefault(values.get(stage, "None"), []).append(stage)
        if len(by_value) > 1:
            out[key] = by_value
    return out
