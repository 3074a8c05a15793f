"""Memory per GPU for each stage of a recipe, under DDP, DeepSpeed ZeRO-3 and FSDP2, and its check on CPU.

The model is arithmetic over what each stage holds on one GPU:

  trained model   fp32 master weights, fp32 gradients, AdamW's two fp32 moments, and the bf16 copies the
                  forward computes with (autocast's cast cache under DDP; the bf16 partition and the
                  gathered layers under ZeRO-3; the all-gathered bf16 layers under FSDP2); DDP adds its
                  gradient buckets (a second fp32 copy of the gradients)
  frozen models   the teacher (warmup, distill) and GRPO's reference model when beta > 0, in bf16, whole
                  on every GPU under DDP, sharded under ZeRO-3 / FSDP2
  activations     per micro-batch: with gradient checkpointing one residual-stream tensor per layer plus
                  one layer's full set during its recompute; without, every layer's full set
  logits          TRL's GRPO and SFT losses materialise (tokens x vocabulary) logits and their
                  log-softmax; sdd's warmup/distill loss is chunked (sdd.losses.TILE_BYTES per tile)
  vLLM            colocated vLLM reserves `vllm_gpu_memory_utilization` of the GPU

Parameter counts come from instantiating each Qwen3 config on the meta device (no weights, no hub).
Per-token activation bytes of a layer are written out op by op in `layer_activation_bytes`; the
`measure-activations` command checks them against autograd's saved tensors of one real-width layer, and
`measure-states` (run under 2 processes) checks the model/gradient/optimizer bytes per rank against
what DDP, ZeRO-3 and FSDP2 really allocate. Not counted: the CUDA context and NCCL buffers (~1-2 GB),
allocator fragmentation, and vLLM's own activations beyond its reserved share.

    python benchmarks/memory_model.py table                     # the docs/scaling.md tables
    python benchmarks/memory_model.py check                     # CPU measurements vs the model (2 processes)

It lives in benchmarks/ rather than the CLI: it plans hardware for the published recipe and reads the
recipe's stage settings, but nothing in a run depends on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

GB = 1e9
GPU_BYTES = 80 * GB
VOCAB = 151_936
LAUNCHERS = ("ddp", "zero3", "fsdp2")

# From the public config.json of each model (Qwen/Qwen3-8B, Qwen/Qwen3-1.7B, Qwen/Qwen3-0.6B).
SHAPES = {
    "Qwen/Qwen3-8B": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                          head_dim=128, intermediate_size=12288, vocab_size=VOCAB, tie_word_embeddings=False),
    "Qwen/Qwen3-1.7B": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                            head_dim=128, intermediate_size=6144, vocab_size=VOCAB, tie_word_embeddings=True),
    "Qwen/Qwen3-0.6B": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                            head_dim=128, intermediate_size=3072, vocab_size=VOCAB, tie_word_embeddings=True),
}


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    params: int  # distinct parameters (a tied embedding once)
    layer_params: int
    embedding_params: int

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def shape_of(name: str, **config) -> Shape:
    """Counts parameters by building the model on the meta device: exact, and no weights are allocated."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    kwargs = {**SHAPES.get(name, {}), **config}
    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**kwargs))
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    return Shape(name, kwargs["hidden_size"], kwargs["num_hidden_layers"], kwargs["num_attention_heads"],
                 kwargs["num_key_value_heads"], kwargs["head_dim"], kwargs["intermediate_size"], kwargs["vocab_size"],
                 kwargs.get("tie_word_embeddings", True), params, layer, model.model.embed_tokens.weight.numel())


