"""`moe-lab pretrain` end to end through the CLI: files, metrics, resume, divergence, offline errors."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from moe_lab.config import presets
from moe_lab.paths import records_path
from moe_lab.report.results import final_examples
from tests.conftest import run_cli, signal_at_first_checkpoint


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


def pretrain(*overrides: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli("pretrain", *overrides, env=env, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_tiny_pretraining_end_to_end(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    result = pretrain("tiny", f"run_dir={run_dir}", f"data.cache_dir={cache_dir}", "train.max_steps=60")
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("summary.json", "metrics.csv", "checkpoint.pt", ".hydra/config.yaml", ".hydra/overrides.yaml"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["step"] == 60
    assert summary["parameters"]["total"] > summary["parameters"]["active"] > 0
    assert summary["config"]["train"]["max_steps"] == 60
    assert summary["tokens_per_s"] > 0
    rows = read_metrics(run_dir)
    losses = [float(r["task_loss"]) for r in rows if r["task_loss"]]
    assert losses[-1] < losses[0] - 0.5, losses  # from ~ln(258) = 5.55 down
    evals = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    assert len(evals) == 6 and evals[-1] < evals[0]
    # the tiny model has one MoE layer, in block 1; its metrics are in every logged row
    train_rows = [r for r in rows if r["task_loss"]]
    for key in ("moe/1/load_imbalance", "moe/1/dropped_frac", "moe/1/router_entropy", "moe/1/aux_loss"):
        assert all(r[key] for r in train_rows), key
    assert {f"moe/1/tokens_per_expert/{e}" for e in range(4)} <= set(rows[0])
    assert all(r["eval_moe/1/dropped_frac"] for r in rows if r.get("val_loss"))
    assert "overrides" not in result.stderr
    assert "unigram" in result.stdout
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "train.max_steps=60" in overrides
    # every evaluation's per-sequence validation losses; the final one's mean is the summary's loss
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == [
        f"val-step{s:06d}.csv.gz" for s in range(10, 61, 10)
    ]
    final = pd.read_csv(records_path(run_dir, "val", 60))
    assert list(final.columns) == ["sequence", "tokens", "loss"]
    assert final["sequence"].tolist() == list(range(len(final))) and (final["tokens"] > 0).all()
    assert final["loss"].mean() == pytest.approx(summary["final_val_loss"], rel=1e-12)
    by_sequence = final_examples(run_dir, summary, "final_val_loss")
    assert by_sequence.index.names == ["sequence"] and by_sequence.to_numpy() == pytest.approx(final["loss"])


def test_each_eval_capacity_factor_writes_its_own_records(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    args = ("tiny", f"run_dir={run_dir}", f"data.cache_dir={cache_dir}", "train.max_steps=20", "train.eval_every=20")
    result = pretrain(*args, "moe.train_capacity_factor=0.5", "train.eval_capacity_factors=[0.5,4.0]")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    names = sorted(p.name for p in (run_dir / "eval").iterdir())
    assert names == ["val-step000020-cf0.5.csv.gz", "val-step000020-cf4.csv.gz", "val-step000020.csv.gz"]
    for cf in (0.5, 4.0):
        losses = final_examples(run_dir, summary, f"final_val_loss@cf{cf:g}")
        assert losses.mean() == pytest.approx(summary[f"final_val_loss@cf{cf:g}"], rel=1e-12)
    # CF 0.5 drops tokens that CF 4 keeps: the same sequences, other losses
    assert not final_examples(run_dir, summary, "final_val_loss@cf0.5").equals(
        final_examples(run_dir, summary, "final_val_loss@cf4")
    )


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path: Path, cache_dir: Path) -> None:
    # the routing probe's period (7) is not a multiple of the checkpoint period: resume must not add snapshots
    common = (
        "tiny", f"data.cache_dir={cache_dir}", "train.max_steps=80", "train.ckpt_every=10", "train.log_every=1",
        "train.fluctuation_every=7",
    )  # fmt: skip
    straight = tmp_path / "straight"
    assert pretrain(*common, f"run_dir={straight}").returncode == 0

    killed = tmp_path / "killed"
    signal_at_first_checkpoint(["pretrain", *common, f"run_dir={killed}"], killed, signal.SIGKILL)
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    logged_before_resume = len(read_metrics(killed))

    result = pretrain(*common, f"run_dir={killed}", "resume=true")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout
    a, b = read_metrics(straight), read_metrics(killed)
    assert logged_before_resume < len(b)
    assert [r["step"] for r in a] == [r["step"] for r in b]  # rows after the checkpoint were replaced
    for ra, rb in zip(a, b, strict=True):
        for key in ("task_loss", "val_loss", "lr"):
            if ra.get(key):
                assert float(ra[key]) == pytest.approx(float(rb[key]), rel=1e-6, abs=1e-7), (ra["step"], key)
    sa = json.loads((straight / "summary.json").read_text())
    sb = json.loads((killed / "summary.json").read_text())
    assert sb["final_val_loss"] == pytest.approx(sa["final_val_loss"], rel=1e-6)
    with np.load(straight / "routing_probe.npz") as pa, np.load(killed / "routing_probe.npz") as pb:
        assert pa["steps"].tolist() == pb["steps"].tolist() == [*range(0, 80, 7), 80]
        assert np.array_equal(pa["experts"], pb["experts"])
    assert (straight / "fluctuation.csv").read_text() == (killed / "fluctuation.csv").read_text()

    # resuming a finished run does nothing
    again = pretrain(*common, f"run_dir={killed}", "resume=true")
    assert again.returncode == 0 and "already completed" in again.stdout


def test_moe_metrics_logged_after_a_resume_are_those_of_the_uninterrupted_run(tmp_path: Path, cache_dir: Path) -> None:
    """The `moe/<layer>/*` columns average over the steps since the last logged one; a checkpoint between two
    logged steps keeps those sums, so the first row after the resume is exact, cell for cell."""
    # checkpoints at steps 7, 14, 21, logs every 4: a checkpoint never falls on a logged step before the end
    common = (
        "tiny", f"data.cache_dir={cache_dir}", "train.max_steps=27", "train.ckpt_every=7", "train.log_every=4",
        "logger=csv", "logger.progress=false",
    )  # fmt: skip
    straight = tmp_path / "straight"
    assert pretrain(*common, f"run_dir={straight}").returncode == 0

    killed = tmp_path / "killed"
    signal_at_first_checkpoint(["pretrain", *common, f"run_dir={killed}"], killed, signal.SIGKILL)
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    step = torch.load(killed / "checkpoint.pt", weights_only=False)["result"].step
    assert step % 4, step  # the metrics of steps after the last logged one are in the checkpoint alone

    result = pretrain(*common, f"run_dir={killed}", "resume=true")
    assert result.returncode == 0 and "resumed from" in result.stdout, result.stdout + result.stderr
    a, b = pd.read_csv(straight / "metrics.csv"), pd.read_csv(killed / "metrics.csv")
    moe = [c for c in a.columns if c.startswith(("moe/", "eval_moe/"))]
    assert any(c.startswith("moe/1/tokens_per_expert/") for c in moe) and list(b.columns) == list(a.columns)
    compared = [c for c in a.columns if c != "tokens_per_s"]  # the only column that depends on the clock
    pd.testing.assert_frame_equal(a[compared], b[compared], check_exact=True)


def test_divergence_is_recorded_not_raised(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    result = pretrain(
        "tiny", f"run_dir={run_dir}", f"data.cache_dir={cache_dir}", "optim.lr=1e6", "optim.warmup_steps=0",
        "optim.grad_clip=null", "train.divergence_loss=20",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert summary["diverged_at_step"] is not None and summary["diverged_at_step"] < 30
    assert "diverged" in result.stdout
    assert read_metrics(run_dir)[-1]["diverged"] == "1"


def test_bad_override_names_the_valid_keys(tmp_path: Path) -> None:
    result = pretrain("tiny", "model.num_layer=3", f"runs_root={tmp_path}")
    assert result.returncode == 2
    assert "model.num_layer" in result.stderr and "num_layers" in result.stderr
    result = pretrain("tiny", "moe.drop_policy=random", f"runs_root={tmp_path}")
    assert result.returncode == 2 and "drop_policy='random' is not one of" in result.stderr
    result = pretrain("huge", f"runs_root={tmp_path}")
    assert result.returncode == 2 and f"valid presets: {presets()}" in result.stderr
    assert not any(tmp_path.iterdir())


def test_missing_local_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    result = pretrain("tiny", "data=local", f"data.path={missing}", f"runs_root={tmp_path / 'runs'}")
    assert result.returncode == 2
    assert str(missing) in result.stderr
    assert not (tmp_path / "runs").exists()


def test_hub_dataset_offline_fails_fast_and_says_what_to_do(tmp_path: Path) -> None:
    t0 = time.time()
    result = pretrain(
        "tiny", "data=hub", "data.name=c4", f"runs_root={tmp_path}", f"data.cache_dir={tmp_path}",
        env={"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert time.time() - t0 < 30
    assert result.returncode == 2
    out = result.stderr
    assert "c4" in out and "data=local data.path=" in out


def test_wandb_offline_writes_a_local_run(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    result = pretrain(
        "tiny", f"run_dir={run_dir}", f"data.cache_dir={cache_dir}", "train.max_steps=10",
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert list((run_dir / "wandb").glob("offline-run-*")), list(run_dir.iterdir())


def test_dense_twin_matches_active_flops(tmp_path: Path) -> None:
    result = pretrain("dense-small", "--show-config")
    assert result.returncode == 0 and "sparse: false" in result.stdout
