"""Rendering study reports: Markdown, one self-contained HTML file, CSV, and a rich terminal summary."""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from moe_lab.io import atomic_write
from moe_lab.report.mainjob import MainJob
from moe_lab.report.studies import StudyReport
from moe_lab.report.tasks import TASKS, TasksCheck
from moe_lab.report.verdict import RULE_TEXT, parts_table

VERDICT_COLOURS = {"yes": "green", "partly": "yellow", "inconclusive": "yellow", "no": "red", "no data": "dim"}


def reproduced_cell(report: StudyReport) -> str:
    """'**partly** (parts: yes, no)': the verdict in bold and, for a claim of several parts, each part's."""
    parts = report.verdict.parts
    cell = f"**{report.verdict.reproduced}**"
    return cell + (f" (parts: {', '.join(p.verdict for p in parts)})" if len(parts) > 1 else "")


def summary_frame(reports: list[StudyReport]) -> pd.DataFrame:
    """One row per study: the paper's finding, ours, whether it reproduced and its parts' verdicts."""
    return pd.DataFrame([
        {
            "study": r.name,
            "paper": r.reference.source,
            "paper's finding": r.reference.finding,
            "ours": r.verdict.ours,
            "reproduced": r.verdict.reproduced,
            "parts": ", ".join(p.verdict for p in r.verdict.parts),
            "checked": r.verdict.checked,
        }
        for r in reports
    ])  # fmt: skip


SUMMARY_COLUMNS = ["study", "paper's finding", "ours", "reproduced"]


def summary_display(reports: list[StudyReport]) -> pd.DataFrame:
    """The summary's columns as report.md and report.html show them, the study's name as code."""
    frame = summary_frame(reports)[SUMMARY_COLUMNS]
    return frame.assign(study=[f"`{r.name}`" for r in reports], reproduced=[reproduced_cell(r) for r in reports])


def summary_table(reports: list[StudyReport]) -> str:
    """The summary as report.md writes it (the README's studies table is this, row for row)."""
    return markdown_table(summary_display(reports))


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
HOW = "How verdicts are made"
CLAIMS_FIGURE = "claims"  # plots/claims.png: every claim's effect against its margin


@dataclass(frozen=True)
class Document:
    """What report.md and report.html show: the studies' reports and figures, the main job's table (when
    recorded) and the picture of every claim, written to `out` from results at `source`."""

    reports: list[StudyReport]
    figures: dict[str, list[Path]]
    out: Path
    source: str
    main: MainJob | None = None
    claims: Path | None = None
    tasks: TasksCheck | None = None


def render_markdown(doc: Document) -> Path:
    """report.md: the picture of every claim, the summary table, how verdicts are made, the main job's sparse vs
    dense (when recorded), then one section per study with its claims, table, verdict and figures."""
    reports, figures, out, source, main, claims = (
        doc.reports, doc.figures, doc.out, doc.source, doc.main, doc.claims
    )  # fmt: skip
    parts = [
        "# moe-lab report\n",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from `{source}` by `moe-lab report`.\n",
    ]
    if claims is not None:
        parts.append(f"![{CLAIMS_FIGURE}]({_relative(claims, out)})\n")
    parts += ["## Summary\n", summary_table(reports), f"\n## {HOW}\n", f"{RULE_TEXT[0].upper()}{RULE_TEXT[1:]}.\n"]
    if main is not None:
        parts += [f"\n## {MAIN_JOB}\n", f"_Rule:_ {main.rule}.\n", markdown_table(main.table)]
    if doc.tasks is not None:
        parts += [f"\n## {TASKS}\n", f"_Rule:_ {doc.tasks.rule}.\n", markdown_table(doc.tasks.table)]
    for r in reports:
        parts += [
            f"\n## {r.name}\n",
            f"**Paper** ({r.reference.source}): {r.reference.finding}.\n",
            f"**Reproduced: {r.verdict.reproduced}.** {r.verdict.ours}.\n",
            f"_Checked:_ {r.verdict.checked}.\n",
        ]
        if r.verdict.parts:
            parts += [markdown_table(parts_table(r.verdict.parts)), ""]
        parts.append(markdown_table(r.table))
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


