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
import errno
import fcntl
import hashlib
import json
import os
import platform
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
    from importlib import metadata

    import sdd

    versions = {"sdd": sdd.__version__, "python": platform.python_version()}
    for dist in ("torch", "transformers", "trl", "accelerate", "datasets", "math-verify", "vllm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return versions


def fingerprint(path: str | Path) -> str:
    """Content fingerprint of a file or a checkpoint directory (names, sizes and bytes)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
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

    An O_EXCL lock file holds the owner's pid and host so a refusal can say who holds it. A lock
    left by a dead process on this host is taken over; one from another host cannot be checked
    from here, so the message says how to clear it once the user knows that job is gone.
    """

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
                if owner.get("host") == me["host"] and not _pid_alive(int(owner.get("pid", -1))):
                    self._break_stale(owner)
                    continue
                raise SddError(
                    f"{self.path.stem} is being run by pid {owner.get('pid')} on {owner.get('host')} "
                    f"since {owner.get('since')}; wait for it, or if that job is dead remove {self.path}"
                ) from None
            except OSError as err:
                raise SddError(f"cannot create {self.path} ({err.strerror}); choose a writable --run directory") from None
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return
        raise SddError(f"could not take {self.path}; another process keeps recreating it")

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

    def stage(self, name: str) -> dict | None:
        return self.read()["stages"].get(name)

    def stages(self) -> dict[str, dict]:
        return self.read()["stages"] if self.exists() else {}

    def newest_output(self, role: str, exclude: str | None = None) -> tuple[str, dict] | None:
        """(stage name, output entry) of the newest finished checkpoint for a role."""
        best = None
        for name, record in self.stages().items():
            if name == exclude or record.get("status") != "done" or role not in record.get("outputs", {}):
                continue
            if best is None or record.get("done_seq", 0) > best[0]:
                best = (record.get("done_seq", 0), name, record["outputs"][role])
        return (best[1], best[2]) if best else None

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
        def change(data: dict) -> None:
            previous = data["stages"].get(name, {})
            data["stages"][name] = {
                "name": name,
                "stage": stage,
                "role": role,
                "status": "running",
                "started_at": now_iso(),
                "ended_at": None,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "attempts": previous.get("attempts", 0) + 1,
                "command": sys.argv,
                "versions": library_versions(),
                "config": config,
                "inputs": inputs,
                "outputs": {},
                "metrics": previous.get("metrics", {}) if previous.get("status") == "interrupted" else {},
            }

        self.update(change)

    def end(self, name: str, status: str, *, outputs: dict | None = None, metrics: dict | None = None,
            error: str | None = None) -> None:
        assert status in STATUSES

        def change(data: dict) -> None:
            # setdefault: the manifest may have been replaced under a running stage (a user restoring a backup)
            record = data["stages"].setdefault(name, {"name": name, "attempts": 1})
            record["status"] = status
            record["ended_at"] = now_iso()
            if outputs is not None:
                record["outputs"] = outputs
            if metrics:
                record["metrics"] = {**record.get("metrics", {}), **metrics}
            if error:
                record["error"] = error
            else:
                record.pop("error", None)
            if status == "done":
                record["done_seq"] = 1 + max((r.get("done_seq", 0) for r in data["stages"].values()), default=0)

        self.update(change)

    def output_entry(self, path: Path) -> dict:
        return {"path": self.relative(path), "fingerprint": fingerprint(path)}

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
