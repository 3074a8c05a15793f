"""`sdd run`: execute a recipe's plan, skipping what is done and resuming what was interrupted.

Jobs are `sdd <stage> ...` command lines (see sdd.recipe). By default they run inside
long-lived worker processes, so torch and TRL are imported once per worker rather than once
per stage; `--jobs N` runs independent jobs side by side (each worker gets cores/N threads:
small models are overhead-bound and two workers beat one with two threads). `--launcher`
runs each training job as its own process under a launcher instead (`accelerate launch
--config_file zero3.yaml`), and `--slurm SCRIPT` submits the plan as a chain of Slurm jobs.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import json
import multiprocessing
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from sdd import recipe as recipes
from sdd.errors import EXIT_INTERRUPTED, SddError
from sdd.manifest import RunDir

OK, SKIPPED, FAILED, INTERRUPTED = "ok", "skipped", "failed", "interrupted"


class JobsFailed(SddError):
    """Some jobs failed: not bad input to `sdd run` itself, so the ordinary failure status."""

    exit_code = 1


def select(jobs: list[recipes.Job], only: list[str] | None) -> list[recipes.Job]:
    """Jobs matching --only (variant, stage kind, stage name or job id), with everything they depend on."""
    if not only:
        return jobs
    by_id = {j.id: j for j in jobs}
    chosen = {j.id for j in jobs if {j.variant, j.stage, j.name, j.id} & set(only)}
    if not chosen:
        names = sorted({j.variant for j in jobs if j.variant} | {j.stage for j in jobs})
        raise SddError(f"--only {','.join(only)} matches no job (variants and stages: {', '.join(names)})")
    stack = list(chosen)
    while stack:
        for dep in by_id[stack.pop()].after:
            if dep not in chosen:
                chosen.add(dep)
                stack.append(dep)
    return [j for j in jobs if j.id in chosen]


def is_done(job: recipes.Job) -> bool:
    run = RunDir(job.run_dir)
    if not run.exists():
        return False
    stages = run.stages()
    return all(stages.get(name, {}).get("status") == "done" for name in job.records)


def register_datasets(run_dir: Path, datasets: dict[str, str]) -> None:
    """Recipe-level dataset names (e.g. the toy's) must resolve in every run dir, as they do in shared/."""
    run = RunDir(run_dir)
    run.create()
    known = run.datasets()
    for name, path in datasets.items():
        if name not in known and Path(path).is_file():
            run.register_dataset(name, Path(path))


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


# -- workers ------------------------------------------------------------------------------------
def _worker_init(threads: int) -> None:
    import threading

    import torch

    torch.set_num_threads(threads)
    parent = os.getppid()

    def watch_parent() -> None:
        # A worker whose `sdd run` died (SIGKILL, lost node shell) must not train on unsupervised:
        # stop it the way preemption does, so it checkpoints and its stage is marked interrupted.
        while os.getppid() == parent:
            time.sleep(2.0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(600)
        os._exit(EXIT_INTERRUPTED)

    threading.Thread(target=watch_parent, daemon=True).start()


def run_in_process(argv: list[str]) -> tuple[str, str]:
    """One job through the CLI's own parser, inside this process; returns (outcome, message)."""
    from click.exceptions import Exit as ClickExit

    from sdd.cli import app
    from sdd.stages.common import Interrupted, StageSkipped

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


def run_subprocess(job: recipes.Job, launcher: list[str]) -> tuple[str, str]:
    command = [*launcher, "-m", "sdd", *job.argv] if launcher else [sys.executable, "-m", "sdd", *job.argv]
    code = subprocess.call(command)
    if code == 0:
        return OK, ""
    # Launchers (accelerate, torchrun) exit 1 whatever their workers exited with: the manifest says
    # whether the stage stopped cleanly on a signal.
    stages = RunDir(job.run_dir).stages() if RunDir(job.run_dir).exists() else {}
    if code == EXIT_INTERRUPTED or any(stages.get(n, {}).get("status") == "interrupted" for n in job.records):
        return INTERRUPTED, "interrupted"
    return FAILED, f"`{shlex.join(command)}` exited {code}"


# -- scheduling ---------------------------------------------------------------------------------
def execute(jobs: list[recipes.Job], datasets: dict[str, str], *, workers: int, launcher: list[str]) -> dict[str, str]:
    """Run jobs whose dependencies succeeded; dependents of a failure are skipped, the rest go on."""
    from rich.console import Console

    console = Console()
    outcome: dict[str, str] = {}
    pending = [j for j in jobs]
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    running: dict[futures.Future, tuple[recipes.Job, float]] = {}
    stopping: list[str] = []
    with futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                     initargs=(threads,)) as pool:

        def forward(signum, frame) -> None:
            """Stop dispatching; pass the signal on so running stages checkpoint and stop."""
            if stopping and signum == signal.SIGINT:
                raise KeyboardInterrupt
            stopping.append(signal.Signals(signum).name)
            console.print(f"[magenta]{stopping[-1]}: letting running jobs checkpoint, starting no new ones")
            # Always SIGTERM: after a terminal's Ctrl-C the workers already got one SIGINT, and a
            # second SIGINT would make them abort instead of checkpointing.
            for process in list(getattr(pool, "_processes", {}).values()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while (pending and not stopping) or running:
                for job in list(pending):
                    if stopping:
                        break
                    if len(running) >= workers:
                        break
                    if any(outcome.get(d) in (FAILED, INTERRUPTED, "blocked") for d in job.after):
                        outcome[job.id] = "blocked"
                        pending.remove(job)
                        continue
                    if not all(outcome.get(d) in (OK, SKIPPED) for d in job.after):
                        continue
                    pending.remove(job)
                    if is_done(job):
                        outcome[job.id] = SKIPPED
                        continue
                    register_datasets(job.run_dir, datasets)
                    console.print(f"[bold]→ {job.id}[/]  sdd {shlex.join(job.argv)}")
                    if launcher and job.trains:
                        future = pool.submit(run_subprocess, job, launcher)
                    else:
                        future = pool.submit(run_in_process, job.argv)
                    running[future] = (job, time.time())
                if not running:
                    continue
                done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
                for future in done:
                    job, started = running.pop(future)
                    try:
                        result, message = future.result()
                    except Exception as err:  # noqa: BLE001 - a worker that died (OOM-killed, segfault)
                        result, message = FAILED, f"worker died: {type(err).__name__}: {err}"
                    outcome[job.id] = result
                    style = {OK: "green", SKIPPED: "dim", FAILED: "red", INTERRUPTED: "magenta"}[result]
                    console.print(f"[{style}]{result:>11}[/] {job.id} ({time.time() - started:.0f}s) {message}")
        except KeyboardInterrupt:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    for job in pending:
        outcome.setdefault(job.id, INTERRUPTED if stopping else "blocked")
    return outcome


def submit_slurm(jobs: list[recipes.Job], datasets: dict[str, str], script: str, *, dry_run: bool,
                 extra: list[str]) -> None:
    """One sbatch per job, each depending (afterok) on the jobs it needs; done jobs are not resubmitted."""
    ids: dict[str, str] = {}
    for job in jobs:
        if not dry_run and is_done(job):
            continue
        deps = [ids[d] for d in job.after if d in ids]
        command = ["sbatch", "--parsable", f"--job-name=sdd:{job.id}", *extra]
        if deps:
            command.append("--dependency=afterok:" + ":".join(deps))
        command += ["--export=ALL,SDD_STAGE_TRAINS=" + ("1" if job.trains else "0"), script, *job.argv]
        if dry_run:
            ids[job.id] = f"<{job.id}>"
            print(shlex.join(command))
            continue
        register_datasets(job.run_dir, datasets)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise SddError(f"sbatch refused {job.id}: {result.stderr.strip() or result.stdout.strip()}")
        ids[job.id] = result.stdout.strip().split(";")[0]
        print(f"{ids[job.id]}  {job.id}")


def run(recipe_path: str, *, root: str, seeds: int | None, only: list[str] | None, jobs: int, launcher: str | None,
        dry_run: bool, slurm: str | None, slurm_args: list[str] | None, as_json: bool = False) -> None:
    recipe = recipes.load(recipe_path)
    planned, datasets = recipes.plan(recipe, Path(root).resolve(), seeds)
    chosen = select(planned, only)
    if as_json:
        print(json.dumps([{"id": j.id, "stage": j.stage, "run_dir": str(j.run_dir), "argv": j.argv, "after": j.after,
                           "variant": j.variant, "seed": j.seed, "config": resolved_config(j)} for j in chosen], indent=2))
        return
    if slurm:
        submit_slurm(chosen, datasets, slurm, dry_run=dry_run, extra=list(slurm_args or []))
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
    outcome = execute(chosen, datasets, workers=jobs, launcher=shlex.split(launcher) if launcher else [])
    failed = [j for j, r in outcome.items() if r in (FAILED, "blocked")]
    interrupted = [j for j, r in outcome.items() if r == INTERRUPTED]
    print(f"{len(outcome) - len(failed) - len(interrupted)}/{len(outcome)} jobs done in {time.time() - started:.0f}s")
    if interrupted:
        from sdd.stages.common import Interrupted

        raise Interrupted(f"{len(interrupted)} job(s) interrupted; rerun the same command to resume")
    if failed:
        raise JobsFailed(f"{len(failed)} job(s) failed or blocked: {', '.join(failed[:5])}; fix and rerun (done jobs are kept)")
