"""The run dir must survive what clusters do: kills mid-write, racing jobs, edited checkpoints."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from sdd.errors import SddError
from sdd.manifest import BACKUP_NAME, RunDir, StageLock, fingerprint


def _crash_during_update(run_path, phase):
    """In a child process, die with os._exit at a given point of an update: a real crash, not an exception."""
    code = textwrap.dedent(f"""
        import os, sys
        from sdd import manifest
        real_replace, real_fsync = os.replace, os.fsync
        def replace(src, dst):
            if {phase!r} == "before-rename" and str(dst).endswith("manifest.json"):
                os._exit(9)
            return real_replace(src, dst)
        os.replace = replace
        run = manifest.RunDir({str(run_path)!r})
        run.update(lambda data: data["stages"].__setitem__("new", {{"name": "new", "status": "running"}}))
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_crash_between_write_and_rename_keeps_old_manifest(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create()
    run.begin("sft-teacher", stage="sft", role="teacher", config={"lr": 1}, inputs={})
    before = run.manifest_path.read_text()
    result = _crash_during_update(run.path, "before-rename")
    assert result.returncode == 9
    assert run.manifest_path.read_text() == before  # untouched, still valid
    assert run.stage("sft-teacher")["status"] == "running"
    assert "new" not in run.stages()
    run.end("sft-teacher", "done")  # and the next writer works normally
    assert run.stage("sft-teacher")["status"] == "done"


def test_corrupt_manifest_is_reported_never_overwritten(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create()
    run.begin("a", stage="sft", role="teacher", config={}, inputs={})
    run.end("a", "done")
    run.manifest_path.write_text('{"schema": 1, "stages": {"a": ')  # truncated by a dying job
    with pytest.raises(SddError, match="corrupt.*last good version"):
        run.read()
    with pytest.raises(SddError):
        run.begin("b", stage="sft", role="teacher", config={}, inputs={})
    assert run.manifest_path.read_text() == '{"schema": 1, "stages": {"a": '
    backup = json.loads((run.path / BACKUP_NAME).read_text())
    assert backup["stages"]["a"]["status"] == "running"  # the version before the last good write


def test_lock_refusal_names_holder(tmp_path):
    lock_path = tmp_path / "stage" / ".lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from sdd.manifest import StageLock
            with StageLock(Path({str(lock_path)!r})):
                print("held", flush=True)
                time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SddError) as err:
            StageLock(lock_path).acquire()
        assert f"pid {holder.pid}" in str(err.value) and socket.gethostname() in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: the lock is stale and is taken over.
    with StageLock(lock_path) as lock:
        assert lock.held
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert not lock_path.exists()


def test_lock_from_other_host_is_not_broken(tmp_path):
    lock_path = tmp_path / ".lock"
    lock_path.write_text(json.dumps({"pid": 1, "host": "gpu-node-17", "since": "then"}))
    with pytest.raises(SddError, match="gpu-node-17"):
        StageLock(lock_path).acquire()


def test_newest_and_paths(tmp_path):
    run = RunDir(tmp_path / "run")
    for name in ("sft-teacher", "teacher-rl"):
        out = run.path / name / "final"
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(name.encode())
        run.begin(name, stage=name, role="teacher", config={}, inputs={})
        run.end(name, "done", outputs={"teacher": run.output_entry(out)})
    newest = run.newest("teacher")
    assert newest.stage == "teacher-rl" and run.relative(newest.path) == "teacher-rl/final"
    assert run.newest("teacher", exclude="teacher-rl").stage == "sft-teacher"
    assert run.newest("student") is None
    with pytest.raises(SddError, match="outside the run dir"):
        run.resolve_path("../../etc")


def test_fingerprint_sees_changes(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"a" * 1000)
    (model / "config.json").write_text("{}")
    first = fingerprint(model)
    assert fingerprint(model) == first
    (model / "model.safetensors").write_bytes(b"b" + b"a" * 999)
    assert fingerprint(model) != first
    (model / "model.safetensors").unlink()
    assert fingerprint(model) != first


# --------------------------------------------------------------------------------------------------
# Typed records: begin/end build them, the JSON on disk keeps its keys, readers get dataclasses.

RECORD_KEYS = ["name", "stage", "role", "status", "started_at", "ended_at", "host", "pid", "attempts", "command",
               "versions", "environment", "config", "inputs", "outputs", "metrics"]


def _checkpoint(run: RunDir, name: str, content: bytes):
    out = run.path / name / "final"
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.safetensors").write_bytes(content)
    return out


def test_records_keep_the_json_schema_and_read_back_typed(tmp_path):
    from sdd.manifest import SCHEMA_VERSION, Input, StageRecord

    run = RunDir(tmp_path / "run")
    base = _checkpoint(run, "base", b"base")
    inputs = {"model": {"path": str(base), "from_stage": "base", "fingerprint": fingerprint(base), "trusted_change": True},
              "dataset": {"path": "hub:x[train]"}}
    run.begin("sft", stage="sft", role="student", config={"sdd": {"lr": 1}}, inputs=inputs)
    raw = json.loads(run.manifest_path.read_text())["stages"]["sft"]
    assert list(raw) == RECORD_KEYS and raw["inputs"] == inputs and raw["status"] == "running"
    run.end("sft", "failed", error="boom")
    raw = json.loads(run.manifest_path.read_text())["stages"]["sft"]
    assert list(raw) == [*RECORD_KEYS, "error"] and raw["error"] == "boom"

    run.begin("sft", stage="sft", role="student", config={}, inputs=inputs)
    out = _checkpoint(run, "sft", b"trained")
    run.end("sft", "done", outputs={"student": run.output_entry(out)}, metrics={"loss": 0.5})
    manifest = json.loads(run.manifest_path.read_text())
    raw = manifest["stages"]["sft"]
    assert manifest["schema"] == SCHEMA_VERSION == 1
    assert list(raw) == [*RECORD_KEYS, "done_seq"] and raw["attempts"] == 2 and raw["done_seq"] == 1
    assert raw["outputs"] == {"student": {"path": "sft/final", "fingerprint": fingerprint(out)}}

    record = run.record("sft")
    assert record == run.records()["sft"] and record.to_json() == raw == StageRecord.from_json(raw).to_json()
    assert record.done and record.order == 1 and record.error is None and record.metrics == {"loss": 0.5}
    assert record.inputs["model"] == Input(str(base), "base", None, fingerprint(base), {"trusted_change": True})
    assert record.inputs["dataset"].to_json() == {"path": "hub:x[train]"}
    assert record.main_output() == ("student", record.outputs["student"])
    assert record.model_input() == ("model", record.inputs["model"])
    assert run.record("absent") is None


def test_checkpoint_resolution_newest_output_of_follow_index(tmp_path):
    from sdd.manifest import Input, OutputIndex, recorded_checkpoint

    run = RunDir(tmp_path / "run")
    for name in ("sft-student", "warmup", "distill"):
        out = _checkpoint(run, name, name.encode())
        run.begin(name, stage=name, role="student", config={}, inputs={})
        run.end(name, "done", outputs={"student": run.output_entry(out)})
    newest = run.newest("student")
    assert (newest.stage, newest.role, newest.path) == ("distill", "student", (run.path / "distill" / "final").resolve())
    assert newest.run == run.path.resolve() and newest.fingerprint == fingerprint(run.path / "distill" / "final")
    assert run.newest("student", exclude="distill").stage == "warmup"
    assert run.newest("student", prefer=("warmup", "sft-student")).stage == "warmup"
    assert run.newest("teacher") is None
    assert run.output_of("warmup").path == (run.path / "warmup" / "final").resolve()
    assert recorded_checkpoint(run.path / "warmup" / "final").stage == "warmup"

    # An input entry made in another run dir: followed to the record, refused once the files differ from it.
    other = RunDir(tmp_path / "other")
    other.create()
    entry = Input(str(run.path / "warmup" / "final"), "warmup", str(run.path), fingerprint(run.path / "warmup" / "final"))
    assert other.follow(entry, "student").stage == "warmup"
    assert other.follow(Input(entry.path, "warmup", str(run.path), "sha256:else"), "student") is None

    # The tree moves: the recorded run dir is gone, the fingerprint still finds the checkpoint.
    moved = tmp_path / "moved"
    run.path.rename(moved)
    assert other.follow(entry, "student") is None
    found = OutputIndex([moved]).get(entry.fingerprint)
    assert (found.stage, found.path) == ("warmup", (moved / "warmup" / "final").resolve())
