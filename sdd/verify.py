r"""Is a model's final answer mathematically the gold answer? The GRPO reward and the eval metric.

Every verdict is bounded in time wherever it runs: the main thread, TRL's reward threads (where
math-verify's own `signal.alarm` timeouts raise ValueError), and daemonic DataLoader workers (where
`multiprocessing` may not start children). sympy can spend minutes inside one C-level big-integer
operation that no signal interrupts, so the judging happens in child processes started with
`subprocess` (allowed from daemonic processes) and killed when an item passes its deadline; that item
scores 0 and the rest of the batch goes on in a fresh child. This module is the answer policy; the
children are `sdd.verify_pool` (the pool) and `sdd._verify_worker` (one child).

Most verdicts never reach a child: an answer and a gold that are both plain rationals (12, 27.0,
\frac{3}{4}, 3/4) are compared exactly in Python, which is math-verify's own verdict for them (all of
AIME and GSM8K, ~70% of MATH-500); an answer identical to a gold already known to parse is correct at
once; repeated (answer, gold) pairs in a batch are judged once.

Policy on golds that do not parse (decided here, relied on by eval and GRPO): an empty gold, or one
math-verify cannot turn into a sympy object, scores 0 for every completion, even one that boxes the
identical characters. A gold that does not parse is a data bug (a truncated extraction, a stray brace);
rewarding a byte-for-byte copy of it would teach imitation of the bug, and no mathematically equal
answer could ever score against it, so the score would measure formatting, not maths. Every gold in
MATH-500, AIME 2024/2025 and AMC 2023 parses, so the rule costs nothing on real benchmarks.

Answers in words, letters and units (decided case by case against math-verify 0.9 on MATH-500's and
MATH-train's real golds; tests/test_verify.py holds every case as a table):
- Multiple-choice letters: math-verify already equates gold \text{(C)} with C, (C), \text{C},
  \textbf{(C)} and \mathrm{(C)}; kept. A letter with its choice's value (\textbf{(C)}\ 12) stays
  wrong: the value cannot be checked against choice C here, and "letter, then anything" would pay
  for "(C) or (D)". A lowercase c for gold (C) is math-verify's verdict (correct), kept.
- Lists of letters ("enter the letters of the correct options, separated by commas"): math-verify
  reads gold \text{B, D} as one symbol and the usual answer B, D as a set, so they never matched.
  Decided here: when gold and answer are both comma-separated lists of capital letters (each
  optionally in parentheses, \text{}/\textbf{}/\mathrm{}/\mbox{} wrappers and $ removed), they are
  equal when they hold the same set of letters, in any order ("alphabetical order" in a problem is
  formatting, not the answer). Wrong letters, missing or extra ones stay wrong; a duplicate letter
  leaves the pair to math-verify. A block of letters with no commas (gold \text{ACF}) is not split:
  it cannot be told from a word (\text{VW}, \text{MAKE}), so math-verify's verdict holds (ACF
  equals ACF only).
- Golds that are text (\text{Monday}, \text{east}, \text{June 20}, \text{1:03 PM}): math-verify
  already accepts \text{Monday}, Monday, \textbf{Monday}, \text{monday}; but it turns the bare
  words of June 20 or 1:03 PM into products of letters, so they never matched. Decided here: when
  the gold is wholly one text command, an answer whose text, with the same wrappers, $ and spacing
  commands removed, equals the gold's text up to case, runs of spaces and a final period is correct.
  Anything else goes to math-verify (so \text{13} still equals 13); Tuesday for Monday, p.m. for PM,
  "Navin (Mauritius)" for Navin stay wrong.
- Units in the gold (5\text{ cm}, 864 \mbox{ inches}^2, \frac{270}7\text{ degrees}, 5.4 \text{
  cents}): math-verify drops the unit from gold and answer, so 5, 5 cm, 5\,\text{cm}, 5\text{
  centimeters} and \frac{270}{7}^\circ are all correct and 50 (or 50 \text{ mm}: units are not
  converted) is wrong; kept. A ~ (LaTeX's unbreakable space, 5~\text{cm}) made math-verify give
  up, so ~ reads as a space. A unit written as bare letters (15 cm^2) is algebra to math-verify
  (15 c m^2) and stays wrong: dropping letters would make 15x equal 15.
These rules run in the parent, after the plain-rational fast path and before any child: linear
regexes on at most MAX_ANSWER_CHARS characters of answer and gold, so they add no unbounded work.

Measured on the 2-core development machine under a load of ~4 (tests/test_verify.py prints these):
GRPO batches of 512 (64 problems x 8 completions, half correct) score at ~200,000/s when golds are
integers, ~700/s on the MATH mix, ~300-450/s when every gold is LaTeX: a new LaTeX answer costs
math-verify 3-15 ms of CPU (its ANTLR parser), in or out of a child. A child starts in ~0.4 s (import
of sympy), paid on first use and after each kill. Pathological answers return in the soft budget
(0.8 x VERIFY_TIMEOUT_S) or, when stuck in C, at VERIFY_TIMEOUT_S plus a restart.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from fractions import Fraction

from sdd import verify_pool
from sdd.errors import SddError


def _timeout_from_env() -> float:
    raw = os.environ.get("SDD_VERIFY_TIMEOUT_S")
    if raw is None or raw.strip() == "":
        return 3.0
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise SddError(f"SDD_VERIFY_TIMEOUT_S must be a positive number of seconds, got {raw!r}")
    return seconds


VERIFY_TIMEOUT_S: float = _timeout_from_env()
"""Wall-clock bound on judging one answer (env SDD_VERIFY_TIMEOUT_S, default 3 s)."""

VERIFY_WORKERS: int = verify_pool.size_from_env()
"""Verification child processes per Python process (env SDD_VERIFY_WORKERS; default cpus // 4, 1-4)."""

MAX_ANSWER_CHARS = 1000
"""Boxed answers longer than this score 0 unparsed: no real answer is that long, and parsing cost grows
with length (a 5,000-level \\frac nest takes seconds just to tokenise)."""

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# An escaped character (so \{ and \} are not grouping braces, and \\ is one unit) or a brace.
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)
_SPACE_FORM_TOKEN = re.compile(r"[^\s$]+")
# Exact rationals written plainly: 12, -12, 27.0 (AMC golds are stored as floats), \frac{3}{4},
# \dfrac{3}{4}, -\tfrac{3}{4}, 3/4. Anything else (decimals, \frac43, 10\%) goes to math-verify.
_PLAIN_RATIONAL = re.compile(
    r"(?P<minus>-?)\s*(?:"
    r"(?P<integer>\d{1,300})(?:\.0+)?"
    r"|\\[dt]?frac\s*\{\s*(?P<numerator>\d{1,300})\s*\}\s*\{\s*(?P<denominator>\d{1,300})\s*\}"
    r"|(?P<slash_numerator>\d{1,300})\s*/\s*(?P<slash_denominator>\d{1,300})"
    r")"
)
# Words and letters written as text; their content (no braces inside) is what counts.
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textrm|textit|textsf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
# Spacing a model puts between words or between a number and its unit.
_SPACING = re.compile(r"\\(?:[ ,;:!]|quad|qquad)|(?<!\\)~")
_TILDE = re.compile(r"(?<!\\)~")
_CHOICE_LETTER = re.compile(r"\(?([A-Z])\)?")


