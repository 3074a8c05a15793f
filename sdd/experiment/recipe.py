"""Recipes: the paper's experiment, its controls and ablations as data, planned into stage jobs.

A recipe names the models, the data, per-stage options and which variants to run. Planning
turns it into jobs, each one ordinary `sdd <stage> ...` command line in a run directory:

    <root>/shared/                 stages every variant reuses (toy, bootstrap SFT, teacher RL,
                                   the SFT-teacher control, teacher evals)
    <root>/shared/seed<k>/         with `seed_scope: chain`, those stages (all but the toy) once per seed
    <root>/<variant>/seed<k>/      the student stages of one variant and one seed, and its eval

`seed_scope` says which stages a seed covers. `student` (cheap): the teacher bootstrap, teacher RL,
the SFT-teacher control and the student bootstrap run once and every seed starts from them, so
"± over seeds" is the luck of the student stages alone, for one draw of the teacher. `chain`: seed k
repeats that whole chain, each stage seeded with k, so seed k is one independent draw of the
experiment (teacher and student together) and the spread over seeds includes the teacher's luck.
The toy's task and base models (`sdd toy init`) stay shared: they play the pretrained models and
the benchmark, which a real experiment does not redraw either.

Because jobs are plain command lines, the same plan runs in-process (`sdd run`), under a
launcher (`--launcher "accelerate launch ..."`), or as a chain of Slurm jobs, and a user can
run any job by hand: the manifests are the one source of truth for all of them. Identical
stages are planned once (the warmup of `rl-teacher-bridge` is the warmup `no-distill` evaluates).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from sdd.errors import SddError
from sdd.names import SHARED_DIR, slug  # slug re-exported: callers of recipe.slug keep working
from sdd.tracking import job_run_name

STAGE_KINDS = ("sft", "teacher-rl", "warmup", "distill", "student-rl", "eval")
# Recipe `stages:` sections: a stage kind, or one of the shared stages by name (the bootstrap SFT of
# either model, the SFT-teacher control), whose options go over those of its kind.
STAGE_SECTIONS = (*STAGE_KINDS, "sft-teacher", "sft-student", "teacher-sft", "teacher-rl-half")

# Which teacher a variant bridges from, and which student stages it runs, in order.
# "warmup-sft" is warmup with hard labels on the same teacher samples (sequence-level KD).
# `data` (optional) names the split of the training set a step uses (see DataOptions.split); with
# a recipe `split:`, steps without one train on "train", the first 80%.
BUILTIN_VARIANTS: dict[str, dict[str, Any]] = {
    "rl-teacher-bridge": {"teacher": "rl", "steps": ["warmup", "distill"]},
    "direct-grpo": {"teacher": None, "steps": ["student-rl"]},
    "raw-teacher-bridge": {"teacher": "raw", "steps": ["warmup", "distill"]},
    "sft-teacher-bridge": {"teacher": "sft", "steps": ["warmup", "distill"]},
    "no-warmup": {"teacher": "rl", "steps": ["distill"]},
    "no-distill": {"teacher": "rl", "steps": ["warmup"]},
    "sft-on-teacher-samples": {"teacher": "rl", "steps": ["warmup-sft"]},
    # Stage 3, student GRPO after the bridge (needs a recipe `split:`): the teacher ("rl-half") and the
    # bridge see half A of the training labels; student GRPO then gets half B, labels the teacher never
    # saw. The replay control runs the same student GRPO (same options, so the same number of updates)
    # on half A again: no new labels. Their difference is what new labels add after the bridge.
    "stage3-new-labels": {"teacher": "rl-half", "steps": ["warmup", "distill", "student-rl"],
                          "data": {"warmup": "train-a", "distill": "train-a", "student-rl": "train-b"}},
    "stage3-replay": {"teacher": "rl-half", "steps": ["warmup", "distill", "student-rl"],
                      "data": {"warmup": "train-a", "distill": "train-a", "student-rl": "train-a"}},
}
# What a recipe runs when it lists no variants: the paper's experiment, controls and ablations.
DEFAULT_VARIANTS = ["rl-teacher-bridge", "direct-grpo", "raw-teacher-bridge", "sft-teacher-bridge", "no-warmup",
                    "no-distill", "sft-on-teacher-samples"]
TEACHERS = ("rl", "raw", "sft", "rl-half")
SPLITS = ("train", "heldout", "train-a", "train-b")  # sdd.stages.common.DataOptions.SPLITS, without importing torch
SPLIT_KEYS = ("seed", "fraction", "heldout_eval")
SEED_SCOPES = ("student", "chain")


@dataclasses.dataclass(frozen=True)
class StepKind:
    """A step a variant can take on the student: the stage it runs and what that stage reads.

    A new step kind is one entry in `STEPS`; `Planner.plan_variant` loops over a variant's steps
    and needs no branch for it.
    """

    name: str  # the step's name in recipes (variant `steps:`, `data:`) and its stage's name in the run dir
    stage: str  # the stage command that runs it; its recipe options come from `stages.<stage>`
    reads_teacher: bool = False  # --teacher and --student (warmup, distill), else --model
    samples_teacher: bool = False  # shares the per-seed teacher-sample cache (the warmup family)
    options: tuple[tuple[str, Any], ...] = ()  # fixed options, over the recipe's

    def fixed_options(self) -> dict[str, Any]:
        return dict(self.options)


STEPS: dict[str, StepKind] = {step.name: step for step in (
    StepKind("warmup", "warmup", reads_teacher=True, samples_teacher=True),
    # Sequence-level KD: warmup's hard-label objective on the same teacher samples.
    StepKind("warmup-sft", "warmup", reads_teacher=True, samples_teacher=True, options=(("objective", "sft"),)),
    StepKind("distill", "distill", reads_teacher=True),
    StepKind("student-rl", "student-rl"),
)}
STEP_KINDS = tuple(STEPS)

# The comparisons the report computes paired bootstrap CIs for: (variant, reference).
COMPARISONS = [
    ("rl-teacher-bridge", "direct-grpo"),
    ("rl-teacher-bridge", "raw-teacher-bridge"),
    ("rl-teacher-bridge", "sft-teacher-bridge"),
    ("no-warmup", "rl-teacher-bridge"),
    ("no-distill", "rl-teacher-bridge"),
    ("sft-on-teacher-samples", "rl-teacher-bridge"),
    ("stage3-new-labels", "stage3-replay"),
]


@dataclasses.dataclass
class Recipe:
    """A validated recipe file."""

    path: Path
    toy: bool = False
    teacher: str | None = None
    student: str | None = None
    train_dataset: str = "math-train"
    sft_dataset: str | None = None
    data_dir: str | None = None
    benchmarks: list[str] = dataclasses.field(default_factory=lambda: ["math500"])
    seeds: int = 3
    seed_scope: str = "student"  # which stages a seed covers: "student" or "chain" (see the module docstring)
    bootstrap: bool = False  # supervised bootstrap of both models first (the toy's models start random)
    student_rl_after_bridge: bool = False
    variants: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_VARIANTS))
    custom_variants: dict[str, dict] = dataclasses.field(default_factory=dict)
    stages: dict[str, dict] = dataclasses.field(default_factory=dict)
    eval: dict[str, Any] = dataclasses.field(default_factory=dict)
    datasets: dict[str, str] = dataclasses.field(default_factory=dict)  # names registered in every run dir
    # The authors' data protocol: {seed: 42, fraction: 0.8, heldout_eval: {eval options}}. Training
    # stages then use the first `fraction` of the seeded shuffle of train_dataset, and every teacher
    # and every variant's final student is also evaluated on the held-out rest (eval job
    # `eval-heldout`, benchmark label `<train_dataset>:heldout`; `heldout_eval` overrides the recipe's
    # eval options for it, e.g. fewer samples). None (the default) trains on all of train_dataset.
    split: dict[str, Any] | None = None
    # What each Slurm job asks for (`sdd run --slurm`): a profile and overrides; see SLURM_PROFILES below.
    slurm: dict[str, Any] = dataclasses.field(default_factory=dict)

    def variant(self, name: str) -> dict:
        return self.custom_variants.get(name) or BUILTIN_VARIANTS[name]


# The toy recipe ships inside the package (examples/recipes/toy.yaml links to it): its `stages:` are
# the toy's sizes, the base of every `toy: true` recipe and what `sdd toy init` writes as config.yaml.
TOY_RECIPE = Path(__file__).parent.parent / "recipes" / "toy.yaml"


def toy_stage_defaults() -> dict[str, dict[str, Any]]:
    """The toy's stage settings, by recipe section, in the file's order (`stages:` of TOY_RECIPE)."""
    import yaml

    return yaml.safe_load(TOY_RECIPE.read_text())["stages"]


def load(path: str | Path) -> Recipe:
    """Parse and validate; every problem is one line that names the key and what to write instead."""
    from sdd.config import load_yaml

    raw = load_yaml(path)
    fields = {f.name for f in dataclasses.fields(Recipe)} - {"path"}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise SddError(f"recipe {path}: unknown key '{unknown[0]}' (keys: {', '.join(sorted(fields))})")
    try:
        recipe = Recipe(path=Path(path), **raw)
    except TypeError as err:
        raise SddError(f"recipe {path}: {err}") from None
    for key in ("variants", "benchmarks"):
        if not isinstance(getattr(recipe, key), list) or not getattr(recipe, key):
            raise SddError(f"recipe {path}: '{key}' must be a non-empty list")
    if not isinstance(recipe.seeds, int) or recipe.seeds < 1:
        raise SddError(f"recipe {path}: 'seeds' must be a positive integer")
    if recipe.seed_scope not in SEED_SCOPES:
        raise SddError(f"recipe {path}: 'seed_scope' must be student (teacher stages once, shared by every seed) "
                       f"or chain (every seed repeats them), not {recipe.seed_scope!r}")
    if recipe.split is not None:
        if recipe.split is True:
            recipe.split = {}
        if not isinstance(recipe.split, dict) or set(recipe.split) - set(SPLIT_KEYS):
            raise SddError(f"recipe {path}: 'split' must be a mapping with keys {', '.join(SPLIT_KEYS)} "
                           "(e.g. split: {seed: 42, fraction: 0.8})")
        fraction = recipe.split.get("fraction", 0.8)
        if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise SddError(f"recipe {path}: split.fraction must be between 0 and 1, not {fraction!r}")
        if not isinstance(recipe.split.get("seed", 42), int):
            raise SddError(f"recipe {path}: split.seed must be an integer")
        if not isinstance(recipe.split.get("heldout_eval", {}), dict):
            raise SddError(f"recipe {path}: split.heldout_eval must be a mapping of eval option: value")
    for name, spec in recipe.custom_variants.items():
        if (not isinstance(spec, dict) or set(spec) - {"teacher", "steps", "data"}
                or not isinstance(spec.get("steps"), list) or not isinstance(spec.get("data", {}), dict)):
            raise SddError(f"recipe {path}: custom variant '{name}' must be "
                           "{teacher: rl|raw|sft|rl-half|null, steps: [...], data: {step: split}}")
        if spec.get("teacher") not in (*TEACHERS, None):
            raise SddError(f"recipe {path}: custom variant '{name}' has teacher {spec.get('teacher')!r}; "
                           "use rl, raw, sft, rl-half or null")
        for step, split in spec.get("data", {}).items():
            if step not in STEP_KINDS or split not in SPLITS:
                raise SddError(f"recipe {path}: custom variant '{name}' data: '{step}: {split}' must map a step "
                               f"({', '.join(STEP_KINDS)}) to a split ({', '.join(SPLITS)})")
        for step in spec["steps"]:
            if step not in STEP_KINDS:
                raise SddError(f"recipe {path}: custom variant '{name}' has unknown step '{step}' (steps: {', '.join(STEP_KINDS)})")
        needs_teacher = any(s in ("warmup", "warmup-sft", "distill") for s in spec["steps"])
        if needs_teacher and not spec.get("teacher"):
            raise SddError(f"recipe {path}: custom variant '{name}' distils but names no teacher")
    known = set(BUILTIN_VARIANTS) | set(recipe.custom_variants)
    for name in recipe.variants:
        if name not in known:
            raise SddError(f"recipe {path}: unknown variant '{name}' (built in: {', '.join(BUILTIN_VARIANTS)})")
        spec = recipe.variant(name)
        if recipe.split is None and (spec.get("data") or spec.get("teacher") == "rl-half"):
            raise SddError(f"recipe {path}: variant '{name}' trains on parts of the training set; "
                           "add 'split: {seed: 42, fraction: 0.8}' to the recipe")
    for kind, section in recipe.stages.items():
        if kind not in STAGE_SECTIONS:
            raise SddError(f"recipe {path}: 'stages' has unknown stage '{kind}' (stages: {', '.join(STAGE_SECTIONS)})")
        if not isinstance(section, dict):
            raise SddError(f"recipe {path}: stages.{kind} must be a mapping of option: value")
    for name, file in recipe.datasets.items():
        if not isinstance(file, str):
            raise SddError(f"recipe {path}: datasets.{name} must be a file path")
    check_slurm(recipe.slurm, f"recipe {path}: slurm")
    if not recipe.toy and (not recipe.teacher or not recipe.student):
        raise SddError(f"recipe {path}: name the models ('teacher:' and 'student:', hub ids or paths), or set 'toy: true'")
    return recipe


# -- Slurm resources --------------------------------------------------------------------------------
# What each job of the plan asks Slurm for, by stage kind. A profile is the base; a recipe's `slurm:`
# section goes over it, `all:` for every job, then a stage kind's own section:
#     slurm: {profile: cpu, all: {partition: short}, eval: {time: "02:00:00"}}
# `sdd run --slurm-profile NAME` picks the profile instead of the recipe's `profile:`.
SLURM_KINDS = (*STAGE_KINDS, "toy-init", "report")
SLURM_OPTIONS = {"nodes": "--nodes", "gpus": "--gpus-per-node", "cpus": "--cpus-per-task", "mem": "--mem",
                 "time": "--time", "partition": "--partition", "account": "--account", "qos": "--qos",
                 "constraint": "--constraint"}
SLURM_COUNTS = ("nodes", "gpus", "cpus")
SLURM_PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    # The published recipe: each training stage on one node of 8 GPUs (its batch shapes assume 8 x 80 GB,
    # docs/scaling.md), eval on one GPU (one vLLM engine), the toy and the report on no GPU.
    "gpu": {
        "all": {"nodes": 1, "gpus": 8, "cpus": 64, "time": "48:00:00"},
        "eval": {"gpus": 1, "cpus": 8, "time": "24:00:00"},
        "toy-init": {"gpus": 0, "cpus": 2, "time": "01:00:00"},
        "report": {"gpus": 0, "cpus": 2, "time": "01:00:00"},
    },
    # CPU-only nodes: one process per stage, for the toy (each stage takes minutes on 2 cores).
    "cpu": {"all": {"nodes": 1, "gpus": 0, "cpus": 2, "mem": "4G", "time": "02:00:00"}},
}


def check_slurm(section: Any, where: str) -> None:
    """A `slurm:` section: one line naming the key and what to write instead."""
    if not isinstance(section, dict):
        raise SddError(f"{where} must be a mapping (e.g. slurm: {{profile: cpu, eval: {{time: '02:00:00'}}}})")
    for key, value in section.items():
        if key == "profile":
            if value not in SLURM_PROFILES:
                raise SddError(f"{where}.profile is {value!r}; use one of {', '.join(SLURM_PROFILES)}")
            continue
        if key not in ("all", *SLURM_KINDS):
            raise SddError(f"{where} has unknown key '{key}' (keys: profile, all, {', '.join(SLURM_KINDS)})")
        if not isinstance(value, dict):
            raise SddError(f"{where}.{key} must be a mapping of resource: value ({', '.join(SLURM_OPTIONS)}, sbatch)")
        for name, setting in value.items():
            if name == "sbatch":
                if not isinstance(setting, list) or not all(isinstance(arg, str) for arg in setting):
                    raise SddError(f"{where}.{key}.sbatch must be a list of sbatch arguments, e.g. ['--exclusive']")
            elif name not in SLURM_OPTIONS:
                raise SddError(f"{where}.{key} has unknown resource '{name}' (resources: {', '.join(SLURM_OPTIONS)}, sbatch)")
            elif name in SLURM_COUNTS and (not isinstance(setting, int) or isinstance(setting, bool) or setting < 0
                                           or (name == "nodes" and setting < 1)):
                raise SddError(f"{where}.{key}.{name} must be a whole number{' >= 1' if name == 'nodes' else ''}, "
                               f"not {setting!r}")
            elif setting is not None and not isinstance(setting, (str, int)):
                raise SddError(f"{where}.{key}.{name} must be a string such as '04:00:00' or '64G', not {setting!r}")


def slurm_resources(recipe: Recipe, kind: str, profile: str | None = None) -> dict[str, Any]:
    """What a job of stage `kind` asks for: the profile's `all` and `kind`, then the recipe's."""
    name = profile or recipe.slurm.get("profile") or "gpu"
    if name not in SLURM_PROFILES:
        raise SddError(f"Slurm profile '{name}' does not exist; use one of {', '.join(SLURM_PROFILES)}")
    resources: dict[str, Any] = {}
    for layer in (SLURM_PROFILES[name], recipe.slurm):
        for section in ("all", kind):
            resources.update(layer.get(section) or {})
    return resources


def sbatch_resource_args(resources: dict[str, Any]) -> list[str]:
    """The sbatch options of resolved resources; a None value leaves that option to the cluster's default."""
    args = [f"{SLURM_OPTIONS[name]}={value}" for name, value in resources.items()
            if name in SLURM_OPTIONS and value is not None]
    return [*args, *resources.get("sbatch", [])]


