"""The statistics every verdict rests on: a mean with its standard error, a difference with the standard error of
the difference, and a three-way judgement of it.

- The standard error of a setting's mean over n seeds is std / sqrt(n) (std with ddof 1): the spread of what
  another set of training seeds would give, measured on the same validation set.
- One seed has no such spread. An accuracy measured on N validation examples then takes the binomial standard
  error sqrt(p (1 - p) / N), with the task's own N; a loss of one seed has no standard error, and a rule
  that needs one says "inconclusive" (run seeds).
- Two settings are compared by their difference and its standard error: paired when both were run with the
  same seeds (the standard error of the per-seed differences, std / sqrt(n), so noise the two share cancels),
  else sqrt(se_a^2 + se_b^2).
- A difference counts when it is more than Z = 2 standard errors from zero (about 95% two-sided). Within that it
  is a tie, and a tie is never agreement with a paper: a rule built on it says "inconclusive".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from moe_lab.report.results import completed

Z = 2.0  # standard errors a difference must exceed to count


def _isnan(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@dataclass(frozen=True)
class Estimate:
    """A setting's mean over its seeds, with the values by seed for paired comparisons."""

    by_seed: dict = field(default_factory=dict)  # seed (or, without seeds, a run's own key) -> value
    num_examples: int | None = None  # validation examples of an accuracy (binomial error for one seed)

    @property
    def n(self) -> int:
        return len(self.by_seed)

    @property
    def mean(self) -> float:
        return sum(self.by_seed.values()) / self.n if self.n else math.nan

    @property
    def std(self) -> float:
        if self.n < 2:
            return math.nan
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.by_seed.values()) / (self.n - 1))

    @property
    def se(self) -> float:
        """std / sqrt(n) over seeds; for one seed the binomial error of an accuracy, else NaN."""
        if self.n >= 2:
            return self.std / math.sqrt(self.n)
        if self.n == 1 and self.num_examples:
            return binomial_se(self.mean, self.num_examples)
        return math.nan

    def text(self, digits: int = 3, scale: float = 1.0) -> str:
        """'0.612 ± 0.011 (n=3)': the mean and its standard error; '-' for no runs."""
        if self.n == 0:
            return "-"
        se = self.se
        digits = _digits(se, digits, scale)
        spread = "" if math.isnan(se) else f" ± {se * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f}{spread} (n={self.n})"


def _digits(se: float, digits: int, scale: float) -> int:
    """Decimals to show a standard error with: more than `digits` (up to 5) when it would round to zero."""
    while not _isnan(se) and se > 0 and digits < 5 and round(se * scale, digits) == 0:
        digits += 1
    return digits


def binomial_se(accuracy: float, num_examples: int) -> float:
    """The standard error of an accuracy measured on num_examples examples."""
    if num_examples <= 0 or _isnan(accuracy):
        return math.nan
    return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / num_examples)


@dataclass(frozen=True)
class Difference:
    """a - b, its standard error and how it was computed."""

    value: float
    se: float
    paired: bool
    n: int  # seeds in the comparison (pairs when paired)

    @property
    def outcome(self) -> str:
        """'>' (a above b by more than Z standard errors), '<', 'tie', or 'unknown' (no standard error)."""
        if _isnan(self.value) or _isnan(self.se):
            return "unknown"
        if self.value > Z * self.se:
            return ">"
        if self.value < -Z * self.se:
            return "<"
        return "tie"

    def text(self, digits: int = 3, scale: float = 1.0) -> str:
        """'+0.021 ± 0.008 (paired, n=3)'."""
        if _isnan(self.value):
            return "-"
        how = "paired" if self.paired else "unpaired"
        digits = _digits(self.se, digits, scale)
        se = "" if _isnan(self.se) else f" ± {self.se * scale:.{digits}f}"
        return f"{self.value * scale:+.{digits}f}{se} ({how}, n={self.n})"


