"""`moe_lab/report/stats.py` against numbers worked out by hand: standard errors, differences, verdicts."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from moe_lab.report.stats import (
    Difference,
    Estimate,
    Z,
    below,
    binomial_se,
    by_value,
    combine,
    contrast,
    difference,
    direction,
    estimates,
)

CB_VAL = 56  # CB's validation examples


# --- Estimate -------------------------------------------------------------------------------------------------------


def test_se_of_three_seeds_is_std_over_sqrt_n() -> None:
    # mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 14/3; std = sqrt(14/3 / 2) = sqrt(7/3); se = sqrt(7)/3
    est = Estimate({0: 1.0, 1: 2.0, 2: 4.0})
    assert est.n == 3
    assert est.mean == pytest.approx(7 / 3)
    assert est.std == pytest.approx(math.sqrt(7 / 3))
    assert est.se == pytest.approx(math.sqrt(7) / 3)
    assert est.se == pytest.approx(0.881917, abs=1e-6)


def test_se_of_three_seeds_ignores_num_examples() -> None:
    # the seeds' spread wins over the binomial error: deviations -0.019, 0, +0.019 -> std 0.019, se 0.019/sqrt(3)
    est = Estimate({0: 0.593, 1: 0.612, 2: 0.631}, num_examples=CB_VAL)
    assert est.std == pytest.approx(0.019)
    assert est.se == pytest.approx(0.019 / math.sqrt(3))
    assert est.text() == "0.612 ± 0.011 (n=3)"
    assert est.text(digits=1, scale=100) == "61.2 ± 1.1 (n=3)"


def test_one_seed_of_an_accuracy_takes_the_binomial_error() -> None:
    # sqrt(0.75 * 0.25 / 56) = sqrt(0.003348) = 0.05786
    est = Estimate({0: 0.75}, num_examples=CB_VAL)
    assert est.se == pytest.approx(math.sqrt(0.75 * 0.25 / 56))
    assert est.se == pytest.approx(0.057864, abs=1e-6)
    assert math.isnan(est.std)
    assert est.text() == "0.750 ± 0.058 (n=1)"


def test_binomial_se_edges() -> None:
    assert binomial_se(0.5, 100) == pytest.approx(0.05)
    assert binomial_se(1.0, CB_VAL) == 0.0  # a perfect accuracy has no binomial spread
    assert math.isnan(binomial_se(0.5, 0))
    assert math.isnan(binomial_se(math.nan, CB_VAL))


def test_one_seed_of_a_loss_has_no_standard_error() -> None:
    est = Estimate({0: 1.9333})
    assert math.isnan(est.se)
    assert est.text() == "1.933 (n=1)"  # no "±" without a standard error
    assert math.isnan(Estimate({0: 0.75}, num_examples=0).se)


def test_no_runs() -> None:
    est = Estimate()
    assert est.n == 0
    assert math.isnan(est.mean) and math.isnan(est.std) and math.isnan(est.se)
    assert est.text() == "-"


# --- differences and contrasts --------------------------------------------------------------------------------------

# b's seeds spread by 1.0 each; a = b + (0.10, 0.11, 0.12): the shared spread cancels only when paired
B = Estimate({0: 1.0, 1: 2.0, 2: 3.0})
A = Estimate({0: 1.10, 1: 2.11, 2: 3.12})


def test_paired_difference_is_the_se_of_the_per_seed_differences() -> None:
    d = difference(A, B)
    # per seed 0.10, 0.11, 0.12: mean 0.11, std 0.01, se 0.01/sqrt(3) = 0.00577
    assert d.paired and d.n == 3
    assert d.value == pytest.approx(0.11)
    assert d.se == pytest.approx(0.01 / math.sqrt(3))
    assert d.outcome == ">"
    assert d.text() == "+0.110 ± 0.006 (paired, n=3)"
    assert difference(B, A).outcome == "<"


def test_pairing_matters_under_shared_seed_noise() -> None:
    # the same numbers under other seeds for b: se_a = 1.01/sqrt(3), se_b = 1/sqrt(3),
    # unpaired se = sqrt((1.01^2 + 1) / 3) = 0.8206, so 0.11 is a tie
    b_other_seeds = Estimate({3: 1.0, 4: 2.0, 5: 3.0})
    d = difference(A, b_other_seeds)
    assert not d.paired and d.n == 3
    assert d.value == pytest.approx(0.11)
    assert d.se == pytest.approx(math.sqrt((1.01**2 + 1.0) / 3))
    assert d.se == pytest.approx(0.820589, abs=1e-6)
    assert d.outcome == "tie"
    assert difference(A, B).outcome == ">"  # paired on the same seeds


def test_unpaired_when_the_seeds_differ() -> None:
    # a's seeds {0, 1, 2}, b's {0, 1}: no common full set, so sqrt(se_a^2 + se_b^2) and the smaller n
    a = Estimate({0: 0.60, 1: 0.62, 2: 0.64})  # se 0.02/sqrt(3)
    b = Estimate({0: 0.50, 1: 0.54})  # std 0.04/sqrt(2), se 0.02
    d = difference(a, b)
    assert not d.paired and d.n == 2
    assert d.value == pytest.approx(0.62 - 0.52)
    assert d.se == pytest.approx(math.sqrt(0.02**2 / 3 + 0.02**2))
    assert d.text() == "+0.100 ± 0.023 (unpaired, n=2)"


def test_one_seed_each_is_unpaired_even_on_the_same_seed() -> None:
    # one shared seed has no spread of differences: binomial errors sqrt(0.1875/56) and sqrt(0.25/56) combine
    a = Estimate({0: 0.75}, num_examples=CB_VAL)
    b = Estimate({0: 0.50}, num_examples=CB_VAL)
    d = difference(a, b)
    assert not d.paired and d.n == 1
    assert d.value == pytest.approx(0.25)
    assert d.se == pytest.approx(math.sqrt(0.4375 / 56))
    assert d.se == pytest.approx(0.088388, abs=1e-6)
    assert d.outcome == ">"  # 0.25 > 2 * 0.0884


def test_one_seed_of_a_loss_gives_an_unknown_difference() -> None:
    d = difference(Estimate({0: 1.933}), Estimate({0: 1.905}))
    assert d.value == pytest.approx(0.028)
    assert math.isnan(d.se)
    assert d.outcome == "unknown"
    assert d.text() == "+0.028 (unpaired, n=1)"


def test_interaction_contrast_of_four_terms_paired() -> None:
    # (a - b) - (c - d) per seed: 0.7 - 0.5 - 0.6 + 0.5 = 0.10, 0.8 - 0.6 - 0.6 + 0.55 = 0.15:
    # mean 0.125, std 0.05/sqrt(2), se 0.025
    a, b = Estimate({0: 0.7, 1: 0.8}), Estimate({0: 0.5, 1: 0.6})
    c, d = Estimate({0: 0.6, 1: 0.6}), Estimate({0: 0.5, 1: 0.55})
    found = contrast([(1.0, a), (-1.0, b), (-1.0, c), (1.0, d)])
    assert found.paired and found.n == 2
    assert found.value == pytest.approx(0.125)
    assert found.se == pytest.approx(0.025)
    assert found.outcome == ">"  # 0.125 > 0.05


def test_interaction_contrast_of_four_terms_unpaired() -> None:
    # d under other seeds: se_a = se_b = 0.05, se_c = 0, se_d = 0.025: se = sqrt(0.0025 + 0.0025 + 0.000625) = 0.075
    a, b = Estimate({0: 0.7, 1: 0.8}), Estimate({0: 0.5, 1: 0.6})
    c, d = Estimate({0: 0.6, 1: 0.6}), Estimate({5: 0.5, 6: 0.55})
    found = contrast([(1.0, a), (-1.0, b), (-1.0, c), (1.0, d)])
    assert not found.paired and found.n == 2
    assert found.value == pytest.approx(0.125)
    assert found.se == pytest.approx(0.075)
    assert found.outcome == "tie"  # 0.125 < 0.15


def test_contrast_coefficients_scale_the_standard_error() -> None:
    # 0.5 * (a + b), unpaired: se = sqrt(0.25 * se_a^2 + 0.25 * se_b^2) with se_a = se_b = 0.05 -> 0.05/sqrt(2)
    a, b = Estimate({0: 0.7, 1: 0.8}), Estimate({2: 0.5, 3: 0.6})
    found = contrast([(0.5, a), (0.5, b)])
    assert found.value == pytest.approx(0.65)
    assert found.se == pytest.approx(0.05 / math.sqrt(2))


@pytest.mark.parametrize(
    "terms",
    [[], [(1.0, Estimate()), (-1.0, B)], [(1.0, A), (-1.0, Estimate())]],
    ids=["no-terms", "empty-first", "empty-second"],
)
def test_an_empty_estimate_gives_an_unknown_difference(terms: list) -> None:
    d = contrast(terms)
    assert math.isnan(d.value) and math.isnan(d.se)
    assert (d.paired, d.n, d.outcome, d.text()) == (False, 0, "unknown", "-")
    assert direction(d, ">") == "inconclusive"
    assert below(d, 0.01) == "inconclusive"


# --- outcome, direction, below --------------------------------------------------------------------------------------


def test_outcome_boundaries_are_strict() -> None:
    assert Z == 2.0
    # 0.5 and 0.25 are exact in binary, so value == Z * se holds exactly
    assert Difference(0.5, 0.25, False, 1).outcome == "tie"
    assert Difference(-0.5, 0.25, False, 1).outcome == "tie"
    assert Difference(0.5 + 1e-9, 0.25, False, 1).outcome == ">"
    assert Difference(-0.5 - 1e-9, 0.25, False, 1).outcome == "<"
    assert Difference(0.0, 0.0, True, 3).outcome == "tie"
    assert Difference(1e-9, 0.0, True, 3).outcome == ">"
    assert Difference(0.5, math.nan, False, 1).outcome == "unknown"
    assert Difference(math.nan, 0.25, False, 1).outcome == "unknown"


def test_difference_text() -> None:
    assert Difference(0.021, 0.008, True, 3).text() == "+0.021 ± 0.008 (paired, n=3)"
    assert Difference(-0.01, 0.022, False, 1).text() == "-0.010 ± 0.022 (unpaired, n=1)"
    assert Difference(0.0123, 0.0046, True, 3).text(digits=1, scale=100) == "+1.2 ± 0.5 (paired, n=3)"
    assert Difference(math.nan, 0.1, False, 0).text() == "-"


def test_direction() -> None:
    above = Difference(0.5 + 1e-9, 0.25, True, 3)
    assert direction(above, ">") == "yes"
    assert direction(above, "<") == "no"
    under = Difference(-0.6, 0.25, True, 3)
    assert direction(under, "<") == "yes"
    assert direction(under, ">") == "no"
    # a tie is never agreement, nor is a difference without a standard error
    tie = Difference(0.5, 0.25, True, 3)
    assert direction(tie, ">") == direction(tie, "<") == "inconclusive"
    unknown = Difference(0.5, math.nan, False, 1)
    assert direction(unknown, ">") == direction(unknown, "<") == "inconclusive"


def test_below_is_a_non_inferiority_test() -> None:
    # yes: 0.003 + 2 * 0.0005 = 0.004 < 0.01; no: 0.05 - 2 * 0.01 = 0.03 > 0.01
    assert below(Difference(0.003, 0.0005, True, 3), 0.01) == "yes"
    assert below(Difference(0.05, 0.01, True, 3), 0.01) == "no"
    # the interval 0.003 +- 0.072 straddles the margin (the committed z-loss case), as does -0.002 +- 0.044
    assert below(Difference(0.003, 0.036, True, 3), 0.01) == "inconclusive"
    assert below(Difference(-0.002, 0.022, False, 1), 0.01) == "inconclusive"
    # a tie with zero can still be below the margin: the test is against the margin, not zero
    assert below(Difference(0.001, 0.001, True, 3), 0.01) == "yes"
    # the interval's ends touching the margin are not wholly below or above it
    assert below(Difference(0.25, 0.125, True, 3), 0.5) == "inconclusive"
    assert below(Difference(0.75, 0.125, True, 3), 0.5) == "inconclusive"
    assert below(Difference(0.75 + 1e-9, 0.125, True, 3), 0.5) == "no"
    assert below(Difference(0.003, math.nan, False, 1), 0.01) == "inconclusive"


# --- combine --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcomes", "verdict"),
    [
        (["yes"], "yes"),
        (["yes", "yes", "yes"], "yes"),
        (["no", "no"], "no"),
        (["yes", "no"], "partly"),
        (["no", "yes", "yes"], "partly"),
        (["yes", "inconclusive"], "inconclusive"),
        (["yes", "no", "inconclusive"], "inconclusive"),  # an unresolved claim wins over yes + no
        (["inconclusive"], "inconclusive"),
        ([], "no data"),
    ],
)
def test_combine(outcomes: list[str], verdict: str) -> None:
    assert combine(outcomes) == verdict


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
    assert math.isnan(found[(2,)].se)  # one seed of a loss
    assert by_value(found) == {1: found[(1,)], 2: found[(2,)]}


def test_estimates_groups_by_several_columns_and_passes_num_examples() -> None:
    runs = pd.DataFrame([
        {"task": "cb", "model": "dense", "seed": 0, "status": "completed", "acc": 0.75},
        {"task": "cb", "model": "sparse", "seed": 0, "status": "completed", "acc": 0.5},
        {"task": "rte", "model": "dense", "seed": 0, "status": "completed", "acc": 0.6},
    ])  # fmt: skip
    found = estimates(runs, ["task", "model"], "acc", num_examples=CB_VAL)
    assert list(found) == [("cb", "dense"), ("cb", "sparse"), ("rte", "dense")]
    assert found[("cb", "dense")].se == pytest.approx(math.sqrt(0.75 * 0.25 / 56))
    assert by_value(found) == found  # several key columns: the tuples stay


def test_estimates_without_a_seed_column_never_pair_runs_by_order() -> None:
    runs = pd.DataFrame({"k": [1, 1, 1, 2, 2, 2], "status": ["completed"] * 6, "loss": [2.0, 1.0, 3.0, 5.0, 4.0, 6.0]})
    found = by_value(estimates(runs, ["k"], "loss"))
    assert sorted(found[1].by_seed.values()) == [1.0, 2.0, 3.0]
    assert found[1].se == pytest.approx(1 / math.sqrt(3))
    d = difference(found[2], found[1])  # three runs each, no seeds: unpaired, sqrt(1/3 + 1/3)
    assert not d.paired and d.se == pytest.approx(math.sqrt(2 / 3))


def test_estimates_refuse_repeated_or_missing_seeds() -> None:
    twice = pd.DataFrame({"k": [1, 1], "seed": [0, 0], "status": ["completed"] * 2, "loss": [1.0, 3.0]})
    with pytest.raises(ValueError, match=r"several completed runs of seed\(s\) \[0\]"):
        estimates(twice, ["k"], "loss")
    unseeded = pd.DataFrame({"run": ["a", "b"], "k": [1, 1], "seed": [0, math.nan], "loss": [1.0, 3.0]})
    with pytest.raises(ValueError, match=r"runs \['b'\] of \{'k': 1\} have no seed"):
        estimates(unseeded, ["k"], "loss")


def test_direction_refuses_an_unknown_side() -> None:
    with pytest.raises(ValueError, match="expected must be"):
        direction(Difference(0.0, 0.1, False, 1), "tie")


def test_estimates_without_status_or_metric() -> None:
    # no status column: every run counts; a metric that is not there: empty estimates
    runs = pd.DataFrame({"k": [1, 1], "seed": [0, 1], "loss": [1.0, 3.0]})
    assert by_value(estimates(runs, ["k"], "loss"))[1].by_seed == {0: 1.0, 1: 3.0}
    missing = by_value(estimates(runs, ["k"], "accuracy"))
    assert missing[1].n == 0 and missing[1].text() == "-"


def test_a_tiny_standard_error_is_shown_with_more_decimals_not_as_zero() -> None:
    assert Difference(0.003, 0.0003, True, 3).text() == "+0.0030 ± 0.0003 (paired, n=3)"
    assert Estimate({0: 1.0, 1: 1.0002}).text() == "1.0001 ± 0.0001 (n=2)"
    assert Estimate({0: 1.0, 1: 1.0}).text() == "1.000 ± 0.000 (n=2)"  # no spread at all stays at 3 decimals
