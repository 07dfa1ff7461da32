"""Report builders of the fine-tuning studies: freeze, token dropping, aux loss, overfitting, batch x lr."""

from __future__ import annotations

import math

import pandas as pd

from moe_lab.report.reference import REFERENCES
from moe_lab.report.results import StudyResults, aggregate, binomial_std, mean_std, validation_examples
from moe_lab.report.verdict import StudyReport, Verdict, fmt_number, percent, status_notes

ACC = "final_val_accuracy"


def _accuracy_noise(study: StudyResults, agg: pd.DataFrame) -> float:
    """What one run's validation accuracy cannot resolve: the seeds' std if there are seeds, else binomial."""
    stds = agg.get(f"{ACC}_std", pd.Series(dtype=float)).dropna()
    if len(stds):
        return float(stds.max())
    return binomial_std(float(agg[ACC].mean()), validation_examples(study))


def freeze(study: StudyResults) -> StudyReport:
    ref = REFERENCES["freeze"]
    agg = aggregate(study.runs, ["finetune.freeze"], [ACC, "best_val_accuracy", "trainable_parameters"])
    table = pd.DataFrame({
        "update": agg["finetune.freeze"],
        "val accuracy (final)": [mean_std(r, ACC) for _, r in agg.iterrows()],
        "val accuracy (best)": [mean_std(r, "best_val_accuracy") for _, r in agg.iterrows()],
        "trainable parameters": [fmt_number(v, 0) for v in agg["trainable_parameters"]],
    })  # fmt: skip
    acc = agg.set_index("finetune.freeze")[ACC].dropna()
    if "moe" not in acc.index or len(acc) < 2:
        return StudyReport("freeze", ref, table, Verdict("no data", "-", "needs the moe preset and another"))
    noise = _accuracy_noise(study, agg)
    others = acc.drop("moe")
    gap = others.min() - acc["moe"]
    ours = ", ".join(f"{k} {v:.3f}" for k, v in acc.sort_values(ascending=False).items())
    if gap > 2 * noise:
        reproduced = "yes"
    elif gap > 0:
        reproduced = "inconclusive"
    else:
        reproduced = "no" if -gap > 2 * noise else "inconclusive"
    checked = f"MoE-only is the worst by more than 2 standard errors ({2 * noise:.3f} accuracy)"
    verdict = Verdict(reproduced, f"val accuracy {ours}", checked)
    return StudyReport("freeze", ref, table, verdict, status_notes(agg), agg)


def token_drop(study: StudyResults) -> StudyReport:
    ref = REFERENCES["token-drop"]
    agg = aggregate(study.runs, ["moe.train_capacity_factor"], [ACC, "moe_dropped_frac", "eval_moe_dropped_frac"])
    table = pd.DataFrame({
        "train CF (eval 2.0)": agg["moe.train_capacity_factor"].map(lambda v: f"{v:g}"),
        "dropped in training": [percent(v) for v in agg["moe_dropped_frac"]],
        "val accuracy": [mean_std(r, ACC) for _, r in agg.iterrows()],
        "paper (dropped, score)": [
            ", ".join(str(v) for v in ref.numbers.get(f"{cf:g}", {}).values()) or "-"
            for cf in agg["moe.train_capacity_factor"]
        ],
    })  # fmt: skip
    data = agg.dropna(subset=[ACC])
    if len(data) < 2:
        return StudyReport("token-drop", ref, table, Verdict("no data", "-", "needs two or more capacity factors"))
    noise = _accuracy_noise(study, agg)
    reference = data.loc[data["moe_dropped_frac"].idxmin()]
    dropping = data[(data["moe_dropped_frac"] >= 0.05) & (data["moe_dropped_frac"] <= 0.2)]
    if dropping.empty:
        return StudyReport(
            "token-drop", ref, table, Verdict("inconclusive", "no capacity factor dropped 5-20%", "-"), [], agg
        )
    worst = dropping.loc[dropping[ACC].idxmin()]
    cost = reference[ACC] - worst[ACC]
    ours = (
        f"dropping {percent(worst['moe_dropped_frac'])} (CF {worst['moe.train_capacity_factor']:g}) gives "
        f"{worst[ACC]:.3f} vs {reference[ACC]:.3f} with {percent(reference['moe_dropped_frac'])} dropped"
    )
    reproduced = "yes" if cost <= 2 * noise else "no"
    checked = (
        f"fine-tuning with 5-20% of tokens dropped is within 2 standard errors ({2 * noise:.3f}) of the fewest drops"
    )
    return StudyReport("token-drop", ref, table, Verdict(reproduced, ours, checked), status_notes(agg), agg)


