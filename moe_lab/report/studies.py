"""One builder per study: results -> a table shaped like the paper's, and a verdict computed from the numbers."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from moe_lab.report.finetuning import aux_loss_finetune, finetune_grid, freeze, overfit, token_drop
from moe_lab.report.pretraining import capacity_factor, router_fluctuation, stablemoe, top_k, z_loss_stability
from moe_lab.report.reference import REFERENCES
from moe_lab.report.results import StudyResults, completed
from moe_lab.report.spec import StudySpecError
from moe_lab.report.verdict import StudyReport, Verdict, cell_text, no_data

__all__ = ["BUILDERS", "StudyReport", "Verdict", "build"]

BUILDERS: dict[str, Callable[[StudyResults], StudyReport]] = {
    "z-loss-stability": z_loss_stability,
    "capacity-factor": capacity_factor,
    "top-k": top_k,
    "finetune-grid": finetune_grid,
    "freeze": freeze,
    "token-drop": token_drop,
    "aux-loss-finetune": aux_loss_finetune,
    "overfit": overfit,
    "router-fluctuation": router_fluctuation,
    "stablemoe": stablemoe,
}


def build(name: str, study: StudyResults | None) -> StudyReport:
    """The report of one study; a missing study or one whose builder cannot read it is 'no data', not an error."""
    if name not in BUILDERS:
        raise ValueError(f"no report for study {name!r}; known: {sorted(BUILDERS)}")
    if study is None or study.runs.empty:
        return no_data(name)
    if completed(study.runs).empty:  # every run diverged or failed: list them
        columns = [*study.swept, "status", *(["diverged_at_step"] if "diverged_at_step" in study.runs else [])]
        table = study.runs[columns].map(cell_text)
        return StudyReport(name, REFERENCES[name], table, Verdict("no data", "-", "no run completed"))
    try:
        return BUILDERS[name](study)
    except StudySpecError as err:  # the study file lacks a margin: the claim cannot be judged
        return StudyReport(name, REFERENCES[name], pd.DataFrame(), Verdict("no data", "-", str(err)))
    except KeyError as err:  # runs.csv without a column the study's table needs (an older or edited sweep)
        why = (
            f"{study.root / 'runs.csv'} has no column {err}, which the study's table needs (columns: "
            f"{list(study.runs.columns)}); `moe-lab sweep {name}` with the study's arguments rewrites it"
        )
        return StudyReport(name, REFERENCES[name], pd.DataFrame(), Verdict("no data", "-", why), problem=why)