def layer_activation_bytes(shape: Shape, residual_bytes: int) -> int:
    """Bytes autograd keeps per token for one Qwen3 decoder layer, read op by op from transformers 5.24's code.

    `residual_bytes` is the residual stream's element size: 4 under DDP (fp32 weights, bf16 autocast: the
    embedding output is fp32 and every residual add promotes to fp32), 2 where the parameters themselves are
    bf16 (ZeRO-3's and FSDP2's compute copies). Matmuls and attention run in bf16 either way. The rotary
    cos/sin tables are shared by all layers and left out.
    """
    h, q, kv, i = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    if residual_bytes == 4:
        # RMSNorm on the fp32 stream: keeps its input x and x * rsqrt (fp32) for the weight's product; autocast
        # then casts the fp32 output to bf16 once per projection that reads it (q, k, v; gate, up).
        norms = (4 * h + 4 * h + 3 * 2 * h) + (4 * h + 4 * h + 2 * 2 * h)
    else:
        # RMSNorm on a bf16 stream: an fp32 copy of x, the bf16 x * rsqrt for the weight's product, and the
        # bf16 output, shared by the projections that read it.
        norms = 2 * (4 * h + 2 * h + 2 * h)
    # Per-head RMSNorms of q and k: the fp32 upcast and the bf16 product for the weight.
    qk_norms = (4 + 2) * (q + kv)
    # SDPA (grouped-query, k and v not repeated) keeps q, k, v after RoPE, its output (o_proj's input, a view)
    # and an fp32 log-sum-exp per head.
    attention = 2 * q + 2 * kv + 2 * kv + 2 * q + 4 * shape.heads
    # SwiGLU: gate and up outputs, silu(gate), and silu(gate) * up for down_proj.
    mlp = 4 * 2 * i
    return norms + qk_norms + attention + mlp


@dataclasses.dataclass
class Stage:
    """What one stage holds per GPU, from the recipe's settings."""

    name: str
    trained: Shape
    frozen: list[Shape]
    per_device_batch: int  # sequences per micro-batch (GRPO: completions)
    gradient_accumulation: int
    sequence_tokens: int  # prompt + completion
    loss_tokens: int  # tokens whose logits the loss reads (completion for GRPO, whole sequence for SFT)
    logits: str  # "full" (TRL's losses) or "chunked" (sdd's warmup/distill loss)
    gradient_checkpointing: bool
    vllm_share: float  # colocated vLLM's reserved fraction of the GPU, 0 without


def state_bytes(shape: Shape, launcher: str, gpus: int, *, trained: bool, compute_bytes: int = 2,
                master_bytes: int = 4) -> dict[str, float]:
    """Weights, gradients and optimizer states of one model on one GPU.

    compute_bytes=master_bytes describes a run without mixed precision (the CPU check runs fp32).
    """
    p, n = shape.params, gpus
    mixed = compute_bytes != master_bytes
    # Under FSDP2/ZeRO-3 one layer (or, for the root, embedding and untied head) is gathered at a time, and the
    # next is prefetched; its gradient exists unsharded until the reduce-scatter.
    gathered_unit = max(2 * shape.layer_params, shape.embedding_params * (1 if shape.tied else 2))
    if not trained:
        if launcher == "ddp":
            return {"weights": 2 * p}
        return {"weights": 2 * p / n, "gathered": 2 * gathered_unit}
    if launcher == "ddp":
        out = {"weights": master_bytes * p, "grads": master_bytes * p, "adam": 8 * p,
               # DDP's reducer copies gradients into flat buckets (gradient_as_bucket_view=False, the default).
               "ddp buckets": master_bytes * p}
        if mixed:
            out["autocast copies"] = compute_bytes * p  # autocast caches the bf16 cast of each weight for backward
        return out
    if launcher == "zero3":
        # DeepSpeed keeps the partitioned compute-dtype parameter, its fp32 master copy, an fp32 gradient
        # partition for the optimizer, and AdamW's moments; with fp32 training the master is still a copy.
        return {"weights": (compute_bytes + master_bytes) * p / n, "grads": master_bytes * p / n,
                "adam": 8 * p / n, "gathered": 2 * compute_bytes * gathered_unit}
    if launcher == "fsdp2":
        # fully_shard with MixedPrecisionPolicy(param_dtype=bf16): the sharded parameter is the fp32 master.
        return {"weights": master_bytes * p / n, "grads": master_bytes * p / n, "adam": 8 * p / n,
                "gathered": 2 * compute_bytes * gathered_unit + master_bytes * gathered_unit}
    raise ValueError(launcher)