@dataclasses.dataclass
class Job:
    """One stage invocation, to run once `after` have finished: `sdd <argv>`, or in-process its stage function.

    The stage's own command-line options (`flags`, e.g. model: path) and the options file (`config_file`)
    are kept as they are, and the command line is derived from them, so an in-process runner can hand
    the stage exactly what that command line means without parsing it.
    """

    id: str
    run_dir: Path
    stage: str
    name: str
    flags: dict[str, str]
    config_file: str | None
    after: list[str]
    variant: str | None = None
    seed: int | None = None
    records: list[str] = dataclasses.field(default_factory=list)  # manifest records it writes
    # `key=value` settings of this job alone, passed as --set: its tracker run's name and group (training jobs)
    sets: list[str] = dataclasses.field(default_factory=list)

    @property
    def trains(self) -> bool:
        return self.stage not in ("eval", "toy-init")

    @property
    def argv(self) -> list[str]:
        """The job as an `sdd` command line: what a launcher, a Slurm job or a user runs."""
        if self.stage == "toy-init":
            return ["toy", "init", str(self.run_dir)]
        flags = [part for key, value in self.flags.items() for part in (f"--{key.replace('_', '-')}", value)]
        options = ["--config", self.config_file] if self.config_file else []
        sets = [part for item in self.sets for part in ("--set", item)]
        return [self.stage, "--run", str(self.run_dir), "--name", self.name, *flags, *options, *sets]


