"""What every stage command takes: its inputs, its options and the layers they are resolved from.

A stage module states only what is its own (its options, which TRL trainer, which loss). The lock,
the manifest record, checkpoints, signals and the guarded trainers live in `sdd.train`; what a stage
is given lives here: `StageArgs` (the command line), `DataOptions` (every stage's data options),
`resolve_options` (the config layers) and `StageInput` / `resolve_checkpoint` (where its models come from).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sdd import config as cfg
from sdd.errors import SddError
from sdd.manifest import RecordedCheckpoint, RunDir, fingerprint, recorded_checkpoint
from sdd.samples import SAMPLING


@dataclasses.dataclass
class StageInput:
    """A checkpoint or dataset a stage consumes, with where it came from for the manifest."""

    path: str
    from_stage: str | None = None
    run: str | None = None  # another run dir it was resolved in, when not this one
    expected_fingerprint: str | None = None
    revision: str | None = None  # of a hub model: the files a hub id named when the stage read it

    def record(self, trust_changed: bool) -> dict:
        entry: dict[str, Any] = {"path": self.path}
        if self.from_stage:
            entry["from_stage"] = self.from_stage
        if self.run:
            entry["run"] = self.run
        if self.revision:
            entry["revision"] = self.revision
        local = Path(self.path)
        if local.exists():
            entry["fingerprint"] = fingerprint(local)
            if self.expected_fingerprint and entry["fingerprint"] != self.expected_fingerprint:
                if not trust_changed:
                    raise SddError(
                        f"{self.path} changed since stage '{self.from_stage}' wrote it (fingerprint "
                        f"{self.expected_fingerprint} -> {entry['fingerprint']}); rerun that stage, or pass --trust-changed"
                    )
                entry["trusted_change"] = True
        return entry


@dataclasses.dataclass
class DataOptions:
    """Where a training stage's problems come from and how its prompts are rendered; every stage has these."""

    dataset: str = dataclasses.field(default="math-train", metadata={
        "help": "Training data: benchmark name, local jsonl/json/parquet, or hub id."})
    data_dir: str | None = dataclasses.field(default=None, metadata={
        "help": "Folder with local benchmark files (e.g. ../shared/data)."})
    problem_column: str | None = dataclasses.field(default=None, metadata={
        "help": "Column holding the problem text (default: the benchmark's own, else `problem`)."})
    answer_column: str | None = dataclasses.field(default=None, metadata={
        "help": "Column holding the gold answer (default: the benchmark's own, else `answer`)."})
    solution_column: str | None = dataclasses.field(default=None, metadata={
        "help": "Column holding worked solutions, which sft trains on (default: `solution`)."})
    answer_format: str | None = dataclasses.field(default=None, metadata={
        "help": "How the answer column states the answer: plain, gsm8k (text ending in '#### N') or boxed (the "
                "last \\boxed{} of a solution); default: the benchmark's own, else plain."})
    dataset_config: str | None = dataclasses.field(default=None, metadata={
        "help": "A hub dataset's configuration (datasets.load_dataset's `name`; TRL's dataset_config); default: "
                "the benchmark's own, else none."})
    dataset_split: str | None = dataclasses.field(default=None, metadata={
        "help": "A hub dataset's split to load (TRL's dataset_train_split); default: the benchmark's own, else "
                "train. Not `split`, which cuts what was loaded into train and held-out parts."})
    dataset_revision: str | None = dataclasses.field(default=None, metadata={
        "help": "A hub dataset's revision: branch, tag or commit (default: the newest)."})
    limit: int | None = dataclasses.field(default=None, metadata={"help": "Only the first N problems."})
    max_bad_answers: float = dataclasses.field(default=0.05, metadata={
        "help": "Largest share of records whose gold answer cannot be parsed that is skipped with a warning; "
                "more stops the run (the wrong column or format, most likely)."})
    chat_template_kwargs: dict = dataclasses.field(default_factory=SAMPLING.chat_template_kwargs, metadata={
        "help": "Keyword arguments of the tokenizer's chat template when prompts are rendered "
                "(Qwen3: enable_thinking)."})
    trust_remote_code: bool = dataclasses.field(default=False, metadata={
        "help": "Let transformers run code that ships with the model or tokenizer."})
    # Splitting happens before unverifiable golds are dropped, so the split is the same whichever
    # verifier version reads it.
    split: str | None = dataclasses.field(default=None, metadata={
        "help": "The authors' data protocol: shuffle the whole dataset with split_seed, keep the first "
                "split_fraction for training (train) and the rest held out (heldout); train-a / train-b halve "
                "the training part (the teacher's labels, and the labels only post-bridge student RL sees). "
                "None uses every record."})
    split_seed: int = dataclasses.field(default=42, metadata={"help": "Seed of the shuffle that defines split."})
    split_fraction: float = dataclasses.field(default=0.8, metadata={
        "help": "Share of the shuffled dataset that is train; the rest is heldout."})

    SPLITS = ("train", "heldout", "train-a", "train-b")

    def __post_init__(self) -> None:
        if self.split is not None and self.split not in self.SPLITS:
            raise ValueError(f"split must be one of {', '.join(self.SPLITS)} (or null for all data), not {self.split!r}")
        if not 0.0 < self.split_fraction < 1.0:
            raise ValueError(f"split_fraction must be between 0 and 1, not {self.split_fraction!r}")

    def split_records(self, records: list[dict]) -> list[dict]:
        """This option set's part of `records` (all of them when `split` is None).

        The order is numpy's `default_rng(split_seed).permutation`, the permutation
        `datasets.Dataset.shuffle(seed=split_seed)` applies, and the cut is `int(n * split_fraction)`,
        as in the authors' prepare_grpo_data.py; the halves of the training part cut at `n_train // 2`.
        """
        return self.select_split(records, self.split, self.split_seed, self.split_fraction)

    @staticmethod
    def select_split(records: list[dict], split: str | None, seed: int = 42, fraction: float = 0.8) -> list[dict]:
        if split is None:
            return list(records)
        import numpy as np

        order = np.random.default_rng(seed).permutation(len(records))
        cut = int(len(records) * fraction)
        part = {"train": order[:cut], "heldout": order[cut:], "train-a": order[: cut // 2],
                "train-b": order[cut // 2 : cut]}[split]
        return [records[i] for i in part]
    train_dtype: str = dataclasses.field(default="float32", metadata={
        "help": "dtype of the trained model's weights (the optimizer's master copy); compute is bf16 where "
                "`bf16: true`."})

    def problems(self, run: RunDir):
        """(source, records, skipped): this split of the dataset, unverifiable gold answers dropped."""
        return self.load_problems(self.dataset, run.datasets(), data_dir=self.data_dir, limit=self.limit,
                                  max_bad_fraction=self.max_bad_answers, split=self.split, split_seed=self.split_seed,
                                  split_fraction=self.split_fraction, **data_selection(self))

    def source(self, run: RunDir):
        """The dataset resolved (`sdd.data.DataSource`), for a stage that reads all of its records (sft)."""
        from sdd import data

        return data.resolve(self.dataset, data_dir=self.data_dir, registered=run.datasets(), **data_selection(self))

    @classmethod
    def load_problems(cls, name: str, registered: dict, *, data_dir=None, limit=None, max_bad_fraction: float = 0.05,
                      split=None, split_seed: int = 42, split_fraction: float = 0.8, **selection):
        """(source, records, skipped) for a dataset name and split; `eval` uses it for the held-out split.

        `selection` is what `sdd.data.resolve` takes besides the name (`data_selection` of an options object).
        """
        from sdd import data

        if split is None:
            return data.usable_problems(name, data_dir=data_dir, registered=registered, limit=limit,
                                        max_bad_fraction=max_bad_fraction, **selection)
        source = data.resolve(name, data_dir=data_dir, registered=registered, **selection)
        part = cls.select_split(data.load(source), split, split_seed, split_fraction)
        records, skipped = data.split_usable(part, max_bad_fraction=max_bad_fraction,
                                             where=f"{source.describe()} [{split} split, seed {split_seed}]")
        return source, records[:limit], skipped


def data_selection(options) -> dict[str, Any]:
    """What `sdd.data.resolve` takes from a stage's options besides the dataset name: the hub dataset's config,
    split and revision, and the column mapping (DataOptions and EvalOptions both carry these fields)."""
    return {name: getattr(options, name) for name in _DATA_SELECTION}


_DATA_SELECTION = ("dataset_config", "dataset_split", "dataset_revision", "problem_column", "answer_column",
                   "solution_column", "answer_format")


# A field whose metadata says `"trains": False` changes where a run is reported or published, not what
# it trains: resuming a stage's checkpoints with another value of it is allowed (see checkpoints.check_resumable).
NOT_TRAINING = {"trains": False}


@dataclasses.dataclass
class TrainingOptions(DataOptions):
    """What every training stage takes besides its data: the model's revision, LoRA, tracking and the hub.

    The LoRA fields are TRL's `ModelConfig` fields, turned into a `peft_config` by TRL's own
    `get_peft_config`, which the stage hands its trainer as a TRL script does.
    """

    model_revision: str | None = dataclasses.field(default=None, metadata={
        "help": "Revision (branch, tag or commit) of a hub model the stage starts from (TRL's model_revision; "
                "warmup and distill: the student's)."})
    use_peft: bool = dataclasses.field(default=False, metadata={
        "help": "Train a LoRA adapter instead of every weight (TRL's ModelConfig.use_peft); final/ holds the merged "
                "weights unless adapter_only."})
    lora_r: int = dataclasses.field(default=16, metadata={"help": "LoRA rank (TRL's ModelConfig.lora_r)."})
    lora_alpha: int = dataclasses.field(default=32, metadata={
        "help": "LoRA scaling numerator: the update is scaled by lora_alpha / lora_r (TRL's ModelConfig.lora_alpha)."})
    lora_dropout: float = dataclasses.field(default=0.05, metadata={"help": "LoRA dropout (TRL's ModelConfig.lora_dropout)."})
    lora_target_modules: list[str] | None = dataclasses.field(default=None, metadata={
        "help": "Module names LoRA adapts, e.g. [q_proj, k_proj, v_proj, o_proj], or all-linear (default: PEFT's "
                "choice for the architecture, q_proj and v_proj for Qwen3 and Llama)."})
    lora_modules_to_save: list[str] | None = dataclasses.field(default=None, metadata={
        "help": "Modules trained in full beside the adapter (TRL's ModelConfig.lora_modules_to_save)."})
    use_rslora: bool = dataclasses.field(default=False, metadata={
        "help": "Rank-stabilised LoRA: scale by lora_alpha / sqrt(lora_r) (TRL's ModelConfig.use_rslora)."})
    use_dora: bool = dataclasses.field(default=False, metadata={
        "help": "Weight-decomposed LoRA, DoRA (TRL's ModelConfig.use_dora)."})
    adapter_only: bool = dataclasses.field(default=False, metadata={
        "help": "With use_peft: final/ holds the LoRA adapter alone (adapter_config.json and its weights), not the "
                "merged model; later sdd stages and vLLM then cannot load it as a checkpoint."})
    run_group: str | None = dataclasses.field(default=None, metadata={**NOT_TRAINING,
        "help": "Group of this job's run in wandb / trackio (with report_to); `sdd run` sets it to the experiment. "
                "The run's name is TRL's run_name (default: <run dir>/<stage>)."})
    push_to_hub: bool = dataclasses.field(default=False, metadata={**NOT_TRAINING,
        "help": "Push final/ with its model card to the hub model repo hub_model_id when the stage finishes "
                "(TRL's field of that name would push the stage folder; sdd's pushes final/). hub_private_repo, "
                "hub_token and hub_revision are TRL's."})
    hub_model_id: str | None = dataclasses.field(default=None, metadata={**NOT_TRAINING,
        "help": "The hub model repo (owner/name) push_to_hub pushes to."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id (owner/name of the model repo)")
        if self.adapter_only and not self.use_peft:
            raise ValueError("adapter_only keeps a LoRA adapter: it needs use_peft")

    def peft_config(self):
        """The trainer's `peft_config` (a peft.LoraConfig), by TRL's own `get_peft_config`; None without use_peft."""
        if not self.use_peft:
            return None
        from trl import ModelConfig, get_peft_config

        try:
            return get_peft_config(ModelConfig(
                use_peft=True, lora_r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                lora_target_modules=self.lora_target_modules, lora_modules_to_save=self.lora_modules_to_save,
                use_rslora=self.use_rslora, use_dora=self.use_dora))
        except (ImportError, ValueError) as err:
            raise SddError(f"use_peft: {str(err).splitlines()[0]} (pip install peft, or sdd[peft])") from None

    def merge_base(self, start: StageInput):
        """What final/ merges the LoRA adapter into (the model training started from); None: no merge."""
        if not self.use_peft or self.adapter_only:
            return None
        from sdd.train.checkpoints import AdapterBase

        return AdapterBase(start.path, start.revision, self.train_dtype, self.trust_remote_code)

    def hub_target(self, trl_config):
        """Where `finish` pushes final/ (TRL's hub_private_repo / hub_token / hub_revision apply); None: no push."""
        if not self.push_to_hub:
            return None
        from sdd.train.lifecycle import HubTarget

        return HubTarget(self.hub_model_id, trl_config.hub_private_repo, trl_config.hub_token, trl_config.hub_revision)


def teacher_revision_field():
    """warmup's and distill's `teacher_revision` (their student's is TrainingOptions.model_revision)."""
    return dataclasses.field(default=None, metadata={
        "help": "Revision (branch, tag or commit) of a hub teacher (TRL's model_revision, for the teacher)."})


def trainer_identity(args: StageArgs, name: str, trl_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The TRL config's output folder (the stage folder) and run name (`<run dir>/<stage>` unless a layer set one;
    `sdd run` names its jobs `<variant>/seed<k>/<stage>`)."""
    run_name = trl_kwargs.get("run_name") or f"{Path(args.run).name}/{name}"
    return {"output_dir": str(Path(args.run) / name), "run_name": run_name}


@dataclasses.dataclass
class StageArgs:
    """What every stage subcommand takes besides its own options."""

    run: str
    name: str | None = None
    config_file: str | None = None
    cli: dict[str, Any] = dataclasses.field(default_factory=dict)
    sets: list[str] = dataclasses.field(default_factory=list)
    force: bool = False
    trust_changed: bool = False
    recipe: dict[str, Any] = dataclasses.field(default_factory=dict)  # stage section handed over by `sdd run`


def resolve_checkpoint(run: RunDir, role: str, explicit: str | None, *, exclude: str | None = None,
                       prefer: tuple[str, ...] = (), revision: str | None = None) -> StageInput:
    """The model a stage starts from: an explicit path, hub id or run dir wins; else the newest for `role`.

    `prefer` lists stage names to take first when present (e.g. student-rl starts from distill,
    else warmup, else the base student), since "newest" alone would pick whatever ran last. The
    manifest is read by sdd.manifest (`RunDir.newest`, `recorded_checkpoint`); a checkpoint passed by
    path that a run dir above it recorded keeps its stage and fingerprint, so it is still checked for
    changes since it was written. `revision` (of a hub model) is kept on the input, recorded and loaded.
    """
    found = _resolve_checkpoint(run, role, explicit, exclude=exclude, prefer=prefer)
    return dataclasses.replace(found, revision=revision) if revision else found


def _resolve_checkpoint(run: RunDir, role: str, explicit: str | None, *, exclude: str | None,
                        prefer: tuple[str, ...]) -> StageInput:
    if explicit:
        other = Path(explicit)
        if RunDir(other).exists():  # a run dir: its newest checkpoint for the role
            found = RunDir(other).newest(role)
            if not found:
                raise SddError(f"run dir {explicit} has no finished {role} checkpoint")
            return dataclasses.replace(_existing(found), run=str(other))
        found = recorded_checkpoint(other)
        return StageInput(str(other), found.stage, str(found.run), found.fingerprint) if found else StageInput(explicit)
    found = run.newest(role, exclude=exclude, prefer=prefer)
    if not found:
        raise SddError(f"no {role} checkpoint in {run.path}: pass --model (a path or hub id), or run a stage that makes one")
    return _existing(found)


def _existing(found: RecordedCheckpoint) -> StageInput:
    """A checkpoint the manifest names; one deleted behind its back is an error naming the stage that made it."""
    if not found.path.exists():
        raise SddError(f"{found.path}, recorded as the output of stage '{found.stage}', is missing; rerun that stage "
                       f"(with --force) or pass the model explicitly")
    return StageInput(str(found.path), found.stage, None, found.fingerprint)


def resolve_options(sections: tuple[str, ...], options_cls, trl_cls, args: StageArgs, defaults: dict[str, Any]):
    """All layers, lowest first: sdd defaults, run dir config.yaml, recipe, --config, CLI, --set.

    `sections` names the run dir config.yaml sections that apply, general first: the stage
    kind, then the stage's own name (`sft`, then `sft-student`).
    """
    layers = [cfg.Layer("sdd defaults", defaults)]
    for section in sections:
        layers.append(cfg.Layer(f"{args.run}/config.yaml [{section}]", cfg.run_defaults(Path(args.run), section)))
    layers.append(cfg.Layer("the recipe", args.recipe))
    if args.config_file:
        layers.append(cfg.Layer(args.config_file, cfg.load_yaml(args.config_file)))
    layers.append(cfg.Layer("the command line", {k: v for k, v in args.cli.items() if v is not None}))
    layers.append(cfg.Layer("--set", cfg.parse_sets(args.sets), from_text=True))
    return cfg.resolve(options_cls, trl_cls, layers)


# What every training stage sets on its TRL config unless a layer says otherwise: checkpoints on a step
# schedule (resume needs them), two kept, no reporting service unless asked, no activation recompute
# (`gradient_checkpointing: true` in a recipe for large models).
TRAINER_DEFAULTS = {
    "save_strategy": "steps",
    "save_total_limit": 2,
    "report_to": "none",
    "gradient_checkpointing": False,
}


def device_defaults() -> dict[str, Any]:
    """TRL configs default to bf16, which fails outright on CPUs; use it only where the device has it."""
    import torch

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return {"bf16": bf16, "use_cpu": not torch.cuda.is_available()}
