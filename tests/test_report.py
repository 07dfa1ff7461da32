"""`moe-lab report` on small results trees built here: tables, verdicts, figures, md/html/csv, the CLI."""

from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from moe_lab.report import make_report
from moe_lab.report.plots import FIGURES
from moe_lab.report.results import aggregate, binomial_std, load_study, mean_std
from moe_lab.report.studies import BUILDERS, build
from tests.conftest import run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# --- fixture builder ----------------------------------------------------------------------------------------------


def _run_name(swept: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in swept.items())


def row(swept: dict, status: str = "completed", **metrics) -> dict:
    """One runs.csv row: the run's directory name, its swept values, status and metrics (`@` in a name: **{})."""
    return {"run": _run_name(swept), **swept, "status": status, **metrics}


def write_study(root: Path, name: str, rows: list[dict], files: dict[str, dict[str, object]] | None = None) -> Path:
    """results/<name>/runs.csv from rows, and per-run files: {run: {"metrics.csv": DataFrame, "summary.json": dict}}.

    Every row's run gets a summary.json holding its status and metrics, as a sweep leaves it (the report checks
    runs.csv against them)."""
    study = root / name
    study.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(study / "runs.csv", index=False)
    files = {r["run"]: {} for r in rows} | (files or {})
    by_run = {r["run"]: r for r in rows}
    for run, contents in files.items():
        run_dir = study / "runs" / run
        run_dir.mkdir(parents=True, exist_ok=True)
        results = {k: v for k, v in by_run.get(run, {}).items() if k == "status" or k.startswith(("final_", "best_"))}
        contents = {**contents, "summary.json": {**results, **contents.get("summary.json", {})}}
        for file, content in contents.items():
            if isinstance(content, pd.DataFrame):
                content.to_csv(run_dir / file, index=False)
            else:
                (run_dir / file).write_text(json.dumps(content))
    return study


def set_runs(root: Path, name: str, column: str, value: object, where) -> None:
    """Set `column` to `value` in the rows of a study's runs.csv where `where(frame)` holds, and in those runs'
    summary.json files, as a sweep that had produced those numbers would have written them."""
    path = root / name / "runs.csv"
    runs = pd.read_csv(path)
    runs.loc[where(runs), column] = value
    runs.to_csv(path, index=False)
    for record in runs.to_dict("records"):
        summary_path = root / name / "runs" / record["run"] / "summary.json"
        summary = json.loads(summary_path.read_text())
        summary.update({k: v for k, v in record.items() if k in summary})
        summary_path.write_text(json.dumps(summary))


def loss_metrics(final: float) -> pd.DataFrame:
    return pd.DataFrame({"step": [10, 20, 30], "loss": [5.0, 3.0, final]})


def accuracy_metrics(train: float, val: float) -> pd.DataFrame:
    return pd.DataFrame({
        "step": [10, 20, 30, 40],
        "loss": [0.7, 0.6, 0.5, 0.4],
        "val_accuracy": [None, 0.5, None, val],
        "train_accuracy": [None, 0.5, None, train],
    })  # fmt: skip


def fluctuation_table(late: float) -> pd.DataFrame:
    """Two layers, five probes; `late` of the tokens still change expert at 80% of training."""
    steps = [0, 25, 50, 75, 100]
    still = [1.0, 2 * late, late, late, 0.0]
    return pd.DataFrame({
        "step": [s for s in steps for _ in range(2)],
        "layer": ["1", "3"] * len(steps),
        "changed_vs_final": [v for v in still for _ in range(2)],
        "changed_vs_prev": [v / 2 for v in still for _ in range(2)],
        "still_fluctuating": [v for v in still for _ in range(2)],
    })  # fmt: skip


def expert_metrics(loads: list[float]) -> pd.DataFrame:
    frame = pd.DataFrame({"step": [10, 20], "loss": [3.0, 2.5]})
    for layer in ("1", "3"):
        for e, share in enumerate(loads):
            frame[f"moe/{layer}/tokens_per_expert/{e}"] = [1 / len(loads), share]
    return frame


def specialisation_table() -> pd.DataFrame:
    return pd.DataFrame({
        "layer": ["1", "1", "1", "3"],
        "label": ["punctuation", "punctuation", "digits", "digits"],
        "expert": [0, 1, 1, 0],
        "tokens": [30, 2, 12, 12],
    })  # fmt: skip


