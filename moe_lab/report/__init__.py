"""`moe-lab report`: results/ -> the papers' tables with our numbers beside them, verdicts, plots."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.console import Console

from moe_lab.io import CorruptFileError
from moe_lab.report.mainjob import sparse_vs_dense
from moe_lab.report.plots import claims_figure
from moe_lab.report.reference import reference
from moe_lab.report.render import Document, print_summary, render_csv, render_html, render_markdown
from moe_lab.report.results import ResultsError, StudyResults, load_study
from moe_lab.report.studies import StudyReport, Verdict, build, figures
from moe_lab.report.studies import names as study_names
from moe_lab.report.tasks import TasksCheck, check_tasks

FORMATS = ("md", "html", "csv")


def make_report(
    results_root: Path,
    studies: list[str] | None = None,
    formats: tuple[str, ...] = ("md", "html"),
    out: Path | None = None,
    console: Console | None = None,
) -> tuple[list[StudyReport], list[Path]]:
    """Build every requested study's report from results_root and write the formats to out (default results_root)."""
    console = console or Console()
    known = study_names()
    unknown = sorted(set(studies or []) - set(known))
    if unknown:
        raise ValueError(f"unknown study(ies) {unknown}; known: {known}")
    bad = sorted(set(formats) - set(FORMATS))
    if bad:
        raise ValueError(f"unknown format(s) {bad}; valid: {list(FORMATS)}")
    results_root = Path(results_root)
    if not results_root.is_dir():
        raise FileNotFoundError(f"results directory {results_root} does not exist")
    names = studies or known
    main = sparse_vs_dense(results_root) if studies is None else None
    if main is None and not any((results_root / name / "runs.csv").is_file() for name in names):
        raise FileNotFoundError(
            f"results directory {results_root} holds no study results (no <study>/runs.csv for "
            f"{', '.join(names) if studies else 'any study'}): run `moe-lab sweep STUDY` first, or point --results "
            "(or $MOE_LAB_RESULTS) at the directory the sweeps wrote"
        )
    out = Path(out or results_root)
    reports, figures = [], {}
    for name in names:
        study, report = _study_report(results_root, name)
        reports.append(report)
        figures[name] = _figures(study, report, out / "plots") if {"md", "html"} & set(formats) else []
    written: list[Path] = []
    tasks = _tasks_check(results_root) if studies is None else None
    claims = claims_figure(reports, out / "plots") if {"md", "html"} & set(formats) else None
    document = Document(reports, figures, out, str(results_root), main, claims, tasks)
    if "md" in formats:
        written.append(render_markdown(document))
    if "html" in formats:
        written.append(render_html(document))
    if "csv" in formats:
        written += render_csv(reports, out)
    print_summary(console, reports)
    return reports, written


def _study_report(results_root: Path, name: str) -> tuple[StudyResults | None, StudyReport]:
    """A study's results and report. Results that cannot be read (a broken runs.csv, a run's record cut short)
    make its report "no data" with the problem named: the other studies are still reported, and the CLI exits 2
    after writing."""
    try:
        study = load_study(results_root, name)
        return study, build(name, study)
    except (ResultsError, CorruptFileError) as err:
        verdict = Verdict("no data", "-", str(err))
        return None, StudyReport(name, reference(name), pd.DataFrame(), verdict, problem=str(err))


def _figures(study: StudyResults | None, report: StudyReport, out: Path) -> list[Path]:
    """The study's figures; a run's record that cannot be read leaves them out and names it as the problem."""
    if study is None:
        return []
    try:  # every figure of the study's module (its FIGURES) that its results can support
        paths = [figure(study, report, out) for figure in figures(report.name)]
        return [p for p in paths if p is not None]
    except CorruptFileError as err:
        report.problem = str(err)
        return []


def _tasks_check(results_root: Path) -> TasksCheck | None:
    """The "Fine-tuning tasks" section from the overfit study and the finetune-tasks sweep, where recorded."""
    try:
        return check_tasks(load_study(results_root, "overfit"), load_study(results_root, "finetune-tasks"))
    except (ResultsError, CorruptFileError):  # the overfit study reports its own problem
        return None


__all__ = ["FORMATS", "make_report"]
