"""`moe-lab report` on small results trees built here: tables, verdicts, figures, md/html/csv, the CLI."""

from __future__ import annotations

import base64
import itertools
import json
import math
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from moe_lab.paths import records_path
from moe_lab.report import make_report
from moe_lab.report.render import inline_markdown
from moe_lab.report.results import ResultsError, aggregate, load_study
from moe_lab.report.spec import KEYS, StudySpecError, study_spec
from moe_lab.report.stats import estimates
from moe_lab.report.studies import build, figures, names
from moe_lab.report.studies.z_loss_stability import fewer_diverged, lr_sensitivity
from tests.conftest import run_cli
from tests.test_run_safety import assert_one_line_error

STUDIES = names()  # every study file with a builder, in the report's order

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
    runs = pd.read_csv(path, dtype={column: str} if isinstance(value, str) else None)  # "0000" stays a string
    chosen = where(runs)
    runs.loc[chosen, column] = value
    runs.to_csv(path, index=False)
    for record, is_chosen in zip(runs.to_dict("records"), chosen, strict=True):
        summary_path = root / name / "runs" / record["run"] / "summary.json"
        summary = json.loads(summary_path.read_text())
        summary.update({k: v for k, v in record.items() if k in summary or (k == column and is_chosen)})
        summary_path.write_text(json.dumps(summary))


# --- seeds ------------------------------------------------------------------------------------------------------

SEEDS = (0, 1, 2)
# seed noise of +-0.002 (scaled by NOISE); setting `shift` gets the shift-th ordering, so two settings in one
# comparison do not share it exactly and their paired difference keeps a standard error
NOISE = 0.002
ORDERS = list(itertools.permutations((-1, 0, 1)))


def noise(seed: int, shift: int) -> float:
    return NOISE * ORDERS[shift % len(ORDERS)][seed % 3]


def per_seed(value: float | list[float], shift: int, seeds: tuple[int, ...] | None = None) -> list[float]:
    """A setting's value at each seed (SEEDS by default): `value` plus the seed noise (exact for one seed), or a
    list as it is."""
    seeds = SEEDS if seeds is None else seeds
    if isinstance(value, list):
        return value
    return [value] if len(seeds) == 1 else [value + noise(s, shift) for s in seeds]


# --- per-run files ----------------------------------------------------------------------------------------------


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


# --- one builder per study: agree=True gives the paper's finding by a margin the seeds resolve -----------------


def write_top_k(root: Path, losses: dict[int, float | list[float]], seeds: tuple[int, ...] = SEEDS) -> None:
    rows = []
    for i, (k, loss) in enumerate(losses.items()):
        for s, v in zip(seeds, per_seed(loss, i, seeds), strict=True):
            swept = {"moe.top_k": k} if len(seeds) == 1 else {"moe.top_k": k, "seed": s}
            rows.append(row(swept, final_val_loss=v, tokens_per_s=20000.0 - 4000 * i))
    write_study(root, "top-k", rows, {r["run"]: {"metrics.csv": loss_metrics(r["final_val_loss"])} for r in rows})


def build_top_k(root: Path, agree: bool = True) -> None:
    losses = [1.930, 1.905, 1.856] if agree else [1.856, 1.905, 1.930]
    write_top_k(root, dict(zip([1, 2, 4], losses, strict=True)))


def write_capacity_factor(
    root: Path, losses: dict[float, dict[float, float | list[float]]], dropped: dict[float, dict[float, float]]
) -> None:
    """losses[train CF][eval CF] and the fraction dropped there, for every seed."""
    rows = []
    for i, (train_cf, at) in enumerate(losses.items()):
        values = {eval_cf: per_seed(loss, i + j) for j, (eval_cf, loss) in enumerate(at.items())}
        for n, s in enumerate(SEEDS):
            metrics = {}
            for eval_cf in at:
                metrics[f"final_val_loss@cf{eval_cf:g}"] = values[eval_cf][n]
                metrics[f"final_dropped_frac@cf{eval_cf:g}"] = dropped[train_cf][eval_cf]
            rows.append(
                row({"moe.train_capacity_factor": train_cf, "seed": s}, **metrics, tokens_per_s=5000.0 * train_cf)
            )
    write_study(root, "capacity-factor", rows)


def build_capacity_factor(root: Path, agree: bool = True) -> None:
    # train CF 1 drops 10% at eval CF 1: claim (1) compares its eval CF 1 and 2; train CF 2 is at the top eval CF.
    # agree: raising the eval CF helps, and so does raising the train CF (by 0.05, which 2 seeds resolve at
    # t 12.7); flipped: both hurt
    at1, at2 = (
        ({1.0: 1.95, 2.0: 1.93}, {1.0: 1.94, 2.0: 1.88}) if agree else ({1.0: 1.90, 2.0: 1.95}, {1.0: 1.91, 2.0: 2.00})
    )
    write_capacity_factor(root, {1.0: at1, 2.0: at2}, {1.0: {1.0: 0.1, 2.0: 0.0}, 2.0: {1.0: 0.02, 2.0: 0.0}})


Z_LRS = (0.01, 0.1, 1.0)
UNIGRAM = 3.0  # every z-loss run's summary.json unigram loss: the LR sensitivity's cap


def write_z_loss(root: Path, settings: dict[str, dict[float, list[tuple[str, float]]]], noisy: bool = True) -> None:
    """{setting: {lr: [(status, val loss) per seed]}}; a baseline's max router logit is 30, any other's 2; each
    (setting, lr) gets its own seed-noise ordering (none if not `noisy`)."""
    rows = []
    for i, (setting, by_lr) in enumerate(settings.items()):
        for j, (lr, runs) in enumerate(by_lr.items()):
            for seed, (status, loss) in enumerate(runs):
                swept = {"+stability": setting, "optim.lr": lr, "seed": seed}
                logit = 30.0 if setting == "baseline" else 2.0
                final = loss + noise(seed, i * len(by_lr) + j) if noisy else loss
                rows.append(row(swept, status, final_val_loss=final, moe_max_logit=logit))
    files = {
        r["run"]: {"metrics.csv": loss_metrics(r["final_val_loss"]), "summary.json": {"unigram_val_loss": UNIGRAM}}
        for r in rows
    }
    write_study(root, "z-loss-stability", rows, files)


def lr_sweep(
    losses: tuple[float | None, ...], seeds: int = 2, lrs: tuple[float, ...] = Z_LRS
) -> dict[float, list[tuple[str, float]]]:
    """One setting's runs over `lrs`: a loss completes at every seed, None diverges at every seed (loss 7.0)."""
    return {
        lr: [("completed", v)] * seeds if v is not None else [("diverged", 7.0)] * seeds
        for lr, v in zip(lrs, losses, strict=True)
    }


def build_z_loss(root: Path, agree: bool = True) -> None:
    """agree: baseline diverges at lr 0.1 and 1 (4/6 runs), z-loss nowhere (0/6: one-sided Fisher p = 28/924 =
    0.03), and z-loss at its best lr (0.1) is 0.05 better than baseline at its (0.01); flipped: the other way round,
    z-loss 0.45 worse."""
    if agree:
        write_z_loss(root, {"baseline": lr_sweep((2.50, None, None)), "z-loss": lr_sweep((2.50, 2.45, 2.90))})
    else:
        write_z_loss(root, {"baseline": lr_sweep((2.50, 2.45, 2.80)), "z-loss": lr_sweep((2.90, None, None))})


ROUTERS = ("stablemoe", "switch", "st-moe", "base", "hash")


def build_router_fluctuation(root: Path, agree: bool = True) -> None:
    late = {"switch": 0.15, "st-moe": 0.1, "base": 0.2, "hash": 0.0, "stablemoe": 0.0 if agree else 0.1}
    ppl = {"switch": 19.8, "st-moe": 19.6, "base": 20.0, "hash": 19.7, "stablemoe": 19.3 if agree else 20.5}
    rows = []
    for i, m in enumerate(ROUTERS):
        fluct = {"fluctuation@0.2": 2 * late[m], "fluctuation@0.5": late[m], "fluctuation@0.8": late[m]}
        for s, loss in zip(SEEDS, per_seed(math.log(ppl[m]), i), strict=True):
            rows.append(row({"moe": m, "seed": s}, final_val_ppl=math.exp(loss), final_val_loss=loss,
                            moe_dropped_frac=0.01, eval_moe_dropped_frac=0.0, **fluct))  # fmt: skip
    files = {
        r["run"]: {
            "fluctuation.csv": fluctuation_table(late[r["moe"]]),
            "metrics.csv": expert_metrics([0.4, 0.3, 0.2, 0.1]),
            "specialisation.csv": specialisation_table(),
        }
        for r in rows
    }
    write_study(root, "router-fluctuation", rows, files)


def write_stablemoe(root: Path, ppl: dict[float, float]) -> None:
    rows = []
    for i, (f, p) in enumerate(ppl.items()):
        for s, loss in zip(SEEDS, per_seed(math.log(p), i), strict=True):
            rows.append(row({"moe.stage1_fraction": f, "seed": s}, final_val_ppl=math.exp(loss), final_val_loss=loss))
    write_study(root, "stablemoe", rows, {r["run"]: {"fluctuation.csv": fluctuation_table(0.0)} for r in rows})


def build_stablemoe(root: Path, agree: bool = True) -> None:
    ppl = [19.0, 19.4, 19.7, 20.0] if agree else [20.0, 19.7, 19.4, 19.0]
    write_stablemoe(root, dict(zip([0.1, 0.25, 0.5, 1.0], ppl, strict=True)))


