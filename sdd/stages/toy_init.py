"""`sdd toy init`: a run dir holding the embedded toy task, both base models and toy-sized defaults.

Besides the data and models, the run dir gets a `config.yaml` with the stage settings that fit
a 2-core CPU (sizes, learning rates, sequence lengths). Stages read it as their run-level
defaults, so `sdd sft --run runs/toy` needs no flags, and a user sees in one file what the toy
changes relative to the paper's recipe. Those settings are the `stages:` of the toy recipe
(sdd/recipes/toy.yaml, linked from examples/recipes/toy.yaml), their one source.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from sdd import toy
from sdd.config import RUN_CONFIG_NAME
from sdd.errors import SddError
from sdd.experiment.recipe import toy_stage_defaults
from sdd.manifest import RunDir, atomic_write_text


def run(run_path: Path, *, seed: int = 0, force: bool = False, min_terms: int | None = None,
        max_terms: int | None = None, n_train: int | None = None, n_test: int | None = None,
        slip_rate: float | None = None) -> None:
    run_dir = RunDir(run_path)
    if run_dir.exists() and run_dir.stage("toy-init") and not force:
        record = run_dir.stage("toy-init")
        if record["status"] == "done":
            print(f"{run_path} already holds the toy (use --force to rebuild it)")
            return
    if force and (run_dir.path / "toy").exists():
        shutil.rmtree(run_dir.path / "toy")
    run_dir.create()
    dial = {"min_terms": min_terms, "max_terms": max_terms, "n_train": n_train, "n_test": n_test,
            "slip_rate": slip_rate}
    task = toy.ToyTask(seed=seed, **{k: v for k, v in dial.items() if v is not None})
    if not 2 <= task.min_terms <= task.max_terms:
        raise SddError("need 2 <= --min-terms <= --max-terms")
    if not 0.0 <= task.slip_rate < 1.0:
        raise SddError("--slip-rate must be in [0, 1)")
    if task.n_train < 1 or task.n_test < 1:
        raise SddError("--train and --test must be at least 1")
    spec = toy.ToySpec(task=task)
    with run_dir.lock("toy-init"):
        run_dir.begin("toy-init", stage="toy-init", role=None, config={"spec": _plain(spec)}, inputs={})
        try:
            written = toy.build(run_dir.path / "toy", spec)
        except OSError as err:
            run_dir.end("toy-init", "failed", error=str(err))
            raise SddError(f"cannot write the toy into {run_path}: {err.strerror}") from None
        run_dir.register_dataset("toy-train", written["train"])
        run_dir.register_dataset("toy-test", written["test"])
        config_path = run_dir.path / RUN_CONFIG_NAME
        if not config_path.exists() or force:
            atomic_write_text(config_path, "# Toy-sized stage defaults written by `sdd toy init`; edit freely.\n"
                              + yaml.safe_dump(toy_stage_defaults(), sort_keys=False))
        run_dir.end("toy-init", "done", outputs={
            "teacher": run_dir.output_entry(written["teacher"]),
            "student": run_dir.output_entry(written["student"]),
        }, metrics={"train_problems": spec.task.n_train, "test_problems": spec.task.n_test})
    print(f"toy run dir ready: {run_path} (datasets toy-train, toy-test; teacher and student base models)")


def _plain(spec) -> dict:
    import dataclasses

    return dataclasses.asdict(spec)
