"""What a study's report is: a verdict computed from the numbers, a display table, and the helpers builders share.

A verdict is "yes", "partly", "no", "inconclusive" (the runs cannot tell) or "no data", combined from the parts of
the paper's claim (`Part`: what is compared, the difference, the rule, its margin and the part's verdict). Each
builder states the check it made in `checked`, and every part states its test, so a reader can disagree.

The rules (`judge`; ../shared/STATISTICS.md): a direction claim is no when the 95% interval excludes zero on the
other side or the 90% interval lies inside +-margin (the margin decides first: an effect shown smaller than the
smallest that counts is no, even when it is shown to differ from zero), yes when the 95% interval excludes zero on
the paper's side, else inconclusive. An equivalence claim (two one-sided tests, Lakens 2017) is yes when the 90%
interval lies inside +-margin, no when it lies wholly outside it. An "at most" claim (a cost of at most the
margin: non-inferiority) is yes when the 90% interval's upper end is below the margin, no when its lower end is
above it. Parts combine (`combine`) into the study's verdict.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import pandas as pd

from moe_lab.report.reference import Reference, reference
from moe_lab.report.stats import DIRECTION_LEVEL, EQUIVALENCE_LEVEL, Difference

RULES = ("direction", "equivalence", "at most")

RULE_TEXT = (
    "each part is judged on Student's t at its degrees of freedom (paired by seed, or pooled over the study's grid "
    "of settings x seeds with seed as block, or, where a part holds a factor fixed, such as the base model or the "
    "train CF, within each level of it; one seed measures no training noise and decides nothing): a direction "
    "part is no when the 95% interval excludes 0 on the other side or the 90% interval lies inside +-margin (too "
    "small to count, even where the 95% interval excludes 0), else yes when the 95% interval excludes 0 on the "
    "paper's side; an equivalence part is yes when the 90% interval lies inside +-margin, "
    "no when it lies wholly outside; an 'at most' part is yes when the 90% interval ends below the margin, no when it "
    "starts above it; else inconclusive. Parts combine: all yes is yes, all no is no, a no of a necessary part is "
    "no, any other undecided part is inconclusive, and parts decided both ways are partly"
)


@dataclass(frozen=True)
class Part:
    """One part of a paper's claim: a difference of our settings, the rule and margin it is judged by."""

    name: str  # what is compared, e.g. "top-1 - top-2"
    claim: str  # the paper's side in words, e.g. "> 0 (top-2 lowers the loss)"
    difference: Difference
    rule: str  # direction | equivalence | at most
    margin: float  # in the difference's own unit
    expected: str = ">"  # a direction claim's side
    necessary: bool = False  # a "no" here makes the whole claim "no"
    unit: str = ""  # the difference's unit, e.g. "nats", "accuracy"
    scale: float = 1.0  # display: 100 shows an accuracy in points
    blocked: str = ""  # why the runs cannot decide this part whatever the numbers (it is then inconclusive)

    @property
    def judgement(self) -> tuple[str, str]:
        """(verdict, reason)."""
        if self.blocked:
            return "inconclusive", self.blocked
        return judge(self.difference, self.rule, self.margin, self.expected)

    @property
    def verdict(self) -> str:
        return self.judgement[0]

    @property
    def reason(self) -> str:
        return self.judgement[1]

    @property
    def digits(self) -> int:
        """Decimals to show: 1 for points (scale 100), 3 for nats."""
        return 1 if self.scale == 100 else 3

    def text(self) -> str:
        """'top-1 - top-2 +0.033 ± 0.002 (two-way ..., 4 df)'."""
        return f"{self.name} {self.difference.text(self.digits, self.scale)}"

    def row(self) -> dict[str, str]:
        """The part as a row of the study's claims table."""
        d, s, digits = self.difference, self.scale, self.digits + 1

        def span(level: float) -> str:
            lo, hi = d.interval(level)
            return "-" if math.isnan(lo) else f"[{lo * s:+.{digits}f}, {hi * s:+.{digits}f}]"

        unit = f" {self.unit}" if self.unit else ""
        return {
            "part": self.name + (" (necessary)" if self.necessary else ""),
            "paper's claim": self.claim,
            "ours": d.text(self.digits, s),
            f"{DIRECTION_LEVEL:.0%} interval": span(DIRECTION_LEVEL),
            f"{EQUIVALENCE_LEVEL:.0%} interval": span(EQUIVALENCE_LEVEL),
            "margin": f"±{self.margin * s:g}{unit}" if self.rule != "at most" else f"{self.margin * s:g}{unit}",
            "test": f"{self.rule}: {self.reason}",
            "verdict": self.verdict,
        }