def build_freeze(
    root: Path,
    agree: bool = True,
    moe: float | None = None,
    summary: dict | None = None,
    seeds: tuple[int, ...] = SEEDS,
    f1: dict[str, float] | None = None,
) -> None:
    """Validation accuracy per preset (moe worst when agree); `summary` goes into every run's summary.json, and
    `f1` (per preset) adds final_val_f1."""
    acc = {"all": 0.62, "non_moe": 0.61, "moe": 0.50 if agree else 0.70, "attention": 0.60, "ffn": 0.63}
    if moe is not None:
        acc["moe"] = moe
    rows = []
    for i, (k, v) in enumerate(acc.items()):
        f1_values = per_seed(f1[k], i + 1, seeds) if f1 else [None] * len(seeds)
        for s, a, f in zip(seeds, per_seed(v, i, seeds), f1_values, strict=True):
            extra = {} if f is None else {"final_val_f1": f}
            swept = {"finetune.freeze": k, "task": "synth-large", "seed": s}
            rows.append(row(swept, trainable_parameters=1000 * (i + 1), final_val_accuracy=a,
                            best_val_accuracy=a + 0.01, final_train_accuracy=a + 0.05, **extra))  # fmt: skip
    files = {
        r["run"]: {
            "metrics.csv": accuracy_metrics(r["final_train_accuracy"], r["final_val_accuracy"]),
            "summary.json": summary or {},
        }
        for r in rows
    }
    write_study(root, "freeze", rows, files)


def write_token_drop(root: Path, runs: list[tuple[float, float, float]]) -> None:
    """[(train CF, dropped in training, accuracy)]."""
    rows = [
        row({"moe.train_capacity_factor": cf, "seed": s}, moe_dropped_frac=d, final_val_accuracy=a)
        for i, (cf, d, acc) in enumerate(runs)
        for s, a in zip(SEEDS, per_seed(acc, i), strict=True)
    ]
    write_study(root, "token-drop", rows)


def build_token_drop(root: Path, agree: bool = True) -> None:
    # CF 0.5 drops 12%: costs a tenth of a point against CF 2's no drops (agree) or 11 points (flipped)
    write_token_drop(root, [(0.5, 0.12, 0.809 if agree else 0.70), (1.0, 0.03, 0.81), (2.0, 0.0, 0.81)])


def write_aux_loss(root: Path, runs: list[tuple[float, float, float, float]]) -> None:
    """[(aux coef, train CF, dropped, accuracy)]."""
    rows = [
        row({"moe.aux_loss_coef": a, "moe.train_capacity_factor": cf, "seed": s}, moe_dropped_frac=d,
            final_val_accuracy=v)
        for i, (a, cf, d, acc) in enumerate(runs)
        for s, v in zip(SEEDS, per_seed(acc, i), strict=True)
    ]  # fmt: skip
    write_study(root, "aux-loss-finetune", rows)


def build_aux_loss(root: Path, agree: bool = True) -> None:
    # agree: aux on wins by 5 points at both train CFs; flipped: it loses by 5
    on, off = (0.85, 0.80) if agree else (0.80, 0.85)
    write_aux_loss(
        root,
        [(0.01, 0.75, 0.10, on), (0.0, 0.75, 0.15, off), (0.01, 1.25, 0.003, on + 0.01), (0.0, 1.25, 0.03, off + 0.01)],
    )


def write_overfit(root: Path, runs: list[tuple[str, str, float, float]]) -> None:
    """[(pretrained, task, train accuracy, val accuracy)]."""
    rows = []
    for i, (p, t, tr, v) in enumerate(runs):
        for s, train, val in zip(SEEDS, per_seed(tr, i), per_seed(v, i + 1), strict=True):
            rows.append(row({"finetune.pretrained": p, "task": t, "seed": s}, final_train_accuracy=train,
                            final_val_accuracy=val, best_val_accuracy=val))  # fmt: skip
    files = {
        r["run"]: {"metrics.csv": accuracy_metrics(r["final_train_accuracy"], r["final_val_accuracy"])} for r in rows
    }
    write_study(root, "overfit", rows, files)


def build_overfit(root: Path, agree: bool = True) -> None:
    if agree:  # sparse fits the small task better but validates worse; wins the large task
        runs = [("mini", "synth-small", 0.99, 0.60), ("dense-mini", "synth-small", 0.90, 0.70),
                ("mini", "synth-large", 0.90, 0.85), ("dense-mini", "synth-large", 0.88, 0.80)]  # fmt: skip
    else:
        runs = [("mini", "synth-small", 0.80, 0.75), ("dense-mini", "synth-small", 0.95, 0.65),
                ("mini", "synth-large", 0.80, 0.75), ("dense-mini", "synth-large", 0.90, 0.85)]  # fmt: skip
    write_overfit(root, runs)


def build_finetune_grid(root: Path, agree: bool = True) -> None:
    """Every (model, task, lr, batch) at 0.70, except each model's best setting at 0.80."""
    sparse_best, dense_best = ((8, 1e-3), (32, 1e-4)) if agree else ((32, 1e-4), (8, 1e-3))
    rows = []
    for pretrained, best in (("mini", sparse_best), ("dense-mini", dense_best)):
        for task in ("synth-small", "synth-large"):
            for bs in (8, 32):
                for lr in (1e-4, 1e-3):
                    swept = {"finetune.pretrained": pretrained, "task": task, "optim.lr": lr, "train.batch_size": bs}
                    values = per_seed(0.80 if (bs, lr) == best else 0.70, len(rows) // len(SEEDS))
                    rows += [
                        row({**swept, "seed": s}, final_val_accuracy=v) for s, v in zip(SEEDS, values, strict=True)
                    ]
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
    "loss_vs_lr": "{study}-lr.png",
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


def md_tables(section: str) -> list[list[list[str]]]:
    """Every Markdown table of a section, in order: each header first, its separator line dropped."""
    tables, lines = [], section.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            block = list(itertools.takewhile(lambda x: x.startswith("|"), lines[i:]))
            assert block[1].startswith("|---"), block[:2]
            tables.append([[c.strip() for c in row.strip("|").split(" | ")] for row in [block[0], *block[2:]]])
    return tables


def md_table(section: str) -> list[list[str]]:
    """The last Markdown table of a section: a study's own table (its claims table, if any, comes first)."""
    return md_tables(section)[-1]


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
    assert [r.name for r in reports] == list(STUDIES)
    sections = md_sections((out / "report.md").read_text())
    assert list(sections) == ["Summary", "How verdicts are made", *STUDIES]
    summary = md_table(sections["Summary"])
    assert summary[0] == ["study", "paper's finding", "ours", "reproduced"]
    # each verdict with its parts' verdicts where the claim has several parts
    parts = {r.name: len(r.verdict.parts) for r in reports}
    assert [(r[0], r[3]) for r in summary[1:]] == [
        (f"`{name}`", "**yes**" + (f" (parts: {', '.join(['yes'] * parts[name])})" if parts[name] > 1 else ""))
        for name in STUDIES
    ]
    assert "![claims](plots/claims.png)" in (out / "report.md").read_text().split("## Summary")[0]

    expected_figures = {"claims.png"}
    for report in reports:
        section = sections[report.name]
        assert "**Reproduced: yes.**" in section
        claims, table = md_tables(section)  # the claims table first, then the study's own
        assert claims[0] == ["part", "paper's claim", "ours", "95% interval", "90% interval", "margin", "test",
                             "verdict"]  # fmt: skip
        assert [row[0].removesuffix(" (necessary)") for row in claims[1:]] == [p.name for p in report.verdict.parts]
        assert {row[-1] for row in claims[1:]} == {"yes"}
        assert table[0] == list(report.table.columns)
        assert len(table) - 1 == len(report.table) > 0
        assert table[1:] == [[str(v) for v in r] for r in report.table.itertuples(index=False)]
        files = [FIGURE_FILES[f.__name__].format(study=report.name) for f in figures(report.name)]
        for file in files:
            assert f"![{Path(file).stem}](plots/{file})" in section
        expected_figures |= set(files)
    assert len(expected_figures) == 12  # the claims picture; token-drop and aux-loss-finetune have none
    assert {p.name for p in (out / "plots").iterdir()} == expected_figures
    for file in expected_figures:
        assert (out / "plots" / file).read_bytes()[:8] == PNG_MAGIC

    # cells are mean ± standard error (n): three seeds of +-0.002 give a standard error of 0.002/sqrt(3) = 0.0012
    tables = {r.name: md_table(sections[r.name]) for r in reports}
    assert tables["top-k"][1][:2] == ["1", "1.930 ± 0.001 (n=3)"]
    assert tables["capacity-factor"][1][:3] == [
        "1", "1.950 ± 0.001 (n=3) (10.0% dropped)", "1.930 ± 0.001 (n=3) (0.0% dropped)"
    ]  # fmt: skip
    # perplexity 20 * exp(+-0.002): std 0.040, standard error 0.023
    assert tables["router-fluctuation"][1][:4] == [
        "base",
        "20.000 ± 0.023 (n=3)",
        "40.0% / 20.0% / 20.0%",
        "1.0% / 0.0%",
    ]
    # two seeds per (setting, lr): baseline at lr 0.01 2.498 and 2.500, standard error |a - b| / 2 = 0.001; z-loss
    # at 0.1 2.452 and 2.448 (0.002). LR sensitivity per seed, capped at the unigram loss 3.0 where a lr diverged:
    # baseline mean(2.498, 3, 3) - 2.498 = 0.3347 and mean(2.500, 3, 3) - 2.500 = 0.3333, so 0.334 +- 0.0007;
    # z-loss (2.500, 2.452, 2.902) -> 0.1660 and (2.502, 2.448, 2.900) -> 0.1687, so 0.167 +- 0.0013
    assert tables["z-loss-stability"][:3] == [
        ["setting", "lr 0.01", "lr 0.1", "lr 1", "stable lrs", "LR sensitivity", "max router logit (best lr)",
         "paper stable", "paper quality"],
        ["baseline", "2.499 ± 0.001 (n=2) [2/2 stable]", "- [0/2 stable]", "- [0/2 stable]", "0.01",
         "0.334 ± 0.001 (n=2)", "30.000", "4/6", "-1.755"],
        ["z-loss", "2.501 ± 0.001 (n=2) [2/2 stable]", "2.450 ± 0.002 (n=2) [2/2 stable]",
         "2.901 ± 0.001 (n=2) [2/2 stable]", "0.01, 0.1, 1", "0.167 ± 0.001 (n=2)", "2.000", "3/3", "-1.741"],
    ]  # fmt: skip
    assert tables["stablemoe"][4][:2] == ["stage 1 only", "20.000 ± 0.023 (n=3)"]
    assert tables["freeze"][1][:3] == ["all", "0.620 ± 0.001 (n=3)", "0.630 ± 0.001 (n=3)"]
    assert tables["finetune-grid"][0] == ["task", "model", "lr", "batch 32", "batch 8"]
    assert tables["finetune-grid"][1] == [
        "synth-large",
        "dense",
        "0.0001",
        "0.800 ± 0.001 (n=3)",
        "0.700 ± 0.001 (n=3)",
    ]


# --- 2. the verdict follows the numbers ---------------------------------------------------------------------------


@pytest.mark.parametrize("seeds", [3, 2, 5])
@pytest.mark.parametrize("name", list(FIXTURES))
@pytest.mark.parametrize(("agree", "expected"), [(True, "yes"), (False, "no")])
def test_verdict_flips_with_the_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, agree: bool, expected: str, seeds: int
) -> None:
    # every study's fixture at 2, 3 and 5 seeds (z-loss-stability's sweep has two seeds of its own)
    monkeypatch.setattr(sys.modules[__name__], "SEEDS", tuple(range(seeds)))
    FIXTURES[name](tmp_path, agree)
    assert verdict(tmp_path, name) == expected


