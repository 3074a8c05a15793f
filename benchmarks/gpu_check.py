"""The GPU acceptance command: every GPU figure sdd claims, measured in one run, written to one JSON.

    python benchmarks/gpu_check.py --out gpu-check.json                 # on one H100/H200, ~10 minutes
    python benchmarks/gpu_check.py --device cpu --out cpu-check.json    # toy shapes; what CI runs

Parts, each in its own process with its own time limit, so one failure keeps the others' figures:

  rollout     benchmarks/rollout.py: `hf` against `untuned` generation; on CUDA at the Qwen3-0.6B shape,
              where the acceptance is hf >= 5x untuned
  kl_loss     benchmarks/kl_loss.py: the token-level KL loss three ways; on CUDA at real shapes in bf16
              (V = 151,936, student hidden 2048, teacher 4096, 4,096 and 16,384 tokens)
  overhead    benchmarks/stage_overhead.py: bare TRL vs sdd per training step (toy models, on the device)
  gpu_tests   `pytest -m gpu` (they skip on a machine without CUDA)
  stages      one step of every training stage (sft, teacher-rl, student-rl, warmup, distill) through the
              real CLI on a run dir built here: random-weight Qwen3-1.7B (teacher) and Qwen3-0.6B (student)
              shapes saved in bf16 with a 151,936-row vocabulary and a local tokenizer of 151,669 tokens
              (Qwen3's count); on CPU, the toy's shapes and a 1,024-token tokenizer

A bare GPU image may lack trl, datasets and the verifier's packages. When one of them does not import,
the script installs the wheels in `.whl/` (made on any machine with network access, see below) into a
temporary folder on PYTHONPATH, touching no environment:

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 -d .whl trl==1.16.0 datasets==5.2.0 dill multiprocess \\
        math-verify latex2sympy2_extended antlr4-python3-runtime

(--python-version: the GPU image's Python.) The JSON holds, per part: ok, seconds, and its figures; for the
stages, per stage the manifest status, global steps, the logged losses, the fraction of one weight matrix
that changed, wall time and (CUDA) the allocator's peak. The exit code is 0 only when every part passed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
# Modules a bare GPU image may lack, and the wheels that provide them.
NEEDED = {"trl": "trl==1.16.0", "datasets": "datasets==5.2.0", "dill": "dill", "multiprocess": "multiprocess",
          "math_verify": "math-verify", "latex2sympy2_extended": "latex2sympy2_extended",
          "antlr4": "antlr4-python3-runtime"}
PARTS = ("rollout", "kl_loss", "overhead", "gpu_tests", "stages")
STAGES = ("sft", "teacher-rl", "student-rl", "warmup", "distill")
QWEN3_TOKENS = 151_669  # len(AutoTokenizer.from_pretrained("Qwen/Qwen3-0.6B")); the heads have 151,936 rows
QWEN3_ROWS = 151_936
# The tensor compared before and after a stage to tell whether the weights moved.
PROBE = "model.layers.0.mlp.down_proj.weight"


# -- dependencies ---------------------------------------------------------------------------------
def ensure_dependencies(force: bool = False) -> dict:
    """Install `.whl/` into a temp dir on the path when a needed module is missing (or `force`)."""
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if not missing and not force:
        return {"installed_from": None, "missing": []}
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        packages = " ".join(NEEDED[m] for m in missing)
        raise SystemExit(f"error: {', '.join(missing)} not importable and no wheels in {WHEELS}: on a machine with "
                         f"network access run `pip download --no-deps --only-binary=:all: --python-version "
                         f"{sys.version_info.major}.{sys.version_info.minor} --implementation cp --platform "
                         f"manylinux_2_28_x86_64 -d .whl {packages}` and copy .whl/ here")
    target = Path(tempfile.mkdtemp(prefix="sdd-gpu-check-deps-"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "--target", str(target), *map(str, wheels)], check=True)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
    still = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if still:
        raise SystemExit(f"error: {', '.join(still)} still not importable after installing {WHEELS}: add their wheels")
    return {"installed_from": str(WHEELS), "target": str(target), "missing": missing, "wheels": [w.name for w in wheels]}


# -- parts that are other benchmarks ------------------------------------------------------------------
def part_commands(device: str, out: Path) -> dict[str, list[str]]:
    py, bench = sys.executable, ROOT / "benchmarks"
    if device == "cuda":
        return {
            "rollout": [py, str(bench / "rollout.py"), "--device", "cuda", "--shape", "qwen3-0.6b",
                        "--settings", "untuned,hf", "--repeats", "2", "--json", str(out / "rollout.json")],
            "kl_loss": [py, str(bench / "kl_loss.py"), "--device", "cuda", "--vocab", str(QWEN3_ROWS),
                        "--tokens", "4096,16384", "--student-hidden", "2048", "--teacher-hidden", "4096",
                        "--dtype", "bfloat16", "--repeats", "3", "--json", str(out / "kl_loss.json")],
            "overhead": [py, str(bench / "stage_overhead.py"), "--steps", "10", "--repeats", "2",
                         "--json", str(out / "overhead.json")],
        }
    return {
        "rollout": [py, str(bench / "rollout.py"), "--device", "cpu", "--shape", "toy", "--settings", "untuned,hf",
                    "--batch", "4", "--new-tokens", "16", "--prompt-tokens", "8-16", "--repeats", "1", "--threads",
                    "1", "--json", str(out / "rollout.json")],
        "kl_loss": [py, str(bench / "kl_loss.py"), "--device", "cpu", "--vocab", "1024", "--tokens", "64",
                    "--student-hidden", "32", "--teacher-hidden", "64", "--dtype", "float32", "--repeats", "1",
                    "--json", str(out / "kl_loss.json")],
        "overhead": [py, str(bench / "stage_overhead.py"), "--steps", "2", "--repeats", "1",
                     "--json", str(out / "overhead.json")],
    }


TIME_LIMITS = {"cuda": {"rollout": 240, "kl_loss": 90, "overhead": 120, "gpu_tests": 60, "stages": 300},
               "cpu": {"rollout": 120, "kl_loss": 120, "overhead": 300, "gpu_tests": 300, "stages": 900}}


def judge(part: str, figures: dict, device: str) -> tuple[bool, str]:
    """Whether a part's figures pass; the reason in words."""
    if part == "rollout":
        ratio = figures.get("hf_over_untuned")
        if ratio is None:
            return False, f"no hf/untuned ratio ({figures.get('skipped')})"
        if device == "cuda":
            return ratio >= 5.0, f"hf {ratio:.1f}x untuned (acceptance: >= 5x)"
        return ratio > 0, f"hf {ratio:.2f}x untuned (no target on CPU)"
    if part == "kl_loss":
        rows = figures.get("rows", [])
        losses = [r["loss"] for r in rows if r.get("status") == "ok"]
        agree = bool(losses) and max(losses) - min(losses) <= 1e-2 * max(1.0, abs(max(losses)))
        ok = bool(rows) and all(r.get("status") == "ok" or r.get("status", "").startswith("skipped")
                                or (r["method"] == "naive" and r.get("status") == "OOM") for r in rows)
        ok = ok and agree and all(math.isfinite(x) for x in losses)
        return ok, f"{len(losses)} rows ok, losses {'agree' if agree else 'DISAGREE'}"
    if part == "overhead":
        rows = figures.get("rows", [])
        ok = {r["stage"] for r in rows} == {"sft", "grpo", "distill"} and all(
            r["sdd_wall_s_per_step"] > 0 for r in rows)
        return ok, ", ".join(f"{r['stage']} sdd/bare {r['sdd_over_bare_wall']:.2f}" for r in rows)
    if part == "gpu_tests":
        if figures.get("failed") or figures.get("errors"):
            return False, f"{figures.get('failed')} failed, {figures.get('errors')} errors"
        if device == "cuda":
            return figures.get("passed", 0) > 0, f"{figures.get('passed')} passed, {figures.get('skipped')} skipped"
        return True, f"{figures.get('passed')} passed, {figures.get('skipped')} skipped (no CUDA here)"
    if part == "stages":
        bad = [name for name in STAGES if not figures.get(name, {}).get("ok")]
        return not bad, "all stages stepped with finite losses" if not bad else f"failed: {', '.join(bad)}"
    return False, "unknown part"


