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
from tests.conftest import MOE_LAB, run_cli

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


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process run that the layouts are compared with: 50 steps of tiny."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    _pretrain(run_dir, "train.max_steps=50")
    return run_dir


DP2, EP2 = ["--nproc", "2"], ["--nproc", "2", "parallel.expert=2"]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """The same 50 steps data parallel and expert parallel (2 of tiny's 4 experts per rank): run dir, stdout."""
    runs = {}
    for name, layout in (("dp2", DP2), ("ep2", EP2)):
        run_dir = tmp_path_factory.mktemp(name) / "run"
        runs[name] = run_dir, _pretrain(run_dir, "train.max_steps=50", *layout).stdout
    return runs


@pytest.mark.parametrize("layout", ["dp2", "ep2"])
def test_two_processes_reproduce_one_process(
    one_process: Path, two_process_runs: dict[str, tuple[Path, str]], layout: str
) -> None:
    """Data parallel, and experts spread over the 2 ranks: the one-process curve."""
    two, stdout = two_process_runs[layout]
    worst = _worst(_curve(one_process), _curve(two))
    assert worst < 1e-4, worst
    summary = json.loads((two / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["step"] == 50
    one = json.loads((one_process / "summary.json").read_text())
    assert summary["tokens"] == one["tokens"] == 50 * 8 * 32  # the global batch, counted over both ranks
    assert stdout.count("completed after 50 steps") == 1  # rank 0 alone reports
    assert len(pd.read_csv(two / "metrics.csv")) == len(pd.read_csv(one_process / "metrics.csv"))
    # the checkpoint holds every expert, whatever the layout (moe_lab.train.expert_state)
    state = torch.load(two / "checkpoint.pt", weights_only=False)
    assert state["model"]["transformer.blocks.1.ffn.experts.w_in_EDH"].shape == (4, 32, 128)  # geglu: 2 x d_ff
    adam = [entry["exp_avg"].shape for entry in state["optimizer"]["state"].values()]
    assert (4, 32, 128) in adam and (4, 64, 32) in adam and (2, 32, 128) not in adam


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


def _killed_after_first_checkpoint(run_dir: Path, steps: list[str], layout: list[str]) -> int:
    """Start a run (one process, or 2 under torchrun), SIGKILL it (rank 1 under torchrun) once its first
    checkpoint is written, and return the checkpoint's step."""
    nproc = 2 if "--nproc" in layout else 1
    cmd = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        if nproc > 1
        else [sys.executable]
    )
    args = [a for a in layout if a not in ("--nproc", "2")]
    cmd += ["-m", "moe_lab", "pretrain", *COMMON, f"run_dir={run_dir}", *steps, *args]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoint.pt").exists():
            assert launcher.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.02)
        victim = _rank_pid(launcher.pid, 1) if nproc > 1 else launcher.pid
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        assert launcher.wait(timeout=120) != 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    summary = run_dir / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["status"] != "completed"
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["result"].step


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's (prctl(2))")
@pytest.mark.parametrize("kill", ["process-group", "launcher", "sigterm"])
def test_torchrun_workers_end_with_their_killed_launcher(tmp_path: Path, kill: str) -> None:
    """kill -9 of `moe-lab pretrain --nproc 2` (its process group, or the launcher alone) ends torchrun and both
    workers, though torchrun starts each worker in a session of its own; SIGTERM (a scheduler's) does too, and
    the run is recorded as failed, said once."""
    run_dir = tmp_path / "run"
    args = [MOE_LAB, "pretrain", *COMMON, f"run_dir={run_dir}", "train.max_steps=100000", "train.ckpt_every=2"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    with (tmp_path / "stderr.txt").open("w") as err:
        launcher = subprocess.Popen(
            [*args, "--nproc", "2"], env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
    processes: list[int] = []
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoint.pt").exists():  # both workers are training
            assert launcher.poll() is None and time.time() < deadline, (tmp_path / "stderr.txt").read_text()
            time.sleep(0.05)
        (torchrun,) = map(int, subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                              text=True).stdout.split())  # fmt: skip
        processes = [torchrun, *(_rank_pid(torchrun, rank) for rank in (0, 1))]
        assert None not in processes, processes
        if kill == "process-group":
            os.killpg(launcher.pid, signal.SIGKILL)
        else:
            os.kill(launcher.pid, signal.SIGTERM if kill == "sigterm" else signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 60  # a bound for a hang, not a speed: they end within a second or so
        while (alive := [pid for pid in processes if _running(pid)]) and time.time() < deadline:
            time.sleep(0.1)
        assert alive == [], f"still running after the launcher was killed: {alive} of {processes}"
        if kill == "sigterm":
            errors = [ln for ln in (tmp_path / "stderr.txt").read_text().splitlines() if ln.startswith("error:")]
            assert launcher.returncode == 143 and len(errors) == 1 and "terminated (SIGTERM)" in errors[0], errors
            summary = json.loads((run_dir / "summary.json").read_text())
            assert summary["status"] == "failed" and summary["reason"] == "Terminated: SIGTERM"
    finally:  # what the test started and left running (old code left both workers training)
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        for pid in processes:
            if pid is not None and _running(pid) and b"moe_lab" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


RESUME_STEPS = ["train.max_steps=100", "train.ckpt_every=10", "train.log_every=5", "train.eval_every=50"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    _pretrain(run_dir, *RESUME_STEPS)
    return run_dir


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc")
@pytest.mark.parametrize(
    ("killed", "resumed"),
    [(DP2, EP2), (EP2, []), ([], DP2)],
    ids=["dp2-to-ep2", "ep2-to-one", "one-to-dp2"],
)
def test_a_killed_run_resumes_in_any_layout(
    uninterrupted: Path, tmp_path: Path, killed: list[str], resumed: list[str]
) -> None:
    """Checkpoints hold the one-process layout, so a run killed in one layout continues in another as the
    uninterrupted one-process run does (Adam's state of each expert follows it to its new rank)."""
    run_dir = tmp_path / "run"
    killed_at = _killed_after_first_checkpoint(run_dir, RESUME_STEPS, killed)
    assert 0 < killed_at < 100
    relaunch = run_cli("pretrain", *COMMON, f"run_dir={run_dir}", *RESUME_STEPS, "resume=true", *resumed)
    assert relaunch.returncode == 0, relaunch.stdout + relaunch.stderr
    assert f"resumed from {run_dir / 'checkpoint.pt'} at step" in relaunch.stdout
    worst = _worst(_curve(uninterrupted), _curve(run_dir))
    assert worst < 1e-4, worst
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_expert_parallel_needs_one_rank_per_expert_slice(tmp_path: Path) -> None:
    for args, message in [
        (["parallel.expert=2"], "parallel.expert=2 with 1 process(es)"),
        (["parallel.expert=2", "--nproc", "2", "optim=adafactor"], "a per-tensor update RMS"),
    ]:
        result = run_cli("pretrain", *COMMON, f"run_dir={tmp_path / 'r'}", *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert not (tmp_path / "r").exists()


def test_finetuning_reads_an_expert_parallel_checkpoint(
    one_process: Path, two_process_runs: dict[str, tuple[Path, str]], tmp_path: Path
) -> None:
    """A checkpoint written under parallel.expert=2 fine-tunes as the one-process one does."""
    summaries = []
    for i, pre in enumerate((one_process, two_process_runs["ep2"][0])):
        ft = tmp_path / f"ft-{i}"
        result = run_cli(
            "finetune", "synth-small", f"checkpoint={pre}", f"run_dir={ft}", "train.max_steps=20",
            "train.eval_every=10", "train.threads=1", "logger=csv", "logger.progress=false",
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        summaries.append(json.loads((ft / "summary.json").read_text()))
    one, ep = summaries
    assert one["status"] == ep["status"] == "completed"
    assert abs(one["final_val_loss"] - ep["final_val_loss"]) < 1e-4
    assert one["final_val_accuracy"] == ep["final_val_accuracy"]


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
