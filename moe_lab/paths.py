"""Where results go, without importing torch (the report and the CLI's argument checks stay light)."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

# experiments/ ships as the package moe_lab.experiments (pyproject's package-dir): one YAML file per study
EXPERIMENTS = Path(str(files("moe_lab.experiments")))


def results_root() -> Path:
    """Where studies write and the report reads: $MOE_LAB_RESULTS or results/."""
    return Path(os.environ.get("MOE_LAB_RESULTS", "results"))


# per-example records of each evaluation (moe_lab.train.loop writes them, moe_lab.report pairs runs by them)
EVAL_DIR = "eval"


def records_path(run_dir: str | Path, name: str, step: int, capacity_factor: float | None = None) -> Path:
    """Where a run keeps the per-example records `name` of its evaluation at `step` (at an extra eval CF):
    eval/<name>-step<NNNNNN>[-cf<X>].csv.gz."""
    cf = "" if capacity_factor is None else f"-cf{capacity_factor:g}"
    return Path(run_dir) / EVAL_DIR / f"{name}-step{step:06d}{cf}.csv.gz"
