"""Numbers for eval and the report: pass@k, avg@k, and whether two variants really differ.

The bootstrap is two-level because an eval's noise has two sources: which problems the benchmark
happens to contain (resampled with the SAME indices for both variants, since both ran on the same
problems: pairing removes problem difficulty from the comparison) and which training/sampling seeds we
ran (resampled independently per variant, since seed 0 of one variant has nothing to do with seed 0 of
the other) - unless the two variants share a checkpoint per seed. `no-distill` evaluates the very warmup
checkpoint that `rl-teacher-bridge` goes on to distill from, seed by seed, so seed k's luck is in both;
resampled independently, that shared luck counts twice and the CI is too wide. `paired_seeds=True`
draws one set of seed indices for both (seed k of a with seed k of b), which keeps the shared part
out of the difference, as pairing problems does for problem difficulty.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

# The exact bootstrap enumerates P^P * Sa^Sa * Sb^Sb resamples; past this it is no longer "tiny".
_EXACT_MAX_RESAMPLES = 2_000_000
# Resamples drawn per vectorised block: bounds memory at ~2 * block * problems * 8 bytes (33 MB for
# 500 problems), while 10,000 resamples of 500 problems x 3 seeds take ~0.2 s.
_BLOCK = 4096


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021).

    1 - C(n-c, k) / C(n, k) written as the product prod_{i=n-c+1}^{n} (1 - k/i): binomials of n=1000
    overflow floats, the product of terms in [0, 1] does not.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"pass_at_k needs integer {name}, got {value!r}")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} is undefined with {n} samples per problem (need 1 <= k <= n)")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_curve(correct: Sequence[Sequence[bool]], ks: Sequence[int]) -> dict[int, float]:
    """{k: mean over problems of pass@k}, from correct[problem][sample]; problems may differ in n."""
    if len(correct) == 0:
        raise ValueError("pass_at_k_curve needs at least one problem")
    counts = [(len(samples), int(sum(bool(s) for s in samples))) for samples in correct]
    return {int(k): float(np.mean([pass_at_k(n, c, int(k)) for n, c in counts])) for k in ks}


def avg_at_k(correct: Sequence[Sequence[bool]]) -> tuple[float, float]:
    """(mean accuracy over problems x samples, std across the k sample sets).

    Sample set j is the j-th sample of every problem: one full pass over the benchmark, i.e. what a
    single greedy-style eval would have scored. The std of the k per-set accuracies (ddof=1; 0.0 for
    k = 1) is the run-to-run spread a reader should expect from one pass.
    """
    correct_pk = _as_matrix(correct, "avg_at_k")
    per_set_accuracy_k = correct_pk.mean(axis=0)
    spread = float(np.std(per_set_accuracy_k, ddof=1)) if per_set_accuracy_k.size > 1 else 0.0
    return float(correct_pk.mean()), spread


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with ddof=1); std is 0.0 for a single value rather than NaN."""
    values_n = np.asarray(values, dtype=float).ravel()
    if values_n.size == 0:
        raise ValueError("mean_std needs at least one value")
    spread = float(np.std(values_n, ddof=1)) if values_n.size > 1 else 0.0
    return float(values_n.mean()), spread


def bootstrap_diff_ci(
    a,
    b,
    *,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    paired_seeds: bool = False,
) -> dict:
    """Percentile CI of mean(a) - mean(b) by a paired-problems bootstrap over seeds.

    a: (seeds_a, problems), b: (seeds_b, problems): per-seed, per-problem accuracy of two variants on
    the same problems (a 1-D array is one seed). Seeds are resampled independently per variant, or
    jointly with `paired_seeds` (row k of a and row k of b come from one shared seed-k checkpoint;
    needs the same number of rows). Returns diff (on the original data), lo, hi, confidence,
    significant (0 outside [lo, hi]), n_resamples and paired_seeds.
    """
    a_sp, b_sp = _check_pair(a, b, paired_seeds)
    _check_level(confidence)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    diffs_r = bootstrap_diffs(a_sp, b_sp, n_resamples=n_resamples, seed=seed, paired_seeds=paired_seeds)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(diffs_r, [tail, 1.0 - tail])
    return _ci_dict(a_sp, b_sp, float(lo), float(hi), confidence, n_resamples, paired_seeds)


def bootstrap_diffs(a, b, *, n_resamples: int = 10_000, seed: int = 0, paired_seeds: bool = False) -> np.ndarray:
    """The n_resamples bootstrap statistics behind `bootstrap_diff_ci` (for plots and for checking).

    One resample draws problem indices (shared by a and b), then seed indices for a and for b (one
    draw for both with `paired_seeds`); its statistic is mean(a[seeds_a][:, problems]) -
    mean(b[seeds_b][:, problems]). The mean over the drawn grid is the mean over drawn seeds of each
    seed's mean over drawn problems, so per seed we gather once (a[s][problem_idx_rp]: a
    cache-friendly take from one row) and never materialise the (resamples, seeds, problems) array.
    """
    a_sp, b_sp = _check_pair(a, b, paired_seeds)
    rng = np.random.default_rng(seed)
    problems = a_sp.shape[1]
    diffs = []
    for start in range(0, n_resamples, _BLOCK):
        block = min(_BLOCK, n_resamples - start)
        problem_idx_rp = rng.integers(0, problems, size=(block, problems))
        means = []
        seed_idx_rs = None
        for scores_sp in (a_sp, b_sp):
            seeds = scores_sp.shape[0]
            # Column s: seed s's mean over this resample's problems.
            problem_mean_rs = np.stack([row[problem_idx_rp].mean(axis=1) for row in scores_sp], axis=1)
            if seed_idx_rs is None or not paired_seeds:
                seed_idx_rs = rng.integers(0, seeds, size=(block, seeds))
            means.append(np.take_along_axis(problem_mean_rs, seed_idx_rs, axis=1).mean(axis=1))
        diffs.append(means[0] - means[1])
    return np.concatenate(diffs)


