"""aux-loss-finetune: the aux loss kept on or turned off in fine-tuning (ST-MoE Table 5)."""

from __future__ import annotations

import pandas as pd

from moe_lab.report.finetuning import ACC, cells, judged_on, metric_estimates, metric_part, task_metric
from moe_lab.report.reference import reference
from moe_lab.report.results import StudyResults, aggregate
from moe_lab.report.stats import Estimate, Grid
from moe_lab.report.verdict import StudyReport, Verdict, percent, status_notes, verdict_of

FIGURES = []  # moe_lab.report.plots draws each that the results support


def build(study: StudyResults) -> StudyReport:
    """The study's table and the verdict on its claim."""
    ref = reference(study.name)
    keys = ["moe.aux_loss_coef", "moe.train_capacity_factor"]
    agg = aggregate(study.runs, keys, [ACC, "moe_dropped_frac"])
    val = metric_estimates(study, keys)
    label = ["on" if a > 0 else "off" for a in agg["moe.aux_loss_coef"]]
    table = pd.DataFrame({
        "aux loss": label,
        "train CF (eval 2.0)": agg["moe.train_capacity_factor"].map(lambda v: f"{v:g}"),
        "dropped in training": [percent(v) for v in agg["moe_dropped_frac"]],
        f"val {task_metric(study)}": cells(val, list(zip(agg[keys[0]], agg[keys[1]], strict=True))),
        "paper (dropped, score)": [
            ", ".join(str(v) for v in ref.numbers.get(f"{lab} {cf:g}", {}).values()) or "-"
            for lab, cf in zip(label, agg["moe.train_capacity_factor"], strict=True)
        ],
    })  # fmt: skip
    # each part holds the train CF fixed: on - off is judged within each CF (blocks: CF x seed), so a seed whose
    # CF effect is large adds nothing to the aux loss's error
    grid = Grid.of({k: v for k, v in val.items() if v.n}, base=lambda key: key[1], base_name="train CFs")
    parts = []
    for cf, group in agg.groupby("moe.train_capacity_factor"):
        on = [(a, cf) for a in group["moe.aux_loss_coef"] if a > 0]
        off = [(a, cf) for a in group["moe.aux_loss_coef"] if a == 0]
        if not on or not off or not (val.get(on[0], Estimate()).n and val.get(off[0], Estimate()).n):
            continue
        drops = group.set_index("moe.aux_loss_coef")["moe_dropped_frac"]
        name = f"CF {cf:g}: on - off (dropped {percent(drops[on[0][0]])} vs {percent(drops[off[0][0]])})"
        parts.append(metric_part(study, name, "> 0: the aux loss helps", grid.difference(on[0], off[0]), "direction"))
    if not parts:
        return StudyReport("aux-loss-finetune", ref, table, Verdict("no data", "-", "needs aux on and off"))
    checked = f"keeping the aux loss beats turning it off at every train CF; {judged_on(study)}"
    return StudyReport("aux-loss-finetune", ref, table, verdict_of(parts, checked), status_notes(agg), agg)