def activation_bytes(stage: Stage, launcher: str) -> dict[str, float]:
    s = stage.trained
    tokens = stage.per_device_batch * stage.sequence_tokens
    residual = 4 if launcher == "ddp" else 2
    per_layer = layer_activation_bytes(s, residual)
    if stage.gradient_checkpointing:
        # Each layer's input is kept; during backward one layer is recomputed with its full set.
        act = tokens * (s.layers * s.hidden * residual + per_layer)
    else:
        act = tokens * s.layers * per_layer
    # Backward through a layer holds gradients of its activations beside them: about one layer's set more.
    out = {"activations": act, "backward working set": tokens * per_layer}
    loss_tokens = stage.per_device_batch * stage.loss_tokens
    if stage.logits == "full":
        # TRL: bf16 logits, the temperature-scaled copy, log-softmax kept for backward, and in backward an fp32
        # gradient of the logits: 2 + 2 + 2 + 4 bytes per (token, vocabulary entry).
        out["logits"] = loss_tokens * s.vocab * 10
    else:
        # sdd.losses: frozen models' final hidden states (bf16) and one tile of fp32 work per side.
        widest = max([f.hidden for f in stage.frozen] or [s.hidden])
        out["logits"] = loss_tokens * widest * 2 + 8 * 64 * 2**20
    # A frozen model's forward (no grad) holds one layer's intermediates at a time.
    for frozen in stage.frozen:
        out["logits"] += tokens * layer_activation_bytes(frozen, 2) / 2
    return out


def stage_memory(stage: Stage, launcher: str, gpus: int = 8) -> dict[str, float]:
    parts: dict[str, float] = {}
    for key, value in state_bytes(stage.trained, launcher, gpus, trained=True).items():
        parts[f"trained {key}"] = value
    for frozen in stage.frozen:
        for key, value in state_bytes(frozen, launcher, gpus, trained=False).items():
            parts[f"frozen {frozen.name.split('/')[-1]} {key}"] = parts.get(f"frozen {frozen.name} {key}", 0) + value
    parts.update(activation_bytes(stage, launcher))
    parts["vllm"] = stage.vllm_share * GPU_BYTES
    parts["total"] = sum(parts.values())
    return parts


# -- the published recipe -------------------------------------------------------------------------
def recipe_stages(recipe: dict, overrides: dict[str, dict] | None = None, prompt_tokens: int = 256) -> list[Stage]:
    """The recipe's training stages with the models each holds; `overrides` replaces stage settings.

    GRPO (teacher-rl, student-rl) holds a reference model only with beta > 0 (sdd's default is 0.0, as the
    recipe's authors train). Prompts are assumed to be `prompt_tokens` long (DAPO-Math prompts in Qwen's
    chat template are ~100-300 tokens).
    """
    teacher, student = shape_of(recipe["teacher"]), shape_of(recipe["student"])
    stages = []
    for name, settings in recipe["stages"].items():
        s = {**settings, **(overrides or {}).get(name, {})}
        checkpointing = bool(s.get("gradient_checkpointing", False))
        bs, ga = s.get("per_device_train_batch_size", 8), s.get("gradient_accumulation_steps", 1)
        colocate = s.get("use_vllm") and s.get("vllm_mode") == "colocate"
        share = s.get("vllm_gpu_memory_utilization", 0.3) if colocate else 0.0
        if name in ("teacher-rl", "student-rl"):
            trained = teacher if name == "teacher-rl" else student
            frozen = [trained] if s.get("beta", 0.0) > 0 else []
            completion = s.get("max_completion_length", 4096)
            stages.append(Stage(name, trained, frozen, bs, ga, prompt_tokens + completion, completion, "full",
                                checkpointing, share))
        elif name == "distill":
            completion = s.get("max_completion_length", 4096)
            stages.append(Stage(name, student, [teacher], bs, ga, prompt_tokens + completion, completion, "chunked",
                                checkpointing, share))
        elif name == "warmup":
            length = s.get("max_length", prompt_tokens + s.get("max_new_tokens", 4096))
            stages.append(Stage(name, student, [teacher], bs, ga, length, length, "chunked", checkpointing, 0.0))
        elif name in ("teacher-sft", "sft"):
            length = s.get("max_length", 1024)  # TRL SFTConfig's default
            stages.append(Stage(name, teacher, [], bs, ga, length, length, "full", checkpointing, 0.0))
    return stages