def test_verdict_states_what_we_measured(tmp_path: Path) -> None:
    build_top_k(tmp_path, agree=False)
    report = build("top-k", load_study(tmp_path, "top-k"))
    # the grid of 3 k x 3 seeds, seed noise in units of 0.002: top-1 (-1, 0, 1), top-2 (-1, 1, 0), top-4 (0, -1, 1).
    # Less the seed means (-2/3, 0, 2/3), the residuals are (-1/3, 0, 1/3), (-1/3, 1, -2/3), (2/3, -1, 1/3): SS =
    # 30/9 units, over (3 - 1)(3 - 1) = 4 df an MSE of 3.33e-6, so a difference's error is sqrt(MSE * 2 / 3) = 0.0015
    assert report.verdict.ours == (
        "top-1 1.856 ± 0.001 (n=3), top-2 1.905 ± 0.001 (n=3), top-4 1.930 ± 0.001 (n=3); "
        "top-1 - top-2 -0.049 ± 0.001 (two-way 3 settings x 3 seeds, n=3, 4 df); "
        "top-2 - top-4 -0.025 ± 0.001 (two-way 3 settings x 3 seeds, n=3, 4 df)"
    )
    assert report.verdict.parts[0].difference.se == pytest.approx(math.sqrt(30 / 9 * 0.002**2 / 4 * 2 / 3))
    assert report.verdict.checked == "each step up in k lowers the validation loss"
    # the 95% interval, -0.049 +- 2.776 * 0.0015, lies wholly on the other side of 0
    assert [p.reason for p in report.verdict.parts] == ["95% interval excludes 0 on the other side"] * 2


def test_overfit_judges_each_task_against_its_own_seeds(tmp_path: Path) -> None:
    # the small task's sparse - dense moves by up to 18 points from seed to seed, the large task's by half a point:
    # pooled over both tasks, the large task's clear gain would inherit the small task's noise
    small_sparse, small_dense = [0.60, 0.70, 0.50], [0.66, 0.62, 0.60]
    large_sparse, large_dense = [0.85, 0.86, 0.87], [0.80, 0.815, 0.825]
    write_overfit(tmp_path, [
        ("mini", "synth-small", 0.99, small_sparse),
        ("dense-mini", "synth-small", 0.9, small_dense),
        ("mini", "synth-large", 0.9, large_sparse),
        ("dense-mini", "synth-large", 0.9, large_dense),
    ])  # fmt: skip
    parts = build("overfit", load_study(tmp_path, "overfit")).verdict.parts
    for part, a, b in ((parts[0], small_sparse, small_dense), (parts[1], large_sparse, large_dense)):
        deltas = np.subtract(a, b)
        assert part.difference.method == "paired by seed" and part.difference.df == 2
        assert part.difference.value == pytest.approx(deltas.mean())
        assert part.difference.se == pytest.approx(deltas.std(ddof=1) / math.sqrt(3))
    assert [p.verdict for p in parts] == ["inconclusive", "yes"]


def test_finetune_grid_judges_its_interactions_within_each_pretraining(tmp_path: Path) -> None:
    # each model's pretraining at a seed moves all four of its cells (offsets up to 6 points, not shared by the
    # other model); the sparse model gains 3 points from the smaller batch and from the higher lr, the dense none
    offsets = {"mini": (0.0, 0.06, -0.04), "dense-mini": (0.05, -0.06, 0.01)}
    rows = []
    for pretrained, gain in (("mini", 0.03), ("dense-mini", 0.0)):
        for shift, (bs, lr) in enumerate(itertools.product((8, 32), (1e-4, 1e-3))):
            value = 0.80 + gain * ((bs == 8) + (lr == 1e-3))
            swept = {"finetune.pretrained": pretrained, "task": "synth-large", "optim.lr": lr, "train.batch_size": bs}
            for s, v in zip(SEEDS, per_seed(value, shift), strict=True):
                rows.append(row({**swept, "seed": s}, final_val_accuracy=v + offsets[pretrained][s]))
    write_study(tmp_path, "finetune-grid", rows)
    report = build("finetune-grid", load_study(tmp_path, "finetune-grid"))
    parts = report.verdict.parts
    # blocks: model x seed, so the offsets cancel: each model's residual over (4 - 1)(3 - 1) = 6 df, 12 in all
    assert [(p.difference.method, p.difference.df) for p in parts] == [
        ("two-way within 2 base models, 8 settings x 3 seeds", 12)
    ] * 2
    assert [p.difference.value for p in parts] == [pytest.approx(0.03)] * 2
    # seed as the only block, the offsets' spread (about 5 points) would put the error near 2 points, not 0.1
    assert all(p.difference.se < 0.002 for p in parts)
    assert report.verdict.reproduced == "yes"


def test_aux_loss_finetune_judges_on_against_off_within_each_train_cf(tmp_path: Path) -> None:
    # at every seed on - off is +0.1 points (+-0.05) at both CFs, but seed 1's CF effect is 5 points (CF 0.75 at
    # 0.80, CF 1.25 at 0.85) against the others' 0: a two-way layout of 4 settings x 3 seeds pools that CF x seed
    # term into both parts' error (se about 1.4 points); blocked by CF x seed it is no part of on - off
    on_minus_off = {0.75: (0.0010, 0.0015, 0.0005), 1.25: (0.0005, 0.0010, 0.0015)}
    runs = []
    for cf in (0.75, 1.25):
        base = [0.80, 0.80 if cf == 0.75 else 0.85, 0.80]
        runs += [(0.0, cf, 0.1, base), (0.01, cf, 0.1, [b + d for b, d in zip(base, on_minus_off[cf], strict=True)])]
    write_aux_loss(tmp_path, runs)
    parts = build("aux-loss-finetune", load_study(tmp_path, "aux-loss-finetune")).verdict.parts
    # per CF, (2 - 1)(3 - 1) = 2 df, 4 in all; the residual is the on - off spread within each CF
    assert [(p.difference.method, p.difference.df) for p in parts] == [
        ("two-way within 2 train CFs, 4 settings x 3 seeds", 4)
    ] * 2
    assert [p.difference.value for p in parts] == [pytest.approx(0.001)] * 2
    within = sum(np.var(d, ddof=1) / 2 for d in on_minus_off.values()) / 2  # each CF's residual MS, pooled
    assert [p.difference.se for p in parts] == [pytest.approx(math.sqrt(2 * within / 3))] * 2
    # +0.1 +- 0.03 points: both 90% intervals lie inside the 0.4-point margin (the pooled grid's would not)
    assert [p.verdict for p in parts] == ["no", "no"]


# each writer below makes one case between a clear yes and a clear no (or a clear no by another path)


def _top_k_partly(root: Path) -> None:  # top-2 worse than top-1, top-4 better than top-2
    write_top_k(root, {1: 1.93, 2: 1.95, 4: 1.90})


