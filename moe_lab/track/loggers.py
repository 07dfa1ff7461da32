"""One logging interface, two sinks: CSV (metrics.csv + summary.json) and Weights & Biases."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

from moe_lab.io import atomic_write, read_json


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside `path`, then rename it over `path`."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def read_summary(run_dir: Path) -> dict | None:
    """A run's summary.json, or None if it has none; one that cannot be read is a CorruptFileError naming it."""
    path = Path(run_dir) / "summary.json"
    return read_json(path) if path.exists() else None


class CSVSink:
    """metrics.csv, one row per logged step; the header grows when new keys appear (rewritten atomically)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = ["step"]

    def resume(self, step: int) -> int:
        """Keep the rows of steps <= `step` (a checkpoint's) and drop the ones logged after it; returns the last
        step the killed process had logged."""
        if not self.path.exists():
            return step
        with self.path.open() as f:
            reader = csv.DictReader(f)
            self.columns = list(reader.fieldnames or ["step"])
            rows = list(reader)
        self.rows = [r for r in rows if int(r["step"]) <= step]
        self._write()
        return max([step, *(int(r["step"]) for r in rows)])

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **metrics}
        for key in row:
            if key not in self.columns:
                self.columns.append(key)
        self.rows.append(row)
        self._write()

    def _write(self) -> None:
        with atomic_write(self.path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
            writer.writeheader()
            writer.writerows(self.rows)


class WandbSink:
    """Weights & Biases, offline unless the config or $WANDB_MODE says otherwise."""

    def __init__(
        self,
        run_dir: Path,
        project: str,
        name: str,
        config: dict,
        mode: str | None,
        run_id: str | None = None,
        silent: bool = True,
    ) -> None:
        import wandb

        self.mode = mode or os.environ.get("WANDB_MODE") or "offline"
        allowed = ("offline", "online", "disabled")
        if self.mode not in allowed:
            raise ValueError(f"W&B mode {self.mode!r} is not one of {list(allowed)}")
        self.run = wandb.init(
            project=project,
            name=name,
            dir=str(run_dir),
            config=config,
            mode=self.mode,
            reinit="finish_previous",
            # the run directory keeps its W&B id, so a resumed run continues its W&B run instead of opening another
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(silent=silent),  # no banner or end-of-run summary on the console
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({k: v for k, v in metrics.items() if _finite(v)}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool)):
                self.run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and not math.isfinite(value))


class RunLogger:
    """Fans each log call out to the CSV sink and, when enabled, W&B; writes summary.json."""

    def __init__(self, run_dir: Path, wandb_sink: WandbSink | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.csv = CSVSink(self.run_dir)
        self.wandb = wandb_sink
        self._wandb_from = 0

    def resume(self, step: int) -> None:
        """Continue a run from its checkpoint at `step`: metrics.csv drops what was logged after it, and W&B,
        which already has those steps (the resumed run logs the same numbers again), gets only the new ones."""
        self._wandb_from = self.csv.resume(step)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record one step's metrics in every sink."""
        self.csv.log(metrics, step)
        if self.wandb is not None and step >= self._wandb_from:
            self.wandb.log(metrics, step)

    def summary(self, values: dict[str, Any]) -> None:
        """Write summary.json (the record of truth) and mirror scalars to W&B."""
        write_json_atomic(self.run_dir / "summary.json", values)
        if self.wandb is not None:
            self.wandb.summary(values)

    def finish(self, failed: bool = False) -> None:
        """Close W&B; safe to call more than once."""
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
            self.wandb = None
