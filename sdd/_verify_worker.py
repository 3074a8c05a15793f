"""The child process in which `sdd.verify` runs math-verify; `sdd.verify` starts, feeds and kills it.

Why a separate process: sympy can spend minutes inside one C-level big-integer operation
(``2^{2^{2^{100}}}`` compared with ``5`` evaluates the power), and no signal handler runs until that
call returns. Only killing the process bounds it. Everything slow or dangerous lives here so the
parent (a trainer, a DataLoader worker, a reward thread) stays responsive.

Protocol, one JSON object per line: the parent sends ``{"a": answer, "g": gold}``; the worker answers
``{"ok": bool, "gold_ok": bool | null, "timeout": bool, "s": seconds}`` in the same order, after a first ``{"ready": true}``
line once the imports are done (so start-up is not charged to the first item's deadline).

Three bounds, cheapest first:
- a per-item wall-clock itimer (``argv[1]`` seconds) that raises inside Python-level loops, so the
  common slow case (a long simplify) costs 0 and no restart;
- a per-item CPU-time rlimit, so a worker stuck in C code dies even if its parent died and cannot
  kill it (an orphan must not burn a shared core forever);
- an address-space rlimit, so a power of ten with ten billion digits fails with MemoryError instead
  of swapping the machine. The parent's kill on its own deadline is the bound that always holds.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import sys
import time

ITEM_BUDGET_S_DEFAULT = 2.5
# sympy + math-verify need ~70 MB of address space; 1 GiB leaves room for honest simplify calls.
ADDRESS_SPACE_LIMIT_MB = int(os.environ.get("SDD_VERIFY_MEM_MB", "1024"))
# Verdicts and parsed golds repeat within a GRPO group (G completions share one gold, and often one
# answer); the caps keep a long run's memory flat.
VERDICT_CACHE_MAX = 50_000
GOLD_CACHE_MAX = 10_000


class ItemDeadline(BaseException):
    """Raised by the itimer; a BaseException so math-verify's `except Exception` cannot swallow it."""


_inside_item = False


def _on_alarm(signum, frame):
    if _inside_item:
        raise ItemDeadline


def _limit_address_space() -> None:
    limit = ADDRESS_SPACE_LIMIT_MB * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _cpu_seconds_used() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _arm_cpu_limit(budget_s: float) -> None:
    """SIGXCPU (default action: terminate) once this item has used its budget plus slack in CPU time."""
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = int(_cpu_seconds_used() + 2 * budget_s + 2)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


class Judge:
    """math-verify with its own signal timeouts off: they share SIGALRM with our itimer."""

    def __init__(self) -> None:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

        self._parse = parse
        self._verify = verify
        self._extraction = [LatexExtractionConfig(), ExprExtractionConfig()]
        self._gold_cache: dict[str, list] = {}
        self._verdict_cache: dict[tuple[str, str], tuple[bool, bool]] = {}

    def _parse_boxed(self, latex: str) -> list:
        # Wrapped in \boxed{} because math-verify's extraction is tuned for boxed final answers and,
        # unlike $...$, a "$" inside the answer cannot end the span early.
        return self._parse("\\boxed{" + latex + "}", extraction_config=self._extraction, parsing_timeout=None)

    def _gold(self, gold: str) -> list:
        parsed = self._gold_cache.get(gold)
        if parsed is None:
            parsed = self._parse_boxed(gold)
            if len(self._gold_cache) >= GOLD_CACHE_MAX:
                self._gold_cache.clear()
            self._gold_cache[gold] = parsed
        return parsed

    def judge(self, answer: str, gold: str) -> tuple[bool, bool]:
        """(answer is equivalent to gold, gold parsed to a sympy object)."""
        key = (answer, gold)
        cached = self._verdict_cache.get(key)
        if cached is not None:
            return cached
        gold_parsed = self._gold(gold)
        # parse() also returns the raw string as a fallback; a gold that is ONLY that string did not
        # parse, and verify() would then accept any answer with the same characters.
        gold_ok = any(not isinstance(item, str) for item in gold_parsed)
        ok = False
        if gold_ok:
            ok = bool(self._verify(gold_parsed, self._parse_boxed(answer), timeout_seconds=None))
        if len(self._verdict_cache) >= VERDICT_CACHE_MAX:
            self._verdict_cache.clear()
        self._verdict_cache[key] = (ok, gold_ok)
        return ok, gold_ok


def main() -> None:
    global _inside_item
    budget_s = float(sys.argv[1]) if len(sys.argv) > 1 else ITEM_BUDGET_S_DEFAULT
    # math-verify warns on every timeout and on "timeouts disabled"; the parent reports what matters.
    logging.disable(logging.WARNING)
    _limit_address_space()
    # SIGXCPU's default action dumps core; a 1 GiB core file in the user's run directory helps nobody.
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    signal.signal(signal.SIGALRM, _on_alarm)
    # The parent kills us with SIGKILL; SIGINT from a terminal's Ctrl-C goes to the parent's group too
    # and must not print a traceback from here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The protocol owns the real stdout; anything a library prints (Python or C) goes to stderr
    # instead of corrupting a reply line.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="ascii")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    judge = Judge()
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        # gold_ok is None when the item did not finish: the parent then learns nothing about the gold.
        ok, gold_ok, timed_out = False, None, False
        started = time.perf_counter()
        _arm_cpu_limit(budget_s)
        signal.setitimer(signal.ITIMER_REAL, budget_s)
        _inside_item = True
        try:
            ok, gold_ok = judge.judge(request["a"], request["g"])
            _inside_item = False
        except ItemDeadline:
            timed_out = True
        except Exception:
            # RecursionError from deep nesting, MemoryError from huge numbers, sympy errors on
            # malformed LaTeX: the answer was not shown equivalent.
            ok = False
        finally:
            _inside_item = False
            signal.setitimer(signal.ITIMER_REAL, 0)
        elapsed_s = time.perf_counter() - started
        out.write(json.dumps({"ok": ok, "gold_ok": gold_ok, "timeout": timed_out, "s": round(elapsed_s, 4)}))
        out.write("\n")
        out.flush()


if __name__ == "__main__":
    main()