def aux_loss_finetune(study: StudyResults) -> StudyReport:
    ref = REFERENCES["aux-loss-finetune"]
    keys = ["moe.aux_loss_coef", "moe.train_capacity_factor"]
    agg = aggregate(study.runs, keys, [ACC, "moe_dropped_frac"])
    label = ["on" if a > 0 else "off" for a in agg["moe.aux_loss_coef"]]
    table = pd.DataFrame({
        "aux loss": label,
        "train CF (eval 2.0)": agg["moe.train_capacity_factor"].map(lambda v: f"{v:g}"),
        "dropped in training": [percent(v) for v in agg["moe_dropped_frac"]],
        "val accuracy": [mean_std(r, ACC) for _, r in agg.iterrows()],
        "paper (dropped, score)": [
            ", ".join(str(v) for v in ref.numbers.get(f"{lab} {cf:g}", {}).values()) or "-"
            for lab, cf in zip(label, agg["moe.train_capacity_factor"], strict=True)
        ],
    })  # fmt: skip
    noise = _accuracy_noise(study, agg) if len(agg) else math.nan
    wins, fewer, pairs, parts = 0, 0, 0, []
    for cf, group in agg.groupby("moe.train_capacity_factor"):
        on, off = group[group["moe.aux_loss_coef"] > 0], group[group["moe.aux_loss_coef"] == 0]
        if on.empty or off.empty:
            continue
        pairs += 1
        a_on, a_off = on[ACC].iloc[0], off[ACC].iloc[0]
        wins += a_on > a_off + 2 * noise
        fewer += on["moe_dropped_frac"].iloc[0] <= off["moe_dropped_frac"].iloc[0]
        parts.append(f"CF {cf:g}: on {a_on:.3f} vs off {a_off:.3f}")
    if pairs == 0:
        return StudyReport("aux-loss-finetune", ref, table, Verdict("no data", "-", "needs aux on and off"))
    if wins == pairs and fewer == pairs:
        reproduced = "yes"
    elif fewer == pairs:
        reproduced = "inconclusive"
    else:
        reproduced = "no"
    ours = "; ".join(parts) + f"; aux on drops fewer tokens at {fewer} of {pairs} CFs"
    checked = f"aux on drops fewer tokens and wins by more than 2 standard errors ({2 * noise:.3f}) at every CF"
    return StudyReport("aux-loss-finetune", ref, table, Verdict(reproduced, ours, checked), status_notes(agg), agg)


def _model_label(value: str) -> str:
    return "dense" if str(value).startswith("dense") else "sparse"


