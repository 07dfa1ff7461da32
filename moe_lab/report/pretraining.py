"""Report builders of the pretraining studies: top-k, capacity factor, z-loss stability, the StableMoE pair."""

from __future__ import annotations

import itertools
import math

import pandas as pd

from moe_lab.report.reference import REFERENCES
from moe_lab.report.results import StudyResults, aggregate
from moe_lab.report.stats import Estimate, below, by_value, combine, difference, direction, estimates
from moe_lab.report.verdict import (
    StudyReport,
    Verdict,
    capacity_note,
    cell_text,
    fmt_number,
    paper_value,
    percent,
    status_notes,
)

LOSS_RULE = (
    "differences are judged against 2 standard errors of the difference (paired over seeds when the settings "
    "share them; a seed's standard error is std/sqrt(n)); a tie, or one seed (no standard error), is inconclusive"
)


def _loss_estimates(study: StudyResults, by: list[str], metric: str = "final_val_loss") -> dict:
    """Estimates keyed by the single swept value when `by` has one column."""
    return by_value(estimates(study.runs, by, metric))


def top_k(study: StudyResults) -> StudyReport:
    ref = REFERENCES["top-k"]
    agg = aggregate(study.runs, ["moe.top_k"], ["final_val_loss", "tokens_per_s", "eval_moe_dropped_frac"])
    est = _loss_estimates(study, ["moe.top_k"])
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
    claims, parts = [], []
    for lo, hi in itertools.pairwise(ks):
        d = difference(est[lo], est[hi])
        claims.append(direction(d, ">"))
        parts.append(f"top-{int(lo)} - top-{int(hi)} {d.text()}")
    ours = ", ".join(f"top-{int(k)} {est[k].text()}" for k in ks) + "; " + "; ".join(parts)
    checked = f"each step up in k lowers the validation loss; {LOSS_RULE}"
    return StudyReport("top-k", ref, table, Verdict(combine(claims), ours, checked), status_notes(agg), agg)


def capacity_factor(study: StudyResults) -> StudyReport:
    ref = REFERENCES["capacity-factor"]
    eval_cfs = sorted(
        float(c.removeprefix("final_val_loss@cf")) for c in study.runs.columns if c.startswith("final_val_loss@cf")
    )
    loss_cols = [f"final_val_loss@cf{cf:g}" for cf in eval_cfs]
    drop_cols = [f"final_dropped_frac@cf{cf:g}" for cf in eval_cfs]
    key = "moe.train_capacity_factor"
    agg = aggregate(study.runs, [key], [*loss_cols, *drop_cols, "tokens_per_s"])
    est = {col: _loss_estimates(study, [key], col) for col in loss_cols}
    table = pd.DataFrame({"train CF": agg[key].map(lambda v: f"{v:g}")})
    for cf, col, drop in zip(eval_cfs, loss_cols, drop_cols, strict=True):
        table[f"eval CF {cf:g}"] = [
            f"{est[col][t].text() if t in est[col] else '-'} ({percent(r[drop])} dropped)"
            for t, (_, r) in zip(agg[key], agg.iterrows(), strict=True)
        ]  # fmt: skip
    table["train tokens/s"] = [fmt_number(v, 0) for v in agg["tokens_per_s"]]
    table["paper (eval = train CF / eval 2.0)"] = [
        " / ".join(str(v) for v in ref.numbers.get(f"{cf:g}", {}).values()) or "-" for cf in agg[key]
    ]
    if not loss_cols or agg.empty:
        return StudyReport("capacity-factor", ref, table, Verdict("no data", "-", "needs eval-CF columns"), [], agg)
    top = loss_cols[-1]
    claims, parts, skipped = [], [], []
    # 1) raising only the eval CF helps: per train CF, its runs' loss at eval CF = train CF minus at the largest
    for _, row in agg.iterrows():
        train_cf = row[key]
        same = f"final_val_loss@cf{train_cf:g}"
        if same not in est or same == top or train_cf not in est[same]:
            continue
        if row[f"final_dropped_frac@cf{train_cf:g}"] == 0:  # nothing dropped: a larger eval CF cannot change it
            skipped.append(f"{train_cf:g}")
            continue
        d = difference(est[same][train_cf], est[top][train_cf])
        claims.append(direction(d, ">"))
        parts.append(f"train CF {train_cf:g}: eval CF {train_cf:g} - {eval_cfs[-1]:g} {d.text()}")
    # 2) a higher train CF is better, at the largest eval CF: the lowest train CF minus the highest
    cfs = [c for c in sorted(est[top]) if est[top][c].n]
    if len(cfs) >= 2:
        d = difference(est[top][cfs[0]], est[top][cfs[-1]])
        claims.append(direction(d, ">"))
        parts.append(f"at eval CF {eval_cfs[-1]:g}, train CF {cfs[0]:g} - {cfs[-1]:g} {d.text()}")
    ours = "; ".join(parts) or "-"
    checked = (
        f"(1) at every train CF that drops tokens, raising only the eval CF to {eval_cfs[-1]:g} lowers the loss "
        f"(the same runs, paired); (2) at eval CF {eval_cfs[-1]:g}, the highest train CF beats the lowest; " + LOSS_RULE
    )
    if skipped:
        checked += f"; train CF {', '.join(skipped)} dropped nothing at its own eval CF and is left out of (1)"
    verdict = Verdict(combine(claims), ours, checked)
    return StudyReport("capacity-factor", ref, table, verdict, [capacity_note(study), *status_notes(agg)], agg)


