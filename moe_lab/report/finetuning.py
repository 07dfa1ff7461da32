"""Report builders of the fine-tuning studies: freeze, token dropping, aux loss, overfitting, batch x lr.

Each study is judged on its task's own metric (`task.metric`: accuracy, or macro-F1 for CB), over its seeds: each
setting's fine-tunings are compared paired by seed, and by validation example where the runs recorded them, against
the noise pooled over the study's grid of settings x seeds.
"""

from __future__ import annotations

from dataclasses import replace

import pandas as pd

from moe_lab.report.reference import REFERENCES
from moe_lab.report.results import StudyResults, aggregate
from moe_lab.report.spec import margins
from moe_lab.report.stats import Estimate, Grid, by_value, estimates
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

ACC = "final_val_accuracy"
METRIC_COLUMNS = {"accuracy": "final_val_accuracy", "f1_macro": "final_val_f1"}


def _rule(study: StudyResults) -> str:
    n = validation_examples(study)
    return f"judged on validation {task_metric(study)}" + (f" ({n} examples)" if n else "")


def task_metric(study: StudyResults) -> str:
    """The metric the study's task is judged on, from its runs' summary.json (accuracy if unknown)."""
    for run in study.runs["run"]:
        summary = study.summary(run) or {}
        if summary.get("metric") in METRIC_COLUMNS:
            return summary["metric"]
    return "accuracy"


def validation_examples(study: StudyResults) -> int | None:
    """The task's validation size: recorded in summary.json, else the synthetic task's configured size."""
    for run in study.runs["run"]:
        summary = study.summary(run) or {}
        if summary.get("val_examples"):
            return int(summary["val_examples"])
        task = summary.get("config", {}).get("task", {})
        if task.get("source") in ("synthetic", "facts"):
            return int(task.get("synthetic_val", 1000))
    return None


def _metric_estimates(study: StudyResults, by: list[str], metric: str | None = None) -> dict:
    """Estimates of the task's metric (or `metric`) per group, with the runs' per-example values, keyed by the
    value when `by` is one column."""
    column = metric or METRIC_COLUMNS[task_metric(study)]
    return by_value(estimates(study.runs, by, column, study.examples))


def _part(study: StudyResults, name: str, claim: str, d, rule: str, expected: str = ">", part: str = "accuracy"):
    """A part judged on the task's metric, shown in points, with the study's margin `part`."""
    unit = "points" if task_metric(study) == "accuracy" else f"points of {task_metric(study)}"
    return Part(name, claim, d, rule, margins(study.name)[part], expected, unit=unit, scale=100)


def _cells(est: dict, keys) -> list[str]:
    return [est[k].text() if k in est else "-" for k in keys]


def freeze(study: StudyResults) -> StudyReport:
    ref = REFERENCES["freeze"]
    key = "finetune.freeze"
    agg = aggregate(study.runs, [key], [ACC, "best_val_accuracy", "trainable_parameters"])
    val = _metric_estimates(study, [key])
    table = pd.DataFrame({
        "update": agg[key],
        f"val {task_metric(study)} (final)": _cells(val, agg[key]),
        "val accuracy (best)": _cells(_metric_estimates(study, [key], "best_val_accuracy"), agg[key]),
        "trainable parameters": [fmt_number(v, 0) for v in agg["trainable_parameters"]],
    })  # fmt: skip
    done = {k: v for k, v in val.items() if v.n}
    if "moe" not in done or len(done) < 2:
        return StudyReport("freeze", ref, table, Verdict("no data", "-", "needs the moe preset and another"))
    grid = Grid.of(done)
    parts = [
        replace(_part(study, f"{k} - moe", "> 0: MoE-only is worse", grid.difference(k, "moe"), "direction"),
                necessary=True)
        for k in sorted(done, key=lambda k: done[k].mean) if k != "moe"
    ]  # fmt: skip
    ranking = ", ".join(f"{k} {v.text()}" for k, v in sorted(done.items(), key=lambda kv: -kv[1].mean))
    checked = (
        f"updating only the MoE layers is worse than every other choice (each a necessary part: MoE-only ahead of "
        f"any one is no); {_rule(study)}"
    )
    return StudyReport("freeze", ref, table, verdict_of(parts, checked, f"val {ranking}"), status_notes(agg), agg)


