"""The model card of a checkpoint, written from the manifest, and pushing a checkpoint with it to the hub.

A checkpoint on the hub is only as useful as what is said about it: which stages made it, from which
models and data, with which options, and how it scores. All of that is already in the manifests
(the stage's record, the records of the stages its inputs came from, and the eval records whose
model input has its fingerprint), so the card is derived from them and never edited by hand: it is
`README.md` in the checkpoint folder, rewritten whenever the manifest has more to say (a stage
finishing, an eval of it). The content fingerprint of a checkpoint leaves its card out
(`sdd.manifest.fingerprint`), so rewriting it does not make the checkpoint "changed".
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sdd.errors import SddError
from sdd.manifest import CARD_NAME, RecordedCheckpoint, RunDir, StageRecord, atomic_write_text

# What each stage kind does, in the words of the card.
KINDS = {
    "sft": "supervised fine-tuning on worked solutions (TRL SFTTrainer)",
    "teacher-rl": "GRPO on the teacher with a math verifier as reward (TRL GRPOTrainer)",
    "student-rl": "GRPO on the student with a math verifier as reward (TRL GRPOTrainer)",
    "warmup": "off-policy bridge: full-vocabulary forward KL to the teacher on its samples (TRL SFTTrainer + sdd loss)",
    "distill": "on-policy distillation: per-token reverse KL to the teacher on the student's samples "
               "(TRL DistillationTrainer + sdd loss)",
    "toy-init": "sdd's toy models (random initialisation)",
}
# Training metrics worth a column, in order; a stage shows those it has.
HEADLINE_METRICS = ("reward", "reverse_kl", "forward_kl", "heldout_forward_kl_after", "loss")


@dataclasses.dataclass(frozen=True)
class Step:
    """A stage in the making of a checkpoint: where its record lives, and the record."""

    run: Path
    name: str
    record: StageRecord

    @property
    def label(self) -> str:
        return f"{self.run.name}/{self.name}"


def lineage(run: RunDir, stage: str) -> list[Step]:
    """`stage` and every stage whose checkpoint went into it, followed through the manifests, oldest first.

    Inputs are followed by the stage and run dir they record (`RunDir.follow`, which checks the
    fingerprint), so a teacher from a shared run dir is part of a variant's student lineage.
    """
    found: dict[tuple[Path, str], Step] = {}
    pending = [(run, stage)]
    while pending:
        where, name = pending.pop()
        key = (where.path.resolve(), name)
        if key in found:
            continue
        record = where.record(name)
        if record is None:
            continue
        found[key] = Step(key[0], name, record)
        for input_key, entry in record.inputs.items():
            if input_key == "dataset":
                continue
            source = where.follow(entry, role=input_key if input_key in ("teacher", "student") else None)
            if source is not None:
                pending.append((RunDir(source.run), source.stage))
    return sorted(found.values(), key=lambda step: (step.record.ended_at or "", step.name))


def evaluations(checkpoint: RecordedCheckpoint) -> list[StageRecord]:
    """Finished eval records of `checkpoint` in its run dir: their model input has its fingerprint."""
    matches = []
    for record in RunDir(checkpoint.run).records().values():
        model = record.inputs.get("model")
        if record.stage != "eval" or not record.done or model is None:
            continue
        same = (model.fingerprint == checkpoint.fingerprint if checkpoint.fingerprint and model.fingerprint
                else model.from_stage == checkpoint.stage)
        if same:
            matches.append(record)
    return matches


def render(run: RunDir, stage: str) -> str:
    """The card of the main output of finished (or finishing) stage `stage` of `run`, as markdown."""
    record = run.record(stage)
    if record is None or not record.outputs:
        raise SddError(f"stage '{stage}' of {run.path} has no checkpoint to describe")
    steps = lineage(run, stage)
    role = record.main_output()[0]
    checkpoints = _checkpoints(steps)
    lines = [*_front_matter(steps, record), f"# {run.path.name}/{stage}", ""]
    lines += [f"The {role} checkpoint made by `sdd {record.stage}`, {KINDS.get(record.stage or '', record.stage)}. "
              f"It is the `final/` folder of stage `{stage}` in the sdd run directory `{run.path.name}`; this card is "
              "written from that run's manifest.", ""]
    lines += ["## How it was made", "",
              "| # | stage | what | role | from | data | steps | wall time | headline |",
              "|---|---|---|---|---|---|---|---|---|"]
    for number, step in enumerate(steps, 1):
        r = step.record
        starts = ", ".join(f"{key}: {_input_label(entry, steps)}" for key, entry in r.inputs.items() if key != "dataset")
        data = r.inputs["dataset"].path if "dataset" in r.inputs else ""
        lines.append(f"| {number} | `{step.label}` | `sdd {r.stage}` | {r.role or ''} | {starts or 'none'} | {data} | "
                     f"{r.metrics.get('steps', '')} | {_seconds(r.metrics.get('wall_time_s'))} | {_headline(r.metrics)} |")
    lines += ["", "## Evaluation", ""]
    rows = [(step, checkpoint, ev) for step, checkpoint in checkpoints for ev in evaluations(checkpoint)]
    if rows:
        lines += ["avg@k is the mean accuracy over k samples per problem, averaged over sampling seeds (± their std); "
                  "pass@k the unbiased estimate, at the largest k.", "",
                  "| model | benchmark | avg@k | ± std over seeds | pass@k | problems | samples x seeds |",
                  "|---|---|---|---|---|---|---|"]
        for step, _, ev in rows:
            lines.append(_eval_row(step, ev, this=step.name == stage and step.run == run.path.resolve()))
    else:
        lines.append("No evaluation of this checkpoint or the ones it came from is recorded yet "
                     f"(`sdd eval --run {run.path} --model {run.path / stage / 'final'}` adds one to this card).")
    lines += ["", "## Configuration", "",
              "Every option each stage ran with, sdd's and its TRL config's, as resolved (defaults, config files, "
              "`--set`).", ""]
    for step in steps:
        if step.record.config:
            lines += [f"<details><summary><code>{step.label}</code> ({step.record.stage})</summary>", "", "```yaml",
                      _yaml(_redacted(step.record.config)).rstrip(), "```", "", "</details>", ""]
    lines += ["## Reproduce", "", "The commands as they ran, oldest first (each stage reads its inputs from its "
              "run directory's manifest):", "", "```"]
    lines += [" ".join(_command(step.record.command)) for step in steps if step.record.command]
    lines += ["```", "", "## Provenance", ""]
    for step in steps:
        versions = ", ".join(f"{k} {v}" for k, v in step.record.versions.items())
        outputs = ", ".join(f"{k} {o.fingerprint}" for k, o in step.record.outputs.items() if o.fingerprint)
        lines.append(f"- `{step.label}`: ended {step.record.ended_at or 'not yet'} on {step.record.host or '?'}"
                     + (f"; outputs {outputs}" if outputs else "") + (f"; {versions}" if versions else ""))
    return "\n".join(lines) + "\n"


def write(run: RunDir, stage: str, folder: Path | None = None) -> Path | None:
    """Write the card into `folder` (default: the stage's recorded main output); None when there is no folder."""
    record = run.record(stage)
    if record is None or not record.outputs:
        return None
    target = folder or run.resolve_path(record.main_output()[1].path)
    if not target.is_dir():
        return None
    path = target / CARD_NAME
    atomic_write_text(path, render(run, stage))
    return path


def after_eval(run: RunDir, eval_name: str) -> Path | None:
    """Rewrite the card of the checkpoint eval `eval_name` evaluated, when a manifest recorded it; and where
    that checkpoint's stage pushed it to the hub, push the new card there too (a failure only warns: the
    eval itself is done). The card's path, or None for a checkpoint no manifest recorded."""
    record = run.record(eval_name)
    model = record.inputs.get("model") if record else None
    checkpoint = run.follow(model) if model else None
    if checkpoint is None:
        return None
    where = RunDir(checkpoint.run)
    card = write(where, checkpoint.stage, checkpoint.path)
    pushed_to = where.record(checkpoint.stage).metrics.get("pushed_to")
    if card is not None and pushed_to:
        import sys

        try:
            push(card.parent, pushed_to, only_card=True)
        except SddError as err:
            print(f"warning: {err}; the card in {card} is up to date", file=sys.stderr)
    return card


def push(folder: Path, repo_id: str, *, private: bool | None = None, token: str | None = None,
         revision: str | None = None, only_card: bool = False) -> str:
    """Upload a checkpoint folder (weights, tokenizer, card) to model repo `repo_id`; its URL.

    `only_card` uploads the card alone (an eval added numbers; the weights are there already).
    Any failure is one line naming the repo and what to check; the local folder is untouched.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    what = "the card of " if only_card else ""
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if only_card:
            info = api.upload_file(path_or_fileobj=str(folder / CARD_NAME), path_in_repo=CARD_NAME, repo_id=repo_id,
                                   revision=revision, commit_message="sdd: model card")
        else:
            info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                     commit_message=f"sdd: {folder.parent.name}/{folder.name}")
    except Exception as err:  # noqa: BLE001 - the hub client raises many types; the user needs one sentence
        reason = (str(err).strip().splitlines() or [""])[0]
        raise SddError(f"could not push {what}{folder} to the hub as {repo_id} ({type(err).__name__}: {reason}); "
                       "check hub_model_id, your token (HF_TOKEN or `hf auth login`) and the network") from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")


# -- pieces ------------------------------------------------------------------------------------------
def _checkpoints(steps: list[Step]) -> list[tuple[Step, RecordedCheckpoint]]:
    out = []
    for step in steps:
        if step.record.outputs:
            role, output = step.record.main_output()
            out.append((step, RecordedCheckpoint(step.run, step.name, role, step.run / output.path,
                                                 output.fingerprint)))
    return out


def _front_matter(steps: list[Step], record: StageRecord) -> list[str]:
    """The hub's card metadata: library, tags, the hub models and datasets the lineage starts from."""
    bases = sorted({entry.path for step in steps for key, entry in step.record.inputs.items()
                    if key != "dataset" and not entry.from_stage and _hub_id(entry.path)})
    datasets = sorted({_hub_id(entry.path.removeprefix("hub:").split("@")[0].split("[")[0])
                       for step in steps for key, entry in step.record.inputs.items()
                       if key == "dataset" and entry.path.startswith("hub:")} - {None})
    lines = ["---", "library_name: transformers", "tags:", "- sdd", "- trl", f"- {record.stage}"]
    if bases:
        lines += ["base_model:", *[f"- {b}" for b in bases]]
    if datasets:
        lines += ["datasets:", *[f"- {d}" for d in datasets]]
    return [*lines, "---", ""]


def _hub_id(text: str) -> str | None:
    """`owner/name` when `text` reads as a hub id rather than a local path."""
    parts = text.split("/")
    if len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and not Path(text).exists():
        return text
    return None


def _input_label(entry, steps: list[Step]) -> str:
    if entry.from_stage:
        run = next((s.run.name for s in steps if s.name == entry.from_stage and s.record.outputs), None)
        return f"`{run}/{entry.from_stage}`" if run else f"`{entry.from_stage}`"
    return f"`{entry.path}`"


def _headline(metrics: dict) -> str:
    for key in HEADLINE_METRICS:
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            return f"{key} {value:.3g}"
    return ""


def _eval_row(step: Step, ev: StageRecord, *, this: bool) -> str:
    metrics = ev.metrics
    avg = next((k for k in metrics if k.startswith("avg@") and not k.endswith("_std_seeds")), None)
    passes = [k for k in metrics if k.startswith("pass@")]
    top = max(passes, key=lambda k: int(k.split("@")[1])) if passes else None
    std = metrics.get(f"{avg}_std_seeds") if avg else None
    samples = avg.split("@")[1] if avg else "?"
    model = f"**{step.label}** (this)" if this else f"`{step.label}`"
    return (f"| {model} | {metrics.get('benchmark', ev.name)} | {_number(metrics.get(avg)) if avg else ''} ({avg or '?'}) | "
            f"{_number(std)} | {_number(metrics.get(top)) if top else ''} ({top or '?'}) | {metrics.get('problems', '')} | "
            f"{samples} x {metrics.get('seeds', '?')} |")


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else ""


def _seconds(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return ""
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min" if value < 7200 else f"{value / 3600:.1f} h"


_SECRET_KEYS = ("hub_token", "token", "hf_token", "push_to_hub_token", "api_key")


def _redacted(value: Any) -> Any:
    """The config without secrets: token fields, and any string that looks like a hub token, are never written."""
    if isinstance(value, dict):
        return {k: "<redacted>" if str(k).lower() in _SECRET_KEYS and v else _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    if isinstance(value, str) and value.startswith("hf_") and len(value) > 20 and " " not in value:
        return "<redacted>"
    return value


def _yaml(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, sort_keys=True, default_flow_style=False, allow_unicode=True)


def _command(argv: list[str]) -> list[str]:
    """The recorded argv as a shell line: `sdd` for the program, arguments quoted where needed."""
    import shlex

    if not argv:
        return []
    program = "sdd" if argv[0].endswith(("sdd", "__main__.py", "cli.py")) or argv[0] == "-m" else argv[0]
    return [program, *(shlex.quote(str(a)) for a in argv[1:])]
