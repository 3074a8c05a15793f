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