def yaml_text(data) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def launcher_note(stage: Stage, memory: dict[str, dict[str, float]]) -> str:
    fits = [launcher for launcher in LAUNCHERS if memory[launcher]["total"] <= HEADROOM * GPU_BYTES]
    return ", ".join(fits) if fits else "none"


def table(recipe_path: str, overrides: dict[str, dict] | None, gpus: int) -> tuple[str, list[dict]]:
    import yaml

    recipe = yaml.safe_load(Path(recipe_path).read_text())
    rows, lines = [], []
    for stage in recipe_stages(recipe, overrides):
        memory = {launcher: stage_memory(stage, launcher, gpus) for launcher in LAUNCHERS}
        lines.append(f"\n#### {stage.name}: trains {stage.trained.name} ({stage.trained.params / 1e9:.2f}B)"
                     + (f", holds {', '.join(f.name for f in stage.frozen)} frozen" if stage.frozen else "")
                     + f"; per-device batch {stage.per_device_batch} x {stage.sequence_tokens} tokens, "
                       f"gradient accumulation {stage.gradient_accumulation}, gradient checkpointing "
                       f"{'on' if stage.gradient_checkpointing else 'off'}"
                     + (f", vLLM colocated at {stage.vllm_share:.2f}" if stage.vllm_share else "") + "\n")
        keys = [k for k in memory["ddp"] | memory["zero3"] | memory["fsdp2"] if k != "total"]
        lines.append("| GB per GPU | DDP | ZeRO-3 | FSDP2 |")
        lines.append("|---|---:|---:|---:|")
        for key in keys + ["total"]:
            cells = [memory[launcher].get(key) for launcher in LAUNCHERS]
            label = f"**{key}**" if key == "total" else key
            lines.append(f"| {label} | " + " | ".join("" if c is None else f"{c / GB:.1f}" for c in cells) + " |")
        lines.append(f"\nFits {HEADROOM:.0%} of 80 GB: {launcher_note(stage, memory)}.")
        rows.append({"stage": stage.name, "settings": dataclasses.asdict(stage) | {
            "trained": stage.trained.name, "frozen": [f.name for f in stage.frozen]},
            "gb_per_gpu": {launcher: {k: v / GB for k, v in memory[launcher].items()} for launcher in LAUNCHERS}})
    return "\n".join(lines), rows


HEADROOM = 0.85  # of the GPU: the CUDA context, NCCL buffers and allocator fragmentation take the rest


def recommend(stage: Stage, launcher: str, gpus: int) -> tuple[int, int] | None:
    """The largest per-device batch (a power of two) that fits, with the accumulation that keeps the global batch.

    Fewer, larger micro-batches are faster (ZeRO-3 and FSDP2 gather every layer once per micro-batch), so the
    first fit from the top wins. None when even one sequence per device does not fit.
    """
    per_device_total = stage.per_device_batch * stage.gradient_accumulation
    batch = 1
    while batch * 2 <= per_device_total and per_device_total % (batch * 2) == 0:
        batch *= 2
    while batch >= 1:
        trial = dataclasses.replace(stage, per_device_batch=batch, gradient_accumulation=per_device_total // batch)
        if stage_memory(trial, launcher, gpus)["total"] <= HEADROOM * GPU_BYTES:
            return batch, per_device_total // batch
        batch //= 2
    return None


def recommendations(recipe_path: str, gpus: int, launcher: str = "zero3") -> dict[str, dict]:
    import yaml

    recipe = yaml.safe_load(Path(recipe_path).read_text())
    out = {}
    for stage in recipe_stages(recipe):
        fit = recommend(stage, launcher, gpus)
        if fit:
            out[stage.name] = {"per_device_train_batch_size": fit[0], "gradient_accumulation_steps": fit[1]}
    return out


# -- measurements on CPU ----------------------------------------------------------------------------
TINY_SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                  intermediate_size=1536, vocab_size=16384, tie_word_embeddings=True)


