"""Reading a study's results from disk: runs.csv, run directories, seeds aggregated; nothing from training code."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from moe_lab.io import CorruptFileError, check_whole_lines, read_csv, read_json
from moe_lab.paths import FINISHED, records_path

# runs.csv columns that are results, not swept values
RESULT_PREFIXES = ("final_", "best_", "fluctuation@", "moe_", "eval_moe_")
RESULT_COLUMNS = {
    "run", "status", "step", "diverged_at_step", "reason", "train_seconds", "tokens_per_s", "wall_seconds",
    "trainable_parameters", "pretrained_weights",
}  # fmt: skip


@dataclass
class StudyResults:
    """One study's runs.csv and where its run directories are."""

    name: str
    root: Path  # results/<study>
    runs: pd.DataFrame
    _records: dict = field(default_factory=dict, repr=False)  # path -> records read (None: not there)

    @property
    def swept(self) -> list[str]:
        """The swept columns (seed included), in runs.csv order."""
        return [c for c in self.runs.columns if c not in RESULT_COLUMNS and not c.startswith(RESULT_PREFIXES)]

    def run_dir(self, run: str) -> Path:
        return self.root / "runs" / run

    def metrics(self, run: str) -> pd.DataFrame | None:
        """A run's metrics.csv, or None if it is not there; one cut short is a CorruptFileError naming it."""
        path = self.run_dir(run) / "metrics.csv"
        return read_csv(path) if path.exists() else None

    def fluctuation(self, run: str) -> pd.DataFrame | None:
        """A run's fluctuation.csv, or None; one cut short is a CorruptFileError naming it."""
        path = self.run_dir(run) / "fluctuation.csv"
        return read_csv(path) if path.exists() else None

    def summary(self, run: str) -> dict | None:
        """A run's summary.json, or None; one that is not valid JSON is a CorruptFileError naming it."""
        path = self.run_dir(run) / "summary.json"
        return read_json(path) if path.exists() else None

    def examples(self, run: str, metric: str) -> pd.Series | None:
        """`metric`'s per-example values at the run's final evaluation (see `final_examples`), read once."""
        return final_examples(self.run_dir(run), self.summary(run) or {}, metric, self._records)


def _loss(frame: pd.DataFrame) -> pd.Series:
    return frame["loss"] if "loss" in frame.columns else -frame["label_logprob"]


# summary metric -> (records file, its per-example values): the metric is their mean
EXAMPLE_METRICS = {
    "final_val_accuracy": ("val", lambda f: (f["prediction"] == f["label"]).astype(float)),
    "final_val_loss": ("val", _loss),
    "final_fact_recall": ("facts", lambda f: f["hit"].astype(float)),
}


def final_examples(run_dir: Path, summary: dict, metric: str, cache: dict | None = None) -> pd.Series | None:
    """`metric`'s per-example values at a run's final evaluation, from its records (eval/*.csv.gz): 1/0 per
    example for final_val_accuracy, the loss per example or sequence for final_val_loss[@cf<X>], 1/0 per query
    for final_fact_recall. Indexed by the example's id (and label), so that two runs pair on the examples both
    saw. None where the run has no such records or the metric is not a mean over examples (F1, perplexity)."""
    name, _, cf = metric.partition("@cf")
    if name not in EXAMPLE_METRICS or summary.get("status") != "completed" or summary.get("step") is None:
        return None
    file, value = EXAMPLE_METRICS[name]
    path = records_path(run_dir, file, int(summary["step"]), float(cf) if cf else None)
    cache = {} if cache is None else cache
    if path not in cache:
        cache[path] = pd.read_csv(path) if path.exists() else None
    frame = cache[path]
    if frame is None:
        return None
    keys = [c for c in ("example", "sequence", "query", "label") if c in frame.columns]
    return pd.Series(value(frame).to_numpy(dtype=float), index=pd.MultiIndex.from_frame(frame[keys]))


class ResultsError(ValueError):
    """A runs.csv that cannot be trusted: unreadable, without its key columns, or out of step with its runs."""


