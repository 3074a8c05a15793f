"""Errors a user can fix, a stage's two non-error outcomes, and the exit codes they map to.

Anything raised as `SddError` reaches the terminal as one line and exit code 2; anything else is
a bug in sdd and keeps its traceback. `Interrupted` and `StageSkipped` are outcomes, not errors:
the CLI maps them to `EXIT_INTERRUPTED` and 0. This module imports nothing, so the CLI, `sdd run`
and the stages can all share these types without importing one another.
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
# Exit status of a stage stopped by SIGTERM/SIGINT after saving a checkpoint: EX_TEMPFAIL, "try
# again". Slurm scripts requeue on it; rerunning the same command resumes.
EXIT_INTERRUPTED = 75
EXIT_ABORTED = 130  # Ctrl-C outside a stage's safe points (128 + SIGINT)


class SddError(Exception):
    """Bad input or state the user can fix; the message says what to do."""

    exit_code = EXIT_BAD_INPUT


class Interrupted(Exception):
    """The stage stopped on a signal at a safe point (a step or chunk boundary); what it finished is saved."""


class StageSkipped(Exception):
    """The stage is already done; rerun with --force to redo it."""
