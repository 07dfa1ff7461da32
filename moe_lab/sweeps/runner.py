"""`moe-lab sweep NAME`: expand a study's grid, run it as a Hydra multirun, collect runs.csv."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from moe_lab.io import CorruptFileError, atomic_write, read_csv, read_json
from moe_lab.paths import CHECKPOINT, EXPERIMENTS, FINISHED, results_root

if TYPE_CHECKING:
    import pandas as pd

REBUILD_RTOL = 1e-6  # a rebuilt checkpoint whose final val loss is this close to its record's keeps the record

# Hydra finds the group `experiments` under a search-path root: the directory above it, which is the repository
# in an editable install and site-packages/moe_lab in a wheel's. (pkg://moe_lab would miss it in an editable
# install, where moe_lab.experiments is mapped to a directory outside moe_lab/.)
SEARCH_PATH = f"hydra.searchpath=[file://{EXPERIMENTS.parent}]"


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
    pretraining: str = "shared"  # fine-tuning studies: one pretraining for every seed, or per_seed


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
    pretraining = study.get("pretraining", "shared")
    if pretraining not in ("shared", "per_seed"):
        raise ValueError(f"{path}: study.pretraining={pretraining!r} is not one of ['shared', 'per_seed']")
    params = ((raw.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    return Study(
        name=name,
        command=command,
        paper=study.get("paper", ""),
        description=study.get("description", ""),
        params={str(k): str(v) for k, v in params.items()},
        pretrained=study.get("pretrained"),
        path=path,
        pretraining=pretraining,
    )


# Hydra keys that move or rename the folders of a study's points: the sweep and the report read the runs back from
# RESULTS/STUDY/runs/<the point's values>, so these are fixed (MOE_LAB_RESULTS moves the whole results directory)
FIXED_HYDRA_KEYS = (
    "hydra.sweep", "hydra.run", "hydra.job.chdir", "hydra.job.config.override_dirname", "hydra.output_subdir",
)  # fmt: skip


def check_hydra_overrides(study: Study, overrides: list[str]) -> None:
    """Raise ValueError naming an override of one of FIXED_HYDRA_KEYS, which would train the points where the
    study never looks for them."""
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if any(key == fixed or key.startswith(f"{fixed}.") for fixed in FIXED_HYDRA_KEYS):
            raise ValueError(
                f"{override}: a study's folder is fixed (RESULTS/{study.name}/runs/<each point's values>, where the "
                "sweep and the report read its runs back); to write elsewhere, set MOE_LAB_RESULTS=DIR"
            )


def grid(study: Study, overrides: list[str] | None = None) -> list[list[str]]:
    """Every grid point's overrides, expanded by the rules of Hydra's BasicSweeper (user overrides may sweep too)."""
    from moe_lab.config import sweep_points

    check_hydra_overrides(study, overrides or [])
    sweep = [f"{k}={v}" for k, v in study.params.items()]
    # hydra.* overrides (hydra.launcher.partition=...) set up the launcher, not a run: Hydra gets them from
    # hydra_command, the points do not carry them
    runs = [o for o in overrides or [] if not o.lstrip("+~").startswith("hydra.")]
    return sweep_points([*sweep, *runs])


def compose_point(study: Study, point: list[str]):
    """The validated config of one grid point, composed with the Compose API as the sweep job would be."""
    from moe_lab.config import compose_config

    root = "finetune" if study.command == "finetune" else "config"
    given = any(item.startswith("checkpoint=") for item in point)
    extra = ["checkpoint=unused"] if study.command == "finetune" and not given else []
    return compose_config(root, [SEARCH_PATH, f"+experiments={study.name}", *extra, *point])


def check_points(study: Study, points: list[list[str]]) -> list:
    """Every grid point's RunConfig; the first point that does not compose raises ConfigError naming it."""
    from moe_lab.config import ConfigError, finetune_changes, to_run_config

    runs = []
    for i, point in enumerate(points):
        try:
            runs.append(to_run_config(compose_point(study, point)))
            if study.command == "finetune":
                finetune_changes([*point, f"+experiments={study.name}"])
        except (ConfigError, ValueError) as err:
            raise ConfigError(f"grid point {i} ({' '.join(point)}): {err}") from None
    return runs


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


