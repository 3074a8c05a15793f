"""A stage's checkpoints: what they were made from, which are complete, where to resume, the final model.

The Trainer writes `checkpoint-<step>` folders on its save schedule; sdd adds the rules a preemptible
week-long job needs around them: refuse to resume checkpoints made from other inputs (`origin.json`),
resume only from a complete one and remove the half-written ones after it, write `final/` whole or not
at all, and tell a full disk from a bug when a write fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

from sdd import config as cfg
from sdd.errors import SddError
from sdd.manifest import atomic_write_text, fingerprint, is_main_process
from sdd.models import safetensors_problem
from sdd.train.distributed import any_rank

ORIGIN_FILE = "origin.json"
COMPLETE_FILE = "sdd-complete.json"  # written last into a checkpoint by `seal`


def check_resumable(stage_dir: Path, inputs: dict, config: dict) -> None:
    """Refuse to resume checkpoints that were made from other inputs or options.

    Resuming silently from a checkpoint of another teacher (a run dir reused, a stage rerun
    after its input was retrained) gives a model that matches no record. The stage folder keeps
    what its checkpoints were made from; a mismatch is an error that names the difference.
    """
    origin = {
        "inputs": {k: v.get("fingerprint", v.get("path")) for k, v in inputs.items()},
        "sdd": _what_trains(config.get("sdd", {})),
    }
    path = stage_dir / ORIGIN_FILE
    if any(stage_dir.glob("checkpoint-*")):  # complete or half-written: either was made from some origin
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded != origin:
            changed = sorted(k for k in set(origin["inputs"]) | set((recorded or {}).get("inputs", {}))
                             if origin["inputs"].get(k) != (recorded or {}).get("inputs", {}).get(k))
            what = f"other {', '.join(changed)}" if changed else "other options" if recorded else "an unknown origin"
            raise SddError(
                f"{stage_dir} holds checkpoints made from {what}; rerun with --force to discard them and start over"
            )
        return
    atomic_write_text(path, json.dumps(origin, indent=2, default=str))


def _what_trains(options: Any) -> Any:
    """The options as JSON, less the fields marked `trains: False` (where a run is reported or pushed)."""
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        return {f.name: cfg.to_jsonable(getattr(options, f.name)) for f in dataclasses.fields(options)
                if f.metadata.get("trains", True)}
    return cfg.to_jsonable(options)


def seal(checkpoint: Path) -> None:
    """Record, last, what a checkpoint holds: every file's size and content fingerprint, in `sdd-complete.json`.

    The Trainer's own "done" mark, trainer_state.json, says the save ran to its end on the writer's side;
    a network filesystem can still lose the tail of a weights file while that small file survives (a
    node lost before its pages were written back). The record lets a resume check each file against what
    was written. Sizes catch a file cut short; the fingerprint (sdd.manifest.fingerprint: all bytes up to
    64 MB, 16 spaced 1 MB blocks above) catches most other damage at a bounded cost of at most 16 MB read
    per file, at save and at resume alike. Called on the main process once every rank has written its part.
    """
    files = {}
    for file in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        rel = file.relative_to(checkpoint).as_posix()
        if rel != COMPLETE_FILE and not file.name.startswith("."):
            files[rel] = {"bytes": file.stat().st_size, "fingerprint": fingerprint(file)}
    atomic_write_text(checkpoint / COMPLETE_FILE, json.dumps({"files": files}, indent=1) + "\n")


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from ("model.safetensors 1234 of 5678 bytes"); None if it is whole.

    A checkpoint with a `seal` record is checked file by file against it. One without (written before sdd
    recorded them, or killed between the Trainer's last file and the record) is complete when its
    trainer_state.json, which the Trainer writes last, reads, and its safetensors files are as long as
    their headers say.
    """
    try:
        record = json.loads((checkpoint / COMPLETE_FILE).read_text())
    except FileNotFoundError:
        record = None
    except (OSError, ValueError) as err:
        return f"{COMPLETE_FILE} unreadable: {err}"
    if record is None:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
        except (OSError, ValueError):
            return "no complete trainer_state.json"
        return next(filter(None, map(safetensors_problem, sorted(checkpoint.glob("*.safetensors")))), None)
    for rel, entry in record.get("files", {}).items():
        file = checkpoint / rel
        if not file.is_file():
            return f"{rel} is missing"
        size = file.stat().st_size
        if size != entry.get("bytes"):
            return f"{rel} {size} of {entry.get('bytes')} bytes"
        if fingerprint(file) != entry.get("fingerprint"):
            return f"{rel} differs from what was written"
    return None


def _numbered_checkpoints(stage_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in stage_dir.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found)


def complete_checkpoints(stage_dir: Path) -> list[Path]:
    """Checkpoints whose save finished and whose files are still what was written, oldest first."""
    return [path for _, path in _numbered_checkpoints(stage_dir) if checkpoint_problem(path) is None]