def build_top_k(root: Path, agree: bool = True) -> None:
    losses = [1.930, 1.905, 1.856] if agree else [1.856, 1.905, 1.930]
    rows = [
        row({"moe.top_k": k}, final_val_loss=v, tokens_per_s=20000.0 - 4000 * i)
        for i, (k, v) in enumerate(zip([1, 2, 4], losses, strict=True))
    ]
    write_study(root, "top-k", rows, {r["run"]: {"metrics.csv": loss_metrics(r["final_val_loss"])} for r in rows})


def build_capacity_factor(root: Path, agree: bool = True) -> None:
    # train CF 1: eval CF 1 vs 2; train CF 2: eval CF 2 only counts. agree: eval CF up helps, train CF up helps
    at1, at2 = (
        ({1.0: 1.95, 2.0: 1.93}, {1.0: 1.94, 2.0: 1.90}) if agree else ({1.0: 1.90, 2.0: 1.95}, {1.0: 1.91, 2.0: 1.97})
    )
    rows = [
        row(
            {"moe.train_capacity_factor": cf},
            **{"final_val_loss@cf1": losses[1.0], "final_dropped_frac@cf1": drop, "final_val_loss@cf2": losses[2.0]},
            **{"final_dropped_frac@cf2": 0.0, "tokens_per_s": 5000.0 * cf},
        )
        for cf, losses, drop in ((1.0, at1, 0.1), (2.0, at2, 0.02))
    ]
    write_study(root, "capacity-factor", rows)


def build_z_loss(root: Path, agree: bool = True) -> None:
    """agree: a baseline seed diverged, z-loss none and no worse; flipped: z-loss diverged more and is worse."""
    base = [("completed", 2.50), ("completed", 2.52), ("diverged", 7.0)]
    z = [("completed", 2.49), ("completed", 2.51), ("completed", 2.50)] if agree else [
        ("completed", 2.90), ("diverged", 6.0), ("diverged", 6.5)
    ]  # fmt: skip
    rows = []
    for setting, runs, logit in (("baseline", base, 30.0), ("z-loss", z, 2.0)):
        for seed, (status, loss) in enumerate(runs):
            rows.append(row({"+stability": setting, "seed": seed}, status, final_val_loss=loss, moe_max_logit=logit))
    write_study(
        root, "z-loss-stability", rows, {r["run"]: {"metrics.csv": loss_metrics(r["final_val_loss"])} for r in rows}
    )


def build_router_fluctuation(root: Path, agree: bool = True) -> None:
    late = {"switch": 0.15, "st-moe": 0.1, "base": 0.2, "hash": 0.0, "stablemoe": 0.0 if agree else 0.1}
    ppl = {"switch": 19.8, "st-moe": 19.6, "base": 20.0, "hash": 19.7, "stablemoe": 19.3 if agree else 20.5}
    rows = [
        row({"moe": m}, final_val_ppl=ppl[m], final_val_loss=math.log(ppl[m]), moe_dropped_frac=0.01,
            **{"fluctuation@0.2": 2 * late[m], "fluctuation@0.5": late[m], "fluctuation@0.8": late[m]})
        for m in late
    ]  # fmt: skip
    files = {
        r["run"]: {
            "fluctuation.csv": fluctuation_table(late[r["moe"]]),
            "metrics.csv": expert_metrics([0.4, 0.3, 0.2, 0.1]),
            "specialisation.csv": specialisation_table(),
        }
        for r in rows
    }
    write_study(root, "router-fluctuation", rows, files)


def build_stablemoe(root: Path, agree: bool = True) -> None:
    fractions = [0.1, 0.25, 0.5, 1.0]
    ppl = [19.2, 19.3, 19.4, 19.5] if agree else [19.5, 19.4, 19.3, 19.2]
    rows = [row({"moe.stage1_fraction": f}, final_val_ppl=p) for f, p in zip(fractions, ppl, strict=True)]
    write_study(root, "stablemoe", rows, {r["run"]: {"fluctuation.csv": fluctuation_table(0.0)} for r in rows})


