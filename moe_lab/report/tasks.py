"""The report's "Fine-tuning tasks" section: do the fine-tuning studies' tasks measure what pretraining learned?

It reads the `overfit` study (the main job's pretrained models on the small and the large polarity task) and the
`finetune-tasks` sweep (the same architectures fine-tuned on the small task from random initialisation) and checks
the tasks' acceptance, each over the seeds both ran:
- on the small task a pretrained model beats its architecture from random initialisation by at least 10 points
  (paired by seed and by validation example);
- on the small task the pretrained models sit between 60% and 90%, so overfitting has room to show;
- on the large task both pretrained models reach 85%;
- every pretrained run's last two evaluations agree within a point, so its final evaluation is a stable one (the
  random-initialisation runs, near chance, are shown beside them without a bar).
A bar is met when the mean over seeds clears it; the 95% interval beside it shows how firmly.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from moe_lab.report import stats
from moe_lab.report.results import StudyResults, completed

TASKS = "Fine-tuning tasks"
ACC = "final_val_accuracy"
MODELS = {"small": "sparse", "dense-small": "dense"}
TRANSFER, SMALL_RANGE, LARGE_FLOOR, STABLE = 0.10, (0.60, 0.90), 0.85, 0.01


@dataclass(frozen=True)
class TasksCheck:
    table: pd.DataFrame
    rule: str


def _interval(d: stats.Difference) -> str:
    if not d.decidable:
        return "-"
    lo, hi = d.interval(stats.DIRECTION_LEVEL)
    return f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def last_eval_change(study: StudyResults, run: str) -> float | None:
    """|last - previous| validation accuracy of a run's evaluations, or None with fewer than two."""
    metrics = study.metrics(run)
    if metrics is None or "val_accuracy" not in metrics:
        return None
    evals = metrics["val_accuracy"].dropna()
    return abs(float(evals.iloc[-1]) - float(evals.iloc[-2])) if len(evals) >= 2 else None


def _changes(study: StudyResults | None) -> list[tuple[float, str]]:
    """(|last - previous| evaluation, the run) of each completed run of `study` with two evaluations."""
    if study is None or study.runs.empty:
        return []
    found = ((last_eval_change(study, run), run) for run in completed(study.runs)["run"])
    return [(change, run) for change, run in found if change is not None]


def _tasks(runs: pd.DataFrame) -> tuple[str | None, str | None]:
    names = sorted(set(runs["task"])) if "task" in runs else []
    small = next((t for t in names if "small" in t), None)
    large = next((t for t in names if "large" in t), None)
    return small, large


def _row(check: str, measured: str, interval: str, bar: str, met: bool | None) -> dict:
    verdict = "-" if met is None else ("**met**" if met else "**missed**")
    return {"check": check, "measured": measured, "95% interval": interval, "bar": bar, "met": verdict}


def check_tasks(pretrained: StudyResults | None, scratch: StudyResults | None) -> TasksCheck | None:
    """The section's table, or None when the overfit study has no completed run on a polarity task."""
    if pretrained is None or pretrained.runs.empty or "task" not in pretrained.runs:
        return None
    runs = completed(pretrained.runs)
    small, large = _tasks(runs)
    if small is None or not str(small).startswith("polarity"):
        return None
    found = stats.estimates(runs, ["finetune.pretrained", "task"], ACC, pretrained.examples)
    rows = []
    for preset, model in MODELS.items():
        est = found.get((preset, small), stats.Estimate())
        if scratch is not None and not scratch.runs.empty:
            cold = stats.estimates(completed(scratch.runs), ["finetune.pretrained"], ACC, scratch.examples)
            # over the seeds both ran: the fine-tuning studies may run seeds the random-init sweep does not
            mine, base = stats.on_common_seeds(est, cold.get((preset,), stats.Estimate()))
            d = stats.difference(mine, base)
            met = None if d.n == 0 else d.value >= TRANSFER
            rows.append(_row(
                f"{small}, {model}: pretrained - random init", f"{d.text(1, 100)} points "
                f"({100 * mine.mean:.1f}% against {100 * base.mean:.1f}%)", _interval(d), "≥ +10 points", met,
            ))  # fmt: skip
        d = stats.mean_of(est)
        met = None if est.n == 0 else SMALL_RANGE[0] <= est.mean <= SMALL_RANGE[1]
        rows.append(_row(f"{small}, {model} pretrained", f"{est.text(1, 100)} %", _interval(d), "60-90%", met))
    for preset, model in MODELS.items():
        if large is None:
            break
        est = found.get((preset, large), stats.Estimate())
        met = None if est.n == 0 else est.mean >= LARGE_FLOOR
        rows.append(_row(f"{large}, {model} pretrained", f"{est.text(1, 100)} %", _interval(stats.mean_of(est)),
                         "≥ 85%", met))  # fmt: skip
    for study, what, bar in ((pretrained, "the studies' runs", True), (scratch, "random initialisation", False)):
        changes = _changes(study)
        if changes:
            worst, where = max(changes)
            within = sum(c <= STABLE for c, _ in changes)
            rows.append(_row(
                f"last two evaluations, {what}", f"{within} of {len(changes)} runs within a point; largest change "
                f"{100 * worst:.1f} points ({where})", "-", "≤ 1 point" if bar else "- (a model near chance)",
                within == len(changes) if bar else None,
            ))  # fmt: skip
    rule = (
        "the `overfit` study's runs (pretrained) and the `finetune-tasks` sweep's (random initialisation) on the "
        "polarity tasks; a bar is met when the mean over seeds clears it; pretrained - random init is paired by "
        "seed and validation example, its 95% Student's t interval beside it"
    )
    return TasksCheck(pd.DataFrame(rows), rule)