def pretrained_dir(root: Path, preset: str, seed: int | None = None) -> Path:
    """Where a fine-tuning study's pretrained model lives: one shared by every seed, ROOT/pretrained/PRESET, or with
    `seed` (study.pretraining=per_seed) the pretraining of that seed, ROOT/pretrain/PRESET/seed<S>, which is also
    where the main job's records are (`moe-lab pretrain small seed=S`)."""
    return root / "pretrained" / preset if seed is None else root / "pretrain" / preset / f"seed{seed}"


def ensure_pretrained(root: Path, preset: str, seed: int | None, extra: list[str], console=None) -> Path:
    """Pretrain a fine-tuning study's model once (resumable) for every study that stands on it; another sweep
    pretraining it at the same time is waited for. A completed record without its checkpoint (checkpoints are not
    committed, so a fresh clone holds only the records) has its checkpoint rebuilt."""
    run_dir = pretrained_dir(root, preset, seed)
    if _completed(run_dir):
        has_checkpoint = (run_dir / CHECKPOINT).exists()
        return run_dir if has_checkpoint else rebuild_checkpoint(run_dir, preset, seed, extra, console)
    _pretrain(run_dir, preset, seed, extra)
    return run_dir


def _pretrain(run_dir: Path, preset: str, seed: int | None, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "moe_lab.cli", "pretrain", preset, f"run_dir={run_dir}", "resume=true", "--wait"]
    code = subprocess.run([*cmd, *([f"seed={seed}"] if seed is not None else []), *extra]).returncode
    if code != 0:
        raise SweepError(f"pretraining {preset} into {run_dir} failed (exit {code}); its error is above")


def rebuild_checkpoint(run_dir: Path, preset: str, seed: int | None, extra: list[str], console=None) -> Path:
    """Pretrain a completed record's model again beside it (RUN_DIR.rebuild, resumable) and give the record its
    checkpoint. A rebuild whose final validation loss differs from the record's (another machine or thread count)
    replaces the record, which is moved aside, so the record always describes the checkpoint beside it."""
    from rich.console import Console

    from moe_lab.runs import move_aside

    console = console or Console()
    rebuild = run_dir.with_name(f"{run_dir.name}.rebuild")
    console.print(f"{run_dir} holds a completed pretraining without its {CHECKPOINT}: pretraining again in {rebuild}")
    _pretrain(rebuild, preset, seed, extra)
    recorded, rebuilt = (read_json(d / "summary.json").get("final_val_loss") for d in (run_dir, rebuild))
    # float summation order varies between processes, so a rebuild is not bit for bit its record: measured on the
    # main job's seed 0, dense-small ended 6e-8 nats from its record, and small, whose routing turns rounding into
    # other expert choices, 2.8e-4 away (0.48823 vs 0.48851): that is a new record
    if rebuilt is not None and recorded is not None and math.isclose(rebuilt, recorded, rel_tol=REBUILD_RTOL):
        (rebuild / CHECKPOINT).rename(run_dir / CHECKPOINT)
        shutil.rmtree(rebuild)
        console.print(f"{run_dir}: checkpoint rebuilt; its final val loss {rebuilt} matches the record's {recorded}")
    else:
        old = move_aside(run_dir)
        rebuild.rename(run_dir)
        for name in ("summary.json", ".hydra/config.yaml", ".hydra/overrides.yaml"):  # the records name their dir
            path = run_dir / name
            if path.exists():
                path.write_text(path.read_text().replace(str(rebuild), str(run_dir)))
        console.print(
            f"[yellow]{run_dir}: the rebuilt model's final val loss {rebuilt} differs from the record's {recorded} "
            f"(another machine or train.threads): it replaces the record, which moved to {old}[/yellow]"
        )
    return run_dir


class SweepError(RuntimeError):
    """A sweep that could not finish: its multirun or the pretraining it stands on exited with an error."""


@dataclass
class PointCheck:
    """A grid point against what its directory holds."""

    point: list[str]
    run_dir: Path
    identity: dict
    on_disk: bool  # the directory holds a run
    diffs: list[str]  # how that run's config differs from this point's (on disk -> now); empty if the same
    stands_on: tuple[str, int | None] | None = None  # (preset, seed or None): a point's pretraining, or its own

    def finished(self) -> bool:
        """Whether the directory holds this point's run, completed or diverged: the multirun will not train it."""
        summary = self.run_dir / "summary.json"
        if not self.on_disk or self.diffs or not summary.is_file():
            return False
        try:
            return read_json(summary).get("status") in FINISHED
        except CorruptFileError:  # the multirun names it
            return False


