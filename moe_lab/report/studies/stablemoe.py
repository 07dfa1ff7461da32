"""stablemoe: StableMoE's stage-1 length, and its two stages against stage 1 alone (StableMoE)."""

from __future__ import annotations

import pandas as pd

from moe_lab.report.plots import fluctuation_curves
from moe_lab.report.pretraining import NATS, loss_estimates
from moe_lab.report.reference import reference
from moe_lab.report.results import StudyResults, aggregate
from moe_lab.report.spec import margins
from moe_lab.report.stats import Grid, trend
from moe_lab.report.verdict import Part, StudyReport, Verdict, paper_value, status_notes, verdict_of

FIGURES = [fluctuation_curves]  # moe_lab.report.plots draws each that the results support


def build(study: StudyResults) -> StudyReport:
    """The study's table and the verdict on its claim."""
    ref = reference(study.name)
    key = "moe.stage1_fraction"
    agg = aggregate(study.runs, [key], ["final_val_ppl", "final_val_loss"])
    loss = loss_estimates(study, [key])
    ppl = loss_estimates(study, [key], "final_val_ppl")
    table = pd.DataFrame({
        "stage-1 length": agg[key].map(lambda v: "stage 1 only" if v >= 1 else f"{v:.0%}"),
        "val ppl (ours)": [ppl[f].text() if f in ppl else "-" for f in agg[key]],
        "paper valid ppl": [paper_value(ref, f"{v:g}", "valid ppl") for v in agg[key]],
    })  # fmt: skip
    done = sorted(f for f in loss if loss[f].n)
    two_stage = [f for f in done if f < 1.0]
    if len(done) < 2 or not two_stage:
        verdict = Verdict("no data", "-", "needs two or more stage-1 lengths")
        return StudyReport("stablemoe", ref, table, verdict, status_notes(agg), agg)
    margin = margins(study.name)
    grid = Grid.of({f: loss[f] for f in done})
    parts = []
    shortest, rest = two_stage[0], two_stage[1:]
    if len(two_stage) >= 3:  # the trend of the loss over the stage-1 lengths, paired by seed
        name = f"val loss per unit of stage-1 length ({', '.join(f'{f:g}' for f in two_stage)})"
        parts.append(Part(name, "> 0: a shorter stage 1 is better", trend({f: loss[f] for f in two_stage}),
                          "direction", margin["stage1_trend"], ">", unit="nats per unit"))  # fmt: skip
    elif rest:
        runner = min(rest, key=lambda f: loss[f].mean)
        name = f"stage 1 {shortest:g} - {runner:g} (the best longer one)"
        parts.append(Part(name, "< 0: the shortest stage 1 is best", grid.difference(shortest, runner), "direction",
                          margin["stage1_length"], "<", unit=NATS))  # fmt: skip
    if 1.0 in loss and loss[1.0].n:
        best = min(two_stage, key=lambda f: loss[f].mean)
        parts.append(Part(f"two stages ({best:g}) - stage 1 only", "< 0: stage 2 helps", grid.difference(best, 1.0),
                          "direction", margin["two_stage"], "<", unit=NATS))  # fmt: skip
    extra = "val ppl " + ", ".join(f"{f:g}: {ppl[f].text()}" for f in done)
    checked = (
        "(1) a shorter stage 1 is better: the validation loss rises with the stage-1 length (its least-squares "
        "slope over the two-stage lengths, fitted per seed; with two lengths, the shorter against the longer); "
        "(2) two stages beat stage 1 only"
    )
    verdict = verdict_of(parts, checked, extra)
    return StudyReport("stablemoe", ref, table, verdict, status_notes(agg), agg)
