"""Training: the stage lifecycle, checkpoints, callbacks and the TRL trainers sdd trains with.

    lifecycle.py    open_stage / finish: lock, manifest record, signals, how a stage ended
    checkpoints.py  origin check, complete checkpoints, resume point, the final model, I/O failures
    callbacks.py    TrainerCallbacks: stop on a signal, log.jsonl, progress, the engine check
    engines.py      what DeepSpeed/FSDP did to the model, update precision, the frozen teacher's placement
    trainers.py     the guarded TRL trainers and `train`
    distributed.py  verdicts every rank agrees on (`any_rank`)

The trainer classes import TRL, so they are loaded on first use: `from sdd.train import ForwardKLTrainer`
works, while `import sdd.train.lifecycle` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module under sdd.train that defines it
_EXPORTS = {
    "GuardedMixin": "trainers",
    "GuardedSFTTrainer": "trainers",
    "GuardedGRPOTrainer": "trainers",
    "ForwardKLTrainer": "trainers",
    "OnPolicyDistiller": "trainers",
    "train": "trainers",
    "make_callbacks": "callbacks",
    "open_stage": "lifecycle",
    "finish": "lifecycle",
    "any_rank": "distributed",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
