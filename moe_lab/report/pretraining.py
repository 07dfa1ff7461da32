"""Report builders of the pretraining studies: top-k, capacity factor, z-loss stability, the StableMoE pair."""

from __future__ import annotations

import itertools
import math

import pandas as pd

from moe_lab.report.reference import REFERENCES
from moe_lab.report.results import StudyResults, aggregate
from moe_lab.report.spec import margins
from moe_lab.report.stats import Estimate, Grid, by_value, difference, estimates, mean_of, pooled_means, trend
from moe_lab.report.verdict import (
    Part,
    StudyReport,
    Verdict,
    capacity_note,
    cell_text,
    fmt_number,
    paper_value,
    percent,
    status_notes,
    verdict_of,
)

NATS = "nats"


def _loss_estimates(study: StudyResults, by: list[str], metric: str = "final_val_loss") -> dict:
    """Estimates (with the runs' per-example values) keyed by the single swept value when `by` has one column."""
    return by_value(estimates(study.runs, by, metric, study.examples))


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
    margin = margins("top-k")["loss"]
    grid = Grid.of({k: est[k] for k in ks})
    parts = [
        Part(f"top-{int(lo)} - top-{int(hi)}", f"> 0: top-{int(hi)} lowers the loss", grid.difference(lo, hi),
             "direction", margin, ">", unit=NATS)
        for lo, hi in itertools.pairwise(ks)
    ]  # fmt: skip
    extra = ", ".join(f"top-{int(k)} {est[k].text()}" for k in ks)
    verdict = verdict_of(parts, "each step up in k lowers the validation loss", extra)
    return StudyReport("top-k", ref, table, verdict, status_notes(agg), agg)


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
    margin = margins("capacity-factor")
    parts, skipped = [], []
    # 1) raising only the eval CF helps: per train CF, its runs' loss at eval CF = train CF minus at the largest,
    # paired by seed (the same runs) and by validation sequence where the runs recorded them
    for _, row in agg.iterrows():
        train_cf = row[key]
        same = f"final_val_loss@cf{train_cf:g}"
        if same not in est or same == top or train_cf not in est[same]:
            continue
        if row[f"final_dropped_frac@cf{train_cf:g}"] == 0:  # nothing dropped: a larger eval CF cannot change it
            skipped.append(f"{train_cf:g}")
            continue
        d = difference(est[same][train_cf], est[top][train_cf])
        claim = f"> 0: eval CF {eval_cfs[-1]:g} lowers the loss"
        parts.append(Part(f"train CF {train_cf:g}: eval CF {train_cf:g} - {eval_cfs[-1]:g}", claim, d, "direction",
                          margin["eval_cf"], ">", unit=NATS))  # fmt: skip
    # 2) a higher train CF is better, at the largest eval CF: the lowest train CF minus the highest, judged
    # against the grid of train CFs x seeds
    cfs = [c for c in sorted(est[top]) if est[top][c].n]
    if len(cfs) >= 2:
        d = Grid.of({c: est[top][c] for c in cfs}).difference(cfs[0], cfs[-1])
        claim = f"> 0: train CF {cfs[-1]:g} beats {cfs[0]:g}"
        name = f"at eval CF {eval_cfs[-1]:g}, train CF {cfs[0]:g} - {cfs[-1]:g}"
        parts.append(Part(name, claim, d, "direction", margin["train_cf"], ">", unit=NATS))
    checked = (
        f"(1) at every train CF that drops tokens, raising only the eval CF to {eval_cfs[-1]:g} lowers the loss "
        f"(the same runs, paired by seed); (2) at eval CF {eval_cfs[-1]:g}, the highest train CF beats the lowest"
    )
    if skipped:
        checked += f"; train CF {', '.join(skipped)} dropped nothing at its own eval CF and is left out of (1)"
    verdict = verdict_of(parts, checked) if parts else Verdict("no data", "-", checked)
    return StudyReport("capacity-factor", ref, table, verdict, [capacity_note(study), *status_notes(agg)], agg)


