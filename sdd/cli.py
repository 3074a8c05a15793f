"""The `sdd` command line: parses options and hands them to a stage module, nothing more.

Heavy imports (torch, transformers, trl) happen inside the stage modules, so `sdd --help` and
`sdd status` answer at once. Errors a user can fix print one line and exit 2; a stage stopped
by SIGTERM/SIGINT exits 75 after saving, so a Slurm script can requeue it.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
# Deprecation notices from inside transformers/TRL are theirs to fix and only bury sdd's own output.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|accelerate)\.")

app = typer.Typer(
    help="sparse-to-dense: RL a teacher with a math verifier, then distil it into a student with dense token-level KL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
toy_app = typer.Typer(help="The embedded toy task: tiny local models and synthetic verifiable arithmetic.",
                      no_args_is_help=True)
app.add_typer(toy_app, name="toy")

Run = Annotated[Path, typer.Option("--run", help="Run directory (holds manifest.json and one folder per stage).")]
Name = Annotated[str | None, typer.Option(help="Stage name in the run dir, to keep several variants of a stage.")]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="YAML file of options (sdd's and the TRL config's).")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="key=value for any sdd option or TRL config field; repeatable.")]
Force = Annotated[bool, typer.Option("--force", help="Redo a stage that is already done.")]
TrustChanged = Annotated[bool, typer.Option("--trust-changed", help="Use input checkpoints even if their files changed.")]
DataDir = Annotated[Path | None, typer.Option(help="Folder with local benchmark files (e.g. ../shared/data).")]
Dataset = Annotated[str | None, typer.Option(help="Training data: benchmark name, local jsonl/json/parquet, or hub id.")]
PrintConfig = Annotated[bool, typer.Option("--print-config", help="Print the fully resolved sdd options and TRL config (YAML) and exit; nothing runs, nothing is written.")]
AsJson = Annotated[bool, typer.Option("--json", help="With --print-config: print JSON instead of YAML.")]


def _stage_args(run: Path, name, config, sets, force, trust_changed, **cli):
    from sdd.stages.common import StageArgs

    cli = {k: (str(v) if isinstance(v, Path) else v) for k, v in cli.items()}
    return StageArgs(run=str(run), name=name, config_file=str(config) if config else None, cli=cli,
                     sets=list(sets or []), force=force, trust_changed=trust_changed)


def _print_config(stage: str, args, as_json: bool) -> None:
    """`--print-config`: the stage's resolved options, printed instead of running it."""
    from sdd.stages import resolved

    resolved.show(stage, args, as_json=as_json)


@app.command()
def sft(
    run: Run,
    role: Annotated[str, typer.Option(help="teacher or student: which model to train and whose checkpoint it makes.")] = "teacher",
    model: Annotated[str | None, typer.Option(help="Start from this path or hub id (default: newest checkpoint of the role).")] = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    name: Name = None, config: ConfigFile = None, set_: Sets = None, force: Force = False, trust_changed: TrustChanged = False,
    print_config: PrintConfig = False, json_: AsJson = False,
) -> None:
    """Supervised fine-tuning on worked solutions (bootstrap, or the SFT-teacher control)."""
    from sdd.stages import sft as stage

    args = _stage_args(run, name, config, set_, force, trust_changed, role=role, model=model, dataset=dataset,
                       data_dir=data_dir)
    if print_config:
        return _print_config("sft", args, json_)
    stage.run(args)


@app.command("teacher-rl")
def teacher_rl(
    run: Run,
    model: Annotated[str | None, typer.Option(help="Teacher to train (default: newest teacher checkpoint in the run).")] = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    gate: Annotated[bool | None, typer.Option("--gate/--no-gate", help="Drop prompts the policy always or never solves before training.")] = None,
    name: Name = None, config: ConfigFile = None, set_: Sets = None, force: Force = False, trust_changed: TrustChanged = False,
    print_config: PrintConfig = False, json_: AsJson = False,
) -> None:
    """GRPO on the teacher with the math verifier as reward."""
    from sdd.stages import teacher_rl as stage

    args = _stage_args(run, name, config, set_, force, trust_changed, model=model, dataset=dataset,
                       data_dir=data_dir, gate=gate)
    if print_config:
        return _print_config("teacher-rl", args, json_)
    stage.run(args)


@app.command("student-rl")
def student_rl(
    run: Run,
    model: Annotated[str | None, typer.Option(help="Student to train (default: distill, else warmup, else base student).")] = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    gate: Annotated[bool | None, typer.Option("--gate/--no-gate", help="Drop prompts the policy always or never solves before training.")] = None,
    name: Name = None, config: ConfigFile = None, set_: Sets = None, force: Force = False, trust_changed: TrustChanged = False,
    print_config: PrintConfig = False, json_: AsJson = False,
) -> None:
    """GRPO on the student (after the bridge, or straight on the base student as the direct-GRPO control)."""
    from sdd.stages import student_rl as stage

    args = _stage_args(run, name, config, set_, force, trust_changed, model=model, dataset=dataset,
                       data_dir=data_dir, gate=gate)
    if print_config:
        return _print_config("student-rl", args, json_)
    stage.run(args)