def _top_k_tie(root: Path) -> None:  # top-1 and top-2 equal at every seed: never agreement; top-4 clearly better
    same = [1.931, 1.925, 1.936]
    write_top_k(root, {1: same, 2: list(same), 4: 1.85})


def _top_k_one_seed(root: Path) -> None:  # the paper's direction by 0.03-0.05, but one seed: a loss has no error
    write_top_k(root, {1: 1.93, 2: 1.90, 4: 1.85}, seeds=(0,))


def _top_k_wrong_way(root: Path) -> None:  # each step up in k raises the loss by 0.02, far beyond 2 errors
    write_top_k(root, {1: 1.90, 2: 1.92, 4: 1.94})


def _capacity_factor_partly(root: Path) -> None:  # eval CF up helps, a higher train CF does not
    losses = {1.0: {1.0: 1.95, 2.0: 1.93}, 2.0: {1.0: 1.96, 2.0: 1.94}}
    write_capacity_factor(root, losses, {1.0: {1.0: 0.1, 2.0: 0.0}, 2.0: {1.0: 0.05, 2.0: 0.0}})


def _capacity_factor_grid(cf2_drop: float) -> object:
    """Train and eval CF 1, 2, 4: train CF 2 drops `cf2_drop` at eval CF 2, where its loss equals that at 4."""

    def write(root: Path) -> None:
        tied = [1.912, 1.905, 1.909]
        losses = {
            1.0: {1.0: 1.95, 2.0: 1.93, 4.0: 1.92},
            2.0: {1.0: 1.99, 2.0: tied, 4.0: list(tied)},
            4.0: {1.0: 2.00, 2.0: 1.93, 4.0: 1.90},
        }
        dropped = {1.0: {1.0: 0.1, 2.0: 0.01, 4.0: 0.0}, 2.0: {1.0: 0.2, 2.0: cf2_drop, 4.0: 0.0}}
        write_capacity_factor(root, losses, dropped | {4.0: {1.0: 0.3, 2.0: 0.05, 4.0: 0.0}})

    write.__name__ = f"_capacity_factor_cf2_drops_{cf2_drop:g}"
    return write


def _z_loss_nothing_diverged(root: Path) -> None:  # the sweep never reached instability: no range to compare
    write_z_loss(root, {"baseline": lr_sweep((2.50, 2.45, 2.80)), "z-loss": lr_sweep((2.50, 2.45, 2.80))})


def _z_loss_as_many_diverged(root: Path) -> None:
    # both diverge at lr 1 only: z-loss's LR sensitivity is lower by 0.033 +- 0.003 over 2 seeds (1 df: t 12.7, so
    # inconclusive), but z-loss at its best lr (0.1) is 0.100 +- 0.004 worse than baseline at its (0.1): the
    # necessary no-cost part is no, and so is the claim
    write_z_loss(root, {"baseline": lr_sweep((2.50, 2.45, None)), "z-loss": lr_sweep((2.60, 2.55, None))})


def _z_loss_stable_but_worse(root: Path) -> None:  # less LR-sensitive, but 0.101 +- 0.003 worse at the best lrs
    write_z_loss(root, {"baseline": lr_sweep((2.50, None, None)), "z-loss": lr_sweep((2.60, 2.60, 2.70))})


def _z_loss_cost_near_the_margin(root: Path) -> None:
    # fewer divergences (p = 0.03); z-loss at lr 0.1 minus baseline at 0.01, per seed 2.509 - 2.498 and
    # 2.505 - 2.500: 0.008 +- 0.003, an interval reaching past the 0.01 margin
    write_z_loss(root, {"baseline": lr_sweep((2.50, None, None)), "z-loss": lr_sweep((2.52, 2.507, 2.60))})


def _z_loss_sweep_still_running(root: Path) -> None:
    # z-loss has not reached lr 1, where baseline diverged (6 seeds): LR sensitivity over every lr would favour
    # z-loss; over the lrs both ran (0.01, 0.1) nothing diverged, so the sensitivity part cannot decide
    baseline, z_loss = lr_sweep((2.50, 2.45, None), seeds=6), lr_sweep((2.50, 2.45), seeds=6, lrs=Z_LRS[:2])
    write_z_loss(root, {"baseline": baseline, "z-loss": z_loss})


def _router_fluctuation_partly(root: Path) -> None:  # fluctuation as in the paper, StableMoE not the best loss
    build_router_fluctuation(root)
    stablemoe = lambda runs: runs["moe"] == "stablemoe"  # noqa: E731
    set_runs(root, "router-fluctuation", "final_val_ppl", 25.0, stablemoe)
    set_runs(root, "router-fluctuation", "final_val_loss", math.log(25.0), stablemoe)


def _router_fluctuation_eval_drops(drop: float) -> object:
    """The agreeing numbers, with StableMoE dropping `drop` of the tokens at evaluation and the others none."""

    def write(root: Path) -> None:
        build_router_fluctuation(root)
        set_runs(root, "router-fluctuation", "eval_moe_dropped_frac", drop, lambda runs: runs["moe"] == "stablemoe")

    write.__name__ = f"_router_fluctuation_stablemoe_eval_drops_{drop:g}"
    return write


def _stablemoe_partly(root: Path) -> None:  # the shortest stage 1 is best of the two-stage runs, stage 1 alone beats it
    write_stablemoe(root, {0.1: 19.0, 0.25: 19.4, 1.0: 18.6})


def _freeze_close(root: Path) -> None:
    # MoE-only behind attention by 0.1 points: the 90% interval (+0.1 +- 1.86 * 0.2) lies inside the 1-point
    # margin, so MoE-only is not clearly worse than attention, a necessary part: no
    build_freeze(root, moe=0.599)


def _freeze_unresolved(root: Path) -> None:
    # MoE-only behind attention by 0.5 points, its seeds spread by +-1.5 points: the pooled residual gives the
    # difference an error of 0.6 points (8 df), so the 95% interval holds 0 and the 90% one crosses the margin
    build_freeze(root, moe=[0.58, 0.61, 0.595])


def _freeze_one_seed(summary: dict | None) -> object:
    """One seed, MoE-only worst by 5 points (0.55 against 0.60), the task's size as `summary` records it."""

    def write(root: Path) -> None:
        build_freeze(root, moe=0.55, seeds=(0,), summary=summary)

    size = (summary or {}).get("val_examples") or (summary or {}).get("config", {}).get("task", {}).get("synthetic_val")
    write.__name__ = f"_freeze_one_seed_on_{size}_examples"
    return write


F1 = {"all": 0.55, "non_moe": 0.54, "moe": 0.60, "attention": 0.53, "ffn": 0.56}  # MoE-only the best by macro-F1


def _freeze_f1_task(root: Path) -> None:  # accuracy says MoE-only is worst; the task's metric, F1, says best
    build_freeze(root, summary={"metric": "f1_macro"}, f1=F1)


def _freeze_f1_numbers_on_an_accuracy_task(root: Path) -> None:  # the same runs, judged on accuracy
    build_freeze(root, summary={"metric": "accuracy"}, f1=F1)


def _token_drop_no_dropping(root: Path) -> None:  # no CF drops 5-20%: the claim is not tested
    write_token_drop(root, [(1.0, 0.03, 0.8), (2.0, 0.0, 0.8)])


def _token_drop_cost_at_the_margin(root: Path) -> None:  # a cost of 0.01: neither below nor above the margin
    write_token_drop(root, [(0.5, 0.12, 0.80), (2.0, 0.0, 0.81)])


def _overfit_within_noise(root: Path) -> None:  # the agreeing direction, differences of 0.1 points
    write_overfit(root, [("mini", "synth-small", 1.0, 0.700), ("dense-mini", "synth-small", 0.9, 0.701),
                         ("mini", "synth-large", 0.9, 0.801), ("dense-mini", "synth-large", 0.9, 0.800)])  # fmt: skip


def _aux_loss_no_win(root: Path) -> None:  # aux on ahead by 0.001, within the seeds' noise
    write_aux_loss(root, [(0.01, 0.75, 0.10, 0.801), (0.0, 0.75, 0.15, 0.800)])


@pytest.mark.parametrize(
    ("name", "write", "expected"),
    [
        ("top-k", _top_k_partly, "partly"),
        ("top-k", _top_k_tie, "inconclusive"),
        ("top-k", _top_k_one_seed, "inconclusive"),
        ("top-k", _top_k_wrong_way, "no"),
        ("capacity-factor", _capacity_factor_partly, "partly"),
        ("capacity-factor", _capacity_factor_grid(cf2_drop=0.0), "yes"),  # train CF 2 is left out of (1)
        # train CF 2 drops 1% at eval CF 2 yet gains nothing at eval CF 4: inside the margin, that part is no
        ("capacity-factor", _capacity_factor_grid(cf2_drop=0.01), "partly"),
        ("z-loss-stability", _z_loss_nothing_diverged, "inconclusive"),
        ("z-loss-stability", _z_loss_as_many_diverged, "no"),
        ("z-loss-stability", _z_loss_stable_but_worse, "no"),  # no quality cost is a necessary part
        ("z-loss-stability", _z_loss_cost_near_the_margin, "inconclusive"),
        ("z-loss-stability", _z_loss_sweep_still_running, "inconclusive"),
        ("router-fluctuation", _router_fluctuation_partly, "partly"),
        ("router-fluctuation", _router_fluctuation_eval_drops(0.02), "inconclusive"),  # confounded
        ("router-fluctuation", _router_fluctuation_eval_drops(0.004), "yes"),  # within the 0.5% tolerance
        ("stablemoe", _stablemoe_partly, "partly"),
        ("freeze", _freeze_close, "no"),
        ("freeze", _freeze_unresolved, "inconclusive"),
        # one seed measures no training noise, however many validation examples: 5 points decide nothing
        ("freeze", _freeze_one_seed({"metric": "accuracy", "val_examples": 5000}), "inconclusive"),
        ("freeze", _freeze_f1_task, "no"),
        ("freeze", _freeze_f1_numbers_on_an_accuracy_task, "yes"),
        ("token-drop", _token_drop_no_dropping, "inconclusive"),
        ("token-drop", _token_drop_cost_at_the_margin, "inconclusive"),
        ("overfit", _overfit_within_noise, "no"),  # both differences inside the 1-point margin
        ("aux-loss-finetune", _aux_loss_no_win, "inconclusive"),
    ],
    ids=lambda v: v if isinstance(v, str) else getattr(v, "__name__", None),
)
def test_verdict_between_yes_and_no(tmp_path: Path, name: str, write, expected: str) -> None:
    write(tmp_path)
    assert verdict(tmp_path, name) == expected


