"""Progress of a stage that a person can follow wherever its output goes.

On a terminal it is one rich bar. In a log file (a Slurm job, `nohup`, a pipe) a bar is drawn
only when it ends, so a reader of `tail -f` would see nothing for the whole stage; there it is
instead one plain, flushed line every N steps or S seconds, whichever comes first:

    sft-teacher: step 120/350 (34%)  loss 0.412  mean_token_accuracy 0.71  elapsed 1m05s  eta 2m05s

N defaults to a twentieth of the total (SDD_PROGRESS_STEPS overrides it), S to 60
(SDD_PROGRESS_SECONDS). The ETA is the rate of this process's own steps, so a resumed stage
does not count the steps an earlier run did as instant.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable
from typing import TextIO


def duration(seconds: float) -> str:
    """`1h02m`, `3m05s`, `42s`: short enough for a log line, exact enough to plan around."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def plain_line(label: str, unit: str, completed: int, total: int | None, metrics: dict[str, float],
               elapsed: float, eta: float | None) -> str:
    """The line a log gets; one function so its format is tested where it is made."""
    count = f"{unit} {completed}/{total}" if total else f"{unit} {completed}"
    if total:
        count += f" ({100 * completed // total}%)"
    parts = [f"{label}: {count}"]
    parts += [f"{name} {value:.4g}" for name, value in metrics.items()]
    parts.append(f"elapsed {duration(elapsed)}")
    if eta is not None:
        parts.append(f"eta {duration(eta)}")
    return "  ".join(parts)


class StageProgress:
    """Progress over `total` units (training steps, sampled completions) with the stage's headline metrics.

    `headline` names the logged keys worth showing (`loss`, `rewards/accuracy/mean`, ...); they are
    shown by their last path component. `completed` is where a resumed run starts.
    """

    def __init__(self, label: str, total: int | None, *, unit: str = "step", completed: int = 0,
                 headline: Iterable[str] = (), every_steps: int | None = None, every_s: float | None = None,
                 stream: TextIO | None = None, plain: bool | None = None, transient: bool = False) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.completed = self.start_at = completed
        self.headline = tuple(dict.fromkeys(headline))
        self.transient = transient
        self.metrics: dict[str, float] = {}
        self.stream = stream or sys.stdout
        self.plain = (not _is_terminal(self.stream)) if plain is None else plain
        steps = every_steps or _env_int("SDD_PROGRESS_STEPS") or max(1, math.ceil((total or 20) / 20))
        self.every_steps = steps
        self.every_s = every_s if every_s is not None else float(os.environ.get("SDD_PROGRESS_SECONDS") or 60)
        self.started = self.printed_at = time.monotonic()
        self.printed_step = completed
        self.bar = None
        self.task = None

    def __enter__(self) -> StageProgress:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> StageProgress:
        self.started = self.printed_at = time.monotonic()
        if not self.plain:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[metrics]}"), console=Console(file=self.stream), transient=self.transient,
            )
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=self.total, completed=self.completed, metrics="")
        return self

    def advance(self, units: int) -> None:
        self.update(self.completed + units)

    def update(self, completed: int) -> None:
        self.completed = completed
        if self.bar is not None:
            self.bar.update(self.task, completed=completed)
            return
        now = time.monotonic()
        if completed - self.printed_step >= self.every_steps or (completed > self.printed_step
                                                                 and now - self.printed_at >= self.every_s):
            self._print(now)

    def log(self, logs: dict) -> None:
        """A trainer's logged values: keep the headline ones for the next line (or the bar, now)."""
        for key in self.headline:
            value = logs.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.metrics[key.split("/")[-1]] = float(value)
        if self.bar is not None:
            text = "  ".join(f"{name} {value:.3g}" for name, value in self.metrics.items())
            self.bar.update(self.task, metrics=text)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        elif self.completed != self.printed_step:
            self._print(time.monotonic())  # the last line says where the stage ended

    def eta(self, now: float) -> float | None:
        done = self.completed - self.start_at
        if not self.total or done <= 0:
            return None
        return (now - self.started) / done * max(0, self.total - self.completed)

    def _print(self, now: float) -> None:
        line = plain_line(self.label, self.unit, self.completed, self.total, self.metrics, now - self.started,
                          self.eta(now))
        print(line, file=self.stream, flush=True)
        self.printed_at, self.printed_step = now, self.completed


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None
