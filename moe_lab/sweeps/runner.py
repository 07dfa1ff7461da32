"""`moe-lab sweep NAME`: expand a study's grid, run it as a Hydra multirun, collect runs.csv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from moe_lab.config import CONF_DIR
from moe_lab.paths import results_root

REPO = CONF_DIR.parent
EXPERIMENTS = REPO / "experiments"


@dataclass
class Study:
    """One ablation study as its experiments/NAME.yaml describes it."""

    name: str
    command: str  # pretrain | finetune
    paper: str
    description: str
    params: dict[str, str]  # hydra.sweeper.params: key -> comma-separated values
    pretrained: str | None  # fine-tuning studies: the pretraining preset their checkpoint comes from
    path: Path


def studies() -> list[str]:
    """Names of the studies in experiments/."""
    return sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))


def load_study(name: str) -> Study:
    """Read experiments/NAME.yaml; an unknown name lists the valid ones."""
    path = EXPERIMENTS / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown study {name!r}; valid studies: {studies()}")
    raw = yaml.safe_load(path.read_text()) or {}
    study = raw.get("study") or {}
    command = study.get("command", "pretrain")
    if command not in ("pretrain", "finetune"):
        raise ValueError(f"{path}: study.command={command!r} is not one of ['pretrain', 'finetune']")
    params = ((raw.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    return Study(
        name=name,
        command=command,
        paper=study.get("paper", ""),
        description=study.get("description", ""),
        params={str(k): str(v) for k, v in params.items()},
        pretrained=study.get("pretrained"),
        path=path,
    )


def grid(study: Study, overrides: list[str] | None = None) -> list[list[str]]:
    """Every grid point's overrides, expanded by Hydra's own BasicSweeper rules (user overrides may sweep too)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweep = [f"{k}={v}" for k, v in study.params.items()]
    parsed = OverridesParser.create().parse_overrides([*sweep, *(overrides or [])])
    return BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]


def compose_point(study: Study, point: list[str]):
    """The validated config of one grid point, composed with the Compose API as the sweep job would be."""
    from moe_lab.config import _compose

    root = "finetune" if study.command == "finetune" else "config"
    extra = ["checkpoint=unused"] if study.command == "finetune" else []
    return _compose(root, [f"hydra.searchpath=[file://{REPO}]", f"+experiments={study.name}", *extra, *point])


def swept_keys(points: list[list[str]]) -> list[str]:
    """The keys whose value differs between grid points."""
    keys: dict[str, set[str]] = {}
    for point in points:
        for item in point:
            key, _, value = item.partition("=")
            keys.setdefault(key, set()).add(value)
    return [k for k, values in keys.items() if len(values) > 1]


def results_dir(study: Study, root: Path) -> Path:
    return root / study.name


def pretrained_dir(root: Path, preset: str) -> Path:
    return root / "pretrained" / preset


def pretrained_presets(study: Study, points: list[list[str]]) -> list[str]:
    """The pretraining presets a fine-tuning study needs: study.pretrained and any swept finetune.pretrained."""
    if study.command != "finetune":
        return []
    presets: list[str] = []
    for point in points:
        for item in point:
            key, _, value = item.partition("=")
            if key == "finetune.pretrained" and value not in presets:
                presets.append(value)
    return presets or ([study.pretrained] if study.pretrained else [])


def ensure_pretrained(root: Path, preset: str, extra: list[str]) -> Path:
    """Pretrain a fine-tuning study's checkpoint once (resumable), under ROOT/pretrained/PRESET."""
    run_dir = pretrained_dir(root, preset)
    summary = run_dir / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("status") == "completed":
        return run_dir
    cmd = [sys.executable, "-m", "moe_lab.cli", "pretrain", preset, f"run_dir={run_dir}", "resume=true", *extra]
    subprocess.run(cmd, check=True)
    return run_dir


