"""The life of one stage: lock it, record it in the manifest, run it, record how it ended.

Every stage, training or not, runs inside `open_stage`: the lock keeps a second job off the stage, the
manifest record says what ran from what, and whatever ends the body (done, a user error, a crash, a
signal) is recorded before the exception reaches the CLI, which maps it to an exit code. A signal is
answered with a checkpoint at the next step and exit 75 (`PreemptionFlag`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from sdd import config as cfg
from sdd.errors import Interrupted, SddError, StageSkipped
from sdd.manifest import RunDir, is_main_process
from sdd.train.checkpoints import CheckpointWriteFailed, check_resumable, complete_checkpoints, io_failure
from sdd.train.distributed import any_rank


class StageRequest(Protocol):
    """What `open_stage` reads of a stage's arguments (sdd.stages.common.StageArgs has it)."""

    run: str
    force: bool
    trust_changed: bool


class InputRequest(Protocol):
    """A stage input as `open_stage` records it (sdd.stages.common.StageInput): its manifest entry."""

    def record(self, trust_changed: bool) -> dict: ...


class NonFiniteLoss(Exception):
    """Training produced a non-finite loss or gradient; nothing from that step was applied or saved."""

    def __init__(self, step: int, what: str):
        super().__init__(f"{what} at step {step}")
        self.step = step


