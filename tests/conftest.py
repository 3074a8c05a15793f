"""Shared fixtures: tiny local models and data, so every test runs offline on a 2-core CPU."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models are overhead-bound; two threads on two shared cores run many times slower, not faster."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "math500.jsonl").is_file():
        pytest.skip(f"real benchmark files not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def toy_template(tmp_path_factory) -> Path:
    """One `sdd toy init` per session; tests copy it rather than rebuilding it."""
    from sdd.stages import toy_init

    path = tmp_path_factory.mktemp("toy-template") / "run"
    toy_init.run(path, seed=0)
    return path


@pytest.fixture
def toy_run(toy_template, tmp_path) -> Path:
    import shutil

    path = tmp_path / "run"
    shutil.copytree(toy_template, path)
    return path
