"""The report's figures (matplotlib, Agg backend, PNG): one function per figure, each returns its path or None."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI machines or clusters
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from moe_lab.report.results import StudyResults
from moe_lab.report.verdict import StudyReport

Figure = Callable[[StudyResults, StudyReport, Path], Path | None]


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _run_style(row: pd.Series, keys: list[str], colors: dict[str, str]) -> tuple[str, str]:
    """A run's legend label (its swept values) and colour, one colour per label across a figure."""
    label = ", ".join(str(row[k]) for k in keys) or row["run"]
    return label, colors.setdefault(label, f"C{len(colors) % 10}")


def capacity_curves(study: StudyResults, report: StudyReport, out: Path) -> Path | None:
    """Quality vs eval capacity factor, one line per train CF; throughput vs train CF."""
    agg = report.data
    cols = sorted((c for c in study.runs.columns if c.startswith("final_val_loss@cf")), key=lambda c: float(c[17:]))
    if agg is None or agg.empty or not cols:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    eval_cfs = [float(c.removeprefix("final_val_loss@cf")) for c in cols]
    for _, row in agg.iterrows():
        ax.plot(eval_cfs, [row[c] for c in cols], marker="o", label=f"train CF {row['moe.train_capacity_factor']:g}")
    ax.set(xlabel="eval capacity factor", ylabel="validation loss (nats/byte)", title="quality vs capacity factor")
    ax.legend()
    ax2.bar([f"{v:g}" for v in agg["moe.train_capacity_factor"]], agg["tokens_per_s"], color="tab:gray")
    ax2.set(xlabel="train capacity factor", ylabel="train tokens/s", title="throughput")
    return _save(fig, out / "capacity-factor.png")


def finetune_heatmaps(study: StudyResults, report: StudyReport, out: Path) -> Path | None:
    """Validation accuracy over batch size x learning rate, dense and sparse, per task."""
    agg = report.data
    if agg is None or agg.empty:
        return None
    tasks, models = sorted(agg["task"].unique()), ["dense", "sparse"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(8, 3.2 * len(tasks)), squeeze=False)
    lrs, batches = sorted(agg["optim.lr"].unique()), sorted(agg["train.batch_size"].unique())
    for i, task in enumerate(tasks):
        for j, model in enumerate(models):
            sub = agg[(agg["task"] == task) & (agg["model"] == model)]
            grid = np.full((len(lrs), len(batches)), np.nan)
            for _, row in sub.iterrows():
                grid[lrs.index(row["optim.lr"]), batches.index(row["train.batch_size"])] = row["final_val_accuracy"]
            ax = axes[i][j]
            im = ax.imshow(grid, cmap="viridis", aspect="auto")
            for (a, b), v in np.ndenumerate(grid):
                if not math.isnan(v):
                    ax.text(b, a, f"{v:.3f}", ha="center", va="center", color="white", fontsize=8)
            ax.set_xticks(range(len(batches)), [str(b) for b in batches])
            ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
            ax.set(xlabel="batch size", ylabel="learning rate", title=f"{task}: {model}")
            fig.colorbar(im, ax=ax)
    return _save(fig, out / "finetune-grid.png")


