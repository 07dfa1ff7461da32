"""Where results go, without importing torch (the report and the CLI's argument checks stay light)."""

from __future__ import annotations

import os
import unicodedata
from importlib.resources import files
from pathlib import Path

# experiments/ ships as the package moe_lab.experiments (pyproject's package-dir): one YAML file per study
EXPERIMENTS = Path(str(files("moe_lab.experiments")))


def results_root() -> Path:
    """Where studies write and the report reads: $MOE_LAB_RESULTS (when set and not empty) or results/."""
    return Path(os.environ.get("MOE_LAB_RESULTS") or "results")


def shared_root() -> Path:
    """Where the real corpora and tasks (data/...) are looked up: $MOE_LAB_SHARED, else ../shared from the working
    directory (what conf/data/*.yaml and conf/task/*.yaml say with ${oc.env:MOE_LAB_SHARED,../shared})."""
    return Path(os.environ.get("MOE_LAB_SHARED", "../shared"))


def runs_root(configured: str | None = None) -> Path:
    """Where single runs go: `runs_root=` if set, else $MOE_LAB_RESULTS/runs (results/runs without it)."""
    return Path(configured) if configured else results_root() / "runs"


NAME_MAX_CHARS, NAME_MAX_BYTES = 100, 200  # well inside the 255 bytes most file systems allow a name


def check_name(value: str, key: str = "name") -> None:
    """Raise ValueError naming `key` unless `value` names exactly one directory: not empty, `.` or `..`, no `/`, `\\`
    or control character (NUL, newline), at most 100 characters and 200 bytes in UTF-8."""
    rule = (
        "a run's name is one folder under the runs root: no '/', '\\' or control characters, not '.' or '..', "
        f"at most {NAME_MAX_CHARS} characters ({NAME_MAX_BYTES} bytes in UTF-8)"
    )
    bad = next((c for c in value if c in "/\\" or unicodedata.category(c) in ("Cc", "Cs")), None)
    if value in ("", ".", ".."):
        problem = "is not a folder's name"
    elif bad is not None:
        problem = f"contains {bad!r}"
    elif len(value) > NAME_MAX_CHARS or len(value.encode()) > NAME_MAX_BYTES:
        problem = f"is {len(value)} characters ({len(value.encode())} bytes in UTF-8) long"
    else:
        return
    shown = value if len(value) <= 40 else f"{value[:40]}..."
    raise ValueError(f"{key}={shown!r} {problem}: {rule}")


# per-example records of each evaluation (moe_lab.train.loop writes them, moe_lab.report pairs runs by them)
EVAL_DIR = "eval"
# a run's checkpoint (moe_lab.train.loop writes it; a sweep checks for it without importing torch)
CHECKPOINT = "checkpoint.pt"
# the statuses of a run that ended by itself (its summary.json): nothing is left to train or resume
FINISHED = ("completed", "diverged")


def records_path(run_dir: str | Path, name: str, step: int, capacity_factor: float | None = None) -> Path:
    """Where a run keeps the per-example records `name` of its evaluation at `step` (at an extra eval CF):
    eval/<name>-step<NNNNNN>[-cf<X>].csv.gz."""
    cf = "" if capacity_factor is None else f"-cf{capacity_factor:g}"
    return Path(run_dir) / EVAL_DIR / f"{name}-step{step:06d}{cf}.csv.gz"