def run_part(part: str, device: str, out: Path, deadline: float) -> dict:
    limit = max(10.0, min(TIME_LIMITS[device][part], deadline - time.time()))
    start = time.time()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", "1")
    if part == "gpu_tests":
        # Only the files that have gpu-marked tests: collecting the whole suite costs a minute of imports.
        files = [str(p) for p in sorted((ROOT / "tests").glob("test_*.py")) if "mark.gpu" in p.read_text()]
        command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                   f"--junitxml={out / 'gpu_tests.xml'}", *(files or [str(ROOT / "tests")])]
    elif part == "stages":
        command = [sys.executable, str(Path(__file__).resolve()), "--device", device, "--stages-only",
                   "--out", str(out / "stages.json")]
    else:
        command = part_commands(device, out)[part]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        code, tail = done.returncode, (done.stdout + done.stderr)[-2000:]
    except subprocess.TimeoutExpired as expired:
        code, tail = "timeout", f"ran past {limit:.0f} s\n" + str(expired.stderr or "")[-1500:]
    seconds = time.time() - start
    figures = read_figures(part, out)
    ok, summary = judge(part, figures, device) if figures else (False, "no figures written")
    ok = ok and (code == 0 or (part == "gpu_tests" and code == 5))  # pytest exits 5 when nothing was selected
    result = {"ok": ok, "summary": summary, "seconds": round(seconds, 1), "exit": code, "command": command,
              "figures": figures}
    if not ok:
        result["output_tail"] = tail
    return result


