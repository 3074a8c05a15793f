"""Shared fixtures: tiny local models and data, so every test runs offline on a 2-core CPU."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


# Small enough for a 2-core CPU, large enough that every code path (checkpoints, logging) runs.
TINY = {
    "sft": {"max_steps": 4, "per_device_train_batch_size": 8, "logging_steps": 2, "save_steps": 2, "limit": 64,
            "lr_scheduler_type": "constant", "warmup_steps": 0},
    "teacher-rl": {"max_steps": 2, "per_device_train_batch_size": 16, "num_generations": 8, "max_completion_length": 48,
                   "logging_steps": 1, "save_steps": 1, "limit": 32, "learning_rate": 1e-3},
    "student-rl": {"max_steps": 2, "per_device_train_batch_size": 16, "num_generations": 8, "max_completion_length": 48,
                   "logging_steps": 1, "save_steps": 1, "limit": 32, "learning_rate": 1e-3},
    "warmup": {"prompts": 24, "heldout_prompts": 8, "samples_per_prompt": 1, "max_new_tokens": 48, "max_steps": 3,
               "per_device_train_batch_size": 8, "logging_steps": 1, "save_steps": 3, "learning_rate": 3e-3},
    "distill": {"max_steps": 3, "per_device_train_batch_size": 8, "max_completion_length": 48, "logging_steps": 1,
                "save_steps": 3, "limit": 32, "learning_rate": 3e-3},
    "eval": {"benchmark": ["toy-test"], "samples": 2, "max_new_tokens": 48, "limit": 24},
}


def sdd(*argv: str) -> None:
    """One stage in-process through the real CLI parser (`sdd run` hands a stage the same StageArgs directly)."""
    from sdd.cli import run_in_process
    from sdd.experiment.execute import OK, SKIPPED

    outcome, message = run_in_process([str(a) for a in argv])
    assert outcome in (OK, SKIPPED), message


def sdd_process(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sdd", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def set_tiny(run: Path, **overrides) -> None:
    config = yaml.safe_load((run / "config.yaml").read_text())
    for section in ("sft-teacher", "sft-student", "teacher-sft"):  # the toy's per-model step counts
        config.pop(section, None)
    for section, values in TINY.items():
        config.setdefault(section, {}).update(values)
    for section, values in overrides.items():
        config.setdefault(section, {}).update(values)
    (run / "config.yaml").write_text(yaml.safe_dump(config))


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="session")
def bootstrapped(tmp_path_factory) -> Path:
    """A toy run on easy chains (2-3 numbers) whose models had a short SFT: they write boxed answers, some right."""
    from sdd.stages import toy_init

    run = tmp_path_factory.mktemp("boot") / "run"
    toy_init.run(run, seed=0, min_terms=2, max_terms=3, n_train=2000, n_test=64)
    set_tiny(run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["sft"].update({"max_steps": 160, "per_device_train_batch_size": 32, "limit": None, "save_steps": 1000,
                          "logging_steps": 40, "learning_rate": 3e-3, "warmup_steps": 20,
                          "lr_scheduler_type": "warmup_stable_decay",
                          "lr_scheduler_kwargs": {"num_decay_steps": 40, "min_lr_ratio": 0.05}})
    config["sft-teacher"] = {"max_steps": 40}  # the teacher stays weaker: distillation then has a gap to close
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    sdd("sft", "--run", run, "--role", "student")
    sdd("sft", "--run", run, "--role", "teacher")
    set_tiny(run)
    return run


@pytest.fixture
def boot_run(bootstrapped, tmp_path) -> Path:
    path = tmp_path / "run"
    shutil.copytree(bootstrapped, path)
    return path
