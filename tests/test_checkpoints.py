"""Which checkpoints a stage may resume from (sdd.train.checkpoints), on checkpoint folders made by hand.

tests/test_faults.py runs the same rules end to end (a real sft run whose newest checkpoint is torn).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdd.train.checkpoints import COMPLETE_FILE, checkpoint_problem, complete_checkpoints, resume_point, seal


def _checkpoint(stage_dir: Path, step: int, *, sealed: bool = True) -> Path:
    path = stage_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": torch.arange(4096, dtype=torch.float32) * step}, str(path / "model.safetensors"))
    (path / "optimizer.pt").write_bytes(os.urandom(2048))
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if sealed:
        seal(path)
    return path


def test_a_sealed_checkpoint_is_checked_file_by_file(tmp_path):
    path = _checkpoint(tmp_path, 4)
    record = json.loads((path / COMPLETE_FILE).read_text())
    assert set(record["files"]) == {"model.safetensors", "optimizer.pt", "trainer_state.json"}
    assert checkpoint_problem(path) is None
    weights = path / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size // 2)
    assert checkpoint_problem(path) == f"model.safetensors {size // 2} of {size} bytes"
    os.truncate(weights, 0)
    with open(weights, "wb") as handle:  # same size, other bytes: the fingerprint tells
        handle.write(b"\0" * size)
    assert checkpoint_problem(path) == "model.safetensors differs from what was written"
    (path / "optimizer.pt").unlink()
    assert checkpoint_problem(path) == "model.safetensors differs from what was written"  # the first problem found
    os.unlink(weights)
    assert checkpoint_problem(path) == "model.safetensors is missing"


def test_an_unsealed_checkpoint_falls_back_to_trainer_state_and_the_safetensors_header(tmp_path):
    path = _checkpoint(tmp_path, 2, sealed=False)
    assert checkpoint_problem(path) is None
    weights = path / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size - 100)
    assert checkpoint_problem(path) == f"model.safetensors {size - 100} of {size} bytes"
    (path / "trainer_state.json").unlink()
    assert checkpoint_problem(path) == "no complete trainer_state.json"


def test_resume_point_reports_a_torn_checkpoint_and_removes_it_but_not_a_half_written_one(tmp_path, capsys):
    _checkpoint(tmp_path, 2)
    torn = _checkpoint(tmp_path, 4)
    os.truncate(torn / "model.safetensors", 100)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert resume_point(tmp_path).name == "checkpoint-2"
    line = capsys.readouterr().out
    size = (tmp_path / "checkpoint-2" / "model.safetensors").stat().st_size
    assert line == f"checkpoint-4 is torn (model.safetensors 100 of {size} bytes); resuming from checkpoint-2\n"
    assert not torn.exists()
    half = tmp_path / "checkpoint-6"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 10)  # killed mid-save: the Trainer never finished it
    assert resume_point(tmp_path).name == "checkpoint-2" and not half.exists()
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("head", [b"", b"\x05\x00", (10**9).to_bytes(8, "little") + b"{"])
def test_a_weights_file_cut_inside_its_header_is_named(tmp_path, head):
    from sdd.models import safetensors_problem

    path = tmp_path / "model.safetensors"
    path.write_bytes(head)
    assert safetensors_problem(path) == f"model.safetensors {len(head)} bytes, cut inside its header"
