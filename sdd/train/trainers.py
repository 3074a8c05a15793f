"""The TRL trainers sdd trains with, made safe to stop, resume and fail, and the one call that trains them.

`train` is what every training stage calls: it checks the engine and the update precision before any
step, resumes from the newest complete checkpoint, and writes `final/` whole. `GuardedMixin` refuses a
non-finite loss before it reaches the weights and turns a failed checkpoint write into an error that
names the last good checkpoint; every trainer below has it first in its bases:

    GuardedSFTTrainer    sft, and warmup's hard-label control (objective: sft)
    GuardedGRPOTrainer   teacher-rl, student-rl
    ForwardKLTrainer     warmup: SFTTrainer on the teacher's samples, loss forward KL to the frozen teacher
    OnPolicyDistiller    distill: TRL's DistillationTrainer with sdd's loss (sdd.losses)

They are plain module-level classes, so a script of its own (open-r1 style) can import and build them:
`from sdd.train import ForwardKLTrainer, OnPolicyDistiller`.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import DistillationTrainer, GRPOTrainer, SFTTrainer
from trl.models.utils import _ForwardRedirection

from sdd.agreement import last_hidden_states
from sdd.losses import (
    divergence_loss,
    resolve_impl,
    sampled_token_reverse_kl_loss,
    selected_token_logprobs,
    token_divergence,
)
from sdd.models import head_for_loss
from sdd.tracking import group_callbacks
from sdd.train.callbacks import EngineCheck, quiet_trainer
from sdd.train.checkpoints import (
    AdapterBase,
    CheckpointWriteFailed,
    io_failure,
    resume_point,
    save_final,
    seal,
)
from sdd.train.distributed import any_rank
from sdd.train.engines import check_engine_requested, check_update_precision, prepare_teacher
from sdd.train.lifecycle import NonFiniteLoss, Stage


class GuardedMixin:
    """What makes a TRL trainer safe to stop, resume and fail, mixed in before it: it refuses a non-finite loss or
    gradient before the optimizer applies it, turns a failed checkpoint write into an error that says
    which checkpoint is still good, and makes the data order of every epoch reproducible on resume.

    The loss is checked on every micro-step and the gradient norm (the global one the trainer computes
    for clipping) before every optimizer step: a finite loss can still give non-finite gradients, and
    an update made from them would put NaN weights in the next checkpoint. Every rank agrees on the
    verdict, so all stop at the same step; the last checkpoint on disk stays the last good one.
    """

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
        target = Path(self._get_output_dir(trial=None)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        try:
            result = super()._save_checkpoint(*args, **kwargs)
            self.accelerator.wait_for_everyone()  # every rank's part (RNG states, ZeRO shards) is written
            if self.args.should_save:
                seal(target)  # last: a resume trusts the checkpoint only as this record describes it
            return result
        except Exception as err:
            reason = io_failure(err, target)
            if reason is None:
                raise
            if self.accelerator.is_main_process:  # half a checkpoint: free its space now, resume never uses it
                shutil.rmtree(target, ignore_errors=True)
            raise CheckpointWriteFailed(target, reason) from err


class GuardedSFTTrainer(GuardedMixin, SFTTrainer):
    """TRL's SFTTrainer with the guard: `sdd sft` and warmup's hard-label control."""


class GuardedGRPOTrainer(GuardedMixin, GRPOTrainer):
    """TRL's GRPOTrainer with the guard: `sdd teacher-rl` and `sdd student-rl`."""