@app.command()
def warmup(
    run: Run,
    teacher: Annotated[str | None, typer.Option(help="Teacher path, hub id or run dir (default: newest teacher in the run).")] = None,
    student: Annotated[str | None, typer.Option(help="Student path, hub id or run dir (default: newest student in the run).")] = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    name: Name = None, config: ConfigFile = None, set_: Sets = None, force: Force = False, trust_changed: TrustChanged = False,
    print_config: PrintConfig = False, json_: AsJson = False,
) -> None:
    """Off-policy bridge: the teacher writes completions, the student learns them with forward KL."""
    from sdd.stages import warmup as stage

    args = _stage_args(run, name, config, set_, force, trust_changed, teacher=teacher, student=student,
                       dataset=dataset, data_dir=data_dir)
    if print_config:
        return _print_config("warmup", args, json_)
    stage.run(args)


@app.command()
def distill(
    run: Run,
    teacher: Annotated[str | None, typer.Option(help="Teacher path, hub id or run dir (default: newest teacher in the run).")] = None,
    student: Annotated[str | None, typer.Option(help="Student path, hub id or run dir (default: warmup, else newest student).")] = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    name: Name = None, config: ConfigFile = None, set_: Sets = None, force: Force = False, trust_changed: TrustChanged = False,
    print_config: PrintConfig = False, json_: AsJson = False,
) -> None:
    """On-policy distillation: the student samples, per-token reverse KL to the teacher is the loss."""
    from sdd.stages import distill as stage

    args = _stage_args(run, name, config, set_, force, trust_changed, teacher=teacher, student=student,
                       dataset=dataset, data_dir=data_dir)
    if print_config:
        return _print_config("distill", args, json_)
    stage.run(args)


@app.command("eval")
def eval_(
    run: Run,
    role: Annotated[str, typer.Option(help="Evaluate the newest checkpoint of this role.")] = "student",
    model: Annotated[str | None, typer.Option(help="Evaluate this path or hub id instead.")] = None,
    benchmark: Annotated[list[str] | None, typer.Option(help="math500, aime24, aime25, gsm8k, a file, a hub id, or a dataset the run registered; repeatable.")] = None,
    data_dir: DataDir = None,
    samples: Annotated[int | None, typer.Option(help="Samples per problem (k of avg@k).")] = None,
    seeds: Annotated[int | None, typer.Option(help="Number of sampling seeds (0..n-1); spread is reported over them.")] = None,
    temperature: Annotated[float | None, typer.Option()] = None,
    top_p: Annotated[float | None, typer.Option()] = None,
    top_k: Annotated[int | None, typer.Option()] = None,
    max_new_tokens: Annotated[int | None, typer.Option()] = None,
    greedy: Annotated[bool | None, typer.Option("--greedy", help="Also report greedy accuracy.")] = None,
    backend: Annotated[str | None, typer.Option(help="hf (transformers) or vllm.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N problems.")] = None,
    name: Name = None, config: ConfigFile = None, set_: Sets = None, force: Force = False, trust_changed: TrustChanged = False,
    print_config: PrintConfig = False, json_: AsJson = False,
) -> None:
    """Accuracy: avg@k (mean and spread over seeds), pass@k, per-problem results."""
    from sdd.stages import eval as stage

    args = _stage_args(
        run, name, config, set_, force, trust_changed, role=role, model=model, benchmark=benchmark, data_dir=data_dir,
        samples=samples, seeds=seeds, temperature=temperature, top_p=top_p, top_k=top_k,
        max_new_tokens=max_new_tokens, greedy=greedy, backend=backend, limit=limit,
    )
    if print_config:
        return _print_config("eval", args, json_)
    results = stage.run(args)
    from sdd.stages.status import print_eval

    print_eval(results)