QUALITY_MARGIN = 0.01  # nats/token: a loss cost smaller than this is "no cost" (ST-MoE's z-loss gain is 0.014)


def fewer_diverged(a_div: int, a_n: int, b_div: int, b_n: int) -> float:
    """One-sided Fisher exact p-value that setting a diverges less often than b (hypergeometric tail
    P(X <= a_div) with the margins fixed; Fisher 1935)."""
    total, div = a_n + b_n, a_div + b_div
    if total == 0:
        return math.nan
    denom = math.comb(total, a_n)
    return sum(math.comb(div, x) * math.comb(total - div, a_n - x) for x in range(0, a_div + 1)) / denom


def stability_claim(a_div: int, a_n: int, b_div: int, b_n: int) -> str:
    """Whether a diverges less often than b: yes/no at one-sided p < 0.05, inconclusive otherwise (and when
    nothing diverged, which cannot tell them apart)."""
    if a_div == 0 and b_div == 0:
        return "inconclusive"
    if fewer_diverged(a_div, a_n, b_div, b_n) < 0.05:
        return "yes"
    if fewer_diverged(b_div, b_n, a_div, a_n) < 0.05:
        return "no"
    return "inconclusive"


SETTINGS = ["baseline", "z-loss", "jitter", "update-clip", "fp32-router"]
LR = "optim.lr"


def _cap(study: StudyResults) -> float:
    """The loss of a model that learned nothing beyond token frequencies: the runs' unigram validation loss."""
    for run in study.runs["run"]:
        summary = study.summary(str(run)) or {}
        if summary.get("unigram_val_loss") is not None:
            return float(summary["unigram_val_loss"])
    return math.nan


def lr_sensitivity(losses: dict[float, float], cap: float) -> float:
    """Wortsman et al. 2023 (Sec. 3.2): the mean over the swept learning rates of min(loss, cap) - the best
    loss, where a diverged learning rate counts as the cap (they cap at the initial loss; we at the unigram
    loss, which a run that learned only token frequencies reaches). Lower is less sensitive."""
    if all(math.isnan(v) for v in losses.values()):  # no learning rate completed: there is no best loss
        return math.nan
    capped = [cap if math.isnan(v) else min(v, cap) for v in losses.values()]
    return sum(capped) / len(capped) - min(capped)


def stable_range_claim(a: dict[float, tuple[int, int]], b: dict[float, tuple[int, int]]) -> str:
    """Whether setting a is stable over a wider range of learning rates than b ({lr: (diverged, runs)}):
    pooled over the learning rates, yes or no by the one-sided Fisher exact test (p < 0.05); no also when both
    diverge exactly as often at every learning rate (the grid shows no widening); inconclusive when nothing
    diverged (the sweep did not reach instability) or the counts differ within chance."""
    a_div, a_n = sum(d for d, _ in a.values()), sum(n for _, n in a.values())
    b_div, b_n = sum(d for d, _ in b.values()), sum(n for _, n in b.values())
    if a_div == 0 and b_div == 0:
        return "inconclusive"
    if a == b:
        return "no"
    return stability_claim(a_div, a_n, b_div, b_n)


