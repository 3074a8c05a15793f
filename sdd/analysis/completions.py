"""Capability boundary and diversity: what training changed in what a model writes, from its samples.

The research sdd is built on claims that RL raises pass@1 while the set of problems solved at large k
shrinks, and that it collapses the variety of answers and formats. These measures check it as pure
functions over K verified samples per problem (rows as `sdd.samples` files hold them);
docs/analyze.md gives every definition.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from sdd import stats

# --------------------------------------------------------------------------------------------------
# Capability boundary.


def pass_at_k_curve(correct: Sequence[Sequence[bool]], max_k: int) -> list[float]:
    """[pass@1, ..., pass@max_k], mean over problems of the unbiased estimator (sdd.stats.pass_at_k)."""
    curve = stats.pass_at_k_curve(correct, range(1, max_k + 1))
    return [curve[k] for k in range(1, max_k + 1)]


def capability(ids: Sequence[str], correct_from: Sequence[Sequence[bool]], correct_to: Sequence[Sequence[bool]]
               ) -> dict:
    """pass@k curves of both checkpoints on the same problems, and which problems each alone solves.

    A problem is solved "at some k <= K" exactly when at least one of its K samples is correct, so
    `lost` is every problem the earlier checkpoint solved at least once and the later never did,
    `gained` the reverse. `crossover_k` is the first k at which the earlier checkpoint's curve
    catches up with a later one that started higher (the "RL narrows the boundary" signature).
    """
    if not (len(ids) == len(correct_from) == len(correct_to)) or not ids:
        raise ValueError("capability needs the same, non-empty list of problems for both checkpoints")
    samples = {len(row) for row in (*correct_from, *correct_to)}
    if len(samples) != 1:
        raise ValueError(f"capability needs the same number of samples per problem for both, got {sorted(samples)}")
    max_k = samples.pop()
    curve_from, curve_to = pass_at_k_curve(correct_from, max_k), pass_at_k_curve(correct_to, max_k)
    counts_from = [int(sum(map(bool, row))) for row in correct_from]
    counts_to = [int(sum(map(bool, row))) for row in correct_to]
    crossover = None
    if curve_to[0] > curve_from[0]:
        crossover = next((k for k in range(1, max_k + 1) if curve_from[k - 1] >= curve_to[k - 1]), None)
    return {
        "k": list(range(1, max_k + 1)),
        "pass_at_k": {"from": curve_from, "to": curve_to},
        "problems": len(ids),
        "samples_per_problem": max_k,
        "solved": {"from": sum(c > 0 for c in counts_from), "to": sum(c > 0 for c in counts_to)},
        "lost": [i for i, a, b in zip(ids, counts_from, counts_to, strict=True) if a > 0 and b == 0],
        "gained": [i for i, a, b in zip(ids, counts_from, counts_to, strict=True) if a == 0 and b > 0],
        "crossover_k": crossover,
        "ids": list(ids),
        "correct_counts": {"from": counts_from, "to": counts_to},
    }


# --------------------------------------------------------------------------------------------------
# Diversity.

# A line that starts like a list item: "Step 2", "2." / "2)", or a bullet.
_ENUMERATED_STEP = re.compile(r"(?im)^\s*(?:step\s*\d+\b|\d+[.)]\s|[-*\u2022]\s)")


def normalized_answer(text: str) -> str | None:
    r"""The last \boxed{} content with whitespace collapsed; None when the completion boxes nothing."""
    from sdd.verify import extract_boxed

    answer = extract_boxed(text)
    return None if answer is None else " ".join(answer.split())


def distinct_answer_rate(texts: Sequence[str]) -> float:
    """Distinct final answers among one problem's samples / number of samples ("no answer" is one value)."""
    if not texts:
        raise ValueError("distinct_answer_rate needs at least one sample")
    return len({normalized_answer(t) for t in texts}) / len(texts)


