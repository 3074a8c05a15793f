"""GRPO with the math verifier as reward: what `sdd teacher-rl` and `sdd student-rl` share.

TRL's GRPOTrainer does the training; sdd adds the reward (the verifier), the paper's
defaults, and a difficulty gate. The gate exists because of what GRPO's group-normalised
advantage does with extremes: a prompt the policy never solves gives every completion the
same zero reward (no gradient, or a degenerate shortcut when something is rewarded by
accident), and a prompt it always solves carries no signal either. Measuring the pass rate
once before training and keeping only prompts in between spends the rollouts where reward
can teach.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from sdd import config as cfg
from sdd import data
from sdd.errors import SddError
from sdd.manifest import RunDir, atomic_write_text
from sdd.rewards import get_reward_funcs
from sdd.stages import common
from sdd.train.distributed import any_rank
from sdd.train.lifecycle import finish, open_stage


@dataclasses.dataclass
class RlOptions(common.TrainingOptions):
    model: str | None = dataclasses.field(default=None, metadata={
        "help": "Model to train: a path, hub id or run dir (default: for teacher-rl, the newest teacher checkpoint "
                "in the run; for student-rl, distill, else warmup, else the base student)."})
    gate: bool = dataclasses.field(default=False, metadata={
        "help": "Drop prompts the policy always or never solves before training."})
    gate_samples: int = dataclasses.field(default=8, metadata={"help": "Samples per prompt that measure the gate's pass rates."})
    gate_temperature: float = dataclasses.field(default=1.0, metadata={"help": "Sampling temperature of the gate's samples."})
    backend: str = dataclasses.field(default="hf", metadata={"help": "Rollout engine: hf (transformers) or vllm."})
    # The authors' train_batch_size / ppo_mini_batch_size, 512 / 128 = 4.
    updates_per_rollout: int = dataclasses.field(default=4, metadata={
        "help": "Optimizer steps taken on each rollout batch: sets TRL's steps_per_generation to this many "
                "gradient-accumulation windows, so the policy moves between the steps and the clipped ratio "
                "binds. 1 = on-policy (ratio always 1)."})
    rewards: list[str] = dataclasses.field(default_factory=lambda: ["math_verify"], metadata={
        "help": "GRPO rewards by name from sdd/rewards.py (weights: TRL's own reward_weights field)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.updates_per_rollout, int) or self.updates_per_rollout < 1:
            raise ValueError(f"updates_per_rollout must be a positive integer, not {self.updates_per_rollout!r}")


# The paper's authors' recipe (scripts/grpo/train_grpo.sh; docs/recipe.md has the sources): DAPO
# token-mean loss, clip 0.2/0.28 with dual-clip c = 10 (TRL's two-sided `delta`), no KL term, 8
# rollouts per prompt at temperature 1.0, constant lr 1e-6 with no warmup, weight decay 0.1,
# gradient clipping at 1.0, one pass over each rollout batch (`num_iterations` 1) in 4 updates.
DEFAULTS = {
    **common.TRAINER_DEFAULTS,
    "loss_type": "dapo",
    "epsilon": 0.2,
    "epsilon_high": 0.28,
    "delta": 10.0,
    "beta": 0.0,
    "num_generations": 8,
    "num_iterations": 1,
    "temperature": 1.0,
    "learning_rate": 1e-6,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "weight_decay": 0.1,
    "max_grad_norm": 1.0,
    "max_completion_length": 4096,
    "logging_steps": 5,
    "save_steps": 50,
}

HEADLINE = ("reward", "completions/clipped_ratio", "entropy")


def reward_function():
    """The default reward (math_verify); sdd/rewards.py holds the registry a recipe picks from."""
    from sdd.rewards import math_verify_factory

    return math_verify_factory()


GATE_CHUNK = 256  # prompts per generate call: a SIGTERM during the gate waits for one chunk, not the whole pass


def apply_gate(model, tokenizer, rows: list[dict], options: RlOptions, max_new_tokens: int, path: Path,
               flag=None, ranks=None, seed: int = 0) -> tuple[list[dict], dict] | None:
    """Keep prompts whose measured pass rate is strictly between 0 and 1; cached so a resume sees the same set.

    Under a launcher the ranks split every chunk (rank r of P takes positions r, r + P, ...) and each
    generates on its own device, the model gathered first if ZeRO-3 partitioned it at load; the pass
    rates are exchanged after each chunk, so every rank keeps the same set, the set one process keeps
    (a prompt's samples depend on `seed`, its chunk and position, not on the rank that draws them; the
    stage passes its training seed, so chains with other seeds measure with other draws). The cache
    (`path`, gate.json) is keyed by the model's fingerprint, the prompts and the options: a rerun from
    another checkpoint, even with --force, measures again.

    None when a signal (`flag`, a PreemptionFlag) stopped it between chunks: the stage then ends
    interrupted without training, and the rerun measures again.
    """
    import hashlib

    from sdd.generation import Ranks, SamplingParams, generate, ready_for_generation
    from sdd.manifest import fingerprint
    from sdd.verify import score_completions

    ranks = ranks or Ranks.current()
    source = str(model.name_or_path)
    key = {
        "model": fingerprint(source) if Path(source).exists() else f"hub:{source}",
        "problems": hashlib.sha256(json.dumps([(r["id"], r["prompt"], r["answer"]) for r in rows]).encode()).hexdigest()[:16],
        "options": [options.gate_samples, options.gate_temperature, max_new_tokens, seed],
    }
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            keep = set(cached["kept_ids"])
            return [r for r in rows if r["id"] in keep], cached["buckets"]

    n = options.gate_samples
    params = SamplingParams(n=n, temperature=options.gate_temperature, top_p=1.0, top_k=0,
                            max_new_tokens=max_new_tokens, seed=0)
    rates: dict[int, float] = {}
    with ready_for_generation(model, ranks.device):  # every rank enters: a ZeRO-3 gather is a collective
        for start in range(0, len(rows), GATE_CHUNK):
            if flag is not None and any_rank(flag.requested is not None):
                return None
            chunk = rows[start:start + GATE_CHUNK]
            positions = ranks.share(len(chunk))
            mine = [chunk[p] for p in positions]
            groups = generate(model, tokenizer, [r["prompt"] for r in mine], dataclasses.replace(params, seed=seed * 1_000_003 + start),
                              backend="hf", prompt_indices=positions) if mine else []
            texts = [c.text for group in groups for c in group]
            scores = score_completions(texts, [r["answer"] for r in mine for _ in range(n)]) if texts else []
            measured = {start + p: sum(scores[i * n:(i + 1) * n]) / n for i, p in enumerate(positions)}
            for part in ranks.all_gather(measured):
                rates.update(part)
    kept, buckets = [], {"never": 0, "sometimes": 0, "always": 0}
    for i, row in enumerate(rows):
        rate = rates[i]
        bucket = "never" if rate == 0 else "always" if rate == 1 else "sometimes"
        buckets[bucket] += 1
        if bucket == "sometimes":
            kept.append(row)
    buckets["kept"] = len(kept)
    if ranks.index == 0:
        atomic_write_text(path, json.dumps({"key": key, "buckets": buckets, "kept_ids": [r["id"] for r in kept]}))
    if not kept:
        raise SddError(f"the difficulty gate kept no prompts ({buckets}); train without --gate or on other data")
    return kept, buckets


def configure(args: common.StageArgs, stage: str):
    """(stage name, sdd options, GRPOConfig): every layer resolved, nothing loaded yet."""
    from trl import GRPOConfig

    from sdd.generation import trainer_generation_options

    name = args.name or stage
    options, trl_kwargs = common.resolve_options((stage, name), RlOptions, GRPOConfig, args, {
        **common.device_defaults(), **DEFAULTS,
    })
    # The backend picks TRL's rollout engine; explicit TRL fields (use_vllm, vllm_mode, ...) still win.
    trl_kwargs = {**trainer_generation_options(options.backend), **trl_kwargs,
                  **common.trainer_identity(args, name, trl_kwargs), "chat_template_kwargs": options.chat_template_kwargs}
    trl_kwargs.update(rollout_schedule(options, trl_kwargs))
    return name, options, cfg.build_trl_config(GRPOConfig, trl_kwargs)


def rollout_schedule(options: RlOptions, trl_kwargs: dict) -> dict:
    """TRL's `steps_per_generation` for `updates_per_rollout` optimizer steps per rollout batch.

    TRL counts `steps_per_generation` in micro-batches (gradient-accumulation steps), so one
    generation feeding k optimizer steps needs k x gradient_accumulation_steps. A layer that sets
    `steps_per_generation` or `generation_batch_size` itself wins.
    """
    if trl_kwargs.get("steps_per_generation") is not None or trl_kwargs.get("generation_batch_size") is not None:
        return {}
    accumulation = trl_kwargs.get("gradient_accumulation_steps", 1)
    return {"steps_per_generation": options.updates_per_rollout * accumulation}


def run(args: common.StageArgs, *, stage: str, role: str, prefer: tuple[str, ...]) -> dict:
    name, options, trl_config = configure(args, stage)
    reward_funcs = get_reward_funcs(options.rewards)  # an unknown name fails before any work
    run_dir = RunDir(args.run)
    start = common.resolve_checkpoint(run_dir, role, options.model, exclude=name, prefer=prefer,
                                      revision=options.model_revision)
    source, records, skipped = options.problems(run_dir)

    from sdd.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(start.path, trust_remote_code=options.trust_remote_code, revision=start.revision)
    rows = [{"id": r["id"], "prompt": data.render_prompt(tokenizer, r["problem"], options.chat_template_kwargs),
             "answer": r["answer"]} for r in records]
    resolved = {"sdd": options, "trl": trl_config.to_dict()}
    inputs = {"model": start, "dataset": common.StageInput(source.describe())}
    with open_stage(args, name=name, stage=stage, role=role, config=resolved, inputs=inputs) as handle:
        # imported late: a bad option fails seconds sooner
        from datasets import Dataset

        from sdd.train.callbacks import make_callbacks, summarize_logs
        from sdd.train.trainers import GuardedGRPOTrainer, train

        model = load_causal_lm(start.path, dtype=options.train_dtype, trust_remote_code=options.trust_remote_code,
                               revision=start.revision)
        metrics: dict = {"skipped_unparsable_golds": skipped}
        if options.gate:
            gated = apply_gate(model, tokenizer, rows, options, trl_config.max_completion_length,
                               handle.dir / "gate.json", flag=handle.flag, seed=trl_config.seed)
            if gated is None:
                return {}
            rows, metrics["gate"] = gated
        trainer = GuardedGRPOTrainer(
            model=model, reward_funcs=reward_funcs, args=trl_config,
            train_dataset=Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows]),
            processing_class=tokenizer,
            callbacks=make_callbacks(handle.flag, handle.dir, name, HEADLINE), peft_config=options.peft_config(),
        )
        final = train(trainer, handle, merge_base=options.merge_base(start), run_group=options.run_group)
        if final is None:
            return {}
        metrics.update(summarize_logs(trainer.state.log_history, {
            "reward": "reward", "solve_rate_any": "solve_rate/any_in_group",
            "truncation_rate": "completions/clipped_ratio", "entropy": "entropy",
            "mean_completion_tokens": "completions/mean_length",
        }))
        metrics.update(reward_first=_first(trainer.state.log_history, "reward"), steps=trainer.state.global_step,
                       tokens=trainer.state.num_input_tokens_seen, prompts=len(rows))
        finish(handle, outputs=handle.output(role, final), metrics=metrics, push=options.hub_target(trl_config))
        return metrics


def _first(log_history: list[dict], key: str) -> float | None:
    return next((entry[key] for entry in log_history if key in entry), None)
