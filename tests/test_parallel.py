"""Data parallelism under torchrun (gloo, 2 processes on CPU): the same run as one process, and a killed rank resumes.

The one-process run and the two-process run use the same global batch and `moe.group_size` = one rank's tokens
(4 rows x 32 of tiny's batch of 8), so routing groups never straddle ranks (moe_lab.parallel)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from moe_lab.parallel import World, shard
from tests.conftest import run_cli

COMMON = ["tiny", "moe.group_size=128", "train.threads=1", "logger=csv", "logger.progress=false"]
COMPARED = ["loss", "task_loss", "aux_loss", "z_loss", "grad_norm", "val_loss", "moe/1/dropped_frac"]


def _curve(run_dir: Path) -> pd.DataFrame:
    frame = pd.read_csv(run_dir / "metrics.csv")
    return frame.groupby("step").first()[COMPARED]  # train and eval rows of a step, merged


def _worst(a: pd.DataFrame, b: pd.DataFrame) -> float:
    assert list(a.index) == list(b.index)
    return float((a - b).abs().max().max())


def _pretrain(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    result = run_cli("pretrain", *COMMON, f"run_dir={run_dir}", *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_shard_takes_this_ranks_rows() -> None:
    batch = {"ids": torch.arange(8).view(8, 1), "targets": torch.arange(8, 16).view(8, 1)}
    got = shard(batch, World(rank=1, size=2))
    assert got["ids"].flatten().tolist() == [4, 5, 6, 7] and got["targets"].flatten().tolist() == [12, 13, 14, 15]
    assert shard(batch, World()) is batch
    with pytest.raises(ValueError, match="does not split over 3 ranks"):
        shard(batch, World(rank=0, size=3))


def test_two_process_data_parallel_reproduces_one_process(tmp_path: Path) -> None:
    _pretrain(tmp_path / "one", "train.max_steps=50")
    out = _pretrain(tmp_path / "two", "train.max_steps=50", "--nproc", "2")
    worst = _worst(_curve(tmp_path / "one"), _curve(tmp_path / "two"))
    assert worst < 1e-4, worst
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["step"] == 50
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["tokens"] == one["tokens"] == 50 * 8 * 32  # the global batch, counted over both ranks
    assert out.stdout.count("completed after 50 steps") == 1  # rank 0 alone reports
    assert len(pd.read_csv(tmp_path / "two" / "metrics.csv")) == len(pd.read_csv(tmp_path / "one" / "metrics.csv"))


def test_nproc_needs_a_batch_that_splits(tmp_path: Path) -> None:
    result = run_cli("pretrain", *COMMON, f"run_dir={tmp_path / 'r'}", "--nproc", "3")
    assert result.returncode == 2
    assert "--nproc 3: train.batch_size=8 must be a multiple of it" in result.stderr
    assert not (tmp_path / "r").exists()


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker of `rank` (read from the workers' environments)."""
    children = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc")
def test_a_killed_rank_resumes_as_an_uninterrupted_run(tmp_path: Path) -> None:
    steps = ["train.max_steps=400", "train.ckpt_every=10", "train.log_every=5", "train.eval_every=50"]
    run_dir = tmp_path / "dp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "moe_lab", "pretrain", *COMMON, f"run_dir={run_dir}", *steps]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoint.pt").exists():
            assert launcher.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.02)
        victim = _rank_pid(launcher.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        assert launcher.wait(timeout=120) != 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    summary = run_dir / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["status"] != "completed"
    killed_at = torch.load(run_dir / "checkpoint.pt", weights_only=False)["result"].step
    assert 0 < killed_at < 400

    relaunch = run_cli("pretrain", *COMMON, f"run_dir={run_dir}", *steps, "resume=true", "--nproc", "2")
    assert relaunch.returncode == 0, relaunch.stdout + relaunch.stderr
    assert f"resumed from {run_dir / 'checkpoint.pt'} at step" in relaunch.stdout
    _pretrain(tmp_path / "straight", *steps)
    worst = _worst(_curve(tmp_path / "straight"), _curve(run_dir))
    assert worst < 1e-4, worst
    assert json.loads(summary.read_text())["status"] == "completed"


def test_python_dash_m_is_the_command() -> None:
    result = subprocess.run([sys.executable, "-m", "moe_lab", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "pretrain" in result.stdout


def test_console_stays_quiet_unless_asked(tmp_path: Path) -> None:
    """W&B's banner and end-of-run summary are silenced (its offline run is still written); logger.verbose
    brings them back. The run's own result lines always show."""
    args = ["pretrain", "tiny", "train.max_steps=4", "train.eval_every=2", "logger.progress=false"]
    quiet = run_cli(*args, f"run_dir={tmp_path / 'q'}", env={"WANDB_MODE": "offline"})
    assert quiet.returncode == 0, quiet.stderr
    assert "wandb:" not in quiet.stdout + quiet.stderr and "completed after 4 steps" in quiet.stdout
    assert list((tmp_path / "q" / "wandb").glob("offline-run-*"))
    loud = run_cli(*args, f"run_dir={tmp_path / 'v'}", "logger.verbose=true", env={"WANDB_MODE": "offline"})
    assert loud.returncode == 0 and "wandb:" in loud.stdout + loud.stderr
