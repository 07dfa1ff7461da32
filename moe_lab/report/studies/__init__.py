"""One builder per study, found from its name: a study is its file experiments/NAME.yaml plus the module
moe_lab.report.studies.NAME (with '-' as '_'), which holds `build(study) -> StudyReport` (results -> a table shaped
like the paper's and a verdict computed from the numbers) and `FIGURES`, the figures it draws. Nothing lists them."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from types import ModuleType

import pandas as pd

from moe_lab.report.reference import reference
from moe_lab.report.results import StudyResults, completed
from moe_lab.report.spec import StudySpecError, experiments_dir, study_spec
from moe_lab.report.verdict import StudyReport, Verdict, cell_text, no_data

__all__ = ["StudyReport", "Verdict", "build", "figures", "names"]


def module_name(name: str) -> str:
    """The module of study `name`'s builder: moe_lab.report.studies.top_k for top-k."""
    return f"{__name__}.{name.replace('-', '_')}"


def has_builder(name: str) -> bool:
    """Whether study `name` has a builder module (finetune-tasks, reported in its own section, has none)."""
    return importlib.util.find_spec(module_name(name)) is not None


def names() -> list[str]:
    """The studies the report covers: every study file with a builder, in its `study.order` (then by name)."""
    found = [p.stem for p in sorted(experiments_dir().glob("*.yaml")) if has_builder(p.stem)]

    def place(name: str) -> tuple[float, str]:
        try:
            order = study_spec(name).order
        except StudySpecError:
            order = None
        return (float("inf") if order is None else order, name)

    return sorted(found, key=place)


def _module(name: str) -> ModuleType:
    if not has_builder(name):
        raise ValueError(f"no report for study {name!r}: no module {module_name(name)}; known: {sorted(names())}")
    return importlib.import_module(module_name(name))


def figures(name: str) -> list[Callable]:
    """The figure functions study `name` declares (its module's FIGURES)."""
    return list(getattr(_module(name), "FIGURES", []))


def build(name: str, study: StudyResults | None) -> StudyReport:
    """The report of one study; a missing study or one whose builder cannot read it is 'no data', not an error."""
    builder = _module(name).build
    if study is None or study.runs.empty:
        return no_data(name)
    if completed(study.runs).empty:  # every run diverged or failed: list them
        columns = [*study.swept, "status", *(["diverged_at_step"] if "diverged_at_step" in study.runs else [])]
        table = study.runs[columns].map(cell_text)
        return StudyReport(name, reference(name), table, Verdict("no data", "-", "no run completed"))
    try:
        return builder(study)
    except StudySpecError as err:  # the study file lacks a margin: the claim cannot be judged
        return StudyReport(name, reference(name), pd.DataFrame(), Verdict("no data", "-", str(err)))
    except KeyError as err:  # runs.csv without a column the study's table needs (an older or edited sweep)
        why = (
            f"{study.root / 'runs.csv'} has no column {err}, which the study's table needs (columns: "
            f"{list(study.runs.columns)}); `moe-lab sweep {name}` with the study's arguments rewrites it"
        )
        return StudyReport(name, reference(name), pd.DataFrame(), Verdict("no data", "-", why), problem=why)