def token_drop(study: StudyResults) -> StudyReport:
    ref = REFERENCES["token-drop"]
    key = "moe.train_capacity_factor"
    agg = aggregate(study.runs, [key], [ACC, "moe_dropped_frac", "eval_moe_dropped_frac"])
    val = _metric_estimates(study, [key])
    table = pd.DataFrame({
        "train CF (eval 2.0)": agg[key].map(lambda v: f"{v:g}"),
        "dropped in training": [percent(v) for v in agg["moe_dropped_frac"]],
        f"val {task_metric(study)}": _cells(val, agg[key]),
        "paper (dropped, score)": [
            ", ".join(str(v) for v in ref.numbers.get(f"{cf:g}", {}).values()) or "-" for cf in agg[key]
        ],
    })  # fmt: skip
    data = agg[agg[key].map(lambda cf: cf in val and val[cf].n > 0)]
    if len(data) < 2:
        return StudyReport("token-drop", ref, table, Verdict("no data", "-", "needs two or more capacity factors"))
    reference = data.loc[data["moe_dropped_frac"].idxmin()]
    dropping = data[(data["moe_dropped_frac"] >= 0.05) & (data["moe_dropped_frac"] <= 0.2)]
    margin = margins("token-drop")["accuracy"]
    checked = (
        f"the cost of fine-tuning with 5-20% of tokens dropped (the fewest drops minus each such CF) is at most "
        f"{100 * margin:g} points of {task_metric(study)}; {_rule(study)}"
    )
    if dropping.empty:
        drops = ", ".join(f"CF {r[key]:g} {percent(r['moe_dropped_frac'])}" for _, r in data.iterrows())
        verdict = Verdict("inconclusive", f"no capacity factor dropped 5-20% ({drops})", checked)
        return StudyReport("token-drop", ref, table, verdict, status_notes(agg), agg)
    grid = Grid.of({cf: val[cf] for cf in data[key]})
    ref_cf = reference[key]
    parts = [
        _part(study, f"CF {row[key]:g} ({percent(row['moe_dropped_frac'])} dropped): cost against CF {ref_cf:g}",
              f"at most {100 * margin:g} points", grid.difference(ref_cf, row[key]), "at most")
        for _, row in dropping.iterrows()
    ]  # fmt: skip
    extra = f"CF {ref_cf:g} ({percent(reference['moe_dropped_frac'])} dropped) {val[ref_cf].text()}"
    notes = [capacity_note(study), *status_notes(agg)]
    return StudyReport("token-drop", ref, table, verdict_of(parts, checked, extra), notes, agg)


def aux_loss_finetune(study: StudyResults) -> StudyReport:
    ref = REFERENCES["aux-loss-finetune"]
    keys = ["moe.aux_loss_coef", "moe.train_capacity_factor"]
    agg = aggregate(study.runs, keys, [ACC, "moe_dropped_frac"])
    val = _metric_estimates(study, keys)
    label = ["on" if a > 0 else "off" for a in agg["moe.aux_loss_coef"]]
    table = pd.DataFrame({
        "aux loss": label,
        "train CF (eval 2.0)": agg["moe.train_capacity_factor"].map(lambda v: f"{v:g}"),
        "dropped in training": [percent(v) for v in agg["moe_dropped_frac"]],
        f"val {task_metric(study)}": _cells(val, list(zip(agg[keys[0]], agg[keys[1]], strict=True))),
        "paper (dropped, score)": [
            ", ".join(str(v) for v in ref.numbers.get(f"{lab} {cf:g}", {}).values()) or "-"
            for lab, cf in zip(label, agg["moe.train_capacity_factor"], strict=True)
        ],
    })  # fmt: skip
    grid = Grid.of({k: v for k, v in val.items() if v.n})
    parts = []
    for cf, group in agg.groupby("moe.train_capacity_factor"):
        on = [(a, cf) for a in group["moe.aux_loss_coef"] if a > 0]
        off = [(a, cf) for a in group["moe.aux_loss_coef"] if a == 0]
        if not on or not off or not (val.get(on[0], Estimate()).n and val.get(off[0], Estimate()).n):
            continue
        drops = group.set_index("moe.aux_loss_coef")["moe_dropped_frac"]
        name = f"CF {cf:g}: on - off (dropped {percent(drops[on[0][0]])} vs {percent(drops[off[0][0]])})"
        parts.append(_part(study, name, "> 0: the aux loss helps", grid.difference(on[0], off[0]), "direction"))
    if not parts:
        return StudyReport("aux-loss-finetune", ref, table, Verdict("no data", "-", "needs aux on and off"))
    checked = f"keeping the aux loss beats turning it off at every train CF; {_rule(study)}"
    return StudyReport("aux-loss-finetune", ref, table, verdict_of(parts, checked), status_notes(agg), agg)