def point_state(check: PointCheck) -> str:
    """What a sweep will do with a grid point: keep it, resume it, refuse it (another config) or run it."""
    if check.finished():
        return "finished"
    if check.diffs:
        return "another config"
    return "resumes" if check.on_disk else "to run"


def needed_pretrainings(pretrainings: list[PointCheck], checks: list[PointCheck]) -> list[PointCheck]:
    """The pretrainings that a grid point still to train stands on: a finished point needs no weights, and a fresh
    clone of the committed results holds every pretraining's record but no checkpoint, which would otherwise be
    pretrained again."""
    waiting = {c.stands_on for c in checks if not c.finished()}
    return [pre for pre in pretrainings if pre.stands_on in waiting]


def pretraining_plan(pretrainings: list[PointCheck], checks: list[PointCheck]) -> list[str]:
    """The pretrainings a sweep will train before its grid: the needed ones without a checkpoint."""
    lines = []
    for pre in needed_pretrainings(pretrainings, checks):
        if (pre.run_dir / CHECKPOINT).exists():
            continue
        what = "rebuilds the checkpoint of" if _completed(pre.run_dir) else "resumes" if pre.on_disk else "pretrains"
        lines.append(f"{what} {pre.run_dir} ({' '.join(pre.point)})")
    return lines


def _completed(run_dir: Path) -> bool:
    summary = run_dir / "summary.json"
    return summary.exists() and read_json(summary).get("status") == "completed"


def shared_overrides(overrides: list[str]) -> list[str]:
    """The overrides a fine-tuning study's pretraining shares with it: data, tokenizer, logging, the training
    length `scale`, and where and how it runs. Not `seed`: every seed of a study fine-tunes the same pretrained
    model, or with study.pretraining=per_seed the pretraining of its own seed, which the plan passes itself."""
    shared = ("data.", "data=", "tokenizer", "logger", "scale=", "train.threads=", "train.device=")
    return [o for o in overrides if o.lstrip("+").startswith(shared)]


def plan_study(study: Study, overrides: list[str], root: Path) -> tuple[list[PointCheck], list[PointCheck]]:
    """(the shared pretrainings, the grid points), each checked against its directory, before anything runs.

    A fine-tuning point's identity includes the identity its pretrained model will have, so a pretraining
    with another config makes every point that stands on it differ too."""
    from moe_lab.config import compose, to_run_config
    from moe_lab.runs import identity_config, identity_diff, identity_hash, read_record, record_hash

    def check(point: list[str], run_dir: Path, identity: dict, stands_on=None) -> PointCheck:
        record = read_record(run_dir)
        diffs = identity_diff(record["config"], identity, record.get("unknown")) if record else []
        return PointCheck(point, run_dir, identity, record is not None, diffs, stands_on)

    given = [o.split("=", 1)[1] for o in overrides if o.startswith("study.pretraining=")]
    study = replace(study, pretraining=given[-1]) if given else study  # the command line may choose it too
    points = grid(study, overrides)
    # the jobs of a study that fine-tunes its own preset get finetune.pretrained from hydra_command
    extra = [f"finetune.pretrained={study.pretrained}"] if _default_pretrained(study, overrides) else []
    runs = check_points(study, [[*point, *extra] for point in points])
    pretrainings, expected = [], {}
    per_seed = study.pretraining == "per_seed"
    # each pretrained model the grid stands on: (preset, its seed or None when one is shared by every seed)
    needed = dict.fromkeys(
        (run.finetune.pretrained or study.pretrained, run.seed if per_seed else None)
        for run in (runs if study.command == "finetune" else [])
    )
    for preset, seed in (key for key in needed if key[0]):
        shared = [*([f"seed={seed}"] if per_seed else []), *shared_overrides(overrides)]
        identity = identity_config(to_run_config(compose(preset, shared)))
        pretrainings.append(check([preset, *shared], pretrained_dir(root, preset, seed), identity, (preset, seed)))
        expected[(preset, seed)] = identity_hash(identity)
    checks = []
    for point, run in zip(points, runs, strict=True):
        given = next((i.split("=", 1)[1] for i in point if i.startswith("checkpoint=")), None)
        preset = run.finetune.pretrained or study.pretrained
        stands_on = None if given else (preset, run.seed if per_seed else None)
        checkpoint = record_hash(Path(given)) if given else expected.get(stands_on)
        identity = identity_config(run, checkpoint)
        folder = point_dirname(study, point, overrides)
        if "/" in folder or "\0" in folder:  # Hydra would nest the run (or, with '..', put it outside the study)
            raise ValueError(
                f"grid point {len(checks)} ({' '.join(point)}): a swept value holds '/', so its run would not be one "
                f"folder in {results_dir(study, root) / 'runs'}; sweep over values without '/'"
            )
        checks.append(check(point, results_dir(study, root) / "runs" / folder, identity, stands_on))
    return pretrainings, checks


