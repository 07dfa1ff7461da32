"""`moe_lab/report/stats.py` against numbers worked out by hand and against scipy's own t-tests: estimates over
seeds, Student's t quantiles, paired / Welch / two-way differences, per-example pairing, the rules and verdicts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats

from moe_lab.report.stats import (
    DIRECTION_LEVEL,
    EQUIVALENCE_LEVEL,
    NO_DIFFERENCE,
    Difference,
    Estimate,
    Grid,
    _per_seed_examples,
    by_value,
    contrast,
    difference,
    estimates,
    mean_of,
    pooled_means,
    t_quantile,
    trend,
)
from moe_lab.report.verdict import RULES, at_most, combine, direction, equivalent, judge

# b's values at seeds 0..4: far apart, so only pairing by seed sees a small difference a - b
BASE = (1.0, 2.5, 0.7, 3.1, 1.9)


def paired(deltas: tuple[float, ...]) -> Difference:
    """a - b over len(deltas) seeds with a = b + delta at each seed (paired by seed)."""
    b = Estimate({s: BASE[s] for s in range(len(deltas))})
    a = Estimate({s: BASE[s] + d for s, d in enumerate(deltas)})
    return difference(a, b)


def values(est: Estimate) -> list[float]:
    return [est.by_seed[s] for s in sorted(est.by_seed)]


# --- Estimate -------------------------------------------------------------------------------------------------------


def test_se_of_three_seeds_is_std_over_sqrt_n() -> None:
    # mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 14/3; std = sqrt(14/3 / 2) = sqrt(7/3); se = sqrt(7)/3
    est = Estimate({0: 1.0, 1: 2.0, 2: 4.0})
    assert est.n == 3
    assert est.mean == pytest.approx(7 / 3)
    assert est.std == pytest.approx(math.sqrt(7 / 3))
    assert est.se == pytest.approx(math.sqrt(7) / 3)
    assert est.se == pytest.approx(0.881917, abs=1e-6)
    assert est.se == pytest.approx(scipy_stats.sem([1.0, 2.0, 4.0]))  # scipy's sem: ddof 1 / sqrt(n)


def test_estimate_text_shows_the_mean_its_se_and_n() -> None:
    # deviations -0.019, 0, +0.019 -> std 0.019, se 0.019/sqrt(3) = 0.01097
    est = Estimate({0: 0.593, 1: 0.612, 2: 0.631})
    assert est.std == pytest.approx(0.019)
    assert est.se == pytest.approx(0.019 / math.sqrt(3))
    assert est.text() == "0.612 ± 0.011 (n=3)"
    assert est.text(digits=1, scale=100) == "61.2 ± 1.1 (n=3)"


def test_one_seed_has_no_standard_error_not_even_a_binomial_one() -> None:
    # one seed measures no training noise: no se, whatever the metric (an accuracy of 0.75 on 4 examples included)
    acc = Estimate({0: 0.75}, examples={0: pd.Series([1.0, 1.0, 1.0, 0.0])})
    assert acc.n == 1 and acc.mean == 0.75
    assert math.isnan(acc.std) and math.isnan(acc.se)
    assert acc.text() == "0.750 (n=1)"  # no "±" without a standard error
    assert Estimate({0: 1.9333}).text() == "1.933 (n=1)"


def test_no_runs() -> None:
    est = Estimate()
    assert est.n == 0
    assert math.isnan(est.mean) and math.isnan(est.std) and math.isnan(est.se)
    assert est.text() == "-"


def test_a_tiny_standard_error_is_shown_with_more_decimals_not_as_zero() -> None:
    # std of (1.0, 1.0002) = 0.0002/sqrt(2), se = 0.0001: 3 decimals would show 0.000, so 4
    assert Estimate({0: 1.0, 1: 1.0002}).text() == "1.0001 ± 0.0001 (n=2)"
    assert Estimate({0: 1.0, 1: 1.0}).text() == "1.000 ± 0.000 (n=2)"  # no spread at all stays at 3 decimals
    assert Difference(0.003, 0.0003, 2, 3, "paired by seed").text() == "+0.0030 ± 0.0003 (paired by seed, n=3, 2 df)"


# --- Student's t ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("df", "table"), [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (10, 2.228), (math.inf, 1.960)]
)
def test_t_quantile_95_matches_the_table(df: float, table: float) -> None:
    assert DIRECTION_LEVEL == 0.95
    assert t_quantile(DIRECTION_LEVEL, df) == pytest.approx(table, abs=5e-4)


@pytest.mark.parametrize(("df", "table"), [(1, 6.314), (2, 2.920), (3, 2.353), (4, 2.132), (5, 2.015)])
def test_t_quantile_90_matches_the_table(df: float, table: float) -> None:
    assert EQUIVALENCE_LEVEL == 0.90
    assert t_quantile(EQUIVALENCE_LEVEL, df) == pytest.approx(table, abs=5e-4)


# --- differences and contrasts --------------------------------------------------------------------------------------

# b's seeds spread by 1.0 each; a = b + (0.10, 0.11, 0.12): the shared spread cancels only when paired
B = Estimate({0: 1.0, 1: 2.0, 2: 3.0})
A = Estimate({0: 1.10, 1: 2.11, 2: 3.12})


def test_paired_difference_is_the_mean_and_se_of_the_per_seed_differences() -> None:
    d = difference(A, B)
    # per seed 0.10, 0.11, 0.12: mean 0.11, std 0.01, se 0.01/sqrt(3) = 0.005774, 3 - 1 = 2 df
    assert (d.method, d.n, d.df) == ("paired by seed", 3, 2)
    assert d.value == pytest.approx(0.11)
    assert d.se == pytest.approx(0.01 / math.sqrt(3))
    assert math.isnan(d.eval_se) and d.decidable
    # scipy's paired t-test: t = 0.11 / 0.005774 = 19.05 at 2 df
    ref = scipy_stats.ttest_rel(values(A), values(B))
    assert d.value / d.se == pytest.approx(ref.statistic)
    assert d.value / d.se == pytest.approx(19.0526, abs=1e-4)
    assert d.df == ref.df
    # 95% interval: 0.11 -+ 4.303 * 0.005774 = 0.11 -+ 0.02484 = [0.0852, 0.1348], as scipy's
    lo, hi = d.interval()
    assert (lo, hi) == pytest.approx((0.11 - 0.024841, 0.11 + 0.024841), abs=1e-6)
    assert (lo, hi) == pytest.approx(tuple(ref.confidence_interval(0.95)))
    # 90%: 0.11 -+ 2.920 * 0.005774 = 0.11 -+ 0.01686
    assert d.interval(0.90) == pytest.approx((0.11 - 0.016859, 0.11 + 0.016859), abs=1e-6)
    assert d.text() == "+0.110 ± 0.006 (paired by seed, n=3, 2 df)"
    back = difference(B, A)
    assert back.value == pytest.approx(-0.11) and back.se == pytest.approx(d.se)


def test_pairing_matters_under_shared_seed_noise() -> None:
    # the same numbers under other seeds for b: Welch, se_a^2 = 1.0201/3, se_b^2 = 1/3,
    # se = sqrt((1.0201 + 1) / 3) = 0.8206; df = 2.0201^2 / ((1.0201^2 + 1) / 2) = 3.9996
    b_other_seeds = Estimate({3: 1.0, 4: 2.0, 5: 3.0})
    d = difference(A, b_other_seeds)
    assert (d.method, d.n) == ("unpaired, Welch", 3)
    assert d.value == pytest.approx(0.11)
    assert d.se == pytest.approx(0.820589, abs=1e-6)
    assert d.df == pytest.approx(2.0201**2 / ((1.0201**2 + 1) / 2))
    ref = scipy_stats.ttest_ind(values(A), values(b_other_seeds), equal_var=False)
    assert d.value / d.se == pytest.approx(ref.statistic)
    assert d.df == pytest.approx(ref.df)
    # unpaired, 0.11 is nothing; paired on the same seeds it is 19 standard errors
    assert direction(d, ">", 0.05) == "inconclusive"
    assert direction(difference(A, B), ">", 0.05) == "yes"


def test_welch_when_the_seeds_differ() -> None:
    # a's seeds {0, 1, 2}, b's {0, 1}: not the same set, so unpaired
    a = Estimate({0: 0.60, 1: 0.62, 2: 0.64})  # std 0.02, se^2 = 0.0004/3 = 0.000133
    b = Estimate({0: 0.50, 1: 0.54})  # std 0.04/sqrt(2), se^2 = 0.0008/2 = 0.0004
    d = difference(a, b)
    assert (d.method, d.n) == ("unpaired, Welch", 2)
    # value 0.62 - 0.52 = 0.10; se = sqrt(0.000133 + 0.0004) = 0.023094
    assert d.value == pytest.approx(0.10)
    assert d.se == pytest.approx(math.sqrt(0.0004 / 3 + 0.0004))
    # Welch-Satterthwaite: 0.000533^2 / (0.000133^2 / 2 + 0.0004^2 / 1) = 1.6842 = 32/19
    assert d.df == pytest.approx(32 / 19)
    ref = scipy_stats.ttest_ind(values(a), values(b), equal_var=False)
    assert d.value / d.se == pytest.approx(ref.statistic)  # 4.330
    assert d.df == pytest.approx(ref.df)
    assert d.interval() == pytest.approx(tuple(ref.confidence_interval(0.95)))
    assert d.text() == "+0.100 ± 0.023 (unpaired, Welch, n=2, 1.7 df)"


def test_one_seed_each_is_not_decidable() -> None:
    # one shared seed: a difference, but no spread of differences, so no se and no rule decides on it
    d = difference(Estimate({0: 0.75}), Estimate({0: 0.50}))
    assert (d.method, d.n) == ("one seed", 1)
    assert d.value == pytest.approx(0.25)
    assert math.isnan(d.se) and math.isnan(d.df) and not d.decidable
    assert all(math.isnan(x) for x in d.interval())
    assert d.text() == "+0.250 (one seed, n=1)"
    # one seed each on different seeds, or one seed against three: unpaired, still one seed
    other = difference(Estimate({0: 1.933}), Estimate({1: 1.905}))
    assert (other.method, other.n, other.value) == ("unpaired, one seed", 1, pytest.approx(0.028))
    assert math.isnan(other.se) and not other.decidable
    mixed = difference(A, Estimate({7: 2.0}))
    assert (mixed.method, mixed.n) == ("unpaired, one seed", 1)
    assert mixed.value == pytest.approx(2.11 - 2.0)  # A's mean 2.11
    assert not mixed.decidable


def test_a_single_term_is_a_one_sample_t_over_seeds() -> None:
    # (1, 2, 4): mean 7/3, se sqrt(7)/3, 2 df: scipy's one-sample t against 0 is (7/3) / (sqrt(7)/3) = sqrt(7)
    est = Estimate({0: 1.0, 1: 2.0, 2: 4.0})
    d = mean_of(est)
    assert (d.method, d.n, d.df) == ("mean over seeds", 3, 2)
    assert d.value == pytest.approx(7 / 3) and d.se == pytest.approx(math.sqrt(7) / 3)
    assert d.value / d.se == pytest.approx(scipy_stats.ttest_1samp([1.0, 2.0, 4.0], 0.0).statistic)
    # a coefficient scales both: 2 * est is 14/3 -+ 2 sqrt(7)/3
    doubled = contrast([(2.0, est)])
    assert doubled.method == "mean over seeds"
    assert (doubled.value, doubled.se) == pytest.approx((14 / 3, 2 * math.sqrt(7) / 3))


def test_interaction_contrast_of_four_terms_paired() -> None:
    # (a - b) - (c - d) per seed: 0.7 - 0.5 - 0.6 + 0.5 = 0.10, 0.8 - 0.6 - 0.6 + 0.55 = 0.15:
    # mean 0.125, std 0.05/sqrt(2), se 0.025, 1 df
    a, b = Estimate({0: 0.7, 1: 0.8}), Estimate({0: 0.5, 1: 0.6})
    c, d = Estimate({0: 0.6, 1: 0.6}), Estimate({0: 0.5, 1: 0.55})
    found = contrast([(1.0, a), (-1.0, b), (-1.0, c), (1.0, d)])
    assert (found.method, found.n, found.df) == ("paired by seed", 2, 1)
    assert found.value == pytest.approx(0.125)
    assert found.se == pytest.approx(0.025)
    # scipy: the paired t of (a - b) = (0.2, 0.2) against (c - d) = (0.1, 0.05) is 0.125 / 0.025 = 5
    assert found.value / found.se == pytest.approx(scipy_stats.ttest_rel([0.2, 0.2], [0.1, 0.05]).statistic)
    # 95% at 1 df: 0.125 -+ 12.706 * 0.025 = 0.125 -+ 0.318 contains 0
    assert found.interval() == pytest.approx((0.125 - 0.31766, 0.125 + 0.31766), abs=1e-4)


def test_interaction_contrast_of_four_terms_unpaired() -> None:
    # d under other seeds: se_a^2 = se_b^2 = 0.0025, se_c^2 = 0, se_d^2 = 0.000625: se = sqrt(0.005625) = 0.075;
    # df = 0.005625^2 / (0.0025^2 + 0.0025^2 + 0 + 0.000625^2) (each over 1 df) = 27/11 = 2.4545
    a, b = Estimate({0: 0.7, 1: 0.8}), Estimate({0: 0.5, 1: 0.6})
    c, d = Estimate({0: 0.6, 1: 0.6}), Estimate({5: 0.5, 6: 0.55})
    found = contrast([(1.0, a), (-1.0, b), (-1.0, c), (1.0, d)])
    assert (found.method, found.n) == ("unpaired, Welch", 2)
    assert found.value == pytest.approx(0.125)
    assert found.se == pytest.approx(0.075)
    assert found.df == pytest.approx(27 / 11)


def test_contrast_coefficients_scale_the_standard_error() -> None:
    # 0.5 * (a + b), unpaired: se = sqrt(0.25 * 0.0025 + 0.25 * 0.0025) = 0.05/sqrt(2);
    # df = 0.00125^2 / (0.000625^2 / 1 + 0.000625^2 / 1) = 2
    a, b = Estimate({0: 0.7, 1: 0.8}), Estimate({2: 0.5, 3: 0.6})
    found = contrast([(0.5, a), (0.5, b)])
    assert found.value == pytest.approx(0.65)
    assert found.se == pytest.approx(0.05 / math.sqrt(2))
    assert found.df == pytest.approx(2.0)


@pytest.mark.parametrize(
    "terms",
    [[], [(1.0, Estimate()), (-1.0, B)], [(1.0, A), (-1.0, Estimate())]],
    ids=["no-terms", "empty-first", "empty-second"],
)
def test_an_empty_estimate_gives_no_difference(terms: list) -> None:
    d = contrast(terms)
    assert math.isnan(d.value) and math.isnan(d.se) and math.isnan(d.df)
    assert (d.n, d.method, d.text(), d.decidable) == (0, "no runs", "-", False)
    assert judge(d, "direction", 0.01) == ("inconclusive", "no standard error over seeds")
    assert at_most(d, 0.01) == "inconclusive"


def test_difference_text_and_decidable() -> None:
    assert Difference(0.021, 0.008, 2, 3, "paired by seed").text() == "+0.021 ± 0.008 (paired by seed, n=3, 2 df)"
    scaled = Difference(0.0123, 0.0046, 2, 3, "paired by seed").text(digits=1, scale=100)
    assert scaled == "+1.2 ± 0.5 (paired by seed, n=3, 2 df)"
    with_eval = Difference(-0.01, 0.022, 4, 3, "two-way 3 settings x 3 seeds", eval_se=0.004)
    assert with_eval.text() == "-0.010 ± 0.022 (two-way 3 settings x 3 seeds, n=3, 4 df; validation set ± 0.004)"
    assert Difference(math.nan, 0.1, 1, 2, "x").text() == "-"
    # a rule decides only with a value, a standard error, df >= 1 and two or more seeds
    assert Difference(0.1, 0.01, 1, 2, "x").decidable
    assert not Difference(0.1, 0.01, 0.5, 2, "x").decidable
    assert not Difference(0.1, 0.01, 3, 1, "x").decidable
    assert not Difference(0.1, math.nan, 2, 3, "x").decidable
    assert not Difference(math.nan, 0.01, 2, 3, "x").decidable
    assert not NO_DIFFERENCE.decidable


# --- per-example pairing --------------------------------------------------------------------------------------------

IDS = ["e0", "e1", "e2", "e3"]
# per-example accuracies of two runs at each seed; per seed the difference a - b and its variance (ddof 1):
#   seed 0: a 1 0 1 1, b 0 0 1 0 -> diff 1 0 0 1: mean 0.5,  var 1/3 -> var / 4 = 1/12
#   seed 1: a 1 1 1 0, b 1 0 0 0 -> diff 0 1 1 0: mean 0.5,  var 1/3 -> 1/12
#   seed 2: a 1 1 1 1, b 1 1 0 1 -> diff 0 0 1 0: mean 0.25, var (0.5625 + 3 * 0.0625) / 3 = 1/4 -> 1/16
EX_A = {0: [1, 0, 1, 1], 1: [1, 1, 1, 0], 2: [1, 1, 1, 1]}
EX_B = {0: [0, 0, 1, 0], 1: [1, 0, 0, 0], 2: [1, 1, 0, 1]}
# over seeds: 0.5, 0.5, 0.25 -> mean 5/12, deviations 1/12, 1/12, -1/6: std sqrt((6/144) / 2), se 1/12
PAIRED_VALUE, PAIRED_SE = 5 / 12, 1 / 12
# the validation set's share: sqrt(1/12 + 1/12 + 1/16) / 3 = sqrt(0.229167) / 3 = 0.15957
EVAL_SE = math.sqrt(1 / 12 + 1 / 12 + 1 / 16) / 3


def with_examples(per_seed: dict, ids: list[str] = IDS) -> Estimate:
    """An Estimate whose summary at each seed is the mean of its per-example values."""
    series = {s: pd.Series(v, index=ids, dtype=float) for s, v in per_seed.items()}
    return Estimate({s: float(x.mean()) for s, x in series.items()}, series)


def test_per_example_pairing_over_identical_ids() -> None:
    a, b = with_examples(EX_A), with_examples(EX_B)
    d = difference(a, b)
    assert (d.method, d.n, d.df) == ("paired by seed", 3, 2)
    assert d.value == pytest.approx(PAIRED_VALUE)
    assert d.se == pytest.approx(PAIRED_SE)
    assert d.eval_se == pytest.approx(EVAL_SE)
    assert d.eval_se == pytest.approx(0.15957, abs=1e-5)
    # scipy's sem of each seed's per-example differences, combined over seeds, is the same share
    diffs = [np.subtract(EX_A[s], EX_B[s]) for s in range(3)]
    assert d.eval_se == pytest.approx(math.sqrt(sum(scipy_stats.sem(x) ** 2 for x in diffs)) / 3)
    # the summaries are the per-example means (0.75, 0.75, 1 against 0.25, 0.25, 0.75): the per-seed differences
    # of the summaries are the same 0.5, 0.5, 0.25
    assert a.mean - b.mean == pytest.approx(d.value)
    assert d.text() == "+0.417 ± 0.083 (paired by seed, n=3, 2 df; validation set ± 0.160)"


def test_per_example_pairing_aligns_by_id_and_leaves_out_ids_only_one_run_saw() -> None:
    # at seed 0, a also saw e9 and b e7 (both right), and b lists its examples in another order: the summaries
    # move (a 4/5 = 0.8, b 2/5 = 0.4), the pairing over e0-e3 (by id, not by position) does not
    a_rest, b_rest = with_examples({1: EX_A[1], 2: EX_A[2]}), with_examples({1: EX_B[1], 2: EX_B[2]})
    a0 = pd.Series([1, 0, 1, 1, 1], index=[*IDS, "e9"], dtype=float)
    b0 = pd.Series({"e7": 1.0, "e3": 0.0, "e2": 1.0, "e1": 0.0, "e0": 0.0})  # b's 0 0 1 0 at e0-e3
    a = Estimate({0: 0.8, **a_rest.by_seed}, {0: a0, **a_rest.examples})
    b = Estimate({0: 0.4, **b_rest.by_seed}, {0: b0, **b_rest.examples})
    d = difference(a, b)
    assert d.value == pytest.approx(PAIRED_VALUE)  # 0.5, 0.5, 0.25 over the common ids
    assert d.se == pytest.approx(PAIRED_SE)
    assert d.eval_se == pytest.approx(EVAL_SE)
    # without the per-example records the seeds' summaries would give 0.4, 0.5, 0.25
    assert difference(Estimate(a.by_seed), Estimate(b.by_seed)).value == pytest.approx(1.15 / 3)


def test_per_seed_examples_needs_every_term_at_every_seed() -> None:
    a, b = with_examples(EX_A), with_examples(EX_B)
    found = _per_seed_examples([(1.0, a), (-1.0, b)], [0, 1, 2])
    assert found is not None
    per_seed, eval_se = found
    assert per_seed == pytest.approx({0: 0.5, 1: 0.5, 2: 0.25})
    assert eval_se == pytest.approx(EVAL_SE)
    # b has no records at seed 2: no per-example pairing, the summaries decide and no eval_se
    partial = Estimate(b.by_seed, {s: x for s, x in b.examples.items() if s != 2})
    assert _per_seed_examples([(1.0, a), (-1.0, partial)], [0, 1, 2]) is None
    d = difference(a, partial)
    assert d.value == pytest.approx(PAIRED_VALUE) and math.isnan(d.eval_se)
    # fewer than two common examples at a seed: no per-example variance, so no pairing by example
    lonely = Estimate(a.by_seed, {**a.examples, 1: pd.Series([1.0, 0.0], index=["e0", "x"])})
    assert _per_seed_examples([(1.0, lonely), (-1.0, b)], [0, 1, 2]) is None


def test_one_seed_with_examples_shows_the_validation_share_but_decides_nothing() -> None:
    # seed 0 only: the difference 0.5, its per-example se sqrt(1/12) = 0.2887
    a = with_examples({0: EX_A[0]})
    b = with_examples({0: EX_B[0]})
    d = difference(a, b)
    assert (d.method, d.n, d.value) == ("one seed", 1, pytest.approx(0.5))
    assert d.eval_se == pytest.approx(math.sqrt(1 / 12))
    assert not d.decidable and equivalent(d, 1.0) == "inconclusive"
    assert d.text() == "+0.500 (one seed, n=1; validation set ± 0.289)"


# --- the two-way layout (setting x seed, seed as block) -------------------------------------------------------------

# settings (rows) x seeds 0, 1, 2 (columns):   row means 2, 4, 3; column means 2, 3, 4; grand mean 3
#   a: 1 2 3        residuals y - row - col + grand:   a:  0 0  0
#   b: 2 4 6                                           b: -1 0  1
#   c: 3 3 3                                           c:  1 0 -1
# residual SS 4 over (3 - 1)(3 - 1) = 4 df: MSE 1
CELLS = {
    "a": Estimate({0: 1.0, 1: 2.0, 2: 3.0}),
    "b": Estimate({0: 2.0, 1: 4.0, 2: 6.0}),
    "c": Estimate({0: 3.0, 1: 3.0, 2: 3.0}),
}


def additive_fit_mse(y: np.ndarray) -> tuple[float, int]:
    """The residual mean square of y[setting, seed] ~ grand + setting + seed, by least squares on dummies."""
    settings_, seeds = y.shape
    columns = [np.ones(y.size)]
    columns += [np.repeat(np.eye(settings_)[a], seeds) for a in range(1, settings_)]
    columns += [np.tile(np.eye(seeds)[j], settings_) for j in range(1, seeds)]
    x = np.column_stack(columns)
    coef, *_ = np.linalg.lstsq(x, y.ravel(), rcond=None)
    ss = float(((y.ravel() - x @ coef) ** 2).sum())
    df = y.size - x.shape[1]
    return ss / df, df


def test_grid_residual_mean_square_by_hand() -> None:
    grid = Grid.of(CELLS)
    assert grid.keys == ("a", "b", "c") and grid.seeds == (0, 1, 2)
    assert grid.df == 4
    assert grid.mse == pytest.approx(1.0)
    assert (grid.mse, grid.df) == pytest.approx(additive_fit_mse(np.array([values(e) for e in CELLS.values()])))
    assert grid.method == "two-way 3 settings x 3 seeds"


def test_grid_residual_mean_square_against_least_squares() -> None:
    rng = np.random.default_rng(7)
    y = rng.normal(size=(4, 5)) + np.arange(4)[:, None] + 3 * rng.normal(size=5)[None, :]
    grid = Grid.of({f"s{a}": Estimate(dict(enumerate(y[a]))) for a in range(4)})
    mse, df = additive_fit_mse(y)
    assert grid.df == df == 12  # (4 - 1)(5 - 1)
    assert grid.mse == pytest.approx(mse)


def test_grid_contrast_se_from_the_pooled_residual() -> None:
    grid = Grid.of(CELLS)
    # b - a: value 4 - 2 = 2, se = sqrt(MSE * (1 + 1) / 3 seeds) = sqrt(2/3) = 0.8165, 4 df
    d = grid.difference("b", "a")
    assert (d.method, d.n, d.df) == ("two-way 3 settings x 3 seeds", 3, 4)
    assert d.value == pytest.approx(2.0)
    assert d.se == pytest.approx(math.sqrt(2 / 3))
    # 95% at 4 df: 2 -+ 2.776 * 0.8165 = 2 -+ 2.2667
    assert d.interval() == pytest.approx((2 - 2.2667, 2 + 2.2667), abs=1e-3)
    # paired alone, b - a is (1, 2, 3): se 1/sqrt(3) at 2 df; the grid pools the noise of all three settings
    alone = difference(CELLS["b"], CELLS["a"])
    assert (alone.se, alone.df) == (pytest.approx(1 / math.sqrt(3)), 2)
    # a - 2b + c: value 2 - 8 + 3 = -3, sum c^2 = 6: se = sqrt(1 * 6 / 3) = sqrt(2)
    curve = grid.contrast([(1.0, "a"), (-2.0, "b"), (1.0, "c")])
    assert (curve.value, curve.se, curve.df) == (pytest.approx(-3.0), pytest.approx(math.sqrt(2)), 4)


def test_grid_of_two_settings_is_the_paired_difference() -> None:
    # two settings: the residuals are +-(d_j - mean d)/2, so MSE = var(d)/2 and se^2 = MSE * 2 / S = var(d) / S
    grid = Grid.of({"a": A, "b": B})
    d = grid.difference("a", "b")
    assert d.value == pytest.approx(0.11)
    assert d.se == pytest.approx(0.01 / math.sqrt(3))
    assert d.df == 2 and d.n == 3
    assert d.method == "paired by seed"  # and named so


def test_grid_leaves_out_a_setting_with_a_missing_seed() -> None:
    # d lacks seed 2: the layout stays a, b, c over seeds 0, 1, 2 (MSE 1, 4 df)
    d_est = Estimate({0: 2.0, 1: 3.0})
    grid = Grid.of({**CELLS, "d": d_est})
    assert grid.keys == ("a", "b", "c") and grid.seeds == (0, 1, 2)
    assert (grid.mse, grid.df) == (pytest.approx(1.0), 4)
    # d - a falls back to contrast: Welch, value 2.5 - 2 = 0.5, se = sqrt(0.5/2 + 1/3) = 0.7638
    found = grid.difference("d", "a")
    assert found.method == "unpaired, Welch"
    assert found.value == pytest.approx(0.5)
    assert found.se == pytest.approx(math.sqrt(0.25 + 1 / 3))
    ref = scipy_stats.ttest_ind(values(d_est), values(CELLS["a"]), equal_var=False)
    assert found.value / found.se == pytest.approx(ref.statistic)
    assert found.df == pytest.approx(ref.df)
    # those in the layout are still judged against it
    assert grid.difference("b", "a").se == pytest.approx(math.sqrt(2 / 3))


def test_grid_restricts_a_setting_with_an_extra_seed_to_the_common_seeds() -> None:
    # e = 2, 3, 4 at seeds 0-2 (and 100 at seed 3): column means stay 2, 3, 4, e's residuals are 0,
    # so the residual SS stays 4, now over (4 - 1)(3 - 1) = 6 df: MSE 2/3
    e = Estimate({0: 2.0, 1: 3.0, 2: 4.0, 3: 100.0})
    grid = Grid.of({**CELLS, "e": e})
    assert grid.keys == ("a", "b", "c", "e") and grid.seeds == (0, 1, 2)
    assert grid.df == 6 and grid.mse == pytest.approx(2 / 3)
    # e - a over seeds 0-2: 3 - 2 = 1 (not 27.25 - 2), se = sqrt(2/3 * 2 / 3) = 2/3
    d = grid.difference("e", "a")
    assert (d.value, d.se, d.df, d.n) == (pytest.approx(1.0), pytest.approx(2 / 3), 6, 3)


def test_grid_falls_back_when_the_coefficients_do_not_sum_to_zero() -> None:
    grid = Grid.of(CELLS)
    # b alone: a one-sample t over its seeds, (2, 4, 6): mean 4, std 2, se 2/sqrt(3), 2 df
    alone = grid.contrast([(1.0, "b")])
    assert alone.method == "mean over seeds"
    assert (alone.value, alone.se, alone.df) == pytest.approx((4.0, 2 / math.sqrt(3), 2))
    # a + b per seed: 3, 6, 9: mean 6, std 3, se sqrt(3), paired by seed at 2 df
    total = grid.contrast([(1.0, "a"), (1.0, "b")])
    assert total.method == "paired by seed"
    assert (total.value, total.se, total.df) == pytest.approx((6.0, math.sqrt(3), 2))


def test_grid_without_a_layout_falls_back_to_contrast() -> None:
    # one seed each: no layout, one seed decides nothing
    single = Grid.of({"a": Estimate({0: 1.0}), "b": Estimate({0: 2.0})})
    assert (single.keys, single.df) == ((), 0)
    assert single.difference("b", "a").method == "one seed"
    # no two settings share their seeds: no layout, Welch
    apart = Grid.of({"a": Estimate({0: 1.0, 1: 2.0}), "b": Estimate({2: 2.0, 3: 4.0})})
    assert apart.df == 0 and len(apart.keys) < 2
    d = apart.difference("b", "a")
    assert (d.method, d.value) == ("unpaired, Welch", pytest.approx(1.5))
    # a setting the grid does not know, or one without runs: no difference
    assert Grid.of(CELLS).difference("a", "zzz").method == "no runs"
    assert Grid.of({**CELLS, "empty": Estimate()}).difference("empty", "a").method == "no runs"


def test_grid_with_examples_takes_the_value_from_the_examples() -> None:
    # summaries = per-example means, two settings: the same value and se as the paired difference, with eval_se
    grid = Grid.of({"a": with_examples(EX_A), "b": with_examples(EX_B)})
    d = grid.difference("a", "b")
    assert d.method == "paired by seed"
    assert (d.value, d.se, d.df) == (pytest.approx(PAIRED_VALUE), pytest.approx(PAIRED_SE), 2)
    assert d.eval_se == pytest.approx(EVAL_SE)


def test_grid_contrast_of_no_terms_is_no_difference() -> None:
    # contrast([]) is NO_DIFFERENCE; the grid's contrast of no terms should be the same
    assert Grid.of(CELLS).contrast([]).method == "no runs"


# --- blocks by base model x seed (fine-tuning grids over two pretrainings per seed) ----------------------------------

# two base models x two settings (say lr lo, hi) x 4 seeds: each model's pretraining at a seed shifts both its
# settings (an offset per model and seed, unlike the shared seed effect the plain two-way layout removes)
OFFSETS = {"sparse": (0.0, 5.0, -3.0, 2.0), "dense": (4.0, -6.0, 1.0, 0.0)}
NOISE = {  # setting -> per-seed noise
    ("sparse", "lo"): (0.1, -0.2, 0.0, 0.3),
    ("sparse", "hi"): (-0.1, 0.4, 0.2, -0.2),
    ("dense", "lo"): (0.0, 0.1, -0.3, 0.1),
    ("dense", "hi"): (0.2, -0.1, 0.1, -0.3),
}
GAIN = {("sparse", "lo"): 0.0, ("sparse", "hi"): 2.0, ("dense", "lo"): 1.0, ("dense", "hi"): 1.5}
NESTED = {k: Estimate({j: GAIN[k] + OFFSETS[k[0]][j] + NOISE[k][j] for j in range(4)}) for k in NOISE}


def blocked_fit_mse(cells: dict, base: dict) -> tuple[float, int]:
    """The residual mean square of y ~ setting + (base, seed) block, by least squares on dummies (rank-aware)."""
    keys, seeds = list(cells), sorted(next(iter(cells.values())).by_seed)
    blocks = sorted({(base[k], j) for k in keys for j in seeds})
    rows, y = [], []
    for k in keys:
        for j in seeds:
            rows.append([float(k == other) for other in keys] + [float((base[k], j) == b) for b in blocks])
            y.append(cells[k].by_seed[j])
    x, y = np.array(rows), np.array(y)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    df = len(y) - np.linalg.matrix_rank(x)
    return float(((y - x @ coef) ** 2).sum()) / df, df


def test_grid_with_bases_pools_the_residual_within_each_base_model() -> None:
    grid = Grid.of(NESTED, base=lambda key: key[0])
    assert grid.within_df == 6  # each model: (2 - 1)(4 - 1)
    assert (grid.within_mse, grid.within_df) == pytest.approx(blocked_fit_mse(NESTED, {k: k[0] for k in NESTED}))
    # the plain layout (seed as block) keeps each model's offsets in its residual: 9 df and a far larger MSE
    assert grid.df == 9 and grid.mse > 10 * grid.within_mse
    plain = Grid.of(NESTED)
    assert (grid.mse, grid.df) == (pytest.approx(plain.mse), plain.df)


def test_a_difference_of_gains_is_judged_within_each_base_model() -> None:
    grid = Grid.of(NESTED, base=lambda key: key[0])
    terms = [(1.0, ("sparse", "hi")), (-1.0, ("sparse", "lo")), (-1.0, ("dense", "hi")), (1.0, ("dense", "lo"))]
    d = grid.contrast(terms)
    # per seed the offsets cancel: the gains' difference is (2 - 0) - (1.5 - 1) plus the noise's
    per_seed = [
        NESTED[("sparse", "hi")].by_seed[j] - NESTED[("sparse", "lo")].by_seed[j]
        - NESTED[("dense", "hi")].by_seed[j] + NESTED[("dense", "lo")].by_seed[j]
        for j in range(4)
    ]  # fmt: skip
    assert d.value == pytest.approx(np.mean(per_seed)) and d.value == pytest.approx(1.5, abs=0.5)
    # se = sqrt(within MSE * sum c^2 / seeds), 6 df, and the method says so
    assert d.se == pytest.approx(math.sqrt(grid.within_mse * 4 / 4))
    assert (d.df, d.n, d.method) == (6, 4, "two-way within 2 base models, 4 settings x 4 seeds")
    # seed as block, the same contrast's error carries the offsets
    plain = Grid.of(NESTED).contrast(terms)
    assert plain.value == pytest.approx(d.value) and plain.se > 3 * d.se and plain.df == 9


def test_a_difference_across_base_models_keeps_the_seed_blocks() -> None:
    # sparse - dense compares two pretrainings: no within-model residual can judge it
    grid = Grid.of(NESTED, base=lambda key: key[0])
    across = grid.difference(("sparse", "hi"), ("dense", "hi"))
    plain = Grid.of(NESTED).difference(("sparse", "hi"), ("dense", "hi"))
    assert (across.value, across.se, across.df, across.method) == (plain.value, plain.se, plain.df, plain.method)
    assert across.method == "two-way 4 settings x 4 seeds"
    # a difference within one model whose coefficients do not cancel in the other (here: zero there) is still
    # within each model, and so is judged within
    within = grid.difference(("sparse", "hi"), ("sparse", "lo"))
    assert within.df == 6


def test_one_base_model_for_every_setting_is_the_plain_layout() -> None:
    one = Grid.of(CELLS, base=lambda key: "small")
    plain = Grid.of(CELLS)
    for a, b in (("b", "a"), ("c", "b")):
        found, expected = one.difference(a, b), plain.difference(a, b)
        assert (found.se, found.df, found.method) == (expected.se, expected.df, expected.method)


# --- one-way pooled means -------------------------------------------------------------------------------------------


def test_pooled_means_pool_the_within_setting_variance() -> None:
    # a: 1 2 3 (SS 2, 2 df); b: 2 6 (SS 8, 1 df); c: one seed (0 df); empty left out
    # pooled variance (2 + 8) / 3 = 10/3 over 3 df
    cells = {
        "a": Estimate({0: 1.0, 1: 2.0, 2: 3.0}),
        "b": Estimate({3: 2.0, 4: 6.0}),
        "c": Estimate({5: 4.0}),
        "none": Estimate(),
    }
    found = pooled_means(cells)
    assert list(found) == ["a", "b", "c"]
    method = "mean, variance pooled over 3 settings"
    # a: 2 -+ sqrt(10/3 / 3) = 1.0541; b: 4 -+ sqrt(10/3 / 2) = 1.2910
    assert (found["a"].value, found["a"].se, found["a"].df, found["a"].n) == pytest.approx((2, math.sqrt(10 / 9), 3, 3))
    assert (found["b"].value, found["b"].se, found["b"].df, found["b"].n) == pytest.approx((4, math.sqrt(5 / 3), 3, 2))
    assert found["a"].method == found["b"].method == method
    # c gets the pooled se sqrt(10/3) but, one seed, no rule decides on it
    assert found["c"].se == pytest.approx(math.sqrt(10 / 3)) and not found["c"].decidable


def test_pooled_variance_of_two_settings_is_the_pooled_t_tests() -> None:
    # scipy's equal-variance t: t = (mean_a - mean_b) / sqrt(sp^2 (1/n_a + 1/n_b)), so sp^2 comes back from t
    a, b = [1.0, 2.0, 4.0, 3.5], [0.5, 2.5, 1.0]
    found = pooled_means({"a": Estimate(dict(enumerate(a))), "b": Estimate(dict(enumerate(b)))})
    t = scipy_stats.ttest_ind(a, b, equal_var=True).statistic
    sp2 = ((np.mean(a) - np.mean(b)) / t) ** 2 / (1 / 4 + 1 / 3)
    assert found["a"].se ** 2 * 4 == pytest.approx(sp2)
    assert found["b"].se ** 2 * 3 == pytest.approx(sp2)
    assert found["a"].df == found["b"].df == 5  # 3 + 2


def test_pooled_means_of_single_seeds_decide_nothing() -> None:
    found = pooled_means({"a": Estimate({0: 1.0}), "b": Estimate({1: 3.0})})
    assert [(d.method, d.value, d.n) for d in found.values()] == [("one seed", 1.0, 1), ("one seed", 3.0, 1)]
    assert not any(d.decidable for d in found.values())


# --- rules: direction, equivalence, at most ------------------------------------------------------------------------

# per-seed differences m -+ a fixed spread, a - b paired by seed:
#   n = 2: (m - 0.01, m + 0.01)            se 0.01,                 1 df: 95% -+ 12.706 se = 0.1271, 90% -+ 0.0631
#   n = 3: (m - 0.01, m, m + 0.01)         se 0.01/sqrt(3) = 0.0058, 2 df: 95% -+ 4.303 se = 0.0248, 90% -+ 0.0169
#   n = 5: (m - 0.02, ..., m + 0.02)       se 0.01/sqrt(2) = 0.0071, 4 df: 95% -+ 2.776 se = 0.0196, 90% -+ 0.0151
SPREAD = {2: (-0.01, 0.01), 3: (-0.01, 0.0, 0.01), 5: (-0.02, -0.01, 0.0, 0.01, 0.02)}
# per n: a small m (95% contains 0) and a large one (the 95% and 90% intervals clear 0 and both margins), a wide
# margin (the small m's 90% interval inside it) and a narrow one (the small m's 90% interval crosses it):
#   n = 2: small 0.02: 95% [-0.107, 0.147], 90% [-0.043, 0.083]; large 0.3: 95% [0.173, 0.427], 90% [0.237, 0.363]
#          wide 0.1, narrow 0.05
#   n = 3: small 0.01: 95% [-0.015, 0.035], 90% [-0.007, 0.027]; large 0.1: 95% [0.075, 0.125], 90% [0.083, 0.117]
#          wide 0.05, narrow 0.02
#   n = 5: small 0.01: 95% [-0.010, 0.030], 90% [-0.005, 0.025]; large 0.1: 95% [0.080, 0.120], 90% [0.085, 0.115]
#          wide 0.05, narrow 0.02
SIZES = {2: (0.02, 0.3, 0.1, 0.05), 3: (0.01, 0.1, 0.05, 0.02), 5: (0.01, 0.1, 0.05, 0.02)}

RULE_CASES = [
    # (rule, m, expected side, margin, verdict)
    ("direction", "large", ">", "narrow", "yes"),  # 95% clears 0 on the paper's side
    ("direction", "-large", "<", "narrow", "yes"),
    ("direction", "large", "<", "narrow", "no"),  # 95% clears 0 on the other side
    ("direction", "-large", ">", "wide", "no"),
    ("direction", "small", ">", "wide", "no"),  # 95% contains 0, 90% inside +-margin: too small to count
    ("direction", "-small", "<", "wide", "no"),
    ("direction", "small", ">", "narrow", "inconclusive"),  # 95% contains 0, 90% crosses the margin
    ("direction", "small", "<", "narrow", "inconclusive"),
    ("equivalence", "small", None, "wide", "yes"),  # 90% inside +-margin
    ("equivalence", "large", None, "narrow", "no"),  # 90% wholly above +margin
    ("equivalence", "-large", None, "wide", "no"),  # 90% wholly below -margin
    ("equivalence", "small", None, "narrow", "inconclusive"),  # 90% crosses +margin
    ("at most", "small", None, "wide", "yes"),  # 90% ends below the margin
    ("at most", "-large", None, "narrow", "yes"),  # a gain costs nothing
    ("at most", "large", None, "narrow", "no"),  # 90% starts above the margin
    ("at most", "small", None, "narrow", "inconclusive"),  # 90% contains the margin
]


def rule_fixture(n: int, m: str, margin: str) -> tuple[Difference, float]:
    small, large, wide, narrow = SIZES[n]
    value = {"small": small, "-small": -small, "large": large, "-large": -large}[m]
    return paired(tuple(value + s for s in SPREAD[n])), {"wide": wide, "narrow": narrow}[margin]


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize(
    ("rule", "m", "side", "margin", "verdict"), RULE_CASES, ids=["-".join(map(str, c)) for c in RULE_CASES]
)
def test_every_rule_reaches_every_verdict(n: int, rule: str, m: str, side: str | None, margin: str, verdict: str):
    d, margin_value = rule_fixture(n, m, margin)
    assert (d.method, d.n, d.df) == ("paired by seed", n, n - 1)
    small, large, *_ = SIZES[n]
    assert abs(d.value) == pytest.approx(small if "small" in m else large)
    assert d.se == pytest.approx({2: 0.01, 3: 0.01 / math.sqrt(3), 5: 0.01 / math.sqrt(2)}[n])
    if rule == "direction":
        assert direction(d, side, margin_value) == verdict
    elif rule == "equivalence":
        assert equivalent(d, margin_value) == verdict
    else:
        assert at_most(d, margin_value) == verdict
    assert judge(d, rule, margin_value, side or ">")[0] == verdict


def test_three_standard_errors_at_three_seeds_is_inconclusive_under_t() -> None:
    # per-seed differences 0.01, 0.04, 0.04: mean 0.03, deviations -0.02, 0.01, 0.01: std sqrt(0.0006/2) = 0.01732,
    # se 0.01: the value is 3 se. A fixed Z = 2 would say yes (0.03 - 2 * 0.01 > 0); t at 2 df is 4.303:
    # 95% 0.03 -+ 0.0430 = [-0.013, 0.073] contains 0; 90% 0.03 -+ 2.920 * 0.01 = [0.0008, 0.0592] crosses 0.05
    d = paired((0.01, 0.04, 0.04))
    assert (d.value, d.se, d.df) == (pytest.approx(0.03), pytest.approx(0.01), 2)
    assert d.interval() == pytest.approx((0.03 - 0.04303, 0.03 + 0.04303), abs=1e-5)
    assert d.interval(0.90) == pytest.approx((0.03 - 0.02920, 0.03 + 0.02920), abs=1e-5)
    assert scipy_stats.ttest_1samp([0.01, 0.04, 0.04], 0.0).pvalue > 0.05  # t = 3 at 2 df: p = 0.096
    verdict = judge(d, "direction", 0.05, ">")
    assert verdict == ("inconclusive", "95% interval contains 0, 90% interval crosses ±margin")
    # five seeds, 0, 0.02, 0.03, 0.04, 0.06: mean 0.03, deviations -3, -1, 0, 1, 3 (x 0.01): var 20e-4 / 4,
    # se sqrt(5e-4 / 5) = 0.01: again 3 se, but at 4 df 2.776 < 3: 95% [0.0022, 0.0578] clears 0
    five = paired((0.0, 0.02, 0.03, 0.04, 0.06))
    assert (five.value, five.se, five.df) == (pytest.approx(0.03), pytest.approx(0.01), 4)
    assert direction(five, ">", 0.05) == "yes"


def test_direction_no_comes_two_ways() -> None:
    # n = 3, per seed -0.11, -0.10, -0.09: -0.1 -+ 0.0248 excludes 0 below: the other side
    other_side = paired((-0.11, -0.10, -0.09))
    assert judge(other_side, "direction", 0.05, ">") == ("no", "95% interval excludes 0 on the other side")
    assert judge(other_side, "direction", 0.05, "<") == ("yes", "95% interval excludes 0 on the paper's side")
    # per seed 0, 0.01, 0.02: 0.01 -+ 0.0248 contains 0, 90% 0.01 -+ 0.0169 = [-0.007, 0.027] inside +-0.05
    tiny = paired((0.0, 0.01, 0.02))
    assert judge(tiny, "direction", 0.05, ">") == ("no", "90% interval inside ±margin: too small to count")
    # but inside +-0.02 it is not: [-0.007, 0.027] crosses 0.02
    assert direction(tiny, ">", 0.02) == "inconclusive"
    # a 95% interval that clears 0 on the paper's side is still no when the 90% one is inside +-margin: 0.1 -+
    # 0.0248 (95%), 0.1 -+ 0.0169 (90%) at margin 0.5 is real but too small to count; at margin 0.1 it is yes
    shown = paired((0.09, 0.10, 0.11))
    assert judge(shown, "direction", 0.5, ">") == (
        "no",
        "90% interval inside ±margin: too small to count, though the 95% interval excludes 0",
    )
    assert judge(shown, "direction", 0.1, ">") == ("yes", "95% interval excludes 0 on the paper's side")
    # on the other side the reason is the side: -0.1 at margin 0.5
    assert judge(paired((-0.11, -0.10, -0.09)), "direction", 0.5, ">")[1] == "95% interval excludes 0 on the other side"


def test_direction_verdict_ends_at_whether_the_effect_clears_the_margin() -> None:
    # per-seed differences effect -+ 0.05 alternating (sd 0.05), margin 0.05. A true effect of 0.01, inside it:
    #   n = 4:   95% [-0.082, +0.102], 90% [-0.058, +0.078] crosses the margin: inconclusive
    #   n = 16:  95% [-0.018, +0.038] holds 0, 90% [-0.013, +0.033] inside +-0.05: no
    #   n = 256: 95% [+0.004, +0.016] excludes 0, 90% [+0.005, +0.015] inside +-0.05: still no (deciding
    #            significance first would say yes here: any nonzero effect would end at yes)
    # A true effect of 0.07, beyond it: n = 4 95% [-0.022, +0.162] inconclusive; from n = 16 (95% [+0.042, +0.098],
    # 90% [+0.047, +0.093] not inside +-0.05) yes
    def verdicts(effect: float) -> dict[int, tuple[str, bool]]:
        out = {}
        for n in (4, 16, 64, 256):
            a = Estimate({s: effect + (0.05 if s % 2 else -0.05) for s in range(n)})
            d = difference(a, Estimate(dict.fromkeys(range(n), 0.0)))
            out[n] = (direction(d, ">", 0.05), d.interval(0.95)[0] > 0)
        return out

    assert verdicts(0.01) == {4: ("inconclusive", False), 16: ("no", False), 64: ("no", False), 256: ("no", True)}
    assert verdicts(0.07) == {4: ("inconclusive", False), 16: ("yes", True), 64: ("yes", True), 256: ("yes", True)}


def test_equivalence_and_at_most_reasons() -> None:
    tiny = paired((0.0, 0.01, 0.02))  # 90% [-0.007, 0.027]
    assert judge(tiny, "equivalence", 0.05) == ("yes", "90% interval inside ±margin")
    assert judge(tiny, "equivalence", 0.02) == ("inconclusive", "90% interval crosses ±margin")
    assert judge(tiny, "at most", 0.05) == ("yes", "90% interval below the margin")
    assert judge(tiny, "at most", 0.02) == ("inconclusive", "90% interval contains the margin")
    big = paired((0.09, 0.10, 0.11))  # 90% [0.083, 0.117]
    assert judge(big, "equivalence", 0.05) == ("no", "90% interval outside ±margin")
    assert judge(big, "at most", 0.05) == ("no", "90% interval above the margin")
    # the 90% interval [-0.007, 0.027] crosses 0: equivalence does not need a sign, at most neither
    assert equivalent(paired((-0.02, -0.01, 0.0)), 0.05) == "yes"


def test_one_seed_is_inconclusive_under_every_rule() -> None:
    d = difference(Estimate({0: 10.0}), Estimate({0: 0.0}))  # a difference of 10 on one seed
    for rule in RULES:
        assert judge(d, rule, 0.01) == ("inconclusive", "one seed measures no training noise")
    assert direction(d, ">", 0.01) == equivalent(d, 100.0) == at_most(d, 100.0) == "inconclusive"


@pytest.mark.parametrize(
    ("rule", "margin", "expected", "message"),
    [
        ("bigger", 0.1, ">", "rule must be one of"),
        ("direction", 0.1, "tie", "expected must be"),
        ("direction", 0.0, ">", "a margin must be positive"),
        ("equivalence", -0.1, ">", "a margin must be positive"),
        ("at most", math.nan, ">", "a margin must be positive"),
    ],
)
def test_invalid_rule_side_or_margin_raise(rule: str, margin: float, expected: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        judge(difference(A, B), rule, margin, expected)


def test_the_wrappers_refuse_what_judge_refuses() -> None:
    with pytest.raises(ValueError, match="expected must be"):
        direction(difference(A, B), "=", 0.1)
    with pytest.raises(ValueError, match="a margin must be positive"):
        equivalent(difference(A, B), 0.0)
    with pytest.raises(ValueError, match="a margin must be positive"):
        at_most(difference(A, B), -1.0)


# --- combine --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verdicts", "necessary", "combined"),
    [
        (["yes"], None, "yes"),
        (["yes", "yes", "yes"], None, "yes"),
        (["no", "no"], None, "no"),
        (["yes", "no"], None, "partly"),
        (["no", "yes", "yes"], None, "partly"),
        (["yes", "inconclusive"], None, "inconclusive"),
        (["yes", "no", "inconclusive"], None, "inconclusive"),  # an unresolved part wins over yes + no
        (["inconclusive"], None, "inconclusive"),
        (["no", "inconclusive"], [True, False], "no"),  # a necessary part said no: the rest cannot save it
        (["no", "yes"], [True, False], "no"),
        (["yes", "no", "yes"], [False, True, False], "no"),
        (["no", "yes"], [False, True], "partly"),  # the necessary part said yes
        (["inconclusive", "no"], [True, False], "inconclusive"),  # a necessary part undecided is not a no
        (["yes", "yes"], [True, True], "yes"),
        ([], None, "no data"),
    ],
)
def test_combine(verdicts: list[str], necessary: list[bool] | None, combined: str) -> None:
    assert combine(verdicts, necessary) == combined


# --- estimates from runs --------------------------------------------------------------------------------------------


def test_estimates_keeps_completed_runs_by_group_and_seed() -> None:
    runs = pd.DataFrame([
        {"k": 1, "seed": 0, "status": "completed", "loss": 1.0},
        {"k": 1, "seed": 1, "status": "completed", "loss": 2.0},
        {"k": 1, "seed": 2, "status": "completed", "loss": 4.0},
        {"k": 1, "seed": 3, "status": "diverged", "loss": 9.0},
        {"k": 2, "seed": 0, "status": "completed", "loss": 1.5},
        {"k": 2, "seed": 1, "status": "failed", "loss": 0.1},
        {"k": 2, "seed": 2, "status": "completed", "loss": math.nan},
        {"k": 4, "seed": 0, "status": "diverged", "loss": 7.0},
    ])  # fmt: skip
    found = estimates(runs, ["k"], "loss")
    assert list(found) == [(1,), (2,)]  # tuple keys; k=4 has no completed run
    assert found[(1,)].by_seed == {0: 1.0, 1: 2.0, 2: 4.0}  # the diverged seed 3 is left out
    assert found[(1,)].se == pytest.approx(math.sqrt(7) / 3)
    assert found[(2,)].by_seed == {0: 1.5}  # failed left out, NaN dropped
    assert math.isnan(found[(2,)].se)  # one seed
    assert found[(1,)].examples == {} and found[(2,)].examples == {}  # no `examples` given
    assert by_value(found) == {1: found[(1,)], 2: found[(2,)]}


def test_estimates_groups_by_several_columns() -> None:
    runs = pd.DataFrame([
        {"task": "cb", "model": "dense", "seed": 0, "status": "completed", "acc": 0.75},
        {"task": "cb", "model": "sparse", "seed": 0, "status": "completed", "acc": 0.5},
        {"task": "rte", "model": "dense", "seed": 0, "status": "completed", "acc": 0.6},
    ])  # fmt: skip
    found = estimates(runs, ["task", "model"], "acc")
    assert list(found) == [("cb", "dense"), ("cb", "sparse"), ("rte", "dense")]
    assert found[("cb", "dense")].by_seed == {0: 0.75}
    assert math.isnan(found[("cb", "dense")].se)  # one seed of an accuracy: no binomial error any more
    assert by_value(found) == found  # several key columns: the tuples stay


def test_estimates_without_a_seed_column_never_pair_runs_by_order() -> None:
    runs = pd.DataFrame({"k": [1, 1, 1, 2, 2, 2], "status": ["completed"] * 6, "loss": [2.0, 1.0, 3.0, 5.0, 4.0, 6.0]})
    found = by_value(estimates(runs, ["k"], "loss"))
    assert sorted(found[1].by_seed.values()) == [1.0, 2.0, 3.0]
    assert found[1].se == pytest.approx(1 / math.sqrt(3))
    # three runs each, no seeds: unpaired (the paired differences 3, 3, 3 would have se 0), Welch:
    # se sqrt(1/3 + 1/3), df (2/3)^2 / ((1/3)^2 / 2 + (1/3)^2 / 2) = 4
    d = difference(found[2], found[1])
    assert d.method == "unpaired, Welch"
    assert d.value == pytest.approx(3.0)
    assert d.se == pytest.approx(math.sqrt(2 / 3))
    assert d.df == pytest.approx(4.0)


def test_estimates_refuse_repeated_or_missing_seeds() -> None:
    twice = pd.DataFrame({"k": [1, 1], "seed": [0, 0], "status": ["completed"] * 2, "loss": [1.0, 3.0]})
    with pytest.raises(ValueError, match=r"several completed runs of seed\(s\) \[0\]"):
        estimates(twice, ["k"], "loss")
    unseeded = pd.DataFrame({"run": ["a", "b"], "k": [1, 1], "seed": [0, math.nan], "loss": [1.0, 3.0]})
    with pytest.raises(ValueError, match=r"runs \['b'\] of \{'k': 1\} have no seed"):
        estimates(unseeded, ["k"], "loss")


def test_estimates_without_status_or_metric() -> None:
    # no status column: every run counts; a metric that is not there: empty estimates
    runs = pd.DataFrame({"k": [1, 1], "seed": [0, 1], "loss": [1.0, 3.0]})
    assert by_value(estimates(runs, ["k"], "loss"))[1].by_seed == {0: 1.0, 1: 3.0}
    missing = by_value(estimates(runs, ["k"], "accuracy"))
    assert missing[1].n == 0 and missing[1].text() == "-"


def test_estimates_attach_per_example_series_of_completed_runs_by_seed() -> None:
    runs = pd.DataFrame([
        {"run": "r0", "k": 1, "seed": 0, "status": "completed", "acc": 0.5},
        {"run": "r1", "k": 1, "seed": 1, "status": "completed", "acc": 0.75},
        {"run": "r2", "k": 1, "seed": 2, "status": "diverged", "acc": 0.25},
        {"run": "r3", "k": 1, "seed": 3, "status": "completed", "acc": math.nan},
        {"run": "r4", "k": 1, "seed": 4, "status": "completed", "acc": 1.0},  # no records on disk
        {"run": "r5", "k": 2, "seed": 0, "status": "completed", "acc": 0.25},
    ])  # fmt: skip
    records = {run: pd.Series([float(i % 2), 1.0], index=["e0", "e1"]) for i, run in enumerate(runs["run"])}
    del records["r4"]
    calls = []

    def examples(run: str, metric: str) -> pd.Series | None:
        calls.append((run, metric))
        return records.get(run)

    found = by_value(estimates(runs, ["k"], "acc", examples))
    assert found[1].by_seed == {0: 0.5, 1: 0.75, 4: 1.0}
    assert found[1].examples == {0: records["r0"], 1: records["r1"]}  # seed -> its run's series; r4 has none
    assert found[2].examples == {0: records["r5"]}
    # asked only for completed runs with a value: not the diverged r2 nor r3 without a value
    assert sorted(calls) == [("r0", "acc"), ("r1", "acc"), ("r4", "acc"), ("r5", "acc")]


# --- properties -----------------------------------------------------------------------------------------------------

per_seed = st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=6)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_grid_of_two_settings_matches_the_paired_t_test(data: st.DataObject) -> None:
    a = data.draw(per_seed)
    b = data.draw(st.lists(st.floats(-10, 10, allow_nan=False), min_size=len(a), max_size=len(a)))
    diffs = np.subtract(a, b)
    assume(np.std(diffs) > 1e-3)
    d = Grid.of({"a": Estimate(dict(enumerate(a))), "b": Estimate(dict(enumerate(b)))}).difference("a", "b")
    ref = scipy_stats.ttest_rel(a, b)
    assert d.value == pytest.approx(np.mean(diffs), abs=1e-9)
    assert d.se == pytest.approx(scipy_stats.sem(diffs), rel=1e-6)
    assert d.df == ref.df == len(a) - 1
    assert d.method == "paired by seed"
    assert d.value / d.se == pytest.approx(ref.statistic, rel=1e-6)


@settings(max_examples=200, deadline=None)
@given(per_seed, per_seed)
def test_intervals_agree_with_scipy(a: list[float], b: list[float]) -> None:
    # paired when a and b share their seeds (as many as both have), Welch on disjoint seeds
    assume(np.std(a) > 1e-3 and np.std(b) > 1e-3)
    k = min(len(a), len(b))
    assume(np.std(np.subtract(a[:k], b[:k])) > 1e-3)
    cases = [
        (difference(Estimate(dict(enumerate(a[:k]))), Estimate(dict(enumerate(b[:k])))),
         scipy_stats.ttest_rel(a[:k], b[:k])),
        (difference(Estimate({("a", i): x for i, x in enumerate(a)}), Estimate({("b", i): x for i, x in enumerate(b)})),
         scipy_stats.ttest_ind(a, b, equal_var=False)),
    ]  # fmt: skip
    for d, ref in cases:
        lo95, hi95 = d.interval(0.95)
        lo90, hi90 = d.interval(0.90)
        assert lo95 < lo90 < d.value < hi90 < hi95  # nested, both around the value
        assert d.value - lo95 == pytest.approx(hi95 - d.value)  # symmetric
        assert (lo95, hi95) == pytest.approx(tuple(ref.confidence_interval(0.95)), rel=1e-6, abs=1e-9)
        assume(abs(ref.pvalue - 0.05) > 1e-6)
        # a direction claim is decided (yes or no from the 95% interval) exactly when scipy's p < 0.05
        assert (lo95 > 0 or hi95 < 0) == (ref.pvalue < 0.05)


def test_trend_is_the_per_seed_least_squares_slope_judged_over_seeds() -> None:
    # three x, four seeds; each seed's slope by numpy's own fit, then a one-sample t over the four slopes
    xs = (0.1, 0.25, 0.5)
    ys = {0: (1.90, 1.91, 1.94), 1: (1.95, 1.94, 1.97), 2: (1.88, 1.90, 1.91), 3: (1.92, 1.93, 1.96)}
    points = {x: Estimate({s: ys[s][i] for s in ys}) for i, x in enumerate(xs)}
    d = trend(points)
    slopes = [np.polyfit(xs, ys[s], 1)[0] for s in ys]
    assert d.value == pytest.approx(np.mean(slopes))
    assert d.se == pytest.approx(scipy_stats.sem(slopes))
    assert (d.df, d.n, d.method) == (3, 4, "slope per seed")
    assert d.value / d.se == pytest.approx(scipy_stats.ttest_1samp(slopes, 0).statistic)
    # a seed one x lacks is left out of every slope; fewer than two x or no shared seed: no trend
    points[0.5] = Estimate({s: ys[s][2] for s in (0, 1, 2)})
    assert trend(points).n == 3 and trend(points).value == pytest.approx(np.mean(slopes[:3]))
    assert trend({0.1: points[0.1]}) is NO_DIFFERENCE
    assert trend({0.1: Estimate({0: 1.0}), 0.5: Estimate({1: 2.0})}) is NO_DIFFERENCE