def extract_boxed(text: str) -> str | None:
    r"""The content of the last \boxed{...} (or \fbox{...}, or "\boxed 5") in `text`.

    None when there is no box, or when the last one is never closed: a completion cut off inside its
    final box has no final answer, and an earlier box is not it. Braces escaped as \{ \} do not count
    as grouping. The space form takes the run up to whitespace or "$", minus trailing punctuation
    ("the answer is \boxed 5." gives "5").
    """
    if not isinstance(text, str):
        return None
    box_ends = [match.end() for match in _BOX_COMMAND.finditer(text)]
    for box_end in reversed(box_ends):
        position = box_end
        while position < len(text) and text[position].isspace():
            position += 1
        if position < len(text) and text[position] == "{":
            return _braced_group(text, position)
        if position > box_end and position < len(text):
            token = _SPACE_FORM_TOKEN.match(text, position)
            content = token.group(0).rstrip(".,;:") if token else ""
            if content:
                return content
        # "\boxed" as a word in prose, not a box: keep looking further back.
    return None


def _braced_group(text: str, open_brace: int) -> str | None:
    depth = 0
    for match in _BRACE_OR_ESCAPE.finditer(text, open_brace):
        token = match.group(0)
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : match.start()]
    return None


def is_correct(completion: str, gold: str) -> bool:
    """Whether the last boxed answer in `completion` is equivalent to `gold` (see the module docstring)."""
    return score_completions([completion], [gold])[0] == 1.0