def fewer_diverged(a_div: int, a_n: int, b_div: int, b_n: int) -> float:
    """One-sided Fisher exact p-value that setting a diverges less often than b (hypergeometric tail
    P(X <= a_div) with the margins fixed; Fisher 1935)."""
    total, div = a_n + b_n, a_div + b_div
    if total == 0:
        return math.nan
    denom = math.comb(total, a_n)
    return sum(math.comb(div, x) * math.comb(total - div, a_n - x) for x in range(0, a_div + 1)) / denom


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


def sensitivity_by_seed(runs: pd.DataFrame, setting: str, lrs: list, cap: float, key: str) -> Estimate:
    """Each seed's LR sensitivity of `setting` over `lrs`: a seed counts where each lr has a completed run of it
    (its loss) or a diverged one (the cap); a failed or missing run leaves the seed out (it is no evidence)."""
    mine = runs[runs[key] == setting]
    by_seed = {}
    for seed, group in mine.groupby("seed"):
        losses = {}
        for lr in lrs:
            at = group[group[LR] == lr]
            if len(at) != 1 or at["status"].iloc[0] not in ("completed", "diverged"):
                break
            completed_run = at["status"].iloc[0] == "completed"
            losses[lr] = float(at["final_val_loss"].iloc[0]) if completed_run else math.nan
        else:
            value = lr_sensitivity(losses, cap)
            if not math.isnan(value):
                by_seed[int(seed)] = value
    return Estimate(by_seed)


