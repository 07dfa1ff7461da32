"""The main job's headline: `pretrain small` (sparse) against `pretrain dense-small`, its dense twin at equal active
FLOPs and equal tokens, over the seeds recorded in results/pretrain/<name>/seed<S>/summary.json.

Both are judged with the studies' statistics (`stats`): sparse - dense paired by seed (and by validation sequence or
fact query where the runs recorded them), Student's t at n - 1 degrees of freedom, a direction rule with a margin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from moe_lab.io import read_json
from moe_lab.report import stats
from moe_lab.report.results import final_examples
from moe_lab.report.verdict import clears_zero, inside_margin, judge

SPARSE, DENSE = "small", "dense-small"
LABELS = {SPARSE: "sparse: 8 experts, top-2, MoE in 2 of 4 blocks", DENSE: "dense twin"}
# (summary key, what, scale, the direction in which sparse - dense means "sparse better", the margin): a difference
# whose 90% interval lies inside the margin is too small to count. Loss: half ST-MoE's sparse gain at equal FLOPs
# (Table 8: Dense-L -1.474, ST-MoE-L top-2 at 1.25/2.0 -1.369, 0.105 nats per token, taken at face value for our
# nats per byte). Fact recall: 2 points (no paper number; a tenth of the recall the main job reaches)
METRICS = (
    ("final_val_loss", "val loss", 1.0, "<", 0.05),
    ("final_fact_recall", "fact recall", 100.0, ">", 0.02),
)
_SEED_DIR = re.compile(r"^seed(\d+)$")


@dataclass(frozen=True)
class MainJob:
    table: pd.DataFrame
    rule: str


def _summaries(root: Path, name: str) -> dict[int, dict]:
    """Completed runs of `name` by seed (results/pretrain/NAME/seed<S>/summary.json)."""
    out = {}
    for path in sorted((root / name).glob("seed*/summary.json")):
        match = _SEED_DIR.match(path.parent.name)
        summary = read_json(path)
        if match and summary.get("status") == "completed":
            out[int(match.group(1))] = summary
    return out


def claim(d: stats.Difference, better: str, margin: float) -> str:
    """'sparse better', 'dense better', 'no difference' (inside the margin), '... better by less than the margin'
    (inside it, yet clear of 0) or 'inconclusive': the direction rule (verdict.judge) on sparse - dense, naming
    which way a 'no' went."""
    verdict = judge(d, "direction", margin, better)[0]
    if verdict == "yes":
        return "sparse better"
    if verdict == "no":
        right_side, wrong_side = clears_zero(d, better)
        small = " by less than the margin" if inside_margin(d, margin) else ""
        if wrong_side:
            return f"dense better{small}"
        return f"sparse better{small}" if right_side else "no difference (inside the margin)"
    return "inconclusive" if d.decidable else "inconclusive (one seed)"


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
    for key, what, scale, better, margin in METRICS:

        def estimate(name: str, key: str = key) -> stats.Estimate:
            examples = {s: final_examples(root / name / f"seed{s}", runs[name][s], key) for s in seeds}
            return stats.Estimate(
                {s: runs[name][s][key] for s in seeds}, {s: v for s, v in examples.items() if v is not None}
            )

        d = stats.difference(estimate(SPARSE), estimate(DENSE))
        unit_of = " points" if scale == 100 else f" {unit}"
        digits = 2 if scale == 100 else 4
        lo, hi = d.interval(stats.DIRECTION_LEVEL)
        value = "-" if d.n == 0 else d.text(digits, scale).split(" (")[0] + unit_of
        if d.decidable:
            value += f", 95% interval [{lo * scale:+.{digits}f}, {hi * scale:+.{digits}f}]"
        rows.append({
            columns[0]: f"sparse - dense, {what} ({d.method}, n={d.n}; margin ±{margin * scale:g}{unit_of})",
            columns[2]: f"{value}: **{claim(d, better, margin)}**",
        })  # fmt: skip
    rule = (
        "sparse - dense is paired by seed (and by validation sequence or fact query where the runs recorded them); "
        "sparse is better when the 95% Student's t interval (n - 1 degrees of freedom) excludes 0 on its side "
        "(lower loss, higher recall), dense when it excludes 0 on the other side, by less than the margin when the "
        "90% interval also lies inside the margin (too small to count); no difference when the 90% interval lies "
        "inside the margin and the 95% one holds 0, else inconclusive"
    )
    return MainJob(pd.DataFrame(rows, columns=columns).fillna(""), rule)