def load_study(results_root: Path, name: str) -> StudyResults | None:
    """The study's results, or None if it has no runs.csv yet; ResultsError if runs.csv disagrees with the
    run directories beside it (a cut, edited or stale file), naming the file and what is wrong."""
    root = Path(results_root) / name
    path = root / "runs.csv"
    if not path.exists():
        return None
    fix = f"`moe-lab sweep {name}` with the study's arguments rewrites it (finished runs are skipped)"
    try:
        runs = pd.read_csv(path, dtype={"pretrained_weights": str})  # hex digits, which may all be decimal
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ResultsError(f"{path} cannot be read as CSV ({str(err).strip().splitlines()[0]}); {fix}") from None
    missing = [c for c in ("run", "status") if c not in runs.columns]
    if missing:
        raise ResultsError(f"{path} has no column(s) {missing} (columns: {list(runs.columns)}); {fix}")
    if not path.read_bytes().endswith(b"\n"):
        raise ResultsError(f"{path} ends in the middle of a line (cut short, or written by a killed process); {fix}")
    study = StudyResults(name, root, runs)
    try:
        problem = _disagreement(study)
    except CorruptFileError as err:  # a run's own record: that run is to be run again, not the runs.csv rewritten
        run_dir = err.path.parent
        raise ResultsError(f"{err}; move {run_dir} aside and `moe-lab sweep {name}` runs that point again") from None
    if problem:
        raise ResultsError(f"{path} {problem}; {fix}")
    if problem := _mixed_bases(runs):
        raise ResultsError(
            f"{path} {problem}: a study compares its settings within a seed, so these runs do not pair; `moe-lab "
            f"sweep {name} --rerun` with the study's arguments trains them all from the weights on disk"
        )
    return study


def _mixed_bases(runs: pd.DataFrame) -> str | None:
    """Which runs of one seed (and one pretrained preset) were fine-tuned from different base models, by the
    weights each records (moe_lab.train.checkpoint.weights_fingerprint); None if none were. Runs recorded
    before fine-tuning named its weights, and runs from random initialisation, name none."""
    if "pretrained_weights" not in runs.columns:
        return None
    named = runs[runs["pretrained_weights"].notna()]
    keys = [k for k in ("seed", "finetune.pretrained") if k in named.columns]
    for key, group in named.groupby(keys, dropna=False) if keys else [((), named)]:
        builds = list(dict.fromkeys(group["pretrained_weights"]))
        if len(builds) > 1:
            where = ", ".join(f"{k}={v}" for k, v in zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
            firsts = [group[group["pretrained_weights"] == b]["run"].iloc[0] for b in builds]
            return (
                f"has runs at {where or 'its one seed'} fine-tuned from {len(builds)} different base models ("
                + "; ".join(f"{run!r}: weights {b}" for run, b in zip(firsts, builds, strict=True))
                + ")"
            )
    return None


def _disagreement(study: StudyResults) -> str | None:
    """How runs.csv differs from the run directories' summary.json files, or None if it agrees with them; a run's
    record that cannot be read (cut short, garbled) raises CorruptFileError naming it."""
    listed = [str(r) for r in study.runs["run"]]
    on_disk = {p.parent.name for p in (study.root / "runs").glob("*/summary.json")}
    repeated = sorted({r for r in listed if listed.count(r) > 1})
    if repeated:
        return f"lists run(s) {repeated} more than once"
    if set(listed) - on_disk:
        return f"lists run(s) with no summary.json under {study.root / 'runs'}: {sorted(set(listed) - on_disk)}"
    if on_disk - set(listed):
        unlisted = sorted(on_disk - set(listed))
        return f"has {len(listed)} rows but {study.root / 'runs'} has {len(on_disk)} runs (not listed: {unlisted})"
    for record in study.runs.to_dict("records"):
        for table in ("metrics.csv", "fluctuation.csv"):  # written whole by a run: a cut line was cut since
            if (study.run_dir(str(record["run"])) / table).exists():
                check_whole_lines(study.run_dir(str(record["run"])) / table)
        summary = study.summary(str(record["run"])) or {}
        for key, value in record.items():
            if key in summary and not isinstance(summary[key], (dict, list)) and not _same(value, summary[key]):
                return f"row {record['run']!r} has {key}={value!r} but its summary.json has {summary[key]!r}"
    return None


def _same(csv_value: object, json_value: object) -> bool:
    missing = csv_value is None or (isinstance(csv_value, float) and math.isnan(csv_value))
    if json_value is None or missing:
        return missing and (json_value is None or (isinstance(json_value, float) and math.isnan(json_value)))
    if isinstance(json_value, (int, float)) and not isinstance(json_value, bool):
        try:
            return math.isclose(float(csv_value), float(json_value), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    return str(csv_value) == str(json_value)


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
        row["failed"] = int((~group["status"].isin(FINISHED)).sum())
        for metric in metrics:
            values = done[metric].dropna() if metric in done.columns else pd.Series(dtype=float)
            row[metric] = float(values.mean()) if len(values) else math.nan
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
            row[f"{metric}_n"] = len(values)
        rows.append(row)
    return pd.DataFrame(rows)
