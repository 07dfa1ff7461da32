"""top-k: top-(n+1) against top-n routing at the same capacity factor (ST-MoE Table 8, Switch Table 1)."""

from __future__ import annotations

import itertools

import pandas as pd

from moe_lab.report.plots import loss_curves
from moe_lab.report.pretraining import NATS, loss_estimates
from moe_lab.report.reference import reference
from moe_lab.report.results import StudyResults, aggregate
from moe_lab.report.spec import margins
from moe_lab.report.stats import Grid
from moe_lab.report.verdict import Part, StudyReport, Verdict, fmt_number, paper_value, status_notes, verdict_of

FIGURES = [loss_curves]  # moe_lab.report.plots draws each that the results support


def build(study: StudyResults) -> StudyReport:
    """The study's table and the verdict on its claim."""
    ref = reference(study.name)
    agg = aggregate(study.runs, ["moe.top_k"], ["final_val_loss", "tokens_per_s", "eval_moe_dropped_frac"])
    est = loss_estimates(study, ["moe.top_k"])
    table = pd.DataFrame({
        "top-k": agg["moe.top_k"].astype(int).astype(str),
        "val loss (ours)": [est[k].text() if k in est else "-" for k in agg["moe.top_k"]],
        "train tokens/s": [fmt_number(v, 0) for v in agg["tokens_per_s"]],
        "paper quality": [paper_value(ref, str(int(k)), "quality") for k in agg["moe.top_k"]],
    })  # fmt: skip
    ks = [k for k in sorted(est) if est[k].n]  # a k whose runs all diverged is marked, not compared
    if len(ks) < 2:
        verdict = Verdict("no data", "-", "needs completed runs at two or more k")
        return StudyReport("top-k", ref, table, verdict, status_notes(agg), agg)
    margin = margins(study.name)["loss"]
    grid = Grid.of({k: est[k] for k in ks})
    parts = [
        Part(f"top-{int(lo)} - top-{int(hi)}", f"> 0: top-{int(hi)} lowers the loss", grid.difference(lo, hi),
             "direction", margin, ">", unit=NATS)
        for lo, hi in itertools.pairwise(ks)
    ]  # fmt: skip
    extra = ", ".join(f"top-{int(k)} {est[k].text()}" for k in ks)
    verdict = verdict_of(parts, "each step up in k lowers the validation loss", extra)
    return StudyReport("top-k", ref, table, verdict, status_notes(agg), agg)