def write_val_records(root: Path, study: str, run: str, step: int, correct: list[bool]) -> None:
    """A fine-tuning run's per-example records of its evaluation at `step` (label 0, predicted right or not)."""
    path = records_path(root / study / "runs" / run, "val", step)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({
        "example": range(len(correct)),
        "label": 0,
        "prediction": [0 if c else 1 for c in correct],
        "label_logprob": [-0.1 if c else -2.3 for c in correct],
    }).to_csv(path, index=False, compression="gzip")  # fmt: skip


def test_one_seed_pairs_by_example_but_decides_nothing(tmp_path: Path) -> None:
    _freeze_one_seed({"metric": "accuracy", "val_examples": 100, "step": 40})(tmp_path)
    runs = pd.read_csv(tmp_path / "freeze" / "runs.csv").set_index("finetune.freeze")["run"]
    # attention right on examples 0-59, moe on 0-54: they differ on 5 of the 100 shared examples
    write_val_records(tmp_path, "freeze", runs["attention"], 40, [i < 60 for i in range(100)])
    write_val_records(tmp_path, "freeze", runs["moe"], 40, [i < 55 for i in range(100)])
    report = build("freeze", load_study(tmp_path, "freeze"))
    assert report.table.iloc[0].tolist() == ["all", "0.620 (n=1)", "0.630 (n=1)", "1000"]  # no error without seeds
    attention = next(p for p in report.verdict.parts if p.name == "attention - moe")
    # per example attention - moe is 1 five times and 0 95 times: mean 0.05, variance (5 * 0.95^2 + 95 * 0.05^2)
    # / 99 = 0.0480, so the validation set's share of the error is sqrt(0.0480 / 100) = 0.0219
    assert attention.difference.value == pytest.approx(0.05)
    assert attention.difference.eval_se == pytest.approx(math.sqrt(4.75 / 99 / 100))
    assert attention.text() == "attention - moe +5.0 (one seed, n=1; validation set ± 2.2)"
    # one seed measures no training noise: every part, and the claim, stays inconclusive
    assert {p.reason for p in report.verdict.parts} == {"one seed measures no training noise"}
    assert report.verdict.reproduced == "inconclusive"
    # without records the seed's value is the summary's, with no error at all
    other = next(p for p in report.verdict.parts if p.name == "ffn - moe")
    assert other.text() == "ffn - moe +8.0 (one seed, n=1)"


def test_an_f1_task_is_judged_and_shown_on_macro_f1(tmp_path: Path) -> None:
    _freeze_f1_task(tmp_path)
    report = build("freeze", load_study(tmp_path, "freeze"))
    assert list(report.table.columns) == [
        "update",
        "val f1_macro (final)",
        "val accuracy (best)",
        "trainable parameters",
    ]
    assert report.table.set_index("update")["val f1_macro (final)"].to_dict() == {
        "all": "0.550 ± 0.001 (n=3)", "attention": "0.530 ± 0.001 (n=3)", "ffn": "0.560 ± 0.001 (n=3)",
        "moe": "0.600 ± 0.001 (n=3)", "non_moe": "0.540 ± 0.001 (n=3)",
    }  # fmt: skip
    # judged on F1, MoE-only is the best: 7 points ahead of attention, which accuracy ranks above it
    assert "attention - moe -7.0 ± 0.2" in report.verdict.ours
    assert report.verdict.checked.endswith("judged on validation f1_macro")
    assert [p.unit for p in report.verdict.parts] == ["points of f1_macro"] * 4


def test_capacity_factor_says_which_train_cf_it_left_out(tmp_path: Path) -> None:
    _capacity_factor_grid(cf2_drop=0.0)(tmp_path)
    report = build("capacity-factor", load_study(tmp_path, "capacity-factor"))
    assert report.verdict.checked.endswith("; train CF 2 dropped nothing at its own eval CF and is left out of (1)")
    assert report.verdict.ours.startswith("train CF 1: eval CF 1 - 4 +0.030 ± ")
    assert "train CF 2:" not in report.verdict.ours


def test_router_fluctuation_names_the_eval_drops_that_confound_it(tmp_path: Path) -> None:
    _router_fluctuation_eval_drops(0.02)(tmp_path)
    report = build("router-fluctuation", load_study(tmp_path, "router-fluctuation"))
    assert report.verdict.reproduced == "inconclusive"
    loss = report.verdict.parts[-1]
    assert loss.name.startswith("val loss stablemoe - ") and loss.verdict == "inconclusive"
    assert loss.reason == "confounded by eval drops: base 0.0%, hash 0.0%, st-moe 0.0%, switch 0.0%, stablemoe 2.0%"
    assert loss.row()["test"] == f"direction: {loss.reason}"


def test_token_drop_without_a_cf_in_range_says_so(tmp_path: Path) -> None:
    _token_drop_no_dropping(tmp_path)
    report = build("token-drop", load_study(tmp_path, "token-drop"))
    assert report.verdict.ours == "no capacity factor dropped 5-20% (CF 1 3.0%, CF 2 0.0%)"


def test_a_study_file_without_its_margin_is_no_data_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_top_k(tmp_path / "results")
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    (experiments / "top-k.yaml").write_text("study:\n  name: top-k\n  margins:\n    accuracy: 0.01\n")
    monkeypatch.setattr("moe_lab.report.spec.EXPERIMENTS", experiments)
    report = build("top-k", load_study(tmp_path / "results", "top-k"))
    assert report.verdict.reproduced == "no data"
    assert report.verdict.checked == (
        f"{experiments / 'top-k.yaml'}: study.margins has no 'loss' (the margin its claim is judged with); it has "
        "['accuracy']"
    )
    (experiments / "top-k.yaml").write_text("study:\n  margins:\n    loss: -0.1\n")
    report = build("top-k", load_study(tmp_path / "results", "top-k"))
    assert report.verdict.checked == f"{experiments / 'top-k.yaml'}: study.margins.loss=-0.1 is not a positive number"


def test_fewer_diverged_is_the_one_sided_fisher_exact_p() -> None:
    # hypergeometric P(X <= a_div): 12 runs, 4 diverged, 6 of them z-loss: C(8, 6) / C(12, 6)
    assert fewer_diverged(0, 6, 4, 6) == pytest.approx(28 / 924)
    assert fewer_diverged(0, 3, 3, 3) == pytest.approx(1 / 20)  # 0/3 vs 3/3 is exactly 0.05: not below it
    assert fewer_diverged(1, 3, 1, 3) == pytest.approx((4 + 12) / 20)
    assert fewer_diverged(4, 6, 0, 6) == pytest.approx(1.0)
    assert math.isnan(fewer_diverged(0, 0, 0, 0))


