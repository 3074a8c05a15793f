"""GRPO rewards by name (sdd/rewards.py): the registry, its one-line error, and a second reward reaching TRL."""

import json
import re

import pytest
import yaml
from conftest import sdd
from test_stages import own_answer_dataset

from sdd import rewards
from sdd.errors import SddError


def boxed_format_factory():
    """A second reward, defined here: 1 when the completion has a \\boxed{...} answer at all."""

    def boxed_format(prompts, completions, **kwargs):
        return [1.0 if re.search(r"\\boxed\{", c if isinstance(c, str) else c[-1]["content"]) else 0.0
                for c in completions]

    return boxed_format


def test_registry_resolves_names_in_order():
    rewards.register("boxed_format", boxed_format_factory)
    funcs = rewards.get_reward_funcs(["boxed_format", "math_verify"])
    assert [f.__name__ for f in funcs] == ["boxed_format", "math_verify_reward"]
    assert funcs[1]([""], ["so \\boxed{4}"], ["4"]) == [1.0]


def test_unknown_reward_is_one_line_listing_the_registered_names():
    with pytest.raises(SddError) as caught:
        rewards.get_reward_funcs(["math_verify", "nope"])
    message = str(caught.value)
    assert "\n" not in message and "'nope'" in message and "math_verify" in message


def test_unknown_reward_in_a_recipe_exits_2(toy_run):
    from conftest import sdd_process

    config = yaml.safe_load((toy_run / "config.yaml").read_text())
    config.setdefault("teacher-rl", {})["rewards"] = ["nope"]
    (toy_run / "config.yaml").write_text(yaml.safe_dump(config))
    result = sdd_process("teacher-rl", "--run", toy_run)
    assert result.returncode == 2, result.stderr
    assert "nope" in result.stderr and "math_verify" in result.stderr and "Traceback" not in result.stderr


def test_second_reward_reaches_trl(boot_run):
    rewards.register("boxed_format", boxed_format_factory)
    config = yaml.safe_load((boot_run / "config.yaml").read_text())
    config["teacher-rl"].update({"rewards": ["math_verify", "boxed_format"], "max_steps": 1, "logging_steps": 1,
                                 "updates_per_rollout": 1})
    (boot_run / "config.yaml").write_text(yaml.safe_dump(config))
    model = boot_run / "sft-student" / "final"
    sdd("teacher-rl", "--run", boot_run, "--model", model, "--dataset", own_answer_dataset(boot_run, model))
    logged = [json.loads(line) for line in (boot_run / "teacher-rl" / "log.jsonl").read_text().splitlines()]
    keys = set().union(*logged)
    assert "rewards/math_verify_reward/mean" in keys and "rewards/boxed_format/mean" in keys, keys