def overfit(study: StudyResults) -> StudyReport:
    ref = REFERENCES["overfit"]
    agg = aggregate(study.runs, ["finetune.pretrained", "task"], [ACC, "final_train_accuracy", "best_val_accuracy"])
    agg["model"] = agg["finetune.pretrained"].map(_model_label)
    table = pd.DataFrame({
        "task": agg["task"],
        "model": agg["model"],
        "train accuracy": [mean_std(r, "final_train_accuracy") for _, r in agg.iterrows()],
        "val accuracy (final)": [mean_std(r, ACC) for _, r in agg.iterrows()],
        "val accuracy (best)": [mean_std(r, "best_val_accuracy") for _, r in agg.iterrows()],
    })  # fmt: skip
    by = agg.set_index(["task", "model"])
    tasks = sorted(set(agg["task"]))
    small = next((t for t in tasks if "small" in t or t == "cb"), None)
    large = next((t for t in tasks if "large" in t or t == "sst2"), None)
    if small is None or large is None or len(by) < 4:
        return StudyReport("overfit", ref, table, Verdict("no data", "-", "needs sparse and dense on two tasks"))
    cells = [(small, "sparse"), (small, "dense"), (large, "sparse"), (large, "dense")]
    if any(c not in by.index or math.isnan(by.loc[c, ACC]) for c in cells):
        verdict = Verdict("no data", "-", "needs completed sparse and dense runs on both tasks")
        return StudyReport("overfit", ref, table, verdict, status_notes(agg), agg)
    noise = _accuracy_noise(study, agg)
    s_small, d_small = by.loc[(small, "sparse")], by.loc[(small, "dense")]
    s_large, d_large = by.loc[(large, "sparse")], by.loc[(large, "dense")]
    overfits = s_small["final_train_accuracy"] >= d_small["final_train_accuracy"] and s_small[ACC] < d_small[ACC]
    wins_large = s_large[ACC] > d_large[ACC]
    ours = (
        f"{small}: sparse train/val {s_small['final_train_accuracy']:.3f}/{s_small[ACC]:.3f} vs dense "
        f"{d_small['final_train_accuracy']:.3f}/{d_small[ACC]:.3f}; {large}: sparse val {s_large[ACC]:.3f} vs "
        f"dense {d_large[ACC]:.3f}"
    )
    within = abs(s_small[ACC] - d_small[ACC]) <= 2 * noise and abs(s_large[ACC] - d_large[ACC]) <= 2 * noise
    if overfits and wins_large:
        reproduced = "inconclusive" if within else "yes"
    elif overfits or wins_large:
        reproduced = "inconclusive" if within else "partly"
    else:
        reproduced = "inconclusive" if within else "no"
    checked = (
        f"small task: sparse train accuracy >= dense and validation below dense; large task: sparse validation "
        f"above dense; differences within 2 standard errors ({2 * noise:.3f}) are inconclusive"
    )
    return StudyReport("overfit", ref, table, Verdict(reproduced, ours, checked), status_notes(agg), agg)


def finetune_grid(study: StudyResults) -> StudyReport:
    ref = REFERENCES["finetune-grid"]
    keys = ["finetune.pretrained", "task", "optim.lr", "train.batch_size"]
    agg = aggregate(study.runs, keys, [ACC])
    agg["model"] = agg["finetune.pretrained"].map(_model_label)
    batches = sorted(agg["train.batch_size"].unique(), reverse=True)
    rows = []
    for (task, model, lr), group in agg.groupby(["task", "model", "optim.lr"], sort=True):
        row = {"task": task, "model": model, "lr": f"{lr:g}"}
        for bs in batches:
            cell = group[group["train.batch_size"] == bs]
            row[f"batch {bs}"] = mean_std(cell.iloc[0], ACC) if len(cell) else "-"
        rows.append(row)
    table = pd.DataFrame(rows)
    if agg.empty or agg[ACC].isna().all():
        return StudyReport("finetune-grid", ref, table, Verdict("no data", "-", "needs completed runs"))
    noise = _accuracy_noise(study, agg)
    parts, agree, resolvable = [], 0, 0
    for task, group in agg.groupby("task"):
        best = {}
        for model, sub in group.groupby("model"):
            sub = sub.dropna(subset=[ACC]).sort_values(ACC, ascending=False)
            if len(sub) >= 2:
                best[model] = sub.iloc[0]
                # is the best setting resolvable from the runner-up?
                resolvable += sub.iloc[0][ACC] - sub.iloc[1][ACC] > 2 * noise
        if {"sparse", "dense"} <= set(best):
            s, d = best["sparse"], best["dense"]
            smaller_batch = s["train.batch_size"] <= d["train.batch_size"]
            higher_lr = s["optim.lr"] >= d["optim.lr"]
            agree += smaller_batch and higher_lr
            parts.append(
                f"{task}: best sparse bs {s['train.batch_size']} lr {s['optim.lr']:g}, "
                f"best dense bs {d['train.batch_size']} lr {d['optim.lr']:g}"
            )
    n_tasks = len(parts)
    if n_tasks == 0:
        reproduced = "no data"
    elif resolvable == 0:
        reproduced = "inconclusive"
    else:
        reproduced = "yes" if agree == n_tasks else ("partly" if agree else "no")
    checked = (
        "per task, the sparse model's best setting has a batch no larger and a learning rate no lower than the "
        f"dense model's; inconclusive when no best setting beats its runner-up by 2 standard errors ({2 * noise:.3f})"
    )
    verdict = Verdict(reproduced, "; ".join(parts), checked)
    return StudyReport("finetune-grid", ref, table, verdict, status_notes(agg), agg)
