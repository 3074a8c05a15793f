"""What sdd adds to a training step: the same TRL trainer, bare and as sdd builds it, side by side.

For each stage the bare trainer is TRL's own class with the stage's resolved config; the sdd
trainer adds what the stage adds per step: the non-finite-loss guard, the preemption callback
(with its cross-rank agreement), the log-to-disk and progress callbacks, and for distill sdd's
loss (padded-vocab slicing, teacher NLL and truncation logging). Model loading and data
preparation are identical and excluded: `train_runtime` of `trainer.train()` is compared.
Runs alternate bare/sdd `--repeats` times. On a shared machine run-to-run noise is larger than the
effect, so the table gives each side's fastest run (the least-disturbed estimate of its cost, as
`timeit` does) in process CPU time and in wall time, and the median and range of the paired wall
ratios. CPU time counts every thread of the process, so sdd's progress display is charged to sdd.

    python benchmarks/stage_overhead.py --steps 20 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def toy(root: Path) -> Path:
    from sdd.stages import toy_init

    run = root / "run"
    toy_init.run(run, seed=0)
    return run


def toy_rows(run: Path, model: str, fields) -> tuple[str, object, list[dict]]:
    """(model path, tokenizer, dataset rows): the first 512 toy-train problems rendered as the stages render them."""
    from sdd import data
    from sdd.models import load_tokenizer

    model_path = str(run / "toy" / model)
    tokenizer = load_tokenizer(model_path)
    records = data.load(data.resolve(str(run / "toy" / "data" / "train.jsonl")))[:512]
    return model_path, tokenizer, [{"prompt": data.render_prompt(tokenizer, r["problem"]), **fields(r)} for r in records]


def with_sdd_callbacks(trainer, out: Path, label: str, headline: tuple[str, ...]):
    """The callbacks every sdd stage adds, and its progress bar in place of transformers' printing."""
    from sdd.train.callbacks import make_callbacks, quiet_trainer
    from sdd.train.lifecycle import PreemptionFlag

    for callback in make_callbacks(PreemptionFlag(), out, label, headline):
        trainer.add_callback(callback)
    quiet_trainer(trainer)
    return trainer


def sft_trainer(run: Path, steps: int, sdd_side: bool, out: Path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from sdd.models import load_causal_lm
    from sdd.train.trainers import GuardedSFTTrainer

    model_path, tokenizer, rows = toy_rows(run, "teacher-base", lambda r: {"completion": r["solution"]})
    config = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=32, bf16=False,
                       use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no",
                       logging_steps=5, disable_tqdm=True)
    cls = GuardedSFTTrainer if sdd_side else SFTTrainer
    trainer = cls(model=load_causal_lm(model_path), args=config, train_dataset=Dataset.from_list(rows),
                  processing_class=tokenizer)
    return with_sdd_callbacks(trainer, out, "sft", ("loss",)) if sdd_side else trainer


def grpo_trainer(run: Path, steps: int, sdd_side: bool, out: Path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from sdd.models import load_causal_lm
    from sdd.stages import rl
    from sdd.train.trainers import GuardedGRPOTrainer
    from sdd.verify import math_reward

    model_path, tokenizer, rows = toy_rows(run, "student-base", lambda r: {"answer": r["answer"]})
    config = GRPOConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=32, num_generations=8,
                        max_completion_length=48, bf16=False, use_cpu=not torch.cuda.is_available(),
                        report_to="none", save_strategy="no", logging_steps=5, disable_tqdm=True,
                        **{k: v for k, v in rl.DEFAULTS.items() if k in ("loss_type", "epsilon", "epsilon_high", "beta")})
    reward = rl.reward_function() if sdd_side else math_reward
    cls = GuardedGRPOTrainer if sdd_side else GRPOTrainer
    trainer = cls(model=load_causal_lm(model_path), reward_funcs=[reward], args=config,
                  train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return with_sdd_callbacks(trainer, out, "grpo", rl.HEADLINE) if sdd_side else trainer


def distill_trainer(run: Path, steps: int, sdd_side: bool, out: Path):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    from sdd.models import load_causal_lm
    from sdd.stages import distill
    from sdd.train.trainers import OnPolicyDistiller

    student_path, tokenizer, rows = toy_rows(run, "student-base", lambda r: {})
    config = DistillationConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=16,
                                max_completion_length=48, bf16=False, use_cpu=not torch.cuda.is_available(),
                                report_to="none", save_strategy="no", logging_steps=5, disable_tqdm=True,
                                gradient_checkpointing=False)
    student, teacher = load_causal_lm(student_path), load_causal_lm(str(run / "toy" / "teacher-base"))
    kwargs = dict(model=student, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    if not sdd_side:
        return DistillationTrainer(teacher_model=teacher, **kwargs)
    trainer = OnPolicyDistiller(
        teacher_model=teacher, vocab_size=len(tokenizer), estimator="full-vocab", **kwargs)
    return with_sdd_callbacks(trainer, out, "distill", distill.HEADLINE)


BUILDERS = {"sft": sft_trainer, "grpo": grpo_trainer, "distill": distill_trainer}


def time_train(builder, run: Path, steps: int, sdd_side: bool, out: Path) -> tuple[float, float]:
    """(wall, process CPU) seconds per step."""
    torch.manual_seed(0)
    trainer = builder(run, steps, sdd_side, out)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", default="sft,grpo,distill")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the figures as JSON here (benchmarks/gpu_check.py reads it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="sdd-overhead-"))
    run = toy(root)
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads {args.threads}, "
          f"{args.steps} steps, {args.repeats} alternating repeats", file=sys.stderr)
    print("| stage | bare TRL CPU s/step | through sdd CPU s/step | sdd / bare, CPU | sdd / bare, wall "
          "| paired wall ratio, median [range] |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for stage in args.stages.split(","):
        bare, ours = [], []
        for i in range(args.repeats):
            bare.append(time_train(BUILDERS[stage], run, args.steps, False, root / f"{stage}-bare-{i}"))
            ours.append(time_train(BUILDERS[stage], run, args.steps, True, root / f"{stage}-sdd-{i}"))
        (bare_wall, bare_cpu), (ours_wall, ours_cpu) = zip(*bare, strict=True), zip(*ours, strict=True)
        ratios = [o / b for o, b in zip(ours_wall, bare_wall, strict=True)]
        print(f"| {stage} | {min(bare_cpu):.3f} | {min(ours_cpu):.3f} | {min(ours_cpu) / min(bare_cpu):.3f} | "
              f"{min(ours_wall) / min(bare_wall):.3f} | {statistics.median(ratios):.3f} "
              f"[{min(ratios):.2f}, {max(ratios):.2f}] |", flush=True)
        rows.append({"stage": stage, "bare_cpu_s_per_step": min(bare_cpu), "sdd_cpu_s_per_step": min(ours_cpu),
                     "bare_wall_s_per_step": min(bare_wall), "sdd_wall_s_per_step": min(ours_wall),
                     "sdd_over_bare_wall": min(ours_wall) / min(bare_wall), "paired_wall_ratios": ratios})
    if args.json:
        import json

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        Path(args.json).write_text(json.dumps({"device": device, "steps": args.steps, "repeats": args.repeats,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
