"""Which checkpoints to compare: a training stage's input and output, two named stages, one stage across seeds.

Checkpoints are found through the manifests (`sdd.manifest`: RunDir.follow, OutputIndex), never by
guessing paths, so every number can name the stage and fingerprint it measured, and a run tree that
moved between machines still resolves.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

from sdd.analysis import weights
from sdd.analysis.text import fmt
from sdd.errors import SddError
from sdd.manifest import (
    MANIFEST_NAME,
    Input,
    OutputIndex,
    RecordedCheckpoint,
    RunDir,
    StageRecord,
    atomic_write_text,
    fingerprint,
    now_iso,
)
from sdd.names import slug

TRAINING_STAGES = ("sft", "teacher-rl", "warmup", "distill", "student-rl")
ANALYSIS_DIR = "analysis"
PAIR_KIND = "sdd-analysis-pair"
OVERLAP_KIND = "sdd-analysis-overlap"
SCHEMA = 1


@dataclasses.dataclass
class Checkpoint:
    """A model to analyse and where it came from, so every number can name it."""

    label: str  # the stage that wrote it, or the directory name of a path no manifest produced
    path: str  # local directory or hub id
    role: str | None
    stage: str | None = None
    run: str | None = None  # run dir of `stage`
    fingerprint: str | None = None

    @classmethod
    def recorded(cls, found: RecordedCheckpoint) -> Checkpoint:
        return cls(found.stage, str(found.path), found.role, found.stage, str(found.run), found.fingerprint)

    @property
    def local(self) -> bool:
        return Path(self.path).exists()

    def describe(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Pair:
    """An earlier and a later checkpoint, and the manifest record of the stage that made the later one."""

    run_dir: Path
    record: StageRecord
    before: Checkpoint
    after: Checkpoint

    @property
    def json_path(self) -> Path:
        return self.run_dir / ANALYSIS_DIR / f"{slug(self.before.label)}__{slug(self.after.label)}.json"

    @property
    def key(self) -> tuple[str, str]:
        return (self.before.fingerprint or self.before.path, self.after.fingerprint or self.after.path)


# --------------------------------------------------------------------------------------------------
# Resolving the checkpoints a record names.


def resolve_input(run_dir: Path, entry: Input, role: str | None, index: OutputIndex) -> Checkpoint:
    """The checkpoint an input entry names: the recorded stage's output when it still matches, else the path."""
    found = RunDir(run_dir).follow(entry, role) or index.get(entry.fingerprint)
    if found:
        return Checkpoint.recorded(found)
    path = entry.path
    if Path(path).exists() or (path.count("/") == 1 and not path.startswith((".", "/", "~"))):  # or a hub id
        return Checkpoint(entry.from_stage or slug(Path(path).name), path, role, entry.from_stage, entry.run,
                          entry.fingerprint)
    raise SddError(f"{path}, an input recorded in {run_dir / MANIFEST_NAME}, no longer exists; restore it or rerun "
                   f"{'stage ' + repr(entry.from_stage) if entry.from_stage else 'the stage that made it'}")


def check_fingerprint(checkpoint: Checkpoint, memo: dict[str, str]) -> None:
    """Refuse a checkpoint whose files changed after its stage recorded them: its numbers would name the wrong model."""
    if not checkpoint.local:
        return
    if checkpoint.path not in memo:
        memo[checkpoint.path] = fingerprint(checkpoint.path)
    actual = memo[checkpoint.path]
    if checkpoint.fingerprint and checkpoint.fingerprint != actual:
        raise SddError(f"{checkpoint.path} changed since stage '{checkpoint.stage}' wrote it (fingerprint "
                       f"{checkpoint.fingerprint} -> {actual}); rerun that stage, or analyse another checkpoint")
    checkpoint.fingerprint = actual