def live_tensor_bytes() -> int:
    """Bytes of distinct tensor storages reachable from Python objects (parameters, grads, optimizer states)."""
    import gc

    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                continue
            storage = obj.untyped_storage()
            pointer, size = storage.data_ptr(), storage.nbytes()
        except Exception:  # noqa: BLE001 - some objects (DTensor wrappers, freed storages) raise on inspection
            continue
        if pointer in seen or pointer == 0:
            continue
        seen.add(pointer)
        total += size
    return total


def resident_bytes() -> int:
    """The process's resident set after returning freed heap memory to the OS (glibc), so it follows live memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure_states(launcher: str, out: str) -> None:
    """One rank: build the tiny model, train 2 steps of AdamW under `launcher`, record tensor bytes per rank."""
    import torch
    import torch.distributed as dist
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = Qwen3Config(**TINY_SHAPE)
    rss_start = resident_bytes()
    batch = torch.randint(0, config.vocab_size, (2, 64))
    if launcher == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        model = Qwen3ForCausalLM(config)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(2):
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
        rank, engaged = dist.get_rank(), sharded
    else:
        from accelerate import Accelerator, DeepSpeedPlugin

        plugin = None
        if launcher == "zero3":
            world, h = int(os.environ["WORLD_SIZE"]), config.hidden_size
            plugin = DeepSpeedPlugin(hf_ds_config={
                "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2 * world,
                # The values HF's Trainer and accelerate fill in for "auto" (DeepSpeed's own default reduce bucket
                # is 5e8 elements, a 2 GB fp32 buffer).
                "zero_optimization": {"stage": 3, "reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
                                      "stage3_param_persistence_threshold": 10 * h},
                "bf16": {"enabled": False}, "gradient_clipping": 1.0})
        # No CUDA here: DDP runs on gloo (accelerate's MULTI_CPU), ZeRO-3 on DeepSpeed's CPU accelerator.
        accelerator = Accelerator(cpu=launcher == "ddp", deepspeed_plugin=plugin)
        model = Qwen3ForCausalLM(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = torch.utils.data.DataLoader(list(batch), batch_size=2)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        for _ in range(2):
            accelerator.backward(model(input_ids=batch, labels=batch).loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # keep gradients allocated, as between accumulation steps
        rank = dist.get_rank()
        engaged = (any(hasattr(p, "ds_id") and p.ds_tensor.numel() < p.ds_numel for p in model.parameters())
                   if launcher == "zero3" else type(model).__name__ == "DistributedDataParallel")
    batch = None
    record = {"launcher": launcher, "rank": rank, "engaged": engaged, "live_tensor_bytes": live_tensor_bytes(),
              "rss_growth_bytes": resident_bytes() - rss_start,
              "params": shape_of("tiny", **TINY_SHAPE).params}
    Path(out).with_suffix(f".{rank}.json").write_text(json.dumps(record))


def run_state_checks(workdir: Path, launchers=("ddp", "zero3", "fsdp2")) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    results = []
    shape = shape_of("tiny", **TINY_SHAPE)
    for launcher in launchers:
        out = workdir / launcher
        script = [str(Path(__file__).resolve()), "measure-states", "--launcher", launcher, "--out", str(out)]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                   *script]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise SystemExit(f"{launcher} failed:\n{done.stderr[-3000:]}")
        ranks = [json.loads(p.read_text()) for p in sorted(workdir.glob(f"{launcher}.*.json"))]
        parts = state_bytes(shape, launcher, 2, trained=True, compute_bytes=4)
        # "gathered" is transient (freed once a layer is resharded); the rest stays between steps.
        resident = sum(v for k, v in parts.items() if k != "gathered")
        python_visible = sum(v for k, v in parts.items() if k not in ("gathered", "ddp buckets"))
        for rank in ranks:
            results.append({**rank, "predicted_resident_bytes": resident,
                            "predicted_python_visible_bytes": python_visible, "predicted_parts": parts})
    return results


def saved_bytes(name: str, tokens: int, mode: str) -> int:
    """Bytes of distinct storages autograd saves in one forward of one real-width decoder layer, weights excluded."""
    import torch
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding

    torch.manual_seed(0)
    config = Qwen3Config(**{**SHAPES[name], "num_hidden_layers": 1})
    config._attn_implementation = "sdpa"
    layer = Qwen3DecoderLayer(config, layer_idx=0)
    if mode == "bf16":
        layer = layer.to(torch.bfloat16)
    dtype = torch.float32 if mode == "autocast" else torch.bfloat16
    # The layer's input is the previous layer's output: a non-leaf, as inside the model.
    hidden = torch.randn(1, tokens, config.hidden_size, dtype=dtype, requires_grad=True) * 1.0
    positions = torch.arange(tokens).unsqueeze(0)
    cos_sin = Qwen3RotaryEmbedding(config)(hidden, positions)
    excluded = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    excluded |= {t.untyped_storage().data_ptr() for t in cos_sin}
    seen: dict[int, int] = {}

    def pack(tensor):
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)
    return sum(b for ptr, b in seen.items() if ptr not in excluded)


def measure_activations(name: str, tokens: int, mode: str) -> dict:
    """Saved bytes per token of one layer, from two token counts (autocast's cached bf16 weights cancel out)."""
    per_token = (saved_bytes(name, 2 * tokens, mode) - saved_bytes(name, tokens, mode)) / tokens
    predicted = layer_activation_bytes(shape_of(name), 4 if mode == "autocast" else 2)
    return {"model": name, "mode": mode, "tokens": [tokens, 2 * tokens], "measured_bytes_per_token": per_token,
            "predicted_bytes_per_token": predicted, "ratio": predicted / per_token}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table", help="memory per GPU for each stage of a recipe")
    t.add_argument("--recipe", default=str(Path(__file__).resolve().parents[1] / "examples/recipes/qwen3-8b-to-1.7b.yaml"))
    t.add_argument("--gpus", type=int, default=8)
    t.add_argument("--recommended", action="store_true",
                   help="with the largest per-device batches that fit under ZeRO-3 (same global batch)")
    t.add_argument("--json", help="also write the figures here")
    m = sub.add_parser("measure-states", help="(one rank) tensor bytes after 2 AdamW steps")
    m.add_argument("--launcher", choices=LAUNCHERS, required=True)
    m.add_argument("--out", required=True)
    c = sub.add_parser("check", help="measure on this CPU and compare with the model")
    c.add_argument("--tokens", type=int, default=256)
    c.add_argument("--skip-activations", action="store_true")
    c.add_argument("--launchers", default="ddp,zero3,fsdp2")
    c.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    if args.command == "table":
        overrides = recommendations(args.recipe, args.gpus) if args.recommended else None
        text, rows = table(args.recipe, overrides, args.gpus)
        print(text)
        if overrides:
            print("\nRecommended per-device settings (ZeRO-3, same global batch):\n")
            print(yaml_text(overrides))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    elif args.command == "measure-states":
        measure_states(args.launcher, args.out)
    else:
        results: dict = {"activations": [], "states": []}
        for name in () if args.skip_activations else ("Qwen/Qwen3-1.7B", "Qwen/Qwen3-8B"):
            for mode in ("bf16", "autocast"):
                row = measure_activations(name, args.tokens, mode)
                results["activations"].append(row)
                print(f"activations {name} {mode}: measured {row['measured_bytes_per_token']:,.0f} B/token/layer, "
                      f"model {row['predicted_bytes_per_token']:,.0f} (model/measured {row['ratio']:.2f})", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            results["states"] = run_state_checks(Path(tmp), args.launchers.split(","))
        for row in results["states"]:
            print(f"states {row['launcher']} rank {row['rank']} (engaged: {row['engaged']}, {row['params'] / 1e6:.2f}M "
                  f"params, fp32): tensors reachable from Python {row['live_tensor_bytes'] / 1e6:,.1f} MB (model "
                  f"{row['predicted_python_visible_bytes'] / 1e6:,.1f}); RSS growth {row['rss_growth_bytes'] / 1e6:,.1f}"
                  f" MB (model, resident {row['predicted_resident_bytes'] / 1e6:,.1f})")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
