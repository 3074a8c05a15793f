"""One meaning per dataset name, hub datasets selected as the hub has them, columns mapped by option.

`math-train` used to mean the 4,500 MATH test problems outside MATH-500 offline and MATH's 7,500-problem
training split online. It now means MATH train both ways; the 4,500 are `math-test-4500`. Hub reads
take a config, a split and a revision; a file takes none of them, and says so. Every error names the
option that fixes it as the user would type it (`--set problem_column=...`; no such CLI flag exists).
"""

import json
import os

import pytest

from sdd import data
from sdd.errors import SddError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_math_train_is_math_train_offline_and_online(tmp_path):
    online = data.resolve("math-train")
    assert (online.hub_id, online.split, online.answer_format) == ("DigitalLearningGmbH/MATH-lighteval", "train", "boxed")
    write_jsonl(tmp_path / "math-hendrycks-train.jsonl", [{"problem": "1+1?", "answer": "2", "solution": "\\boxed{2}"}])
    write_jsonl(tmp_path / "math-train.jsonl", [{"problem": "2+2?", "answer": "4", "solution": "\\boxed{4}"}])
    offline = data.resolve("math-train", data_dir=tmp_path)
    assert offline.path == tmp_path / "math-hendrycks-train.jsonl"
    remainder = data.resolve("math-test-4500", data_dir=tmp_path)
    assert remainder.path == tmp_path / "math-train.jsonl"
    assert data.load(offline)[0]["problem"] != data.load(remainder)[0]["problem"]


def test_the_old_offline_meaning_of_math_train_is_named_where_it_is_missed(tmp_path):
    write_jsonl(tmp_path / "math-train.jsonl", [{"problem": "2+2?", "answer": "4"}])
    with pytest.raises(SddError) as err:
        data.resolve("math-train", data_dir=tmp_path)
    message = str(err.value)
    assert "math-hendrycks-train.jsonl" in message and "math-test-4500" in message and "\n" not in message
    with pytest.raises(SddError, match="local file only"):
        data.resolve("math-test-4500")  # no hub dataset holds exactly these problems


def test_the_real_files_hold_what_the_names_say(shared_data):
    assert len(data.load(data.resolve("math-train", data_dir=shared_data))) == 7500
    assert len(data.load(data.resolve("math-test-4500", data_dir=shared_data))) == 4500
    math500 = {r["problem"] for r in data.load(data.resolve("math500", data_dir=shared_data))}
    remainder = {r["problem"] for r in data.load(data.resolve("math-test-4500", data_dir=shared_data))}
    assert not math500 & remainder


def test_hub_selection_reaches_the_source_and_its_description():
    source = data.resolve("someone/problems", dataset_split="validation", dataset_config="hard", dataset_revision="0123abc")
    assert (source.hub_id, source.split, source.hub_config, source.revision) == \
        ("someone/problems", "validation", "hard", "0123abc")
    assert source.describe() == "hub:someone/problems@0123abc[hard:validation]"
    # a benchmark's own config and split are the defaults, and each can be replaced
    assert (data.resolve("gsm8k").hub_config, data.resolve("gsm8k").split) == ("main", "test")
    assert (data.resolve("gsm8k", dataset_config="socratic", dataset_split="train").hub_config,
            data.resolve("gsm8k", dataset_config="socratic", dataset_split="train").split) == ("socratic", "train")
    assert data.resolve("someone/problems").split == "train"


def test_a_hub_load_that_fails_names_what_was_asked(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    source = data.resolve("someone/no-such-problems", dataset_split="validation", dataset_config="hard", dataset_revision="0123abc")
    with pytest.raises(SddError) as err:
        data.load(source)
    message = str(err.value)
    assert "someone/no-such-problems" in message and "config hard, split validation, revision 0123abc" in message
    assert "\n" not in message


def test_a_file_refuses_hub_selection(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": "1+1?", "answer": "2"}])
    with pytest.raises(SddError, match="dataset_split select what the hub serves"):
        data.resolve(str(path), dataset_split="test")
    write_jsonl(tmp_path / "math500.jsonl", [{"problem": "1+1?", "answer": "2"}])
    with pytest.raises(SddError, match="dataset_config, dataset_revision select"):
        data.resolve("math500", data_dir=tmp_path, dataset_config="x", dataset_revision="y")


def test_columns_and_answer_format_map_a_foreign_file(tmp_path):
    rows = [{"q": "Tom has 2 apples and buys 3. How many?", "worked": "2 + 3 = 5\n#### 5"}]
    path = write_jsonl(tmp_path / "foreign.jsonl", rows)
    source = data.resolve(str(path), problem_column="q", answer_column="worked", solution_column="worked",
                          answer_format="gsm8k")
    [record] = data.load(source, require_solution=True)
    assert (record["problem"], record["answer"], record["solution"]) == (rows[0]["q"], "5", rows[0]["worked"])


def test_column_errors_name_the_real_options(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1?", "final": "2"}])
    with pytest.raises(SddError) as err:
        data.load(data.resolve(str(path)))
    assert "--set problem_column=NAME" in str(err.value) and "--problem-column" not in str(err.value)
    with pytest.raises(SddError, match="--set solution_column=NAME"):
        data.load(data.resolve(str(path), problem_column="question", answer_column="final"), require_solution=True)
    with pytest.raises(SddError, match="answer_format must be one of plain, gsm8k, boxed"):
        data.resolve(str(path), answer_format="latex")


def test_no_error_message_in_sdd_names_a_column_flag_the_cli_lacks():
    """The CLI has no --problem-column / --answer-column; messages must say --set problem_column=..."""
    import sdd

    root = os.path.dirname(sdd.__file__)
    offenders = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(folder, name), encoding="utf-8").read()
                for flag in ("--problem-column", "--answer-column", "--solution-column"):
                    if flag in text:
                        offenders.append(f"{name}: {flag}")
    assert not offenders