def score_completions(completions: Sequence[str], golds: Sequence[str]) -> list[float]:
    """1.0 or 0.0 per completion; each item is bounded by VERIFY_TIMEOUT_S plus a child restart."""
    if len(completions) != len(golds):
        raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
    scores = [0.0] * len(completions)
    # GRPO groups repeat (answer, gold) pairs; each distinct pair is judged once.
    undecided: dict[tuple[str, str], list[int]] = {}
    for index, (completion, gold) in enumerate(zip(completions, golds, strict=True)):
        verdict = _decide_without_worker(completion, gold)
        if isinstance(verdict, tuple):
            undecided.setdefault(verdict, []).append(index)
        elif verdict:
            scores[index] = 1.0
    if undecided:
        pairs = list(undecided)
        for pair, equivalent in zip(pairs, _judge_in_worker(pairs), strict=True):
            if equivalent:
                for index in undecided[pair]:
                    scores[index] = 1.0
    return scores


def math_reward(prompts, completions, answer=None, **kwargs) -> list[float]:
    """GRPO reward: 1.0 when the completion's last boxed answer equals the row's `answer` column.

    TRL calls `reward(prompts=..., completions=..., completion_ids=..., <dataset columns>=...)` and
    logs it as rewards/math_reward/mean. Completions are strings, or (conversational datasets) lists
    of messages whose assistant contents are joined.
    """
    if answer is None:
        columns = sorted(
            key for key in kwargs if key not in ("completion_ids", "trainer_state", "log_extra", "log_metric")
        )
        raise SddError(
            f"math_reward needs the gold answers in a dataset column named 'answer'; the dataset has {columns}"
        )
    texts = [_completion_text(completion) for completion in completions]
    return score_completions(texts, list(answer))


def golds_usable(golds: Sequence[str]) -> list[bool]:
    """Whether each gold can ever score 1: the gold itself, boxed verbatim, must verify against it.

    That is the module's gold policy turned into a data filter (empty, unparsable, unbalanced-brace or
    overlong golds fail), for loaders that drop broken records before training on them. Batched, so
    the pool parses many golds in parallel; plain rationals never reach a child.
    """
    completions = ["\\boxed{" + _gold_text(gold) + "}" for gold in golds]
    return [score == 1.0 for score in score_completions(completions, list(golds))]


def gold_is_usable(gold: str) -> bool:
    """`golds_usable` for one gold (a child round trip each: prefer the batch form for datasets)."""
    return golds_usable([gold])[0]


def _completion_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    parts = []
    for message in completion:
        if message.get("role", "assistant") != "assistant":
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):  # multimodal form: [{"type": "text", "text": ...}, ...]
            parts.extend(part.get("text", "") for part in content if isinstance(part, dict))
    return "\n".join(parts)


def _gold_text(gold) -> str:
    if gold is None or isinstance(gold, bool):
        return ""
    if isinstance(gold, float) and not math.isfinite(gold):
        return ""
    return str(gold).strip()


def _plain_rational(latex: str) -> Fraction | None:
    match = _PLAIN_RATIONAL.fullmatch(latex)
    if match is None:
        return None
    if match["integer"] is not None:
        value = Fraction(int(match["integer"]))
    else:
        numerator = match["numerator"] or match["slash_numerator"]
        denominator = int(match["denominator"] or match["slash_denominator"])
        if denominator == 0:
            return None  # sympy's zoo; leave it to math-verify
        value = Fraction(int(numerator), denominator)
    return -value if match["minus"] else value