def fluctuation_curves(study: StudyResults, report: StudyReport, out: Path) -> Path | None:
    """Share of probe tokens still changing expert (StableMoE Fig. 2) over training, per router."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    drawn = False
    for _, row in study.runs.iterrows():
        table = study.fluctuation(row["run"])
        if table is None or table.empty:
            continue
        by_step = table.groupby("step")[["still_fluctuating", "changed_vs_prev"]].mean()
        frac = by_step.index / by_step.index.max()
        label = str(row.get("moe", row.get("moe.stage1_fraction", row["run"])))
        axes[0].plot(frac, by_step["still_fluctuating"], label=label)
        axes[1].plot(frac[1:], by_step["changed_vs_prev"].iloc[1:], label=label)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set(xlabel="fraction of training", ylabel="tokens still changing expert", title="routing fluctuation")
    axes[1].set(xlabel="fraction of training", ylabel="changed since the previous probe", title="per-probe change")
    for ax in axes:
        ax.legend()
    return _save(fig, out / f"{study.name}-fluctuation.png")


def accuracy_curves(study: StudyResults, report: StudyReport, out: Path) -> Path | None:
    """Train (dashed) and validation (solid) accuracy over fine-tuning per setting, a panel per task (ST-MoE Fig. 3)."""
    runs = study.runs
    tasks = sorted(runs["task"].dropna().unique()) if "task" in runs else [None]
    keys = [c for c in study.swept if c not in ("seed", "task")]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    colors: dict[str, str] = {}
    drawn = False
    for ax, task in zip(axes[0], tasks, strict=True):
        for _, row in (runs if task is None else runs[runs["task"] == task]).iterrows():
            metrics = study.metrics(row["run"])
            if metrics is None or "val_accuracy" not in metrics:
                continue
            evals = metrics.dropna(subset=["val_accuracy"])
            label, color = _run_style(row, keys, colors)
            ax.plot(evals["step"], evals["val_accuracy"], color=color, label=label)
            if "train_accuracy" in evals:
                ax.plot(evals["step"], evals["train_accuracy"], color=color, ls="--")
            drawn = True
        ax.set(xlabel="step", ylabel="accuracy (dashed: train)", title=task or study.name)
        ax.legend(fontsize=8)
    if not drawn:
        plt.close(fig)
        return None
    return _save(fig, out / f"{study.name}-accuracy.png")


def loss_curves(study: StudyResults, report: StudyReport, out: Path) -> Path | None:
    """Training loss of every run; a diverged run ends in an x at its last logged step."""
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = [c for c in study.swept if c != "seed"]
    colors: dict[str, str] = {}
    drawn = False
    for _, row in study.runs.iterrows():
        metrics = study.metrics(row["run"])
        if metrics is None or "loss" not in metrics:
            continue
        curve = metrics.dropna(subset=["loss"])
        label, color = _run_style(row, keys, colors)
        first = label not in ax.get_legend_handles_labels()[1]
        ax.plot(curve["step"], curve["loss"], color=color, alpha=0.8, label=label if first else None)
        if row["status"] == "diverged" and len(curve):
            ax.plot(curve["step"].iloc[-1], curve["loss"].iloc[-1], "x", color=color, ms=10, mew=2)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="step", ylabel="training loss", title=f"{study.name}: loss curves (x = diverged)")
    ax.legend(fontsize=8)
    return _save(fig, out / f"{study.name}-loss.png")


def loss_vs_lr(study: StudyResults, report: StudyReport, out: Path) -> Path | None:
    """Final validation loss against learning rate, one line per setting (Wortsman et al. 2023, Fig. 1): the mean
    over the seeds that completed, an x where a seed diverged."""
    runs = study.runs
    if "optim.lr" not in runs.columns or "+stability" not in runs.columns or runs["optim.lr"].nunique() < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (setting, group) in enumerate(runs.groupby("+stability", sort=False)):
        color = f"C{i % 10}"
        done = group[group["status"] == "completed"].groupby("optim.lr")["final_val_loss"].mean()
        ax.plot(done.index, done.values, marker="o", color=color, label=setting)
        bad = group[group["status"] != "completed"]
        if len(bad):
            top = runs["final_val_loss"].max()
            ax.plot(bad["optim.lr"], [top] * len(bad), "x", color=color, ms=9, mew=2)
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="final validation loss", title=f"{study.name}: loss vs learning rate")
    ax.legend(fontsize=8, title="x = a diverged seed", title_fontsize=8)
    return _save(fig, out / f"{study.name}-lr.png")


def expert_load(study: StudyResults, report: StudyReport, out: Path) -> Path | None:
    """Share of routed tokens per expert at the end of training, first MoE layer, per run."""
    loads = {}
    for _, row in study.runs.iterrows():
        metrics = study.metrics(row["run"])
        if metrics is None:
            continue
        cols = [c for c in metrics.columns if c.startswith("moe/") and "/tokens_per_expert/" in c]
        if not cols:
            continue
        layer = cols[0].split("/")[1]
        cols = sorted((c for c in cols if c.split("/")[1] == layer), key=lambda c: int(c.rsplit("/", 1)[1]))
        last = metrics.dropna(subset=cols).iloc[-1]
        loads[str(row.get("moe", row["run"]))] = [last[c] for c in cols]
    if not loads:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(loads)
    for i, (label, values) in enumerate(loads.items()):
        ax.bar(np.arange(len(values)) + i * width, values, width, label=label)
    ax.axhline(1 / len(next(iter(loads.values()))), color="black", lw=0.8, ls=":")
    ax.set(
        xlabel="expert", ylabel="share of routed tokens", title="expert load at the end of training (first MoE layer)"
    )
    ax.legend(fontsize=8)
    return _save(fig, out / f"{study.name}-expert-load.png")


def specialisation(study: StudyResults, report: StudyReport, out: Path) -> Path | None:
    """Expert specialisation (ST-MoE Tables 13-14): each label's probe tokens by expert, first MoE layer."""
    tables = {}
    for _, row in study.runs.iterrows():
        path = study.run_dir(row["run"]) / "specialisation.csv"
        if path.exists():
            table = pd.read_csv(path, dtype={"layer": str})
            if not table.empty:
                tables[str(row.get("moe", row["run"]))] = table[table["layer"] == table["layer"].iloc[0]]
    if not tables:
        return None
    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 4.5), squeeze=False)
    for ax, (label, table) in zip(axes[0], tables.items(), strict=True):
        grid = table.pivot_table(index="label", columns="expert", values="tokens", fill_value=0)
        share = grid.div(grid.sum(axis=1), axis=0)
        ax.imshow(share.to_numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(share.shape[1]), [str(c) for c in share.columns])
        ax.set_yticks(range(share.shape[0]), list(share.index), fontsize=7)
        ax.set(xlabel="expert", title=f"{label}: share of each label's tokens")
    return _save(fig, out / f"{study.name}-specialisation.png")


