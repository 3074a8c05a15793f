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
    """Two chains from the same bootstrapped models: full-parameter teacher-rl, and LoRA teacher-rl (r 8, alpha 16,
    q_proj and v_proj), each followed by warmup and distill from its final/, each student evaluated alike.

    The bootstrapped teacher is first trained further (160 SFT steps, as the student) so that GRPO sees groups
    with mixed rewards and both teachers really move. What is asserted is what LoRA guarantees (the trainable
    count, the merged weights moving only where LoRA sits, the chain completing from a merged final/); the
    accuracies are measured and printed beside each other, not asserted: at toy size they are noise-level.
    """
    import shutil

    sdd("sft", "--run", boot_run, "--role", "teacher", "--force", "--set", "max_steps=160",
        "--set", "per_device_train_batch_size=32", "--set", "limit=null", "--set", "learning_rate=3e-3",
        "--set", "save_steps=1000", "--set", "logging_steps=40")
    full_run = tmp_path / "full"
    shutil.copytree(boot_run, full_run)
    lora_run = boot_run
    rl = ["--set", "max_steps=12", "--set", "per_device_train_batch_size=32", "--set", "limit=96"]
    evals = ["--benchmark", "toy-test", "--samples", "4", "--limit", "64", "--seeds", "2"]
    results = {}
    for label, run, extra in (("full", full_run, []),
                              ("lora", lora_run, [*LORA, "--set", "lora_r=8", "--set", "lora_alpha=16"])):
        set_tiny(run)
        sdd("teacher-rl", "--run", run, *rl, *extra)
        sdd("eval", "--run", run, "--role", "teacher", *evals)
        sdd("warmup", "--run", run)
        sdd("distill", "--run", run)
        sdd("eval", "--run", run, "--role", "student", *evals)
        manifest = RunDir(run)
        teacher_rl, warmup, distill = (manifest.record(name) for name in ("teacher-rl", "warmup", "distill"))
        assert warmup.inputs["teacher"].from_stage == "teacher-rl" and distill.inputs["teacher"].from_stage == "teacher-rl"
        assert distill.inputs["student"].from_stage == "warmup"
        teacher_eval, student_eval = (manifest.record(f"eval-{stage}-toy-test") for stage in ("teacher-rl", "distill"))
        assert teacher_eval.done and student_eval.done
        results[label] = {
            "teacher avg@4": teacher_eval.metrics["avg@4"], "student avg@4": student_eval.metrics["avg@4"],
            "student std over seeds": student_eval.metrics["avg@4_std_seeds"],
            "teacher reward (last logs)": teacher_rl.metrics.get("reward"),
            "teacher trainable": teacher_rl.metrics["trainable_parameters"],
            "teacher parameters": teacher_rl.metrics["total_parameters"],
            "wall s (teacher-rl)": teacher_rl.metrics["wall_time_s"]}
    print("LORA_CHAIN", json.dumps(results))  # the numbers docs/guide.md reports
    teacher_base = lora_run / "sft-teacher" / "final"
    assert results["lora"]["teacher trainable"] == lora_count(teacher_base, r=8)
    assert results["full"]["teacher trainable"] == results["full"]["teacher parameters"]
    # the merged LoRA teacher moved, and only in the projections LoRA adapts
    before, after = weights(teacher_base), weights(lora_run / "teacher-rl" / "final")
    moved = {k for k in before if not (before[k] == after[k]).all()}
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved), sorted(moved)


def test_resuming_ignores_where_a_run_is_reported_or_pushed_but_not_lora(tmp_path):
    """run_group / push_to_hub / hub_model_id say where a run goes, not what it trains: a resume may change them."""
    from sdd.errors import SddError
    from sdd.stages.warmup import WarmupOptions
    from sdd.train.checkpoints import check_resumable

    inputs = {"student": {"path": "s", "fingerprint": "sha256:1"}}
    check_resumable(tmp_path, inputs, {"sdd": WarmupOptions(use_peft=True)})
    (tmp_path / "checkpoint-1").mkdir()
    check_resumable(tmp_path, inputs, {"sdd": WarmupOptions(use_peft=True, run_group="exp2", push_to_hub=True,
                                                            hub_model_id="someone/x")})
    with pytest.raises(SddError, match="made from other options"):
        check_resumable(tmp_path, inputs, {"sdd": WarmupOptions(use_peft=True, lora_r=8)})