def build_freeze(root: Path, agree: bool = True, moe: float | None = None, summary: dict | None = None) -> None:
    acc = {"all": 0.62, "non_moe": 0.61, "moe": 0.50 if agree else 0.70, "attention": 0.60, "ffn": 0.63}
    if moe is not None:
        acc["moe"] = moe
    rows = [
        row({"finetune.freeze": k, "task": "synth-large"}, trainable_parameters=1000 * (i + 1), final_val_accuracy=v,
            best_val_accuracy=v + 0.01, final_train_accuracy=v + 0.05)
        for i, (k, v) in enumerate(acc.items())
    ]  # fmt: skip
    files = {
        r["run"]: {"metrics.csv": accuracy_metrics(r["final_train_accuracy"], r["final_val_accuracy"])} for r in rows
    }
    if summary is not None:
        files[rows[0]["run"]]["summary.json"] = summary
    write_study(root, "freeze", rows, files)


def build_token_drop(root: Path, agree: bool = True) -> None:
    # (train CF, dropped in training, accuracy); CF 0.5 drops 12%: costs nothing (agree) or 11 points (flipped)
    runs = [(0.5, 0.12, 0.80 if agree else 0.70), (1.0, 0.03, 0.81), (2.0, 0.0, 0.81)]
    rows = [row({"moe.train_capacity_factor": cf}, moe_dropped_frac=d, final_val_accuracy=a) for cf, d, a in runs]
    write_study(root, "token-drop", rows)


def build_aux_loss(root: Path, agree: bool = True) -> None:
    # (aux coef, train CF, dropped, accuracy); agree: aux on drops fewer tokens and wins by 5 points
    on_drop = (0.10, 0.003) if agree else (0.20, 0.05)
    runs = [
        (0.01, 0.75, on_drop[0], 0.85), (0.0, 0.75, 0.15, 0.80),
        (0.01, 1.25, on_drop[1], 0.86), (0.0, 1.25, 0.03, 0.81),
    ]  # fmt: skip
    rows = [
        row({"moe.aux_loss_coef": a, "moe.train_capacity_factor": cf}, moe_dropped_frac=d, final_val_accuracy=acc)
        for a, cf, d, acc in runs
    ]
    write_study(root, "aux-loss-finetune", rows)


def build_overfit(root: Path, agree: bool = True) -> None:
    # (pretrained, task, train accuracy, val accuracy)
    if agree:  # sparse fits the small task better but validates worse; wins the large task
        runs = [("mini", "synth-small", 1.0, 0.60), ("dense-mini", "synth-small", 0.90, 0.70),
                ("mini", "synth-large", 0.90, 0.85), ("dense-mini", "synth-large", 0.88, 0.80)]  # fmt: skip
    else:
        runs = [("mini", "synth-small", 0.80, 0.75), ("dense-mini", "synth-small", 0.95, 0.65),
                ("mini", "synth-large", 0.80, 0.75), ("dense-mini", "synth-large", 0.90, 0.85)]  # fmt: skip
    rows = [
        row({"finetune.pretrained": p, "task": t}, final_train_accuracy=tr, final_val_accuracy=v, best_val_accuracy=v)
        for p, t, tr, v in runs
    ]
    files = {
        r["run"]: {"metrics.csv": accuracy_metrics(r["final_train_accuracy"], r["final_val_accuracy"])} for r in rows
    }
    write_study(root, "overfit", rows, files)


def build_finetune_grid(root: Path, agree: bool = True) -> None:
    """Every (model, task, lr, batch) at 0.70, except each model's best setting at 0.80."""
    sparse_best, dense_best = ((8, 1e-3), (32, 1e-4)) if agree else ((32, 1e-4), (8, 1e-3))
    rows = []
    for pretrained, best in (("mini", sparse_best), ("dense-mini", dense_best)):
        for task in ("synth-small", "synth-large"):
            for bs in (8, 32):
                for lr in (1e-4, 1e-3):
                    swept = {"finetune.pretrained": pretrained, "task": task, "optim.lr": lr, "train.batch_size": bs}
                    rows.append(row(swept, final_val_accuracy=0.80 if (bs, lr) == best else 0.70))
    write_study(root, "finetune-grid", rows)


FIXTURES = {
    "z-loss-stability": build_z_loss,
    "capacity-factor": build_capacity_factor,
    "top-k": build_top_k,
    "finetune-grid": build_finetune_grid,
    "freeze": build_freeze,
    "token-drop": build_token_drop,
    "aux-loss-finetune": build_aux_loss,
    "overfit": build_overfit,
    "router-fluctuation": build_router_fluctuation,
    "stablemoe": build_stablemoe,
}

