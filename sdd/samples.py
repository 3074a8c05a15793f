"""Sample files: completions on disk, headed by what made them, so a rerun reuses them only when nothing changed.

A sample file is JSON lines. The first line is the header, `{"provenance": {...}, ...}`: the
model's fingerprint, the problems and the sampling settings that produced the rows (extra keys
say more for readers, such as the checkpoint analysis sampled, and are not compared). Every
further line is one problem's row (its id, gold answer, and per sample the completion, whether
it is correct, whether it was truncated...). Eval writes one per seed, warmup one of teacher
samples, analysis one per checkpoint in its cache.

Two ways to a finished file, both safe against a kill at any point:
- `write`: the rows at once, written beside the file and renamed into place whole;
- `Partial`: rows appended as they are made to `<name>.partial` (fsynced per batch), so a killed
  job keeps what it finished; `resume` keeps the whole batches of a partial file with the same
  header and cuts the torn tail; `finish` renames it into place.
A finished file is therefore complete or absent, never half written; one with another header,
or damaged, is not reused (`read` returns None) and the caller samples again.

This module also holds the sampling defaults the stages that sample for measurement share.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from sdd.manifest import atomic_write_text


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """Qwen3's recommended non-thinking sampling: what eval, analysis and warmup's teacher samples default to.

    One home, so "what eval saw" and "what analysis samples" cannot drift apart; each options class
    takes its defaults from `SAMPLING` instead of repeating the numbers.
    """

    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    # The budget for measuring (eval, analysis): long enough for a whole MATH solution. Warmup's teacher
    # samples are training data and keep a smaller budget of their own.
    max_new_tokens: int = 8192
    enable_thinking: bool = False

    def chat_template_kwargs(self) -> dict:
        """A fresh dict each call (a dataclass `default_factory`): options objects must not share one."""
        return {"enable_thinking": self.enable_thinking}


SAMPLING = SamplingDefaults()


def header(provenance: dict, **extra) -> dict:
    return {"provenance": provenance, **extra}


def read(path: Path, provenance: dict, **extra) -> list[dict] | None:
    """The rows of the finished sample file at `path` if its header's provenance is `provenance`; else None.

    Header keys named in `extra` must match too (a shard file's place among the shards); others are
    not compared. None also for a missing or damaged file: either way the caller samples again and
    rewrites it.
    """
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        found = json.loads(lines[0]) if lines else None
        if not isinstance(found, dict) or any(found.get(k) != v for k, v in header(provenance, **extra).items()):
            return None
        return [json.loads(line) for line in lines[1:]]
    except ValueError:  # torn or hand-edited: not what its header promises
        return None


def rows(path: Path) -> list[dict]:
    """The rows of a sample file whatever made it ([] when there is none): for readers that only tabulate."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[1:]]


def write(path: Path, provenance: dict, sample_rows: Iterable[dict], **extra) -> None:
    """Write a whole sample file atomically: readers see the previous file or this one, never part of it."""
    text = json.dumps(header(provenance, **extra)) + "\n" + "".join(json.dumps(row) + "\n" for row in sample_rows)
    atomic_write_text(path, text)


def partial_path(path: Path) -> Path:
    """Where the sample file `path` is written until it is finished."""
    return path.with_name(path.name + ".partial")


class Partial:
    """A sample file being written batch by batch, which a killed job resumes: `<path>.partial` until finished.

        partial = Partial(path, provenance)
        done = partial.resume(whole=chunk)        # rows a previous attempt finished, in whole chunks
        with partial.append() as out:
            for batch ...: out.write_rows(rows)  # each batch fsynced
        partial.finish()                          # rename into place
    """

    def __init__(self, path: Path, provenance: dict, **extra):
        self.path = Path(path)
        self.file = partial_path(self.path)
        self.header = header(provenance, **extra)

    def resume(self, whole: int | Sequence[int] = 1, *, writer: bool = True) -> list[dict]:
        """Rows of a partial file with this header, in whole groups; start it afresh otherwise.

        `whole` is the size of every group, or the sizes of the groups in order (the last may be
        smaller, or a group empty). A line without its newline is the one being written when the job
        died, and a torn line ends what is kept. Whole groups only: a caller that seeds each batch by
        where it starts then samples exactly what an uninterrupted run would have. The torn tail is
        cut in place; rewriting the file would risk the rows already sampled. A reader that shares the
        file with the process writing it (`writer=False`) leaves the file as it is.
        """
        done: list[dict] = []
        kept_bytes = 0
        if self.file.is_file():
            lines = self.file.read_bytes().splitlines(keepends=True)
            if lines and lines[0].endswith(b"\n") and _same_header(lines[0], self.header):
                ends = [len(lines[0])]
                for line in lines[1:]:
                    try:
                        if not line.endswith(b"\n"):
                            break
                        done.append(json.loads(line))
                    except ValueError:
                        break
                    ends.append(ends[-1] + len(line))
                del done[_whole_groups(len(done), whole):]
                kept_bytes = ends[len(done)]
        if writer:
            if kept_bytes:
                os.truncate(self.file, kept_bytes)
            else:
                atomic_write_text(self.file, json.dumps(self.header) + "\n")
        return done

    def append(self) -> _Appender:
        return _Appender(open(self.file, "a", encoding="utf-8"))

    def finish(self) -> None:
        os.replace(self.file, self.path)


def _whole_groups(rows: int, whole: int | Sequence[int]) -> int:
    """How many of `rows` rows fill whole groups."""
    if isinstance(whole, int):
        return rows // whole * whole
    kept = 0
    for size in whole:
        if kept + size > rows:
            break
        kept += size
    return kept


class _Appender:
    def __init__(self, handle):
        self.handle = handle

    def write_rows(self, batch: Iterable[dict]) -> None:
        """Append rows and make them durable: after this returns, a kill loses none of them."""
        for row in batch:
            self.handle.write(json.dumps(row) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def __enter__(self) -> _Appender:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def _same_header(line: bytes | str, expected: dict) -> bool:
    try:
        return json.loads(line) == expected
    except ValueError:  # torn by a kill mid-write
        return False