def test_lr_sensitivity_is_the_mean_capped_loss_over_the_lrs_minus_the_best() -> None:
    # a diverged lr (NaN) counts as the cap: mean(2.0, 1.8, 3.0) - 1.8 = 0.4667
    assert lr_sensitivity({0.01: 2.0, 0.1: 1.8, 1.0: math.nan}, cap=3.0) == pytest.approx(0.4667, abs=1e-4)
    # a loss above the cap counts as the cap: mean(2.0, 3.0) - 2.0
    assert lr_sensitivity({0.01: 2.0, 0.1: 3.5}, cap=3.0) == pytest.approx(0.5)
    assert lr_sensitivity({0.1: 1.8}, cap=3.0) == 0.0  # one lr is its own best
    # no lr completed: no best loss, no sensitivity (not a perfect 0)
    assert math.isnan(lr_sensitivity({0.1: math.nan, 1.0: math.nan}, cap=3.0))
    assert math.isnan(lr_sensitivity({}, cap=3.0))


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
        "report.md", "report.html", "report.csv", "tables/stablemoe.csv", "claims.csv"
    ]  # fmt: skip
    sections = md_sections((out / "report.md").read_text())
    assert "**Reproduced: no data.**" in sections["top-k"]
    assert "_no rows_" in sections["top-k"]
    assert "<p><i>no rows</i></p>" in (out / "report.html").read_text()
    assert {p.name for p in (out / "plots").iterdir()} == {"stablemoe-fluctuation.png", "claims.png"}


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
    done = lambda *losses: [("completed", v) for v in losses]  # noqa: E731
    base = {0.01: done(2.60, 2.62, 2.64), 0.1: [("diverged", 8.0), ("completed", 2.60), ("diverged", 9.0)]}
    z = {0.01: done(2.50, 2.52, 2.54), 0.1: done(2.46, 2.47, 2.48)}
    write_z_loss(tmp_path, {"baseline": base, "z-loss": z}, noisy=False)
    out = tmp_path / "out"
    reports, _ = make_report(tmp_path, ["z-loss-stability"], ("md",), out, Console(quiet=True))
    report = reports[0]
    # baseline at lr 0.1: one completed seed, a loss without an error, and not a stable lr; std 0.02 over 3 seeds
    # is an error of 0.02/sqrt(3) = 0.012, std 0.01 one of 0.006. LR sensitivity per seed (cap 3.0 for a diverged
    # lr): baseline mean(2.60, 3.0) - 2.60 = 0.20, mean(2.62, 2.60) - 2.60 = 0.01, mean(2.64, 3.0) - 2.64 = 0.18:
    # 0.130, std 0.104, error 0.060; z-loss 0.020, 0.025, 0.030: 0.025 +- 0.003
    assert report.table.values.tolist() == [
        ["baseline", "2.620 ± 0.012 (n=3) [3/3 stable]", "2.600 (n=1) [1/3 stable]", "0.01", "0.130 ± 0.060 (n=3)",
         "30.000", "4/6", "-1.755"],
        ["z-loss", "2.520 ± 0.012 (n=3) [3/3 stable]", "2.470 ± 0.006 (n=3) [3/3 stable]", "0.01, 0.1",
         "0.025 ± 0.003 (n=3)", "2.000", "3/3", "-1.741"],
    ]  # fmt: skip
    assert report.notes == ["+stability=baseline, optim.lr=0.1: 2 diverged, 0 failed of 3 runs (left out of the means)"]
    baseline = report.data.set_index(["+stability", "optim.lr"]).loc[("baseline", 0.1)]
    assert (baseline["runs"], baseline["diverged"], baseline["final_val_loss_n"]) == (3, 2, 1)
    assert baseline["final_val_loss"] == pytest.approx(2.60)
    # (1) z-loss - baseline per seed -0.18, +0.015, -0.15: -0.105 +- 0.061 on 2 df, an interval of +-0.26 around
    # it: inconclusive. (2) Baseline's best stable lr is 0.01 (2.62), not 0.1 with its lone 2.60; z-loss at 0.1
    # minus it, per seed -0.14, -0.15, -0.16: yes. (3) The max router logit at each one's best lr, 2 against 30 at
    # every seed: yes. 0/6 against 2/6 diverged is Fisher p = C(10, 6) / C(12, 6) = 0.227
    assert report.verdict.reproduced == "inconclusive"
    assert [p.verdict for p in report.verdict.parts] == ["inconclusive", "yes", "yes"]
    assert report.verdict.ours == (
        "diverged by lr: baseline 0.01: 0/3, 0.1: 2/3; z-loss 0.01: 0/3, 0.1: 0/3 (z-loss diverges less: one-sided "
        "Fisher p = 0.227); LR sensitivity z-loss - baseline -0.105 ± 0.061 (paired by seed, n=3, 2 df); best-lr "
        "val loss z-loss (lr 0.1) - baseline (lr 0.01) -0.150 ± 0.006 (paired by seed, n=3, 2 df); max router logit "
        "z-loss - baseline (at each one's best lr) -28.000 ± 0.000 (paired by seed, n=3, 2 df)"
    )
    section = md_sections((out / "report.md").read_text())["z-loss-stability"]
    baseline_row = (
        "| 2.620 ± 0.012 (n=3) [3/3 stable] | 2.600 (n=1) [1/3 stable] | 0.01 | 0.130 ± 0.060 (n=3) | 30.000 | 4/6 | "
        "-1.755 |"
    )
    assert f"| baseline {baseline_row}" in section
    assert "\n- +stability=baseline, optim.lr=0.1: 2 diverged, 0 failed of 3 runs" in section
    assert "![z-loss-stability-lr](plots/z-loss-stability-lr.png)" in section
    assert (out / "plots" / "z-loss-stability-lr.png").read_bytes()[:8] == PNG_MAGIC


def test_z_loss_sweep_still_running_leaves_out_the_lrs_not_run(tmp_path: Path) -> None:
    _z_loss_sweep_still_running(tmp_path)
    report = build("z-loss-stability", load_study(tmp_path, "z-loss-stability"))
    # z-loss has no lr 1 yet: an empty cell, and every LR sensitivity is over the two lrs both ran (0.01, 0.1):
    # mean(2.50, 2.45) - 2.45 = 0.025 for each, not mean(2.50, 2.45, 3.0) - 2.45 = 0.200 as if lr 1 had diverged
    assert report.table.iloc[1].tolist() == [
        "z-loss", "2.500 ± 0.001 (n=6) [6/6 stable]", "2.450 ± 0.001 (n=6) [6/6 stable]", "-", "0.01, 0.1",
        "0.025 ± 0.001 (n=6)", "2.000", "3/3", "-1.741",
    ]  # fmt: skip
    assert report.table.iloc[0]["LR sensitivity"] == "0.0250 ± 0.0004 (n=6)"
    assert report.verdict.ours.startswith("diverged by lr: baseline 0.01: 0/6, 0.1: 0/6; z-loss 0.01: 0/6, 0.1: 0/6")


def test_z_loss_pairs_its_two_settings_over_every_seed_both_ran(tmp_path: Path) -> None:
    """Baseline and z-loss run 6 seeds, as the study's `extend` has them, the three other settings 3 with seed
    noise of +-0.3 at lr 0.1: the parts pair z-loss with the baseline over the 6 seeds (5 df), judged on their
    own noise, not on a two-way layout of 5 settings x 3 seeds that pools the others' spread."""
    tiny = (-0.001, 0.001, 0.0, 0.001, -0.001, 0.0)
    wild = (-0.3, 0.3, 0.0)

    def runs(at_01: float, spread: tuple[float, ...]) -> dict[float, list[tuple[str, float]]]:
        return {
            0.01: [("completed", 2.50 + e / 10) for e in spread],
            0.1: [("completed", at_01 + e) for e in spread],
            1.0: [("diverged", 7.0)] * len(spread),
        }

    write_z_loss(tmp_path, {
        "baseline": runs(2.60, tiny), "z-loss": runs(2.57, tiny[::-1]), "jitter": runs(2.60, wild),
        "update-clip": runs(2.55, wild[::-1]), "fp32-router": runs(2.58, wild[1:] + wild[:1]),
    }, noisy=False)  # fmt: skip
    report = build("z-loss-stability", load_study(tmp_path, "z-loss-stability"))
    parts = {part.name.split(" (")[0]: part for part in report.verdict.parts}
    # each seed's sensitivity: mean(2.50, 2.60 + e, 3.0) - 2.50 for baseline, 2.57 for z-loss: -0.01 per seed
    sensitivity = parts["LR sensitivity z-loss - baseline"].difference
    assert (sensitivity.method, sensitivity.n, sensitivity.df) == ("paired by seed", 6, 5)
    assert sensitivity.value == pytest.approx(-0.01, abs=1e-9)
    assert parts["LR sensitivity z-loss - baseline"].verdict == "yes"
    assert report.verdict.reproduced == "yes"

    # z-loss's seed-5 run at lr 0.1 failed (missing evidence): that seed has no z-loss sensitivity, so the pair is
    # judged on the 5 seeds both have, still paired, not unpaired because the two seed sets differ
    z_loss = runs(2.57, tiny[::-1])
    z_loss[0.1][5] = ("failed", 2.57)
    write_z_loss(tmp_path / "failed", {"baseline": runs(2.60, tiny), "z-loss": z_loss}, noisy=False)
    report = build("z-loss-stability", load_study(tmp_path / "failed", "z-loss-stability"))
    sensitivity = report.verdict.parts[0].difference
    assert (sensitivity.method, sensitivity.n, sensitivity.df) == ("paired by seed", 5, 4)
    assert sensitivity.value == pytest.approx(-0.01, abs=1e-4)  # the 5 seeds' noise no longer sums to 0


