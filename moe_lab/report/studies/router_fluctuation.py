"""router-fluctuation: how late each router changes its mind, and its perplexity (StableMoE)."""

from __future__ import annotations

import math

import pandas as pd

from moe_lab.report.plots import expert_load, fluctuation_curves, specialisation
from moe_lab.report.pretraining import NATS, loss_estimates
from moe_lab.report.reference import reference
from moe_lab.report.results import StudyResults, aggregate
from moe_lab.report.spec import margins, study_spec
from moe_lab.report.stats import Estimate, Grid, by_value, estimates, mean_of, pooled_means
from moe_lab.report.verdict import Part, StudyReport, Verdict, paper_value, percent, status_notes, verdict_of

FIGURES = [fluctuation_curves, expert_load, specialisation]  # moe_lab.report.plots draws each that the results support


def build(study: StudyResults) -> StudyReport:
    """The study's table and the verdict on its claim."""
    ref = reference(study.name)
    fl = [c for c in ("fluctuation@0.2", "fluctuation@0.5", "fluctuation@0.8") if c in study.runs.columns]
    metrics = ["final_val_loss", "final_val_ppl", *fl, "moe_dropped_frac", "eval_moe_dropped_frac"]
    agg = aggregate(study.runs, ["moe"], metrics)
    loss = loss_estimates(study, ["moe"])
    ppl = loss_estimates(study, ["moe"], "final_val_ppl")
    table = pd.DataFrame({
        "router": agg["moe"],
        "val ppl (ours)": [ppl[m].text() if m in ppl else "-" for m in agg["moe"]],
        "still changing after 20 / 50 / 80%": [" / ".join(percent(r[c]) for c in fl) for _, r in agg.iterrows()],
        "dropped (train / eval)": [
            f"{percent(r['moe_dropped_frac'])} / {percent(r['eval_moe_dropped_frac'])}" for _, r in agg.iterrows()
        ],
        "paper valid ppl": [paper_value(ref, m, "valid ppl") for m in agg["moe"]],
        "paper fluctuation": [paper_value(ref, m, "still changing after 20/50/80%") for m in agg["moe"]],
    })  # fmt: skip
    by = agg.set_index("moe")
    late = "fluctuation@0.8" if "fluctuation@0.8" in fl else (fl[-1] if fl else None)
    if late is None or "stablemoe" not in by.index:
        return StudyReport("router-fluctuation", ref, table, Verdict("no data", "-", "needs fluctuation columns"))
    learned = [m for m in ("switch", "st-moe", "base") if m in by.index and not math.isnan(by.loc[m, late])]
    if not learned or math.isnan(by.loc["stablemoe", late]):
        verdict = Verdict("no data", "-", "needs completed StableMoE and learned-router runs")
        return StudyReport("router-fluctuation", ref, table, verdict, status_notes(agg), agg)
    margin = margins(study.name)
    tolerance = study_spec(study.name).tolerances["eval_drops"]
    still = by_value(estimates(study.runs, ["moe"], late))
    when = late.split("@")[1]
    # (1) each learned router still changes experts late in training (a fraction of the probe tokens above 0, its
    # seeds' variance pooled over the learned routers), StableMoE's stage 2 does not (its fraction within the
    # margin of 0, over its own seeds)
    learned_means = pooled_means({m: still[m] for m in learned})
    unit = "points of probe tokens"
    parts = [
        Part(f"{m} still changing at {when}", "> 0: the router keeps changing its mind", learned_means[m],
             "direction", margin["fluctuation"], ">", necessary=True, unit=unit, scale=100)
        for m in learned
    ]  # fmt: skip
    stage2 = mean_of(still["stablemoe"])
    parts.append(Part(f"stablemoe still changing at {when}", "= 0: stage 2 never changes", stage2, "equivalence",
                      margin["fluctuation"], necessary=True, unit=unit, scale=100))  # fmt: skip
    # (2) perplexity: StableMoE against the best other router, where eval drops cannot decide it
    others = [m for m in by.index if m != "stablemoe" and m in loss and loss[m].n]
    drops = by["eval_moe_dropped_frac"].fillna(0.0)
    compared = [*others, "stablemoe"]
    confounded = drops[compared].max() - drops[compared].min() > tolerance
    if others:
        best_other = min(others, key=lambda m: loss[m].mean)
        d = Grid.of({m: loss[m] for m in compared if loss.get(m, Estimate()).n}).difference("stablemoe", best_other)
        blocked = ""
        if confounded:
            blocked = "confounded by eval drops: " + ", ".join(f"{m} {percent(drops[m])}" for m in compared)
        parts.append(Part(f"val loss stablemoe - {best_other} (the best other)", "< 0: StableMoE has the best loss",
                          d, "direction", margin["loss"], "<", unit=NATS, blocked=blocked))  # fmt: skip
    checked = (
        f"(1, necessary) at {when} of training each learned router (Switch, top-2, BASE) still sends a share of the "
        "probe tokens to another expert than at the end (against 0, the seeds' variance pooled over the learned "
        "routers), and StableMoE's stage 2 none (within the margin of 0 over its seeds); "
        "(2) StableMoE has the lowest validation loss of all routers, against the best other; (2) is inconclusive "
        f"when the routers' eval drop fractions differ by more than {percent(tolerance)}"
    )
    verdict = verdict_of(parts, checked)
    return StudyReport("router-fluctuation", ref, table, verdict, status_notes(agg), agg)