def bootstrap_diff_ci_exact(a, b, confidence: float = 0.95, paired_seeds: bool = False) -> dict:
    """The same two-level bootstrap with every resample enumerated (tiny inputs only).

    Every (problem indices, seed indices of a, seed indices of b) tuple - or (problem indices, shared
    seed indices) with `paired_seeds` - is equally likely, so the statistic's bootstrap distribution is
    exact; lo/hi are its inverse-CDF quantiles (smallest v with P(diff <= v) >= q). It is the
    reference the Monte-Carlo version is tested against.
    """
    a_sp, b_sp = _check_pair(a, b, paired_seeds)
    _check_level(confidence)
    values, probabilities = exact_bootstrap_distribution(a_sp, b_sp, paired_seeds=paired_seeds)
    cdf = np.cumsum(probabilities)
    tail = (1.0 - confidence) / 2.0
    lo = _inverse_cdf(values, cdf, tail)
    hi = _inverse_cdf(values, cdf, 1.0 - tail)
    return _ci_dict(a_sp, b_sp, lo, hi, confidence, _exact_resamples(a_sp, b_sp, paired_seeds), paired_seeds)


def _exact_resamples(a_sp: np.ndarray, b_sp: np.ndarray, paired_seeds: bool) -> int:
    seeds_a, problems = a_sp.shape
    seeds_b = b_sp.shape[0]
    return problems**problems * seeds_a**seeds_a * (1 if paired_seeds else seeds_b**seeds_b)


def exact_bootstrap_distribution(a, b, *, paired_seeds: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct statistic values, their probabilities) over all equally likely resamples."""
    a_sp, b_sp = _check_pair(a, b, paired_seeds)
    seeds_a, problems = a_sp.shape
    seeds_b = b_sp.shape[0]
    total = _exact_resamples(a_sp, b_sp, paired_seeds)
    if total > _EXACT_MAX_RESAMPLES:
        raise ValueError(f"exact bootstrap would enumerate {total:,} resamples; use bootstrap_diff_ci")
    problem_draws = np.array(list(itertools.product(range(problems), repeat=problems)))
    seed_draws_a = np.array(list(itertools.product(range(seeds_a), repeat=seeds_a)))
    seed_draws_b = np.array(list(itertools.product(range(seeds_b), repeat=seeds_b)))
    # mean over (drawn seeds x drawn problems) for every combination, via per-seed problem means.
    problem_means_a_ps = a_sp[:, problem_draws].mean(axis=2).T  # (problem draws, seeds_a)
    problem_means_b_ps = b_sp[:, problem_draws].mean(axis=2).T
    mean_a_pd = problem_means_a_ps[:, seed_draws_a].mean(axis=2)  # (problem draws, seed draws a)
    mean_b_pd = problem_means_b_ps[:, seed_draws_b].mean(axis=2)
    if paired_seeds:  # the same seed draw for both: the diagonal of the (draws a) x (draws b) grid
        diffs = (mean_a_pd - mean_b_pd).ravel()
    else:
        diffs = (mean_a_pd[:, :, None] - mean_b_pd[:, None, :]).ravel()
    # Round away float noise so equal statistics reached by different sums collapse into one atom.
    values, counts = np.unique(np.round(diffs, 12), return_counts=True)
    return values, counts / counts.sum()


def _inverse_cdf(values: np.ndarray, cdf: np.ndarray, q: float) -> float:
    index = int(np.searchsorted(cdf, q - 1e-12, side="left"))
    return float(values[min(index, len(values) - 1)])


def _ci_dict(a_sp, b_sp, lo: float, hi: float, confidence: float, n_resamples: int, paired_seeds: bool) -> dict:
    return {
        "diff": float(a_sp.mean() - b_sp.mean()),
        "lo": lo,
        "hi": hi,
        "confidence": confidence,
        "significant": not (lo <= 0.0 <= hi),
        "n_resamples": n_resamples,
        "paired_seeds": paired_seeds,
    }


def _check_level(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _check_pair(a, b, paired_seeds: bool = False) -> tuple[np.ndarray, np.ndarray]:
    a_sp = np.atleast_2d(np.asarray(a, dtype=float))
    b_sp = np.atleast_2d(np.asarray(b, dtype=float))
    if a_sp.ndim != 2 or b_sp.ndim != 2:
        raise ValueError(f"expected (seeds, problems) arrays, got shapes {a_sp.shape} and {b_sp.shape}")
    if a_sp.shape[1] != b_sp.shape[1] or a_sp.size == 0 or b_sp.size == 0:
        raise ValueError(
            f"a and b must score the same, non-empty set of problems: shapes {a_sp.shape} and {b_sp.shape}"
        )
    if paired_seeds and a_sp.shape[0] != b_sp.shape[0]:
        raise ValueError(f"paired seeds need the same seeds in a and b, got {a_sp.shape[0]} and {b_sp.shape[0]}")
    if not (np.isfinite(a_sp).all() and np.isfinite(b_sp).all()):
        raise ValueError("a and b must be finite accuracies")
    return a_sp, b_sp


def _as_matrix(correct: Sequence[Sequence[bool]], caller: str) -> np.ndarray:
    lengths = {len(samples) for samples in correct}
    if not correct or lengths == {0}:
        raise ValueError(f"{caller} needs at least one problem with at least one sample")
    if len(lengths) != 1:
        raise ValueError(f"{caller} needs the same number of samples per problem, got {sorted(lengths)}")
    return np.asarray([[bool(s) for s in samples] for samples in correct], dtype=float)
