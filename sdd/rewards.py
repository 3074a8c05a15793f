"""GRPO rewards by name: the one place a second reward goes.

A recipe picks rewards with the RL option `rewards: [name, ...]` (default `["math_verify"]`);
weights, if any, are TRL's own `reward_weights` field. Each entry here is a factory returning a
TRL reward function (`fn(prompts, completions, **dataset_columns) -> list[float]`). TRL calls
sync reward functions in the main thread; keep them sync: math_verify's signal-based time
bounds crash on the worker thread TRL uses for async ones (../shared/FINDINGS.md).

To add a reward: write a factory and `register("name", factory)` (or add it to REGISTRY below).
"""
from __future__ import annotations

import json
from collections.abc import Callable

from sdd.errors import SddError


def math_verify_factory() -> Callable:
    """The verifier as a TRL reward, also logging how many prompt groups had any correct rollout."""
    from sdd.verify import math_reward

    def math_verify_reward(prompts, completions, answer, log_metric=None, **kwargs):
        rewards = math_reward(prompts, completions, answer, **kwargs)
        if log_metric is not None:
            groups: dict[str, list[float]] = {}
            for prompt, reward in zip(prompts, rewards, strict=True):
                groups.setdefault(prompt if isinstance(prompt, str) else json.dumps(prompt), []).append(reward)
            log_metric("solve_rate/any_in_group", sum(max(g) > 0 for g in groups.values()) / len(groups))
        return rewards

    return math_verify_reward


REGISTRY: dict[str, Callable[[], Callable]] = {"math_verify": math_verify_factory}


def register(name: str, factory: Callable[[], Callable]) -> None:
    """Make `factory` (returning a TRL reward function) available to recipes as `name`."""
    REGISTRY[name] = factory


def get_reward_funcs(names: list[str]) -> list[Callable]:
    """The TRL reward functions for `names`, in order; an unknown name is one SddError line."""
    unknown = [n for n in names if n not in REGISTRY]
    if unknown or not names:
        raise SddError(f"unknown reward(s) {unknown or names!r} in `rewards`; registered: {', '.join(sorted(REGISTRY))}")
    return [REGISTRY[n]() for n in names]