def resume_point(stage_dir: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones after it are removed.

    One killed mid-save goes silently, as the Trainer never finished it. One the Trainer finished whose
    files no longer match (torn) is reported in one line before it goes, since something outside the
    run damaged it.
    """
    checkpoints = [(step, path, checkpoint_problem(path)) for step, path in _numbered_checkpoints(stage_dir)]
    complete = [path for _, path, problem in checkpoints if problem is None]
    newest = complete[-1] if complete else None
    newest_step = int(newest.name.split("-")[1]) if newest else -1
    for step, path, problem in checkpoints:
        if step > newest_step and problem is not None:
            if _finished_by_trainer(path) and is_main_process():
                then = f"resuming from {newest.name}" if newest else "starting from the beginning"
                print(f"{path.name} is torn ({problem}); {then}", flush=True)
            shutil.rmtree(path, ignore_errors=True)
    return newest


def _finished_by_trainer(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE_FILE).is_file() or (checkpoint / "trainer_state.json").is_file()


@dataclasses.dataclass(frozen=True)
class AdapterBase:
    """The model a LoRA adapter was trained on, as the stage loaded it: what `final/` merges the adapter into."""

    path: str
    revision: str | None
    dtype: str
    trust_remote_code: bool


def save_final(trainer, out_dir: Path, merge_base: AdapterBase | None = None) -> Path:
    """Write the final model + tokenizer to a temp dir and rename, so `final/` is whole or absent.

    A LoRA-trained model (a PEFT model) is saved as its adapter, the way every engine saves one; with
    `merge_base`, the main process then loads that base model again, applies the adapter with PEFT and
    merges it (`merge_and_unload`), so `final/` holds plain weights any later stage or vLLM loads. The
    base is loaded from disk rather than merged in place because under ZeRO-3 or FSDP no process holds
    the whole trained model; it costs one copy of the base model in CPU memory on the main process.
    """
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if trainer.accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        fsdp = trainer.accelerator.state.fsdp_plugin if trainer.is_fsdp_enabled else None
        if fsdp is not None and "FULL_STATE_DICT" not in str(fsdp.state_dict_type):
            # Trainer.save_model writes no weights under a sharded state dict; gather the full one (all ranks).
            state_dict = trainer.accelerator.get_state_dict(trainer.model)
            if trainer.args.should_save:
                trainer._save(str(tmp), state_dict=state_dict)
        else:
            trainer.save_model(str(tmp))
        trainer.accelerator.wait_for_everyone()
        if any_rank(trainer.accelerator.is_main_process and not any(tmp.glob("*.safetensors"))):
            if trainer.accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise SddError(f"the engine wrote no weights for {out_dir} (the checkpoints are intact); under "
                           "DeepSpeed ZeRO-3 set zero3_save_16bit_model: true in the accelerate config, then rerun")
        if trainer.accelerator.is_main_process:
            if merge_base is not None and (tmp / ADAPTER_CONFIG).is_file():
                merge_adapter(tmp, merge_base)
            tokenizer = trainer.processing_class
            if tokenizer is not None and not (tmp / "tokenizer_config.json").exists():
                tokenizer.save_pretrained(tmp)
            shutil.rmtree(out_dir, ignore_errors=True)
            os.replace(tmp, out_dir)
    except Exception as err:
        reason = io_failure(err, tmp)
        if reason is None:
            raise
        if trainer.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteFailed(out_dir, reason) from err
    trainer.accelerator.wait_for_everyone()
    return out_dir


ADAPTER_CONFIG = "adapter_config.json"


def merge_adapter(folder: Path, base: AdapterBase) -> None:
    """Replace the LoRA adapter saved in `folder` by the merged model: base weights + the adapter's update."""
    from peft import PeftModel

    from sdd.models import load_causal_lm

    model = load_causal_lm(base.path, dtype=base.dtype, trust_remote_code=base.trust_remote_code,
                           revision=base.revision)
    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    adapter = folder.with_name(folder.name + ".adapter")
    shutil.rmtree(adapter, ignore_errors=True)
    os.replace(folder, adapter)
    merged.save_pretrained(str(folder))
    shutil.rmtree(adapter, ignore_errors=True)


class CheckpointWriteFailed(Exception):
    """Writing a checkpoint failed (disk full, quota, I/O error); the ones written before are intact."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"could not write {path.name} ({reason})")
        self.path = path
        self.reason = reason


def io_failure(err: BaseException, where: Path | None = None) -> str | None:
    """Why a write failed, when `err` is a storage failure rather than a bug; None otherwise.

    Libraries hide the errno: torch.save reports a full disk as RuntimeError("basic_ios::clear:
    iostream error") or ("... unexpected pos ..."), safetensors as SafetensorError("... No space left
    on device (os error 28)"). So the text is read too, and for torch's writer, which names no cause,
    the free space where it wrote (`where`) tells a full disk from another I/O error.
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _STORAGE_ERRNOS:
            return os.strerror(seen.errno)
        text = str(seen)
        for needle, reason in _STORAGE_MESSAGES:
            if needle in text:
                return reason
        if any(marker in text for marker in _TORCH_WRITE_FAILED):
            with contextlib.suppress(OSError):
                probe = where if where is not None and where.exists() else (where.parent if where is not None else None)
                if probe is not None and shutil.disk_usage(probe).free < 16 << 20:
                    return os.strerror(errno.ENOSPC)
            return "write error"
        seen = seen.__cause__ or seen.__context__
    return None


_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)
_STORAGE_MESSAGES = (("No space left", "No space left on device"), ("StorageFull", "No space left on device"),
                     ("Disk quota", "Disk quota exceeded"), ("File too large", "File too large"),
                     ("FileTooLarge", "File too large"), ("Input/output error", "Input/output error"),
                     ("Read-only file system", "Read-only file system"))
_TORCH_WRITE_FAILED = ("iostream error", "file write failed", "unexpected pos", "PytorchStreamWriter failed")
