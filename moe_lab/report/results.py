"""Reading a study's results from disk: runs.csv, run directories, seeds aggregated; nothing from training code."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

# runs.csv columns that are results, not swept values
RESULT_PREFIXES = ("final_", "best_", "fluctuation@", "moe_", "eval_moe_")
RESULT_COLUMNS = {
    "run", "status", "step", "diverged_at_step", "reason", "train_seconds", "tokens_per_s", "wall_seconds",
    "trainable_parameters",
}  # fmt: skip


@dataclass
class StudyResults:
    """One study's runs.csv and where its run directories are."""

    name: str
    root: Path  # results/<study>
    runs: pd.DataFrame

    @property
    def swept(self) -> list[str]:
        """The swept columns (seed included), in runs.csv order."""
        return [c for c in self.runs.columns if c not in RESULT_COLUMNS and not c.startswith(RESULT_PREFIXES)]

    def run_dir(self, run: str) -> Path:
        return self.root / "runs" / run

    def metrics(self, run: str) -> pd.DataFrame | None:
        """A run's metrics.csv, or None if it is not there."""
        path = self.run_dir(run) / "metrics.csv"
        return pd.read_csv(path) if path.exists() else None

    def fluctuation(self, run: str) -> pd.DataFrame | None:
        """A run's fluctuation.csv, or None."""
        path = self.run_dir(run) / "fluctuation.csv"
        return pd.read_csv(path) if path.exists() else None

    def summary(self, run: str) -> dict | None:
        path = self.run_dir(run) / "summary.json"
        return json.loads(path.read_text()) if path.exists() else None


def load_study(results_root: Path, name: str) -> StudyResults | None:
    """The study's results, or None if it has no runs.csv yet."""
    root = Path(results_root) / name
    path = root / "runs.csv"
    if not path.exists():
        return None
    runs = pd.read_csv(path)
    if "status" not in runs.columns:
        runs["status"] = "unknown"
    return StudyResults(name, root, runs)


def completed(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"] == "completed"]


def aggregate(runs: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean, std and count of each metric over the completed runs of every group (seeds pooled).

    Also `runs` (all runs of the group) and `diverged` (those that did not complete) per group.
    """
    rows = []
    for key, group in runs.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        done = completed(group)
        row = dict(zip(by, key, strict=True))
        row["runs"] = len(group)
        row["diverged"] = int((group["status"] == "diverged").sum())
        row["failed"] = int((~group["status"].isin(["completed", "diverged"])).sum())
        for metric in metrics:
            values = done[metric].dropna() if metric in done.columns else pd.Series(dtype=float)
            row[metric] = float(values.mean()) if len(values) else math.nan
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
            row[f"{metric}_n"] = len(values)
        rows.append(row)
    return pd.DataFrame(rows)


def mean_std(row: pd.Series | dict, metric: str, digits: int = 3, scale: float = 1.0) -> str:
    """'1.905' for one run, '1.905 +- 0.012' for several, '-' for none."""
    value, std, n = row.get(metric, math.nan), row.get(f"{metric}_std", math.nan), row.get(f"{metric}_n", 0)
    if n == 0 or value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value * scale:.{digits}f}"
    if n > 1 and not math.isnan(std):
        text += f" ± {std * scale:.{digits}f}"
    return text


def binomial_std(accuracy: float, num_examples: int) -> float:
    """The standard error of an accuracy measured on num_examples: what one seed cannot tell apart."""
    if num_examples <= 0 or math.isnan(accuracy):
        return math.nan
    return math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / num_examples)


def validation_examples(study: StudyResults) -> int:
    """Validation examples of the study's fine-tuning task(s), from a run's summary.json (1000 if unknown)."""
    for run in study.runs["run"]:
        summary = study.summary(run)
        if summary and "config" in summary:
            task = summary["config"].get("task", {})
            if task.get("source") == "synthetic":
                return int(task.get("synthetic_val", 1000))
    return 1000