def z_loss_stability(study: StudyResults) -> StudyReport:
    ref = REFERENCES["z-loss-stability"]
    key = "+stability"
    runs = study.runs
    if LR not in runs.columns:  # one learning rate: the sweep cannot show a range. A label, not NaN: the groups
        runs = runs.assign(**{LR: "not swept"})  # are looked up by key, and NaN != NaN
    if "seed" not in runs.columns:
        runs = runs.assign(seed=runs.groupby([key, LR]).cumcount())
    agg = aggregate(runs, [key, LR], ["final_val_loss", "moe_max_logit"])
    loss = estimates(runs, [key, LR], "final_val_loss", study.examples)
    cap = _cap(study)
    settings = [s for s in SETTINGS if s in set(agg[key])] + sorted(set(agg[key]) - set(SETTINGS))
    lrs = sorted(agg[LR].unique())
    # (diverged, runs that completed or diverged): a failed run is missing evidence, not a divergence
    counts = {
        (r[key], r[LR]): (int(r["diverged"]), int(r["runs"] - r["failed"])) for _, r in agg.iterrows()
    }  # fmt: skip
    best: dict[str, float] = {}  # the learning rate of the lowest mean loss where no seed diverged
    # LR sensitivity compares like with like: over the learning rates every setting ran (a sweep still running
    # has not reached some of them)
    common = [lr for lr in lrs if all(counts.get((s, lr), (0, 0))[1] for s in settings)]
    sensitivity: dict[str, Estimate] = {}
    rows = []
    for setting in settings:
        row = {"setting": setting}
        means = {}
        for lr in lrs:
            est = loss.get((setting, lr), Estimate())
            div, n = counts.get((setting, lr), (0, 0))
            row[f"lr {cell_text(lr)}"] = f"{est.text()} [{n - div}/{n} stable]" if n else "-"
            if n and div == 0 and est.n:
                means[lr] = est.mean
        stable = [lr for lr in lrs if counts.get((setting, lr), (1, 0))[1] and counts[(setting, lr)][0] == 0]
        if means:
            best[setting] = min(means, key=means.get)
        sensitivity[setting] = sensitivity_by_seed(runs, setting, common, cap, key)
        row["stable lrs"] = ", ".join(cell_text(lr) for lr in stable) or "none"
        row["LR sensitivity"] = sensitivity[setting].text()
        logit = agg[(agg[key] == setting) & (agg[LR] == best.get(setting))]["moe_max_logit"]
        row["max router logit (best lr)"] = fmt_number(float(logit.iloc[0])) if logit.notna().any() else "-"
        row["paper stable"] = paper_value(ref, setting, "stable")
        row["paper quality"] = paper_value(ref, setting, "quality")
        rows.append(row)
    table = pd.DataFrame(rows)
    if not {"baseline", "z-loss"} <= set(settings):
        return StudyReport("z-loss-stability", ref, table, Verdict("no data", "-", "needs baseline and z-loss"))
    margin = margins("z-loss-stability")
    both = [lr for lr in lrs if ("baseline", lr) in counts and ("z-loss", lr) in counts]
    by_lr = {s: {lr: counts[(s, lr)] for lr in both} for s in ("baseline", "z-loss")}
    sens = Grid.of({s: e for s, e in sensitivity.items() if e.n})
    # LR sensitivity says nothing where the grid never destabilised either setting: equal small sensitivities
    # would then read as "no" to a question the sweep did not ask
    calm = not any(counts.get((s, lr), (0, 0))[0] for s in ("baseline", "z-loss") for lr in common)
    blocked = "nothing diverged at the learning rates every setting ran: the sweep did not reach instability"
    if len(common) < 2:
        calm, blocked = True, "fewer than two learning rates every setting ran: no LR sensitivity to compare"
    parts = [
        Part("LR sensitivity z-loss - baseline", "< 0: z-loss makes the loss less sensitive to the learning rate",
             sens.difference("z-loss", "baseline"), "direction", margin["lr_sensitivity"], "<", necessary=True,
             unit=NATS, blocked=blocked if calm else ""),
    ]  # fmt: skip
    if "baseline" in best and "z-loss" in best:
        at_best = Grid.of({s: loss[(s, lr)] for s, lr in best.items()})
        cost = at_best.difference("z-loss", "baseline")
        name = f"best-lr val loss z-loss (lr {cell_text(best['z-loss'])}) - baseline (lr {cell_text(best['baseline'])})"
    else:
        cost, name = difference(Estimate(), Estimate()), "best-lr val loss z-loss - baseline"
    parts.append(Part(name, f"at most {margin['quality']:g}: no quality cost", cost, "at most", margin["quality"],
                      necessary=True, unit=NATS))  # fmt: skip
    if "max_logit" in margin and "moe_max_logit" in runs.columns and {"baseline", "z-loss"} <= set(best):
        # z-loss's own mechanism (ST-MoE Eq. 5 penalises the router's log-sum-exp): smaller router logits, compared
        # where each setting trains best
        logits = estimates(runs, [key, LR], "moe_max_logit")
        at_best = Grid.of({s: logits[(s, lr)] for s, lr in best.items() if (s, lr) in logits})
        if {"baseline", "z-loss"} <= set(at_best.cells):
            parts.append(Part("max router logit z-loss - baseline (at each one's best lr)", "< 0: z-loss keeps the "
                              "router's logits small", at_best.difference("z-loss", "baseline"), "direction",
                              margin["max_logit"], "<", unit="logits"))  # fmt: skip

    def diverged(setting: str) -> str:
        return ", ".join(f"{cell_text(lr)}: {d}/{n}" for lr, (d, n) in by_lr[setting].items())

    z_div, z_n = (sum(v[i] for v in by_lr["z-loss"].values()) for i in (0, 1))
    b_div, b_n = (sum(v[i] for v in by_lr["baseline"].values()) for i in (0, 1))
    p = fewer_diverged(z_div, z_n, b_div, b_n)
    extra = (
        f"diverged by lr: baseline {diverged('baseline')}; z-loss {diverged('z-loss')} (z-loss diverges less: "
        f"one-sided Fisher p = {fmt_number(p)})"
    )
    checked = (
        "both parts necessary (Wortsman et al. 2023: an intervention stabilises if it lowers the LR sensitivity "
        "without a worse best loss): (1) z-loss lowers the LR sensitivity (the mean over the learning rates of "
        f"min(loss, unigram loss {fmt_number(cap)}) - the best, a diverged learning rate counting as the unigram "
        "loss; per seed, over the learning rates every setting ran; inconclusive where nothing diverged there); "
        "(2) at each one's best stable learning rate, z-loss's validation loss is at most the margin above "
        "baseline's. Failed runs are left out, not counted as diverged"
    )
    verdict = verdict_of(parts, checked, extra)
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
    margin = margins("router-fluctuation")
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
    confounded = drops[compared].max() - drops[compared].min() > DROP_TOLERANCE
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
        f"when the routers' eval drop fractions differ by more than {percent(DROP_TOLERANCE)}"
    )
    verdict = verdict_of(parts, checked)
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
    margin = margins("stablemoe")
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