def contrast(terms: list[tuple[float, Estimate]]) -> Difference:
    """sum(c * a) over (c, a) in terms, e.g. [(1, a), (-1, b)] for a - b: paired over seeds when every term has the
    same two or more seeds (the per-seed contrasts' std / sqrt(n)), else sqrt(sum(c^2 se^2))."""
    if not terms or any(est.n == 0 for _, est in terms):
        return Difference(math.nan, math.nan, False, 0)
    seeds = set(terms[0][1].by_seed)
    if len(seeds) >= 2 and all(set(est.by_seed) == seeds for _, est in terms):
        per_seed = Estimate({s: sum(c * est.by_seed[s] for c, est in terms) for s in seeds})
        return Difference(per_seed.mean, per_seed.se, True, per_seed.n)
    value = sum(c * est.mean for c, est in terms)
    se = math.sqrt(sum((c * est.se) ** 2 for c, est in terms))
    return Difference(value, se, False, min(est.n for _, est in terms))


def difference(a: Estimate, b: Estimate) -> Difference:
    """a - b (see `contrast`)."""
    return contrast([(1.0, a), (-1.0, b)])


def estimates(runs: pd.DataFrame, by: list[str], metric: str, num_examples: int | None = None) -> dict[tuple, Estimate]:
    """One Estimate of `metric` per group of the completed runs (key: the group's values of `by`).

    Runs are told apart by their `seed` column. Without one, each run is its own unpaired draw: its key names
    the group and its row, so runs of two groups are never paired by their order. Two completed runs of one
    seed in a group mean `by` leaves out a swept column: a ValueError, not a silent overwrite."""
    out: dict[tuple, Estimate] = {}
    done = completed(runs) if "status" in runs.columns else runs
    for key, group in done.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        if "seed" in group.columns:
            label = dict(zip(by, key, strict=True))
            unseeded = group["seed"].isna()
            if unseeded.any():
                names = list(group.loc[unseeded, "run"]) if "run" in group else []
                raise ValueError(f"runs {names} of {label} have no seed")
            seeds = group["seed"].astype(int).tolist()
            repeated = sorted({s for s in seeds if seeds.count(s) > 1})
            if repeated:
                raise ValueError(
                    f"{label} has several completed runs of seed(s) {repeated}: group by every swept column "
                    f"(grouped by {by})"
                )
        else:
            seeds = [(key, i) for i in range(len(group))]
        values = group[metric].tolist() if metric in group.columns else [math.nan] * len(group)
        by_seed = {s: float(v) for s, v in zip(seeds, values, strict=True) if not _isnan(v)}
        out[key] = Estimate(by_seed, num_examples)
    return out


def by_value(found: dict[tuple, Estimate]) -> dict:
    """`estimates` keyed by the group's value itself where the groups have one key column, e.g. {2: ...}."""
    return {k[0] if len(k) == 1 else k: v for k, v in found.items()}


def combine(outcomes: list[str]) -> str:
    """One verdict from its claims' verdicts: yes if all are yes, no if all are no, partly if some are yes and
    some no (each resolved), else inconclusive (some claim could not be told apart)."""
    if not outcomes:
        return "no data"
    if any(o == "inconclusive" for o in outcomes):
        return "inconclusive"
    if all(o == "yes" for o in outcomes):
        return "yes"
    if all(o == "no" for o in outcomes):
        return "no"
    return "partly"


def direction(d: Difference, expected: str) -> str:
    """A claim that a - b is on the side `expected` ('>' or '<'): yes if it is by more than Z standard errors,
    no if it is on the other side by as much, inconclusive if it is a tie or has no standard error."""
    if expected not in (">", "<"):
        raise ValueError(f"expected must be '>' or '<', got {expected!r}")
    if d.outcome == expected:
        return "yes"
    if d.outcome in (">", "<"):
        return "no"
    return "inconclusive"


def below(d: Difference, margin: float) -> str:
    """A claim that a - b is below `margin`, e.g. that a cost is at most `margin` (a non-inferiority test):
    yes if the whole interval d +- Z se is below the margin, no if it is wholly above it, else inconclusive."""
    if d.outcome == "unknown":
        return "inconclusive"
    if d.value + Z * d.se < margin:
        return "yes"
    if d.value - Z * d.se > margin:
        return "no"
    return "inconclusive"
