"""The open-r1-style scripts in examples/scripts at toy size: sdd's trainers built from TRL configs, no run dir.

Each script runs as a user would run it (a child process, TRL's argument parser), on the toy's base
models and its training file, for two optimizer steps. Checked: the script trained (the student's
saved weights differ from where they started; LoRA's B matrices, zero at the start, are not), and its
loss was sdd's (the KL metric the trainer logs). About 20 s each on 2 CPU cores.
"""

import os
import subprocess
import sys
from pathlib import Path

from conftest import weights

REPO = Path(__file__).resolve().parents[1]
TOY_ARGS = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none", "--use_cpu", "true",
            "--save_strategy", "no", "--logging_steps", "1", "--dataset_train_split", "train[:16]"]


def run_script(name: str, toy: Path, out: Path, *extra: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    ran = subprocess.run([sys.executable, str(REPO / "examples" / "scripts" / name),
                          "--model_name_or_path", str(toy / "student-base"),
                          "--teacher_model_name_or_path", str(toy / "teacher-base"),
                          "--dataset_name", str(toy / "data" / "train.jsonl"), "--output_dir", str(out),
                          *TOY_ARGS, *extra], capture_output=True, text=True, timeout=600, env=env, cwd=out.parent)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    return ran.stdout + ran.stderr


def test_forward_kl_script_trains_the_student(toy_template, tmp_path):
    toy = toy_template / "toy"
    log = run_script("forward_kl.py", toy, tmp_path / "forward-kl", "--dataset_completion_column", "solution")
    assert "'forward_kl'" in log  # ForwardKLTrainer's loss, not cross-entropy
    before, after = weights(toy / "student-base"), weights(tmp_path / "forward-kl")
    assert any(not (before[k] == after[k]).all() for k in before)


def test_distill_script_trains_a_lora_student_on_its_own_samples(toy_template, tmp_path):
    from safetensors.torch import load_file

    toy = toy_template / "toy"
    log = run_script("distill.py", toy, tmp_path / "distill", "--max_completion_length", "24",
                     "--use_peft", "--lora_r", "4", "--learning_rate", "1e-3")
    assert "'reverse_kl'" in log  # OnPolicyDistiller's loss
    adapter = load_file(str(tmp_path / "distill" / "adapter_model.safetensors"))
    lora_b = [tensor for key, tensor in adapter.items() if "lora_B" in key]
    assert lora_b and any(bool(t.abs().sum() > 0) for t in lora_b)  # PEFT starts B at zero: it moved