def read_figures(part: str, out: Path) -> dict:
    if part == "gpu_tests":
        path = out / "gpu_tests.xml"
        if not path.is_file():
            return {}
        import xml.etree.ElementTree as ElementTree

        suite = ElementTree.parse(path).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        total, failed, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        names = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")]
        return {"tests": total, "passed": total - failed - errors - skipped, "failed": failed, "errors": errors,
                "skipped": skipped, "names": names}
    path = out / f"{part}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# -- one step of every training stage ------------------------------------------------------------------
def build_tokenizer(size: int, corpus: list[str]):
    """A byte-level BPE with exactly `size` tokens: the toy's trained merges, then synthetic merges of its tokens.

    Qwen's tokenizer is not on this machine (no hub). What matters for a training step is the count: the
    loss, the log-softmax and the vocabulary slice run over as many entries as with Qwen3's 151,669.
    """
    from itertools import product

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from sdd import toy

    base = toy.build_tokenizer(corpus, 384)
    spec = json.loads(base.backend_tokenizer.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]  # the special tokens are in vocab already
    pieces = sorted(vocab, key=vocab.get)[len(spec["added_tokens"]):]
    for a, b in product(pieces + [f"{x}{y}" for x, y in product(pieces, repeat=2)], pieces):
        if len(vocab) >= size:
            break
        if a in vocab and a + b not in vocab:  # a merge may only join tokens that exist
            vocab[a + b] = len(vocab)
            merges.append([a, b])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left")
    tokenizer.chat_template = toy.CHAT_TEMPLATE
    return tokenizer


