"""Experiment trackers (wandb, trackio): one named run per training job, grouped by experiment.

TRL's trainers report through transformers' integrations when `report_to` names a tracker, and
name the run after `run_name` (by default the output folder, so an experiment's 57 jobs land as 57
paths). `sdd run` gives every training job the run name `<variant>/seed<k>/<stage>` (stages shared
by the variants: `shared/<stage>`, or `shared/seed<k>/<stage>` with `seed_scope: chain`), its run dir
under the experiment root and its stage, through TRL's own `run_name`; and the group `run_group`, the
experiment (its root folder's name). A stage run by hand is named `<run dir>/<stage>`.

TrainingArguments has no group field, so the group reaches each tracker its own way: wandb reads
`WANDB_RUN_GROUP` when the integration calls `wandb.init`; trackio's integration opens the run
without a group, so a callback placed after it sets the group of that run before its first log
(trackio writes a run's config, `_Group` included, with the first metrics).
"""

from __future__ import annotations

import os

WANDB_GROUP_ENV = "WANDB_RUN_GROUP"


def job_run_name(root_relative_run_dir: str, stage: str) -> str:
    """`<variant>/seed<k>/<stage>` for a variant's run dir, `shared/<stage>` for the shared one."""
    return f"{root_relative_run_dir.strip('/')}/{stage}" if root_relative_run_dir not in ("", ".") else stage


def reports_to(report_to, tracker: str) -> bool:
    """Whether TrainingArguments.report_to (a name, a list, "all" or "none") includes `tracker`."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return tracker in names or "all" in names


def group_callbacks(group: str | None, report_to) -> list:
    """What makes the run of this job part of `group` in the trackers `report_to` names (none without a group)."""
    if not group:
        return []
    if reports_to(report_to, "wandb"):
        os.environ[WANDB_GROUP_ENV] = group  # this process's jobs are all of one experiment
    if not reports_to(report_to, "trackio"):
        return []
    from transformers import TrainerCallback

    class TrackioGroup(TrainerCallback):
        """Sets the group of the trackio run transformers' TrackioCallback opened (it runs first: a default callback)."""

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            from trackio import context_vars

            run = context_vars.current_run.get()
            if run is not None:
                run.group = group
                run.config["_Group"] = group

    return [TrackioGroup()]
