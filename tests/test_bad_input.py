"""Bad input, end to end: every mistake a user can make reaches them as exit 2 and one line saying what to fix.

Each case runs the real CLI (`python -m sdd ...`) in a child process and asserts the exit code, that
stderr is exactly one `error:` line (no traceback, no second line), what the line says, and that
nothing was lost: the manifest is untouched where the mistake is caught before the stage starts,
and the last good checkpoint survives where it is caught during training.

Most cases are one command each; they are declared in CASES and run two at a time (each child is
mostly interpreter start-up and imports, ~3-5 s), then checked one test per case. The disk-full
cases need a mount or a resource limit and a sequence of commands, so they are tests of their own.

The messages in docs/reliability.md come from these tests: `SDD_MESSAGES=msgs.jsonl pytest
tests/test_bad_input.py` appends every case's line to that file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from sdd.manifest import BACKUP_NAME, RunDir, fingerprint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TINY_SFT = ["--set", "limit=64", "--set", "per_device_train_batch_size=8", "--set", "logging_steps=1",
            "--set", "warmup_steps=0", "--set", "lr_scheduler_type=constant"]



def cli(*argv, preexec_fn=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdd", *map(str, argv)], capture_output=True, text=True,
                          env=ENV, timeout=timeout, preexec_fn=preexec_fn)


def error_line(result: subprocess.CompletedProcess, case: str, *phrases: str) -> str:
    """Exit 2 and exactly one stderr line holding every phrase; the line, also logged for the docs."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    if os.environ.get("SDD_MESSAGES"):
        with open(os.environ["SDD_MESSAGES"], "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"case": case, "message": lines[0]}) + "\n")
    return lines[0]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def student(run: Path) -> Path:
    return run / "toy" / "student-base"


# -- the cases ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    """One command and what the user must see. `prepare(run, tmp)` builds the inputs and returns argv."""

    prepare: Callable[[Path, Path], list]
    phrases: tuple[str, ...]
    fresh: bool = False  # changes the run dir: gets its own copy (else the shared one, asserted unchanged)
    check: Callable[[Path, Path, subprocess.CompletedProcess], None] | None = None
    exit_code: int = 2


def _t5(run: Path, tmp: Path) -> list:
    from transformers import T5Config

    T5Config(d_model=8, num_layers=1, num_heads=1, d_kv=4, d_ff=8, vocab_size=100).save_pretrained(tmp / "t5")
    return ["sft", "--run", run, "--role", "student", "--model", tmp / "t5"]


def _pickled(run: Path, tmp: Path) -> list:
    """transformers 5 always saves safetensors, so the pickle file is written the way old checkpoints were."""
    import torch
    from safetensors.torch import load_file

    model = tmp / "pickled"
    shutil.copytree(student(run), model)
    torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    return ["sft", "--run", run, "--role", "student", "--model", model]


def _remote_code(run: Path, tmp: Path) -> list:
    """A model whose classes live in its own .py file, which would leave a marker if it ever ran."""
    model = tmp / "custom"
    shutil.copytree(student(run), model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="sdd-custom", auto_map={"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom.py").write_text(f"open({str(tmp / 'code-ran')!r}, 'w').close()\n")
    return ["sft", "--run", run, "--role", "student", "--model", model]


def _no_code_ran(run: Path, tmp: Path, result) -> None:
    assert not (tmp / "code-ran").exists()


def _empty(run: Path, tmp: Path) -> list:
    (tmp / "empty.jsonl").write_text("\n")
    return ["sft", "--run", run, "--role", "student", "--dataset", tmp / "empty.jsonl"]


def _wrong_columns(run: Path, tmp: Path) -> list:
    data = write_jsonl(tmp / "q.jsonl", [{"question": "1+1?", "final": "2"}] * 4)
    return ["teacher-rl", "--run", run, "--dataset", data]


def _bad_golds(run: Path, tmp: Path) -> list:
    rows = [{"problem": f"{i}+1?", "answer": str(i + 1) if i < 10 else "\\frac{1}{"} for i in range(40)]
    return ["teacher-rl", "--run", run, "--dataset", write_jsonl(tmp / "golds.jsonl", rows)]


def _few_bad_golds(run: Path, tmp: Path) -> list:
    rows = [{"problem": f"{i} + 2 = ?", "answer": str(i + 2)} for i in range(39)] + [{"problem": "x", "answer": "{"}]
    return ["teacher-rl", "--run", run, "--dataset", write_jsonl(tmp / "golds.jsonl", rows), "--set", "max_steps=1",
            "--set", "per_device_train_batch_size=8", "--set", "max_completion_length=8", "--set", "save_steps=10"]


def _skipped_and_recorded(run: Path, tmp: Path, result) -> None:
    """Below the threshold the bad records are counted, announced on one line, skipped, and recorded."""
    assert [line for line in result.stderr.splitlines() if line.startswith("warning:")] == [
        f"warning: skipped 1 of 40 problems of {tmp / 'golds.jsonl'} whose gold answer cannot be parsed"]
    metrics = RunDir(run).stage("teacher-rl")["metrics"]
    assert metrics["skipped_unparsable_golds"] == 1 and metrics["prompts"] == 39


def _other_tokenizer(run: Path, tmp: Path) -> list:
    from sdd.toy import ToySpec, build_model, build_tokenizer

    other_tokenizer = build_tokenizer(["completely different corpus 123 + - ="] * 20, 300)
    build_model(ToySpec().student, other_tokenizer, 0).save_pretrained(tmp / "other-teacher")
    other_tokenizer.save_pretrained(tmp / "other-teacher")
    return ["distill", "--run", run, "--teacher", tmp / "other-teacher"]


def _recipe(run: Path, tmp: Path) -> list:
    (tmp / "recipe.yaml").write_text(yaml.safe_dump({"teacher": "a", "student": "b", "variants": ["rl-teacher-brigde"]}))
    return ["run", tmp / "recipe.yaml", "--root", tmp / "exp", "--dry-run"]


def _nothing_planned(run: Path, tmp: Path, result) -> None:
    assert not (tmp / "exp").exists()


def _edit_checkpoint(run: Path) -> None:
    config = student(run) / "config.json"
    config.write_text(config.read_text() + "\n")  # still loads; its bytes changed


def _changed(run: Path, tmp: Path) -> list:
    _edit_checkpoint(run)
    return ["sft", "--run", run, "--role", "student"]


def _changed_trusted(run: Path, tmp: Path) -> list:
    _edit_checkpoint(run)
    return ["sft", "--run", run, "--role", "student", "--trust-changed", "--set", "max_steps=1", *TINY_SFT]


def _trust_recorded(run: Path, tmp: Path, result) -> None:
    record = RunDir(run).stage("sft-student")
    assert record["status"] == "done" and record["inputs"]["model"]["trusted_change"] is True


def _missing_input(run: Path, tmp: Path) -> list:
    shutil.rmtree(student(run))
    return ["sft", "--run", run, "--role", "student"]


def _truncated_manifest(run: Path, tmp: Path) -> list:
    manifest = run / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(good[: len(good) // 2])  # what a job killed mid-write would leave without atomic writes
    (tmp / "torn").write_bytes(manifest.read_bytes())
    return ["sft", "--run", run, "--role", "student"]


def _manifest_kept(run: Path, tmp: Path, result) -> None:
    assert (run / "manifest.json").read_bytes() == (tmp / "torn").read_bytes()
    assert json.loads((run / BACKUP_NAME).read_text())["schema"] == 1


def _outside(run: Path, tmp: Path) -> list:
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"]["toy-init"]["outputs"]["student"]["path"] = "../../elsewhere/model"
    (run / "manifest.json").write_text(json.dumps(manifest))
    return ["sft", "--run", run, "--role", "student"]


def _diverges(run: Path, tmp: Path) -> list:
    """A learning rate of 1e30 makes the weights huge after one step and the gradients NaN at the next."""
    return ["sft", "--run", run, "--role", "student", "--set", "learning_rate=1e30", "--set", "max_steps=6",
            "--set", "save_steps=1", *TINY_SFT]


def _last_good_checkpoint_kept(run: Path, tmp: Path, result) -> None:
    import torch
    from safetensors.torch import load_file

    line = result.stderr.strip()
    match = re.search(r"sft-student: (loss|gradient norm) became (nan|inf|-inf) at step (\d+); "
                      r"the last good checkpoint is checkpoint-(\d+)\.", line)
    assert match, line
    step, kept = int(match[3]), int(match[4])
    assert kept == step - 1  # saved every step: the one before the bad step is the last good one
    stage_dir = run / "sft-student"
    assert max(int(p.name.split("-")[1]) for p in stage_dir.glob("checkpoint-*")) == kept
    weights = load_file(str(stage_dir / f"checkpoint-{kept}" / "model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    record = RunDir(run).stage("sft-student")
    assert record["status"] == "failed" and record["error"] == line.removeprefix("error: ")


CASES: dict[str, Case] = {  # slowest first, so the two workers finish together
    "loss becomes NaN": Case(_diverges, ("Lower the learning rate or check the data",), fresh=True,
                             check=_last_good_checkpoint_kept),
    "changed input checkpoint, trusted": Case(_changed_trusted, (), fresh=True, check=_trust_recorded, exit_code=0),
    "a few unparsable gold answers": Case(_few_bad_golds, (), fresh=True, check=_skipped_and_recorded, exit_code=0),
    "missing model": Case(lambda run, tmp: ["sft", "--run", run, "--role", "student", "--model", tmp / "no-such-model"],
                          ("no-such-model does not exist",)),
    "not a causal LM": Case(_t5, ("is not a causal language model (model_type 't5')", "AutoModelForCausalLM")),
    "pickle-only weights": Case(_pickled, ("only pickled weights (pytorch_model.bin)", "safetensors only")),
    "remote code not trusted": Case(_remote_code, ("needs its own Python code", "--set trust_remote_code=true"),
                                    check=_no_code_ran),
    "missing dataset": Case(lambda run, tmp: ["sft", "--run", run, "--role", "student", "--dataset", tmp / "nope.jsonl"],
                            ("nope.jsonl does not exist",)),
    "empty dataset": Case(_empty, ("empty.jsonl is empty",)),
    "wrong columns": Case(_wrong_columns, ("has no column 'problem' (columns: question, final)", "--set problem_column=NAME")),
    "unparsable gold answers": Case(_bad_golds, ("30 of 40 gold answers cannot be parsed (more than 5%)", "max_bad_answers")),
    "tokenizer mismatch": Case(_other_tokenizer, ("tokenizers differ", "token-level KL needs one tokenizer")),
    "unknown --set key": Case(lambda run, tmp: ["sft", "--run", run, "--set", "lerning_rate=1e-5"],
                              ("unknown option 'lerning_rate' in --set", "did you mean learning_rate")),
    "wrong type": Case(lambda run, tmp: ["distill", "--run", run, "--set", "max_steps=many"],
                       ("option 'max_steps' = 'many' has the wrong type: expected int",)),
    "option out of range": Case(lambda run, tmp: ["eval", "--run", run, "--samples", "0"],
                                ("--samples and --seeds must be at least 1",)),
    "recipe error": Case(_recipe, ("unknown variant 'rl-teacher-brigde'",), check=_nothing_planned),
    "changed input checkpoint": Case(_changed, ("student-base changed since stage 'toy-init' wrote it", "--trust-changed"),
                                     fresh=True),
    "missing input checkpoint": Case(_missing_input, ("recorded as the output of stage 'toy-init', is missing",
                                                      "rerun that stage"), fresh=True),
    "truncated manifest": Case(_truncated_manifest, ("manifest.json is corrupt", "the last good version is", BACKUP_NAME,
                                                     "will not overwrite it"), fresh=True, check=_manifest_kept),
    "manifest path outside the run dir": Case(_outside, ("points outside the run dir", "refusing to follow it"), fresh=True),
}


@pytest.fixture(scope="module")
def outcomes(toy_template, tmp_path_factory):
    """Run every case, two at a time; (shared run dir, its manifest before, {case: (run, tmp, result)})."""
    base = tmp_path_factory.mktemp("bad-input")
    shared = base / "shared" / "run"
    shutil.copytree(toy_template, shared)
    before = (shared / "manifest.json").read_bytes()
    prepared = {}
    for number, (name, case) in enumerate(CASES.items()):
        tmp = base / f"case{number}"
        tmp.mkdir()
        run = shared
        if case.fresh:
            run = tmp / "run"
            shutil.copytree(toy_template, run)
        prepared[name] = (run, tmp, case.prepare(run, tmp))
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(cli, *argv) for name, (_, _, argv) in prepared.items()}
        results = {name: future.result() for name, future in futures.items()}
    return shared, before, {name: (run, tmp, results[name]) for name, (run, tmp, _) in prepared.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, outcomes):
    shared, before, done = outcomes
    case = CASES[name]
    run, tmp, result = done[name]
    if case.exit_code == 2:
        error_line(result, name, *case.phrases)
    else:
        assert result.returncode == case.exit_code, result.stderr[-3000:]
    if case.check:
        case.check(run, tmp, result)
    if not case.fresh:
        assert (shared / "manifest.json").read_bytes() == before  # refused before anything was recorded


# -- cases that need a mount, a resource limit or a sequence of commands ---------------------------
def test_run_dir_not_writable(toy_run):
    """Permissions for an ordinary user; as root (who ignores them) a read-only bind mount."""
    before = (toy_run / "manifest.json").read_bytes()
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [toy_run, *toy_run.rglob("*")]}
        for p, mode in modes.items():
            p.chmod(mode & ~0o222)
        try:
            result = cli("sft", "--run", toy_run, "--role", "student")
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
    else:
        bind = subprocess.run(["mount", "--bind", str(toy_run), str(toy_run)], capture_output=True, text=True)
        if bind.returncode != 0:
            pytest.skip(f"root cannot bind-mount here: {bind.stderr.strip()}")
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(toy_run)], check=True)
            result = cli("sft", "--run", toy_run, "--role", "student")
        finally:
            subprocess.run(["umount", str(toy_run)], check=True)
    error_line(result, "run dir not writable", f"run dir {toy_run} is not writable", "choose a writable --run")
    assert (toy_run / "manifest.json").read_bytes() == before


def _disk_full_argv(toy_run: Path, run: Path, max_steps: int) -> list:
    """A run dir holding only config.yaml; model and data are named explicitly, from outside it."""
    run.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((toy_run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({"sft": config["sft"]}))
    return ["sft", "--run", run, "--role", "student", "--model", student(toy_run),
            "--dataset", toy_run / "toy" / "data" / "train.jsonl", "--set", f"max_steps={max_steps}",
            "--set", "save_steps=1", *TINY_SFT]


def _assert_checkpoint_loads(path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    json.loads((path / "trainer_state.json").read_text())
    load_file(str(path / "model.safetensors"))
    torch.load(path / "optimizer.pt", weights_only=True)


def test_disk_full_during_checkpoint_write(toy_run, tmp_path):
    """A real full disk: a tmpfs that holds one checkpoint and a half (where this user may mount one; else
    the file-size-limit variant below). Writing checkpoint-2 gets ENOSPC inside transformers' own save
    code; checkpoint-1 must survive, and the rerun, given space, resume from it."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    model_bytes = (student(toy_run) / "model.safetensors").stat().st_size
    size = int(1.6 * (3.1 * model_bytes + 64_000))  # a checkpoint is ~3.1x the weights (AdamW keeps two moments)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:  # not root: the portable simulation instead
        return test_disk_full_during_checkpoint_write_file_size_limit(toy_run, tmp_path)
    try:
        run = mount / "run"
        argv = _disk_full_argv(toy_run, run, max_steps=3)
        line = error_line(cli(*argv), "disk full (tmpfs)", "sft-student: could not write checkpoint-2 (No space left on device)",
                          "the last complete checkpoint, checkpoint-1, is intact", "Free disk space")
        assert sorted(p.name for p in (run / "sft-student").glob("checkpoint-*")) == ["checkpoint-1"]
        _assert_checkpoint_loads(run / "sft-student" / "checkpoint-1")
        assert RunDir(run).stage("sft-student")["error"] == line.removeprefix("error: ")
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        resumed = cli(*argv)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        record = RunDir(run).stage("sft-student")
        assert record["status"] == "done" and record["metrics"]["steps"] == 3 and record["attempts"] == 2
        entries = [json.loads(x) for x in (run / "sft-student" / "log.jsonl").read_text().splitlines()]
        assert [e["step"] for e in entries if "loss" in e] == [1, 2, 3]  # step 2 (its checkpoint lost) logged once
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of the signal killing us

    return apply


@pytest.mark.slow
def test_disk_full_during_checkpoint_write_file_size_limit(toy_run, tmp_path):
    """Without root: RLIMIT_FSIZE on the child makes every write past 256 kB fail with EFBIG. Every
    checkpoint is the same size, so the good one is made first: a run preempted (SIGTERM) after its
    first step, then resumed under the limit, which fails writing its next checkpoint; then, without
    the limit, the rerun finishes from the checkpoint that survived."""
    run = tmp_path / "run"
    argv = _disk_full_argv(toy_run, run, max_steps=40)
    process = subprocess.Popen([sys.executable, "-m", "sdd", *map(str, argv)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=ENV)
    log = run / "sft-student" / "log.jsonl"
    deadline = time.time() + 240
    while process.poll() is None and time.time() < deadline and not (log.is_file() and log.read_text().strip()):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=240)
    assert process.returncode == 75, err[-3000:]
    good = sorted(int(p.name.split("-")[1]) for p in (run / "sft-student").glob("checkpoint-*"))[-1]
    before = fingerprint(run / "sft-student" / f"checkpoint-{good}")
    line = error_line(cli(*argv, preexec_fn=_file_size_limit(256_000)), "disk full (RLIMIT_FSIZE)",
                      f"could not write checkpoint-{good + 1} (File too large)",
                      f"the last complete checkpoint, checkpoint-{good}, is intact")
    assert fingerprint(run / "sft-student" / f"checkpoint-{good}") == before
    assert not (run / "sft-student" / f"checkpoint-{good + 1}").exists()
    assert RunDir(run).stage("sft-student")["error"] == line.removeprefix("error: ")
    resumed = cli(*argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert RunDir(run).stage("sft-student")["metrics"]["steps"] == 40