class ForwardKLTrainer(GuardedMixin, SFTTrainer):
    """An SFTTrainer whose loss is forward KL to a frozen teacher instead of cross-entropy on tokens (warmup).

    The dataset is the teacher's own samples, pre-tokenized, with `completion_only_loss`; at every completion
    position the student is pulled toward the teacher's whole next-token distribution (sdd.losses,
    `divergence_loss` with beta 0), both heads sliced to the shared vocabulary `vocab_size`.
    """

    def __init__(self, *args, teacher_model, vocab_size: int, kl_temperature: float, kl_impl: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.vocab_size = vocab_size
        self.kl_temperature = kl_temperature
        self.kl_impl = kl_impl  # checked by sdd.losses.resolve_impl
        self.kl_impl_ran: str | None = None  # "trl" or "torch", once a loss was computed
        self._redirect = _ForwardRedirection()
        self.teacher_model = prepare_teacher(self, teacher_model)

    def _kl(self, student, inputs, num_items_in_batch):
        ids, attention, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        scored_BT = labels[:, 1:] != -100  # position t is scored when it predicts a completion token t+1
        h_student_BTH = last_hidden_states(student, ids, attention)[:, :-1]
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            h_teacher_BTH = self._redirect(self.teacher_model, teacher, last_hidden_states, teacher, ids, attention)
        with head_for_loss(student, trainable=True) as head_s, head_for_loss(teacher, trainable=False) as head_t:
            self.kl_impl_ran = resolve_impl(self.kl_impl, h_student_BTH, head_s)
            return divergence_loss(
                h_student_BTH, head_s, h_teacher_BTH[:, :-1], head_t, scored_BT,
                beta=0.0, temperature=self.kl_temperature, vocab_size=self.vocab_size,
                num_items_in_batch=num_items_in_batch, impl=self.kl_impl,
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student = self.accelerator.unwrap_model(model)
        loss, stats = self._redirect(model, student, self._kl, student, inputs, num_items_in_batch)
        # As SFTTrainer.compute_loss does: `num_items_in_batch` counts every rank's tokens, and DDP (and
        # DeepSpeed) average the P ranks' gradients, so each rank's sum/all-rank-count is scaled by P. Without
        # it the gradient, the logged loss and the clip threshold were those of a loss P times smaller.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        mode = "train" if self.model.training else "eval"
        tokens, kl_sum, ent_sum = (self.accelerator.gather_for_metrics(stats[key].reshape(1)).sum()
                                   for key in ("num_tokens", "divergence_sum", "entropy_sum"))
        self._metrics[mode]["forward_kl"].append((kl_sum / tokens.clamp(min=1)).item())
        self._metrics[mode]["entropy"].append((ent_sum / tokens.clamp(min=1)).item())
        return (loss, None) if return_outputs else loss


class OnPolicyDistiller(GuardedMixin, DistillationTrainer):
    """TRL's DistillationTrainer with sdd's loss (distill): the student's own rollouts, scored by the frozen teacher.

    sdd replaces the loss, not the loop: TRL samples, batches and redirects the forward through the engine;
    `_compute_loss` here slices padded vocabularies to the shared tokenizer, offers the sampled-token
    estimator beside the full-vocabulary one, and logs reverse KL, the teacher's NLL and truncation.

    Why a private method: TRL 1.16's DistillationTrainer has no public hook for the loss alone. Its public
    `compute_loss` also rescales `num_items_in_batch` to the generated tokens, routes the call through the
    DDP/FSDP/DeepSpeed wrapper and logs entropy; overriding it would copy that code. So this class overrides
    `_compute_loss(unwrapped_student, inputs, num_items_in_batch) -> (loss, entropy_sum, num_tokens)`,
    which `compute_loss` calls. tests/test_trainers.py fails loudly if TRL renames it, changes its
    signature or stops calling it.
    """

    def __init__(self, *args, teacher_model, vocab_size: int, estimator: str, kl_impl: str = "auto", **kwargs):
        super().__init__(*args, teacher_model=None, **kwargs)
        self.vocab_size = vocab_size
        self.estimator = estimator
        self.kl_impl = kl_impl  # checked by sdd.losses.resolve_impl
        self.kl_impl_ran: str | None = None  # "trl" or "torch", once a loss was computed
        self.teacher_model = prepare_teacher(self, teacher_model)

    def _log_mean(self, name: str, values_N: torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        total = self.accelerator.gather_for_metrics(values_N.detach().float().sum().reshape(1)).sum()
        count = self.accelerator.gather_for_metrics(torch.tensor([values_N.numel()], device=total.device)).sum()
        self._metrics[mode][name].append((total / count.clamp(min=1)).item())

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask_BC = inputs["completion_mask"].bool()
        completions = inputs["completion_ids"].size(1)
        h_student = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, completions)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        self.teacher_model.eval()
        with torch.no_grad():
            h_teacher = self._forward_redirection(self.teacher_model, teacher, self._get_last_hidden_state, teacher,
                                                  input_ids, attention_mask, completions)
        h_student_N, h_teacher_N = h_student[mask_BC], h_teacher[mask_BC]
        tokens_N = inputs["completion_ids"][mask_BC]
        with head_for_loss(unwrapped_student, trainable=True) as head_s, \
                head_for_loss(teacher, trainable=False) as head_t:
            self.kl_impl_ran = resolve_impl(self.kl_impl, h_student_N, head_s)
            with torch.no_grad():
                teacher_logprobs_N = selected_token_logprobs(h_teacher_N, head_t, tokens_N, temperature=self.temperature,
                                                             vocab_size=self.vocab_size, impl=self.kl_impl)
            denominator = num_items_in_batch if num_items_in_batch is not None else max(1, tokens_N.numel())
            if self.estimator == "sampled-token":
                student_logprobs_N = selected_token_logprobs(h_student_N, head_s, tokens_N, temperature=self.temperature,
                                                             vocab_size=self.vocab_size, impl=self.kl_impl)
                loss, _ = sampled_token_reverse_kl_loss(
                    student_logprobs_N.unsqueeze(0), teacher_logprobs_N.unsqueeze(0),
                    torch.ones_like(student_logprobs_N, dtype=torch.bool).unsqueeze(0),
                    num_items_in_batch=denominator,
                )
                per_token_kl_N = (student_logprobs_N - teacher_logprobs_N).detach()  # the estimator's own KL sample
                entropy_N = -student_logprobs_N.detach()
            else:
                divergence_N, entropy_N = token_divergence(
                    h_student_N, head_s, h_teacher_N, head_t, beta=self.beta,
                    temperature=self.temperature, vocab_size=self.vocab_size, impl=self.kl_impl,
                )
                loss = divergence_N.sum() / denominator
                per_token_kl_N = divergence_N.detach()
        self._log_mean("reverse_kl" if self.estimator == "sampled-token" or self.beta == 1.0 else "divergence",
                       per_token_kl_N)
        self._log_mean("teacher_nll", -teacher_logprobs_N)
        ended = inputs["completion_ids"].gather(1, (mask_BC.sum(1, keepdim=True) - 1).clamp(min=0))
        eos = self.processing_class.eos_token_id
        self._log_mean("truncated", (ended.squeeze(1) != eos).float())
        return loss, entropy_N.detach().sum(), torch.tensor(float(tokens_N.numel()), device=loss.device)


def stopped_early(trainer, stage: Stage) -> bool:
    """True when a signal stopped training before its last step (a checkpoint is saved; the stage ends interrupted).

    A signal that arrives after the last step changes nothing: the final model is seconds away.
    """
    return stage.flag.requested is not None and trainer.state.global_step < trainer.state.max_steps


def train(trainer, stage: Stage, resume: Path | None = None, *, merge_base: AdapterBase | None = None,
          run_group: str | None = None) -> Path | None:
    """Train from the newest complete checkpoint; the final model's path, or None if stopped by a signal.

    `merge_base`: the model a LoRA adapter is merged into for `final/` (None: a PEFT model's final/ is
    its adapter alone). `run_group`: the tracker group of this job's run (sdd.tracking).
    """
    quiet_trainer(trainer)
    check_engine_requested(trainer)
    check_update_precision(trainer)
    trainer.add_callback(EngineCheck(trainer, stage))
    for callback in group_callbacks(run_group, trainer.args.report_to):  # after the trackers' own callbacks
        trainer.add_callback(callback)
    resume = resume or resume_point(stage.dir)
    if resume and trainer.accelerator.is_main_process:
        print(f"{stage.name}: resuming from {resume.name}", flush=True)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stopped_early(trainer, stage):
        return None
    return save_final(trainer, stage.dir / "final", merge_base)