def weights_dir(checkpoint: Checkpoint) -> Path:
    """A local directory of safetensors files: the checkpoint itself, or a hub model's cached snapshot."""
    if checkpoint.local:
        return Path(checkpoint.path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(checkpoint.path, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as err:  # noqa: BLE001 - the hub client raises many types; the user needs one line
        raise SddError(f"cannot get the weights of {checkpoint.path} ({type(err).__name__}); download it first") from None


def _output(run_dir: Path, name: str, record: StageRecord, prefer: str | None = None) -> Checkpoint:
    role, _ = record.main_output(prefer)
    return Checkpoint.recorded(RunDir(run_dir).checkpoint(name, record, role))


# --------------------------------------------------------------------------------------------------
# Pairs.


def stage_pairs(run_dir: Path, index: OutputIndex) -> list[Pair]:
    """(input, output) of every finished training stage of a run dir, in the order they finished."""
    pairs = []
    for name, record in sorted(RunDir(run_dir).records().items(), key=lambda item: item[1].order):
        if record.stage not in TRAINING_STAGES or not record.done or not record.outputs:
            continue
        model_input = record.model_input()
        if model_input is None:
            continue
        after = _output(run_dir, name, record)
        before = resolve_input(run_dir, model_input[1], after.role, index)
        pairs.append(Pair(run_dir, record, before, after))
    return pairs


def named_pair(run_dir: Path, from_stage: str | None, to_stage: str, index: OutputIndex) -> Pair:
    """--from/--to: `to_stage` of this run dir, against its own input or against `from_stage`.

    `from_stage` may be a stage of this run dir or the stage an input of `to_stage` came from (in
    another run dir, such as `<root>/shared`), which is the common case.
    """
    records = RunDir(run_dir).records()
    present = ", ".join(sorted(records)) or "none"
    record = records.get(to_stage)
    if record is None:
        raise SddError(f"no stage '{to_stage}' in {run_dir}; stages present: {present}")
    if not record.done:
        raise SddError(f"stage '{to_stage}' in {run_dir} is {record.status}, not done; finish it (rerun its "
                       "command) before analysing it")
    if not record.outputs:
        raise SddError(f"stage '{to_stage}' ({record.stage}) wrote no checkpoint; --to must name a training "
                       f"stage (stages present: {present})")
    after = _output(run_dir, to_stage, record)
    inputs = {k: v for k, v in record.inputs.items() if k in ("model", "student", "teacher")}
    if from_stage is None:
        model_input = record.model_input()
        if model_input is None:
            raise SddError(f"stage '{to_stage}' records no input model; name the earlier stage with --from")
        return Pair(run_dir, record, resolve_input(run_dir, model_input[1], after.role, index), after)
    if from_stage == to_stage:
        raise SddError(f"--from and --to both name '{to_stage}'; name two different stages")
    for _, entry in sorted(inputs.items(), key=lambda item: item[0] == "teacher"):
        if entry.from_stage == from_stage:
            return Pair(run_dir, record, resolve_input(run_dir, entry, after.role, index), after)
    earlier = records.get(from_stage)
    if earlier is None:
        sources = ", ".join(f"{k}: {v.from_stage or v.path}" for k, v in inputs.items()) or "none"
        raise SddError(f"no stage '{from_stage}' in {run_dir} and no input of '{to_stage}' came from it; stages "
                       f"present: {present}; inputs of {to_stage}: {sources}")
    if not earlier.done or not earlier.outputs:
        raise SddError(f"stage '{from_stage}' in {run_dir} is {earlier.status} with no checkpoint; --from "
                       "must name a finished stage that wrote one")
    return Pair(run_dir, record, _output(run_dir, from_stage, earlier, prefer=after.role), after)


def find_teacher(pair: Pair, index: OutputIndex) -> tuple[Checkpoint | None, str]:
    """The teacher a student stage answers to, and how it was found (or why there is none).

    warmup and distill name theirs. student-rl does not, so the chain of inputs is followed back to
    the bridge stage that trained its starting point, then the run dir's own bridge stages are tried.
    """
    record = pair.record
    if "teacher" in record.inputs:
        return (resolve_input(pair.run_dir, record.inputs["teacher"], "teacher", index),
                f"the teacher input of {pair.after.label}")
    if record.stage != "student-rl":
        return None, f"{record.stage} trains without a teacher"
    run_dir, current = pair.run_dir, record
    for _ in range(32):  # a chain of stages; the bound only guards against a manifest that loops
        model_input = current.model_input()
        if model_input is None:
            break
        start = resolve_input(run_dir, model_input[1], "student", index)
        if not start.stage or not start.run or not (Path(start.run) / MANIFEST_NAME).is_file():
            break
        run_dir, current = Path(start.run), RunDir(start.run).record(start.stage)
        if current is None:
            break
        if "teacher" in current.inputs:
            return (resolve_input(run_dir, current.inputs["teacher"], "teacher", index),
                    f"the teacher of {start.stage} ({run_dir}), which {pair.after.label} starts from")
    bridges = [(name, r) for name, r in RunDir(pair.run_dir).records().items()
               if r.stage in ("warmup", "distill") and r.done and "teacher" in r.inputs]
    if bridges:
        name, bridge = max(bridges, key=lambda item: item[1].order)
        return (resolve_input(pair.run_dir, bridge.inputs["teacher"], "teacher", index),
                f"the teacher of {name} in the same run dir")
    return None, "no teacher found through the manifests: this student never learned from one (e.g. direct GRPO)"


# --------------------------------------------------------------------------------------------------
# Overlap across seeds.


def read_document(path: Path) -> dict | None:
    """An analysis JSON, or None when it is absent or unreadable (it is then redone)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _variant_seed(root: Path, run_dir: Path) -> tuple[str, int] | None:
    try:
        parts = run_dir.resolve().relative_to(root.resolve()).parts
    except ValueError:
        return None
    if len(parts) == 2 and parts[1].startswith("seed") and parts[1][4:].isdigit():
        return parts[0], int(parts[1][4:])
    return None


def seed_overlaps(root: Path, pairs: list[Pair], force: bool) -> list[Path]:
    """Jaccard of the changed sets of one stage across training seeds (`<root>/<variant>/seed<k>`)."""
    groups: dict[tuple[str, str], dict[int, Pair]] = {}
    for pair in pairs:
        where = _variant_seed(root, pair.run_dir)
        if where:
            groups.setdefault((where[0], pair.after.label), {})[where[1]] = pair
    written = []
    for (variant, stage), by_seed in sorted(groups.items()):
        for seed_a, seed_b in itertools.combinations(sorted(by_seed), 2):
            out = root / ANALYSIS_DIR / f"overlap__{slug(variant)}__{slug(stage)}__seed{seed_a}-seed{seed_b}.json"
            a, b = by_seed[seed_a], by_seed[seed_b]
            existing = read_document(out) if not force else None
            recorded = [(existing or {}).get(k, {}).get(side, {}).get("fingerprint") for k in "ab" for side in ("from", "to")]
            if existing and recorded == [a.before.fingerprint, a.after.fingerprint, b.before.fingerprint,
                                         b.after.fingerprint]:
                print(f"skip: {out} exists (--force to redo it)")
                written.append(out)
                continue
            try:
                result = weights.overlap_weights((weights_dir(a.before), weights_dir(a.after)),
                                                 (weights_dir(b.before), weights_dir(b.after)))
            except SddError as err:
                print(f"overlap of {variant}/{stage} seeds {seed_a} and {seed_b} skipped: {err}")
                continue
            document = {"kind": OVERLAP_KIND, "schema": SCHEMA, "created_at": now_iso(), "root": str(root.resolve()),
                        "variant": variant, "stage": stage,
                        "a": {"seed": seed_a, "run_dir": str(a.run_dir.resolve()), "from": a.before.describe(),
                              "to": a.after.describe()},
                        "b": {"seed": seed_b, "run_dir": str(b.run_dir.resolve()), "from": b.before.describe(),
                              "to": b.after.describe()},
                        **result}
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out, json.dumps(document, indent=1) + "\n")
            total = result["total"]
            print(f"overlap {variant}/{stage} seed{seed_a} vs seed{seed_b}: Jaccard {fmt(total['jaccard'])} "
                  f"(chance {fmt(total['chance_jaccard'])}) -> {out}")
            written.append(out)
    return written
