"""Update sparsity, its rank and its overlap across seeds: what training changed in the weights.

The research sdd is built on claims that RL updates a sparse slice of the parameters (5-30%), the
same slice across seeds. These measures check it as pure functions over two (or four) checkpoint
directories; docs/analyze.md gives every definition.

Weights are read tensor by tensor from safetensors files with at most one shard of each checkpoint
open, and large tensors are compared in chunks: comparing two 8B checkpoints needs memory for one
shard and one tensor of each, never for two models. This module imports neither transformers nor
the generation stack, so a process that only compares weights stays small.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from sdd.errors import SddError

# Elements compared per step. The comparison works in float64 (exact for bf16/fp16/fp32 inputs and
# their differences) with ~8 temporaries per element, so a chunk costs a few MB whatever the tensor;
# larger chunks were slower on CPU (cache misses) and raised peak memory by tens of MB.
CHUNK_ELEMENTS = 1 << 16
# Matrices whose update gets an SVD. An 8B model has ~250 block matrices; an evenly spaced sample
# covers every depth and type at a cost of seconds per matrix rather than an hour for all of them.
RANK_MATRICES = 16

LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "norm", "embed",
               "lm_head", "other")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
}

SPARSITY_RULE = (
    "an entry changed iff after != before and |after - before| >= ulp_d(before) / 2, where "
    "ulp_d(x) = 2**(max(floor(log2|x|), e_min) - p) is the spacing of dtype d's numbers at |x| "
    "(p mantissa bits: bf16 7, fp16 10, fp32 23; e_min -126 for bf16/fp32, -14 for fp16; x = 0 uses e_min). "
    "'fraction' uses d = the coarser of the two stored dtypes of the tensor (so every change of a stored value "
    "counts); 'fraction_bf16' uses d = bf16 (changes a bf16 copy of the weights would not resolve do not count)"
)


# --------------------------------------------------------------------------------------------------
# Reading checkpoints.


def layer_type(name: str) -> str:
    """Which kind of parameter a tensor name holds (Llama/Qwen naming; anything else is 'other')."""
    lowered = name.lower()
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        if f"{kind}." in lowered or lowered.endswith(kind):
            return kind
    if "norm" in lowered:
        return "norm"
    if "embed" in lowered or "wte" in lowered or "wpe" in lowered:
        return "embed"
    if "lm_head" in lowered:
        return "lm_head"
    return "other"


def layer_index(name: str) -> int | None:
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def read_header(path: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape"}} of one safetensors file, from its JSON header alone (no data read)."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 2 <= length <= 100 << 20:
            raise SddError(f"{path} is not a safetensors file (header of {length} bytes); re-save the checkpoint")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


class CheckpointReader:
    """Tensors of a safetensors checkpoint by name, with at most one shard file open at a time.

    An open safetensors file is memory-mapped, and every page read from it stays resident until the
    file is closed: with all shards of two 8B checkpoints open, a pass over them ends with both models
    in memory. Switching to another shard therefore closes the previous one.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.headers: dict[str, dict] = {}  # tensor name -> header entry, plus "file"
        files = sorted(self.directory.glob("*.safetensors")) if self.directory.is_dir() else []
        if not files:
            raise SddError(f"{self.directory} holds no *.safetensors weights; sdd compares safetensors checkpoints only")
        for file in files:
            for name, entry in read_header(file).items():
                self.headers[name] = {**entry, "file": file.name}
        self._open_file: str | None = None
        self._handle = None

    def file_of(self, name: str) -> str:
        return self.headers[name]["file"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.headers[name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.file_of(name)
        if file != self._open_file:
            self.close()
            self._handle = safe_open(str(self.directory / file), framework="pt")
            self._open_file = file
        return self._handle.get_tensor(name)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle = None
        self._open_file = None


# --------------------------------------------------------------------------------------------------
# What counts as a change.


def coarser_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The float dtype with fewer mantissa bits: the resolution both stored tensors share."""
    return max((a, b), key=lambda d: torch.finfo(d).eps)


def half_ulp(values_N: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of `dtype`'s numbers at each |value| (float64, built from bits so it is exact)."""
    info = torch.finfo(dtype)
    mantissa_bits = round(-math.log2(info.eps))
    min_exponent = round(math.log2(info.tiny))
    _, exponent_N = torch.frexp(values_N)  # value = m * 2**exponent with 0.5 <= |m| < 1
    binade_N = (exponent_N.to(torch.int64) - 1).clamp(min=min_exponent)
    binade_N = binade_N.masked_fill(values_N == 0, min_exponent)
    return ((binade_N - mantissa_bits - 1 + 1023) << 52).view(torch.float64)


def changed_masks(before_N: torch.Tensor, after_N: torch.Tensor, resolution: torch.dtype | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(changed at `resolution`, changed at bf16 resolution) per entry of two flat chunks (SPARSITY_RULE).

    Every change between two numbers of dtype d is at least half a step of d at the old value (the
    smallest is one step down from a power of two), so at the stored dtype this counts exactly the
    entries whose stored value changed; at bf16 it ignores what training in fp32 moved by less than
    a bf16 copy of the weights could show. Non-float tensors (`resolution` None) compare exactly.
    """
    if resolution is None:
        differs_N = before_N != after_N
        return differs_N, differs_N
    before_f64 = before_N.to(torch.float64)
    after_f64 = after_N.to(torch.float64)
    differs_N = after_f64 != before_f64
    delta_N = (after_f64 - before_f64).abs()
    changed_N = differs_N & ~(delta_N < half_ulp(before_f64, resolution))
    if resolution == torch.bfloat16:
        return changed_N, changed_N
    changed_bf16_N = differs_N & ~(delta_N < half_ulp(before_f64, torch.bfloat16))
    return changed_N, changed_bf16_N


def _resolution(before: torch.Tensor, after: torch.Tensor) -> torch.dtype | None:
    if before.dtype.is_floating_point and after.dtype.is_floating_point:
        return coarser_dtype(before.dtype, after.dtype)
    return None


def _chunked_masks(before: torch.Tensor, after: torch.Tensor, chunk: int
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    resolution = _resolution(before, after)
    before_N, after_N = before.reshape(-1), after.reshape(-1)
    for start in range(0, before_N.numel(), chunk):
        yield changed_masks(before_N[start:start + chunk], after_N[start:start + chunk], resolution)


class _Tally:
    """Changed / total counts of one group of parameters (a type, a layer, the model)."""

    def __init__(self) -> None:
        self.changed = self.changed_bf16 = self.total = 0

    def add(self, changed: int, changed_bf16: int, total: int) -> None:
        self.changed += changed
        self.changed_bf16 += changed_bf16
        self.total += total

    def as_dict(self) -> dict:
        return {"parameters": self.total, "changed": self.changed, "changed_bf16": self.changed_bf16,
                "fraction": self.changed / self.total if self.total else None,
                "fraction_bf16": self.changed_bf16 / self.total if self.total else None}


# --------------------------------------------------------------------------------------------------
# Update sparsity and rank.


def effective_rank(matrix_MN: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values (Roy & Vetterli 2007); 0 for a zero matrix.

    It reads as "how many directions the update really uses": 1 for a rank-one update, min(M, N) for
    one spread evenly over all directions, and unlike the numerical rank it does not count the
    rounding-noise directions that make every float update full rank.
    """
    singular_values_R = torch.linalg.svdvals(matrix_MN.to(torch.float32))
    total = singular_values_R.sum()
    if not total > 0:
        return 0.0
    shares_R = singular_values_R / total
    shares_R = shares_R[shares_R > 0]
    return float(torch.exp(-(shares_R * shares_R.log()).sum()))


def _rank_sample(names: Sequence[str], shapes: dict[str, tuple], limit: int) -> list[str]:
    """Up to `limit` block matrices evenly spaced in name order (every depth and type), embeddings last resort."""
    matrices = [n for n in names if len(shapes[n]) == 2]
    blocks = [n for n in matrices if layer_type(n) not in ("embed", "lm_head")] or matrices
    if len(blocks) <= limit:
        return list(blocks)
    picks = np.linspace(0, len(blocks) - 1, limit).round().astype(int)
    return [blocks[i] for i in sorted(set(picks.tolist()))]


def _common_names(readers: Sequence[CheckpointReader]) -> tuple[list[str], list[dict]]:
    """Tensors every checkpoint has with the same shape, and why the others are left out."""
    all_names = set().union(*(r.headers for r in readers))
    common, skipped = [], []
    for name in sorted(all_names):
        missing = [str(r.directory) for r in readers if name not in r.headers]
        if missing:
            skipped.append({"name": name, "reason": f"absent from {', '.join(missing)}"})
        elif len({r.shape(name) for r in readers}) > 1:
            skipped.append({"name": name, "reason": "shapes differ: " + " vs ".join(str(list(r.shape(name))) for r in readers)})
        else:
            common.append(name)
    if not common:
        raise SddError(
            f"{' and '.join(str(r.directory) for r in readers)} share no parameter of the same name and shape; "
            "update sparsity compares two checkpoints of one model"
        )
    return common, skipped


def compare_weights(before_dir: str | Path, after_dir: str | Path, *, rank_matrices: int = RANK_MATRICES,
                    chunk_elements: int = CHUNK_ELEMENTS) -> dict:
    """Update sparsity of after - before: overall, per layer type, per layer and per tensor, plus the
    effective rank of the update of up to `rank_matrices` sampled matrices. Streams (see CheckpointReader)."""
    before, after = CheckpointReader(before_dir), CheckpointReader(after_dir)
    try:
        names, skipped = _common_names([before, after])
        shapes = {n: after.shape(n) for n in names}
        rank_names = set(_rank_sample(names, shapes, rank_matrices))
        total, by_type = _Tally(), {kind: _Tally() for kind in LAYER_TYPES}
        by_layer: dict[int, dict[str, _Tally]] = {}
        tensors, ranks = [], []
        # Shard order of both checkpoints: each file is opened once when both were saved alike.
        for name in sorted(names, key=lambda n: (after.file_of(n), before.file_of(n), n)):
            before_t, after_t = before.get(name), after.get(name)
            changed = changed_bf16 = 0
            for changed_N, changed_bf16_N in _chunked_masks(before_t, after_t, chunk_elements):
                changed += int(changed_N.sum())
                changed_bf16 += int(changed_bf16_N.sum())
            count, kind, layer = before_t.numel(), layer_type(name), layer_index(name)
            for tally in (total, by_type[kind]):
                tally.add(changed, changed_bf16, count)
            if layer is not None:
                layer_tallies = by_layer.setdefault(layer, {"all": _Tally()})
                layer_tallies["all"].add(changed, changed_bf16, count)
                layer_tallies.setdefault(kind, _Tally()).add(changed, changed_bf16, count)
            resolution = _resolution(before_t, after_t)
            tensors.append({"name": name, "type": kind, "layer": layer, "shape": list(before_t.shape),
                            "dtype": str(after_t.dtype).removeprefix("torch."),
                            "resolution": str(resolution).removeprefix("torch.") if resolution else "exact",
                            "changed": changed, "fraction": changed / count if count else None,
                            "fraction_bf16": changed_bf16 / count if count else None})
            if name in rank_names:
                ranks.append(_update_rank(name, before_t, after_t))
            del before_t, after_t
    finally:
        before.close()
        after.close()
    ratios = [r["ratio"] for r in ranks if r["ratio"] is not None]
    return {
        "rule": SPARSITY_RULE,
        "total": total.as_dict(),
        "by_type": {kind: tally.as_dict() for kind, tally in by_type.items() if tally.total},
        "by_layer": [{"layer": layer, **tallies["all"].as_dict(),
                      "by_type": {k: t.as_dict() for k, t in tallies.items() if k != "all"}}
                     for layer, tallies in sorted(by_layer.items())],
        "tensors": tensors,
        "skipped_tensors": skipped,
        "effective_rank": {
            "method": "exp(entropy of singular values / their sum) of after - before (float32), per matrix",
            "matrices": sorted(ranks, key=lambda r: r["name"]),
            "sampled": len(ranks),
            "of": sum(1 for n in names if len(shapes[n]) == 2),
            "median_ratio": float(np.median(ratios)) if ratios else None,
        },
    }


def _update_rank(name: str, before_MN: torch.Tensor, after_MN: torch.Tensor) -> dict:
    update_MN = after_MN.to(torch.float32) - before_MN.to(torch.float32)
    max_rank = min(update_MN.shape)
    rank = effective_rank(update_MN)
    before_norm = float(before_MN.to(torch.float32).norm())
    return {"name": name, "type": layer_type(name), "layer": layer_index(name), "shape": list(update_MN.shape),
            "effective_rank": rank, "max_rank": max_rank, "ratio": rank / max_rank if max_rank else None,
            "relative_update_norm": float(update_MN.norm()) / before_norm if before_norm > 0 else None}


def overlap_weights(run_a: tuple[str | Path, str | Path], run_b: tuple[str | Path, str | Path], *,
                    chunk_elements: int = CHUNK_ELEMENTS) -> dict:
    """Jaccard overlap of the changed sets of two (before, after) pairs, e.g. one stage at two seeds.

    With the same `before` the sets index the same starting values, which is the claim to test ("the
    same slice across seeds"); with different ones the overlap still compares positions. Chance level:
    each run's changed entries placed uniformly at random within each tensor, independently, which
    gives E|A∩B| = sum_t a_t b_t / n_t and E|A∪B| = sum_t (a_t + b_t - a_t b_t / n_t); overlap well
    above it means the runs picked the same entries, not just the same tensors.
    """
    paths = [Path(p).resolve() for p in (*run_a, *run_b)]
    readers: dict[Path, CheckpointReader] = {}
    for path in paths:
        if path not in readers:
            readers[path] = CheckpointReader(path)
    base_a, after_a, base_b, after_b = (readers[p] for p in paths)
    groups: dict[str, Counter] = {}
    try:
        names, skipped = _common_names(list(readers.values()))
        order = sorted(names, key=lambda n: tuple(r.file_of(n) for r in readers.values()) + (n,))
        for name in order:
            tensors = {path: reader.get(name) for path, reader in readers.items()}
            masks_a = _chunked_masks(tensors[paths[0]], tensors[paths[1]], chunk_elements)
            masks_b = _chunked_masks(tensors[paths[2]], tensors[paths[3]], chunk_elements)
            count = Counter()
            for (a_N, a_bf16_N), (b_N, b_bf16_N) in zip(masks_a, masks_b, strict=True):
                for suffix, a, b in (("", a_N, b_N), ("_bf16", a_bf16_N, b_bf16_N)):
                    count["a" + suffix] += int(a.sum())
                    count["b" + suffix] += int(b.sum())
                    count["both" + suffix] += int((a & b).sum())
            numel = tensors[paths[0]].numel()
            count["total"] = numel
            for suffix in ("", "_bf16"):
                a, b = count["a" + suffix], count["b" + suffix]
                count["chance_both" + suffix] = a * b / numel if numel else 0.0
            for group in ("all", layer_type(name)):
                groups.setdefault(group, Counter()).update(count)
            del tensors
    finally:
        for reader in readers.values():
            reader.close()

    def summary(count: Counter) -> dict:
        out = {"parameters": count["total"]}
        for suffix in ("", "_bf16"):
            a, b, both = count["a" + suffix], count["b" + suffix], count["both" + suffix]
            either = a + b - both
            chance_both = count["chance_both" + suffix]
            chance_either = a + b - chance_both
            out.update({
                f"changed_a{suffix}": a, f"changed_b{suffix}": b, f"both{suffix}": both, f"either{suffix}": either,
                f"jaccard{suffix}": both / either if either else None,
                f"chance_jaccard{suffix}": chance_both / chance_either if chance_either else None,
            })
        return out

    return {
        "rule": SPARSITY_RULE,
        "same_base": paths[0] == paths[2],
        "total": summary(groups["all"]),
        "by_type": {k: summary(v) for k, v in sorted(groups.items()) if k != "all"},
        "skipped_tensors": skipped,
        "chance": "changed entries placed uniformly at random within each tensor, independently per run",
    }
