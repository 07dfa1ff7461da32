"""The committed report agrees with the committed results/ it was made from, and the README with the report."""

from __future__ import annotations

import json
import re
import shutil
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moe_lab.cli import app

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
README = ROOT / "README.md"

# report.md's one line that changes from run to run: when it was made and from which directory
GENERATED = re.compile(r"^Generated \d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC from `[^`\n]*` by `moe-lab report`\.$", re.M)


def _normalised(report_md: str) -> str:
    """report.md with its generation line (timestamp and results path) replaced by a placeholder."""
    assert len(GENERATED.findall(report_md)) == 1, "report.md should have exactly one 'Generated ...' line"
    return GENERATED.sub("Generated <when> from <results>.", report_md)


def test_committed_report_is_what_the_committed_results_give(tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)  # the report writes report.md and plots/ beside the results it reads
    outcome = CliRunner().invoke(app, ["report", "--format", "md", "--results", str(results)])
    assert outcome.exit_code == 0, outcome.output
    assert f"wrote {results / 'report.md'}" in " ".join(outcome.output.split())
    regenerated = (results / "report.md").read_text()
    assert _normalised(regenerated) == _normalised((RESULTS / "report.md").read_text())


# --- the README's numbers -------------------------------------------------------------------------------------------

# a number as the README and the report write it: 3/3, 0.670, +0.028, -0.010, 44.2%, 44%; plain integers are left
# out (they are seeds, steps, table numbers and settings in prose, not results)
NUMBER = re.compile(r"(?<![\w.])[+-]?(?:\d+/\d+|\d+\.\d+%?|\d+%)(?![\w.]?\d)")
# "94 / 82 / 44%": a list of percentages with the sign only on the last
PERCENT_LIST = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?: / \d+(?:\.\d+)?)+%")


def numbers(text: str) -> list[str]:
    """The numbers in text, as written; each member of an 'a / b / c%' list as a percentage."""
    found = []
    for part in re.split(f"({PERCENT_LIST.pattern})", text):
        if PERCENT_LIST.fullmatch(part):
            found += [f"{n.rstrip('%')}%" for n in part.split(" / ")]
        else:
            found += NUMBER.findall(part)
    return found


def _value(number: str) -> tuple[bool, Decimal, int]:
    """(a percentage?, the value, digits after the point)."""
    percent = number.endswith("%")
    value = Decimal(number.rstrip("%"))
    return percent, value, -value.as_tuple().exponent


def appears_in(number: str, report_numbers: set[str]) -> bool:
    """Whether the report has the number: as written (3/3) or, for a value, one it rounds to (44% for 44.2%)."""
    if "/" in number:
        return number in report_numbers
    percent, value, digits = _value(number)
    half_unit = Decimal(5) / 10 ** (digits + 1)
    for other in report_numbers:
        if "/" in other:
            continue
        other_percent, other_value, other_digits = _value(other)
        if other_percent == percent and other_digits >= digits and abs(other_value - value) <= half_unit:
            return True
    return False


