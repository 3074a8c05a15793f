"""Engines and precision: what DeepSpeed or FSDP did to the model, and whether its updates can land.

Checked once per training stage, before any step (`train` in trainers.py) and at train begin (the
EngineCheck callback): a config that asked for FSDP and silently got DDP, a learning rate the master
weights' dtype rounds away, and one line per rank saying what the engine holds. The frozen teacher of
distill and warmup is placed under the same engine here too (`prepare_teacher`).
"""

from __future__ import annotations

import math
import os

from sdd.errors import SddError

# Half an ulp relative to the value: an update smaller than |w| * this rounds back to w.
HALF_ULP = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}


def check_engine_requested(trainer) -> None:
    """An accelerate config that asks for FSDP must get FSDP, not a silent DDP.

    accelerate 1.16 enters its FSDP branch only for GPU-like devices (MULTI_GPU/NPU/XPU/...): on CPU the
    state stays MULTI_CPU, i.e. DDP, while the config and its log still say FSDP. A run then "works" with
    a whole model per rank, which at scale means out of memory, and a test of it proves nothing.
    """
    asked_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    got = getattr(trainer.accelerator.distributed_type, "value", str(trainer.accelerator.distributed_type))
    if asked_fsdp and not trainer.is_fsdp_enabled:
        raise SddError(f"the accelerate config asks for FSDP but accelerate set up {got} (whole model per rank); "
                       "accelerate shards with FSDP only on GPUs - on this device use a DeepSpeed ZeRO-3 config")


def check_update_precision(trainer) -> None:
    """Refuse, before any step, a run whose optimizer updates would mostly round away.

    AdamW moves each weight by about lr per step. The weights the optimizer writes (its master copy)
    round an update below half an ulp, |w| * 2^-8 in bf16, back to the old value. With the median |w|
    of the trainable weights as the scale: lr below median|w| * half-ulp means most weights cannot move
    at all (bf16, lr 1e-6, |w| ~ 0.01: resolution 4e-5, 40x the lr). DeepSpeed keeps fp32 master
    partitions whatever the module's dtype, so there the master dtype is fp32. Refused, not warned:
    such a run spends its whole allocation and reports a falling loss from the few weights that move.
    """
    import torch

    lr = float(trainer.args.learning_rate)
    # ZeRO-3 shards (0 elements here) and meta placeholders (FSDP's rank-0-only loading) say nothing of scale
    params = [p for p in trainer.model.parameters() if p.requires_grad and p.numel() > 0 and not p.is_meta]
    if not params or lr <= 0:
        return
    master = torch.float32 if trainer.is_deepspeed_enabled else params[0].dtype
    name = str(master).removeprefix("torch.")
    if name not in HALF_ULP:
        return
    sample = torch.cat([p.detach().flatten()[:: max(1, p.numel() // 4096)].float().abs() for p in params])
    scale = float(sample[sample > 0].median()) if bool((sample > 0).any()) else 0.0
    resolution = scale * HALF_ULP[name]
    if lr < resolution:
        raise SddError(f"learning_rate {lr:g} is below what {name} weights can represent (median |w| {scale:.3g} x "
                       f"2^{int(math.log2(HALF_ULP[name]))} = {resolution:.2g}): most updates would round away; "
                       "keep the trained model in float32 (train_dtype: float32, the default; bf16 compute stays on)")


def engine_report(trainer) -> dict:
    """What the engine did to the model on this rank, read from the parameters themselves after prepare:
    ZeRO-3 leaves a partition in `ds_tensor` (full size `ds_numel`), FSDP2 a DTensor's local shard."""
    from sdd.models import is_dtensor, is_zero3_partitioned

    local = full = zero3 = dtensor = trainable = 0
    params = list(trainer.model.parameters())
    for p in params:
        if is_zero3_partitioned(p):
            zero3 += 1
            local, size = local + p.ds_tensor.numel(), p.ds_numel
        elif is_dtensor(p):
            dtensor += 1
            local, size = local + p.to_local().numel(), p.numel()
        else:
            local, size = local + p.numel(), p.numel()
        full += size
        trainable += size if p.requires_grad else 0  # a LoRA run trains the adapter's elements only
    acc = trainer.accelerator
    return {"distributed_type": getattr(acc.distributed_type, "value", str(acc.distributed_type)),
            "processes": acc.num_processes, "rank": acc.process_index, "parameters": len(params),
            "zero3_partitioned": zero3, "dtensor": dtensor, "local_elements": local, "full_elements": full,
            "trainable_elements": trainable,
            "master_dtype": "float32" if trainer.is_deepspeed_enabled else str(params[0].dtype).removeprefix("torch.")}


def prepare_teacher(trainer, teacher):
    """The frozen teacher placed under the student's engine: a ZeRO-3 inference engine (partitioned like the
    student) under DeepSpeed, `fully_shard` under FSDP2, else an evaluation-mode copy per rank (DDP, one
    process). One function for every trainer that carries a teacher (distill, warmup)."""
    from trl.models.utils import prepare_deepspeed, prepare_fsdp

    if trainer.is_deepspeed_enabled:
        prepared = prepare_deepspeed(teacher, trainer.accelerator)
    elif trainer.is_fsdp_enabled:
        prepared = prepare_fsdp(teacher, trainer.accelerator)
    else:
        prepared = trainer.accelerator.prepare_model(teacher, evaluation_mode=True)
    prepared.eval()
    return prepared
