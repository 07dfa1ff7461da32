"""`moe-lab sweep NAME`: plan the study (moe_lab.sweeps.plan), train the pretrainings its points stand on, run the grid
as a Hydra multirun, collect runs.csv."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from moe_lab.io import CorruptFileError, atomic_write, read_csv, read_json
from moe_lab.paths import results_root
from moe_lab.sweeps.plan import (
    SweepError,
    base_conflicts,
    ensure_pretrained,
    needed_pretrainings,
    plan_study,
    refuse_or_move,
)
from moe_lab.sweeps.study import (
    SEARCH_PATH,
    Study,
    default_pretrained,
    exclude_keys,
    launch_plan,
    load_study,
    results_dir,
)

if TYPE_CHECKING:
    import pandas as pd

# --launcher NAME -> the hydra/launcher config: Hydra's own, or ours in conf/hydra/launcher (they set the submitit
# plugin's defaults for a run: time limit and requeues, CPUs, GPUs, memory, array parallelism)
LAUNCHERS = {
    "basic": "basic",
    "joblib": "joblib",
    "submitit_local": "moe_lab_local",
    "submitit_slurm": "moe_lab_slurm",
}


def run_study(
    name: str,
    overrides: list[str],
    launcher: str = "basic",
    root: Path | None = None,
    rerun: bool = False,
    console=None,
) -> pd.DataFrame:
    """Run every grid point that has not completed, then write and return runs.csv.

    Runs on disk are reused only if their config is this command's (moe_lab.runs); otherwise the sweep stops
    before running anything, or with `rerun` moves them aside first. Raises SweepError after writing runs.csv
    if the multirun itself did not finish."""
    from rich.console import Console

    from moe_lab.runs import check_writable

    console = console or Console()
    study = load_study(name)
    root = Path(root or results_root())
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher {launcher!r} is not one of {list(LAUNCHERS)}")
    check_writable(root)
    pretrainings, checks = plan_study(study, overrides, root)
    refuse_or_move(pretrainings, "shared pretrainings", rerun, console)
    refuse_or_move(checks, "grid points", rerun, console)
    # the pretraining a fine-tuning study stands on shares the study's data and logging overrides; with a parallel
    # launcher, as many pretrain at once as the grid points would run
    jobs = [(*pre.stands_on, pre.point[1:]) for pre in needed_pretrainings(pretrainings, checks)]
    workers = min(len(jobs), os.cpu_count() or 1) if launcher == "joblib" else 1
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        for done in [pool.submit(ensure_pretrained, root, preset, seed, extra) for preset, seed, extra in jobs]:
            done.result()
    if problems := base_conflicts(pretrainings, checks):
        from moe_lab.runs import RunConflictError

        raise RunConflictError(
            "; ".join(problems) + ". A study pairs its points by seed, so new points would be compared with runs "
            "of another base model: add --rerun to move the grid's runs aside and train them all on these weights, "
            "or run the new points in a fresh results directory (MOE_LAB_RESULTS=DIR)"
        )
    env = {**os.environ, "MOE_LAB_RESULTS": str(root)}
    if launcher.startswith("submitit"):  # a job's console goes to its log, not here
        console.print(
            f"submitit: each grid point is a job; its output is in {results_dir(study, root) / 'runs' / '.submitit'}"
        )
    codes = [  # the grid, then each `extend` entry that adds points (finished ones are skipped); none stops the rest
        subprocess.run(hydra_command(study, root, [*launch, *overrides], launcher), env=env).returncode
        for launch, _ in launch_plan(study, overrides)
    ]
    code = next((c for c in codes if c), 0)
    frame = collect(study, root)
    if code != 0:
        raise SweepError(
            f"the multirun of {name} exited with {code}; runs.csv has the runs so far; the same command resumes it"
        )
    return frame


def hydra_command(study: Study, root: Path, overrides: list[str], launcher: str) -> list[str]:
    """The `python -m moe_lab.sweeps.app --multirun ...` command line of a study."""
    exclude = exclude_keys(study, overrides)
    own_pretraining = default_pretrained(study, overrides)
    cmd = [
        sys.executable, "-m", "moe_lab.sweeps.app", "--multirun",
        f"--config-name={'finetune' if study.command == 'finetune' else 'config'}",
        SEARCH_PATH,
        f"+experiments={study.name}",
        f"hydra/launcher={LAUNCHERS[launcher]}",
        f"hydra.sweep.dir={results_dir(study, root) / 'runs'}",
        "hydra.sweep.subdir=${hydra:job.override_dirname}",
        f"hydra.job.config.override_dirname.exclude_keys=[{','.join(exclude)}]",
        "hydra.job_logging.root.level=WARNING",
        # each run writes its own .hydra/ once (moe_lab.train.lifecycle): Hydra's would overwrite a run's config
        # with the config of whichever command last visited it
        "hydra.output_subdir=null",
    ]  # fmt: skip
    if own_pretraining:
        cmd.append(f"finetune.pretrained={study.pretrained}")
    return [*cmd, *overrides]


def collect(study: Study, root: Path) -> pd.DataFrame:
    """One row per run directory: its swept values, status and final metrics; written to runs.csv."""
    import pandas as pd

    rows = []
    runs = results_dir(study, root) / "runs"
    paths = sorted(runs.glob("*/summary.json"))
    values = [_point_values(p.parent) for p in paths]
    # the study's swept keys, the task, and any other key whose value differs between the runs (`seed=0,1,2`)
    varied = {k for v in values for k in v if len({str(w.get(k)) for w in values}) > 1}
    for summary_path, point in zip(paths, values, strict=True):
        run_dir = summary_path.parent
        try:
            summary, moe_metrics = read_json(summary_path), _last_moe_metrics(run_dir)
        except CorruptFileError as err:
            raise err.hint(f"move {run_dir} aside and the same command runs that point again") from None
        row: dict = {"run": run_dir.name}
        for key, value in point.items():
            if key in study.params or key in varied or key.split(".")[0] in ("task",):
                row[key] = value
        row["status"] = summary.get("status")
        for key, value in summary.items():
            if key.startswith(("final_", "best_", "fluctuation@")) or key in (
                "step", "tokens_per_s", "train_seconds", "wall_seconds", "diverged_at_step", "reason",
                "trainable_parameters", "pretrained_weights",
            ):  # fmt: skip
                row[key] = value
        row.update(moe_metrics)
        rows.append(row)
    frame = pd.DataFrame(rows)
    with atomic_write(results_dir(study, root) / "runs.csv", suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)
    return frame


def _point_values(run_dir: Path) -> dict[str, str]:
    """A run's overrides (key -> value) from .hydra/overrides.yaml, bookkeeping left out."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    items = (str(item).partition("=") for item in yaml.safe_load(path.read_text()) or [])
    # `+experiments=NAME` selects the study; an appended group such as `+stability=z-loss` is a swept value
    skip = ("experiments", "checkpoint")
    return {k: v for k, _, v in items if not k.startswith(("~", "hydra")) and k.lstrip("+") not in skip}


def _last_moe_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged MoE metrics, averaged over layers: dropped fraction at train and eval capacity, etc."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return {}
    frame = read_csv(path)
    out = {}
    for prefix in ("moe", "eval_moe"):
        for metric in ("dropped_frac", "load_imbalance", "router_entropy", "max_logit", "z_loss", "distill_loss"):
            cols = [c for c in frame.columns if c.startswith(f"{prefix}/") and c.endswith(f"/{metric}")]
            if cols:
                values = frame[cols].dropna(how="all")
                if len(values):
                    out[f"{prefix}_{metric}"] = float(values.iloc[-1].mean())
    return out
