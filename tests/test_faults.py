"""Fault injection: kill every training stage mid-run, rerun the same command, and get the run that was never killed.

For each stage (sft, teacher-rl, student-rl, warmup, distill) and each signal (SIGTERM: checkpoint at
the next step and exit 75; SIGKILL: no warning at all), a child process is killed at a step drawn
from a seeded RNG (logged), the same command is run again, and the resumed stage is compared with
an uninterrupted run of the same seed: the step count, every step in log.jsonl exactly once, the
final weights, the manifest's training metrics, and an eval of the final checkpoint (avg@k and the
sampled completions themselves).

Tolerance: none. On CPU (fp32, fixed thread count) a resumed run was bitwise identical to the
uninterrupted one in every case measured (docs/reliability.md), because the checkpoint holds
everything the next step depends on: weights, optimizer and scheduler state, the RNG states and the
data position; and sdd's samplers are keyed by seed and index, not by a global RNG. The tests
therefore assert equality and report the largest weight difference when it fails. As a check that
this comparison can fail, the uninterrupted run's last two steps must change the weights.

The full matrix is marked slow (`pytest -m slow tests/test_faults.py -s`); two representative cases
run by default. `SDD_FAULT_SEED` picks the kill steps; `SDD_FAULT_RESULTS=file.jsonl` appends one
line per case for the results table.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import set_tiny

from sdd.manifest import RunDir

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
SEED = int(os.environ.get("SDD_FAULT_SEED", "0"))

# Enough steps that a kill lands mid-run (sft steps take ~0.05 s, so it gets more), a checkpoint
# every 2 steps so SIGKILL sometimes loses a step, and every step logged so the kill can be timed.
# GRPO needs reward variance within a group to move the weights at all: 8 prompts a step, on the
# bootstrapped student (the stronger of the two bootstrapped models, also as "teacher"), and the
# paper's weight decay, so that every step changes the weights.
RL = {"max_steps": 6, "save_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 64, "weight_decay": 0.1}
STAGES = {
    "sft": {"argv": ["sft", "--role", "student"], "name": "sft-student", "base": "toy",
            "config": {"max_steps": 12, "save_steps": 2, "logging_steps": 1}},
    "teacher-rl": {"argv": ["teacher-rl", "--model", "{run}/sft-student/final"], "name": "teacher-rl",
                   "base": "bootstrapped", "config": RL},
    "student-rl": {"argv": ["student-rl"], "name": "student-rl", "base": "bootstrapped", "config": RL},
    "warmup": {"argv": ["warmup"], "name": "warmup", "base": "toy",
               "config": {"max_steps": 6, "save_steps": 2, "logging_steps": 1, "sample_chunk": 4}},
    # 16 prompts, 8 a step: every checkpoint is an epoch boundary, where TRL's sampler used to lose the order.
    "distill": {"argv": ["distill"], "name": "distill", "base": "toy",
                "config": {"max_steps": 8, "save_steps": 2, "logging_steps": 1, "limit": 16}},
}
DEFAULT_CASES = {("sft", "SIGTERM"), ("distill", "SIGKILL")}
EVAL = ["--benchmark", "toy-test", "--samples", "4", "--seeds", "1", "--limit", "32", "--max-new-tokens", "48"]



# -- running stages ---------------------------------------------------------------------------------
def in_process(*argv) -> None:
    from sdd.cli import run_in_process
    from sdd.experiment.execute import OK, SKIPPED

    outcome, message = run_in_process([str(a) for a in argv])
    assert outcome in (OK, SKIPPED), message


def stage_argv(stage: str, run: Path) -> list[str]:
    return [a.format(run=run) for a in STAGES[stage]["argv"]] + ["--run", str(run)]


def start(stage: str, run: Path, out: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "sdd", *stage_argv(stage, run)]
    return subprocess.Popen(argv, stdout=open(out, "a"), stderr=subprocess.STDOUT, env=ENV)


def finish(stage: str, run: Path, out: Path) -> int:
    process = start(stage, run, out)
    return process.wait(timeout=600)


def training_log(run: Path, stage: str) -> list[dict]:
    path = run / STAGES[stage]["name"] / "log.jsonl"
    entries = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                pass
    return [e for e in entries if "loss" in e]  # the end-of-training summary has train_loss, not loss


def wait_for_step(process: subprocess.Popen, run: Path, stage: str, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        if any(e["step"] >= step for e in training_log(run, stage)):
            return
        time.sleep(0.01)
    raise AssertionError(f"{stage} did not reach step {step} (exit {process.poll()})")


def _running(run: Path, stage: str) -> bool:
    try:
        return (RunDir(run).stage(STAGES[stage]["name"]) or {}).get("status") == "running"
    except Exception:  # noqa: BLE001 - read while being replaced: look again
        return False


def prepare(stage: str, request, tmp: Path) -> Path:
    """A fresh copy of the stage's base run dir with the fault-test sizes."""
    source = request.getfixturevalue("toy_template" if STAGES[stage]["base"] == "toy" else "bootstrapped")
    run = tmp / "run"
    shutil.copytree(source, run)
    set_tiny(run, **{stage: STAGES[stage]["config"]})
    return run