@app.command()
def status(
    run: Annotated[Path, typer.Argument(help="Run directory, or a root of run directories.")],
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Stages of a run dir: status, checkpoint, key metric."""
    from sdd.stages import status as stage

    stage.run(run, as_json=json_)


@app.command("run")
def run_(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see examples/recipes).")],
    root: Annotated[Path, typer.Option(help="Root folder: shared/ plus one run dir per variant and seed.")],
    seeds: Annotated[int | None, typer.Option(help="Training seeds per variant (default: the recipe's).")] = None,
    only: Annotated[list[str] | None, typer.Option(help="Only these variants / stages / job ids (and what they need); repeatable.")] = None,
    jobs: Annotated[int, typer.Option(help="Jobs run side by side (each gets cores/jobs threads).")] = 1,
    launcher: Annotated[str | None, typer.Option(help='Run training jobs under this launcher, e.g. "accelerate launch --config_file zero3.yaml".')] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the commands (or the sbatch chain) instead of running them.")] = False,
    slurm: Annotated[str | None, typer.Option(help="Submit one sbatch per job with this job script, chained with afterok.")] = None,
    slurm_arg: Annotated[list[str] | None, typer.Option(help="Extra sbatch argument for every job; repeatable.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Run an experiment: every variant and seed, in dependency order, skipping what is done."""
    from sdd.stages import run as stage

    stage.run(str(recipe), root=str(root), seeds=seeds, only=only, jobs=jobs, launcher=launcher, dry_run=dry_run,
              slurm=slurm, slurm_args=slurm_arg, as_json=json_)


@app.command()
def report(
    root: Annotated[Path, typer.Argument(help="Root folder of `sdd run` (or a single run dir).")],
    out: Annotated[Path | None, typer.Option(help="Where to write report.md, report.json and plots (default: ROOT/report).")] = None,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for the confidence intervals.")] = 10_000,
) -> None:
    """Tables (mean ± std over seeds), paired bootstrap CIs, and plots of an experiment."""
    from sdd.stages import report as stage

    stage.run(root, out=out, resamples=resamples)


@app.command()
def analyze(
    path: Annotated[Path, typer.Argument(help="A run dir, or the root of `sdd run` (every variant and seed).")],
    from_: Annotated[str | None, typer.Option("--from", help="Earlier stage (a stage name in the run dir).")] = None,
    to: Annotated[str | None, typer.Option(help="Later stage; with --from, analyse just this pair.")] = None,
    samples: Annotated[int | None, typer.Option(help="Samples per problem for pass@k curves and diversity (K).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N problems.")] = None,
    benchmark: Annotated[str | None, typer.Option(help="Problems to sample on (default: the run's eval benchmark).")] = None,
    data_dir: DataDir = None,
    force: Force = False,
) -> None:
    """What each stage changed and what it lost: update sparsity, pass@k boundary, diversity, teacher KL."""
    from sdd.stages import analyze as stage

    stage.run(path, from_stage=from_, to_stage=to, samples=samples, limit=limit, benchmark=benchmark,
              data_dir=data_dir, force=force)


@toy_app.command("init")
def toy_init(
    run: Annotated[Path, typer.Argument(help="Run directory to create.")],
    seed: Annotated[int, typer.Option(help="Seed for data and initial weights.")] = 0,
    min_terms: Annotated[int | None, typer.Option(help="Fewest numbers in a chain (difficulty dial; default 3).")] = None,
    max_terms: Annotated[int | None, typer.Option(help="Most numbers in a chain (default 6).")] = None,
    train: Annotated[int | None, typer.Option(help="Training problems (default 4000).")] = None,
    test: Annotated[int | None, typer.Option(help="Test problems (default 200).")] = None,
    slip_rate: Annotated[float | None, typer.Option(help="Share of training solutions with one arithmetic slip.")] = None,
    force: Force = False,
) -> None:
    """Tiny tokenizer, teacher and student, and synthetic verifiable arithmetic, all local."""
    from sdd.stages import toy_init as stage

    stage.run(run, seed=seed, force=force, min_terms=min_terms, max_terms=max_terms, n_train=train, n_test=test,
              slip_rate=slip_rate)


@app.command()
def inspect(
    run: Annotated[Path, typer.Argument(help="Run directory holding the stage (its eval gives problems and sampling).")],
    stage: Annotated[str | None, typer.Option(help="Warmup or distill stage to inspect (default: distill).")] = None,
    student: Annotated[str | None, typer.Option(help="Any student checkpoint (path or hub id), with --teacher.")] = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher checkpoint to score --student against.")] = None,
    problems: Annotated[int, typer.Option(help="Problems to sample (the first N of the run's eval benchmark).")] = 8,
    out: Annotated[Path | None, typer.Option(help="HTML file to write (default: RUN/analysis/inspect-<stage>.html).")] = None,
    top_k: Annotated[int, typer.Option(help="Teacher alternatives shown on hover.")] = 5,
    seed: Annotated[int, typer.Option(help="Sampling seed (0 draws eval's first sample).")] = 0,
    benchmark: Annotated[str | None, typer.Option(help="Problems to sample instead of the run's eval benchmark.")] = None,
    data_dir: DataDir = None,
    compare: Annotated[bool, typer.Option("--compare/--no-compare", help="Also score the other bridge stage (warmup vs distill) when the run has both.")] = True,
) -> None:
    """One HTML page: each token of the student's samples coloured by its KL to the teacher."""
    from sdd.stages import inspect as stage_module

    stage_module.run(run, stage=stage, student=student, teacher=teacher, problems=problems, out=out, top_k=top_k,
                     seed=seed, benchmark=benchmark, data_dir=data_dir, compare=compare)


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps the exceptions a user should see to one line and an exit code."""
    from sdd.errors import EXIT_INTERRUPTED, Interrupted, SddError, StageSkipped

    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:  # click returns (not raises) 130 for Ctrl-C and Exit codes here
            sys.exit(code)
    except SddError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except KeyboardInterrupt:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - click usage errors, and sdd's own stage outcomes below
        import click

        if isinstance(err, click.exceptions.Abort):
            sys.exit(130)
        if isinstance(err, click.ClickException):
            typer.echo(f"error: {err.format_message()}", err=True)
            sys.exit(2)
        if isinstance(err, StageSkipped):
            typer.echo(str(err))
            sys.exit(0)
        if isinstance(err, Interrupted):
            typer.echo(str(err), err=True)
            sys.exit(EXIT_INTERRUPTED)
        raise