@dataclass
class Verdict:
    reproduced: str  # yes | partly | no | inconclusive | no data
    ours: str  # what we measured, in a sentence
    checked: str  # the rule that produced `reproduced`
    parts: list[Part] = field(default_factory=list)


def verdict_of(parts: list[Part], checked: str, extra: str = "") -> Verdict:
    """The verdict combined from `parts`; `ours` lists each part's difference (after `extra`, if any). The rules
    every part follows (RULE_TEXT) are stated once, at the top of the report."""
    reproduced = combine([p.verdict for p in parts], [p.necessary for p in parts])
    ours = "; ".join([*([extra] if extra else []), *(p.text() for p in parts)]) or "-"
    return Verdict(reproduced, ours, checked, parts)


def parts_table(parts: list[Part]) -> pd.DataFrame:
    """The claims table: one row per part with its difference, intervals, margin, test and verdict."""
    return pd.DataFrame([p.row() for p in parts])


@dataclass
class StudyReport:
    name: str
    reference: Reference
    table: pd.DataFrame  # display table: strings, our columns and the paper's
    verdict: Verdict
    notes: list[str] = field(default_factory=list)
    data: pd.DataFrame | None = None  # the aggregated numbers behind the table, for csv output and plots
    problem: str | None = None  # why the study's results could not be read (a broken runs.csv)


def fmt_number(value: float, digits: int = 3) -> str:
    """A number with `digits` decimals, '-' for missing."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def percent(value: float) -> str:
    """A fraction as a percentage with one decimal, '-' for missing."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def paper_value(ref: Reference, row: str, col: str) -> str:
    """The paper's number at (row, col) as text, '' where the paper has none."""
    value = ref.numbers.get(row, {}).get(col, "")
    return f"{value:g}" if isinstance(value, float) else str(value)


def cell_text(value: object) -> str:
    """A key value as text: 4.0 -> '4', 0.75 -> '0.75', NaN -> ''."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:g}"
    return str(value)


def status_notes(agg: pd.DataFrame) -> list[str]:
    """Notes for groups with runs that diverged or failed: they are marked, not averaged."""
    notes = []
    keys = list(agg.columns[: list(agg.columns).index("runs")])
    for record in agg.to_dict("records"):  # records keep each column's type (iterrows would make ints floats)
        if record["diverged"] or record["failed"]:
            label = ", ".join(f"{k}={cell_text(record[k])}" for k in keys)
            notes.append(
                f"{label}: {int(record['diverged'])} diverged, {int(record['failed'])} failed of "
                f"{int(record['runs'])} runs (left out of the means)"
            )
    return notes


def capacity_note(study) -> str:
    """How the study's runs turned a capacity factor into slots, and how the paper's factors compare."""
    convention, top_k = "gshard", None
    for run in study.runs["run"]:
        moe = ((study.summary(str(run)) or {}).get("config") or {}).get("moe") or {}
        if moe:
            convention, top_k = moe.get("capacity_convention", "gshard"), moe.get("top_k")
            break
    ours = "ceil(cf * k * T / E)" if convention == "gshard" else "round(cf * T / E), at least 4"
    note = (
        f"Capacity factors here are moe.capacity_convention={convention}: an expert holds {ours} slots of a group "
        "of T tokens. The paper's (Mesh TensorFlow / flaxformer) hold round(cf * T / E), at least 4, with no "
        "factor k"
    )
    if convention == "gshard" and top_k and top_k > 1:
        note += f", so at top-{top_k} our CF c holds the slots of the paper's CF {top_k}c"
    return note + "; moe.capacity_convention=flaxformer runs in the paper's."


def no_data(name: str) -> StudyReport:
    """The report of a study that has not been run."""
    why = f"no results/{name}/runs.csv: run `moe-lab sweep {name}`"
    return StudyReport(name, reference(name), pd.DataFrame(), Verdict("no data", "-", why))


def strictly_decreasing(values: list[float]) -> bool:
    """Whether every value is below the one before it."""
    return all(b < a for a, b in itertools.pairwise(values))


def inside_margin(d: Difference, margin: float) -> bool:
    """Whether d's 90% interval lies inside +-margin (two one-sided tests: too small to count)."""
    lo, hi = d.interval(EQUIVALENCE_LEVEL)
    return -margin < lo and hi < margin


