"""`sdd teacher-rl`: spend the sparse, verifiable reward on the strongest model there is."""

from __future__ import annotations

from sdd.stages import common, rl


def run(args: common.StageArgs) -> dict:
    # Start from the supervised teacher when there is one: "newest teacher" could be an SFT control.
    return rl.run(args, stage="teacher-rl", role="teacher", prefer=("sft-teacher",))