def test_z_loss_runs_without_an_lr_column_are_one_learning_rate(tmp_path: Path) -> None:
    # a runs.csv from before the sweep: no optim.lr column; baseline 4/6 diverged, z-loss 0/6
    base = [("completed", 2.50), ("completed", 2.52)] + [("diverged", 7.0)] * 4
    z = [("completed", v) for v in (2.48, 2.49, 2.50, 2.48, 2.49, 2.50)]
    rows = [
        row({"+stability": setting, "seed": seed}, status, final_val_loss=loss, moe_max_logit=2.0)
        for setting, runs in (("baseline", base), ("z-loss", z))
        for seed, (status, loss) in enumerate(runs)
    ]
    files = {r["run"]: {"summary.json": {"unigram_val_loss": UNIGRAM}} for r in rows}
    write_study(tmp_path, "z-loss-stability", rows, files)
    out = tmp_path / "out"
    report = make_report(tmp_path, ["z-loss-stability"], ("md",), out, Console(quiet=True))[0][0]
    # z-loss: std sqrt(4e-4 / 5) = 0.0089 over 6 seeds, an error of 0.004; one lr is its own best, so each
    # completed seed's LR sensitivity is 0 (baseline's diverged seeds have none)
    assert report.table.values.tolist() == [
        ["baseline", "2.510 ± 0.010 (n=2) [2/6 stable]", "none", "0.000 ± 0.000 (n=2)", "-", "4/6", "-1.755"],
        ["z-loss", "2.490 ± 0.004 (n=6) [6/6 stable]", "not swept", "0.000 ± 0.000 (n=6)", "2.000", "3/3", "-1.741"],
    ]
    assert list(report.table.columns)[1] == "lr not swept"
    # (1) one learning rate has no LR sensitivity to compare (the counts, 0/6 against 4/6, give Fisher p = 0.03);
    # (2) has no stable baseline lr to compare against
    assert report.verdict.reproduced == "inconclusive"
    assert [p.reason for p in report.verdict.parts] == [
        "fewer than two learning rates every setting ran: no LR sensitivity to compare",
        "no standard error over seeds",
    ]
    assert report.verdict.ours.startswith(
        "diverged by lr: baseline not swept: 4/6; z-loss not swept: 0/6 (z-loss diverges less: one-sided Fisher "
        "p = 0.030)"
    )
    assert not (out / "plots" / "z-loss-stability-lr.png").exists()  # one learning rate: no curve over lr


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
    assert tree.ids == [None, None, *STUDIES]  # the summary and how verdicts are made, then one per study
    assert tree.tables == 1 + 2 * len(STUDIES)  # the summary, then each study's claims and its own table
    pngs = sorted(p.relative_to(out).as_posix() for p in (out / "plots").iterdir())
    assert sorted(img["data-source"] for img in tree.imgs) == pngs
    assert tree.imgs[0]["data-source"] == "plots/claims.png"  # the picture of every claim opens the report
    assert len(pngs) == 12
    # cells render their Markdown: the verdict in bold, the study's name as code, no asterisks left
    assert "**" not in text
    assert "<td><code>top-k</code></td>" in text and "<td><b>yes</b> (parts: yes, yes)</td>" in text
    for img in tree.imgs:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        data = base64.b64decode(img["src"][len(prefix) :], validate=True)
        assert data[:8] == PNG_MAGIC
        assert data == (out / img["data-source"]).read_bytes()


def test_inline_markdown_escapes_then_renders_bold_and_code() -> None:
    assert inline_markdown("**a<b** and `c&d`") == "<b>a&lt;b</b> and <code>c&amp;d</code>"
    assert inline_markdown("2 * 3 ** x") == "2 * 3 ** x"  # an unpaired marker stays as it is
    assert inline_markdown(0.5) == "0.5"


# --- 5. the CLI -------------------------------------------------------------------------------------------------


def test_cli_report_writes_every_format(tmp_path: Path) -> None:
    root, out = build_all(tmp_path / "results"), tmp_path / "out"
    result = run_cli("report", "--results", str(root), "--out", str(out), "--format", "md,html,csv")
    assert result.returncode == 0, result.stderr + result.stdout
    for file in ("report.md", "report.html", "report.csv", *(f"tables/{name}.csv" for name in STUDIES)):
        assert (out / file).is_file(), file
        assert f"wrote {out / file}" in " ".join(result.stdout.split())
    summary = pd.read_csv(out / "report.csv")
    assert summary["study"].tolist() == list(STUDIES)
    assert summary["reproduced"].tolist() == ["yes"] * len(STUDIES)
    top_k = pd.read_csv(out / "tables" / "top-k.csv")
    assert top_k["moe.top_k"].tolist() == [1, 2, 4]
    assert top_k["final_val_loss"].tolist() == pytest.approx([1.930, 1.905, 1.856])
    assert top_k["final_val_loss_n"].tolist() == [3, 3, 3]
    assert "## router-fluctuation" in (out / "report.md").read_text()
    assert not (root / "report.md").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuchstudy"], f"unknown study(ies) ['nosuchstudy']; known: {list(STUDIES)}"),
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
    # the table's cell is the standard error, std / sqrt(n) = sqrt(0.5) / sqrt(2) = 0.5, not the std (0.707);
    # k=2 has no completed run and no estimate
    found = estimates(runs, ["k"], "loss")
    assert list(found) == [(1,)]
    assert found[(1,)].text() == "1.500 ± 0.500 (n=2)"


def test_a_fully_diverged_group_is_marked_and_left_out_of_the_verdict(tmp_path: Path) -> None:
    rows = [
        row({"moe.top_k": k, "seed": s}, status, final_val_loss=v + noise(s, i))
        for i, (k, status, v) in enumerate(((1, "completed", 1.93), (2, "completed", 1.90), (4, "diverged", 9.0)))
        for s in SEEDS
    ]
    write_study(tmp_path, "top-k", rows)
    report = build("top-k", load_study(tmp_path, "top-k"))
    assert report.verdict.reproduced == "yes"  # the two completed k still answer the question
    assert report.notes == ["moe.top_k=4: 3 diverged, 0 failed of 3 runs (left out of the means)"]
    assert report.table["val loss (ours)"].tolist() == ["1.930 ± 0.001 (n=3)", "1.900 ± 0.001 (n=3)", "-"]


def test_diverged_groups_are_missing_evidence_not_evidence_against(tmp_path: Path) -> None:
    build_router_fluctuation(tmp_path)
    set_runs(tmp_path, "router-fluctuation", "status", "diverged", lambda runs: runs["moe"] == "base")
    report = build("router-fluctuation", load_study(tmp_path, "router-fluctuation"))
    assert report.verdict.reproduced == "yes" and "base" not in report.verdict.ours
    assert report.notes == ["moe=base: 3 diverged, 0 failed of 3 runs (left out of the means)"]

    build_overfit(tmp_path)
    dense_large = lambda runs: (runs["task"] == "synth-large") & runs["finetune.pretrained"].str.startswith("dense")  # noqa: E731
    set_runs(tmp_path, "overfit", "status", "failed", dense_large)
    assert verdict(tmp_path, "overfit") == "no data"


def test_a_runs_csv_without_its_swept_column_names_the_column_and_the_file(tmp_path: Path) -> None:
    write_study(tmp_path, "top-k", [row({"moe.topk": 1}, final_val_loss=1.9), row({"moe.topk": 2}, final_val_loss=1.8)])
    report = build("top-k", load_study(tmp_path, "top-k"))
    assert report.verdict.reproduced == "no data" and "'moe.top_k'" in report.verdict.checked
    result = run_cli("report", "top-k", "--results", str(tmp_path), "--out", str(tmp_path / "out"), "--format", "md")
    assert_one_line_error(result, f"{tmp_path / 'top-k' / 'runs.csv'} has no column 'moe.top_k'", "moe-lab sweep top-k")
    assert "**Reproduced: no data.**" in md_sections((tmp_path / "out" / "report.md").read_text())["top-k"]