def clears_zero(d: Difference, expected: str) -> tuple[bool, bool]:
    """(on the side `expected` ('>' or '<'), on the other side): where d's 95% interval excludes 0."""
    lo, hi = d.interval(DIRECTION_LEVEL)
    return (lo > 0, hi < 0) if expected == ">" else (hi < 0, lo > 0)


def judge(d: Difference, rule: str, margin: float, expected: str = ">") -> tuple[str, str]:
    """(verdict, the reason in words) of a claim about d under `rule` (direction | equivalence | at most) with
    `margin`; `expected` is the paper's side ('>' or '<') of a direction claim."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}")
    if expected not in (">", "<"):
        raise ValueError(f"expected must be '>' or '<', got {expected!r}")
    if not margin > 0:
        raise ValueError(f"a margin must be positive, got {margin!r}")
    if not d.decidable:
        why = "one seed measures no training noise" if d.n == 1 else "no standard error over seeds"
        return "inconclusive", why
    lo, hi = d.interval(EQUIVALENCE_LEVEL)
    inside, below, above = inside_margin(d, margin), hi < -margin, lo > margin
    if rule == "equivalence":
        if inside:
            return "yes", "90% interval inside ±margin"
        if below or above:
            return "no", "90% interval outside ±margin"
        return "inconclusive", "90% interval crosses ±margin"
    if rule == "at most":
        if hi < margin:
            return "yes", "90% interval below the margin"
        if lo > margin:
            return "no", "90% interval above the margin"
        return "inconclusive", "90% interval contains the margin"
    right, wrong = clears_zero(d, expected)
    if wrong:
        return "no", "95% interval excludes 0 on the other side"
    # The margin decides before significance: an effect shown smaller than the smallest that counts is a "no"
    # to the paper's claim even when it is shown to differ from 0 (Lakens, Scheel and Isager 2018, "Equivalence
    # Testing for Psychological Research", AMPPS: an effect both significant and equivalent differs from 0 but is
    # too small to matter). Deciding significance first, a true effect inside the margin would turn from no to
    # yes as seeds are added, and any nonzero effect would end at yes; this way, as the seeds grow, the verdict
    # ends at no for a true effect inside the margin and at yes for one beyond it.
    if inside:
        if right:
            return "no", "90% interval inside ±margin: too small to count, though the 95% interval excludes 0"
        return "no", "90% interval inside ±margin: too small to count"
    if right:
        return "yes", "95% interval excludes 0 on the paper's side"
    return "inconclusive", "95% interval contains 0, 90% interval crosses ±margin"


def direction(d: Difference, expected: str, margin: float) -> str:
    """Whether d is on the paper's side `expected` ('>' or '<'): see `judge`."""
    return judge(d, "direction", margin, expected)[0]


def equivalent(d: Difference, margin: float) -> str:
    """Whether d is within +-margin (two one-sided tests): see `judge`."""
    return judge(d, "equivalence", margin)[0]


def at_most(d: Difference, margin: float) -> str:
    """Whether d (a cost) is below `margin` (non-inferiority): see `judge`."""
    return judge(d, "at most", margin)[0]


def combine(verdicts: list[str], necessary: list[bool] | None = None) -> str:
    """One verdict from its parts': a decided no of a necessary part is no; else all yes is yes, all no is no, any
    part undecided is inconclusive, and parts decided both ways are partly."""
    if not verdicts:
        return "no data"
    necessary = necessary or [False] * len(verdicts)
    if any(v == "no" and need for v, need in zip(verdicts, necessary, strict=True)):
        return "no"
    if all(v == "yes" for v in verdicts):
        return "yes"
    if all(v == "no" for v in verdicts):
        return "no"
    if any(v not in ("yes", "no") for v in verdicts):
        return "inconclusive"
    return "partly"