SHAPES = {
    "cuda": {  # Qwen3-1.7B and Qwen3-0.6B from their public configs
        "teacher": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                        head_dim=128, intermediate_size=6144),
        "student": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                        head_dim=128, intermediate_size=3072),
    },
    "cpu": {  # the toy's (sdd.toy.ToySpec)
        "teacher": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=32, intermediate_size=384),
        "student": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, intermediate_size=192),
    },
}
VOCAB = {"cuda": (QWEN3_TOKENS, QWEN3_ROWS), "cpu": (1000, 1024)}


def stage_settings(device: str) -> dict:
    """One optimizer step per stage; small batches and lengths, the stages' own defaults otherwise."""
    completion = 64 if device == "cuda" else 32
    # A constant rate from the first step: a warm-up schedule would make the one step's learning rate 0.
    common = {"max_steps": 1, "logging_steps": 1, "save_steps": 1000, "learning_rate": 1e-4,
              "lr_scheduler_type": "constant", "warmup_steps": 0}
    rl = {**common, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": completion,
          "limit": 8}
    return {
        "sft": {**common, "per_device_train_batch_size": 8, "limit": 16, "max_length": 256},
        "teacher-rl": rl,
        "student-rl": rl,
        "warmup": {**common, "prompts": 12, "heldout_prompts": 4, "samples_per_prompt": 1,
                   "max_new_tokens": completion, "per_device_train_batch_size": 8},
        "distill": {**common, "per_device_train_batch_size": 8, "max_completion_length": completion, "limit": 8},
    }


def read_tensor(model_dir: Path, name: str):
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"][name] if index.is_file() else "model.safetensors"
    with safe_open(str(model_dir / file), framework="pt") as handle:
        return handle.get_tensor(name)


def build_run(run: Path, device: str) -> dict[str, Path]:
    """Data, tokenizer and random-weight bf16 models in a fresh run dir, all local."""
    import torch
    import yaml
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from sdd import toy
    from sdd.config import RUN_CONFIG_NAME
    from sdd.data import user_message
    from sdd.manifest import RunDir

    RunDir(run).create()
    task = toy.ToyTask(n_train=64, n_test=8)
    records = toy.make_split(task, "train")
    data = run / "check-train.jsonl"
    toy.write_jsonl(data, records)
    template = f"<|im_start|>user\n{user_message('x')[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    tokens, rows = VOCAB[device]
    tokenizer = build_tokenizer(tokens, [template] * 50 + [r["problem"] + "\n" + r["solution"] for r in records])
    assert len(tokenizer) == tokens, (len(tokenizer), tokens)
    paths = {"data": data}
    for seed, role in enumerate(("teacher", "student")):
        config = Qwen3Config(**SHAPES[device][role], vocab_size=rows, tie_word_embeddings=True,
                             max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
        torch.manual_seed(seed)
        with torch.device("cuda" if device == "cuda" else "cpu"):
            model = Qwen3ForCausalLM(config)
        model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                                   pad_token_id=tokenizer.pad_token_id, do_sample=True)
        path = run / f"{role}-base"
        model.to(torch.bfloat16).save_pretrained(path)  # real checkpoints are bf16 on disk
        tokenizer.save_pretrained(path)
        paths[role] = path
        del model
    (run / RUN_CONFIG_NAME).write_text(yaml.safe_dump(stage_settings(device)))
    return paths


