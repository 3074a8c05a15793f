"""One module per `sdd` subcommand, named after it: `sdd teacher-rl` is `sdd.stages.teacher_rl`.

The training stages and eval each take a `StageArgs` in `run(args)`; the CLI and `sdd run`'s
in-process jobs both call that function.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def module(command: str) -> ModuleType:
    """The module of the subcommand `command` (`teacher-rl` -> `sdd.stages.teacher_rl`)."""
    return importlib.import_module(f"{__name__}.{command.replace('-', '_')}")
