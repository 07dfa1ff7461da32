"""The committed report agrees with the committed results/ it was made from, the README with the report, and
docs/benchmarks.md with the committed benchmark records."""

from __future__ import annotations

import itertools
import json
import re
import shutil
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
BENCHMARKS = ROOT / "docs" / "benchmarks.md"

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


# --- the README's studies table: the report's summary, row by row ------------------------------------------------


def readme_studies_table(readme: str) -> str:
    """The README's table of studies (the one whose header is the report summary's), as Markdown lines."""
    lines = readme.splitlines()
    start = lines.index("| study | paper's finding | ours | reproduced |")
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    return "\n".join(table) + "\n"


def report_summary_table(report_md: str) -> str:
    """The summary table of report.md (its "## Summary" section)."""
    section = report_md.split("\n## Summary\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("|")) + "\n"


def test_readme_studies_table_is_the_reports_summary() -> None:
    """The README's studies table is results/report.md's summary, cell by cell: the verdict words and each part's
    verdict included. Regenerate it with `moe-lab report` and copy the summary table."""
    readme_table = readme_studies_table(README.read_text())
    assert readme_table.count("\n") == 2 + 10  # header, separator, ten studies
    assert readme_table == report_summary_table((RESULTS / "report.md").read_text())


def test_the_readme_check_catches_a_changed_verdict() -> None:
    readme, report_md = README.read_text(), (RESULTS / "report.md").read_text()
    row = next(line for line in readme_studies_table(readme).splitlines() if line.startswith("| `stablemoe` |"))
    verdict = re.search(r"\| \*\*(\w+)\*\* \(parts:", row)
    assert verdict is not None, row
    other = "no" if verdict[1] != "no" else "yes"
    changed = readme.replace(row, row.replace(f"| **{verdict[1]}** (parts:", f"| **{other}** (parts:"))
    assert readme_studies_table(changed) != report_summary_table(report_md)
    number = readme.replace("top-1 1.944 ± 0.006 (n=3)", "top-1 1.947 ± 0.006 (n=3)")
    assert number != readme and readme_studies_table(number) != report_summary_table(report_md)


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
    assert one.table.iloc[2, 2].endswith("**inconclusive (one seed)**")


@pytest.mark.parametrize(
    ("value", "se", "better", "said"),
    [
        (-0.02, 0.002, "<", "sparse better"),  # loss down: the 95% interval (t 4.30 at 2 df) excludes 0
        (-0.02, 0.002, ">", "dense better"),  # recall down as far
        (-0.002, 0.001, "<", "no difference (inside the margin)"),  # 90% interval (t 2.92) inside +-0.01
        # 95% [-0.0062, -0.0018] excludes 0, but 90% [-0.0055, -0.0025] is inside +-0.01: too small to count
        (-0.004, 0.0005, "<", "sparse better by less than the margin"),
        (-0.004, 0.0005, ">", "dense better by less than the margin"),  # recall down by as little
        (-0.01, 0.004, "<", "inconclusive"),  # 95% interval holds 0, 90% one crosses -0.01
        (-0.01, float("nan"), "<", "inconclusive (one seed)"),
    ],
)
def test_sparse_vs_dense_claim_says_each_outcome(value: float, se: float, better: str, said: str) -> None:
    n = 1 if se != se else 3
    method = "one seed" if n == 1 else "paired by seed"
    d = stats.Difference(value, se, float("nan") if n == 1 else 2.0, n, method)
    assert claim(d, better, margin=0.01) == said


def test_parallel_benchmark_table_is_the_committed_json() -> None:
    """docs/benchmarks.md's "Parallel" table is results/bench/parallel.json, row by row."""
    records = json.loads((RESULTS / "bench" / "parallel.json").read_text())
    section = BENCHMARKS.read_text().split("\n## Parallel (measured)\n", 1)[1].split("\n## ", 1)[0]
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


def test_dispatch_benchmark_table_is_the_committed_json() -> None:
    """docs/benchmarks.md's "Dispatch" table is results/bench/dispatch.json, cell by cell."""
    records = json.loads((RESULTS / "bench" / "dispatch.json").read_text())
    section = BENCHMARKS.read_text().split("\n## Dispatch (measured)\n", 1)[1].split("\n## ", 1)[0]
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
