"""What the pretraining studies' builders share (moe_lab.report.studies): losses in nats, estimated per setting."""

from __future__ import annotations

from moe_lab.report.results import StudyResults
from moe_lab.report.stats import by_value, estimates

NATS = "nats"


def loss_estimates(study: StudyResults, by: list[str], metric: str = "final_val_loss") -> dict:
    """Estimates (with the runs' per-example values) keyed by the single swept value when `by` has one column."""
    return by_value(estimates(study.runs, by, metric, study.examples))