# each figure function's file name
FIGURE_FILES = {
    "capacity_curves": "capacity-factor.png",
    "finetune_heatmaps": "finetune-grid.png",
    "fluctuation_curves": "{study}-fluctuation.png",
    "expert_load": "{study}-expert-load.png",
    "specialisation": "{study}-specialisation.png",
    "accuracy_curves": "{study}-accuracy.png",
    "loss_curves": "{study}-loss.png",
}


def build_all(root: Path) -> Path:
    for builder in FIXTURES.values():
        builder(root)
    return root


def verdict(root: Path, name: str) -> str:
    return build(name, load_study(root, name)).verdict.reproduced


def md_sections(text: str) -> dict[str, str]:
    """report.md's `## <study>` sections by name."""
    return {part.split("\n", 1)[0]: part for part in text.split("\n## ")[1:]}


def md_table(section: str) -> list[list[str]]:
    """The first Markdown table of a section, header first, separator line dropped."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    assert lines[1].startswith("|---"), lines[:2]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in [lines[0], *lines[2:]]]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list]:
    """All ten studies rendered once in-process: (results root, out dir, reports)."""
    root = build_all(tmp_path_factory.mktemp("results"))
    out = tmp_path_factory.mktemp("report")
    reports, _ = make_report(root, None, ("md", "html", "csv"), out, Console(file=None, quiet=True))
    return root, out, reports


# --- 1. every study's table and figures -------------------------------------------------------------------------


def test_report_renders_every_study_table_and_figure(full_report: tuple[Path, Path, list]) -> None:
    _, out, reports = full_report
    assert [r.name for r in reports] == list(BUILDERS)
    sections = md_sections((out / "report.md").read_text())
    assert list(sections) == ["Summary", *BUILDERS]
    summary = md_table(sections["Summary"])
    assert summary[0] == ["study", "paper's finding", "ours", "reproduced"]
    assert [(r[0], r[3]) for r in summary[1:]] == [(name, "yes") for name in BUILDERS]

    expected_figures = set()
    for report in reports:
        section = sections[report.name]
        assert "**Reproduced: yes.**" in section
        table = md_table(section)
        assert table[0] == list(report.table.columns)
        assert len(table) - 1 == len(report.table) > 0
        assert table[1:] == [[str(v) for v in r] for r in report.table.itertuples(index=False)]
        figures = [FIGURE_FILES[f.__name__].format(study=report.name) for f in FIGURES[report.name]]
        for file in figures:
            assert f"![{Path(file).stem}](plots/{file})" in section
        expected_figures |= set(figures)
    assert len(expected_figures) == 10  # token-drop and aux-loss-finetune have none
    assert {p.name for p in (out / "plots").iterdir()} == expected_figures
    for file in expected_figures:
        assert (out / "plots" / file).read_bytes()[:8] == PNG_MAGIC

    tables = {r.name: md_table(sections[r.name]) for r in reports}
    assert tables["capacity-factor"][1][:3] == ["1", "1.950 (10.0% dropped)", "1.930 (0.0% dropped)"]
    assert tables["router-fluctuation"][1][:3] == ["base", "20.000", "40.0% / 20.0% / 20.0%"]
    assert tables["z-loss-stability"][1][:3] == ["baseline", "2/3", "2.510 ± 0.014"]
    assert tables["stablemoe"][4][:2] == ["stage 1 only", "19.500"]


# --- 2. the verdict follows the numbers ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FIXTURES))
@pytest.mark.parametrize(("agree", "expected"), [(True, "yes"), (False, "no")])
def test_verdict_flips_with_the_numbers(tmp_path: Path, name: str, agree: bool, expected: str) -> None:
    FIXTURES[name](tmp_path, agree)
    assert verdict(tmp_path, name) == expected


def test_verdict_states_what_we_measured(tmp_path: Path) -> None:
    build_top_k(tmp_path, agree=False)
    report = build("top-k", load_study(tmp_path, "top-k"))
    assert report.verdict.ours == "val loss top-1 1.856, top-2 1.905, top-4 1.930"
    assert report.verdict.checked == "validation loss falls as k rises"


def _top_k_partly(root: Path) -> None:
    write_study(root, "top-k", [row({"moe.top_k": k}, final_val_loss=v) for k, v in ((1, 1.93), (2, 1.95), (4, 1.90))])


def _capacity_factor_partly(root: Path) -> None:  # eval CF up helps, a higher train CF does not
    rows = [
        row({"moe.train_capacity_factor": cf}, **{"final_val_loss@cf1": a, "final_val_loss@cf2": b})
        for cf, a, b in ((1.0, 1.95, 1.93), (2.0, 1.96, 1.94))
    ]
    write_study(root, "capacity-factor", rows)


def _z_loss_no_divergence(smaller_logits: bool) -> object:
    def write(root: Path) -> None:
        rows = [
            row({"+stability": s, "seed": seed}, final_val_loss=2.5, moe_max_logit=logit)
            for s, logit in (("baseline", 30.0), ("z-loss", 2.0 if smaller_logits else 40.0))
            for seed in range(2)
        ]
        write_study(root, "z-loss-stability", rows)

    return write


def _z_loss_as_many_diverged(root: Path) -> None:  # no fewer divergences with z-loss, quality no worse
    rows = [
        row({"+stability": s, "seed": seed}, status, final_val_loss=2.5, moe_max_logit=2.0)
        for s in ("baseline", "z-loss")
        for seed, status in enumerate(("completed", "diverged", "completed"))
    ]
    write_study(root, "z-loss-stability", rows)


def _router_fluctuation_partly(root: Path) -> None:  # fluctuation as in the paper, StableMoE not the best perplexity
    build_router_fluctuation(root)
    set_runs(root, "router-fluctuation", "final_val_ppl", 25.0, lambda runs: runs["moe"] == "stablemoe")


def _stablemoe_partly(root: Path) -> None:  # the shortest stage 1 is best of the two-stage runs, stage 1 alone beats it
    ppl = ((0.1, 19.2), (0.25, 19.3), (1.0, 19.1))
    write_study(root, "stablemoe", [row({"moe.stage1_fraction": f}, final_val_ppl=p) for f, p in ppl])


def _freeze_close(root: Path) -> None:  # MoE-only worst by 0.01, within 2 binomial standard errors of 1000 examples
    build_freeze(root, moe=0.59)


def _freeze_small_validation_set(root: Path) -> None:  # the agreeing numbers, measured on 50 examples
    build_freeze(root, summary={"config": {"task": {"source": "synthetic", "synthetic_val": 50}}})


def _token_drop_no_dropping(root: Path) -> None:
    rows = [
        row({"moe.train_capacity_factor": cf}, moe_dropped_frac=d, final_val_accuracy=0.8)
        for cf, d in ((1.0, 0.03), (2.0, 0.0))
    ]
    write_study(root, "token-drop", rows)


def _overfit_within_noise(root: Path) -> None:  # the agreeing direction, differences of 0.005
    runs = [("mini", "synth-small", 1.0, 0.700), ("dense-mini", "synth-small", 0.9, 0.705),
            ("mini", "synth-large", 0.9, 0.805), ("dense-mini", "synth-large", 0.9, 0.800)]  # fmt: skip
    rows = [
        row({"finetune.pretrained": p, "task": t}, final_train_accuracy=tr, final_val_accuracy=v)
        for p, t, tr, v in runs
    ]
    write_study(root, "overfit", rows)


def _aux_loss_fewer_drops_no_win(root: Path) -> None:
    runs = [(0.01, 0.75, 0.10, 0.801), (0.0, 0.75, 0.15, 0.800)]
    rows = [
        row({"moe.aux_loss_coef": a, "moe.train_capacity_factor": cf}, moe_dropped_frac=d, final_val_accuracy=acc)
        for a, cf, d, acc in runs
    ]
    write_study(root, "aux-loss-finetune", rows)


@pytest.mark.parametrize(
    ("name", "write", "expected"),
    [
        ("top-k", _top_k_partly, "partly"),
        ("capacity-factor", _capacity_factor_partly, "partly"),
        ("z-loss-stability", _z_loss_no_divergence(smaller_logits=True), "partly"),
        ("z-loss-stability", _z_loss_no_divergence(smaller_logits=False), "inconclusive"),
        ("z-loss-stability", _z_loss_as_many_diverged, "partly"),
        ("router-fluctuation", _router_fluctuation_partly, "partly"),
        ("stablemoe", _stablemoe_partly, "partly"),
        ("freeze", _freeze_close, "inconclusive"),
        ("freeze", _freeze_small_validation_set, "inconclusive"),
        ("token-drop", _token_drop_no_dropping, "inconclusive"),
        ("overfit", _overfit_within_noise, "inconclusive"),
        ("aux-loss-finetune", _aux_loss_fewer_drops_no_win, "inconclusive"),
    ],
    ids=lambda v: v if isinstance(v, str) else getattr(v, "__name__", None),
)
def test_verdict_between_yes_and_no(tmp_path: Path, name: str, write, expected: str) -> None:
    write(tmp_path)
    assert verdict(tmp_path, name) == expected


# --- 3. missing and diverged runs ---------------------------------------------------------------------------------


def test_study_without_runs_csv_is_no_data_and_the_report_renders(tmp_path: Path) -> None:
    root, out = tmp_path / "results", tmp_path / "out"
    (root / "top-k" / "runs" / "moe.top_k=1").mkdir(parents=True)  # started, nothing collected yet
    build_stablemoe(root)
    assert load_study(root, "top-k") is None
    reports, written = make_report(root, ["top-k", "stablemoe"], ("md", "html", "csv"), out, Console(quiet=True))
    assert [r.verdict.reproduced for r in reports] == ["no data", "yes"]
    assert reports[0].verdict.checked == "no results/top-k/runs.csv: run `moe-lab sweep top-k`"
    assert [p.relative_to(out).as_posix() for p in written] == [
        "report.md", "report.html", "report.csv", "tables/stablemoe.csv"
    ]  # fmt: skip
    sections = md_sections((out / "report.md").read_text())
    assert "**Reproduced: no data.**" in sections["top-k"]
    assert "_no rows_" in sections["top-k"]
    assert "<p><i>no rows</i></p>" in (out / "report.html").read_text()
    assert {p.name for p in (out / "plots").iterdir()} == {"stablemoe-fluctuation.png"}


def test_study_where_every_run_diverged_lists_the_runs(tmp_path: Path) -> None:
    rows = [
        row({"moe.top_k": 1}, "diverged", diverged_at_step=120, final_val_loss=9.0),
        row({"moe.top_k": 2}, "diverged", diverged_at_step=80, final_val_loss=8.0),
    ]
    write_study(tmp_path, "top-k", rows, {r["run"]: {"metrics.csv": loss_metrics(r["final_val_loss"])} for r in rows})
    reports, _ = make_report(tmp_path, ["top-k"], ("md", "html"), tmp_path / "out", Console(quiet=True))
    report = reports[0]
    assert (report.verdict.reproduced, report.verdict.checked) == ("no data", "no run completed")
    assert report.table.to_dict("list") == {
        "moe.top_k": ["1", "2"], "status": ["diverged", "diverged"], "diverged_at_step": ["120", "80"]
    }  # fmt: skip
    section = md_sections((tmp_path / "out" / "report.md").read_text())["top-k"]
    assert md_table(section) == [
        ["moe.top_k", "status", "diverged_at_step"],
        ["1", "diverged", "120"],
        ["2", "diverged", "80"],
    ]
    assert (tmp_path / "out" / "plots" / "top-k-loss.png").read_bytes()[:8] == PNG_MAGIC  # the curves, ending in x


def test_z_loss_diverged_baseline_seeds_are_counted_not_averaged(tmp_path: Path) -> None:
    base = [("diverged", 8.0), ("completed", 2.60), ("diverged", 9.0)]
    z = [("completed", 2.50), ("completed", 2.52), ("completed", 2.54)]
    rows = [
        row({"+stability": setting, "seed": seed}, status, final_val_loss=loss, moe_max_logit=logit)
        for setting, runs, logit in (("baseline", base, 30.0), ("z-loss", z, 2.0))
        for seed, (status, loss) in enumerate(runs)
    ]
    write_study(tmp_path, "z-loss-stability", rows)
    reports, _ = make_report(tmp_path, ["z-loss-stability"], ("md",), tmp_path / "out", Console(quiet=True))
    report = reports[0]
    assert report.table[["setting", "stable (ours)", "val loss (ours)", "max router logit"]].values.tolist() == [
        ["baseline", "1/3", "2.600", "30.0"],
        ["z-loss", "3/3", "2.520 ± 0.020", "2.0 ± 0.0"],
    ]
    assert report.notes == ["+stability=baseline: 2 diverged, 0 failed of 3 runs (left out of the means)"]
    baseline = report.data.set_index("+stability").loc["baseline"]
    assert (baseline["runs"], baseline["diverged"], baseline["final_val_loss_n"]) == (3, 2, 1)
    assert baseline["final_val_loss"] == pytest.approx(2.60)
    assert report.verdict.reproduced == "yes"
    assert report.verdict.ours == (
        "stable: baseline 1/3, z-loss 3/3; val loss 2.600 vs 2.520; max router logit 30.0 vs 2.0"
    )
    section = md_sections((tmp_path / "out" / "report.md").read_text())["z-loss-stability"]
    assert "| baseline | 1/3 | 2.600 | 30.0 | 4/6 | -1.755 |" in section
    assert "\n- +stability=baseline: 2 diverged, 0 failed of 3 runs" in section


# --- 4. the HTML ------------------------------------------------------------------------------------------------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class TreeCheck(HTMLParser):
    """Builds the tag tree: every non-void start tag must be closed by its own end tag, in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.errors: list[str] = []
        self.top: list[str] = []
        self.imgs: list[dict[str, str | None]] = []
        self.ids: list[str | None] = []
        self.tables = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if not self.open:
            self.top.append(tag)
        self.imgs += [dict(attrs)] if tag == "img" else []
        self.ids += [dict(attrs).get("id")] if tag == "h2" else []
        self.tables += tag == "table"
        if tag not in VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in VOID:
            self.errors.append(f"self-closed <{tag}/>")
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.open.pop()

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID or not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1:] or 'nothing'} at {self.getpos()}")
        else:
            self.open.pop()


