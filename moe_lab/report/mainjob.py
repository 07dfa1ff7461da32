"""The main job's headline: `pretrain small` (sparse) against `pretrain dense-small`, its dense twin at equal active
FLOPs and equal tokens, over the seeds recorded in results/pretrain/<name>/seed<S>/summary.json.

Both are judged with the studies' statistics (`stats`): sparse - dense paired by seed (std / sqrt(n) of the per-seed
differences), a difference counting beyond Z standard errors, a tie saying neither.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from moe_lab.report import stats

SPARSE, DENSE = "small", "dense-small"
LABELS = {SPARSE: "sparse: 8 experts, top-2, MoE in 2 of 4 blocks", DENSE: "dense twin"}
# (summary key, what, scale, the direction in which sparse - dense means "sparse better")
METRICS = (("final_val_loss", "val loss", 1.0, "<"), ("final_fact_recall", "fact recall", 100.0, ">"))
_SEED_DIR = re.compile(r"^seed(\d+)$")


@dataclass(frozen=True)
class MainJob:
    table: pd.DataFrame
    rule: str


def _summaries(root: Path, name: str) -> dict[int, dict]:
    out = {}
    for path in sorted((root / name).glob("seed*/summary.json")):
        match = _SEED_DIR.match(path.parent.name)
        summary = json.loads(path.read_text())
        if match and summary.get("status") == "completed":
            out[int(match.group(1))] = summary
    return out


def claim(d: stats.Difference, better: str) -> str:
    """'sparse better', 'dense better', or a tie / no standard error: the 2-SE rule on sparse - dense."""
    outcome = stats.direction(d, better)
    if outcome == "yes":
        return "sparse better"
    if outcome == "no":
        return "dense better"
    return "tie (within 2 standard errors)" if d.outcome == "tie" else "no standard error (one seed)"


def sparse_vs_dense(results_root: Path) -> MainJob | None:
    """The table, or None when results_root/pretrain lacks a completed run of either model."""
    root = Path(results_root) / "pretrain"
    runs = {name: _summaries(root, name) for name in (SPARSE, DENSE)}
    if not all(runs.values()):
        return None
    seeds = sorted(set(runs[SPARSE]) & set(runs[DENSE]))
    first = runs[SPARSE][min(runs[SPARSE])]
    unit = "nats/byte" if first["config"]["tokenizer"]["kind"] == "byte" else "nats/token"
    by_seed = " / ".join(map(str, seeds))
    rows = []
    for name in (SPARSE, DENSE):
        mine = [runs[name][s] for s in seeds]
        params = mine[0]["parameters"]
        rows.append({
            "run": LABELS[name],
            "command": f"`moe-lab pretrain {name} seed=S`",
            f"val loss ({unit}), seeds {by_seed}": " / ".join(f"{r['final_val_loss']:.4f}" for r in mine),
            f"fact recall, seeds {by_seed}": " / ".join(f"{100 * r['final_fact_recall']:.2f}%" for r in mine),
            "parameters total / active": f"{params['total'] / 1e6:.2f}M / {params['active'] / 1e6:.2f}M",
        })  # fmt: skip
    columns = list(rows[0])
    for key, what, scale, better in METRICS:
        sparse, dense = (stats.Estimate({s: scale * runs[n][s][key] for s in seeds}) for n in (SPARSE, DENSE))
        d = stats.difference(sparse, dense)
        how = "paired by seed" if d.paired else "unpaired"
        value = "-" if d.n == 0 else f"{d.value:+.4f}" + ("" if math.isnan(d.se) else f" ± {d.se:.4f}")
        unit_of = " points" if scale == 100 else f" {unit}"
        rows.append({
            columns[0]: f"sparse - dense, {what} ({how}, n={d.n})",
            columns[2]: f"{value}{unit_of}: **{claim(d, better)}**",
        })  # fmt: skip
    rule = (
        "sparse - dense is paired by seed, its standard error is the per-seed differences' std / sqrt(n), and a "
        f"difference counts beyond {stats.Z:g} standard errors (sparse better: lower loss, higher recall)"
    )
    return MainJob(pd.DataFrame(rows, columns=columns).fillna(""), rule)
