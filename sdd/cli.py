"""The `sdd` command line: parses options and hands them to a stage module, nothing more.

Each stage option's help is the one its options dataclass declares on the field (`metadata["help"]`,
as TRL's configs do), so the dataclasses are imported here; heavy imports (torch, transformers,
trl) happen inside the stage functions, so `sdd --help` and `sdd status` still answer at once. Errors a user can fix print one line and exit 2; a stage stopped
by SIGTERM/SIGINT exits 75 after saving, so a Slurm script can requeue it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from sdd import config as cfg
from sdd.stages import quiet_libraries
from sdd.stages.common import DataOptions, StageArgs
from sdd.stages.distill import DistillOptions
from sdd.stages.eval import EvalOptions
from sdd.stages.rl import RlOptions
from sdd.stages.sft import SftOptions
from sdd.stages.warmup import WarmupOptions

quiet_libraries()

app = typer.Typer(
    help="sparse-to-dense: RL a teacher with a math verifier, then distil it into a student with dense token-level KL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
toy_app = typer.Typer(help="The embedded toy task: tiny local models and synthetic verifiable arithmetic.",
                      no_args_is_help=True)
app.add_typer(toy_app, name="toy")

# Options every stage command takes (StageArgs besides the stage's own options).
# --run is required to run a stage, not to list what it accepts (--help-config): `_stage` checks it.
Run = Annotated[Path | None, typer.Option("--run", help="Run directory (holds manifest.json and one folder per stage); required.")]
Name = Annotated[str | None, typer.Option(help="Stage name in the run dir, to keep several variants of a stage.")]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="YAML file of options (sdd's and the TRL config's).")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="key=value for any sdd option or TRL config field; repeatable.")]
Force = Annotated[bool, typer.Option("--force", help="Redo a stage that is already done.")]
TrustChanged = Annotated[bool, typer.Option("--trust-changed", help="Use input checkpoints even if their files changed.")]
PrintConfig = Annotated[bool, typer.Option("--print-config", help="Print the fully resolved sdd options and TRL config (YAML) and exit; nothing runs, nothing is written.")]
HelpConfig = Annotated[bool, typer.Option("--help-config", help="List every option the stage accepts, sdd's and its TRL config's, with type, default and help, and exit.")]
AsJson = Annotated[bool, typer.Option("--json", help="With --print-config or --help-config: print JSON.")]
COMMON = ("run", "name", "config", "set_", "force", "trust_changed", "print_config", "help_config", "json_")


def _option(options_cls, field: str, *flags: str):
    """A stage's own option, its help the one its options dataclass declares on the field."""
    return typer.Option(*flags, help=cfg.help_for(options_cls, field))


Dataset = Annotated[str | None, _option(DataOptions, "dataset")]
DataDir = Annotated[str | None, _option(DataOptions, "data_dir")]


def stage_args(params: dict) -> StageArgs:
    """The StageArgs a stage command's parsed parameters (`ctx.params`) mean: the shared ones, the options given.

    A repeatable option arrives as a tuple, empty when not given; typer would hand the command None
    or a list, and so does this.
    """
    given = {key: list(value) if isinstance(value, tuple) else value for key, value in params.items()
             if key not in COMMON and value is not None and value != ()}
    return StageArgs(run=str(params["run"]), name=params["name"],
                     config_file=str(params["config"]) if params["config"] else None, cli=given,
                     sets=list(params["set_"] or []), force=params["force"], trust_changed=params["trust_changed"])


def _stage(ctx: typer.Context) -> None:
    """A stage command: the options it accepts (--help-config), its resolved configuration (--print-config),
    or the stage run."""
    from sdd import stages
    from sdd.errors import SddError
    from sdd.stages import resolved

    stage, params = ctx.command.name, ctx.params
    if params["help_config"]:
        flags = {p.name: p.opts[0] for p in ctx.command.params if p.name not in (*COMMON, "help")}
        resolved.show_fields(stage, flags, as_json=params["json_"])
        return
    if params["run"] is None:
        raise SddError(f"missing option '--run': the run directory (sdd {stage} --help lists the options)")
    args = stage_args(params)
    if params["print_config"]:
        resolved.show(stage, args, as_json=params["json_"])
        return
    stages.module(stage).run(args)


@app.command()
def sft(
    ctx: typer.Context,
    run: Run = None,
    role: Annotated[str, _option(SftOptions, "role")] = SftOptions.role,
    model: Annotated[str | None, _option(SftOptions, "model")] = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    name: Name = None, config: ConfigFile = None, set_: Sets = None, force: Force = False, trust_changed: TrustChanged = False,
    print_config: PrintConfig = False, help_config: HelpConfig = False, json_: AsJson = False,
) -> None:
    """Supervised fine-tuning on worked solutions (bootstrap, or the SFT-teacher control)."""
    _stage(ctx)


@app.command("teacher-rl")
def teacher_rl(
    ctx: typer.Context,
    run: Run = None,
    model: Annotated[str | None, _option(RlOptions, "model")] = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    gate: Annotated[bool | None, _option(RlOptions, "gate", "--gate/--no-gate")] = None,
    name: Name = None, config: ConfigFile = None, set_: Sets = None, force: Force = False, trust_changed: TrustChanged = False,
    print_config: PrintConfig = False, help_config: HelpConfig = False, json_: AsJson = False,
) -> None:
    """GRPO on the teacher with the math verifier as reward."""
    _stage(ctx)


