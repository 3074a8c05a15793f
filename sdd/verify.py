r"""Is a model's final answer mathematically the gold answer? The GRPO reward and the eval metric.

Every verdict is bounded in time wherever it runs: the main thread, TRL's reward threads (where
math-verify's own `signal.alarm` timeouts raise ValueError), and daemonic DataLoader workers (where
`multiprocessing` may not start children). sympy can spend minutes inside one C-level big-integer
operation that no signal interrupts, so the judging happens in child processes started with
`subprocess` (allowed from daemonic processes) and killed when an item passes its deadline; that item
scores 0 and the rest of the batch goes on in a fresh child. See `sdd._verify_worker`.

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

import atexit
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

from sdd.errors import SddError

logger = logging.getLogger(__name__)


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

MAX_ANSWER_CHARS = 1000
"""Boxed answers longer than this score 0 unparsed: no real answer is that long, and parsing cost grows
with length (a 5,000-level \\frac nest takes seconds just to tokenise)."""

WORKER_START_TIMEOUT_S = 60.0
"""Importing sympy takes ~0.5 s idle, but far longer on a 2-core machine shared with training."""

# Share of the deadline the child spends before giving up on its own; it then answers "not
# equivalent" without being killed, which saves the ~0.5 s restart for slow-but-Python-level work.
_SOFT_BUDGET_SHARE = 0.8

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
_GOLD_PARSES_MAX = 100_000
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


# ---- the child processes ------------------------------------------------------------------------

_lock = threading.Lock()
# One slot per child; None until needed (or after a kill). Owned by the process that created them.
_workers: list[_Worker | None] = []
# gold -> whether math-verify parsed it, as a child reported; enables the identical-string path.
_gold_parses: dict[str, bool] = {}
# Children inherited through fork() belong to the parent process: never written to, killed or closed
# here (closing could free descriptors the parent still uses); kept referenced so garbage collection
# does not touch them either.
_inherited_workers: list[_Worker] = []


class _Worker:
    """One `python -m sdd._verify_worker` child speaking JSON lines; at most one item in flight.

    Nothing here blocks: the caller's event loop polls `fd`, so one slow start or slow item never
    stalls the deadlines of the others.
    """

    def __init__(self) -> None:
        package_parent = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        # The child must import this same sdd even when it runs from a checkout, not an install.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        soft_budget_s = VERIFY_TIMEOUT_S * _SOFT_BUDGET_SHARE
        self.owner_pid = os.getpid()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sdd._verify_worker", repr(soft_budget_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env=env,
            close_fds=True,
        )
        self.fd = self.process.stdout.fileno()
        self.ready = False
        self.started_at = time.monotonic()
        self._pending = bytearray()

    def send(self, answer: str, gold: str) -> bool:
        """Write one request; False when the child is gone."""
        # ASCII-only JSON: the child decodes stdin with its locale's encoding, whatever that is.
        request = json.dumps({"a": answer, "g": gold}).encode("ascii") + b"\n"
        try:
            # The idle child reads whole lines, so this completes even past the pipe's capacity.
            written = 0
            while written < len(request):
                written += os.write(self.process.stdin.fileno(), request[written:])
        except OSError:
            return False
        return True

    def read_lines(self) -> list[bytes] | None:
        """The complete lines now readable (after poll said so); None at EOF (the child exited)."""
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return None
        self._pending += chunk
        *lines, rest = self._pending.split(b"\n")
        self._pending = bytearray(rest)
        return lines

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _pool_size_from_env() -> int:
    raw = os.environ.get("SDD_VERIFY_WORKERS")
    if raw is None or raw.strip() == "":
        # math-verify needs 3-15 ms of CPU per new LaTeX answer, so children are the throughput; but a
        # trainer shares the machine, so take at most a quarter of it, and 4 at most per process
        # (a DDP job runs one pool per rank).
        return max(1, min(4, _usable_cpus() // 4))
    if not raw.strip().isdigit() or int(raw) < 1:
        raise SddError(f"SDD_VERIFY_WORKERS must be a whole number >= 1, got {raw!r}")
    return int(raw)


VERIFY_WORKERS: int = _pool_size_from_env()
"""Verification child processes per Python process (env SDD_VERIFY_WORKERS; default cpus // 4, 1-4)."""


def _claim_workers() -> None:
    """Forget children another process made (we are a fork) and size the pool to VERIFY_WORKERS."""
    for slot, worker in enumerate(_workers):
        if worker is not None and worker.owner_pid != os.getpid():
            _inherited_workers.append(worker)
            _workers[slot] = None
    while len(_workers) > VERIFY_WORKERS:
        worker = _workers.pop()
        if worker is not None:
            worker.kill()
    _workers.extend([None] * (VERIFY_WORKERS - len(_workers)))


def _discard_worker(slot: int | None = None) -> None:
    """Kill one child (or all): the next batch starts fresh ones."""
    slots = range(len(_workers)) if slot is None else [slot]
    for index in slots:
        worker = _workers[index]
        if worker is not None and worker.owner_pid == os.getpid():
            worker.kill()
        _workers[index] = None


def _judge_in_worker(pairs: Sequence[tuple[str, str]]) -> list[bool]:
    """math-verify's verdict on each (answer, gold); an item that misses its deadline is False.

    An event loop over the pool: each idle child gets the next item with a deadline of
    VERIFY_TIMEOUT_S from when it was sent; a child that misses it, or exits, is killed, its item
    scores 0, and a fresh child takes its slot for the items still queued.
    """
    verdicts = [False] * len(pairs)
    with _lock:
        _claim_workers()
        queued = list(range(len(pairs)))[::-1]  # popped from the end: first item first
        resent: set[int] = set()
        # slot -> (item index, or None while the child starts; deadline)
        busy: dict[int, tuple[int | None, float]] = {}
        active_slots = range(min(VERIFY_WORKERS, len(pairs)))
        try:
            while queued or busy:
                for slot in active_slots:
                    if slot in busy or not queued:
                        continue
                    worker = _workers[slot]
                    if worker is not None and worker.process.poll() is not None:
                        _discard_worker(slot)  # died between batches
                        worker = None
                    if worker is None:
                        worker = _workers[slot] = _Worker()
                    if not worker.ready:
                        busy[slot] = (None, worker.started_at + WORKER_START_TIMEOUT_S)
                        continue
                    index = queued.pop()
                    if worker.send(*pairs[index]):
                        busy[slot] = (index, time.monotonic() + VERIFY_TIMEOUT_S)
                        continue
                    # The child was gone before it read this item: not the item's fault, so one more try.
                    _discard_worker(slot)
                    if index not in resent:
                        resent.add(index)
                        queued.append(index)
                if busy:
                    _wait_for_replies(pairs, verdicts, busy)
        except BaseException:
            # A child still holding an item would answer the NEXT batch's first request with this
            # batch's verdict; kill it (Ctrl-C, a start-up failure elsewhere in the pool).
            for slot in busy:
                _discard_worker(slot)
            raise
    return verdicts


def _wait_for_replies(pairs, verdicts: list[bool], busy: dict[int, tuple[int | None, float]]) -> None:
    poller = select.poll()  # poll, not select: a trainer can hold more than FD_SETSIZE descriptors
    fd_slots = {}
    for slot in busy:
        fd_slots[_workers[slot].fd] = slot
        poller.register(_workers[slot].fd, select.POLLIN)
    wait_s = min(deadline for _, deadline in busy.values()) - time.monotonic()
    for fd, _event in poller.poll(max(0, math.ceil(wait_s * 1000))):
        slot = fd_slots[fd]
        worker = _workers[slot]
        index, _deadline = busy[slot]
        lines = worker.read_lines()
        if lines is None:  # EOF: the child exited (crash, rlimit)
            del busy[slot]
            _discard_worker(slot)
            if index is None:
                raise SddError(
                    f"the answer-verification process exited during start-up (code {worker.process.returncode}); "
                    f"check that `{sys.executable} -m sdd._verify_worker` runs (it needs math-verify and sympy)"
                )
            logger.warning(
                "the verifier process exited while judging one answer; scored 0 (%r)", pairs[index][0][:80]
            )
            continue
        if not lines:
            continue  # part of a line so far
        # One request in flight per child, so one reply (or the start-up line) per wake-up.
        del busy[slot]
        try:
            reply = json.loads(lines[0])
        except ValueError:
            reply = {}  # not our protocol: treat like a crash
        if not isinstance(reply, dict) or (index is not None and "ok" not in reply):
            _discard_worker(slot)
            continue
        if index is None:
            worker.ready = bool(reply.get("ready"))
            continue
        verdicts[index] = bool(reply["ok"])
        if reply.get("gold_ok") is not None:
            if len(_gold_parses) >= _GOLD_PARSES_MAX:
                _gold_parses.clear()
            _gold_parses[pairs[index][1]] = bool(reply["gold_ok"])
    now = time.monotonic()
    for slot, (index, deadline) in list(busy.items()):
        if now < deadline:
            continue
        del busy[slot]
        _discard_worker(slot)
        if index is None:
            raise SddError(
                f"the answer-verification process did not start within {WORKER_START_TIMEOUT_S:.0f} s; "
                f"check that `{sys.executable} -m sdd._verify_worker` runs"
            )
        logger.warning(
            "verifying one answer took over %.1f s (SDD_VERIFY_TIMEOUT_S); scored 0 and restarted "
            "that verifier process (answer starts %r)",
            VERIFY_TIMEOUT_S,
            pairs[index][0][:80],
        )


def _after_fork_in_child() -> None:
    # Another thread may have held the lock at fork time; in the child nobody would ever release it.
    global _lock
    _lock = threading.Lock()
    _claim_workers()


def _kill_all_at_exit() -> None:
    for slot in range(len(_workers)):
        _discard_worker(slot)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_kill_all_at_exit)