def hydra_command(study: Study, root: Path, overrides: list[str], launcher: str) -> list[str]:
    """The `python -m moe_lab.sweeps.app --multirun ...` command line of a study."""
    fixed = [o.split("=", 1)[0] for o in overrides if "=" in o and "," not in o]
    exclude = ["experiments", "checkpoint", *fixed]
    default_pretrained = (
        study.command == "finetune"
        and study.pretrained
        and "finetune.pretrained" not in study.params
        and not any(o.startswith("finetune.pretrained=") for o in overrides)
    )
    if default_pretrained:
        exclude.append("finetune.pretrained")
    cmd = [
        sys.executable, "-m", "moe_lab.sweeps.app", "--multirun",
        f"--config-name={'finetune' if study.command == 'finetune' else 'config'}",
        f"hydra.searchpath=[file://{REPO}]",
        f"+experiments={study.name}",
        f"hydra/launcher={launcher}",
        f"hydra.sweep.dir={results_dir(study, root) / 'runs'}",
        "hydra.sweep.subdir=${hydra:job.override_dirname}",
        f"hydra.job.config.override_dirname.exclude_keys=[{','.join(exclude)}]",
        "hydra.job_logging.root.level=WARNING",
    ]  # fmt: skip
    if default_pretrained:
        cmd.append(f"finetune.pretrained={study.pretrained}")
    return [*cmd, *overrides]


def collect(study: Study, root: Path) -> pd.DataFrame:
    """One row per run directory: its swept values, status and final metrics; written to runs.csv."""
    rows = []
    runs = results_dir(study, root) / "runs"
    for summary_path in sorted(runs.glob("*/summary.json")):
        run_dir = summary_path.parent
        summary = json.loads(summary_path.read_text())
        row: dict = {"run": run_dir.name}
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        if overrides_file.exists():
            for item in yaml.safe_load(overrides_file.read_text()) or []:
                key, _, value = str(item).partition("=")
                if key in study.params or key.split(".")[0] in ("task",):
                    row[key] = value
        row["status"] = summary.get("status")
        for key, value in summary.items():
            if key.startswith(("final_", "best_", "fluctuation@")) or key in (
                "step", "tokens_per_s", "train_seconds", "wall_seconds", "diverged_at_step", "reason",
                "trainable_parameters",
            ):  # fmt: skip
                row[key] = value
        row.update(_last_moe_metrics(run_dir))
        rows.append(row)
    frame = pd.DataFrame(rows)
    out = results_dir(study, root) / "runs.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    return frame


def _last_moe_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged MoE metrics, averaged over layers: dropped fraction at train and eval capacity, etc."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return {}
    frame = pd.read_csv(path)
    out = {}
    for prefix in ("moe", "eval_moe"):
        for metric in ("dropped_frac", "load_imbalance", "router_entropy", "max_logit", "z_loss", "distill_loss"):
            cols = [c for c in frame.columns if c.startswith(f"{prefix}/") and c.endswith(f"/{metric}")]
            if cols:
                values = frame[cols].dropna(how="all")
                if len(values):
                    out[f"{prefix}_{metric}"] = float(values.iloc[-1].mean())
    return out


def run_study(name: str, overrides: list[str], launcher: str = "basic", root: Path | None = None) -> pd.DataFrame:
    """Run every grid point that has not completed, then write and return runs.csv."""
    study = load_study(name)
    root = Path(root or results_root())
    if launcher not in ("basic", "joblib"):
        raise ValueError(f"launcher {launcher!r} is not one of ['basic', 'joblib']")
    # the pretraining a fine-tuning study stands on shares the study's data and logging overrides
    shared = [o for o in overrides if o.startswith(("data.", "logger", "seed="))]
    for preset in pretrained_presets(study, grid(study, overrides)):
        ensure_pretrained(root, preset, shared)
    env = {**os.environ, "MOE_LAB_RESULTS": str(root)}
    subprocess.run(hydra_command(study, root, overrides, launcher), check=True, env=env)
    return collect(study, root)
