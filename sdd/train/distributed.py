"""What the ranks of one launch must agree on before they act.

Ranks that disagree about stopping, failing or a checkpoint's state hang in the next collective, so
every such verdict goes through one all-reduce here. Outside a launcher (one process) it costs nothing.
"""

from __future__ import annotations


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any: ranks that disagree about stopping hang in the next collective."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
