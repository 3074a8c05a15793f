"""LoRA through TRL's own `peft_config`, with `final/` holding merged weights every later stage loads.

The options are TRL's `ModelConfig` fields (`use_peft`, `lora_r`, `lora_alpha`, ...), turned into a
`peft_config` by `trl.get_peft_config` and handed to the trainer. What is checked really happened:
the trainable parameters are exactly the LoRA matrices (their count computed here from the model's
shapes), the merged `final/` differs from the start only in the targeted projections, and a chain
(LoRA teacher-rl, then warmup and distill from its merged `final/`) trains and evaluates like the
full-parameter chain, whose numbers are reported beside it.
"""

import json

import pytest
from conftest import sdd, set_tiny, weights

from sdd.cli import run_in_process
from sdd.experiment.execute import FAILED
from sdd.manifest import RunDir


def lora_count(model_dir, r: int, targets=("q_proj", "v_proj")) -> int:
    """Trainable elements of LoRA on `targets`: r x (in + out) per targeted linear layer."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    shapes = {"q_proj": (hidden, config["num_attention_heads"] * head_dim),
              "k_proj": (hidden, config["num_key_value_heads"] * head_dim),
              "v_proj": (hidden, config["num_key_value_heads"] * head_dim)}
    return config["num_hidden_layers"] * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


LORA = ["--set", "use_peft=true", "--set", "lora_r=4", "--set", "lora_alpha=8", "--set", "lora_dropout=0.0"]


def test_lora_sft_trains_only_the_adapter_and_saves_merged_weights(toy_run):
    set_tiny(toy_run, sft={"learning_rate": 3e-2})
    sdd("sft", "--run", toy_run, "--role", "student", *LORA)
    record = RunDir(toy_run).record("sft-student")
    base_dir, final = toy_run / "toy" / "student-base", toy_run / "sft-student" / "final"
    assert record.metrics["trainable_parameters"] == lora_count(base_dir, r=4)
    assert record.metrics["trainable_parameters"] < record.metrics["total_parameters"] / 10
    assert record.config["sdd"]["use_peft"] is True and record.config["sdd"]["lora_r"] == 4
    assert (final / "model.safetensors").is_file() and not (final / "adapter_config.json").exists()
    before, after = weights(base_dir), weights(final)
    assert set(before) == set(after)  # plain names: the merged model loads like any checkpoint
    moved = {k for k in before if not (before[k] == after[k]).all()}
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved), sorted(moved)
    assert (final / "README.md").is_file()


def test_adapter_only_keeps_the_adapter_and_later_stages_say_so(toy_run):
    set_tiny(toy_run)
    sdd("sft", "--run", toy_run, "--role", "student", *LORA, "--set", "adapter_only=true")
    final = toy_run / "sft-student" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()
    outcome, message = run_in_process(["eval", "--run", str(toy_run), "--role", "student", "--benchmark", "toy-test",
                                       "--samples", "1", "--limit", "4"])
    assert outcome == FAILED and "LoRA adapter only" in message and "adapter_only" in message, message


@pytest.mark.slow
def test_lora_teacher_rl_then_warmup_and_distill_from_its_merged_final(boot_run, tmp_path):
    """Two chains from the same bootstrapped models: full-parameter teacher-rl, and LoRA teacher-rl."""
    import shutil

    full_run = tmp_path / "full"
    shutil.copytree(boot_run, full_run)
    lora_run = boot_run
    eval_args = ["--role", "student", "--benchmark", "toy-test", "--samples", "4", "--limit", "64", "--seeds", "2"]
    results = {}
    for label, run, extra in (("full", full_run, []), ("lora", lora_run, [*LORA, "--set", "lora_r=8",
                                                                         "--set", "lora_alpha=16"])):
        set_tiny(run)
        sdd("teacher-rl", "--run", run, *extra)
        sdd("warmup", "--run", run)
        sdd("distill", "--run", run)
        sdd("eval", "--run", run, *eval_args)
        manifest = RunDir(run)
        rl, warmup, distill = (manifest.record(name) for name in ("teacher-rl", "warmup", "distill"))
        assert warmup.inputs["teacher"].from_stage == "teacher-rl" and distill.inputs["student"].from_stage == "warmup"
        evaluated = manifest.record("eval-distill-toy-test")
        assert evaluated.done
        results[label] = {"avg@4": evaluated.metrics["avg@4"], "std_seeds": evaluated.metrics["avg@4_std_seeds"],
                          "teacher_trainable": rl.metrics["trainable_parameters"],
                          "teacher_parameters": rl.metrics["total_parameters"], "teacher_reward": rl.metrics.get("reward")}
    teacher_base = lora_run / "sft-teacher" / "final"
    assert results["lora"]["teacher_trainable"] == lora_count(teacher_base, r=8)
    assert results["full"]["teacher_trainable"] == results["full"]["teacher_parameters"]
    # the LoRA teacher's merged weights moved only in the targeted projections
    before, after = weights(teacher_base), weights(lora_run / "teacher-rl" / "final")
    moved = {k for k in before if not (before[k] == after[k]).all()}
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved)
    print("LORA_CHAIN", json.dumps(results))  # the numbers docs/guide.md reports
