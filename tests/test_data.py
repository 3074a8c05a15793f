"""DAPO-Math prompts lose their own answer format and render exactly like every other benchmark's.

The records below are in the real format of `open-r1/DAPO-Math-17k-Processed` (config `en`, split
`train`): `prompt` is DAPO's raw user message (BytedTsinghua-SIA/DAPO-Math-17k's `prompt[0].content`),
`solution` the ground truth, then DAPO's own columns. The problem of the first is MATH-500's
test/intermediate_algebra/1247, whose MATH-500 record is written here too, so nothing needs ../shared.
"""

import json
from importlib import resources

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdd import data
from sdd.errors import SddError

MATH500_RECORD = {
    "problem": "For some real numbers $a$ and $b$, the equation \\[\n8x^3 + 4ax^2 + 2bx + a = 0\n\\]has three "
               "distinct positive roots. If the sum of the base-2 logarithms of the roots is 5, what is the value of $a$?",
    "solution": "Let $r_1, r_2$, and $r_3$ be the roots. Then \\[\n5= \\log_2r_1 + \\log_2 r_2 + \\log_2 r_3 = "
                "\\log_2r_1r_2r_3,\n\\]so $r_1r_2r_3 = 2^5 = 32$. Since \\[\n8x^{3}+4ax^{2}+2bx+a=8(x-r_1)(x-r_2)(x-r_3),"
                "\n\\]it follows that $a = -8r_1r_2r_3= \\boxed{-256}$.",
    "answer": "-256",
    "subject": "Intermediate Algebra",
    "level": 3,
    "unique_id": "test/intermediate_algebra/1247.json",
}

DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of the form "
               "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


def dapo_row(problem: str, answer: str, index: str) -> dict:
    message = DAPO_PREFIX + problem + DAPO_SUFFIX
    return {
        "prompt": message,
        "solution": answer,
        "data_source": "math_dapo",
        "source_prompt": [{"content": message, "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": index},
    }


DAPO_ROWS = [
    dapo_row(MATH500_RECORD["problem"], "-256", "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"),
    dapo_row("In triangle $ABC$, $\\sin \\angle A = \\frac{4}{5}$ and $\\angle A < 90^\\circ$. Let $D$ be a point "
             "outside triangle $ABC$ such that $\\angle BAD = \\angle DAC$ and $\\angle BDC = 90^\\circ$. Suppose "
             "that $AD = 1$ and that $\\frac{BD}{CD} = \\frac{3}{2}$. If $AB + AC$ can be expressed in the form "
             "$\\frac{a\\sqrt{b}}{c}$ where $a, b, c$ are pairwise relatively prime integers, find $a + b + c$.",
             "34", "b426d104-244d-4831-a2c4-cd756b61700a"),
    dapo_row("Let $ABCD$ be a unit square in the plane. Points $X$ and $Y$ are chosen independently and uniformly "
             "at random on the perimeter of $ABCD$. If the expected value of the area of triangle $\\triangle AXY$ "
             "can be expressed as $\\frac{m}{n}$, for relatively prime positive integers $m$ and $n$, compute $m+n$.",
             "113", "6ff0b17f-7e5c-4ae2-85f2-59b6bd0cd0f5"),
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    """A real fast tokenizer carrying Qwen3's own chat template (TRL ships Qwen3's original)."""
    from sdd.toy import build_tokenizer

    tokenizer = build_tokenizer([MATH500_RECORD["problem"], data.INSTRUCTION], vocab_size=300)
    tokenizer.chat_template = (resources.files("trl") / "chat_templates" / "qwen3.jinja").read_text()
    return tokenizer


def test_dapo_record_renders_the_same_prompt_as_the_math500_record(tmp_path, qwen3_tokenizer):
    write_jsonl(tmp_path / "dapo-math.jsonl", DAPO_ROWS)
    write_jsonl(tmp_path / "math500.jsonl", [MATH500_RECORD])
    dapo_source = data.resolve("dapo-math", data_dir=tmp_path)
    dapo = data.load(dapo_source)
    math500 = data.load(data.resolve("math500", data_dir=tmp_path))
    assert dapo[0]["problem"] == math500[0]["problem"]
    assert dapo[0]["answer"] == math500[0]["answer"] == "-256"
    kwargs = {"enable_thinking": False}
    rendered = [data.render_prompt(qwen3_tokenizer, r["problem"], kwargs) for r in (dapo[0], math500[0])]
    assert rendered[0] == rendered[1]
    assert "Answer:" not in rendered[0] and "Solve the following" not in rendered[0]
    # Qwen3's template really ran: its turn markers and the empty think block of enable_thinking=False.
    assert rendered[0].startswith("<|im_start|>user\n" + MATH500_RECORD["problem"] + "\n" + data.INSTRUCTION)
    assert rendered[0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    for record, row in zip(dapo, DAPO_ROWS, strict=True):
        assert record["problem"] in row["prompt"] and not record["problem"].startswith(("Solve", "\n"))
        assert not record["problem"].endswith(("\n", '"Answer:".'))


def test_dapo_hub_columns_from_parquet_are_stripped(tmp_path):
    """The hub dataset's own column types (struct and list columns) through the parquet reader."""
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(DAPO_ROWS), path)
    source = data.DataSource("dapo-math", path, None, None, "prompt", "solution", "plain", prompt_format="dapo")
    records = data.load(source)
    assert [r["answer"] for r in records] == ["-256", "34", "113"]
    assert records[0]["problem"] == MATH500_RECORD["problem"]
    assert all("Answer" not in r["problem"] for r in records)


def test_dapo_math_is_declared_dapo_on_the_hub_and_locally(tmp_path):
    assert data.resolve("dapo-math").prompt_format == "dapo"
    assert data.resolve("dapo-math").hub_id == "open-r1/DAPO-Math-17k-Processed"
    write_jsonl(tmp_path / "dapo-math.jsonl", DAPO_ROWS)
    assert data.resolve("dapo-math", data_dir=tmp_path).prompt_format == "dapo"
    # Other benchmarks keep their text as it is.
    write_jsonl(tmp_path / "math500.jsonl", [MATH500_RECORD])
    assert data.resolve("math500", data_dir=tmp_path).prompt_format == "plain"


def test_wrapper_whitespace_variants_are_recognised():
    problem = "What is $1+1$?"
    squeezed = DAPO_PREFIX.replace("\n\n", " ") + problem + DAPO_SUFFIX.replace("\n\n", "\n") + "\n"
    assert data.strip_dapo_wrapper(squeezed) == problem
    assert data.strip_dapo_wrapper(DAPO_PREFIX + problem) is None  # half a wrapper is not DAPO's format
    assert data.strip_dapo_wrapper(problem) is None
    assert data.strip_dapo_wrapper(DAPO_PREFIX + DAPO_SUFFIX) is None  # a wrapper around nothing


def test_a_record_without_the_wrapper_in_a_dapo_dataset_stops_the_load(tmp_path):
    rows = [DAPO_ROWS[0], {**DAPO_ROWS[1], "prompt": "What is $1+1$? Put the final answer in a box."}]
    write_jsonl(tmp_path / "dapo-math.jsonl", rows)
    with pytest.raises(SddError, match=r"record 1: 'prompt' is not in DAPO's format"):
        data.load(data.resolve("dapo-math", data_dir=tmp_path))
    # The same file named by path is an ordinary dataset: its prompts are used as they are.
    records = data.load(data.resolve(str(tmp_path / "dapo-math.jsonl"), problem_column="prompt",
                                     answer_column="solution"))
    assert records[1]["problem"] == rows[1]["prompt"]
