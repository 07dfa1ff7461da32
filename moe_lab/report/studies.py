"""One builder per study: results -> a table shaped like the paper's, and a verdict computed from the numbers.

A verdict is "yes", "partly", "no", "inconclusive" (the effect is within what the runs can tell apart) or
"no data". Each builder states the check it made in `checked`, so a reader can disagree with it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from moe_lab.report.reference import REFERENCES, Reference
from moe_lab.report.results import (
    StudyResults,
    aggregate,
    binomial_std,
    completed,
    mean_std,
    validation_examples,
)


@dataclass
class Verdict:
    reproduced: str  # yes | partly | no | inconclusive | no data
    ours: str  # what we measured, in a sentence
    checked: str  # the rule that produced `reproduced`


@dataclass
class StudyReport:
    name: str
    reference: Reference
    table: pd.DataFrame  # display table: strings, our columns and the paper's
    verdict: Verdict
    notes: list[str] = field(default_factory=list)
    data: pd.DataFrame | None = None  # the aggregated numbers behind the table, for csv output and plots


def _fmt(value: float, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _pct(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def _paper(ref: Reference, row: str, col: str) -> str:
    value = ref.numbers.get(row, {}).get(col, "")
    return f"{value:g}" if isinstance(value, float) else str(value)


def _cell(value: object) -> str:
    """A key value as text: 4.0 -> '4', 0.75 -> '0.75', NaN -> ''."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:g}"
    return str(value)


def _status_note(agg: pd.DataFrame) -> list[str]:
    """Notes for groups with runs that diverged or failed: they are marked, not averaged."""
    notes = []
    keys = list(agg.columns[: list(agg.columns).index("runs")])
    for record in agg.to_dict("records"):  # records keep each column's type (iterrows would make ints floats)
        if record["diverged"] or record["failed"]:
            label = ", ".join(f"{k}={_cell(record[k])}" for k in keys)
            notes.append(
                f"{label}: {int(record['diverged'])} diverged, {int(record['failed'])} failed of "
                f"{int(record['runs'])} runs (left out of the means)"
            )
    return notes


def _no_data(name: str) -> StudyReport:
    why = f"no results/{name}/runs.csv: run `moe-lab sweep {name}`"
    return StudyReport(name, REFERENCES[name], pd.DataFrame(), Verdict("no data", "-", why))


def _strictly_decreasing(values: list[float]) -> bool:
    return all(b < a for a, b in itertools.pairwise(values))


# --- pretraining studies --------------------------------------------------------------------------------------


def top_k(study: StudyResults) -> StudyReport:
    ref = REFERENCES["top-k"]
    agg = aggregate(study.runs, ["moe.top_k"], ["final_val_loss", "tokens_per_s", "eval_moe_dropped_frac"])
    table = pd.DataFrame({
        "top-k": agg["moe.top_k"].astype(int).astype(str),
        "val loss (ours)": [mean_std(r, "final_val_loss") for _, r in agg.iterrows()],
        "train tokens/s": [_fmt(v, 0) for v in agg["tokens_per_s"]],
        "paper quality": [_paper(ref, str(int(k)), "quality") for k in agg["moe.top_k"]],
    })  # fmt: skip
    done = agg.dropna(subset=["final_val_loss"])  # a k whose runs all diverged is marked, not compared
    losses = done["final_val_loss"].tolist()
    if len(losses) < 2:
        verdict = Verdict("no data", "-", "needs completed runs at two or more k")
    else:
        ours = ", ".join(f"top-{int(k)} {v:.3f}" for k, v in zip(done["moe.top_k"], losses, strict=True))
        if _strictly_decreasing(losses):
            reproduced = "yes"
        elif losses[-1] < losses[0]:
            reproduced = "partly"
        else:
            reproduced = "no"
        verdict = Verdict(reproduced, f"val loss {ours}", "validation loss falls as k rises")
    return StudyReport("top-k", ref, table, verdict, _status_note(agg), agg)


