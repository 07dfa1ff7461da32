"""What the fine-tuning studies' builders share (moe_lab.report.studies): the task's metric, its estimates, parts.

Each study is judged on its task's own metric (`task.metric`: accuracy, or macro-F1 for CB), over its seeds: each
setting's fine-tunings are compared paired by seed, and by validation example where the runs recorded them, against
the noise pooled over the study's grid of settings x seeds.
"""

from __future__ import annotations

from moe_lab.report.results import StudyResults
from moe_lab.report.spec import margins
from moe_lab.report.stats import by_value, estimates
from moe_lab.report.verdict import Part

ACC = "final_val_accuracy"
METRIC_COLUMNS = {"accuracy": "final_val_accuracy", "f1_macro": "final_val_f1"}


def judged_on(study: StudyResults) -> str:
    """What the study's parts are judged on: 'judged on validation accuracy (5000 examples)'."""
    n = validation_examples(study)
    return f"judged on validation {task_metric(study)}" + (f" ({n} examples)" if n else "")


def task_metric(study: StudyResults) -> str:
    """The metric the study's task is judged on, from its runs' summary.json (accuracy if unknown)."""
    for run in study.runs["run"]:
        summary = study.summary(run) or {}
        if summary.get("metric") in METRIC_COLUMNS:
            return summary["metric"]
    return "accuracy"


def validation_examples(study: StudyResults) -> int | None:
    """The task's validation size: recorded in summary.json, else the synthetic task's configured size."""
    for run in study.runs["run"]:
        summary = study.summary(run) or {}
        if summary.get("val_examples"):
            return int(summary["val_examples"])
        task = summary.get("config", {}).get("task", {})
        if task.get("source") in ("synthetic", "facts"):
            return int(task.get("synthetic_val", 1000))
    return None


def metric_estimates(study: StudyResults, by: list[str], metric: str | None = None) -> dict:
    """Estimates of the task's metric (or `metric`) per group, with the runs' per-example values, keyed by the
    value when `by` is one column."""
    column = metric or METRIC_COLUMNS[task_metric(study)]
    return by_value(estimates(study.runs, by, column, study.examples))


def metric_part(study: StudyResults, name: str, claim: str, d, rule: str, expected: str = ">", part: str = "accuracy"):
    """A part judged on the task's metric, shown in points, with the study's margin `part`."""
    unit = "points" if task_metric(study) == "accuracy" else f"points of {task_metric(study)}"
    return Part(name, claim, d, rule, margins(study.name)[part], expected, unit=unit, scale=100)


def cells(est: dict, keys) -> list[str]:
    """Each key's estimate as text, '-' where there is none."""
    return [est[k].text() if k in est else "-" for k in keys]


def model_label(value: str) -> str:
    """'dense' or 'sparse' from a pretraining preset's name."""
    return "dense" if str(value).startswith("dense") else "sparse"


def with_model(study: StudyResults) -> StudyResults:
    """The study with a `model` column (dense or sparse) beside its runs' pretrained preset."""
    runs = study.runs.copy()
    runs["model"] = runs["finetune.pretrained"].map(model_label)
    return StudyResults(study.name, study.root, runs)
