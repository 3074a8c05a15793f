"""`sdd run`: execute a recipe's plan, skipping what is done and resuming what was interrupted.

The experiment room (sdd.experiment) loads the recipe, plans the jobs (`sdd <stage> ...` command
lines), runs them (execute.py: worker processes, `--jobs N`, `--launcher`) or submits them to
Slurm (slurm.py). This command adds only what needs the CLI: running one job's argv in-process
through the CLI's own parser (`run_in_process`, handed to the workers) and the resolved configs
of `--dry-run --json` (`resolved_config`).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import time
from pathlib import Path

from sdd.errors import EXIT_INTERRUPTED, Interrupted, SddError
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


def resolved_config(job: recipes.Job) -> dict | None:
    """The job's sdd options and TRL config as its stage will resolve them (`sdd <stage> ... --print-config`).

    Parsed by the CLI's own parser, so what is shown is what the command line means. Before the
    run, a run dir has no config.yaml yet; the layers list says so (for recipes, `sdd run` hands
    every value through the plan's --config file, so nothing is missing from the result).
    """
    if job.stage not in ("sft", "teacher-rl", "student-rl", "warmup", "distill", "eval"):
        return None
    import io

    from sdd.cli import app

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        app(args=[*job.argv, "--print-config", "--json"], standalone_mode=False)
    return json.loads(out.getvalue())


def run_in_process(argv: list[str]) -> tuple[str, str]:
    """One job through the CLI's own parser, inside this process; returns (outcome, message)."""
    from click.exceptions import Exit as ClickExit

    from sdd.cli import app
    from sdd.errors import StageSkipped

    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:
            return (INTERRUPTED, "interrupted") if code in (130, EXIT_INTERRUPTED) else (FAILED, f"exit {code}")
    except StageSkipped as skip:
        return SKIPPED, str(skip)
    except Interrupted as err:
        return INTERRUPTED, str(err)
    except SddError as err:
        return FAILED, str(err)
    except ClickExit as exit_:
        return (OK, "") if exit_.exit_code == 0 else (FAILED, f"exit {exit_.exit_code}")
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
                      run_job=run_in_process)
    failed = [j for j, r in outcome.items() if r in (FAILED, "blocked")]
    interrupted = [j for j, r in outcome.items() if r == INTERRUPTED]
    print(f"{len(outcome) - len(failed) - len(interrupted)}/{len(outcome)} jobs done in {time.time() - started:.0f}s")
    if interrupted:
        raise Interrupted(f"{len(interrupted)} job(s) interrupted; rerun the same command to resume")
    if failed:
        raise JobsFailed(f"{len(failed)} job(s) failed or blocked: {', '.join(failed[:5])}; fix and rerun (done jobs are kept)")
