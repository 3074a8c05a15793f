"""Running a plan's jobs: in long-lived worker processes, or each under a launcher.

Jobs run inside worker processes so torch and TRL are imported once per worker rather than once
per stage; `workers` > 1 runs independent jobs side by side (each worker gets cores/N threads:
small models are overhead-bound and two workers beat one with two threads). With a launcher
(`accelerate launch --config_file zero3.yaml`) each training job runs as its own process instead.

This room does not import the CLI or the stages: the command (`sdd.stages.run`) hands `execute`
the function that runs one job in-process by calling its stage (`run_job`), so the arrows run one way.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import multiprocessing
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sdd.errors import EXIT_INTERRUPTED, SddError
from sdd.experiment.recipe import Job
from sdd.manifest import RunDir

OK, SKIPPED, FAILED, INTERRUPTED = "ok", "skipped", "failed", "interrupted"
RunJob = Callable[[Job], tuple[str, str]]  # job -> (outcome, message), picklable (module level)


class JobsFailed(SddError):
    """Some jobs failed: not bad input to `sdd run` itself, so the ordinary failure status."""

    exit_code = 1


def select(jobs: list[Job], only: list[str] | None) -> list[Job]:
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


def is_done(job: Job) -> bool:
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


def run_subprocess(job: Job, launcher: list[str]) -> tuple[str, str]:
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
def execute(jobs: list[Job], datasets: dict[str, str], *, workers: int, launcher: list[str],
            run_job: RunJob) -> dict[str, str]:
    """Run jobs whose dependencies succeeded; dependents of a failure are skipped, the rest go on.

    `run_job` runs one job inside a worker (the command passes one that calls the job's stage function).
    """
    from rich.console import Console

    console = Console()
    outcome: dict[str, str] = {}
    pending = [j for j in jobs]
    # An explicit OMP_NUM_THREADS wins: `make demo` sets 1, so a machine with more cores sums in the same order.
    omp = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(omp) if omp.isdigit() and int(omp) > 0 else max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    running: dict[futures.Future, tuple[Job, float]] = {}
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
                        future = pool.submit(run_job, job)
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
