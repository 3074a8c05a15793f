"""Config layers: every TRL field reachable, typos and wrong types refused by name."""

import dataclasses

import pytest

from sdd import config as cfg
from sdd.errors import SddError


@dataclasses.dataclass
class Options:
    model: str | None = None
    samples: int = 4
    benchmark: list[str] = dataclasses.field(default_factory=lambda: ["math500"])


@pytest.fixture(scope="module")
def grpo_config():
    from trl import GRPOConfig

    return GRPOConfig


def test_layers_later_wins_and_text_is_typed(grpo_config):
    options, trl = cfg.resolve(Options, grpo_config, [
        cfg.Layer("defaults", {"learning_rate": 1e-6, "samples": 2, "epsilon_high": 0.28}),
        cfg.Layer("recipe", {"learning_rate": 3e-6, "model": "m"}),
        cfg.Layer("--set", cfg.parse_sets([
            "learning_rate=1e-5", "bf16=false", "report_to=wandb", "benchmark=[aime24, aime25]", "max_steps=7",
            "epsilon_high=null",
        ]), from_text=True),
    ])
    assert options == Options(model="m", samples=2, benchmark=["aime24", "aime25"])
    assert trl == {"learning_rate": 1e-5, "bf16": False, "report_to": "wandb", "max_steps": 7, "epsilon_high": None}
    assert isinstance(trl["learning_rate"], float)


def test_unknown_key_names_it_and_suggests(grpo_config):
    with pytest.raises(SddError) as err:
        cfg.resolve(Options, grpo_config, [cfg.Layer("--set", cfg.parse_sets(["lerning_rate=1"]), from_text=True)])
    message = str(err.value)
    assert "lerning_rate" in message and "learning_rate" in message and "--set" in message
    assert "\n" not in message


def test_wrong_type_is_refused(grpo_config):
    with pytest.raises(SddError, match="max_steps.*expected int"):
        cfg.resolve(Options, grpo_config, [cfg.Layer("--set", {"max_steps": "many"}, from_text=True)])
    with pytest.raises(SddError, match="samples"):
        cfg.resolve(Options, grpo_config, [cfg.Layer("recipe.yaml", {"samples": "four"})])
    with pytest.raises(SddError, match="key=value"):
        cfg.parse_sets(["learning_rate"])


def test_trl_validation_becomes_one_line(grpo_config):
    with pytest.raises(SddError, match="invalid GRPOConfig") as err:
        cfg.build_trl_config(grpo_config, {"output_dir": "/tmp/x", "bf16": False, "use_cpu": True,
                                           "num_generations": 3, "per_device_train_batch_size": 4})
    assert "\n" not in str(err.value)


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "recipe.yaml"
    bad.write_text("learning_rate: 1e-5\n  oops: [\n")
    with pytest.raises(SddError, match="recipe.yaml line"):
        cfg.load_yaml(bad)
    with pytest.raises(SddError, match="does not exist"):
        cfg.load_yaml(tmp_path / "missing.yaml")


# -- the authors' optimizer and length settings (issue 13) --------------------------------------------
def stage_args(tmp_path, **sets):
    from sdd.stages.common import StageArgs

    return StageArgs(run=str(tmp_path / "run"), sets=[f"{k}={v}" for k, v in sets.items()])


def lr_over_training(trl_config, steps: int = 100) -> list[float]:
    """The learning rate at every step under the config's own schedule (transformers' scheduler)."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=trl_config.learning_rate)
    scheduler = get_scheduler(trl_config.lr_scheduler_type, optimizer,
                              num_warmup_steps=trl_config.get_warmup_steps(steps), num_training_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("stage", ["teacher-rl", "student-rl", "distill"])
def test_rl_and_distill_learning_rate_stays_constant(tmp_path, stage):
    """The authors train GRPO and OPD at a constant 1e-6 with no warmup and weight decay 0.1; transformers'
    default would decay it linearly to 0."""
    from sdd.stages import distill, rl

    _, _, trl = distill.configure(stage_args(tmp_path)) if stage == "distill" else rl.configure(stage_args(tmp_path), stage)
    assert lr_over_training(trl) == [1e-6] * 100
    assert trl.weight_decay == 0.1 and trl.max_grad_norm == 1.0
    assert not (tmp_path / "run").exists()


def test_grpo_rollout_batch_feeds_four_updates(tmp_path):
    """512 prompts x 8 per rollout batch in 4 mini-batches: TRL counts steps_per_generation in micro-steps."""
    from sdd.stages import rl

    _, options, trl = rl.configure(stage_args(tmp_path, gradient_accumulation_steps=32, per_device_train_batch_size=4),
                                   "teacher-rl")
    assert options.updates_per_rollout == 4 and trl.steps_per_generation == 128 and trl.num_iterations == 1
    assert trl.generation_batch_size == 4 * trl.per_device_train_batch_size * trl.gradient_accumulation_steps
    assert (trl.epsilon, trl.epsilon_high, trl.delta, trl.beta) == (0.2, 0.28, 10.0, 0.0)
    _, _, own = rl.configure(stage_args(tmp_path, steps_per_generation=5), "teacher-rl")
    assert own.steps_per_generation == 5  # a layer that sets TRL's own field wins
    with pytest.raises(SddError, match="updates_per_rollout must be a positive integer"):
        rl.configure(stage_args(tmp_path, updates_per_rollout=0), "teacher-rl")


def test_warmup_max_length_follows_the_generation_limits(tmp_path):
    """Teacher samples up to max_new_tokens after a prompt up to max_prompt_length are never cut: TRL's
    SFTConfig.max_length (1024 by default) is derived from them, and a smaller one is refused."""
    from sdd.stages import warmup

    _, options, trl = warmup.configure(stage_args(tmp_path))
    assert trl.max_length == options.max_prompt_length + options.max_new_tokens == 2048 + 4096
    _, _, trl = warmup.configure(stage_args(tmp_path, max_new_tokens=8192, max_prompt_length=1024))
    assert trl.max_length == 9216
    _, _, trl = warmup.configure(stage_args(tmp_path, max_length="null"))
    assert trl.max_length is None  # explicitly unlimited
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "sdd", "warmup", "--run", str(tmp_path / "run"), "--set", "max_length=1024",
                          "--print-config"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "max_length 1024 would cut teacher samples" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()
