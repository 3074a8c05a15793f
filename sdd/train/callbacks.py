"""The TrainerCallbacks every training stage adds, and the Trainer's own ones it removes.

Stop at a step boundary on a signal (every rank at the same step), append the training curves to
`log.jsonl` (each step once across resumes), show one progress line with the stage's headline metrics,
and, at train begin, report what the engine did to the model.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from sdd.errors import SddError
from sdd.manifest import atomic_write_text
from sdd.train.distributed import any_rank
from sdd.train.engines import engine_report


def make_callbacks(flag, stage_dir: Path, label: str, headline: tuple[str, ...]) -> list[TrainerCallback]:
    """TrainerCallbacks: stop on preemption (agreed across ranks), log history to disk, show progress.

    `flag` is the stage's PreemptionFlag (sdd.train.lifecycle); `headline` names the logged metrics shown.
    """
    return [StopOnSignal(flag), LogToDisk(stage_dir), Progress(label, headline)]


class StopOnSignal(TrainerCallback):
    """A signal asks for a checkpoint at the next step boundary, and every rank stops at the same step."""

    def __init__(self, flag) -> None:
        self.flag = flag

    def on_step_end(self, args, state, control, **kwargs):
        flag = self.flag
        if any_rank(flag.requested is not None):  # every rank must stop at the same step or the collectives hang
            flag.requested = flag.requested or "SIGTERM (another rank)"
            control.should_save = True
            control.should_training_stop = True
        return control


class LogToDisk(TrainerCallback):
    """log.jsonl in the stage dir: the training curves `sdd report` plots, appended across resumes."""

    def __init__(self, stage_dir: Path) -> None:
        self.stage_dir = stage_dir

    def on_train_begin(self, args, state, control, **kwargs):
        # A kill (SIGKILL, node loss) after the last checkpoint leaves log lines for steps the resumed run
        # trains again; drop them so every step appears once in the curves.
        path = self.stage_dir / "log.jsonl"
        if not state.is_world_process_zero or not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if _logged_step(line) <= state.global_step]
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.stage_dir / "log.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class Progress(TrainerCallback):
    """The stage's progress on rank 0: a bar on a terminal, plain lines in a log (sdd.progress)."""

    def __init__(self, label: str, headline: tuple[str, ...]) -> None:
        self.label = label
        self.headline = headline
        self.progress = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from sdd.progress import StageProgress

            self.progress = StageProgress(self.label, state.max_steps, completed=state.global_step,
                                          headline=("loss", *self.headline)).start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress and not control.should_log:  # else on_log shows this step, with its metrics
            self.progress.update(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress and logs:
            self.progress.log(logs)
            self.progress.update(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.stop()
            self.progress = None


class EngineCheck(TrainerCallback):
    """At train begin, once the engine has wrapped the model: one line per rank saying what it holds,
    the report kept for the manifest (`stage.engine`), and a loud failure where FSDP was asked for and
    nothing is a DTensor."""

    def __init__(self, trainer, stage) -> None:
        self.trainer = trainer
        self.stage = stage

    def on_train_begin(self, args, state, control, **kwargs):
        trainer, stage = self.trainer, self.stage
        report = engine_report(trainer)
        stage.engine = report
        print(f"sdd engine: rank {report['rank']}/{report['processes']} {report['distributed_type']} "
              f"zero3_partitioned={report['zero3_partitioned']} dtensor={report['dtensor']} "
              f"params={report['parameters']} local_elements={report['local_elements']} "
              f"full_elements={report['full_elements']} master_dtype={report['master_dtype']}", flush=True)
        if trainer.is_fsdp_enabled and report["processes"] > 1 and not report["dtensor"]:
            raise SddError("FSDP is enabled but no parameter is sharded (no DTensor after prepare); "
                           "use an FSDP2 config (fsdp_version: 2) or DeepSpeed ZeRO-3")


def quiet_trainer(trainer) -> None:
    """Our progress bar replaces transformers' tqdm bar and its printed log dicts."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)


def summarize_logs(log_history: list[dict], keys: dict[str, str], last: int = 5) -> dict[str, float]:
    """Mean of the last few logged values per metric: one step's value is too noisy to record."""
    out: dict[str, float] = {}
    for name, key in keys.items():
        values = [entry[key] for entry in log_history if isinstance(entry.get(key), (int, float))]
        if values:
            tail = values[-last:]
            out[name] = float(sum(tail) / len(tail))
    return out


def _logged_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, TypeError, AttributeError):
        return 1 << 62  # a line torn by a kill: drop it