def test_html_is_well_formed_and_inlines_existing_figures(full_report: tuple[Path, Path, list]) -> None:
    _, out, _ = full_report
    text = (out / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>\n")
    tree = TreeCheck()
    tree.feed(text)
    tree.close()
    assert tree.errors == []
    assert tree.open == []
    assert tree.top == ["html"]
    assert tree.ids == [None, *BUILDERS]  # the summary, then one heading per study
    assert tree.tables == 1 + len(BUILDERS)
    pngs = sorted(p.relative_to(out).as_posix() for p in (out / "plots").iterdir())
    assert sorted(img["data-source"] for img in tree.imgs) == pngs
    assert len(pngs) == 10
    for img in tree.imgs:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        data = base64.b64decode(img["src"][len(prefix) :], validate=True)
        assert data[:8] == PNG_MAGIC
        assert data == (out / img["data-source"]).read_bytes()


# --- 5. the CLI -------------------------------------------------------------------------------------------------


def test_cli_report_writes_every_format(tmp_path: Path) -> None:
    root, out = build_all(tmp_path / "results"), tmp_path / "out"
    result = run_cli("report", "--results", str(root), "--out", str(out), "--format", "md,html,csv")
    assert result.returncode == 0, result.stderr + result.stdout
    for file in ("report.md", "report.html", "report.csv", *(f"tables/{name}.csv" for name in BUILDERS)):
        assert (out / file).is_file(), file
        assert f"wrote {out / file}" in " ".join(result.stdout.split())
    summary = pd.read_csv(out / "report.csv")
    assert summary["study"].tolist() == list(BUILDERS)
    assert summary["reproduced"].tolist() == ["yes"] * len(BUILDERS)
    top_k = pd.read_csv(out / "tables" / "top-k.csv")
    assert top_k["moe.top_k"].tolist() == [1, 2, 4]
    assert top_k["final_val_loss"].tolist() == [1.930, 1.905, 1.856]
    assert "## router-fluctuation" in (out / "report.md").read_text()
    assert not (root / "report.md").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuchstudy"], f"unknown study(ies) ['nosuchstudy']; known: {list(BUILDERS)}"),
        (["--format", "md,pdf"], "unknown format(s) ['pdf']; valid: ['md', 'html', 'csv']"),
        ([], "results directory {missing} does not exist"),
    ],
    ids=["study", "format", "results"],
)
def test_cli_report_rejects_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    missing = tmp_path / "no-results"
    results = tmp_path if args else missing
    result = run_cli("report", *args, "--results", str(results), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr + result.stdout
    assert "error: " + message.format(missing=missing) in " ".join(result.stderr.split())
    assert not (tmp_path / "out").exists()


# --- 6. aggregation and formatting ------------------------------------------------------------------------------


def test_mean_std_formats_one_several_and_no_runs() -> None:
    assert mean_std({"m": 1.90449, "m_std": 0.0123, "m_n": 3}, "m") == "1.904 ± 0.012"
    assert mean_std({"m": 1.90451, "m_std": math.nan, "m_n": 1}, "m") == "1.905"
    assert mean_std({"m": 1.90451, "m_std": 0.5, "m_n": 1}, "m") == "1.905"
    assert mean_std({"m": math.nan, "m_std": math.nan, "m_n": 0}, "m") == "-"
    assert mean_std({}, "m") == "-"
    assert mean_std(pd.Series({"m": 0.8123, "m_std": 0.011, "m_n": 2}), "m", digits=1, scale=100) == "81.2 ± 1.1"


def test_aggregate_excludes_diverged_runs_from_means_and_counts_them() -> None:
    runs = pd.DataFrame({
        "k": [1, 1, 1, 1, 2],
        "status": ["completed", "completed", "diverged", "failed", "diverged"],
        "loss": [1.0, 2.0, 100.0, 50.0, 9.0],
    })  # fmt: skip
    agg = aggregate(runs, ["k"], ["loss", "absent"])
    assert agg[["k", "runs", "diverged", "failed", "loss_n", "absent_n"]].values.tolist() == [
        [1, 4, 1, 1, 2, 0],
        [2, 1, 1, 0, 0, 0],
    ]
    assert agg["loss"][0] == pytest.approx(1.5)
    assert agg["loss_std"][0] == pytest.approx(math.sqrt(0.5))
    assert math.isnan(agg["loss"][1]) and math.isnan(agg["loss_std"][1]) and math.isnan(agg["absent"][0])
    assert [mean_std(r, "loss") for _, r in agg.iterrows()] == ["1.500 ± 0.707", "-"]


def test_binomial_std() -> None:
    assert binomial_std(0.5, 100) == pytest.approx(0.05)
    assert binomial_std(1.0, 100) == pytest.approx(1e-7)  # floored, never a zero noise
    assert math.isnan(binomial_std(0.5, 0))
    assert math.isnan(binomial_std(math.nan, 100))


def test_a_fully_diverged_group_is_marked_and_left_out_of_the_verdict(tmp_path: Path) -> None:
    rows = [
        row({"moe.top_k": 1}, final_val_loss=1.93),
        row({"moe.top_k": 2}, final_val_loss=1.90),
        row({"moe.top_k": 4}, "diverged", diverged_at_step=50, final_val_loss=9.0),
    ]
    write_study(tmp_path, "top-k", rows)
    report = build("top-k", load_study(tmp_path, "top-k"))
    assert report.verdict.reproduced == "yes"  # the two completed k still answer the question
    assert report.notes == ["moe.top_k=4: 1 diverged, 0 failed of 1 runs (left out of the means)"]


def test_diverged_groups_are_missing_evidence_not_evidence_against(tmp_path: Path) -> None:
    build_router_fluctuation(tmp_path)
    set_runs(tmp_path, "router-fluctuation", "status", "diverged", lambda runs: runs["moe"] == "base")
    report = build("router-fluctuation", load_study(tmp_path, "router-fluctuation"))
    assert report.verdict.reproduced == "yes" and "base" not in report.verdict.ours
    assert report.notes == ["moe=base: 1 diverged, 0 failed of 1 runs (left out of the means)"]

    build_overfit(tmp_path)
    dense_large = lambda runs: (runs["task"] == "synth-large") & runs["finetune.pretrained"].str.startswith("dense")  # noqa: E731
    set_runs(tmp_path, "overfit", "status", "failed", dense_large)
    assert verdict(tmp_path, "overfit") == "no data"


def test_a_runs_csv_without_a_needed_column_is_no_data_not_a_crash(tmp_path: Path) -> None:
    write_study(tmp_path, "top-k", [row({"moe.topk": 1}, final_val_loss=1.9), row({"moe.topk": 2}, final_val_loss=1.8)])
    report = build("top-k", load_study(tmp_path, "top-k"))
    assert report.verdict.reproduced == "no data" and "'moe.top_k'" in report.verdict.checked
    result = run_cli("report", "top-k", "--results", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