_references: dict[str, Path] = {}
_reference_evals: dict[str, dict] = {}


def reference(stage: str, request, tmp_path_factory) -> Path:
    """The uninterrupted run of a stage, made once per session (in-process: same code, no start-up cost)."""
    if stage not in _references:
        run = prepare(stage, request, tmp_path_factory.mktemp(f"reference-{stage}"))
        in_process(*stage_argv(stage, run))
        _reference_evals[stage] = evaluate(stage, run)
        _references[stage] = run
    return _references[stage]


def evaluate(stage: str, run: Path) -> dict:
    final = run / STAGES[stage]["name"] / "final"
    in_process("eval", "--run", run, "--model", final, "--name", "fault-eval", *EVAL)
    rows = (run / "fault-eval-toy-test" / "samples-seed0.jsonl").read_text().splitlines()[1:]
    return {"metrics": RunDir(run).stage("fault-eval-toy-test")["metrics"],
            "completions": [json.loads(r)["completions"] for r in rows]}


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def report(row: dict) -> None:
    print("fault-injection:", json.dumps(row))
    if os.environ.get("SDD_FAULT_RESULTS"):
        with open(os.environ["SDD_FAULT_RESULTS"], "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def assert_same_as_reference(stage: str, run: Path, ref: Path, row: dict, *, evaluate_it: bool = True) -> None:
    """The resumed stage against the uninterrupted one: steps, log, weights, metrics, eval."""
    name, steps = STAGES[stage]["name"], STAGES[stage]["config"]["max_steps"]
    record, ref_record = RunDir(run).stage(name), RunDir(ref).stage(name)
    assert record["status"] == "done" and record["attempts"] == 2, record
    assert record["metrics"]["steps"] == ref_record["metrics"]["steps"] == steps
    assert [e["step"] for e in training_log(run, stage)] == list(range(1, steps + 1))  # each step once
    final, ref_final = weights(run / name / "final"), weights(ref / name / "final")
    row["max_abs_weight_diff"] = max_difference(final, ref_final)
    # The comparison can fail: the reference's own last two steps moved its weights.
    row["last_two_steps_moved_weights_by"] = max_difference(weights(ref / name / f"checkpoint-{steps - 2}"), ref_final)
    trained = {k: v for k, v in record["metrics"].items() if k != "wall_time_s" and isinstance(v, float)}
    row["metric_diffs"] = {k: abs(v - ref_record["metrics"][k]) for k, v in trained.items()}
    if evaluate_it:  # implied by identical weights (the sampler is seeded); the matrix measures it anyway
        mine, theirs = evaluate(stage, run), _reference_evals[stage]
        row["eval_avg@4"] = (mine["metrics"]["avg@4"], theirs["metrics"]["avg@4"])
        row["eval_same_completions"] = mine["completions"] == theirs["completions"]
    if "reward" in record["metrics"]:  # the policy gradient itself ran: some group had reward variance
        row["steps_with_reward_signal"] = sum(e.get("frac_reward_zero_std", 1.0) < 1.0 for e in training_log(run, stage))
    report(row)
    assert row["last_two_steps_moved_weights_by"] > 0
    assert row.get("steps_with_reward_signal", 1) > 0
    assert row["max_abs_weight_diff"] == 0.0, row
    assert all(d == 0.0 for d in row["metric_diffs"].values()), row
    if evaluate_it:
        assert row["eval_avg@4"][0] == row["eval_avg@4"][1] and row["eval_same_completions"], row


# -- the matrix -------------------------------------------------------------------------------------
MATRIX = [pytest.param(stage, sig, id=f"{stage}-{sig}",
                       marks=() if (stage, sig) in DEFAULT_CASES else pytest.mark.slow)
          for stage in STAGES for sig in ("SIGTERM", "SIGKILL")]


@pytest.mark.parametrize(("stage", "sig"), MATRIX)
def test_killed_stage_resumes_to_the_uninterrupted_result(stage, sig, request, tmp_path, tmp_path_factory):
    steps = STAGES[stage]["config"]["max_steps"]
    # SIGTERM early enough that the stop lands before the last step; SIGKILL after checkpoint-2 exists,
    # so the rerun resumes from a checkpoint and redoes the steps the kill lost.
    low, high = (1, steps // 2) if sig == "SIGTERM" else (3, steps - 1)
    kill_at = random.Random(f"{SEED}:{stage}:{sig}").randint(low, high)
    row = {"stage": stage, "signal": sig, "seed": SEED, "kill_after_step": kill_at}
    print(f"fault-injection: {stage} gets {sig} once step {kill_at} of {steps} is logged (SDD_FAULT_SEED={SEED})")
    ref = reference(stage, request, tmp_path_factory)
    run = prepare(stage, request, tmp_path)
    name = STAGES[stage]["name"]
    out = tmp_path / "output.txt"
    process = start(stage, run, out)
    wait_for_step(process, run, stage, kill_at)
    process.send_signal(getattr(signal, sig))
    code = process.wait(timeout=300)
    saved = sorted(int(p.name.split("-")[1]) for p in (run / name).glob("checkpoint-*")
                   if (p / "trainer_state.json").is_file())
    row["exit_code"], row["checkpoints_on_disk"] = code, saved
    record = RunDir(run).stage(name)
    if sig == "SIGTERM":
        assert code == 75, out.read_text()[-3000:]
        assert record["status"] == "interrupted" and "its checkpoint is saved" in record["error"]
        assert "rerun the same command to resume" in record["error"]
        assert saved and kill_at <= saved[-1] < steps  # saved at the step boundary after the signal
        assert not (run / ".locks" / f"{name}.lock").exists()
    else:
        assert code == -signal.SIGKILL
        assert record["status"] == "running"  # nobody could record anything: the next run must cope
        lock = json.loads((run / ".locks" / f"{name}.lock").read_text())
        assert lock["pid"] == process.pid and lock["host"] == socket.gethostname()  # stale: recovered below
    row["resumed_from"] = saved[-1] if saved else 0
    assert finish(stage, run, out) == 0, out.read_text()[-3000:]
    assert_same_as_reference(stage, run, ref, row)


# -- the rest of preemption -------------------------------------------------------------------------
def test_second_sigint_aborts_at_once_and_the_last_checkpoint_stays_good(request, tmp_path, tmp_path_factory):
    """Ctrl-C asks for a checkpoint; a second Ctrl-C right after stops at once, wherever the process is,
    possibly mid-save, and exits 75 like any interruption. Whatever was half written is not used: the
    rerun resumes from the newest complete checkpoint and ends where an uninterrupted run does."""
    stage = "sft"
    ref = reference(stage, request, tmp_path_factory)
    run = prepare(stage, request, tmp_path)
    out = tmp_path / "output.txt"
    process = start(stage, run, out)
    wait_for_step(process, run, stage, 3)
    process.send_signal(signal.SIGINT)
    time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    began = time.time()
    code = process.wait(timeout=60)
    assert code == 75 and time.time() - began < 10, out.read_text()[-3000:]
    assert "sft-student aborted by a second Ctrl-C; rerun the same command to resume from checkpoint-" in out.read_text()
    record = RunDir(run).stage("sft-student")
    assert record["status"] == "interrupted" and "aborted by a second Ctrl-C" in record["error"]
    assert finish(stage, run, out) == 0, out.read_text()[-3000:]
    assert_same_as_reference(stage, run, ref, {"stage": stage, "signal": "SIGINT x2"}, evaluate_it=False)


def test_warmup_teacher_sampling_stops_on_sigterm_and_resumes_from_its_partial_file(request, tmp_path,
                                                                                   tmp_path_factory):
    """SIGTERM while the teacher is still sampling (before any training step): the finished chunks stay in
    `teacher-samples.jsonl.partial`, the stage exits 75, and the rerun samples only what is missing,
    even after a kill that tore the last line. The samples and the trained student match an
    uninterrupted run byte for byte."""
    stage = "warmup"
    ref = reference(stage, request, tmp_path_factory)
    run = prepare(stage, request, tmp_path)
    out = tmp_path / "output.txt"
    process = start(stage, run, out)
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline and "teacher samples: 4/32" not in out.read_text():
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 75, out.read_text()[-3000:]
    partial = run / "warmup" / "teacher-samples.jsonl.partial"
    rows = partial.read_text().splitlines()[1:]
    assert 4 <= len(rows) < 32 and len(rows) % 4 == 0, len(rows)
    assert not (run / "warmup" / "teacher-samples.jsonl").exists() and not list((run / "warmup").glob("checkpoint-*"))
    assert RunDir(run).stage("warmup")["status"] == "interrupted"
    with open(partial, "a") as handle:  # what a SIGKILL in the middle of a write leaves
        handle.write('{"id": "train-99", "answer": "1')
    before = out.read_text()
    assert finish(stage, run, out) == 0, out.read_text()[-3000:]
    progress = [line for line in out.read_text()[len(before):].splitlines() if line.startswith("teacher samples:")]
    assert progress[0] == f"teacher samples: {len(rows) + 4}/32 prompts"  # resumed after the last whole chunk
    assert (run / "warmup" / "teacher-samples.jsonl").read_bytes() == (ref / "warmup" / "teacher-samples.jsonl").read_bytes()
    assert_same_as_reference(stage, run, ref, {"stage": stage, "signal": "SIGTERM during sampling",
                                               "partial_rows": len(rows)}, evaluate_it=False)


# -- torn files -------------------------------------------------------------------------------------
def test_torn_checkpoint_is_passed_over_for_the_previous_complete_one(request, tmp_path, tmp_path_factory):
    """What a network filesystem can leave after a node fails: the newest checkpoint's weights cut in half while
    its trainer_state.json is intact. Each checkpoint records its files' sizes and fingerprints last
    (sdd-complete.json); the rerun reports the torn one in one line, resumes from the one before it and says
    so, and ends where an uninterrupted run does."""
    stage = "sft"
    ref = reference(stage, request, tmp_path_factory)
    run = prepare(stage, request, tmp_path)
    out = tmp_path / "output.txt"
    process = start(stage, run, out)
    wait_for_step(process, run, stage, 5)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 75, out.read_text()[-3000:]
    saved = sorted((int(p.name.split("-")[1]), p) for p in (run / "sft-student").glob("checkpoint-*"))
    assert len(saved) == 2 and all((p / "sdd-complete.json").is_file() for _, p in saved), saved
    (older, _), (newest, newest_dir) = saved
    torn = newest_dir / "model.safetensors"
    size = torn.stat().st_size
    os.truncate(torn, size // 2)
    assert (newest_dir / "trainer_state.json").is_file()
    before = out.read_text()
    assert finish(stage, run, out) == 0, out.read_text()[-3000:]
    rerun = out.read_text()[len(before):]
    assert (f"checkpoint-{newest} is torn (model.safetensors {size // 2} of {size} bytes); "
            f"resuming from checkpoint-{older}\n") in rerun, rerun[-3000:]
    assert f"sft-student: resuming from checkpoint-{older}\n" in rerun, rerun[-3000:]
    assert_same_as_reference(stage, run, ref, {"stage": stage, "signal": "SIGTERM, then torn weights",
                                               "resumed_from": older}, evaluate_it=False)


def test_corrupt_input_model_exits_2_naming_the_file(toy_run, tmp_path):
    """A model given by --model whose weights file is cut short stops the stage before anything is recorded,
    with one line naming the file and how much of it is there (it was a safetensors traceback, exit 1)."""
    model = tmp_path / "student"
    shutil.copytree(toy_run / "toy" / "student-base", model)
    weights_file = model / "model.safetensors"
    size = weights_file.stat().st_size
    os.truncate(weights_file, size // 2)
    manifest = (toy_run / "manifest.json").read_bytes()
    result = subprocess.run([sys.executable, "-m", "sdd", "sft", "--run", str(toy_run), "--role", "student",
                             "--model", str(model)], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: model {model}: {weights_file} is cut short or corrupt (model.safetensors {size // 2} of {size} "
        "bytes); restore it, or rerun the stage that wrote it"], result.stderr
    assert (toy_run / "manifest.json").read_bytes() == manifest  # nothing was recorded as run


# -- concurrent writers -----------------------------------------------------------------------------
def test_second_writer_is_refused_naming_the_holder(toy_run, tmp_path):
    """Two jobs on the same stage of one run dir: the second stops before touching anything and says who
    holds the stage. (A holder that died is covered above: SIGKILL leaves its lock, the rerun takes it.)
    The holder is paused (SIGSTOP) while the second job starts: alive, holding the lock, using no CPU."""
    set_tiny(toy_run, sft={"max_steps": 400, "save_steps": 1000, "logging_steps": 1})
    out = tmp_path / "first.txt"
    first = start("sft", toy_run, out)
    try:
        wait_for_step(first, toy_run, "sft", 1)
        first.send_signal(signal.SIGSTOP)
        manifest = (toy_run / "manifest.json").read_bytes()
        second = subprocess.run([sys.executable, "-m", "sdd", "sft", "--run", str(toy_run), "--role", "student"],
                                capture_output=True, text=True, env=ENV, timeout=300)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert f"sft-student is being run by pid {first.pid} on {socket.gethostname()} since " in lines[0]
        assert "wait for it, or if that job is dead remove" in lines[0]
        assert (toy_run / "manifest.json").read_bytes() == manifest  # the refused job recorded nothing
        record = RunDir(toy_run).stage("sft-student")
        assert record["pid"] == first.pid and record["attempts"] == 1 and record["status"] == "running"
    finally:
        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGTERM)
        code = first.wait(timeout=300)
    assert code == 75, out.read_text()[-3000:]  # the holder carried on and stopped cleanly


@pytest.mark.slow
def test_difficulty_gate_stops_between_chunks(request, tmp_path):
    """SIGTERM while `teacher-rl --gate` is still measuring pass rates (300 prompts: two chunks of up to
    256): it stops before the next chunk, trains nothing, writes no gate.json, exits 75; the rerun measures
    again and trains."""
    run = prepare("teacher-rl", request, tmp_path)
    set_tiny(run, **{"teacher-rl": {**RL, "limit": 300, "max_steps": 1, "max_completion_length": 16}})
    argv = [sys.executable, "-m", "sdd", *stage_argv("teacher-rl", run), "--gate"]
    out = tmp_path / "output.txt"
    process = subprocess.Popen(argv, stdout=open(out, "a"), stderr=subprocess.STDOUT, env=ENV)
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline and not _running(run, "teacher-rl"):
        time.sleep(0.01)
    time.sleep(0.5)  # the model loads in ~0.1 s; the first chunk (2,048 rollouts) takes seconds
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 75, out.read_text()[-3000:]
    stage_dir = run / "teacher-rl"
    assert not (stage_dir / "gate.json").exists() and not list(stage_dir.glob("checkpoint-*"))
    assert training_log(run, "teacher-rl") == []
    record = RunDir(run).stage("teacher-rl")
    assert record["status"] == "interrupted" and "before its first checkpoint" in record["error"], record
    process = subprocess.Popen(argv, stdout=open(out, "a"), stderr=subprocess.STDOUT, env=ENV)
    assert process.wait(timeout=600) == 0, out.read_text()[-3000:]
    record = RunDir(run).stage("teacher-rl")
    assert record["status"] == "done" and sum(record["metrics"]["gate"][k] for k in ("never", "sometimes", "always")) == 300
