"""freeze: which parameters to update when fine-tuning a sparse model (ST-MoE Fig. 5)."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd

from moe_lab.report.finetuning import ACC, cells, judged_on, metric_estimates, metric_part, task_metric
from moe_lab.report.plots import accuracy_curves
from moe_lab.report.reference import reference
from moe_lab.report.results import StudyResults, aggregate
from moe_lab.report.stats import Grid
from moe_lab.report.verdict import StudyReport, Verdict, fmt_number, status_notes, verdict_of

FIGURES = [accuracy_curves]  # moe_lab.report.plots draws each that the results support


def build(study: StudyResults) -> StudyReport:
    """The study's table and the verdict on its claim."""
    ref = reference(study.name)
    key = "finetune.freeze"
    agg = aggregate(study.runs, [key], [ACC, "best_val_accuracy", "trainable_parameters"])
    val = metric_estimates(study, [key])
    table = pd.DataFrame({
        "update": agg[key],
        f"val {task_metric(study)} (final)": cells(val, agg[key]),
        "val accuracy (best)": cells(metric_estimates(study, [key], "best_val_accuracy"), agg[key]),
        "trainable parameters": [fmt_number(v, 0) for v in agg["trainable_parameters"]],
    })  # fmt: skip
    done = {k: v for k, v in val.items() if v.n}
    if "moe" not in done or len(done) < 2:
        return StudyReport("freeze", ref, table, Verdict("no data", "-", "needs the moe preset and another"))
    grid = Grid.of(done)
    parts = [
        replace(metric_part(study, f"{k} - moe", "> 0: MoE-only is worse", grid.difference(k, "moe"), "direction"),
                necessary=True)
        for k in sorted(done, key=lambda k: done[k].mean) if k != "moe"
    ]  # fmt: skip
    ranking = ", ".join(f"{k} {v.text()}" for k, v in sorted(done.items(), key=lambda kv: -kv[1].mean))
    checked = (
        f"updating only the MoE layers is worse than every other choice (each a necessary part: MoE-only ahead of "
        f"any one is no); {judged_on(study)}"
    )
    return StudyReport("freeze", ref, table, verdict_of(parts, checked, f"val {ranking}"), status_notes(agg), agg)
