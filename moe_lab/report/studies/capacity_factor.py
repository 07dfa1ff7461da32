"""capacity-factor: train and eval capacity factor against quality (ST-MoE Tables 8-9)."""

from __future__ import annotations

import pandas as pd

from moe_lab.report.plots import capacity_curves
from moe_lab.report.pretraining import NATS, loss_estimates
from moe_lab.report.reference import reference
from moe_lab.report.results import StudyResults, aggregate
from moe_lab.report.spec import margins
from moe_lab.report.stats import Grid, difference
from moe_lab.report.verdict import (
    Part,
    StudyReport,
    Verdict,
    capacity_note,
    fmt_number,
    percent,
    status_notes,
    verdict_of,
)

FIGURES = [capacity_curves]  # moe_lab.report.plots draws each that the results support


def build(study: StudyResults) -> StudyReport:
    """The study's table and the verdict on its claim."""
    ref = reference(study.name)
    eval_cfs = sorted(
        float(c.removeprefix("final_val_loss@cf")) for c in study.runs.columns if c.startswith("final_val_loss@cf")
    )
    loss_cols = [f"final_val_loss@cf{cf:g}" for cf in eval_cfs]
    drop_cols = [f"final_dropped_frac@cf{cf:g}" for cf in eval_cfs]
    key = "moe.train_capacity_factor"
    agg = aggregate(study.runs, [key], [*loss_cols, *drop_cols, "tokens_per_s"])
    est = {col: loss_estimates(study, [key], col) for col in loss_cols}
    table = pd.DataFrame({"train CF": agg[key].map(lambda v: f"{v:g}")})
    for cf, col, drop in zip(eval_cfs, loss_cols, drop_cols, strict=True):
        table[f"eval CF {cf:g}"] = [
            f"{est[col][t].text() if t in est[col] else '-'} ({percent(r[drop])} dropped)"
            for t, (_, r) in zip(agg[key], agg.iterrows(), strict=True)
        ]  # fmt: skip
    table["train tokens/s"] = [fmt_number(v, 0) for v in agg["tokens_per_s"]]
    table["paper (eval = train CF / eval 2.0)"] = [
        " / ".join(str(v) for v in ref.numbers.get(f"{cf:g}", {}).values()) or "-" for cf in agg[key]
    ]
    if not loss_cols or agg.empty:
        return StudyReport("capacity-factor", ref, table, Verdict("no data", "-", "needs eval-CF columns"), [], agg)
    top = loss_cols[-1]
    margin = margins(study.name)
    parts, skipped = [], []
    # 1) raising only the eval CF helps: per train CF, its runs' loss at eval CF = train CF minus at the largest,
    # paired by seed (the same runs) and by validation sequence where the runs recorded them
    for _, row in agg.iterrows():
        train_cf = row[key]
        same = f"final_val_loss@cf{train_cf:g}"
        if same not in est or same == top or train_cf not in est[same]:
            continue
        if row[f"final_dropped_frac@cf{train_cf:g}"] == 0:  # nothing dropped: a larger eval CF cannot change it
            skipped.append(f"{train_cf:g}")
            continue
        d = difference(est[same][train_cf], est[top][train_cf])
        claim = f"> 0: eval CF {eval_cfs[-1]:g} lowers the loss"
        parts.append(Part(f"train CF {train_cf:g}: eval CF {train_cf:g} - {eval_cfs[-1]:g}", claim, d, "direction",
                          margin["eval_cf"], ">", unit=NATS))  # fmt: skip
    # 2) a higher train CF is better, at the largest eval CF: the lowest train CF minus the highest, judged
    # against the grid of train CFs x seeds
    cfs = [c for c in sorted(est[top]) if est[top][c].n]
    if len(cfs) >= 2:
        d = Grid.of({c: est[top][c] for c in cfs}).difference(cfs[0], cfs[-1])
        claim = f"> 0: train CF {cfs[-1]:g} beats {cfs[0]:g}"
        name = f"at eval CF {eval_cfs[-1]:g}, train CF {cfs[0]:g} - {cfs[-1]:g}"
        parts.append(Part(name, claim, d, "direction", margin["train_cf"], ">", unit=NATS))
    checked = (
        f"(1) at every train CF that drops tokens, raising only the eval CF to {eval_cfs[-1]:g} lowers the loss "
        f"(the same runs, paired by seed); (2) at eval CF {eval_cfs[-1]:g}, the highest train CF beats the lowest"
    )
    if skipped:
        checked += f"; train CF {', '.join(skipped)} dropped nothing at its own eval CF and is left out of (1)"
    verdict = verdict_of(parts, checked) if parts else Verdict("no data", "-", checked)
    return StudyReport("capacity-factor", ref, table, verdict, [capacity_note(study), *status_notes(agg)], agg)
