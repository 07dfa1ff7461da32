"""finetune-grid: batch size x learning rate in fine-tuning, sparse against dense (ST-MoE Table 20)."""

from __future__ import annotations

import pandas as pd

from moe_lab.report.finetuning import ACC, judged_on, metric_estimates, metric_part, model_label, with_model
from moe_lab.report.plots import finetune_heatmaps
from moe_lab.report.reference import reference
from moe_lab.report.results import StudyResults, aggregate
from moe_lab.report.stats import Grid
from moe_lab.report.verdict import StudyReport, Verdict, status_notes, verdict_of

FIGURES = [finetune_heatmaps]  # moe_lab.report.plots draws each that the results support


def build(study: StudyResults) -> StudyReport:
    """The study's table and the verdict on its claim."""
    ref = reference(study.name)
    keys = ["finetune.pretrained", "task", "optim.lr", "train.batch_size"]
    agg = aggregate(study.runs, keys, [ACC])
    agg["model"] = agg["finetune.pretrained"].map(model_label)
    study = with_model(study)
    val = metric_estimates(study, ["task", "model", "optim.lr", "train.batch_size"])
    batches = sorted(agg["train.batch_size"].unique(), reverse=True)
    rows = []
    for (task, model, lr), _ in agg.groupby(["task", "model", "optim.lr"], sort=True):
        row = {"task": task, "model": model, "lr": f"{lr:g}"}
        for bs in batches:
            row[f"batch {bs}"] = val[(task, model, lr, bs)].text() if (task, model, lr, bs) in val else "-"
        rows.append(row)
    table = pd.DataFrame(rows)
    if agg.empty or agg[ACC].isna().all():
        return StudyReport("finetune-grid", ref, table, Verdict("no data", "-", "needs completed runs"))
    parts = []
    for task, group in agg.groupby("task"):
        lrs, bss = sorted(group["optim.lr"].unique()), sorted(group["train.batch_size"].unique())
        if len(lrs) < 2 or len(bss) < 2 or set(group["model"]) != {"sparse", "dense"}:
            continue
        lo_lr, hi_lr, small_bs, large_bs = lrs[0], lrs[-1], bss[0], bss[-1]
        # sparse and dense at one seed are two pretrainings: each interaction is a difference of gains within
        # each model, judged against the residual within each model (blocks: model x seed)
        grid = Grid.of({k: v for k, v in val.items() if k[0] == task and v.n}, base=lambda key: key[1])

        # interaction contrasts (averaged over the other factor): how much more the sparse model gains than the
        # dense one from the smaller batch, and from the higher learning rate
        batch_terms, lr_terms = [], []
        for sign, model in ((1.0, "sparse"), (-1.0, "dense")):
            for lr in (lo_lr, hi_lr):
                batch_terms += [(sign / 2, (task, model, lr, small_bs)), (-sign / 2, (task, model, lr, large_bs))]
            for bs in (small_bs, large_bs):
                lr_terms += [(sign / 2, (task, model, hi_lr, bs)), (-sign / 2, (task, model, lo_lr, bs))]
        for factor, what, terms, why in (
            ("batch", f"batch {small_bs} vs {large_bs}", batch_terms, "the smaller batch"),
            ("lr", f"lr {hi_lr:g} vs {lo_lr:g}", lr_terms, "the higher learning rate"),
        ):
            name, claim = f"{task}, {what}: sparse gain - dense gain", f"> 0: sparse gains more from {why}"
            parts.append(metric_part(study, name, claim, grid.contrast(terms), "direction", part=factor))
    if not parts:
        return StudyReport("finetune-grid", ref, table, Verdict("no data", "-", "needs a 2x2 grid per model"))
    checked = (
        "per task, the sparse model gains more than the dense one from the smaller batch and from the higher "
        f"learning rate (interaction contrasts, each averaged over the other factor); {judged_on(study)}"
    )
    return StudyReport("finetune-grid", ref, table, verdict_of(parts, checked), status_notes(agg), agg)