_BOLD, _CODE = re.compile(r"\*\*(.+?)\*\*"), re.compile(r"`([^`]+)`")


def inline_markdown(text: str) -> str:
    """A cell's text as HTML: escaped, with its **bold** and `code` rendered."""
    escaped = html.escape(str(text))
    return _CODE.sub(r"<code>\1</code>", _BOLD.sub(r"<b>\1</b>", escaped))


def html_table(frame: pd.DataFrame) -> str:
    """A table whose header and cells render their inline Markdown."""
    if frame.empty:
        return "<p><i>no rows</i></p>"
    head = "".join(f"<th>{inline_markdown(c)}</th>" for c in frame.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{inline_markdown(v)}</td>" for v in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def render_html(doc: Document) -> Path:
    """report.html: everything in one file, figures inlined, the picture of every claim first."""
    reports, figures, out, source, main, claims = (
        doc.reports, doc.figures, doc.out, doc.source, doc.main, doc.claims
    )  # fmt: skip
    esc = html.escape
    body = [
        "<h1>moe-lab report</h1>",
        f"<p>Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from <code>{esc(source)}</code>.</p>",
        *([_img(claims, out)] if claims is not None else []),
        "<h2>Summary</h2>",
        html_table(summary_display(reports)),
        f"<h2>{HOW}</h2>",
        f"<p>{esc(RULE_TEXT[0].upper() + RULE_TEXT[1:])}.</p>",
    ]
    if main is not None:
        body += [f"<h2>{MAIN_JOB}</h2>", f"<p><i>Rule:</i> {esc(main.rule)}.</p>", html_table(main.table)]
    if doc.tasks is not None:
        body += [f"<h2>{TASKS}</h2>", f"<p><i>Rule:</i> {inline_markdown(doc.tasks.rule)}.</p>"]
        body.append(html_table(doc.tasks.table))
    for r in reports:
        css = r.verdict.reproduced.replace(" ", "-")
        body += [
            f'<h2 id="{esc(r.name)}">{esc(r.name)}</h2>',
            f"<p><b>Paper</b> ({esc(r.reference.source)}): {esc(r.reference.finding)}.</p>",
            f'<p><span class="{css}">Reproduced: {esc(r.verdict.reproduced)}.</span> {esc(r.verdict.ours)}.</p>',
            f"<p><i>Checked:</i> {esc(r.verdict.checked)}.</p>",
        ]
        if r.verdict.parts:
            body.append(html_table(parts_table(r.verdict.parts)))
        body.append(html_table(r.table))
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
    claims = claims_frame(reports)
    if not claims.empty:
        paths.append(out / "claims.csv")
        with atomic_write(paths[-1], suffix=".csv") as tmp:
            claims.to_csv(tmp, index=False)
    return paths


def claims_frame(reports: list[StudyReport]) -> pd.DataFrame:
    """Every part of every claim, as numbers: the difference, its standard error, degrees of freedom, intervals,
    margin, rule and verdict (claims.csv)."""
    rows = []
    for r in reports:
        for p in r.verdict.parts:
            d = p.difference
            (lo95, hi95), (lo90, hi90) = d.interval(0.95), d.interval(0.90)
            rows.append({
                "study": r.name, "part": p.name, "claim": p.claim, "rule": p.rule, "necessary": p.necessary,
                "difference": d.value, "se": d.se, "df": d.df, "seeds": d.n, "method": d.method,
                "validation_se": d.eval_se, "ci95_low": lo95, "ci95_high": hi95, "ci90_low": lo90,
                "ci90_high": hi90, "margin": p.margin, "unit": p.unit, "scale": p.scale, "verdict": p.verdict,
                "reason": p.reason,
            })  # fmt: skip
    return pd.DataFrame(rows)


def print_summary(console: Console, reports: list[StudyReport]) -> None:
    """The terminal view: one line per study."""
    table = Table(title="moe-lab report: does the paper's finding hold here?")
    for col in ("study", "reproduced", "ours"):
        table.add_column(col, overflow="fold")
    for r in reports:
        colour = VERDICT_COLOURS.get(r.verdict.reproduced, "white")
        table.add_row(r.name, f"[{colour}]{r.verdict.reproduced}[/{colour}]", r.verdict.ours)
    console.print(table)
