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
from moe_lab.report import stats
from moe_lab.report.mainjob import claim, sparse_vs_dense
from moe_lab.report.render import markdown_table

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
    # rich wraps a long path at its slashes, without a space: compare with all whitespace removed
    assert f"wrote{results / 'report.md'}" in "".join(outcome.output.split())
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


# --- the main job's sparse vs dense (results/pretrain/): the report's section, and the README's copy ----------------


def test_readme_sparse_vs_dense_table_is_the_reports() -> None:
    """The README's table is the one `moe-lab report` makes from results/pretrain/'s summaries; regenerate it with
    `python -c "from moe_lab.report.mainjob import *; from moe_lab.report.render import markdown_table as m;
    print(m(sparse_vs_dense('results').table))"`."""
    main = sparse_vs_dense(RESULTS)
    assert main is not None and main.table.shape == (4, 5)
    table = markdown_table(main.table)
    assert table in README.read_text()
    assert table in (RESULTS / "report.md").read_text()


def test_sparse_vs_dense_needs_both_models(tmp_path: Path) -> None:
    shutil.copytree(RESULTS / "pretrain" / "small", tmp_path / "pretrain" / "small")
    assert sparse_vs_dense(tmp_path) is None
    shutil.copytree(RESULTS / "pretrain" / "dense-small" / "seed0", tmp_path / "pretrain" / "dense-small" / "seed0")
    one = sparse_vs_dense(tmp_path)  # only seed 0 is shared: no standard error, no verdict
    assert one is not None and "seeds 0 |" in " | ".join(one.table.columns) + " |"
    assert one.table.iloc[2, 2].endswith("**no standard error (one seed)**")


@pytest.mark.parametrize(
    ("value", "se", "better", "said"),
    [
        (-0.02, 0.005, "<", "sparse better"),  # loss down beyond 2 SE
        (-0.02, 0.005, ">", "dense better"),  # recall down beyond 2 SE
        (-0.01, 0.005, "<", "tie (within 2 standard errors)"),  # exactly 2 SE is not beyond
        (-0.01, float("nan"), "<", "no standard error (one seed)"),
    ],
)
def test_sparse_vs_dense_claim_says_each_outcome(value: float, se: float, better: str, said: str) -> None:
    assert claim(stats.Difference(value, se, paired=True, n=3), better) == said


def test_readme_parallel_benchmark_is_the_committed_json() -> None:
    """The README's "Benchmark: parallel" table is results/bench/parallel.json, row by row."""
    records = json.loads((RESULTS / "bench" / "parallel.json").read_text())
    section = README.read_text().split("## Benchmark: parallel", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    body = [[cell.strip() for cell in row] for row in rows[1:]]  # after the header

    def mb(value: float | None) -> str:
        return "-" if value is None else f"{value / 1e6:.2f}"

    expected = [
        [
            r["layout"], str(r["ranks"]), f"{r['step_ms_median']:.1f}", f"{r['tokens_per_s']:,.0f}",
            mb(r["exchange_bytes_per_step"]), mb(r["all_to_all_bytes_per_s"]), mb(r["allreduce_bytes_per_step"]),
        ]
        for r in records
    ]  # fmt: skip
    assert body == expected


def test_readme_dispatch_benchmark_is_the_committed_json() -> None:
    """The README's "Benchmark: dispatch" table is results/bench/dispatch.json, cell by cell."""
    records = json.loads((RESULTS / "bench" / "dispatch.json").read_text())
    section = README.read_text().split("## Benchmark: dispatch", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = [c.strip() for c in rows[0]], [[c.strip() for c in row] for row in rows[1:]]
    backends = header[2:]
    assert backends[0] == "dense" and set(backends) == {r["backend"] for r in records}
    shapes = list(dict.fromkeys((r["num_experts"], r["top_k"]) for r in records))
    cell = {(r["num_experts"], r["top_k"], r["backend"]): r for r in records}
    expected = [
        [str(e), str(k)]
        + [f"{cell[e, k, b]['tokens_per_s'] / 1000:.1f}k ({cell[e, k, b]['ratio_to_dense']:.2f}x)" for b in backends]
        for e, k in shapes
    ]
    assert body == expected