def readme_studies_table(readme: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the README's table of studies (the one with a 'reproduced?' column)."""
    lines = readme.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| study") and "reproduced?" in line)
    header = [cell.strip() for cell in lines[start].strip().strip("|").split(" | ")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    assert all(len(row) == len(header) for row in rows), "a README table row has a '|' inside a cell"
    return header, rows


def missing_from_report(readme: str, report_md: str) -> list[str]:
    """'study (column): number' for every number in the README's ours / reproduced? cells the report lacks."""
    header, rows = readme_studies_table(readme)
    report_numbers = set(numbers(report_md))
    missing = []
    for row in rows:
        study = row[0].split("`")[1]
        for column in ("ours", "reproduced?"):
            cell = row[header.index(column)]
            missing += [f"{study} ({column}): {n}" for n in numbers(cell) if not appears_in(n, report_numbers)]
    return missing


def test_readme_results_table_numbers_are_in_the_report() -> None:
    """Every number in the README's studies table's "ours" and "reproduced?" cells is in results/report.md, as
    written or rounded from a longer one there (the README's 44% for the report's 44.2%, 6.51 for 6.510).

    The first column (the study's command, settings, seeds and paper table) and "paper's finding" (the papers'
    numbers, from moe_lab/report/reference.py) are not checked, nor is the sparse-vs-dense table above it (one
    `moe-lab pretrain` run under results/pretrain/, which the report does not cover). Plain integers are
    skipped: in these cells they are seeds, steps and settings ("1 seed", "bs 32"), except in 'a / b / c%'
    lists, where each is a percentage."""
    readme, report_md = README.read_text(), (RESULTS / "report.md").read_text()
    header, rows = readme_studies_table(readme)
    assert len(rows) == 10 and {"ours", "reproduced?"} <= set(header)
    checked = sum(len(numbers(row[header.index(c)])) for row in rows for c in ("ours", "reproduced?"))
    assert checked >= 80, f"only {checked} numbers found in the README's table: is the regex still right?"
    assert missing_from_report(readme, report_md) == []


def test_the_readme_check_catches_a_changed_number() -> None:
    readme, report_md = README.read_text(), (RESULTS / "report.md").read_text()
    assert "top-1 1.944 ± 0.006 (n=3), top-2" in readme
    changed = readme.replace("top-1 1.944 ± 0.006 (n=3), top-2", "top-1 1.947 ± 0.006 (n=3), top-2")
    assert "top-k (ours): 1.947" in missing_from_report(changed, report_md)
    rounded_wrong = readme.replace("top-1 1.944 ± 0.006 (n=3), top-2", "top-1 1.95 ± 0.006 (n=3), top-2")
    assert "top-k (ours): 1.95" in missing_from_report(rounded_wrong, report_md)  # 1.944 rounds to 1.94


def test_number_extraction() -> None:
    text = "val 0.670 (+0.028, -0.010 ± 0.022) 3/3 44.2%; Switch 94 / 82 / 44%, top-1 1.9, 1e-3, 3 seeds, bs 32"
    assert numbers(text) == ["0.670", "+0.028", "-0.010", "0.022", "3/3", "44.2%", "94%", "82%", "44%", "1.9"]
    report_numbers = {"44.2%", "+0.028", "6.510", "3/3", "0.5"}
    assert appears_in("44%", report_numbers) and appears_in("6.51", report_numbers)
    assert appears_in("0.028", report_numbers) and appears_in("3/3", report_numbers)
    assert not appears_in("45%", report_numbers) and not appears_in("0.50", report_numbers)  # more digits than it has
    assert not appears_in("44.2", report_numbers) and not appears_in("2/3", report_numbers)


# --- the README's sparse-vs-dense table (the main job, results/pretrain/) -------------------------------------------

PRETRAIN = RESULTS / "pretrain"
SEEDS = (0, 1, 2)


def _paired(sparse: list[float], dense: list[float]) -> tuple[float, float]:
    """Mean and standard error (std / sqrt(n)) of the per-seed differences sparse - dense."""
    diffs = [s - d for s, d in zip(sparse, dense, strict=True)]
    mean = sum(diffs) / len(diffs)
    std = (sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1)) ** 0.5
    return mean, std / len(diffs) ** 0.5


def _verdict(mean: float, se: float, lower_is_better: bool) -> str:
    if abs(mean) <= 2 * se:
        return "tie (within 2 standard errors)"
    return "sparse better" if (mean < 0) == lower_is_better else "dense better"


def sparse_vs_dense_table() -> str:
    """The README's table, from results/pretrain/{small,dense-small}/seed*/summary.json."""
    runs = {
        name: [json.loads((PRETRAIN / name / f"seed{s}" / "summary.json").read_text()) for s in SEEDS]
        for name in ("small", "dense-small")
    }
    lines = [
        "| run | command | val loss (nats/byte), seeds 0 / 1 / 2 | fact recall, seeds 0 / 1 / 2 "
        "| parameters total / active |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("small", "sparse: 8 experts, top-2, MoE in 2 of 4 blocks"), ("dense-small", "dense twin")):
        loss = " / ".join(f"{r['final_val_loss']:.4f}" for r in runs[name])
        recall = " / ".join(f"{100 * r['final_fact_recall']:.2f}%" for r in runs[name])
        p = runs[name][0]["parameters"]
        lines.append(
            f"| {label} | `moe-lab pretrain {name} seed=S` | {loss} | {recall} "
            f"| {p['total'] / 1e6:.2f}M / {p['active'] / 1e6:.2f}M |"
        )
    for metric, what, scale, lower in (
        ("final_val_loss", "val loss", 1, True),
        ("final_fact_recall", "fact recall", 100, False),
    ):
        mean, se = _paired(*[[scale * r[metric] for r in runs[n]] for n in ("small", "dense-small")])
        unit = " points" if scale == 100 else " nats/byte"
        lines.append(
            f"| sparse - dense, {what} (paired by seed, n=3) | | {mean:+.4f} ± {se:.4f}{unit}: "
            f"**{_verdict(mean, se, lower)}** | | |"
        )
    return "\n".join(lines)


def test_readme_sparse_vs_dense_table_is_the_committed_runs() -> None:
    """The table is what results/pretrain's six summaries give; regenerate it with
    `python -c "from tests.test_report_committed import sparse_vs_dense_table as t; print(t())"`."""
    assert sparse_vs_dense_table() in README.read_text()


def test_sparse_vs_dense_verdict_rule_says_each_outcome() -> None:
    assert _paired([0.50, 0.51, 0.52], [0.52, 0.53, 0.55]) == pytest.approx((-0.02333, 0.00333), abs=1e-4)
    assert _verdict(-0.02, 0.005, lower_is_better=True) == "sparse better"
    assert _verdict(-0.02, 0.005, lower_is_better=False) == "dense better"
    assert _verdict(-0.01, 0.005, lower_is_better=True).startswith("tie")  # exactly 2 standard errors: no verdict