def z_loss_stability(study: StudyResults) -> StudyReport:
    ref = REFERENCES["z-loss-stability"]
    key = "+stability"
    runs = study.runs
    if LR not in runs.columns:  # one learning rate: the sweep cannot show a range. A label, not NaN: the groups
        runs = runs.assign(**{LR: "not swept"})  # are looked up by key, and NaN != NaN
    agg = aggregate(runs, [key, LR], ["final_val_loss", "moe_max_logit"])
    loss = estimates(runs, [key, LR], "final_val_loss")
    cap = _cap(study)
    settings = [s for s in SETTINGS if s in set(agg[key])] + sorted(set(agg[key]) - set(SETTINGS))
    lrs = sorted(agg[LR].unique())
    counts = {(r[key], r[LR]): (int(r["diverged"] + r["failed"]), int(r["runs"])) for _, r in agg.iterrows()}
    best: dict[str, float] = {}  # the learning rate of the lowest mean loss where no seed diverged
    rows = []
    for setting in settings:
        row = {"setting": setting}
        means = {}
        for lr in lrs:
            est = loss.get((setting, lr), Estimate())
            div, n = counts.get((setting, lr), (0, 0))
            row[f"lr {cell_text(lr)}"] = f"{est.text()} [{n - div}/{n} stable]" if n else "-"
            if n:  # a learning rate not run (yet) is left out, not counted as diverged
                means[lr] = est.mean if div == 0 else math.nan
        stable = [lr for lr in lrs if (setting, lr) in counts and counts[(setting, lr)][0] == 0]
        finite = {lr: m for lr, m in means.items() if not math.isnan(m)}
        if finite:
            best[setting] = min(finite, key=finite.get)
        row["stable lrs"] = ", ".join(cell_text(lr) for lr in stable) or "none"
        row["LR sensitivity"] = fmt_number(lr_sensitivity(means, cap))
        row["paper stable"] = paper_value(ref, setting, "stable")
        row["paper quality"] = paper_value(ref, setting, "quality")
        rows.append(row)
    table = pd.DataFrame(rows)
    if not {"baseline", "z-loss"} <= set(settings):
        return StudyReport("z-loss-stability", ref, table, Verdict("no data", "-", "needs baseline and z-loss"))
    both = [lr for lr in lrs if ("baseline", lr) in counts and ("z-loss", lr) in counts]  # (1) compares like with like
    by_lr = {s: {lr: counts[(s, lr)] for lr in both} for s in ("baseline", "z-loss")}
    widened = stable_range_claim(by_lr["z-loss"], by_lr["baseline"])
    if "baseline" in best and "z-loss" in best:
        cost = difference(loss[("z-loss", best["z-loss"])], loss[("baseline", best["baseline"])])
        quality = below(cost, QUALITY_MARGIN)
    else:
        cost, quality = difference(Estimate(), Estimate()), "inconclusive"

    def diverged(setting: str) -> str:
        return ", ".join(f"{cell_text(lr)}: {d}/{n}" for lr, (d, n) in by_lr[setting].items())

    ours = (
        f"diverged by lr: baseline {diverged('baseline')}; z-loss {diverged('z-loss')}; best-lr val loss z-loss "
        f"- baseline {cost.text()} (lr {cell_text(best.get('z-loss', '-'))} vs {cell_text(best.get('baseline', '-'))})"
    )
    checked = (
        "(1) z-loss is stable over a wider range of learning rates than baseline: pooled over the learning rates "
        "both were run at it diverges less often (one-sided Fisher exact test, p < 0.05); no when it diverges more "
        "often, or exactly as often at every learning rate; inconclusive when nothing diverged; (2) at each one's "
        f"best stable learning rate its validation loss is no worse than baseline's by {QUALITY_MARGIN} nats: yes "
        "when the difference + 2 standard errors is below that, no when the difference - 2 standard errors is above "
        "it. "
        "LR sensitivity (Wortsman et al. 2023): mean over the learning rates of min(loss, unigram loss "
        f"{fmt_number(cap)}) - the best, a diverged learning rate counting as the unigram loss"
    )
    verdict = Verdict(combine([widened, quality]), ours, checked)
    return StudyReport("z-loss-stability", ref, table, verdict, status_notes(agg), agg)


