"""z-loss-stability: z-loss and the other stabilisers across learning rates (ST-MoE, Wortsman 2023)."""

from __future__ import annotations

import math

import pandas as pd

from moe_lab.paths import FINISHED
from moe_lab.report.plots import loss_curves, loss_vs_lr
from moe_lab.report.pretraining import NATS
from moe_lab.report.reference import reference
from moe_lab.report.results import StudyResults, aggregate
from moe_lab.report.spec import margins
from moe_lab.report.stats import Difference, Estimate, difference, estimates, on_common_seeds
from moe_lab.report.verdict import (
    Part,
    StudyReport,
    Verdict,
    cell_text,
    fmt_number,
    paper_value,
    status_notes,
    verdict_of,
)

FIGURES = [loss_vs_lr, loss_curves]  # moe_lab.report.plots draws each that the results support


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
            if len(at) != 1 or at["status"].iloc[0] not in FINISHED:
                break
            completed_run = at["status"].iloc[0] == "completed"
            losses[lr] = float(at["final_val_loss"].iloc[0]) if completed_run else math.nan
        else:
            value = lr_sensitivity(losses, cap)
            if not math.isnan(value):
                by_seed[int(seed)] = value
    return Estimate(by_seed)


def build(study: StudyResults) -> StudyReport:
    """The study's table and the verdict on its claim."""
    ref = reference(study.name)
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
    margin = margins(study.name)
    both = [lr for lr in lrs if ("baseline", lr) in counts and ("z-loss", lr) in counts]
    by_lr = {s: {lr: counts[(s, lr)] for lr in both} for s in ("baseline", "z-loss")}

    # The claim compares two settings, which the study runs at more seeds than the others (as ST-MoE ran its
    # baseline at 6 and the rest at 3): each part pairs z-loss with the baseline by seed over the seeds both ran,
    # judged on their own noise; pooling the grid's would mix in the other settings' (update clipping and jitter
    # diverge at other learning rates and seeds) and leave out the seeds only these two ran.
    def paired(cells: dict[str, Estimate]) -> Difference:
        """z-loss - baseline over the seeds both have."""
        if not {"baseline", "z-loss"} <= set(cells):
            return difference(Estimate(), Estimate())
        return difference(*on_common_seeds(cells["z-loss"], cells["baseline"]))

    # LR sensitivity says nothing where the grid never destabilised either setting: equal small sensitivities
    # would then read as "no" to a question the sweep did not ask
    calm = not any(counts.get((s, lr), (0, 0))[0] for s in ("baseline", "z-loss") for lr in common)
    blocked = "nothing diverged at the learning rates every setting ran: the sweep did not reach instability"
    if len(common) < 2:
        calm, blocked = True, "fewer than two learning rates every setting ran: no LR sensitivity to compare"
    parts = [
        Part("LR sensitivity z-loss - baseline", "< 0: z-loss makes the loss less sensitive to the learning rate",
             paired(sensitivity), "direction", margin["lr_sensitivity"], "<", necessary=True,
             unit=NATS, blocked=blocked if calm else ""),
    ]  # fmt: skip
    if "baseline" in best and "z-loss" in best:
        cost = paired({s: loss[(s, best[s])] for s in ("baseline", "z-loss")})
        name = f"best-lr val loss z-loss (lr {cell_text(best['z-loss'])}) - baseline (lr {cell_text(best['baseline'])})"
    else:
        cost, name = difference(Estimate(), Estimate()), "best-lr val loss z-loss - baseline"
    parts.append(Part(name, f"at most {margin['quality']:g}: no quality cost", cost, "at most", margin["quality"],
                      necessary=True, unit=NATS))  # fmt: skip
    if "max_logit" in margin and "moe_max_logit" in runs.columns and {"baseline", "z-loss"} <= set(best):
        # z-loss's own mechanism (ST-MoE Eq. 5 penalises the router's log-sum-exp): smaller router logits, compared
        # where each setting trains best
        logits = estimates(runs, [key, LR], "moe_max_logit")
        at_best = {s: logits[(s, best[s])] for s in ("baseline", "z-loss") if (s, best[s]) in logits}
        if {"baseline", "z-loss"} <= set(at_best):
            parts.append(Part("max router logit z-loss - baseline (at each one's best lr)", "< 0: z-loss keeps the "
                              "router's logits small", paired(at_best), "direction",
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
        "baseline's; each part pairs z-loss with the baseline by seed, over every seed both ran. Failed runs are "
        "left out, not counted as diverged"
    )
    verdict = verdict_of(parts, checked, extra)
    return StudyReport("z-loss-stability", ref, table, verdict, status_notes(agg), agg)
