"""Problems with verifiable answers: named benchmarks, local files, hub datasets, and the prompt.

Every source is reduced to the same records, `{"id", "problem", "answer"}` plus `"solution"` where
the source has worked solutions, so stages never care where the data came from. Named
benchmarks resolve to a local file when `--data-dir` holds it (these machines cannot reach the
hub) and to their hub dataset otherwise; a name means the same problems either way. A source's own answer instructions
(DAPO's "Answer:" wrapper, trailing boxed instructions) are removed, so every problem reaches the
model in the one prompt of `user_message`.

Hub datasets are read as the hub has them: a config (`datasets.load_dataset`'s `name`), a split and
a revision, and a column mapping (problem, answer, solution, and how the answer is written), all
stage options (`dataset_config`, `dataset_split`, `dataset_revision`, `problem_column`,
`answer_column`, `solution_column`, `answer_format`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdd.errors import SddError

INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."

# Some sources already carry an instruction; two instructions would change the prompt the model saw in training.
_TRAILING_INSTRUCTIONS = re.compile(
    r"\s*(Please reason step by step, and put your final answer within \\boxed\{\}\.?|"
    + re.escape(INSTRUCTION)
    + r")\s*$"
)

# DAPO-Math-17k (open-r1/DAPO-Math-17k-Processed's `prompt` column is DAPO's raw user message) wraps
# every problem in its own answer format: "Solve the following math problem step by step. The last
# line of your response should be of the form Answer: $Answer (without quotes) where $Answer is the
# answer to the problem.\n\n<problem>\n\nRemember to put your answer on its own line after "Answer:"."
# Kept, it would ask for an `Answer:` line AND a \boxed{} answer (a reply obeying the first scores 0)
# and make training prompts differ from eval prompts. The authors' preprocessing (OPSD
# src/data/prepare_grpo_data.py) strips both parts and appends the boxed instruction; so does `load`.
_DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem."
)
_DAPO_SUFFIX = 'Remember to put your answer on its own line after "Answer:".'


def _words(text: str) -> str:
    """`text` as a regex that allows any whitespace run where it has a space."""
    return r"\s+".join(re.escape(word) for word in text.split())


_DAPO_WRAPPER = re.compile(
    r"\s*" + _words(_DAPO_PREFIX) + r"\s*(?P<problem>.*?)\s*" + _words(_DAPO_SUFFIX) + r"\s*", re.DOTALL
)


def strip_dapo_wrapper(text: str) -> str | None:
    """The problem inside DAPO's answer-format wrapper; None when `text` does not carry the whole wrapper."""
    match = _DAPO_WRAPPER.fullmatch(text)
    return match["problem"] if match and match["problem"].strip() else None


ANSWER_FORMATS = ("plain", "gsm8k", "boxed")


@dataclass(frozen=True)
class Benchmark:
    """Where a named dataset lives, on disk and on the hub, and how its fields map onto problem/answer.

    A name stands for one set of problems (`about`), whichever of the two it is read from.
    """

    file: str
    hub_id: str | None  # None: a local file only (no hub dataset holds exactly these problems)
    hub_split: str
    problem_column: str = "problem"
    answer_column: str = "answer"
    answer_format: str = "plain"  # "plain" | "gsm8k" (text ending in "#### N") | "boxed" (last \boxed{} of a solution)
    hub_config: str | None = None
    prompt_format: str = "plain"  # "plain" | "dapo" (problem inside DAPO's Answer: wrapper, stripped on load)
    about: str = ""


