"""The TRL trainers sdd trains with, made safe to stop, resume and fail, and the one call that trains them.

`train` is what every training stage calls: it checks the engine and the update precision before any
step, resumes from the newest complete checkpoint, and writes `final/` whole. The guard (`guarded`)
refuses a non-finite loss before it reaches the weights and turns a failed checkpoint write into an error
that names the last good checkpoint.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from sdd.train.callbacks import EngineCheck, quiet_trainer
from sdd.train.checkpoints import CheckpointWriteFailed, io_failure, resume_point, save_final
from sdd.train.distributed import any_rank
from sdd.train.engines import check_engine_requested, check_update_precision
from sdd.train.lifecycle import NonFiniteLoss, Stage


def guarded(trainer_cls):
    """A subclass of a TRL trainer made safe to stop, resume and fail: it refuses a non-finite loss or
    gradient before the optimizer applies it, turns a failed checkpoint write into an error that says
    which checkpoint is still good, and makes the data order of every epoch reproducible on resume.

    The loss is checked on every micro-step and the gradient norm (the global one the trainer computes
    for clipping) before every optimizer step: a finite loss can still give non-finite gradients, and
    an update made from them would put NaN weights in the next checkpoint. Every rank agrees on the
    verdict, so all stop at the same step; the last checkpoint on disk stays the last good one.
    """

    import torch

    class Guarded(trainer_cls):
        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            value = float(loss.detach().float().sum())
            if any_rank(not math.isfinite(value)):
                what = f"loss became {value}" if not math.isfinite(value) else "loss became non-finite on another rank"
                raise NonFiniteLoss(self.state.global_step + 1, what)
            return loss

        def _get_grad_norm(self, *args, **kwargs):
            norm = super()._get_grad_norm(*args, **kwargs)
            if norm is not None:
                value = float(norm)
                if not math.isfinite(value):  # the norm is global: every rank sees the same value
                    raise NonFiniteLoss(self.state.global_step + 1, f"gradient norm became {value}")
            return norm

        def _get_train_sampler(self, *args, **kwargs):
            # TRL's RepeatSampler (GRPO, distillation) seeds one generator at construction and draws each
            # epoch's order from it in turn, so a process resumed in epoch k drew epoch 1's order again:
            # a different data order than the run that was never stopped. Seeding it from (seed, epoch)
            # whenever the dataloader announces an epoch makes every epoch's order independent of history.
            sampler = super()._get_train_sampler(*args, **kwargs)
            if getattr(sampler, "seed", None) is not None and isinstance(getattr(sampler, "generator", None), torch.Generator) \
                    and not hasattr(sampler, "set_epoch"):
                sampler.set_epoch = lambda epoch: sampler.generator.manual_seed(sampler.seed + epoch)
            return sampler

        def _issue_warnings_after_load(self, load_result):
            # Resuming a model with tied embeddings warns that lm_head.weight is "missing" (transformers 5.23
            # looks for tied keys where v5 models no longer list them); it is the embedding matrix, loaded.
            # Only that false alarm is dropped: a key whose tensor is not shared with a loaded one still warns.
            missing = list(load_result.missing_keys)
            if missing:
                params = dict(self.model.named_parameters(remove_duplicate=False))
                loaded = {p.data_ptr() for n, p in params.items() if n not in missing}
                missing = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]
                load_result = load_result._replace(missing_keys=missing)
            return super()._issue_warnings_after_load(load_result)

        def _save_checkpoint(self, *args, **kwargs):
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            target = Path(self._get_output_dir(trial=None)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            try:
                return super()._save_checkpoint(*args, **kwargs)
            except Exception as err:
                reason = io_failure(err, target)
                if reason is None:
                    raise
                if self.accelerator.is_main_process:  # half a checkpoint: free its space now, resume never uses it
                    shutil.rmtree(target, ignore_errors=True)
                raise CheckpointWriteFailed(target, reason) from err

    Guarded.__name__ = f"Guarded{trainer_cls.__name__}"
    return Guarded


def stopped_early(trainer, stage: Stage) -> bool:
    """True when a signal stopped training before its last step (a checkpoint is saved; the stage ends interrupted).

    A signal that arrives after the last step changes nothing: the final model is seconds away.
    """
    return stage.flag.requested is not None and trainer.state.global_step < trainer.state.max_steps


def train(trainer, stage: Stage, resume: Path | None = None) -> Path | None:
    """Train from the newest complete checkpoint; the final model's path, or None if stopped by a signal."""
    quiet_trainer(trainer)
    check_engine_requested(trainer)
    check_update_precision(trainer)
    trainer.add_callback(EngineCheck(trainer, stage))
    resume = resume or resume_point(stage.dir)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stopped_early(trainer, stage):
        return None
    return save_final(trainer, stage.dir / "final")
