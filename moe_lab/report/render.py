"""Rendering study reports: Markdown, one self-contained HTML file, CSV, and a rich terminal summary."""

from __future__ import annotations

import base64
import html
import os
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from moe_lab.io import atomic_write
from moe_lab.report.mainjob import MainJob
from moe_lab.report.studies import StudyReport

VERDICT_COLOURS = {"yes": "green", "partly": "yellow", "inconclusive": "yellow", "no": "red", "no data": "dim"}


def summary_frame(reports: list[StudyReport]) -> pd.DataFrame:
    """One row per study: the paper's finding, ours, and whether it reproduced."""
    return pd.DataFrame([
        {
            "study": r.name,
            "paper": r.reference.source,
            "paper's finding": r.reference.finding,
            "ours": r.verdict.ours,
            "reproduced": r.verdict.reproduced,
            "checked": r.verdict.checked,
        }
        for r in reports
    ])  # fmt: skip


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped)."""
    if frame.empty:
        return "_no rows_\n"
    cells = [[str(c).replace("|", "\\|") for c in frame.columns]]
    cells += [[str(v).replace("|", "\\|").replace("\n", " ") for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
    return "\n".join(lines) + "\n"


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


MAIN_JOB = "Main job: sparse vs dense"


def render_markdown(
    reports: list[StudyReport], figures: dict[str, list[Path]], out: Path, source: str, main: MainJob | None = None
) -> Path:
    """report.md: the summary table, the main job's sparse vs dense (when recorded), then one section per study
    with its table, verdict and figures."""
    parts = [
        "# moe-lab report\n",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from `{source}` by `moe-lab report`.\n",
        "## Summary\n",
        markdown_table(summary_frame(reports)[["study", "paper's finding", "ours", "reproduced"]]),
    ]
    if main is not None:
        parts += [f"\n## {MAIN_JOB}\n", f"_Rule:_ {main.rule}.\n", markdown_table(main.table)]
    for r in reports:
        parts += [
            f"\n## {r.name}\n",
            f"**Paper** ({r.reference.source}): {r.reference.finding}.\n",
            f"**Reproduced: {r.verdict.reproduced}.** {r.verdict.ours}.\n",
            f"_Checked:_ {r.verdict.checked}.\n",
            markdown_table(r.table),
        ]
        if r.reference.note:
            parts.append(f"\n_Paper note:_ {r.reference.note}\n")
        parts += [f"\n- {note}" for note in r.notes]
        parts += [f"\n![{p.stem}]({_relative(p, out)})\n" for p in figures.get(r.name, [])]
    path = out / "report.md"
    with atomic_write(path, suffix=".md") as tmp:
        tmp.write_text("\n".join(parts))
    return path


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f3f3f3; }
.yes { color: #1a7f37; font-weight: bold; } .no { color: #c0392b; font-weight: bold; }
.partly, .inconclusive { color: #b7791f; font-weight: bold; } .no-data { color: #888; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
"""


def _img(path: Path, out: Path) -> str:
    """The figure inlined as a data URI (the file stands alone); data-source names the PNG beside it."""
    data = base64.b64encode(path.read_bytes()).decode()
    src = html.escape(_relative(path, out))
    return f'<img alt="{html.escape(path.stem)}" data-source="{src}" src="data:image/png;base64,{data}">'


def render_html(
    reports: list[StudyReport], figures: dict[str, list[Path]], out: Path, source: str, main: MainJob | None = None
) -> Path:
    """report.html: everything in one file, figures inlined."""
    esc = html.escape
    summary = summary_frame(reports)[["study", "paper's finding", "ours", "reproduced"]]
    body = [
        "<h1>moe-lab report</h1>",
        f"<p>Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from <code>{esc(source)}</code>.</p>",
        "<h2>Summary</h2>",
        summary.to_html(index=False, escape=True, border=0),
    ]
    if main is not None:
        body += [
            f"<h2>{MAIN_JOB}</h2>",
            f"<p><i>Rule:</i> {esc(main.rule)}.</p>",
            main.table.to_html(index=False, escape=True, border=0),
        ]
    for r in reports:
        css = r.verdict.reproduced.replace(" ", "-")
        body += [
            f'<h2 id="{esc(r.name)}">{esc(r.name)}</h2>',
            f"<p><b>Paper</b> ({esc(r.reference.source)}): {esc(r.reference.finding)}.</p>",
            f'<p><span class="{css}">Reproduced: {esc(r.verdict.reproduced)}.</span> {esc(r.verdict.ours)}.</p>',
            f"<p><i>Checked:</i> {esc(r.verdict.checked)}.</p>",
            r.table.to_html(index=False, escape=True, border=0) if not r.table.empty else "<p><i>no rows</i></p>",
        ]
        if r.reference.note:
            body.append(f"<p><i>Paper note:</i> {esc(r.reference.note)}</p>")
        if r.notes:
            body.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in r.notes) + "</ul>")
        body += [_img(p, out) for p in figures.get(r.name, [])]
    document = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>moe-lab report</title>\n'
        f"<style>{_STYLE}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )
    path = out / "report.html"
    with atomic_write(path, suffix=".html") as tmp:
        tmp.write_text(document)
    return path


def render_csv(reports: list[StudyReport], out: Path) -> list[Path]:
    """report.csv (the summary) and one <study>.csv per study with its aggregated numbers."""
    paths = [out / "report.csv"]
    with atomic_write(paths[0], suffix=".csv") as tmp:
        summary_frame(reports).to_csv(tmp, index=False)
    for r in reports:
        frame = r.data if r.data is not None else r.table
        if frame.empty:
            continue
        path = out / "tables" / f"{r.name}.csv"
        with atomic_write(path, suffix=".csv") as tmp:
            frame.to_csv(tmp, index=False)
        paths.append(path)
    return paths


def print_summary(console: Console, reports: list[StudyReport]) -> None:
    """The terminal view: one line per study."""
    table = Table(title="moe-lab report: does the paper's finding hold here?")
    for col in ("study", "reproduced", "ours"):
        table.add_column(col, overflow="fold")
    for r in reports:
        colour = VERDICT_COLOURS.get(r.verdict.reproduced, "white")
        table.add_row(r.name, f"[{colour}]{r.verdict.reproduced}[/{colour}]", r.verdict.ours)
    console.print(table)
