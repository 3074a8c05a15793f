"""`sdd run`: execute a recipe's plan, skipping what is done and resuming what was interrupted.

The experiment room (sdd.experiment) loads the recipe, plans the jobs (each an `sdd <stage> ...`
command line kept as its stage, run dir, flags and options file), runs them (execute.py: worker
processes, `--jobs N`, `--launcher`) or submits them to Slurm (slurm.py). This command adds what
needs the stages: running one job in-process by calling its stage function with the StageArgs its
command line means (`run_job`, handed to the workers; tests/test_cli.py checks the CLI parses every
job's argv into the same StageArgs), and the resolved configs of `--dry-run --json`.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from pathlib import Path

from sdd import stages
from sdd.errors import EXIT_INTERRUPTED, Interrupted, SddError, StageSkipped
from sdd.experiment import recipe as recipes
from sdd.experiment.execute import (  # noqa: F401 - select and is_done are part of this command's surface
    FAILED,
    INTERRUPTED,
    OK,
    SKIPPED,
    JobsFailed,
    execute,
    is_done,
    select,
)
from sdd.experiment.slurm import submit_slurm
from sdd.stages import resolved
from sdd.stages.common import StageArgs


def stage_args(job: recipes.Job) -> StageArgs:
    """What the job's command line (`job.argv`) hands its stage, built from the job itself."""
    return StageArgs(run=str(job.run_dir), name=job.name, config_file=job.config_file, cli=dict(job.flags),
                     sets=list(job.sets))


def resolved_config(job: recipes.Job) -> dict | None:
    """The job's sdd options and TRL config as its stage will resolve them (`sdd <stage> ... --print-config`).

    Before the run, a run dir has no config.yaml yet; the layers list says so (for recipes, `sdd run`
    hands every value through the plan's --config file, so nothing is missing from the result).
    """
    if job.stage not in (*resolved.TRAINING_STAGES, "eval"):
        return None
    return resolved.resolve(job.stage, stage_args(job))


def run_job(job: recipes.Job) -> tuple[str, str]:
    """One job inside this process (a worker of `execute`): its stage function, called as its command would."""
    stages.quiet_libraries()
    if job.stage == "toy-init":
        from sdd.stages import toy_init

        return outcome(lambda: toy_init.run(job.run_dir))
    return outcome(lambda: stages.module(job.stage).run(stage_args(job)))


def outcome(call: Callable[[], object]) -> tuple[str, str]:
    """Run one job; how it ended, as `sdd run` reports it: (ok, skipped, interrupted or failed; a message).

    An int the call returns is a command's exit status (130 and 75 mean interrupted).
    """
    try:
        code = call()
        if isinstance(code, int) and code:
            return (INTERRUPTED, "interrupted") if code in (130, EXIT_INTERRUPTED) else (FAILED, f"exit {code}")
    except StageSkipped as skip:
        return SKIPPED, str(skip)
    except Interrupted as err:
        return INTERRUPTED, str(err)
    except SddError as err:
        return FAILED, str(err)
    except KeyboardInterrupt:
        return INTERRUPTED, "interrupted"
    except Exception as err:  # noqa: BLE001 - one job's bug must not take the other jobs down; it is reported
        import traceback

        traceback.print_exc()
        return FAILED, f"{type(err).__name__}: {err}"
    finally:
        import gc

        gc.collect()
    return OK, ""


def run(recipe_path: str, *, root: str, seeds: int | None, only: list[str] | None, jobs: int, launcher: str | None,
        dry_run: bool, slurm: str | None, slurm_args: list[str] | None, as_json: bool = False,
        slurm_profile: str | None = None) -> None:
    recipe = recipes.load(recipe_path)
    planned, datasets = recipes.plan(recipe, Path(root).resolve(), seeds)
    chosen = select(planned, only)
    if as_json:
        print(json.dumps([{"id": j.id, "stage": j.stage, "run_dir": str(j.run_dir), "argv": j.argv, "after": j.after,
                           "variant": j.variant, "seed": j.seed, "config": resolved_config(j)} for j in chosen], indent=2))
        return
    if slurm:
        submit_slurm(chosen, datasets, slurm, root=Path(root), recipe=recipe, profile=slurm_profile, dry_run=dry_run,
                     extra=list(slurm_args or []))
        return
    if dry_run:
        for job in chosen:
            state = "done" if is_done(job) else "todo"
            print(f"[{state}] sdd {shlex.join(job.argv)}")
        return
    if jobs < 1:
        raise SddError("--jobs must be at least 1")
    todo = [j for j in chosen if not is_done(j)]
    if not todo:
        print(f"all {len(chosen)} jobs of {recipe_path} are done in {root}")
        return
    started = time.time()
    outcome = execute(chosen, datasets, workers=jobs, launcher=shlex.split(launcher) if launcher else [],
                      run_job=run_job)
    failed = [j for j, r in outcome.items() if r in (FAILED, "blocked")]
    interrupted = [j for j, r in outcome.items() if r == INTERRUPTED]
    print(f"{len(outcome) - len(failed) - len(interrupted)}/{len(outcome)} jobs done in {time.time() - started:.0f}s")
    if interrupted:
        raise Interrupted(f"{len(interrupted)} job(s) interrupted; rerun the same command to resume")
    if failed:
        raise JobsFailed(f"{len(failed)} job(s) failed or blocked: {', '.join(failed[:5])}; fix and rerun (done jobs are kept)")
