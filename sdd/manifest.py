"""The run directory and its manifest: the one record of what ran, from what, producing what.

Stages never pass checkpoints to each other directly. Each writes a record into
`<run>/manifest.json` and later stages (or `sdd run`, a Makefile, a chain of Slurm jobs) find
their inputs there. So the manifest must survive what clusters do to files: a job killed
mid-write (atomic replace, last good copy kept beside it), two jobs racing on one run dir
(a lock per stage naming its holder, a short lock around every manifest update), and
checkpoints edited or deleted behind its back (a content fingerprint per output).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sdd.errors import SddError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
BACKUP_NAME = "manifest.json.bak"
STATUSES = ("running", "done", "failed", "interrupted")

# Files at or under this size are hashed whole; larger ones by evenly spaced blocks, so fingerprinting
# a 16 GB checkpoint costs seconds, not minutes, while any rewrite of its weights still shows.
_FULL_HASH_LIMIT = 64 << 20
_SAMPLE_BLOCKS = 16
_BLOCK = 1 << 20


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def is_main_process() -> bool:
    """Under accelerate/torchrun only rank 0 writes the manifest, takes locks and prints."""
    return int(os.environ.get("RANK", "0")) == 0


def library_versions() -> dict[str, str]:
    import sdd
    from sdd.environment import versions

    found = versions(("torch", "transformers", "trl", "accelerate", "datasets", "math-verify", "vllm"))
    return {"sdd": sdd.__version__, **{name: version for name, version in found.items() if version is not None}}


# A checkpoint folder's model card (sdd.model_card) describes it and is rewritten as evals of it finish; it is
# not part of what the checkpoint holds, so it is left out of its fingerprint (with the card's temp file).
CARD_NAME = "README.md"


def _is_card(rel: str) -> bool:
    return rel == CARD_NAME or (rel.startswith(f".{CARD_NAME}.") and rel.endswith(".tmp"))


def fingerprint(path: str | Path) -> str:
    """Content fingerprint of a file or a checkpoint directory (names, sizes and bytes; a folder's card left out)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not _is_card(p.relative_to(path).as_posix()))
    for file in files:
        rel = file.name if file == path else file.relative_to(path).as_posix()
        size = file.stat().st_size
        digest.update(f"{rel}\0{size}\0".encode())
        with open(file, "rb") as handle:
            if size <= _FULL_HASH_LIMIT:
                for block in iter(lambda: handle.read(_BLOCK), b""):
                    digest.update(block)
            else:
                for i in range(_SAMPLE_BLOCKS):
                    handle.seek((size - _BLOCK) * i // (_SAMPLE_BLOCKS - 1))
                    digest.update(handle.read(_BLOCK))
    return "sha256:" + digest.hexdigest()[:32]


def atomic_write_text(path: Path, text: str) -> None:
    """Write-then-rename in the same directory, fsynced, so readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if err.errno == errno.ENOSPC:
            raise SddError(f"disk full while writing {path}; the previous version is intact - free space and rerun") from None
        if err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise SddError(f"cannot write {path} ({err.strerror}); choose a writable --run directory") from None
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StageLock:
    """Exclusive ownership of one stage of one run dir, across processes and hosts.

    An O_EXCL lock file holds the owner's pid, host and Slurm job id so a refusal can say who holds
    it. A lock left by a dead process on this host is taken over. Under Slurm a requeued job keeps
    its SLURM_JOB_ID but may land on another node, so a lock with our own job id is ours (its
    earlier run was killed by the requeue), and a lock whose job Slurm reports finished is taken
    over. Any other lock from another host cannot be checked from here, so the message says how to
    clear it once the user knows that job is gone.
    """

    # squeue states of a job that may still be running the stage (or will run it again, requeued).
    SLURM_ACTIVE = {"PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD",
                    "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}

    def __init__(self, path: Path):
        self.path = path
        self.held = False

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self, wait_s: float = 0.0, stop: Callable[[], bool] | None = None) -> None:
        """Take the lock; with wait_s, wait that long for a live holder to finish before refusing.

        `stop` ends the wait early without the lock (a preempted job must not spend its grace
        period waiting); the caller checks `held`.
        """
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self._acquire_once()
            except SddError:
                if time.monotonic() >= deadline:
                    raise
                if stop is not None and stop():
                    return None
                time.sleep(1.0)

    def _acquire_once(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso()}
        if os.environ.get("SLURM_JOB_ID"):
            me["slurm_job"] = os.environ["SLURM_JOB_ID"]
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if not owner:  # being written right now, or garbage: look again shortly
                    time.sleep(0.2)
                    if not self._owner() and self.path.exists():
                        self._break_stale(owner)
                    continue
                if self._stale(owner, me):
                    self._break_stale(owner)
                    continue
                job = f" (Slurm job {owner['slurm_job']})" if owner.get("slurm_job") else ""
                raise SddError(
                    f"{self.path.stem} is being run by pid {owner.get('pid')} on {owner.get('host')}{job} "
                    f"since {owner.get('since')}; wait for it, or if that job is dead remove {self.path}"
                ) from None
            except OSError as err:
                raise SddError(f"cannot create {self.path} ({err.strerror}); choose a writable --run directory") from None
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return
        raise SddError(f"could not take {self.path}; another process keeps recreating it")

    def _stale(self, owner: dict, me: dict) -> bool:
        same_host = owner.get("host") == me["host"]
        alive_here = same_host and _pid_alive(int(owner.get("pid", -1)))
        if same_host and not alive_here:
            return True
        if owner.get("slurm_job") and owner.get("slurm_job") == me.get("slurm_job"):
            return not alive_here  # our own job before its requeue, unless a live process of it holds the lock
        return bool(owner.get("slurm_job")) and self.slurm_job_finished(str(owner["slurm_job"]))

    @classmethod
    def slurm_job_finished(cls, job_id: str) -> bool:
        """Whether Slurm says the job ended: squeue shows its final state, or no longer knows it.

        False when Slurm cannot be asked (no squeue here, controller down): then nobody can tell.
        """
        import subprocess

        try:
            done = subprocess.run(["squeue", "-h", "-j", job_id, "-t", "all", "-o", "%T"], capture_output=True,
                                  text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return False
        if done.returncode != 0:
            return "invalid job id" in (done.stderr + done.stdout).lower()  # purged: it ended a while ago
        states = done.stdout.split()
        return bool(states) and not any(state in cls.SLURM_ACTIVE for state in states)

    def _break_stale(self, owner: dict) -> None:
        # Rename first: of several processes breaking the same stale lock, exactly one rename succeeds.
        grave = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.path, grave)
            grave.unlink()

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False

    def __enter__(self) -> StageLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------------------------------
# Typed records: what one stage's entry in manifest.json holds. The JSON on disk is these, field
# for field (`to_json`); a new field of a record is added here, once, and `begin`/`end` write it.


@dataclasses.dataclass
class Output:
    """A checkpoint a stage wrote: its path relative to the run dir, and its content fingerprint."""

    path: str
    fingerprint: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # keys this sdd does not know, kept as they are

    @classmethod
    def from_json(cls, entry: dict) -> Output:
        known = {"path", "fingerprint"}
        return cls(entry.get("path", ""), entry.get("fingerprint"), {k: v for k, v in entry.items() if k not in known})

    def to_json(self) -> dict:
        return {"path": self.path, "fingerprint": self.fingerprint, **self.extra}


@dataclasses.dataclass
class Input:
    """A checkpoint or dataset a stage consumed: the path it was given, and where that came from.

    `from_stage` and `run` name the stage (and its run dir, when not this one) that wrote it;
    `fingerprint` is its content when it was read, so a later reader can tell whether the file still is
    what the stage consumed. Keys absent on disk stay absent.
    """

    path: str
    from_stage: str | None = None
    run: str | None = None
    fingerprint: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. trusted_change

    @classmethod
    def from_json(cls, entry: dict) -> Input:
        known = {"path", "from_stage", "run", "fingerprint"}
        return cls(entry.get("path", ""), entry.get("from_stage"), entry.get("run"), entry.get("fingerprint"),
                   {k: v for k, v in entry.items() if k not in known})

    def to_json(self) -> dict:
        entry: dict[str, Any] = {"path": self.path}
        for key in ("from_stage", "run", "fingerprint"):
            if getattr(self, key) is not None:
                entry[key] = getattr(self, key)
        return {**entry, **self.extra}


@dataclasses.dataclass
class StageRecord:
    """One stage's entry in the manifest: what ran, from what, producing what, and how it ended.

    `begin` writes a record with status "running"; `end` sets the status, outputs and metrics, and for
    a finished stage `done_seq`, the order in which stages finished ("newest" means highest done_seq).
    `error` and `done_seq` are written only when set, as before records were typed.
    """

    name: str
    stage: str | None = None  # the stage kind: sft, teacher-rl, warmup, distill, student-rl, eval, toy-init
    role: str | None = None  # teacher or student
    status: str = "running"
    started_at: str | None = None
    ended_at: str | None = None
    host: str | None = None
    pid: int | None = None
    attempts: int = 1
    command: list[str] = dataclasses.field(default_factory=list)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)  # sdd.environment.capture()
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    inputs: dict[str, Input] = dataclasses.field(default_factory=dict)
    outputs: dict[str, Output] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None
    done_seq: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # keys this sdd does not know, kept as they are

    _OPTIONAL = ("error", "done_seq")

    @classmethod
    def from_json(cls, record: dict) -> StageRecord:
        fields = {f.name for f in dataclasses.fields(cls)} - {"extra", "inputs", "outputs"}
        values = {k: v for k, v in record.items() if k in fields and v is not None}
        return cls(**{"name": record.get("name", ""), **values},
                   inputs={k: Input.from_json(v) for k, v in (record.get("inputs") or {}).items()},
                   outputs={k: Output.from_json(v) for k, v in (record.get("outputs") or {}).items()},
                   extra={k: v for k, v in record.items() if k not in fields | {"inputs", "outputs"}})

    def to_json(self) -> dict:
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "extra" or (field.name in self._OPTIONAL and value is None):
                continue
            if field.name in ("inputs", "outputs"):
                value = {k: v.to_json() for k, v in value.items()}
            out[field.name] = value
        return {**out, **self.extra}

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def order(self) -> int:
        """Finishing order among the run dir's stages; 0 for a stage that has not finished."""
        return self.done_seq or 0

    def main_output(self, prefer: str | None = None) -> tuple[str, Output]:
        """(role, output) a stage is known by: `prefer` (default: the stage's own role) if it wrote one, else its first."""
        prefer = self.role if prefer is None else prefer
        role = prefer if prefer in self.outputs else next(iter(self.outputs))
        return role, self.outputs[role]

    def model_input(self) -> tuple[str, Input] | None:
        """(key, input) of the model a training stage started from: `student` (warmup, distill) or `model`."""
        key = next((key for key in ("student", "model") if key in self.inputs), None)
        return None if key is None else (key, self.inputs[key])


@dataclasses.dataclass(frozen=True)
class RecordedCheckpoint:
    """A checkpoint a finished stage wrote, found through its run dir's manifest."""

    run: Path  # the run dir, resolved
    stage: str  # the stage (record name) that wrote it
    role: str
    path: Path  # resolved, inside `run`
    fingerprint: str | None


class RunDir:
    """A run directory: stage folders plus manifest.json, read and updated under a file lock."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SddError(f"cannot create run dir {self.path} ({err.strerror}); choose a writable --run") from None
        if not os.access(self.path, os.W_OK):
            raise SddError(f"run dir {self.path} is not writable; choose a writable --run")
        if not self.exists() and (self.path / BACKUP_NAME).is_file():
            # Starting a fresh manifest would replace the backup with it at the next write.
            raise SddError(f"{self.manifest_path} is missing but {BACKUP_NAME} is there; restore it "
                           f"(cp {self.path / BACKUP_NAME} {self.manifest_path}) or remove the backup to start over")
        if not self.exists():
            with self._locked():
                if not self.exists():
                    self._write({"schema": SCHEMA_VERSION, "created_at": now_iso(), "stages": {}, "datasets": {}})

    # -- reading --------------------------------------------------------------------------
    def read(self) -> dict:
        if not self.exists():
            raise SddError(f"{self.path} is not an sdd run dir (no {MANIFEST_NAME}); create it with a first stage or `sdd toy init`")
        return self._parse(self.manifest_path)

    def _parse(self, path: Path) -> dict:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            problem = _schema_problem(data)
        except (OSError, ValueError) as err:
            problem = f"unreadable ({err})"
        if problem:
            backup = self.path / BACKUP_NAME
            hint = f"; the last good version is {backup}" if backup.exists() else ""
            raise SddError(
                f"{path} is corrupt: {problem}{hint}. sdd will not overwrite it: inspect it, then restore or remove it"
            )
        return data

    def record(self, name: str) -> StageRecord | None:
        """The typed record of stage `name`, or None when this run dir has no such stage."""
        raw = self.read()["stages"].get(name)
        return None if raw is None else StageRecord.from_json(raw)

    def records(self) -> dict[str, StageRecord]:
        """Every stage's typed record, in manifest order; {} where there is no manifest yet."""
        return {name: StageRecord.from_json(raw) for name, raw in self.stages().items()}

    def stage(self, name: str) -> dict | None:
        """The old interface: the raw JSON dict of a stage's record. New code reads `record(name)`."""
        return self.read()["stages"].get(name)

    def stages(self) -> dict[str, dict]:
        """The old interface: raw JSON dicts of every stage's record. New code reads `records()`."""
        return self.read()["stages"] if self.exists() else {}

    # -- finding checkpoints ----------------------------------------------------------------
    def checkpoint(self, name: str, record: StageRecord, role: str) -> RecordedCheckpoint:
        """Output `role` of stage `name`, its path resolved (an entry leading outside the run dir raises SddError)."""
        output = record.outputs[role]
        return RecordedCheckpoint(self.path.resolve(), name, role, self.resolve_path(output.path), output.fingerprint)

    def output_of(self, name: str, prefer: str | None = None) -> RecordedCheckpoint | None:
        """The checkpoint finished stage `name` is known by (see StageRecord.main_output); None if there is none."""
        record = self.record(name) if self.exists() else None
        if record is None or not record.done or not record.outputs:
            return None
        return self.checkpoint(name, record, record.main_output(prefer)[0])

    def newest(self, role: str, *, exclude: str | None = None, prefer: tuple[str, ...] = ()
               ) -> RecordedCheckpoint | None:
        """The checkpoint a stage of this run dir should start from when none is named: the newest for `role`.

        `prefer` lists stage names to take first when they finished with a `role` output (student-rl starts
        from distill, else warmup, else the base student, whatever ran last); `exclude` leaves a stage out
        (the one asking). Ties in finishing order go to the stage listed first in the manifest.
        """
        records = self.records()
        for name in prefer:
            record = records.get(name)
            if record and record.done and role in record.outputs:
                return self.checkpoint(name, record, role)
        best: tuple[int, str, StageRecord] | None = None
        for name, record in records.items():
            if name == exclude or not record.done or role not in record.outputs:
                continue
            if best is None or record.order > best[0]:
                best = (record.order, name, record)
        return None if best is None else self.checkpoint(best[1], best[2], role)

    def follow(self, entry: Input, role: str | None = None) -> RecordedCheckpoint | None:
        """The output of the finished stage an input entry names, if it still matches the recorded fingerprint.

        The stage is looked up in the run dir the entry names (as recorded, then relative to this run dir),
        then in this one; an output of `role` is tried first. None when no manifest still has it: the
        caller then falls back to the fingerprint (OutputIndex) or the recorded path.
        """
        if not entry.from_stage:
            return None
        candidates = [Path(entry.run), self.path / entry.run] if entry.run else []
        for candidate in [*candidates, self.path]:
            if not (candidate / MANIFEST_NAME).is_file():
                continue
            other = RunDir(candidate)
            record = other.record(entry.from_stage)
            if record is None or not record.done:
                continue
            for out_role in sorted(record.outputs, key=lambda r: r != role):
                if entry.fingerprint is None or record.outputs[out_role].fingerprint == entry.fingerprint:
                    with contextlib.suppress(SddError):  # an entry leading outside its run dir names nothing
                        return other.checkpoint(entry.from_stage, record, out_role)
        return None

    def resolve_path(self, stored: str, *, user_named: bool = False) -> Path:
        """A path recorded in the manifest, confined to this run dir.

        sdd writes every stage output inside the run dir and records it relative to it, so an output
        path that leads outside (`../`, a symlink, an absolute path) was not written by sdd and is not
        followed. Only entries a user or recipe named (`user_named`: registered datasets) may be
        absolute paths elsewhere.
        """
        candidate = Path(stored)
        if candidate.is_absolute() and user_named:
            return candidate
        resolved = (self.path / candidate).resolve()
        if not resolved.is_relative_to(self.path.resolve()):
            raise SddError(f"manifest of {self.path} points outside the run dir ({stored}); refusing to follow it")
        return resolved

    def relative(self, path: str | Path) -> str:
        """How to store a path: relative inside the run dir (run dirs move between machines), absolute outside."""
        path = Path(path).resolve()
        try:
            return path.relative_to(self.path.resolve()).as_posix()
        except ValueError:
            return str(path)

    # -- writing --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self.path / ".manifest.lock"
        try:
            handle = open(lock_path, "a")
        except OSError as err:
            raise SddError(f"cannot write in {self.path} ({err.strerror}); choose a writable --run directory") from None
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write(self, data: dict) -> None:
        text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
        if self.exists():  # the version being replaced was valid (it was parsed under this lock): keep it
            atomic_write_text(self.path / BACKUP_NAME, self.manifest_path.read_text(encoding="utf-8"))
        atomic_write_text(self.manifest_path, text)

    def update(self, change: Callable[[dict], Any]) -> Any:
        """Read-modify-write under the manifest lock; `change` edits the dict in place."""
        if not is_main_process():
            return None
        self.create()
        with self._locked():
            data = self.read()
            result = change(data)
            self._write(data)
            return result

    def register_dataset(self, name: str, path: Path) -> None:
        def change(data: dict) -> None:
            data.setdefault("datasets", {})[name] = {"path": self.relative(path), "fingerprint": fingerprint(path)}

        self.update(change)

    def datasets(self) -> dict[str, str]:
        """Dataset names registered in this run dir, as absolute paths."""
        if not self.exists():
            return {}
        return {k: str(self.resolve_path(v["path"], user_named=True)) for k, v in self.read().get("datasets", {}).items()}

    def begin(self, name: str, *, stage: str, role: str | None, config: dict, inputs: dict) -> None:
        """Record that stage `name` started (status "running"); `inputs` are input entries (Input.to_json)."""

        from sdd import environment

        def change(data: dict) -> None:
            previous = data["stages"].get(name, {})
            record = StageRecord(
                name=name, stage=stage, role=role, status="running", started_at=now_iso(), ended_at=None,
                host=socket.gethostname(), pid=os.getpid(), attempts=previous.get("attempts", 0) + 1,
                command=sys.argv, versions=library_versions(), environment=environment.capture(), config=config,
                inputs={key: Input.from_json(entry) for key, entry in inputs.items()}, outputs={},
                # an interrupted stage resumes: its metrics so far (e.g. the "before" of a before/after) stay
                metrics=previous.get("metrics", {}) if previous.get("status") == "interrupted" else {},
            )
            data["stages"][name] = record.to_json()

        self.update(change)

    def end(self, name: str, status: str, *, outputs: dict | None = None, metrics: dict | None = None,
            error: str | None = None) -> None:
        """Record how stage `name` ended; a finished one gets the next `done_seq`. `outputs` are Output.to_json entries."""
        assert status in STATUSES

        def change(data: dict) -> None:
            # the manifest may have been replaced under a running stage (a user restoring a backup): start a record
            raw = data["stages"].get(name)
            record = StageRecord.from_json(raw) if raw is not None else StageRecord(name=name, attempts=1)
            record.status = status
            record.ended_at = now_iso()
            if outputs is not None:
                record.outputs = {role: Output.from_json(entry) for role, entry in outputs.items()}
            if metrics:
                record.metrics = {**record.metrics, **metrics}
            record.error = error or None
            if status == "done":
                record.done_seq = 1 + max((r.get("done_seq", 0) for r in data["stages"].values()), default=0)
            data["stages"][name] = record.to_json()

        self.update(change)

    def output_entry(self, path: Path) -> dict:
        """The JSON entry of a checkpoint a stage wrote here (Output.to_json), for `end(outputs=...)`."""
        return Output(self.relative(path), fingerprint(path)).to_json()

    def lock(self, name: str) -> StageLock:
        return StageLock(self.path / ".locks" / f"{name}.lock")


def _schema_problem(data: Any) -> str | None:
    if not isinstance(data, dict):
        return "not a JSON object"
    if data.get("schema") != SCHEMA_VERSION:
        return f"schema {data.get('schema')!r}, this sdd reads schema {SCHEMA_VERSION}"
    if not isinstance(data.get("stages"), dict):
        return "no 'stages' table"
    for name, record in data["stages"].items():
        if not isinstance(record, dict) or record.get("status") not in STATUSES:
            return f"stage '{name}' has no valid status"
    return None


class OutputIndex:
    """Every finished stage output under some run dirs, by fingerprint.

    Inputs record absolute paths, which break when a run tree moves between machines; the fingerprint
    finds the same checkpoint at its new place. The first run dir (in the order given) to hold a
    fingerprint wins.
    """

    def __init__(self, run_dirs: list[Path]):
        self.by_fingerprint: dict[str, RecordedCheckpoint] = {}
        for run_dir in run_dirs:
            run = RunDir(run_dir)
            for name, record in run.records().items():
                if not record.done:
                    continue
                for role, output in record.outputs.items():
                    if not output.fingerprint:
                        continue
                    with contextlib.suppress(SddError):  # an entry leading outside its run dir names nothing
                        self.by_fingerprint.setdefault(output.fingerprint, run.checkpoint(name, record, role))

    def get(self, fingerprint_: str | None) -> RecordedCheckpoint | None:
        return self.by_fingerprint.get(fingerprint_) if fingerprint_ else None


def recorded_checkpoint(path: str | Path) -> RecordedCheckpoint | None:
    """A checkpoint named by path that a run dir at most three levels above it recorded as a finished output.

    So a checkpoint passed explicitly (as `sdd run` does) is still checked for changes since it was
    written, and records say which stage it came from. `path` of the result is the resolved path.
    """
    path = Path(path)
    if not path.exists():
        return None
    target = path.resolve()
    for parent in list(target.parents)[:3]:
        if not (parent / MANIFEST_NAME).is_file():
            continue
        run = RunDir(parent)
        for name, record in run.records().items():
            if not record.done:
                continue
            for role, output in record.outputs.items():
                with contextlib.suppress(SddError):  # an entry pointing outside that run dir names nothing here
                    if run.resolve_path(output.path) == target:
                        return RecordedCheckpoint(parent, name, role, target, output.fingerprint)
    return None