BENCHMARKS: dict[str, Benchmark] = {
    "math500": Benchmark("math500.jsonl", "HuggingFaceH4/MATH-500", "test",
                         about="MATH-500, the 500 MATH test problems of PRM800K's split"),
    "aime24": Benchmark("aime24.jsonl", "HuggingFaceH4/aime_2024", "train", about="AIME 2024 I and II"),
    "aime25": Benchmark("aime25.jsonl", "math-ai/aime25", "test", about="AIME 2025 I and II"),
    "amc23": Benchmark("amc23.jsonl", "math-ai/amc23", "test", about="AMC 2023"),
    "gsm8k": Benchmark("gsm8k-test.jsonl", "openai/gsm8k", "test", "question", "answer", "gsm8k", "main",
                       about="GSM8K test"),
    "gsm8k-train": Benchmark("gsm8k-train.jsonl", "openai/gsm8k", "train", "question", "answer", "gsm8k", "main",
                             about="GSM8K train"),
    # MATH's training split (Hendrycks et al.): 7,500 problems with worked solutions, offline and online.
    "math-train": Benchmark("math-hendrycks-train.jsonl", "DigitalLearningGmbH/MATH-lighteval", "train", "problem",
                            "solution", "boxed", about="MATH train, 7,500 problems"),
    # PRM800K's other test problems: MATH test minus MATH-500. No hub dataset holds exactly these; the
    # file is math-train.jsonl in ../shared/data, which `math-train` named offline before it had one meaning.
    "math-test-4500": Benchmark("math-train.jsonl", None, "test",
                                about="MATH test minus MATH-500, 4,500 problems"),
    "dapo-math": Benchmark("dapo-math.jsonl", "open-r1/DAPO-Math-17k-Processed", "train", "prompt", "solution", "plain",
                           "en", "dapo", about="DAPO-Math-17k (open-r1's processed copy)"),
}


def user_message(problem: str) -> list[dict[str, str]]:
    """The one prompt every stage and eval uses, so training and evaluation see the same words."""
    problem = _TRAILING_INSTRUCTIONS.sub("", problem.strip())
    return [{"role": "user", "content": f"{problem}\n{INSTRUCTION}"}]


def render_prompt(tokenizer, problem: str, chat_template_kwargs: dict | None = None) -> str:
    return tokenizer.apply_chat_template(
        user_message(problem), tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
    )