def run_stages(device: str, out: Path) -> None:
    import torch

    from sdd.cli import run_in_process
    from sdd.experiment.execute import OK
    from sdd.manifest import RunDir

    torch.set_num_threads(1 if device == "cpu" else torch.get_num_threads())
    root = Path(tempfile.mkdtemp(prefix="sdd-gpu-check-"))
    run = root / "run"
    start = time.time()
    paths = build_run(run, device)
    teacher, student, data = str(paths["teacher"]), str(paths["student"]), str(paths["data"])
    figures: dict = {"build_seconds": round(time.time() - start, 1),
                     "vocab_rows": VOCAB[device][1], "tokenizer_tokens": VOCAB[device][0],
                     "teacher_shape": SHAPES[device]["teacher"], "student_shape": SHAPES[device]["student"]}
    commands = {
        "sft": (["sft", "--role", "teacher", "--model", teacher], "sft-teacher", teacher),
        "teacher-rl": (["teacher-rl", "--model", teacher], "teacher-rl", teacher),
        "student-rl": (["student-rl", "--model", student], "student-rl", student),
        "warmup": (["warmup", "--teacher", teacher, "--student", student], "warmup", student),
        "distill": (["distill", "--teacher", teacher, "--student", student], "distill", student),
    }
    for stage, (argv, name, start_model) in commands.items():
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        began = time.time()
        outcome, message = run_in_process([*argv, "--run", str(run), "--dataset", data])
        record = RunDir(run).stage(name) or {}
        log = run / name / "log.jsonl"
        entries = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        losses = [e["loss"] for e in entries if isinstance(e.get("loss"), (int, float))]
        steps = (record.get("metrics") or {}).get("steps")
        row = {"outcome": outcome, "message": message, "status": record.get("status"), "steps": steps,
               "losses": losses, "seconds": round(time.time() - began, 1), "log_keys": sorted({k for e in entries for k in e})}
        final = run / name / "final"
        if final.is_dir():
            before, after = read_tensor(Path(start_model), PROBE).float(), read_tensor(final, PROBE).float()
            row["probe_changed_fraction"] = (before != after).float().mean().item()
            row["final_dtype"] = str(read_tensor(final, PROBE).dtype)
        if device == "cuda":
            row["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        row["ok"] = (outcome == OK and row["status"] == "done" and bool(steps) and steps >= 1 and bool(losses)
                     and all(math.isfinite(x) for x in losses))
        figures[stage] = row
        print(f"{stage}: {outcome} {message} steps={steps} losses={losses} ({row['seconds']} s)", flush=True)
    out.write_text(json.dumps(figures, indent=1))
    import shutil

    shutil.rmtree(root, ignore_errors=True)  # models of several GB on a GPU machine; the figures are in the JSON


# -- main --------------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    import torch

    versions = {}
    for module in ("torch", "transformers", "trl", "accelerate", "datasets", "deepspeed", "vllm"):
        try:
            versions[module] = importlib.import_module(module).__version__
        except Exception:  # noqa: BLE001 - absent or broken: recorded as such
            versions[module] = None
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(), "cpu": platform.processor(),
            "cpus": os.cpu_count(), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "versions": versions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--out", default="gpu-check.json", help="the one JSON with every figure")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--budget-s", type=float, default=570.0, help="stop starting parts after this many seconds")
    parser.add_argument("--force-wheels", action="store_true", help="install .whl/ even if everything imports")
    parser.add_argument("--stages-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    dependencies = ensure_dependencies(force=args.force_wheels and not args.stages_only)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device; use --device cpu")
    if args.stages_only:
        run_stages(device, Path(args.out))
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    started = time.time()
    deadline = started + args.budget_s
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "environment": environment(device),
              "dependencies": dependencies, "device_mode": device, "parts": {}}
    with tempfile.TemporaryDirectory(prefix="sdd-gpu-check-out-") as tmp:
        for part in parts:
            if time.time() > deadline:
                report["parts"][part] = {"ok": False, "summary": f"not started: past the {args.budget_s:.0f} s budget"}
                continue
            print(f"== {part}", flush=True)
            result = run_part(part, device, Path(tmp), deadline + 30)
            report["parts"][part] = result
            print(f"   {'ok' if result['ok'] else 'FAILED'} ({result['seconds']} s): {result['summary']}", flush=True)
            if not result["ok"] and "output_tail" in result:
                print(result["output_tail"][-1500:], flush=True)
    report["seconds"] = round(time.time() - started, 1)
    report["ok"] = all(p["ok"] for p in report["parts"].values())
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"{'PASSED' if report['ok'] else 'FAILED'} in {report['seconds']} s; figures in {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
