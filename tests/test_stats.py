"""pass@k, avg@k and the bootstrap CI, each checked against brute force on inputs small enough to enumerate."""

import itertools
import math
import time

import numpy as np
import pytest

from sdd.stats import (
    avg_at_k,
    bootstrap_diff_ci,
    bootstrap_diff_ci_exact,
    bootstrap_diffs,
    exact_bootstrap_distribution,
    mean_std,
    pass_at_k,
    pass_at_k_curve,
)


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (the first c correct) that contain a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration_of_all_k_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 10) == 1.0  # k = n: any correct sample means pass
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is plain accuracy
    # Large n, where C(n, k) overflows a float: still the exact value (checked with integers).
    exact = 1 - math.comb(1000 - 7, 100) / math.comb(1000, 100)
    assert pass_at_k(1000, 7, 100) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("n, c, k", [(4, 1, 5), (4, 1, 0), (4, 5, 1), (4, -1, 1), (0, 0, 1), (4, 1, 1.5)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass_at_k_curve_averages_problems_and_allows_different_sample_counts():
    correct = [[True, False, False, False], [False] * 4, [True] * 3]
    curve = pass_at_k_curve(correct, [1, 2, 3])
    assert curve[1] == pytest.approx((0.25 + 0 + 1) / 3)
    assert curve[2] == pytest.approx((brute_force_pass_at_k(4, 1, 2) + 0 + 1) / 3)
    assert curve[3] == pytest.approx((brute_force_pass_at_k(4, 1, 3) + 0 + 1) / 3)
    with pytest.raises(ValueError):
        pass_at_k_curve(correct, [4])  # the third problem has only 3 samples
    with pytest.raises(ValueError):
        pass_at_k_curve([], [1])


def test_avg_at_k_on_hand_made_matrix():
    # 3 problems x 4 samples; sample sets (columns) score 2/3, 1/3, 1/3, 0.
    correct = [
        [True, True, False, False],
        [True, False, True, False],
        [False, False, False, False],
    ]
    mean, spread = avg_at_k(correct)
    assert mean == pytest.approx(4 / 12)
    per_set = [2 / 3, 1 / 3, 1 / 3, 0.0]
    assert spread == pytest.approx(np.std(per_set, ddof=1))
    assert spread == pytest.approx(math.sqrt(sum((x - 1 / 3) ** 2 for x in per_set) / 3))


def test_avg_at_k_one_sample_has_zero_spread_and_ragged_input_is_rejected():
    assert avg_at_k([[True], [False], [True]]) == (pytest.approx(2 / 3), 0.0)
    # Identical sample sets: no spread even though problems differ.
    assert avg_at_k([[True, True], [False, False]]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        avg_at_k([[True, False], [True]])
    with pytest.raises(ValueError):
        avg_at_k([])


def test_mean_std():
    assert mean_std([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3), pytest.approx(np.std([1, 2, 4], ddof=1)))
    assert mean_std([0.3]) == (0.3, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def exact_quantile(values, probabilities, q):
    cdf = np.cumsum(probabilities)
    return values[min(int(np.searchsorted(cdf, q - 1e-12)), len(values) - 1)]


# Why this tolerance: the Monte-Carlo statistics are R draws from the exact bootstrap distribution F.
# By the Dvoretzky-Kiefer-Wolfowitz inequality P(sup_v |F_R(v) - F(v)| > eps) <= 2 exp(-2 R eps^2);
# with R = 10,000 and eps = 0.02 that is 6.7e-4. So (but for that chance) the empirical CDF is within
# 0.02 of the exact one everywhere, and the empirical q-quantile lies between the exact (q - 0.02)-
# and (q + 0.02)-quantiles. The distributions here are discrete, so a plain |lo_mc - lo_exact| bound
# would be wrong exactly when q sits on a jump of F.
DKW_EPS = 0.02
N_RESAMPLES = 10_000


@pytest.mark.parametrize(
    "a, b",
    [
        # 2 seeds x 4 problems each: 4^4 * 2^2 * 2^2 = 4,096 equally likely resamples.
        ([[1.0, 0.5, 0.0, 0.75], [0.75, 0.5, 0.25, 1.0]], [[0.5, 0.5, 0.0, 0.25], [0.25, 0.75, 0.0, 0.5]]),
        # 3 seeds vs one seed x 3 problems: 3^3 * 3^3 * 1 = 729 resamples.
        ([[0.0, 1.0, 0.5], [0.5, 1.0, 0.0], [1.0, 1.0, 0.5]], [[0.5, 0.0, 0.5]]),
    ],
)
@pytest.mark.parametrize("paired_seeds", [False, True])
def test_monte_carlo_bootstrap_matches_exhaustive_enumeration(a, b, paired_seeds):
    if paired_seeds and len(a) != len(b):
        with pytest.raises(ValueError, match="same seeds"):
            bootstrap_diffs(a, b, paired_seeds=True)
        return
    values, probabilities = exact_bootstrap_distribution(a, b, paired_seeds=paired_seeds)
    diffs = np.sort(bootstrap_diffs(a, b, n_resamples=N_RESAMPLES, seed=0, paired_seeds=paired_seeds))
    # Kolmogorov distance between the Monte-Carlo and the exact distribution, over the exact atoms
    # (where both CDFs jump) and just below them.
    exact_cdf = np.cumsum(probabilities)
    mc_cdf_at = np.searchsorted(diffs, values + 1e-9, side="right") / len(diffs)
    mc_cdf_below = np.searchsorted(diffs, values - 1e-9, side="right") / len(diffs)
    exact_cdf_below = np.concatenate([[0.0], exact_cdf[:-1]])
    distance = max(np.abs(mc_cdf_at - exact_cdf).max(), np.abs(mc_cdf_below - exact_cdf_below).max())
    assert distance < DKW_EPS
    # Every Monte-Carlo statistic is one of the exact atoms (same estimator, not just a similar one).
    assert np.isin(np.round(diffs, 9), np.round(values, 9)).all()

    for confidence in (0.95, 0.8):
        mc = bootstrap_diff_ci(a, b, n_resamples=N_RESAMPLES, confidence=confidence, seed=0, paired_seeds=paired_seeds)
        exact = bootstrap_diff_ci_exact(a, b, confidence=confidence, paired_seeds=paired_seeds)
        assert mc["paired_seeds"] == exact["paired_seeds"] == paired_seeds
        tail = (1 - confidence) / 2
        assert mc["diff"] == exact["diff"] == pytest.approx(np.mean(a) - np.mean(b))
        for key, q in (("lo", tail), ("hi", 1 - tail)):
            lower = exact_quantile(values, probabilities, max(q - DKW_EPS, 0.0))
            upper = exact_quantile(values, probabilities, min(q + DKW_EPS, 1.0))
            assert lower - 1e-9 <= mc[key] <= upper + 1e-9, (key, mc[key], lower, upper)
        assert exact["lo"] <= exact["diff"] <= exact["hi"]


def test_exact_bootstrap_distribution_by_hand():
    # One problem, so only seeds are resampled: a's mean over two drawn seeds from {0, 1} is 0, 0.5 or
    # 1 with probabilities 1/4, 1/2, 1/4; b's single seed is 0.5.
    values, probabilities = exact_bootstrap_distribution([[0.0], [1.0]], [[0.5]])
    assert values.tolist() == [-0.5, 0.0, 0.5]
    assert probabilities.tolist() == [0.25, 0.5, 0.25]
    ci = bootstrap_diff_ci_exact([[0.0], [1.0]], [[0.5]], confidence=0.4)
    assert (ci["lo"], ci["hi"], ci["significant"], ci["n_resamples"]) == (0.0, 0.0, False, 4)


def test_pairing_removes_problem_difficulty():
    """a beats b by exactly 0.05 on every problem; problem difficulty varies wildly.

    Paired resampling sees the 0.05 in every resample; an unpaired bootstrap (independent problem
    draws for a and b) would give an interval ~0.1 wide around it that includes 0.
    """
    difficulty = np.random.default_rng(3).uniform(0.05, 0.9, size=200)
    ci = bootstrap_diff_ci(difficulty + 0.05, difficulty, n_resamples=2000)
    assert ci["lo"] == pytest.approx(0.05) and ci["hi"] == pytest.approx(0.05)
    assert ci["significant"]


def test_seed_resampling_is_independent_of_problems_and_one_seed_works():
    """a's three seeds are offset by -0.15, 0, +0.15 on every problem; b has one seed.

    Problems are paired, so only the seed draw moves the statistic: the mean of three drawn offsets.
    All three draws equal to -0.15 has probability 1/27 = 3.7% > 2.5%, so the 95% interval runs from
    0.02 - 0.15 to 0.02 + 0.15 and contains 0, although every seed-averaged problem favours a by 0.02.
    """
    base = np.random.default_rng(7).uniform(0.2, 0.8, size=300)
    one_seed = bootstrap_diff_ci(base + 0.02, base, n_resamples=2000)
    assert one_seed["significant"] and one_seed["hi"] - one_seed["lo"] < 1e-9
    three_seeds_a = base[None, :] + 0.02 + np.array([[-0.15], [0.0], [0.15]])
    noisy = bootstrap_diff_ci(three_seeds_a, base[None, :], n_resamples=2000)
    assert noisy["diff"] == pytest.approx(0.02)
    assert noisy["lo"] == pytest.approx(-0.13) and noisy["hi"] == pytest.approx(0.17)
    assert not noisy["significant"]


def test_bootstrap_is_reproducible_and_validates_input():
    rng = np.random.default_rng(0)
    a, b = rng.random((2, 50)), rng.random((3, 50))
    assert bootstrap_diff_ci(a, b, seed=5) == bootstrap_diff_ci(a, b, seed=5)
    assert bootstrap_diff_ci(a, b, seed=5)["lo"] != bootstrap_diff_ci(a, b, seed=6)["lo"]
    with pytest.raises(ValueError):
        bootstrap_diff_ci(a, rng.random((3, 49)))
    with pytest.raises(ValueError):
        bootstrap_diff_ci(a, b, confidence=1.0)
    with pytest.raises(ValueError):
        bootstrap_diff_ci_exact(rng.random((3, 8)), rng.random((3, 8)))  # 8^8 * ... resamples


def test_bootstrap_speed_at_eval_scale(capsys):
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 500)), rng.random((3, 500))
    started = time.perf_counter()
    ci = bootstrap_diff_ci(a, b, n_resamples=10_000)
    elapsed = time.perf_counter() - started
    with capsys.disabled():
        print(f"\nbootstrap_diff_ci: 10,000 resamples of 500 problems x 3 seeds in {elapsed:.3f} s")
    assert ci["n_resamples"] == 10_000 and ci["lo"] < ci["diff"] < ci["hi"]


def test_paired_seeds_by_hand():
    """One problem, two seeds, b = a seed by seed: paired, every resample's difference is 0.

    Independently resampled, a's and b's drawn seed means (0, 0.5 or 1 with 1/4, 1/2, 1/4) differ:
    the difference is -1 .. 1, with P(0) = 1/16 + 1/4 + 1/16 = 3/8.
    """
    a = [[0.0], [1.0]]
    values, probabilities = exact_bootstrap_distribution(a, a, paired_seeds=True)
    assert values.tolist() == [0.0] and probabilities.tolist() == [1.0]
    values, probabilities = exact_bootstrap_distribution(a, a)
    assert values.tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert probabilities.tolist() == [1 / 16, 1 / 4, 3 / 8, 1 / 4, 1 / 16]
    ci = bootstrap_diff_ci_exact(a, a, paired_seeds=True)
    assert (ci["lo"], ci["hi"], ci["n_resamples"], ci["paired_seeds"]) == (0.0, 0.0, 4, True)


def test_pairing_seeds_removes_a_shared_seed_effect():
    """Seed k of both variants starts from one checkpoint whose luck (-0.15, 0, +0.15) both inherit.

    a beats b by 0.02 on every problem of every seed. Paired seeds see exactly 0.02; independent
    seeds count the shared luck twice and the 95% interval (about +-0.2) contains 0.
    """
    base = np.random.default_rng(11).uniform(0.2, 0.8, size=300)
    luck = np.array([[-0.15], [0.0], [0.15]])
    b = base[None, :] + luck
    a = b + 0.02
    paired = bootstrap_diff_ci(a, b, n_resamples=2000, paired_seeds=True)
    independent = bootstrap_diff_ci(a, b, n_resamples=2000)
    assert paired["lo"] == pytest.approx(0.02) and paired["hi"] == pytest.approx(0.02) and paired["significant"]
    assert independent["lo"] < 0 < independent["hi"] and not independent["significant"]
    assert paired["diff"] == independent["diff"] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="same seeds"):
        bootstrap_diff_ci(a, b[:2], paired_seeds=True)