class PreemptionFlag:
    """First SIGTERM/SIGINT asks for a checkpoint at the next step boundary; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now; checkpoints already written stay valid
        self.requested = name
        if is_main_process():
            print(f"\n{name}: saving a checkpoint at the next step, then stopping (Ctrl-C again to abort now)",
                  file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def installed(self) -> Iterator[PreemptionFlag]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


@dataclasses.dataclass
class Stage:
    """An open stage: its run dir, name and folder while it runs under its lock."""

    run: RunDir
    name: str
    dir: Path
    flag: PreemptionFlag
    started: float
    finished: bool = False
    engine: dict | None = None  # engine_report of this rank, once training began
    publish_error: SddError | None = None  # a push after the stage was recorded done; raised once the stage closes

    def output(self, role: str, path: Path) -> dict:
        return {role: self.run.output_entry(path)}

    @property
    def elapsed(self) -> float:
        return time.time() - self.started


@contextlib.contextmanager
def open_stage(args: StageRequest, *, name: str, stage: str, role: str | None, config: dict,
               inputs: dict[str, InputRequest]) -> Iterator[Stage]:
    """Lock the stage, record it as running, and record how it ended whatever happens.

    The body calls `run.end(name, "done", ...)` itself through `finish`; anything else that
    escapes (a user error, a crash, a signal) is recorded as failed or interrupted, and the
    exception continues to the CLI, which maps it to an exit code.

    Under a launcher only rank 0 takes the lock and checks the stage folder, but every rank
    learns the verdict: a rank that went ahead alone would delete the holder's half-written
    checkpoint (resume_point) and then hang in the first collective.
    """
    run = RunDir(args.run)
    run.create()
    stage_dir = run.path / name
    record = run.stage(name)
    if record and record["status"] == "done" and not args.force:
        raise StageSkipped(f"{name} is done in {run.path} (use --force to redo it, or --name for another variant)")
    flag = PreemptionFlag()
    lock = run.lock(name)
    with flag.installed():  # from here on a signal is answered with a record and exit 75, never a bare death
        try:
            input_records = {key: value.record(args.trust_changed) for key, value in inputs.items()}
            problem: SddError | None = None
            if is_main_process():
                try:
                    lock.acquire()
                    if args.force:
                        for old in stage_dir.glob("checkpoint-*"):
                            shutil.rmtree(old, ignore_errors=True)
                    stage_dir.mkdir(parents=True, exist_ok=True)
                    check_resumable(stage_dir, input_records, config)
                except SddError as err:
                    problem = err
                    lock.release()
            if any_rank(problem is not None):
                raise problem or SddError(f"{name}: rank 0 refused to start the stage (its message says why)")
        except KeyboardInterrupt:  # a second Ctrl-C before the stage began: nothing to record
            lock.release()
            raise Interrupted(f"{name} aborted before it started; rerun the same command") from None
        yield from _run_stage(run, name, stage, role, config, input_records, stage_dir, flag, lock)


def _run_stage(run: RunDir, name: str, stage: str, role: str | None, config: dict, input_records: dict,
               stage_dir: Path, flag: PreemptionFlag, lock) -> Iterator[Stage]:
    """The body of open_stage once the stage is locked: record it, run it, record how it ended."""
    try:
        stage_dir.mkdir(parents=True, exist_ok=True)
        run.begin(name, stage=stage, role=role, config=cfg.to_jsonable(config), inputs=input_records)
        handle = Stage(run, name, stage_dir, flag, time.time())
        try:
            if flag.requested:  # signalled while the stage was opening
                raise Interrupted(f"{name} stopped on {flag.requested} before it started; rerun the same command")
            yield handle
            if not handle.finished:
                signal_name = flag.requested or "a signal"
                last = last_complete_checkpoint(stage_dir)
                if last:
                    raise Interrupted(f"{name} stopped on {signal_name}; its checkpoint is saved ({last}) - "
                                      "rerun the same command to resume")
                raise Interrupted(f"{name} stopped on {signal_name} before its first checkpoint (work finished so far "
                                  "is kept) - rerun the same command to resume")
        except Interrupted as err:
            run.end(name, "interrupted", error=str(err))
            raise
        except KeyboardInterrupt:
            # A second Ctrl-C: stopped where it was, maybe mid-save; resume_point skips a half-written
            # checkpoint. Raised as Interrupted (exit 75, "rerun to resume"): typer turns a bare
            # KeyboardInterrupt into a *returned* 130, which the CLI and `sdd run` would take as success.
            last = last_complete_checkpoint(stage_dir)
            keep = f"from {last}" if last else "from the start (no checkpoint was complete)"
            message = f"{name} aborted by a second Ctrl-C; rerun the same command to resume {keep}"
            run.end(name, "interrupted", error=message)
            raise Interrupted(message) from None
        except NonFiniteLoss as err:
            last = last_complete_checkpoint(stage_dir)
            keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            message = f"{name}: {err}; {keep}. Lower the learning rate or check the data, then rerun"
            run.end(name, "failed", error=message)
            raise SddError(message) from None
        except CheckpointWriteFailed as err:
            last = last_complete_checkpoint(stage_dir)
            keep = f"the last complete checkpoint, {last}, is intact" if last else "no earlier checkpoint exists"
            message = f"{name}: {err}; {keep}. Free disk space, then rerun the same command to resume"
            run.end(name, "failed", error=message)
            raise SddError(message) from None
        except SddError as err:
            run.end(name, "failed", error=str(err))
            raise
        except OSError as err:
            reason = io_failure(err, Path(err.filename) if isinstance(err.filename, str) else None)
            if reason is None:
                run.end(name, "failed", error=f"{type(err).__name__}: {err}")
                raise
            message = f"{name}: could not write {err.filename or 'a file'} ({reason}); work saved so far is kept. Free disk space, then rerun the same command"
            run.end(name, "failed", error=message)
            raise SddError(message) from None
        except BaseException as err:
            run.end(name, "failed", error=f"{type(err).__name__}: {err}")
            raise
        if handle.publish_error is not None:  # the stage is done; only publishing it failed
            raise handle.publish_error
    finally:
        lock.release()
        release_distributed()


def last_complete_checkpoint(stage_dir: Path) -> str | None:
    """The name of the newest sealed checkpoint, for the one line that tells a user where a rerun resumes."""
    complete = complete_checkpoints(stage_dir)
    return complete[-1].name if complete else None


def release_distributed() -> None:
    """Tear down the process group a launcher made this stage create, once the stage is over.

    Without it, gloo runs intermittently aborted at exit after training had finished
    ("terminate called without an active exception", 2 of 26 runs); with it none did (20 runs).
    Accelerate's shared state is reset too, so a later stage in the same process starts afresh.
    """
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()  # local, no collective: safe even when another rank failed
    with contextlib.suppress(Exception):  # private API; only matters to a second stage in this process
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


@dataclasses.dataclass(frozen=True)
class HubTarget:
    """The hub model repo a stage pushes `final/` to (sdd's push_to_hub; TRL's hub_private_repo, hub_token, hub_revision)."""

    repo_id: str
    private: bool | None = None
    token: str | None = None
    revision: str | None = None


def finish(stage: Stage, *, outputs: dict | None = None, metrics: dict | None = None, push: HubTarget | None = None) -> None:
    """Record the stage done, write the model card of its checkpoint, and push that checkpoint when asked.

    The card (`README.md` in the checkpoint folder, sdd.model_card) is written from the manifest once the
    record says done. A push that fails leaves the stage done and its `final/` intact: the error line says
    so and names the command that uploads it.
    """
    extra: dict[str, Any] = {}
    if stage.engine:
        extra = {"engine": stage.engine, "trainable_parameters": stage.engine.get("trainable_elements"),
                 "total_parameters": stage.engine.get("full_elements")}
    stage.run.end(stage.name, "done", outputs=outputs,
                  metrics={**(metrics or {}), **extra, "wall_time_s": round(stage.elapsed, 1)})
    stage.finished = True
    if not outputs or not is_main_process():
        return
    from sdd import model_card

    card = model_card.write(stage.run, stage.name)
    if push is None or card is None:
        return
    try:
        url = model_card.push(card.parent, push.repo_id, private=push.private, token=push.token, revision=push.revision)
    except SddError as err:
        stage.publish_error = SddError(f"{stage.name} is done, but {err}; once fixed, upload it with "
                                       f"`hf upload {push.repo_id} {card.parent} .`")
        return

    def pushed(data: dict) -> None:
        data["stages"][stage.name]["metrics"].update(pushed_to=push.repo_id, pushed_url=url)

    stage.run.update(pushed)
    print(f"{stage.name}: pushed {card.parent} to {url}", flush=True)