def capacity_factor(study: StudyResults) -> StudyReport:
    ref = REFERENCES["capacity-factor"]
    eval_cfs = sorted(
        float(c.removeprefix("final_val_loss@cf")) for c in study.runs.columns if c.startswith("final_val_loss@cf")
    )
    loss_cols = [f"final_val_loss@cf{cf:g}" for cf in eval_cfs]
    drop_cols = [f"final_dropped_frac@cf{cf:g}" for cf in eval_cfs]
    agg = aggregate(study.runs, ["moe.train_capacity_factor"], [*loss_cols, *drop_cols, "tokens_per_s"])
    table = pd.DataFrame({"train CF": agg["moe.train_capacity_factor"].map(lambda v: f"{v:g}")})
    for cf, col, drop in zip(eval_cfs, loss_cols, drop_cols, strict=True):
        table[f"eval CF {cf:g}"] = [
            f"{mean_std(r, col)} ({_pct(r[drop])} dropped)" for _, r in agg.iterrows()
        ]  # fmt: skip
    table["train tokens/s"] = [_fmt(v, 0) for v in agg["tokens_per_s"]]
    table["paper (eval = train CF / eval 2.0)"] = [
        " / ".join(str(v) for v in ref.numbers.get(f"{cf:g}", {}).values()) or "-"
        for cf in agg["moe.train_capacity_factor"]
    ]
    if not loss_cols or agg.empty:
        return StudyReport("capacity-factor", ref, table, Verdict("no data", "-", "needs eval-CF columns"), [], agg)
    # 1) raising only the eval CF helps: at every train CF, loss at the largest eval CF <= at eval CF = train CF
    helps, pairs = 0, 0
    for _, row in agg.iterrows():
        same = f"final_val_loss@cf{row['moe.train_capacity_factor']:g}"
        if same in agg.columns and same != loss_cols[-1]:
            pairs += 1
            helps += row[loss_cols[-1]] <= row[same]
    # 2) a higher train CF is better, compared at the same (largest) eval CF
    at_top = agg[loss_cols[-1]].tolist()
    train_better = at_top[-1] < at_top[0]
    ours = (
        f"raising the eval CF to {eval_cfs[-1]:g} helped at {helps} of {pairs} train CFs; at eval CF {eval_cfs[-1]:g} "
        f"the loss by train CF is " + " / ".join(f"{v:.3f}" for v in at_top)
    )
    if helps == pairs and _strictly_decreasing(at_top):
        reproduced = "yes"
    elif helps == pairs or train_better:
        reproduced = "partly"
    else:
        reproduced = "no"
    checked = "eval CF up lowers the loss at every train CF, and the loss falls with the train CF (one seed each)"
    return StudyReport("capacity-factor", ref, table, Verdict(reproduced, ours, checked), _status_note(agg), agg)


def _stable(row: pd.Series) -> str:
    return f"{int(row['runs'] - row['diverged'] - row['failed'])}/{int(row['runs'])}"


def z_loss_stability(study: StudyResults) -> StudyReport:
    ref = REFERENCES["z-loss-stability"]
    agg = aggregate(study.runs, ["+stability"], ["final_val_loss", "moe_max_logit", "moe_z_loss"])
    order = ["baseline", "z-loss", "jitter", "update-clip", "fp32-router"]
    agg["_order"] = agg["+stability"].map(lambda s: order.index(s) if s in order else len(order))
    agg = agg.sort_values("_order").drop(columns="_order").reset_index(drop=True)
    table = pd.DataFrame({
        "setting": agg["+stability"],
        "stable (ours)": [_stable(r) for _, r in agg.iterrows()],
        "val loss (ours)": [mean_std(r, "final_val_loss") for _, r in agg.iterrows()],
        "max router logit": [mean_std(r, "moe_max_logit", 1) for _, r in agg.iterrows()],
        "paper stable": [_paper(ref, s, "stable") for s in agg["+stability"]],
        "paper quality": [_paper(ref, s, "quality") for s in agg["+stability"]],
    })  # fmt: skip
    by = agg.set_index("+stability")
    if not {"baseline", "z-loss"} <= set(by.index):
        return StudyReport("z-loss-stability", ref, table, Verdict("no data", "-", "needs baseline and z-loss"))
    base, z = by.loc["baseline"], by.loc["z-loss"]
    noise = max(v for v in (base["final_val_loss_std"], z["final_val_loss_std"], 0.0) if not math.isnan(v))
    if math.isnan(base["final_val_loss"]):  # every baseline run diverged: z-loss quality is compared to nothing
        quality_ok = not math.isnan(z["final_val_loss"])
    else:
        quality_ok = z["final_val_loss"] <= base["final_val_loss"] + noise
    smaller_logits = z["moe_max_logit"] < base["moe_max_logit"] or math.isnan(base["moe_max_logit"])
    ours = (
        f"stable: baseline {_stable(base)}, z-loss {_stable(z)}; val loss {base['final_val_loss']:.3f} vs "
        f"{z['final_val_loss']:.3f}; max router logit {base['moe_max_logit']:.1f} vs {z['moe_max_logit']:.1f}"
    )
    if base["diverged"] == 0:
        reproduced = "partly" if quality_ok and smaller_logits else "inconclusive"
        checked = (
            "no baseline run diverged, so stability cannot be compared; checked instead: z-loss quality no worse "
            "than baseline (within the seeds' std) and smaller router logits"
        )
    else:
        fewer = z["diverged"] < base["diverged"]
        reproduced = "yes" if fewer and quality_ok else ("partly" if fewer or quality_ok else "no")
        checked = "z-loss: fewer diverged runs than baseline and validation loss no worse (within the seeds' std)"
    return StudyReport("z-loss-stability", ref, table, Verdict(reproduced, ours, checked), _status_note(agg), agg)


