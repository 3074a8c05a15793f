"""`sdd student-rl`: GRPO on the student, after the bridge or (the direct-GRPO control) instead of it."""

from __future__ import annotations

from sdd.stages import common, rl


def run(args: common.StageArgs) -> dict:
    # After the bridge the student to improve is the distilled one, else the warmed-up one, else the base.
    return rl.run(args, stage="student-rl", role="student", prefer=("distill", "warmup"))