def answer_text(value: Any, answer_format: str = "plain") -> str | None:
    """Gold answer as a string; None where the record has no usable answer.

    Numbers are common in the wild (AMC stores 27.0); they are written the way a model would box
    them. Lists, dicts and booleans are not answers and are rejected by the caller.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if not isinstance(value, str):
        return None
    if answer_format == "gsm8k":
        _, sep, tail = value.rpartition("####")
        return tail.strip().replace(",", "") if sep else None
    if answer_format == "boxed":
        from sdd.verify import extract_boxed

        return extract_boxed(value)
    return value.strip() or None


def read_records(path: Path) -> list[dict]:
    """Rows of a local jsonl / json / parquet file, with errors that name the file and line."""
    if not path.is_file():
        raise SddError(f"dataset file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as err:  # noqa: BLE001 - arrow raises its own types for a damaged file
            raise SddError(f"{path} is not a readable parquet file ({type(err).__name__}); fix or regenerate it") from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SddError(f"{path} is not UTF-8 text; name a .jsonl, .json or .parquet file of problems") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SddError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); fix or regenerate it") from None
        if isinstance(data, dict):  # {"data": [...]} or column-oriented layouts
            data = data.get("data", data.get("rows", data))
        if not isinstance(data, list):
            raise SddError(f"{path} must hold a list of records (or use .jsonl, one record per line)")
        return data
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise SddError(f"{path}:{number} is not valid JSON ({err.msg}); fix or remove that line") from None
    return rows


def _hub_records(hub_id: str, split: str, config: str | None, revision: str | None = None) -> list[dict]:
    import datasets

    try:
        return datasets.load_dataset(hub_id, config, split=split, revision=revision).to_list()
    except Exception as err:  # noqa: BLE001 - the hub client raises many types; the user needs one sentence
        what = ", ".join(f"{k} {v}" for k, v in (("config", config), ("split", split), ("revision", revision)) if v)
        raise SddError(
            f"could not load dataset '{hub_id}' ({what}) from the hub: {type(err).__name__}: {str(err).splitlines()[0]}"
            " - pass a local file, or --data-dir with the benchmark files (dataset_config / dataset_split / "
            "dataset_revision pick what the hub serves)"
        ) from None


@dataclass(frozen=True)
class DataSource:
    """A resolved dataset: what to record in the manifest and how to read it."""

    name: str
    path: Path | None  # local file, None for hub datasets
    hub_id: str | None
    split: str | None
    problem_column: str
    answer_column: str
    answer_format: str
    hub_config: str | None = None
    prompt_format: str = "plain"  # see Benchmark.prompt_format
    revision: str | None = None
    solution_column: str = "solution"

    def describe(self) -> str:
        if self.path:
            return str(self.path)
        config = f"{self.hub_config}:" if self.hub_config else ""
        revision = f"@{self.revision}" if self.revision else ""
        return f"hub:{self.hub_id}{revision}[{config}{self.split}]"


def resolve(
    name: str,
    *,
    data_dir: str | Path | None = None,
    registered: dict[str, str] | None = None,
    dataset_split: str | None = None,
    dataset_config: str | None = None,
    dataset_revision: str | None = None,
    problem_column: str | None = None,
    answer_column: str | None = None,
    solution_column: str | None = None,
    answer_format: str | None = None,
) -> DataSource:
    """Find a dataset by run-dir registration, benchmark name, local path or hub id, in that order.

    `dataset_split`, `dataset_config` and `dataset_revision` select what the hub serves (for a benchmark, over
    its own); the column options and `answer_format` map a source's fields onto problem / answer / solution.
    """
    split, config, revision = dataset_split, dataset_config, dataset_revision
    if answer_format is not None and answer_format not in ANSWER_FORMATS:
        raise SddError(f"answer_format must be one of {', '.join(ANSWER_FORMATS)}, not {answer_format!r}")
    registered = registered or {}
    columns = {"solution_column": solution_column or "solution"}
    hub_selection = {k: v for k, v in (("dataset_split", split), ("dataset_config", config),
                                       ("dataset_revision", revision)) if v is not None}

    def local_file(path: Path) -> Path:
        if hub_selection:  # a file has no splits, configs or revisions: the option would silently do nothing
            raise SddError(f"{', '.join(hub_selection)} select what the hub serves, but '{name}' is read from {path}; "
                           "drop them, or name the hub dataset instead")
        return path

    if name in registered:
        path = local_file(Path(registered[name]))
        return DataSource(name, path, None, None, problem_column or "problem", answer_column or "answer",
                          answer_format or "plain", **columns)
    if name in BENCHMARKS:
        spec = BENCHMARKS[name]
        if data_dir is not None:
            local = Path(data_dir) / spec.file
            if local.is_file():
                # Local benchmark files carry a ready `answer` column even where the hub dataset does not
                # (math-train's hub column is a whole solution); a plain hub column (dapo-math's
                # `solution`) is already the answer, and a local copy of that dataset keeps it.
                fmt = "gsm8k" if spec.answer_format == "gsm8k" else "plain"
                local_answer = spec.answer_column if spec.answer_format == "plain" else "answer"
                local_cols = (problem_column or spec.problem_column, answer_column or local_answer)
                return DataSource(name, local_file(local), None, None, *local_cols, answer_format or fmt,
                                  prompt_format=spec.prompt_format, **columns)
            raise SddError(f"benchmark '{name}' ({spec.about}) expects {local}; it is not there (check --data-dir)"
                           + _RENAMED.get(name, ""))
        if spec.hub_id is None:
            raise SddError(f"benchmark '{name}' ({spec.about}) is a local file only ({spec.file}); pass --data-dir "
                           "with that file")
        cols = (problem_column or spec.problem_column, answer_column or spec.answer_column)
        return DataSource(name, None, spec.hub_id, split or spec.hub_split, *cols, answer_format or spec.answer_format,
                          config or spec.hub_config, spec.prompt_format, revision, **columns)
    path = Path(name)
    if path.exists() or path.suffix.lower() in (".jsonl", ".json", ".parquet") or name.startswith((".", "/")):
        if path.is_dir():
            raise SddError(f"dataset {path} is a directory; name a .jsonl, .json or .parquet file")
        if not path.exists():
            raise SddError(f"dataset file {path} does not exist")
        return DataSource(name, local_file(path), None, None, problem_column or "problem", answer_column or "answer",
                          answer_format or "plain", **columns)
    if "/" in name:
        return DataSource(name, None, name, split or "train", problem_column or "problem", answer_column or "answer",
                          answer_format or "plain", config, "plain", revision, **columns)
    known = ", ".join(sorted(set(BENCHMARKS) | set(registered)))
    raise SddError(f"unknown dataset '{name}': use a file path, a hub id (owner/name), or one of: {known}")


# Names whose meaning changed: said where the file a name used to mean is looked for and not found.
_RENAMED = {
    "math-train": "; math-train is MATH's 7,500-problem training split (math-hendrycks-train.jsonl), the 4,500 "
                  "MATH test problems outside MATH-500 (math-train.jsonl) are `math-test-4500`",
}

# What to pass where a column is missing: these are options, set with --set or in a --config file.
_COLUMN_OPTIONS = "--set problem_column=NAME / --set answer_column=NAME"


def load(source: DataSource, *, limit: int | None = None, require_solution: bool = False) -> list[dict]:
    """Records `{"id", "problem", "answer", "solution"?}`; bad data stops here with what to fix."""
    rows = (read_records(source.path) if source.path
            else _hub_records(source.hub_id, source.split, source.hub_config, source.revision))
    where = source.describe()
    if not rows:
        raise SddError(f"dataset {where} is empty")
    first = rows[0]
    if not isinstance(first, dict):
        raise SddError(f"dataset {where} must hold JSON objects, one per problem")
    for column in (source.problem_column, source.answer_column):
        if column not in first:
            raise SddError(
                f"dataset {where} has no column '{column}' (columns: {', '.join(first)}); "
                f"name the right one with {_COLUMN_OPTIONS}"
            )
    if require_solution and source.solution_column not in first:
        raise SddError(f"dataset {where} has no '{source.solution_column}' column with worked solutions, which sft "
                       f"trains on (columns: {', '.join(first)}); name it with --set solution_column=NAME")
    records = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise SddError(f"dataset {where}, record {index}: expected a JSON object, found {type(row).__name__}")
        problem = row.get(source.problem_column)
        if not isinstance(problem, str) or not problem.strip():
            raise SddError(f"dataset {where}, record {index}: '{source.problem_column}' must be non-empty text")
        if source.prompt_format == "dapo":
            inner = strip_dapo_wrapper(problem)
            if inner is None:
                # Keeping it would train on a prompt with two answer instructions; dropping it quietly
                # would shrink the data unseen. A dataset declared as DAPO must be DAPO throughout.
                raise SddError(
                    f"dataset {where}, record {index}: '{source.problem_column}' is not in DAPO's format "
                    f"(\"{_DAPO_PREFIX[:40]}... <problem> ... {_DAPO_SUFFIX}\"; it starts {problem[:60]!r}); "
                    "fix the record, or pass the file by path to use its prompts as they are"
                )
            problem = inner
        raw = row.get(source.answer_column)
        if isinstance(raw, (list, dict)):
            raise SddError(
                f"dataset {where}, record {index}: '{source.answer_column}' is a {type(raw).__name__}, expected text or a number"
            )
        record = {
            "id": str(row.get("id", row.get("unique_id", row.get("idx", index)))),
            "problem": problem,
            "answer": answer_text(raw, source.answer_format),
        }
        if isinstance(row.get(source.solution_column), str):
            record["solution"] = row[source.solution_column]
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    return records


def split_usable(records: list[dict], *, max_bad_fraction: float, where: str) -> tuple[list[dict], int]:
    """Drop records whose gold answer cannot be verified, failing when too many are bad.

    A few broken golds are normal in scraped data and would only score 0 forever; a large share
    means the wrong column or format was chosen, which must stop the run instead.
    """
    from sdd.verify import golds_usable

    verdicts = golds_usable([r["answer"] or "" for r in records])
    usable = [r for r, ok in zip(records, verdicts, strict=True) if r["answer"] is not None and ok]
    bad = len(records) - len(usable)
    if records and bad / len(records) > max_bad_fraction:
        raise SddError(
            f"dataset {where}: {bad} of {len(records)} gold answers cannot be parsed "
            f"(more than {max_bad_fraction:.0%}); check --set answer_column / --set answer_format or the file, or raise --set max_bad_answers"
        )
    if bad:
        import sys

        print(f"warning: skipped {bad} of {len(records)} problems of {where} whose gold answer cannot be parsed",
              file=sys.stderr)
    return usable, bad


def usable_problems(name: str, *, data_dir=None, registered=None, limit: int | None = None,
                    max_bad_fraction: float = 0.05, **selection) -> tuple[DataSource, list[dict], int]:
    """Resolve, load and drop unverifiable golds: (source, records, how many were skipped).

    `selection` is `resolve`'s hub selection and column mapping (dataset_split/config/revision, *_column, answer_format).
    """
    source = resolve(name, data_dir=data_dir, registered=registered, **selection)
    records, skipped = split_usable(load(source, limit=limit), max_bad_fraction=max_bad_fraction,
                                    where=source.describe())
    return source, records, skipped


def problems_fingerprint(records: list[dict]) -> str:
    """Short content hash of a problem set: cached samples are valid only for the problems they were drawn on."""
    return hashlib.sha256(json.dumps([(r["id"], r["problem"], r["answer"]) for r in records]).encode()).hexdigest()[:16]