def _model_label(value: str) -> str:
    return "dense" if str(value).startswith("dense") else "sparse"


def _with_model(study: StudyResults) -> StudyResults:
    runs = study.runs.copy()
    runs["model"] = runs["finetune.pretrained"].map(_model_label)
    return StudyResults(study.name, study.root, runs)


def overfit(study: StudyResults) -> StudyReport:
    ref = REFERENCES["overfit"]
    agg = aggregate(study.runs, ["finetune.pretrained", "task"], [ACC, "final_train_accuracy", "best_val_accuracy"])
    agg["model"] = agg["finetune.pretrained"].map(_model_label)
    study = _with_model(study)
    keys = ["task", "model"]
    val = _metric_estimates(study, keys)
    train = _metric_estimates(study, keys, "final_train_accuracy")
    cells = list(zip(agg["task"], agg["model"], strict=True))
    table = pd.DataFrame({
        "task": agg["task"],
        "model": agg["model"],
        "train accuracy": _cells(train, cells),
        f"val {task_metric(study)} (final)": _cells(val, cells),
        "val accuracy (best)": _cells(_metric_estimates(study, keys, "best_val_accuracy"), cells),
    })  # fmt: skip
    tasks = sorted(set(agg["task"]))
    small = next((t for t in tasks if "small" in t or t == "cb"), None)
    large = next((t for t in tasks if "large" in t or t == "sst2"), None)
    needed = [(small, "sparse"), (small, "dense"), (large, "sparse"), (large, "dense")]
    if small is None or large is None or any(not val.get(c, Estimate()).n for c in needed):
        verdict = Verdict("no data", "-", "needs completed sparse and dense runs on a small and a large task")
        return StudyReport("overfit", ref, table, verdict, status_notes(agg), agg)
    grid = Grid.of({c: val[c] for c in needed})
    gap = Grid.of({"train": train[(small, "sparse")], "val": val[(small, "sparse")]}).difference("train", "val")
    parts = [
        _part(study, f"{small}: sparse - dense val", "< 0: sparse overfits the small task",
              grid.difference((small, "sparse"), (small, "dense")), "direction", "<"),
        _part(study, f"{large}: sparse - dense val", "> 0: sparse wins the large task",
              grid.difference((large, "sparse"), (large, "dense")), "direction", ">"),
    ]  # fmt: skip
    extra = f"{small}: sparse train {train[(small, 'sparse')].text()}, val {val[(small, 'sparse')].text()}"
    checked = (
        f"(1) on the small task the sparse model validates below the dense one; (2) on the large task above it; "
        f"{_rule(study)}; the sparse train-validation gap on the small task is {gap.text(scale=100)} points"
    )
    return StudyReport("overfit", ref, table, verdict_of(parts, checked, extra), status_notes(agg), agg)


def finetune_grid(study: StudyResults) -> StudyReport:
    ref = REFERENCES["finetune-grid"]
    keys = ["finetune.pretrained", "task", "optim.lr", "train.batch_size"]
    agg = aggregate(study.runs, keys, [ACC])
    agg["model"] = agg["finetune.pretrained"].map(_model_label)
    study = _with_model(study)
    val = _metric_estimates(study, ["task", "model", "optim.lr", "train.batch_size"])
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
        grid = Grid.of({k: v for k, v in val.items() if k[0] == task and v.n})

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
            parts.append(_part(study, f"{task}, {what}: sparse gain - dense gain", f"> 0: sparse gains more from {why}",
                               grid.contrast(terms), "direction", part=factor))  # fmt: skip
    if not parts:
        return StudyReport("finetune-grid", ref, table, Verdict("no data", "-", "needs a 2x2 grid per model"))
    checked = (
        "per task, the sparse model gains more than the dense one from the smaller batch and from the higher "
        f"learning rate (interaction contrasts, each averaged over the other factor); {_rule(study)}"
    )
    return StudyReport("finetune-grid", ref, table, verdict_of(parts, checked), status_notes(agg), agg)
