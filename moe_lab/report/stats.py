"""The statistics every verdict rests on (../shared/STATISTICS.md): estimates over seeds, differences with
Student's t at their real degrees of freedom.

- A setting is measured once per training seed. Its mean's standard error is std / sqrt(n) with n - 1 degrees of
  freedom. One seed measures no training noise, so a rule never decides on one seed.
- Two settings run with the same seeds are compared paired by seed: the per-seed differences' mean, std / sqrt(n),
  n - 1 degrees of freedom. Settings with different seeds are compared unpaired, with Welch's standard error and
  the Welch-Satterthwaite degrees of freedom (Welch 1947).
- A study that runs a grid of settings over the same seeds is a randomized complete block design (setting x seed,
  seed as block; Montgomery, "Design and Analysis of Experiments", ch. 4): the residual mean square of the additive
  two-way fit pools the noise of the whole grid, with (settings - 1) (seeds - 1) degrees of freedom, and a contrast
  sum(c_a mean_a) with sum(c_a) = 0 has standard error sqrt(MSE sum(c_a^2) / seeds).
- Where the settings fine-tune different base models, one pretraining per (model, seed), the block is that
  pretraining, not the seed: the residual pools each model's own two-way fit, with sum over models of
  (its settings - 1) (seeds - 1) degrees of freedom, and judges a contrast whose coefficients sum to zero within
  each model (a difference of gains). Blocking by seed alone would leave each base model's own offset at a seed
  in the residual (a nested block design; Montgomery, ch. 14).
- Where every part of a study holds a crossed factor fixed (aux-loss-finetune's train CF), each part is judged
  within that factor's levels (blocks: level x seed): an effect against its own interaction with the seeds, as a
  repeated-measures analysis tests it, not against how much the held factor moves a seed (`Grid`).
- Per-example records pair two runs of one seed example by example (Dror et al. 2018): the seed's difference is
  the mean per-example difference over the examples both saw, and the per-example spread gives the validation
  set's share of the noise (`eval_se`), shown beside the total. The verdict rests on the seeds' spread, which holds
  both the training and the validation noise.

The rules that turn a difference into yes, no or inconclusive live in moe_lab.report.verdict.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import pandas as pd
from scipy import stats as scipy_stats

from moe_lab.report.results import completed

DIRECTION_LEVEL = 0.95  # a two-sided interval that excludes zero: the effect is there (or the other way)
EQUIVALENCE_LEVEL = 0.90  # two one-sided tests at 5% each (Lakens 2017): inside or outside the margin


def _isnan(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def t_quantile(level: float, df: float) -> float:
    """The two-sided `level` quantile of Student's t with df degrees of freedom (12.71 at 1 df, 4.30 at 2, 1.96
    at infinity for 95%)."""
    return float(scipy_stats.t.ppf(0.5 + level / 2, df))


@dataclass(frozen=True)
class Estimate:
    """A setting's metric at each seed, with each seed's per-example values where the runs recorded them."""

    by_seed: dict = field(default_factory=dict)  # seed (or, without seeds, a run's own key) -> value
    examples: dict = field(default_factory=dict)  # seed -> pd.Series of the per-example metric, by example id

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
        """std / sqrt(n) over seeds; NaN for one seed (no training noise measured)."""
        return self.std / math.sqrt(self.n) if self.n >= 2 else math.nan

    def text(self, digits: int = 3, scale: float = 1.0) -> str:
        """'0.612 ± 0.011 (n=3)': the mean and its standard error; '-' for no runs."""
        if self.n == 0:
            return "-"
        se = self.se
        digits = _digits(se, digits, scale)
        spread = "" if math.isnan(se) else f" ± {se * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f}{spread} (n={self.n})"


def _digits(se: float, digits: int, scale: float) -> int:
    """Decimals to show a standard error with: more than `digits` (up to 5) when it would round to zero (but not
    for an error that is zero up to float rounding)."""
    while not _isnan(se) and se > 1e-12 and digits < 5 and round(se * scale, digits) == 0:
        digits += 1
    return digits


@dataclass(frozen=True)
class Difference:
    """A contrast of settings (a - b, or an interaction), its standard error, degrees of freedom and method."""

    value: float
    se: float
    df: float  # NaN: no standard error over seeds
    n: int  # seeds in the comparison
    method: str  # "paired by seed", "two-way 3 settings x 3 seeds", "Welch", "one seed"
    eval_se: float = math.nan  # the validation set's share of the noise, from per-example records

    @property
    def decidable(self) -> bool:
        """Whether a rule may decide on it: a value, a standard error over two or more seeds."""
        return not (_isnan(self.value) or _isnan(self.se) or _isnan(self.df)) and self.n >= 2 and self.df >= 1

    def interval(self, level: float = DIRECTION_LEVEL) -> tuple[float, float]:
        """value -+ t(level, df) se; (NaN, NaN) when it cannot be decided on."""
        if not self.decidable:
            return math.nan, math.nan
        half = t_quantile(level, self.df) * self.se
        return self.value - half, self.value + half

    def text(self, digits: int = 3, scale: float = 1.0) -> str:
        """'+0.021 ± 0.008 (paired by seed, n=3, 2 df)': the value, its standard error and how it was computed."""
        if _isnan(self.value):
            return "-"
        digits = _digits(self.se, digits, scale)
        se = "" if _isnan(self.se) else f" ± {self.se * scale:.{digits}f}"
        how = f"{self.method}, n={self.n}" + (f", {_df(self.df)} df" if self.decidable else "")
        if not _isnan(self.eval_se):
            how += f"; validation set ± {self.eval_se * scale:.{_digits(self.eval_se, digits, scale)}f}"
        return f"{self.value * scale:+.{digits}f}{se} ({how})"


def _df(df: float) -> str:
    return f"{df:.0f}" if float(df).is_integer() else f"{df:.1f}"


NO_DIFFERENCE = Difference(math.nan, math.nan, math.nan, 0, "no runs")

Examples = Callable[[str, str], "pd.Series | None"]  # (run, metric) -> per-example values, or None


def _per_seed_examples(terms: list[tuple[float, Estimate]], seeds: list) -> tuple[dict, float] | None:
    """Per seed, the contrast's mean over the examples every term saw, and the validation set's share of the
    standard error of the mean over seeds (sqrt(sum of per-seed variances of the mean) / n); None unless every
    term has per-example values at every seed."""
    if not all(s in est.examples for _, est in terms for s in seeds):
        return None
    values, variance = {}, 0.0
    for s in seeds:
        series = [est.examples[s] for _, est in terms]
        common = series[0].index
        for other in series[1:]:
            common = common.intersection(other.index)
        if len(common) < 2:
            return None
        per_example = sum(c * x.loc[common].to_numpy(dtype=float) for (c, _), x in zip(terms, series, strict=True))
        values[s] = float(per_example.mean())
        variance += float(per_example.var(ddof=1)) / len(common)
    return values, math.sqrt(variance) / len(seeds)


def contrast(terms: list[tuple[float, Estimate]]) -> Difference:
    """sum(c * a) over (c, a) in terms, e.g. [(1, a), (-1, b)] for a - b: paired by seed when every term has the
    same two or more seeds (the per-seed contrasts' std / sqrt(n), n - 1 df), unpaired with Welch's standard error
    and degrees of freedom when every term has two or more seeds of its own; one seed decides nothing (its
    per-example standard error, where recorded, is shown as the validation set's share)."""
    if not terms or any(est.n == 0 for _, est in terms):
        return NO_DIFFERENCE
    seeds = sorted(terms[0][1].by_seed, key=str)
    shared = all(set(est.by_seed) == set(seeds) for _, est in terms)
    if shared:
        by_example = _per_seed_examples(terms, seeds)
        per_seed = by_example[0] if by_example else {s: sum(c * est.by_seed[s] for c, est in terms) for s in seeds}
        eval_se = by_example[1] if by_example else math.nan
        one = Estimate(per_seed)
        if len(seeds) >= 2:
            method = "paired by seed" if len(terms) > 1 else "mean over seeds"
            return Difference(one.mean, one.se, len(seeds) - 1, len(seeds), method, eval_se)
        return Difference(one.mean, math.nan, math.nan, 1, "one seed", eval_se)
    value = sum(c * est.mean for c, est in terms)
    if any(est.n < 2 for _, est in terms):
        return Difference(value, math.nan, math.nan, min(est.n for _, est in terms), "unpaired, one seed")
    parts = [(c * est.se) ** 2 for c, est in terms]
    se = math.sqrt(sum(parts))
    denominator = sum(p**2 / (est.n - 1) for p, (_, est) in zip(parts, terms, strict=True))
    df = sum(parts) ** 2 / denominator if denominator > 0 else min(est.n for _, est in terms) - 1
    return Difference(value, se, df, min(est.n for _, est in terms), "unpaired, Welch")


def pooled_means(cells: dict) -> dict:
    """Each setting's mean against zero, its standard error from the within-setting variance pooled over `cells`
    (one-way: sum over settings of their squared deviations / sum(n - 1), with that many degrees of freedom; the
    settings need not share seeds). Settings with no run are left out."""
    done = {k: est for k, est in cells.items() if est.n}
    df = sum(est.n - 1 for est in done.values())
    if df < 1:
        return {k: contrast([(1.0, est)]) for k, est in done.items()}
    mse = sum(sum((v - est.mean) ** 2 for v in est.by_seed.values()) for est in done.values()) / df
    method = f"mean, variance pooled over {len(done)} settings"
    return {k: Difference(est.mean, math.sqrt(mse / est.n), df, est.n, method) for k, est in done.items()}


def trend(points: dict[float, Estimate]) -> Difference:
    """The least-squares slope of the metric against x ({x: Estimate}), fitted per seed over the seeds every x
    has, then its mean over seeds against zero (a one-sample t, n - 1 df): a trend paired by seed."""
    seeds = set.intersection(*(set(est.by_seed) for est in points.values())) if points else set()
    xs = sorted(points)
    if len(xs) < 2 or not seeds:
        return NO_DIFFERENCE
    mean_x = sum(xs) / len(xs)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slopes = {
        s: sum((x - mean_x) * points[x].by_seed[s] for x in xs) / sxx for s in sorted(seeds, key=str)
    }  # fmt: skip
    found = contrast([(1.0, Estimate(slopes))])
    return Difference(found.value, found.se, found.df, found.n, "slope per seed")


def difference(a: Estimate, b: Estimate) -> Difference:
    """a - b (see `contrast`)."""
    return contrast([(1.0, a), (-1.0, b)])


def on_common_seeds(*estimates: Estimate) -> tuple[Estimate, ...]:
    """The estimates restricted to the seeds every one of them has: a paired comparison's complete cases (a seed
    one setting lacks, a failed run say, is missing evidence and leaves the others' run of it out too)."""
    seeds = tuple(sorted(set.intersection(*(set(est.by_seed) for est in estimates)), key=str)) if estimates else ()
    return tuple(_restrict(est, seeds) for est in estimates)


def mean_of(a: Estimate) -> Difference:
    """One setting's mean against zero (a one-sample t over its seeds)."""
    return contrast([(1.0, a)])


@dataclass(frozen=True)
class Grid:
    """A study's settings run over the same seeds, as a randomized complete block design (seed as block).

    The layout is the settings that share the most common set of two or more seeds (restricted to those seeds);
    its residual mean square pools the setting x seed noise of the whole grid. A contrast whose settings are all in
    the layout and whose coefficients sum to zero is judged against it; any other falls back to `contrast`.
    With `base` (setting -> a level its runs share besides the seed: the model they fine-tune, one pretraining per
    model and seed, or a setting that the study's parts hold fixed, such as the train CF), a contrast whose
    coefficients also sum to zero within each level is judged against the residual pooled within the levels
    (blocks: level x seed). That is a factorial design's own error term for an effect within a level, as in a
    repeated-measures analysis (Maxwell and Delaney, "Designing Experiments and Analyzing Data", ch. 12: each
    within-subject effect against its own interaction with subjects): how the levels themselves differ from seed
    to seed is no part of that contrast's noise, and pooling it in would inflate the contrast's error."""

    cells: dict  # setting key -> Estimate
    keys: tuple = ()  # the settings in the layout
    seeds: tuple = ()
    mse: float = math.nan
    df: int = 0
    bases: dict = field(default_factory=dict)  # setting key in the layout -> its level (base model), where given
    within_mse: float = math.nan  # the residual pooled within each level (blocks: level x seed)
    within_df: int = 0
    base_name: str = "base models"  # what the levels are, for the method text

    @classmethod
    def of(
        cls, cells: dict, base: Callable[[Hashable], Hashable] | None = None, base_name: str = "base models"
    ) -> Grid:
        """The layout of `cells` (setting -> Estimate); `base` names each setting's level (its base model, where
        settings fine-tune more than one, or the setting a study's parts hold fixed); `base_name` says what the
        levels are."""
        sets = Counter(frozenset(est.by_seed) for est in cells.values() if est.n >= 2)
        if not sets:
            return cls(cells)
        # the most common seed set; ties go to the larger set, then by the seeds' names (reproducible)
        common = max(sets, key=lambda s: (sets[s], len(s), sorted(map(str, s))))
        seeds = tuple(sorted(common, key=str))
        keys = tuple(k for k, est in cells.items() if common <= set(est.by_seed))
        if len(keys) < 2:
            return cls(cells)
        ss, df = _two_way_ss([[cells[k].by_seed[s] for s in seeds] for k in keys])
        bases = {k: base(k) for k in keys} if base is not None else {}
        if len(set(bases.values())) < 2:  # one level: its blocks are the seeds
            return cls(cells, keys, seeds, ss / df, df)
        within_ss, within_df = 0.0, 0
        for b in set(bases.values()):
            rows = [[cells[k].by_seed[s] for s in seeds] for k in keys if bases[k] == b]
            if len(rows) >= 2:
                b_ss, b_df = _two_way_ss(rows)
                within_ss, within_df = within_ss + b_ss, within_df + b_df
        within_mse = within_ss / within_df if within_df else math.nan
        return cls(cells, keys, seeds, ss / df, df, bases, within_mse, within_df, base_name)

    @property
    def method(self) -> str:
        if len(self.keys) == 2:  # two settings: the two-way layout is the paired comparison
            return "paired by seed"
        return f"two-way {len(self.keys)} settings x {len(self.seeds)} seeds"

    def _within_bases(self, terms: list[tuple[float, Hashable]]) -> bool:
        """Whether the contrast is a difference within each level (set only where there are several)."""
        if self.within_df < 1:
            return False
        sums = Counter()
        for c, k in terms:
            sums[self.bases[k]] += c
        return all(abs(v) <= 1e-12 for v in sums.values())

    def contrast(self, terms: list[tuple[float, Hashable]]) -> Difference:
        """sum(c * setting) over (c, key) in terms, judged against the pooled residual where it can be."""
        if not terms or any(k not in self.cells or self.cells[k].n == 0 for _, k in terms):
            return NO_DIFFERENCE
        estimates = [(c, self.cells[k]) for c, k in terms]
        in_layout = self.df >= 1 and all(k in self.keys for _, k in terms)
        if not in_layout or abs(sum(c for c, _ in terms)) > 1e-12:
            return contrast(estimates)
        restricted = [(c, _restrict(est, self.seeds)) for c, est in estimates]
        by_example = _per_seed_examples(restricted, list(self.seeds))
        if by_example:
            value = sum(by_example[0].values()) / len(self.seeds)
        else:
            value = sum(c * est.mean for c, est in restricted)
        mse, df, method = self.mse, self.df, self.method
        if self._within_bases(terms):
            levels = len(set(self.bases.values()))
            mse, df = self.within_mse, self.within_df
            method = f"two-way within {levels} {self.base_name}, {len(self.keys)} settings x {len(self.seeds)} seeds"
        se = math.sqrt(mse * sum(c * c for c, _ in terms) / len(self.seeds))
        eval_se = by_example[1] if by_example else math.nan
        return Difference(value, se, df, len(self.seeds), method, eval_se)

    def difference(self, a: Hashable, b: Hashable) -> Difference:
        """a - b."""
        return self.contrast([(1.0, a), (-1.0, b)])


def _two_way_ss(y: list[list[float]]) -> tuple[float, int]:
    """The residual sum of squares of the additive fit y[setting][seed] ~ setting + seed, and its degrees of
    freedom (settings - 1) (seeds - 1)."""
    rows = [sum(r) / len(r) for r in y]
    cols = [sum(r[j] for r in y) / len(y) for j in range(len(y[0]))]
    grand = sum(rows) / len(y)
    ss = sum((y[a][j] - rows[a] - cols[j] + grand) ** 2 for a in range(len(y)) for j in range(len(cols)))
    return ss, (len(y) - 1) * (len(cols) - 1)


def _restrict(est: Estimate, seeds: tuple) -> Estimate:
    return Estimate({s: est.by_seed[s] for s in seeds}, {s: v for s, v in est.examples.items() if s in seeds})


def estimates(
    runs: pd.DataFrame, by: list[str], metric: str, examples: Examples | None = None
) -> dict[tuple, Estimate]:
    """One Estimate of `metric` per group of the completed runs (key: the group's values of `by`), with each run's
    per-example values from `examples(run, metric)` where it has them.

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
        names = group["run"].astype(str).tolist() if "run" in group.columns else [None] * len(group)
        by_seed, per_example = {}, {}
        for s, v, run in zip(seeds, values, names, strict=True):
            if _isnan(v):
                continue
            by_seed[s] = float(v)
            series = examples(run, metric) if examples is not None and run is not None else None
            if series is not None:
                per_example[s] = series
        out[key] = Estimate(by_seed, per_example)
    return out


def by_value(found: dict[tuple, Estimate]) -> dict:
    """`estimates` keyed by the group's value itself where the groups have one key column, e.g. {2: ...}."""
    return {k[0] if len(k) == 1 else k: v for k, v in found.items()}


# --- rules -------------------------------------------------------------------------------------------------------