def _refuse_or_move(checks: list[PointCheck], what: str, rerun: bool, console) -> None:
    """Without --rerun, stop if a run on disk has another config; with it, move the runs aside."""
    from moe_lab.runs import RunConflictError, describe_diff, move_aside

    conflicts = [c for c in checks if c.diffs]
    if conflicts and not rerun:
        first = conflicts[0]
        raise RunConflictError(
            f"{len(conflicts)} of {len(checks)} {what} hold runs of another config (e.g. {first.run_dir}: "
            f"{describe_diff(first.diffs)}; on disk -> now): keep them by running in a fresh results directory "
            "(MOE_LAB_RESULTS=DIR), or add --rerun to move them aside and run them again"
        )
    for c in checks:
        if rerun and c.on_disk and (c.diffs or what == "grid points"):
            console.print(f"moved {c.run_dir} aside to {move_aside(c.run_dir)}")


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
    _refuse_or_move(pretrainings, "shared pretrainings", rerun, console)
    _refuse_or_move(checks, "grid points", rerun, console)
    # the pretraining a fine-tuning study stands on shares the study's data and logging overrides; with a parallel
    # launcher, as many pretrain at once as the grid points would run
    jobs = [(*pre.stands_on, pre.point[1:]) for pre in needed_pretrainings(pretrainings, checks)]
    workers = min(len(jobs), os.cpu_count() or 1) if launcher == "joblib" else 1
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        for done in [pool.submit(ensure_pretrained, root, preset, seed, extra) for preset, seed, extra in jobs]:
            done.result()
    env = {**os.environ, "MOE_LAB_RESULTS": str(root)}
    if launcher.startswith("submitit"):  # a job's console goes to its log, not here
        console.print(
            f"submitit: each grid point is a job; its output is in {results_dir(study, root) / 'runs' / '.submitit'}"
        )
    code = subprocess.run(hydra_command(study, root, overrides, launcher), env=env).returncode
    frame = collect(study, root)
    if code != 0:
        raise SweepError(
            f"the multirun of {name} exited with {code}; runs.csv has the runs so far; the same command resumes it"
        )
    return frame


def _default_pretrained(study: Study, overrides: list[str]) -> bool:
    """Whether the study's own pretraining preset is used (not swept, not overridden)."""
    return bool(
        study.command == "finetune"
        and study.pretrained
        and "finetune.pretrained" not in study.params
        and not any(o.startswith("finetune.pretrained=") for o in overrides)
    )


def exclude_keys(study: Study, overrides: list[str]) -> list[str]:
    """Keys left out of a grid point's directory name: the bookkeeping, and the fixed overrides (not swept) of keys
    the study does not sweep; `moe.top_k=1` on the top-k study still names its one point `moe.top_k=1`."""
    fixed = [o.split("=", 1)[0] for o in overrides if "=" in o and "," not in o]
    fixed = [key for key in fixed if key not in study.params]
    exclude = ["experiments", "checkpoint", *fixed]
    return [*exclude, "finetune.pretrained"] if _default_pretrained(study, overrides) else exclude


def point_dirname(study: Study, point: list[str], overrides: list[str]) -> str:
    """The directory Hydra's multirun gives a grid point (hydra.job.override_dirname, as hydra_command sets it)."""
    from moe_lab.config import override_dirname

    return override_dirname(point, exclude_keys(study, overrides))


def hydra_command(study: Study, root: Path, overrides: list[str], launcher: str) -> list[str]:
    """The `python -m moe_lab.sweeps.app --multirun ...` command line of a study."""
    exclude = exclude_keys(study, overrides)
    default_pretrained = _default_pretrained(study, overrides)
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
    if default_pretrained:
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
                "trainable_parameters",
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