@app.command("student-rl")
def student_rl(
    ctx: typer.Context,
    run: Run = None,
    model: Annotated[str | None, _option(RlOptions, "model")] = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    gate: Annotated[bool | None, _option(RlOptions, "gate", "--gate/--no-gate")] = None,
    name: Name = None, config: ConfigFile = None, set_: Sets = None, force: Force = False, trust_changed: TrustChanged = False,
    print_config: PrintConfig = False, help_config: HelpConfig = False, json_: AsJson = False,
) -> None:
    """GRPO on the student (after the bridge, or straight on the base student as the direct-GRPO control)."""
    _stage(ctx)


@app.command()
def warmup(
    ctx: typer.Context,
    run: Run = None,
    teacher: Annotated[str | None, _option(WarmupOptions, "teacher")] = None,
    student: Annotated[str | None, _option(WarmupOptions, "student")] = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    name: Name = None, config: ConfigFile = None, set_: Sets = None, force: Force = False, trust_changed: TrustChanged = False,
    print_config: PrintConfig = False, help_config: HelpConfig = False, json_: AsJson = False,
) -> None:
    """Off-policy bridge: the teacher writes completions, the student learns them with forward KL."""
    _stage(ctx)


@app.command()
def distill(
    ctx: typer.Context,
    run: Run = None,
    teacher: Annotated[str | None, _option(DistillOptions, "teacher")] = None,
    student: Annotated[str | None, _option(DistillOptions, "student")] = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    name: Name = None, config: ConfigFile = None, set_: Sets = None, force: Force = False, trust_changed: TrustChanged = False,
    print_config: PrintConfig = False, help_config: HelpConfig = False, json_: AsJson = False,
) -> None:
    """On-policy distillation: the student samples, per-token reverse KL to the teacher is the loss."""
    _stage(ctx)


@app.command("eval")
def eval_(
    ctx: typer.Context,
    run: Run = None,
    role: Annotated[str, _option(EvalOptions, "role")] = EvalOptions.role,
    model: Annotated[str | None, _option(EvalOptions, "model")] = None,
    benchmark: Annotated[list[str] | None, _option(EvalOptions, "benchmark")] = None,
    data_dir: Annotated[str | None, _option(EvalOptions, "data_dir")] = None,
    samples: Annotated[int | None, _option(EvalOptions, "samples")] = None,
    seeds: Annotated[int | None, _option(EvalOptions, "seeds")] = None,
    temperature: Annotated[float | None, _option(EvalOptions, "temperature")] = None,
    top_p: Annotated[float | None, _option(EvalOptions, "top_p")] = None,
    top_k: Annotated[int | None, _option(EvalOptions, "top_k")] = None,
    max_new_tokens: Annotated[int | None, _option(EvalOptions, "max_new_tokens")] = None,
    greedy: Annotated[bool | None, _option(EvalOptions, "greedy", "--greedy")] = None,
    backend: Annotated[str | None, _option(EvalOptions, "backend")] = None,
    limit: Annotated[int | None, _option(EvalOptions, "limit")] = None,
    name: Name = None, config: ConfigFile = None, set_: Sets = None, force: Force = False, trust_changed: TrustChanged = False,
    print_config: PrintConfig = False, help_config: HelpConfig = False, json_: AsJson = False,
) -> None:
    """Accuracy: avg@k (mean and spread over seeds), pass@k, per-problem results."""
    _stage(ctx)


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
    slurm_profile: Annotated[str | None, typer.Option(help="Slurm resources: gpu (8-GPU nodes) or cpu (the toy on CPU nodes); default the recipe's slurm.profile, else gpu.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Run an experiment: every variant and seed, in dependency order, skipping what is done."""
    from sdd.stages import run as stage

    stage.run(str(recipe), root=str(root), seeds=seeds, only=only, jobs=jobs, launcher=launcher, dry_run=dry_run,
              slurm=slurm, slurm_args=slurm_arg, as_json=json_, slurm_profile=slurm_profile)


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


def parse_stage_args(argv: list[str]) -> tuple[str, StageArgs]:
    """The stage and the StageArgs that `sdd <argv>` hands it, parsed by this CLI as `_stage` does; nothing runs."""
    command = typer.main.get_command(app).commands[argv[0]]
    with command.make_context(argv[0], list(argv[1:])) as ctx:
        return command.name, stage_args(ctx.params)


def run_in_process(argv: list[str]) -> tuple[str, str]:
    """`sdd <argv>` inside this process, through this parser: (outcome, message) as `sdd run` reports a job's.

    For tests and benchmarks that drive the real command line without starting a process per command.
    """
    from sdd.stages.run import outcome

    def command():
        try:
            return app(args=list(argv), standalone_mode=False)
        except typer.Exit as exit_:
            return exit_.exit_code

    return outcome(command)


def _parser_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(aborts, usage errors) of the click that typer parses with: typer's own copy (typer >= 0.20), or click."""
    aborts: list[type] = [typer.Abort]
    usage: list[type] = [typer.TyperException] if hasattr(typer, "TyperException") else []
    try:
        import click
    except ImportError:
        pass
    else:
        aborts.append(click.exceptions.Abort)
        usage.append(click.ClickException)
    return tuple(aborts), tuple(usage)


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
    except Exception as err:  # noqa: BLE001 - usage errors of the parser, and sdd's own stage outcomes below
        aborts, usage_errors = _parser_exceptions()
        if isinstance(err, aborts):
            sys.exit(130)
        if isinstance(err, usage_errors):
            if type(err).__name__ == "NoArgsIsHelpError":  # `sdd` alone: the help is the message
                typer.echo(err.format_message())
            else:
                typer.echo(f"error: {err.format_message()}", err=True)
            sys.exit(2)
        if isinstance(err, StageSkipped):
            typer.echo(str(err))
            sys.exit(0)
        if isinstance(err, Interrupted):
            typer.echo(str(err), err=True)
            sys.exit(EXIT_INTERRUPTED)
        raise