VERDICT_COLORS = {"yes": "tab:green", "no": "tab:red", "inconclusive": "tab:orange"}


def claims_figure(reports: list[StudyReport], out: Path) -> Path | None:
    """Every part of every claim on one axis: its effect and 95% interval in units of its margin, oriented so
    that the paper's side is to the right (a direction claim "< 0" and an "at most" cost are mirrored), coloured
    by the part's verdict; a part with no interval (one seed) is a hollow point."""
    rows = [(r.name, p) for r in reports for p in r.verdict.parts]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(12, 0.32 * len(rows) + 1.8))
    for y, (_, part) in enumerate(reversed(rows)):
        d = part.difference
        # "at most" (a cost): the paper's side is below the margin, so it is mirrored too
        sign = -1.0 if (part.rule == "direction" and part.expected == "<") or part.rule == "at most" else 1.0
        color = VERDICT_COLORS.get(part.verdict, "tab:gray")
        value = sign * d.value / part.margin
        lo, hi = (sign * v / part.margin for v in d.interval())
        if not math.isnan(lo):
            ax.plot(sorted((lo, hi)), [y, y], color=color, lw=2)
        face = color if d.decidable else "white"
        ax.plot([value], [y], "o", color=color, markerfacecolor=face, markersize=6)
    ax.set_yticks(range(len(rows)), [f"{s}: {p.name} ({p.verdict})" for s, p in reversed(rows)], fontsize=8)
    for x, style in ((0, "-"), (-1, ":"), (1, ":")):
        ax.axvline(x, color="black" if x == 0 else "gray", ls=style, lw=1)
    ax.set_xscale("symlog", linthresh=2)  # linear within two margins, logarithmic beyond
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.margins(x=0.08)
    ax.set_xlabel("effect / margin with its 95% interval: the paper's side to the right, ±margin dotted")
    handles = [plt.Line2D([], [], color=c, marker="o", lw=2, label=v) for v, c in VERDICT_COLORS.items()]
    handles.append(plt.Line2D([], [], color="tab:gray", marker="o", markerfacecolor="white", ls="", label="one seed"))
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=4, fontsize=8, frameon=False)
    ax.set_title("every claim's effect against its margin", loc="right")
    return _save(fig, out / "claims.png")