def distinct_n(token_ids: Sequence[Sequence[int]], n: int) -> float | None:
    """Distinct n-grams / all n-grams, pooled over one problem's samples (n-grams never cross samples).

    None when no sample has n tokens. 1.0 means no n-gram repeats anywhere; samples that copy each other
    drive it toward 1/K.
    """
    grams = [tuple(ids[i:i + n]) for ids in token_ids for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def length_bucket(tokens: int) -> str:
    """Power-of-two buckets: '0-15', '16-31', '32-63', ... (the first bucket holds the short tail)."""
    if tokens < 16:
        return "0-15"
    low = 1 << (tokens.bit_length() - 1)
    return f"{low}-{2 * low - 1}"


def format_signature(text: str, tokens: int) -> str:
    """A coarse shape of a completion: boxed or not, how many '=' steps, enumerated steps, length bucket.

    Fields: "boxed"/"nobox" (a final \\boxed{} answer); "eq=0|1|2|3|4-7|8+" (count of '='); "enum" when at
    least two lines start like list items (Step k, k., k), or a bullet), else "flat"; "len=" the
    power-of-two bucket of the token count.

    Two completions with the same signature look alike to a reader skimming them; the entropy of
    signatures across samples measures how many shapes a model still writes.
    """
    boxed = "boxed" if normalized_answer(text) is not None else "nobox"
    equals = text.count("=")
    eq = str(equals) if equals <= 3 else "4-7" if equals <= 7 else "8+"
    # Two list-like lines, not one: a single line starting "48. " is a sentence ending in a number.
    enum = "enum" if len(_ENUMERATED_STEP.findall(text)) >= 2 else "flat"
    return f"{boxed}|eq={eq}|{enum}|len={length_bucket(tokens)}"


def entropy_bits(values: Sequence) -> float:
    """Shannon entropy (bits) of the empirical distribution of `values`."""
    counts = np.array(list(Counter(values).values()), dtype=float)
    if counts.size == 0:
        raise ValueError("entropy_bits needs at least one value")
    shares = counts / counts.sum()
    return float(-(shares * np.log2(shares)).sum()) + 0.0


def diversity(rows: Sequence[dict]) -> dict:
    """Diversity of K samples per problem: rows with "completions" (texts), "token_ids" and "truncated".

    Per-problem measures are averaged over problems, so a long problem does not weigh more.
    """
    if not rows:
        raise ValueError("diversity needs at least one problem")
    answer_rates, answered, signature_entropies = [], [], []
    distinct = {2: [], 3: []}
    signatures, lengths, truncated = [], [], []
    for row in rows:
        texts, token_ids = row["completions"], row["token_ids"]
        answer_rates.append(distinct_answer_rate(texts))
        answered.extend(normalized_answer(t) is not None for t in texts)
        for n, values in distinct.items():
            value = distinct_n(token_ids, n)
            if value is not None:
                values.append(value)
        row_signatures = [format_signature(t, len(ids)) for t, ids in zip(texts, token_ids, strict=True)]
        signature_entropies.append(entropy_bits(row_signatures))
        signatures.extend(row_signatures)
        lengths.extend(len(ids) for ids in token_ids)
        truncated.extend(bool(t) for t in row["truncated"])
    samples_per_problem = max(len(row["completions"]) for row in rows)
    lengths_n = np.asarray(lengths, dtype=float)
    shares = Counter(signatures)
    return {
        "problems": len(rows),
        "samples_per_problem": samples_per_problem,
        "distinct_answer_rate": float(np.mean(answer_rates)),
        "answered_rate": float(np.mean(answered)),
        "distinct_2": float(np.mean(distinct[2])) if distinct[2] else None,
        "distinct_3": float(np.mean(distinct[3])) if distinct[3] else None,
        "length": {
            "mean": float(lengths_n.mean()), "std": float(lengths_n.std()), "min": int(lengths_n.min()),
            "p10": float(np.percentile(lengths_n, 10)), "p50": float(np.percentile(lengths_n, 50)),
            "p90": float(np.percentile(lengths_n, 90)), "max": int(lengths_n.max()),
            "truncation_rate": float(np.mean(truncated)) if truncated else 0.0,
            "histogram": dict(sorted(Counter(length_bucket(int(n)) for n in lengths).items(),
                                     key=lambda item: int(item[0].split("-")[0]))),
        },
        "format": {
            "entropy_bits": float(np.mean(signature_entropies)),
            "entropy_bits_max": math.log2(samples_per_problem) if samples_per_problem > 1 else 0.0,
            "pooled_entropy_bits": entropy_bits(signatures),
            "signatures": [{"signature": s, "share": c / len(signatures)} for s, c in shares.most_common(10)],
        },
    }

