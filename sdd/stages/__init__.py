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


def quiet_libraries() -> None:
    """What every sdd command sets before a library loads: no progress bars or advisory notices from the HF
    libraries, and no deprecation notices from inside transformers/TRL (theirs to fix; they only bury sdd's
    own output). The CLI sets it at import, `sdd run`'s in-process jobs in their worker."""
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|accelerate)\.")