@pytest.mark.parametrize(
    ("file", "cut", "needle"),
    [("summary.json", lambda text: text[: len(text) // 2], "is not valid JSON"),
     ("metrics.csv", lambda text: text[:-3], "ends in the middle of a line")],
    ids=["summary", "metrics"],
)  # fmt: skip
def test_a_run_record_cut_short_is_named_and_the_rest_is_reported(tmp_path: Path, file: str, cut, needle: str) -> None:
    root, out = tmp_path / "results", tmp_path / "out"
    build_top_k(root)
    build_stablemoe(root)
    run_dir = root / "top-k" / "runs" / "moe.top_k=2,seed=1"
    path = run_dir / file
    path.write_text(cut(path.read_text()))
    result = run_cli("report", "--results", str(root), "--out", str(out), "--format", "md")
    assert_one_line_error(result, f"{path} {needle}", f"move {run_dir} aside", "moe-lab sweep top-k")
    sections = md_sections((out / "report.md").read_text())
    assert "**Reproduced: no data.**" in sections["top-k"] and str(path) in sections["top-k"]
    assert "**Reproduced: yes.**" in sections["stablemoe"]  # the other studies are still reported


@pytest.mark.parametrize("studies", [[], ["top-k"]], ids=["all", "one"])
def test_the_report_on_a_results_directory_without_results_is_one_line(tmp_path: Path, studies: list[str]) -> None:
    results = tmp_path / "results"
    (results / "top-k" / "runs").mkdir(parents=True)  # a sweep that never wrote its runs.csv
    result = run_cli("report", *studies, "--results", str(results))
    assert_one_line_error(result, f"results directory {results} holds no study results", "moe-lab sweep STUDY")
    assert [p.relative_to(results).as_posix() for p in results.rglob("*")] == ["top-k", "top-k/runs"]


# --- the "Fine-tuning tasks" section: the overfit study's polarity runs beside the random-init sweep -------------


def _stable_metrics(val: float, previous: float | None = None) -> pd.DataFrame:
    """Evaluations ending at `val`, the one before at `previous` (val itself: a stable finish)."""
    before = val if previous is None else previous
    return pd.DataFrame({"step": [10, 20, 30], "val_accuracy": [0.5, before, val], "train_accuracy": [0.5, 0.8, 0.9]})


def write_polarity(
    root: Path, small: float, large: float, scratch: float, unstable: str | None = None, extra_seed: int | None = None
) -> None:
    """overfit: small and dense-small on polarity-small (val `small`) and polarity-large (`large`); finetune-tasks:
    both from random initialisation on polarity-small (`scratch`); the run `unstable` moves 3 points at the end;
    `extra_seed`: overfit also runs that seed (at 30%), which finetune-tasks does not."""
    rows = []
    for i, (preset, task, val) in enumerate(
        [(p, t, v) for p in ("small", "dense-small") for t, v in (("polarity-small", small), ("polarity-large", large))]
    ):
        for s, acc in zip(SEEDS, per_seed(val, i), strict=True):
            rows.append(row({"finetune.pretrained": preset, "task": task, "seed": s}, final_train_accuracy=0.9,
                            final_val_accuracy=acc, best_val_accuracy=acc))  # fmt: skip
        if extra_seed is not None:
            rows.append(row({"finetune.pretrained": preset, "task": task, "seed": extra_seed}, final_train_accuracy=0.9,
                            final_val_accuracy=0.3, best_val_accuracy=0.3))  # fmt: skip
    files = {r["run"]: {"metrics.csv": _stable_metrics(r["final_val_accuracy"])} for r in rows}
    if unstable is not None:
        files[unstable] = {"metrics.csv": _stable_metrics(0.7, 0.73)}
    write_study(root, "overfit", rows, files)
    cold = [
        row({"finetune.pretrained": p, "finetune.init": "random", "seed": s}, final_val_accuracy=acc)
        for i, p in enumerate(("small", "dense-small"))
        for s, acc in zip(SEEDS, per_seed(scratch, i + 7), strict=True)
    ]
    write_study(root, "finetune-tasks", cold, {r["run"]: {"metrics.csv": _stable_metrics(0.5)} for r in cold})


def tasks_table(root: Path) -> dict[str, list[str]]:
    make_report(root, formats=("md",), console=Console(file=sys.stderr))
    section = md_sections((root / "report.md").read_text()).get("Fine-tuning tasks")
    assert section is not None
    return {r[0]: r for r in md_table(section)[1:]}


def test_the_tasks_section_checks_each_bar(tmp_path: Path) -> None:
    write_polarity(tmp_path, small=0.72, large=0.95, scratch=0.52)
    rows = tasks_table(tmp_path)
    transfer = rows["polarity-small, sparse: pretrained - random init"]
    assert transfer[1].startswith("+20.") and transfer[-1] == "**met**"
    assert rows["polarity-small, dense pretrained"][-1] == "**met**"
    assert rows["polarity-large, sparse pretrained"][-1] == "**met**"
    assert rows["last two evaluations, the studies' runs"][1].startswith("12 of 12 runs within a point")
    assert rows["last two evaluations, the studies' runs"][-1] == "**met**"
    assert rows["last two evaluations, random initialisation"][1].startswith("6 of 6 runs within a point")


def test_the_tasks_transfer_pairs_over_the_seeds_both_studies_ran(tmp_path: Path) -> None:
    write_polarity(tmp_path, small=0.72, large=0.95, scratch=0.52, extra_seed=9)  # a seed finetune-tasks never ran
    transfer = tasks_table(tmp_path)["polarity-small, sparse: pretrained - random init"]
    assert transfer[1].startswith("+20.") and "paired by seed, n=3" in transfer[1] and transfer[-1] == "**met**"
    assert "(72.0% against 52.0%)" in transfer[1]


def test_the_tasks_section_says_which_bar_is_missed(tmp_path: Path) -> None:
    unstable = "finetune.pretrained=small,task=polarity-large,seed=1"
    write_polarity(tmp_path, small=0.95, large=0.80, scratch=0.90, unstable=unstable)
    rows = tasks_table(tmp_path)
    assert rows["polarity-small, sparse: pretrained - random init"][-1] == "**missed**"  # +5 points, bar +10
    assert rows["polarity-small, sparse pretrained"][-1] == "**missed**"  # above 90%: no room to overfit
    assert rows["polarity-large, dense pretrained"][-1] == "**missed**"  # below 85%
    stability = rows["last two evaluations, the studies' runs"]
    assert stability[-1] == "**missed**" and "11 of 12" in stability[1] and unstable in stability[1]


def test_no_tasks_section_without_polarity_runs(tmp_path: Path) -> None:
    build_overfit(tmp_path)  # the synthetic word-list tasks
    make_report(tmp_path, formats=("md",), console=Console(file=sys.stderr))
    assert "Fine-tuning tasks" not in md_sections((tmp_path / "report.md").read_text())


# --- a study is one file plus one builder ---------------------------------------------------------------------------

TOY_BUILDER = """
import pandas as pd

from moe_lab.report.reference import reference
from moe_lab.report.spec import margins
from moe_lab.report.verdict import StudyReport, Verdict

FIGURES = []


def build(study):
    margin = margins(study.name)["loss"]
    table = pd.DataFrame({"runs": [str(len(study.runs))], "margin": [f"{margin:g}"]})
    return StudyReport(study.name, reference(study.name), table, Verdict("yes", "toy ours", "the toy rule"))
"""


def test_a_study_is_its_file_and_its_builder_and_nothing_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new study is experiments/NAME.yaml plus a module NAME.py beside the studies' builders: the report finds and
    renders it, paper's side and all, with no registry told of it."""
    import moe_lab.report.studies as studies

    experiments, builders = tmp_path / "experiments", tmp_path / "builders"
    experiments.mkdir()
    builders.mkdir()
    (experiments / "toy-study.yaml").write_text(
        "study:\n  name: toy-study\n  paper: Toy Table 1\n  description: a toy finding\n"
        '  paper_numbers:\n    "1": {quality: -1.25}\n  note: a toy note\n  margins:\n    loss: 0.5\n'
    )
    (builders / "toy_study.py").write_text(TOY_BUILDER)
    monkeypatch.setattr("moe_lab.report.spec.EXPERIMENTS", experiments)
    monkeypatch.setattr(studies, "__path__", [*studies.__path__, str(builders)])
    monkeypatch.delitem(sys.modules, "moe_lab.report.studies.toy_study", raising=False)
    write_study(tmp_path / "results", "toy-study", [row({"x": 1, "seed": s}, final_val_loss=1.0) for s in SEEDS])
    try:
        assert names() == ["toy-study"]
        reports, _ = make_report(tmp_path / "results", ["toy-study"], ("md",), tmp_path / "out", Console(quiet=True))
    finally:
        sys.modules.pop("moe_lab.report.studies.toy_study", None)
    (report,) = reports
    assert (report.reference.source, report.reference.finding, report.reference.note) == (
        "Toy Table 1",
        "a toy finding",
        "a toy note",
    )
    assert report.reference.numbers == {"1": {"quality": -1.25}}
    assert report.table.to_dict("list") == {"runs": ["3"], "margin": ["0.5"]}
    text = (tmp_path / "out" / "report.md").read_text()
    assert "**Paper** (Toy Table 1): a toy finding." in text and "_Paper note:_ a toy note" in text


def test_a_wrong_key_in_a_study_file_is_named_with_the_valid_ones(tmp_path: Path) -> None:
    (tmp_path / "top-k.yaml").write_text("study:\n  margin:\n    loss: 0.1\n")
    with pytest.raises(StudySpecError) as err:
        study_spec("top-k", tmp_path)
    assert str(err.value) == f"{tmp_path / 'top-k.yaml'}: unknown key(s) ['study.margin']; valid keys: {list(KEYS)}"


def test_the_report_knows_the_keys_of_the_study_schema() -> None:
    from dataclasses import fields

    from moe_lab.config import StudyConfig

    assert tuple(f.name for f in fields(StudyConfig)) == KEYS


def test_every_study_file_states_what_its_report_prints() -> None:
    for name in STUDIES:
        spec = study_spec(name)
        assert spec.paper and spec.description and spec.margins.values and spec.order is not None, name


def test_runs_of_one_seed_fine_tuned_from_two_base_models_are_not_judged(tmp_path: Path) -> None:
    build_freeze(tmp_path)
    judged = build("freeze", load_study(tmp_path, "freeze")).verdict
    seeds = sorted(set(pd.read_csv(tmp_path / "freeze" / "runs.csv")["seed"]))
    for seed in seeds:  # each seed its own pretraining (study.pretraining=per_seed): judged as before
        set_runs(tmp_path, "freeze", "pretrained_weights", f"{seed:x}" * 16, lambda f, s=seed: f["seed"] == s)
    assert build("freeze", load_study(tmp_path, "freeze")).verdict == judged

    # one run of the last seed fine-tuned from another build of its base model: the seed's runs do not pair
    set_runs(tmp_path, "freeze", "pretrained_weights", "e" * 16,
             lambda f: (f["seed"] == seeds[-1]) & (f["finetune.freeze"] == "moe"))  # fmt: skip
    runs = pd.read_csv(tmp_path / "freeze" / "runs.csv").set_index("finetune.freeze")
    last = runs[runs["seed"] == seeds[-1]]["run"]
    expected = (f"has runs at seed={seeds[-1]} fine-tuned from 2 different base models ({last['all']!r}: weights "
                f"{f'{seeds[-1]:x}' * 16}; {last['moe']!r}: weights {'e' * 16})")  # fmt: skip
    with pytest.raises(ResultsError) as err:
        load_study(tmp_path, "freeze")
    assert expected in str(err.value) and "`moe-lab sweep freeze --rerun`" in str(err.value)
    result = run_cli("report", "freeze", "--results", str(tmp_path), "--out", str(tmp_path / "out"), "--format", "md")
    assert result.returncode == 2 and expected in " ".join(result.stderr.split()), result.stderr
    assert "**Reproduced: no data.**" in md_sections((tmp_path / "out" / "report.md").read_text())["freeze"]
