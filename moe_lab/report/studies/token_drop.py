"""token-drop: fine-tuning while dropping tokens costs about nothing (ST-MoE Table 5)."""

from __future__ import annotations

import pandas as pd

from moe_lab.report.finetuning import ACC, cells, judged_on, metric_estimates, metric_part, task_metric
from moe_lab.report.reference import reference
from moe_lab.report.results import StudyResults, aggregate
from moe_lab.report.spec import margins, study_spec
from moe_lab.report.stats import Grid
from moe_lab.report.verdict import StudyReport, Verdict, capacity_note, percent, status_notes, verdict_of

FIGURES = []  # moe_lab.report.plots draws each that the results support


def build(study: StudyResults) -> StudyReport:
    """The study's table and the verdict on its claim."""
    ref = reference(study.name)
    key = "moe.train_capacity_factor"
    agg = aggregate(study.runs, [key], [ACC, "moe_dropped_frac", "eval_moe_dropped_frac"])
    val = metric_estimates(study, [key])
    table = pd.DataFrame({
        "train CF (eval 2.0)": agg[key].map(lambda v: f"{v:g}"),
        "dropped in training": [percent(v) for v in agg["moe_dropped_frac"]],
        f"val {task_metric(study)}": cells(val, agg[key]),
        "paper (dropped, score)": [
            ", ".join(str(v) for v in ref.numbers.get(f"{cf:g}", {}).values()) or "-" for cf in agg[key]
        ],
    })  # fmt: skip
    data = agg[agg[key].map(lambda cf: cf in val and val[cf].n > 0)]
    if len(data) < 2:
        return StudyReport("token-drop", ref, table, Verdict("no data", "-", "needs two or more capacity factors"))
    fewest = data.loc[data["moe_dropped_frac"].idxmin()]
    low, high = study_spec(study.name).window("dropped")
    window = f"{100 * low:g}-{100 * high:g}%"
    dropping = data[(data["moe_dropped_frac"] >= low) & (data["moe_dropped_frac"] <= high)]
    margin = margins(study.name)["accuracy"]
    checked = (
        f"the cost of fine-tuning with {window} of tokens dropped (the fewest drops minus each such CF) is at most "
        f"{100 * margin:g} points of {task_metric(study)}; {judged_on(study)}"
    )
    if dropping.empty:
        drops = ", ".join(f"CF {r[key]:g} {percent(r['moe_dropped_frac'])}" for _, r in data.iterrows())
        verdict = Verdict("inconclusive", f"no capacity factor dropped {window} ({drops})", checked)
        return StudyReport("token-drop", ref, table, verdict, status_notes(agg), agg)
    grid = Grid.of({cf: val[cf] for cf in data[key]})
    ref_cf = fewest[key]
    parts = [
        metric_part(study, f"CF {row[key]:g} ({percent(row['moe_dropped_frac'])} dropped): cost against CF {ref_cf:g}",
                    f"at most {100 * margin:g} points", grid.difference(ref_cf, row[key]), "at most")
        for _, row in dropping.iterrows()
    ]  # fmt: skip
    extra = f"CF {ref_cf:g} ({percent(fewest['moe_dropped_frac'])} dropped) {val[ref_cf].text()}"
    notes = [capacity_note(study), *status_notes(agg)]
    return StudyReport("token-drop", ref, table, verdict_of(parts, checked, extra), notes, agg)