class Planner:
    """Builds the job graph; a job whose (stage, inputs, options) was already planned is reused."""

    def __init__(self, recipe: Recipe, root: Path, seeds: int):
        self.recipe = recipe
        self.root = root
        self.seeds = seeds
        self.jobs: dict[str, Job] = {}
        self.by_key: dict[str, str] = {}
        self.shared = root / SHARED_DIR
        self.config_dir = root / "plan"
        self.datasets = {k: str(Path(v).resolve()) for k, v in recipe.datasets.items()}

    def _config_file(self, stage: str, options: dict) -> str | None:
        """Recipe options for a stage go to a YAML file the command names, so commands stay short."""
        if not options:
            return None
        import yaml

        digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:10]
        path = self.config_dir / f"{stage}-{digest}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text(yaml.safe_dump(options, sort_keys=True))
        return str(path)

    def add(self, *, run_dir: Path, stage: str, name: str, flags: dict[str, str], options: dict, after: list[str],
            variant: str | None = None, seed: int | None = None) -> Job:
        """A job running `stage` with its own command-line options `flags` and the recipe's `options` (a file)."""
        key = json.dumps([stage, list(flags.items()), options, sorted(after)], sort_keys=True, default=str)
        if key in self.by_key:
            return self.jobs[self.by_key[key]]
        job_id = f"{run_dir.relative_to(self.root).as_posix()}:{name}"
        if job_id in self.jobs:
            raise SddError(f"the plan has two different '{name}' stages in {run_dir}; rename one variant's stage")
        records = [f"{name}-{slug(b)}" for b in options.get("benchmark", self.recipe.benchmarks)] if stage == "eval" else [name]
        job = Job(job_id, run_dir, stage, name, dict(flags), self._config_file(stage, options), list(after), variant,
                  seed, records)
        if job.trains:  # one tracker run per job, `<variant>/seed<k>/<stage>`, grouped by the experiment
            job.sets = [f"run_name={job_run_name(run_dir.relative_to(self.root).as_posix(), name)}",
                        f"run_group={self.root.name}"]
        self.jobs[job_id] = job
        self.by_key[key] = job_id
        return job

    @staticmethod
    def final(job: Job) -> str:
        return str(job.run_dir / job.name / "final")

    def stage_options(self, kind: str, name: str | None = None, **extra) -> dict:
        """Options for a stage: the toy's sizes (toy recipes), the recipe's sections (kind, then name), `extra`."""
        base: dict = {}
        sections = [kind] + ([name] if name and name != kind else [])
        if self.recipe.toy:
            toy_stages = toy_stage_defaults()
            for section in sections:
                base.update(toy_stages.get(section) or {})
        for section in sections:
            base.update(self.recipe.stages.get(section) or {})
        base.update({k: v for k, v in extra.items() if v is not None})
        return base

    def split_options(self, part: str | None) -> dict:
        """DataOptions for one part of the seeded split of train_dataset; nothing without a recipe `split:`."""
        if self.recipe.split is None or part is None:
            return {}
        return {"split": part, "split_seed": self.recipe.split.get("seed", 42),
                "split_fraction": float(self.recipe.split.get("fraction", 0.8))}

    def sft_split(self) -> str | None:
        """SFT data is held out like the RL data only when it is the same dataset (no sft_dataset)."""
        return "train" if not self.recipe.sft_dataset else None

    def data_flags(self) -> dict[str, str]:
        return {"data_dir": self.recipe.data_dir} if self.recipe.data_dir else {}

    def plan(self) -> list[Job]:
        r = self.recipe
        after_init: list[str] = []
        teacher_base, student_base = r.teacher, r.student
        if r.toy:
            init = self.add(run_dir=self.shared, stage="toy-init", name="toy-init", flags={}, options={}, after=[])
            after_init = [init.id]
            toy_data = self.shared / "toy" / "data"
            self.datasets = {"toy-train": str(toy_data / "train.jsonl"), "toy-test": str(toy_data / "test.jsonl"),
                             **self.datasets}
            teacher_base = teacher_base or str(self.shared / "toy" / "teacher-base")
            student_base = student_base or str(self.shared / "toy" / "student-base")
        train = {"dataset": r.train_dataset, **self.data_flags()}
        if r.seed_scope == "chain":
            chains = {seed: self.plan_chain(seed, teacher_base, student_base, after_init) for seed in range(self.seeds)}
        else:
            chain = self.plan_chain(None, teacher_base, student_base, after_init)
            chains = dict.fromkeys(range(self.seeds), chain)
        for variant in r.variants:
            spec = r.variant(variant)
            steps = list(spec["steps"])
            if variant == "rl-teacher-bridge" and r.student_rl_after_bridge:
                steps.append("student-rl")
            for seed in range(self.seeds):
                teachers, student_start, deps_s = chains[seed]
                self.plan_variant(variant, spec.get("teacher"), steps, seed, teachers, student_start, deps_s, train,
                                  spec.get("data"))
        return self.ordered()

    def plan_chain(self, seed: int | None, teacher_base: str, student_base: str, after_init: list[str]
                   ) -> tuple[dict[str, tuple[str, list[str]]], str, list[str]]:
        """The stages variants share: bootstrap SFT of both models, the teachers, their evals.

        seed None (seed_scope student): once, in <root>/shared, at the trainers' default seed. A seed k
        (seed_scope chain): in <root>/shared/seed<k>, every stage seeded with k. Returns (teachers by
        kind: (checkpoint, jobs it needs), the student's starting checkpoint, the jobs that make it).
        """
        r = self.recipe
        run_dir = self.shared if seed is None else self.shared / f"seed{seed}"
        seeded = {} if seed is None else {"seed": seed}
        teacher_raw, student_start, deps_t, deps_s = teacher_base, student_base, after_init, after_init
        if r.bootstrap:
            sft_data = r.sft_dataset or r.train_dataset
            sft_t = self.add(run_dir=run_dir, stage="sft", name="sft-teacher",
                             options=self.stage_options("sft", "sft-teacher", **self.split_options(self.sft_split()),
                                                        **seeded),
                             flags={"role": "teacher", "model": teacher_base, "dataset": sft_data, **self.data_flags()},
                             after=after_init, seed=seed)
            sft_s = self.add(run_dir=run_dir, stage="sft", name="sft-student",
                             options=self.stage_options("sft", "sft-student", **self.split_options(self.sft_split()),
                                                        **seeded),
                             flags={"role": "student", "model": student_base, "dataset": sft_data, **self.data_flags()},
                             after=after_init, seed=seed)
            teacher_raw, student_start = self.final(sft_t), self.final(sft_s)
            deps_t, deps_s = [sft_t.id], [sft_s.id]
        teachers: dict[str, tuple[str, list[str]]] = {"raw": (teacher_raw, deps_t)}
        train = {"dataset": r.train_dataset, **self.data_flags()}
        wanted = {r.variant(v).get("teacher") for v in r.variants}
        if "rl" in wanted:
            rl = self.add(run_dir=run_dir, stage="teacher-rl", name="teacher-rl", flags={"model": teacher_raw, **train},
                          options=self.stage_options("teacher-rl", **self.split_options("train"), **seeded),
                          after=deps_t, seed=seed)
            teachers["rl"] = (self.final(rl), [rl.id])
        if "rl-half" in wanted:
            half = self.add(run_dir=run_dir, stage="teacher-rl", name="teacher-rl-half",
                            flags={"model": teacher_raw, **train}, after=deps_t, seed=seed,
                            options=self.stage_options("teacher-rl", "teacher-rl-half", **self.split_options("train-a"),
                                                       **seeded))
            teachers["rl-half"] = (self.final(half), [half.id])
        if "sft" in wanted:
            sft_data = r.sft_dataset or r.train_dataset
            control_options = self.stage_options("sft", "teacher-sft", **self.split_options(self.sft_split()), **seeded)
            control = self.add(run_dir=run_dir, stage="sft", name="teacher-sft", options=control_options,
                               flags={"role": "teacher", "model": teacher_raw, "dataset": sft_data, **self.data_flags()},
                               after=deps_t, seed=seed)
            teachers["sft"] = (self.final(control), [control.id])
        for which, (path, deps) in teachers.items():
            if which in wanted or which == "raw":
                self.add_eval(run_dir, f"eval-teacher-{which}", path, "teacher", deps, None, seed)
                self.add_heldout_eval(run_dir, f"eval-heldout-teacher-{which}", path, "teacher", deps, None, seed)
        self.add_eval(run_dir, "eval-student-base", student_start, "student", deps_s, None, seed)
        self.add_heldout_eval(run_dir, "eval-heldout-student-base", student_start, "student", deps_s, None, seed)
        return teachers, student_start, deps_s

    def plan_variant(self, variant, teacher_kind, steps, seed, teachers, student_start, deps_s, train,
                     data: dict | None = None) -> None:
        run_dir = self.root / variant / f"seed{seed}"
        student, deps = student_start, list(deps_s)
        teacher_path, teacher_deps = teachers.get(teacher_kind, (None, []))
        # Stages shared between variants run in the first variant's dir; ids make them the same job.
        for step_name in steps:
            step = STEPS[step_name]
            extra: dict[str, Any] = {"seed": seed}
            if step.samples_teacher:
                extra["sample_seed"] = seed
                extra["sample_cache"] = str(self.root / "cache" / "teacher-samples")  # shared by the warmup family
            extra.update(step.fixed_options())
            extra.update(self.split_options((data or {}).get(step.name, "train")))
            options = self.stage_options(step.stage, **extra)
            flags = {"teacher": teacher_path, "student": student} if step.reads_teacher else {"model": student}
            job = self.add(run_dir=run_dir, stage=step.stage, name=step.name, flags={**flags, **train}, options=options,
                           after=sorted(set(deps + (teacher_deps if step.reads_teacher else []))),
                           variant=variant, seed=seed)
            student, deps = self.final(job), [job.id]
        self.add_eval(run_dir, "eval", student, "student", deps, variant, seed)
        self.add_heldout_eval(run_dir, "eval-heldout", student, "student", deps, variant, seed)

    def eval_flags(self, model: str, role: str) -> dict[str, str]:
        return {"model": model, "role": role, **self.data_flags()}

    def add_eval(self, run_dir: Path, name: str, model: str, role: str, deps: list[str], variant, seed) -> Job:
        options = {"seeds": 1, **self.stage_options("eval"), **self.recipe.eval, "benchmark": self.recipe.benchmarks}
        return self.add(run_dir=run_dir, stage="eval", name=name, flags=self.eval_flags(model, role), options=options,
                        after=deps, variant=variant, seed=seed)

    def add_heldout_eval(self, run_dir: Path, name: str, model: str, role: str, deps: list[str], variant,
                         seed) -> Job | None:
        """With a recipe `split:`, the model on the held-out part of train_dataset (the authors' val_dapo)."""
        if self.recipe.split is None:
            return None
        options = {"seeds": 1, **self.stage_options("eval"), **self.recipe.eval,
                   **(self.recipe.split.get("heldout_eval") or {}), "benchmark": [self.recipe.train_dataset],
                   **self.split_options("heldout")}
        return self.add(run_dir=run_dir, stage="eval", name=name, flags=self.eval_flags(model, role), options=options,
                        after=deps, variant=variant, seed=seed)

    def ordered(self) -> list[Job]:
        """Topological order (Kahn), stable in planning order; a cycle or a missing job is an error."""
        order, done = [], set()
        pending = list(self.jobs.values())
        while pending:
            ready = [j for j in pending if all(d in done for d in j.after)]
            if not ready:
                missing = {d for j in pending for d in j.after if d not in self.jobs}
                what = f"missing stage {sorted(missing)[0]}" if missing else "a cycle between " + ", ".join(j.id for j in pending)
                raise SddError(f"cannot order the plan: {what}")
            for job in ready:
                order.append(job)
                done.add(job.id)
            pending = [j for j in pending if j.id not in done]
        return order


def plan(recipe: Recipe, root: Path, seeds: int | None = None) -> tuple[list[Job], dict[str, str]]:
    """The ordered jobs, and the datasets every run dir must have registered before its jobs run."""
    planner = Planner(recipe, Path(root), seeds or recipe.seeds)
    jobs = planner.plan()
    return jobs, planner.datasets