def _collapse_space(latex: str) -> str:
    return " ".join(latex.split())


def _decide_without_worker(completion: str, gold) -> bool | tuple[str, str]:
    """True/False when the verdict is certain here, else the (answer, gold) pair the child must judge."""
    answer = extract_boxed(completion)
    if answer is None:
        return False
    answer = answer.strip()
    gold = _gold_text(gold)
    if not answer or not gold or len(answer) > MAX_ANSWER_CHARS:
        return False
    if "~" in answer or "~" in gold:  # LaTeX's unbreakable space, which math-verify cannot read
        answer, gold = _TILDE.sub(" ", answer).strip(), _TILDE.sub(" ", gold).strip()
        if not answer or not gold:
            return False
    answer_value, gold_value = _plain_rational(answer), _plain_rational(gold)
    if answer_value is not None and gold_value is not None:
        # math-verify compares two sympy Rationals exactly (Integer ==, or simplify(a - b) == 0), and
        # 27.0 rounds to 27 at its 6 decimals, so exact comparison here is its verdict, ~1,000x faster.
        return answer_value == gold_value
    as_words = _compare_as_words(answer, gold)
    if as_words is not None:
        return as_words
    if _collapse_space(answer) == _collapse_space(gold) and _gold_parses.get(gold):
        return True
    return (answer, gold)


def _plain_words(latex: str) -> str | None:
    """The text of `latex` with text commands, $ and spacing removed, casefolded; None if LaTeX remains."""
    previous = None
    while previous != latex:  # nested wrappers: \text{\textbf{C}}
        previous, latex = latex, _TEXT_COMMAND.sub(lambda match: match.group(1), latex)
    latex = _SPACING.sub(" ", latex.replace("$", ""))
    if any(char in latex for char in "\\{}"):
        return None
    words = " ".join(latex.split()).removesuffix(".").strip()
    return words.casefold() or None


def _choice_letters(latex: str) -> frozenset[str] | None:
    """The letters of "B, D" / "(B), (D)" / \text{B, D}; None unless every item is one capital letter."""
    previous = None
    while previous != latex:
        previous, latex = latex, _TEXT_COMMAND.sub(lambda match: match.group(1), latex)
    items = [item.strip() for item in _SPACING.sub(" ", latex.replace("$", "")).strip().removesuffix(".").split(",")]
    letters = []
    for item in items:
        match = _CHOICE_LETTER.fullmatch(item)
        if match is None:
            return None
        letters.append(match.group(1))
    return frozenset(letters) if len(set(letters)) == len(letters) else None


def _compare_as_words(answer: str, gold: str) -> bool | None:
    """The verdicts decided in the module docstring for letters and text golds; None: ask math-verify."""
    if len(gold) > MAX_ANSWER_CHARS:
        return None
    gold_letters = _choice_letters(gold)
    if gold_letters is not None:
        answer_letters = _choice_letters(answer)
        if answer_letters is not None:
            return answer_letters == gold_letters
    if _TEXT_COMMAND.fullmatch(gold):
        gold_words = _plain_words(gold)
        if gold_words is not None and _plain_words(answer) == gold_words:
            return True
    return None


# gold -> whether math-verify parsed it, as a child reported; enables the identical-string path.
_gold_parses: dict[str, bool] = {}
_GOLD_PARSES_MAX = 100_000


def _judge_in_worker(pairs: Sequence[tuple[str, str]]) -> list[bool]:
    """math-verify's verdict on each (answer, gold) from the pool; an item that misses its deadline is False.

    The bound and the pool size are read here, at call time, so a change to VERIFY_TIMEOUT_S or
    VERIFY_WORKERS applies to the next batch.
    """
    verdicts = []
    for (_answer, gold), (equivalent, gold_ok) in zip(
        pairs, verify_pool.judge(pairs, timeout_s=VERIFY_TIMEOUT_S, workers=VERIFY_WORKERS), strict=True
    ):
        verdicts.append(equivalent)
        if gold_ok is not None:
            if len(_gold_parses) >= _GOLD_PARSES_MAX:
                _gold_parses.clear()
            _gold_parses[gold] = gold_ok
    return verdicts