def router_fluctuation(study: StudyResults) -> StudyReport:
    ref = REFERENCES["router-fluctuation"]
    fl = [c for c in ("fluctuation@0.2", "fluctuation@0.5", "fluctuation@0.8") if c in study.runs.columns]
    agg = aggregate(study.runs, ["moe"], ["final_val_loss", "final_val_ppl", *fl, "moe_dropped_frac"])
    table = pd.DataFrame({
        "router": agg["moe"],
        "val ppl (ours)": [mean_std(r, "final_val_ppl") for _, r in agg.iterrows()],
        "still changing after 20 / 50 / 80%": [" / ".join(_pct(r[c]) for c in fl) for _, r in agg.iterrows()],
        "dropped (train)": [_pct(v) for v in agg["moe_dropped_frac"]],
        "paper valid ppl": [_paper(ref, m, "valid ppl") for m in agg["moe"]],
        "paper fluctuation": [_paper(ref, m, "still changing after 20/50/80%") for m in agg["moe"]],
    })  # fmt: skip
    by = agg.set_index("moe")
    late = "fluctuation@0.8" if "fluctuation@0.8" in fl else (fl[-1] if fl else None)
    if late is None or "stablemoe" not in by.index:
        return StudyReport("router-fluctuation", ref, table, Verdict("no data", "-", "needs fluctuation columns"))
    learned = [m for m in ("switch", "st-moe", "base") if m in by.index and not math.isnan(by.loc[m, late])]
    if not learned or math.isnan(by.loc["stablemoe", late]):
        verdict = Verdict("no data", "-", "needs completed StableMoE and learned-router runs")
        return StudyReport("router-fluctuation", ref, table, verdict, _status_note(agg), agg)
    still = {m: by.loc[m, late] for m in learned}
    learned_fluctuate = all(v > 0 for v in still.values())
    stable_zero = all(by.loc["stablemoe", c] == 0 for c in fl)
    best = by["final_val_ppl"].dropna().idxmin()
    ours = (
        f"{late.split('@')[1]} of training: "
        + ", ".join(f"{m} {_pct(v)}" for m, v in still.items())
        + f" still changing; StableMoE {_pct(by.loc['stablemoe', late])}; best perplexity: {best}"
    )
    fluct_ok = learned_fluctuate and stable_zero
    reproduced = "yes" if fluct_ok and best == "stablemoe" else ("partly" if fluct_ok else "no")
    checked = (
        "learned routers (Switch, top-2, BASE) still change experts late in training, StableMoE (stage 2) never; "
        "and StableMoE has the lowest validation perplexity"
    )
    return StudyReport("router-fluctuation", ref, table, Verdict(reproduced, ours, checked), _status_note(agg), agg)


def stablemoe(study: StudyResults) -> StudyReport:
    ref = REFERENCES["stablemoe"]
    agg = aggregate(study.runs, ["moe.stage1_fraction"], ["final_val_ppl", "final_val_loss"])
    table = pd.DataFrame({
        "stage-1 length": agg["moe.stage1_fraction"].map(lambda v: "stage 1 only" if v >= 1 else f"{v:.0%}"),
        "val ppl (ours)": [mean_std(r, "final_val_ppl") for _, r in agg.iterrows()],
        "paper valid ppl": [_paper(ref, f"{v:g}", "valid ppl") for v in agg["moe.stage1_fraction"]],
    })  # fmt: skip
    ppl = agg.set_index("moe.stage1_fraction")["final_val_ppl"].dropna()
    if len(ppl) < 2:
        verdict = Verdict("no data", "-", "needs two or more stage-1 lengths")
        return StudyReport("stablemoe", ref, table, verdict, _status_note(agg), agg)
    two_stage = ppl[ppl.index < 1.0]
    shortest_best = two_stage.idxmin() == two_stage.index.min()
    beats_stage1 = 1.0 in ppl.index and two_stage.min() < ppl.loc[1.0]
    ours = ", ".join(f"{k:g}: {v:.3f}" for k, v in ppl.items())
    reproduced = "yes" if shortest_best and beats_stage1 else ("partly" if shortest_best or beats_stage1 else "no")
    checked = "the shortest stage 1 has the lowest perplexity, and two stages beat stage 1 only (one seed each)"
    verdict = Verdict(reproduced, f"val ppl by stage-1 length {ours}", checked)
    return StudyReport("stablemoe", ref, table, verdict, _status_note(agg), agg)