DROP_TOLERANCE = 0.005  # eval drop fractions closer than this cannot decide a comparison of losses


def router_fluctuation(study: StudyResults) -> StudyReport:
    ref = REFERENCES["router-fluctuation"]
    fl = [c for c in ("fluctuation@0.2", "fluctuation@0.5", "fluctuation@0.8") if c in study.runs.columns]
    metrics = ["final_val_loss", "final_val_ppl", *fl, "moe_dropped_frac", "eval_moe_dropped_frac"]
    agg = aggregate(study.runs, ["moe"], metrics)
    loss = _loss_estimates(study, ["moe"])
    ppl = _loss_estimates(study, ["moe"], "final_val_ppl")
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
    still = {m: by.loc[m, late] for m in learned}
    fluct = "yes" if all(v > 0 for v in still.values()) and all(by.loc["stablemoe", c] == 0 for c in fl) else "no"
    # perplexity: StableMoE against the best other router, where eval drops cannot decide it
    others = [m for m in by.index if m != "stablemoe" and m in loss and loss[m].n]
    drops = by["eval_moe_dropped_frac"].fillna(0.0)
    compared = [*others, "stablemoe"]
    confounded = drops[compared].max() - drops[compared].min() > DROP_TOLERANCE
    best_other = min(others, key=lambda m: loss[m].mean) if others else None
    if best_other is None:
        best_claim, best_text = "inconclusive", "no other router to compare"
    else:
        d = difference(loss["stablemoe"], loss[best_other])
        best_claim = "inconclusive" if confounded else direction(d, "<")
        best_text = f"val loss StableMoE - {best_other} (the best other) {d.text()}"
        if confounded:
            best_text += " (confounded by eval drops: " + ", ".join(f"{m} {percent(drops[m])}" for m in compared) + ")"
    ours = (
        f"{late.split('@')[1]} of training: "
        + ", ".join(f"{m} {percent(v)}" for m, v in still.items())
        + f" still changing; StableMoE {percent(by.loc['stablemoe', late])}; {best_text}"
    )
    checked = (
        "(1) learned routers (Switch, top-2, BASE) still change experts late in training and StableMoE's stage 2 "
        "never does (measured fractions); (2) StableMoE has the lowest validation loss of all routers, "
        + LOSS_RULE
        + f"; (2) is inconclusive when the routers' eval drop fractions differ by more than {percent(DROP_TOLERANCE)}"
    )
    verdict = Verdict(combine([fluct, best_claim]), ours, checked)
    return StudyReport("router-fluctuation", ref, table, verdict, status_notes(agg), agg)


def stablemoe(study: StudyResults) -> StudyReport:
    ref = REFERENCES["stablemoe"]
    key = "moe.stage1_fraction"
    agg = aggregate(study.runs, [key], ["final_val_ppl", "final_val_loss"])
    loss = _loss_estimates(study, [key])
    ppl = _loss_estimates(study, [key], "final_val_ppl")
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
    claims, parts = [], []
    shortest, rest = two_stage[0], two_stage[1:]
    if rest:
        runner = min(rest, key=lambda f: loss[f].mean)
        d = difference(loss[shortest], loss[runner])
        claims.append(direction(d, "<"))
        parts.append(f"stage 1 {shortest:g} - {runner:g} (the best longer one) {d.text()}")
    if 1.0 in loss and loss[1.0].n:
        best = min(two_stage, key=lambda f: loss[f].mean)
        d = difference(loss[best], loss[1.0])
        claims.append(direction(d, "<"))
        parts.append(f"two stages ({best:g}) - stage 1 only {d.text()}")
    ours = "val ppl " + ", ".join(f"{f:g}: {ppl[f].text()}" for f in done) + "; val loss " + "; ".join(parts)
    checked = f"(1) the shortest stage 1 beats every longer one; (2) two stages beat stage 1 only; {LOSS_RULE}"
    verdict = Verdict(combine(claims), ours, checked)
    return StudyReport("stablemoe", ref, table, verdict, status_notes(agg), agg)
