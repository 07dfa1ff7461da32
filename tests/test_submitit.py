"""Sweeps through Hydra's submitit launcher (`--launcher submitit_local`, the SLURM path's machinery on this
machine): a study completes, its points started together as jobs; killed and rerun it skips finished points
and writes each point's directory once; a preempted job is requeued and resumes from its checkpoint;
a job of several tasks is one torch.distributed run. The SLURM launcher's config is checked as composed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from moe_lab.sweeps.runner import hydra_command
from moe_lab.sweeps.study import load_study
from tests.conftest import MOE_LAB, run_cli

TINY = ("preset=tiny", "train.eval_every=4", "train.threads=1", "logger.progress=false", "seed=0")
LOCAL = ("--launcher", "submitit_local")


def _sweep(results: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "MOE_LAB_RESULTS": str(results)}
    return subprocess.Popen(
        [MOE_LAB, "sweep", "top-k", *LOCAL, *TINY, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the sweep ended before {path} appeared: {proc.stdout.read()}"
        assert time.time() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def _points(runs: Path) -> list[str]:
    return sorted(p.name for p in runs.iterdir() if not p.name.startswith(".") and p.is_dir())


def _job_logs(runs: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(runs.glob(".submitit/*/*.out")))


def test_a_killed_submitit_sweep_resumes_and_writes_each_point_once(tmp_path: Path) -> None:
    results = tmp_path / "results"
    runs = results / "top-k" / "runs"
    # the points run as simultaneous jobs; kill them all once the first has finished
    proc = _sweep(results, "train.max_steps=60", "moe.top_k=1,2")
    deadline = time.time() + 240
    while not list(runs.glob("*/summary.json")) or not any(
        json.loads(p.read_text()).get("status") == "completed" for p in runs.glob("*/summary.json")
    ):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    summaries = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("*/summary.json")}
    done = {name: (runs / name / "summary.json").stat().st_mtime_ns for name, s in summaries.items()
            if s["status"] == "completed"}  # fmt: skip
    records = {
        name: (runs / name / "run.json").read_text() for name in _points(runs) if (runs / name / "run.json").exists()
    }
    assert len(done) == 1, f"the kill came after every point had finished: {summaries}"

    again = ("train.max_steps=60", "moe.top_k=1,2")
    result = run_cli("sweep", "top-k", *LOCAL, *TINY, *again, env={"MOE_LAB_RESULTS": str(results)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert _points(runs) == ["moe.top_k=1,seed=0", "moe.top_k=2,seed=0"]  # nothing moved aside
    for name, mtime in done.items():  # finished points were skipped, not redone
        assert (runs / name / "summary.json").stat().st_mtime_ns == mtime
    for name, record in records.items():  # each directory's record was written once, by its first run
        assert (runs / name / "run.json").read_text() == record
    frame = pd.read_csv(results / "top-k" / "runs.csv")
    assert sorted(frame["moe.top_k"]) == [1, 2] and set(frame["status"]) == {"completed"}
    assert set(frame["step"]) == {60}
    assert _job_logs(runs).count("already completed; nothing to resume") == 1


def _job_pid(folder: Path) -> int | None:
    """The pid of the submitit task running from `folder` (its command line names the folder)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "submitit.core._submit" in cmdline and str(folder) in cmdline:
            return int(proc.name)
    return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the submitit job through /proc")
def test_a_preempted_job_is_requeued_and_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """submitit signals a job (USR2) before its time limit or on preemption; the launcher checkpoints the job
    and requeues it, and the rerun point resumes from its checkpoint.pt."""
    results = tmp_path / "results"
    point = results / "top-k" / "runs" / "moe.top_k=1,seed=0"
    proc = _sweep(results, "moe.top_k=1", "train.max_steps=300", "train.ckpt_every=20", "train.eval_every=150")
    _wait_for(point / "checkpoint.pt", proc)
    pid = _job_pid(results / "top-k" / "runs" / ".submitit")
    assert pid is not None
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    os.kill(pid, signal.SIGUSR2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    logs = _job_logs(point.parent)
    assert "Caught signal SIGUSR2" in logs, (pid, cmdline, logs)
    assert "Requeued job" in logs and "resumed from" in logs
    summary = json.loads((point / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 300
    steps = pd.read_csv(point / "metrics.csv").dropna(subset=["loss"])["step"]
    assert list(steps) == sorted(set(steps)) and steps.iloc[-1] == 300  # the resumed log continues, no repeats


def test_a_job_of_two_tasks_is_one_distributed_run(tmp_path: Path) -> None:
    """hydra.launcher.tasks_per_node=2: the point's two tasks form one torch.distributed run, here with the
    experts spread over them (that it then gives the one-process numbers is tests/test_parallel.py's)."""
    runs = tmp_path / "results" / "top-k" / "runs"
    point = ("moe.top_k=2", "train.max_steps=20", "moe.group_size=128", "parallel.expert=2")
    proc = _sweep(tmp_path / "results", *point, "hydra.launcher.tasks_per_node=2")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    summary = json.loads((runs / "moe.top_k=2,seed=0" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["step"] == 20
    logs = sorted(runs.glob(".submitit/*/*_log.out"))
    assert len(logs) == 2  # one log per task; the main task alone reports the run
    assert sum(p.read_text().count("completed after 20 steps") for p in logs) == 1


def test_the_slurm_launcher_config_composes_with_the_plugin(tmp_path: Path) -> None:
    """`--launcher submitit_slurm` selects conf/hydra/launcher/moe_lab_slurm.yaml over the plugin's schema, and
    the cluster's settings are command-line overrides."""
    study = load_study("top-k")
    overrides = [
        "preset=tiny",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.account=proj",
        "hydra.launcher.gpus_per_task=1",
    ]
    cmd = [
        *(a for a in hydra_command(study, tmp_path, overrides, "submitit_slurm") if a != "--multirun"),
        "--cfg",
        "hydra",
        "--package",
        "hydra.launcher",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MOE_LAB_RESULTS": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in text
    for line in ("partition: gpu", "account: proj", "gpus_per_task: 1", "timeout_min: 240", "max_num_timeout: 5",
                 "array_parallelism: 64", "mem_gb: 32", "cpus_per_task: 8"):  # fmt: skip
        assert line in text, (line, text)
    bad = run_cli("sweep", "top-k", "--launcher", "slurm", "preset=tiny", env={"MOE_LAB_RESULTS": str(tmp_path)})
    assert bad.returncode == 2
    assert "launcher 'slurm' is not one of ['basic', 'joblib', 'submitit_local', 'submitit_slurm']" in bad.stderr