# --- fine-tuning studies --------------------------------------------------------------------------------------

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
        "trainable parameters": [_fmt(v, 0) for v in agg["trainable_parameters"]],
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
    return StudyReport("freeze", ref, table, verdict, _status_note(agg), agg)


def token_drop(study: StudyResults) -> StudyReport:
    ref = REFERENCES["token-drop"]
    agg = aggregate(study.runs, ["moe.train_capacity_factor"], [ACC, "moe_dropped_frac", "eval_moe_dropped_frac"])
    table = pd.DataFrame({
        "train CF (eval 2.0)": agg["moe.train_capacity_factor"].map(lambda v: f"{v:g}"),
        "dropped in training": [_pct(v) for v in agg["moe_dropped_frac"]],
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
        f"dropping {_pct(worst['moe_dropped_frac'])} (CF {worst['moe.train_capacity_factor']:g}) gives "
        f"{worst[ACC]:.3f} vs {reference[ACC]:.3f} with {_pct(reference['moe_dropped_frac'])} dropped"
    )
    reproduced = "yes" if cost <= 2 * noise else "no"
    checked = (
        f"fine-tuning with 5-20% of tokens dropped is within 2 standard errors ({2 * noise:.3f}) of the fewest drops"
    )
    return StudyReport("token-drop", ref, table, Verdict(reproduced, ours, checked), _status_note(agg), agg)


def aux_loss_finetune(study: StudyResults) -> StudyReport:
    ref = REFERENCES["aux-loss-finetune"]
    keys = ["moe.aux_loss_coef", "moe.train_capacity_factor"]
    agg = aggregate(study.runs, keys, [ACC, "moe_dropped_frac"])
    label = ["on" if a > 0 else "off" for a in agg["moe.aux_loss_coef"]]
    table = pd.DataFrame({
        "aux loss": label,
        "train CF (eval 2.0)": agg["moe.train_capacity_factor"].map(lambda v: f"{v:g}"),
        "dropped in training": [_pct(v) for v in agg["moe_dropped_frac"]],
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
    return StudyReport("aux-loss-finetune", ref, table, Verdict(reproduced, ours, checked), _status_note(agg), agg)


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
        return StudyReport("overfit", ref, table, verdict, _status_note(agg), agg)
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
    return StudyReport("overfit", ref, table, Verdict(reproduced, ours, checked), _status_note(agg), agg)


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
    return StudyReport("finetune-grid", ref, table, verdict, _status_note(agg), agg)


BUILDERS: dict[str, Callable[[StudyResults], StudyReport]] = {
    "z-loss-stability": z_loss_stability,
    "capacity-factor": capacity_factor,
    "top-k": top_k,
    "finetune-grid": finetune_grid,
    "freeze": freeze,
    "token-drop": token_drop,
    "aux-loss-finetune": aux_loss_finetune,
    "overfit": overfit,
    "router-fluctuation": router_fluctuation,
    "stablemoe": stablemoe,
}


def build(name: str, study: StudyResults | None) -> StudyReport:
    """The report of one study; a missing study or one whose builder cannot read it is 'no data', not an error."""
    if name not in BUILDERS:
        raise ValueError(f"no report for study {name!r}; known: {sorted(BUILDERS)}")
    if study is None or study.runs.empty:
        return _no_data(name)
    if completed(study.runs).empty:  # every run diverged or failed: list them
        columns = [*study.swept, "status", *(["diverged_at_step"] if "diverged_at_step" in study.runs else [])]
        table = study.runs[columns].map(_cell)
        return StudyReport(name, REFERENCES[name], table, Verdict("no data", "-", "no run completed"))
    try:
        return BUILDERS[name](study)
    except KeyError as err:  # runs.csv without a column the study's table needs (an older or edited sweep)
        why = f"results/{name}/runs.csv has no column {err}; columns: {list(study.runs.columns)}"
        return StudyReport(name, REFERENCES[name], pd.DataFrame(), Verdict("no data", "-", why))
