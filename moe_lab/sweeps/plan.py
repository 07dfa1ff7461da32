"""What a sweep will do with what is on disk, decided before anything runs: each grid point and each shared
pretraining checked against its directory (finished, resumes, another config, to run), the pretrainings a
still-to-train point stands on, and how they are trained or their checkpoints rebuilt."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from moe_lab.io import CorruptFileError, read_json
from moe_lab.paths import CHECKPOINT, FINISHED
from moe_lab.sweeps.study import Study, check_points, default_pretrained, grid, point_dirname, results_dir

REBUILD_RTOL = 1e-6  # a rebuilt checkpoint whose final val loss is this close to its record's keeps the record


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
    checkpoint. A rebuild with other weights than the record names (another machine, thread count or float
    rounding; for an older record without them, another final validation loss) replaces the record, which is
    moved aside, so the record always describes the checkpoint beside it."""
    from rich.console import Console

    from moe_lab.runs import move_aside

    console = console or Console()
    rebuild = run_dir.with_name(f"{run_dir.name}.rebuild")
    console.print(f"{run_dir} holds a completed pretraining without its {CHECKPOINT}: pretraining again in {rebuild}")
    _pretrain(rebuild, preset, seed, extra)
    record, rebuilt_record = (read_json(d / "summary.json") for d in (run_dir, rebuild))
    recorded, rebuilt = record.get("final_val_loss"), rebuilt_record.get("final_val_loss")
    # float summation order varies between processes, so a rebuild is not bit for bit its record: measured on the
    # main job's seed 0, dense-small ended 6e-8 nats from its record, and small, whose routing turns rounding into
    # other expert choices, 2.8e-4 away (0.48823 vs 0.48851): that is a new record. A record that names its
    # weights (weights_fingerprint) is kept only for the same weights; an older one, for the same loss.
    if record.get("weights") and rebuilt_record.get("weights"):
        same = record["weights"] == rebuilt_record["weights"]
    else:
        same = rebuilt is not None and recorded is not None and math.isclose(rebuilt, recorded, rel_tol=REBUILD_RTOL)
    if same:
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
            f"[yellow]{run_dir}: the rebuilt model is not the recorded one (final val loss {rebuilt} against "
            f"{recorded}{_weights_text(rebuilt_record, record)}): it replaces the record, which moved to {old}[/yellow]"
        )
    return run_dir


def _weights_text(rebuilt: dict, record: dict) -> str:
    both = rebuilt.get("weights") and record.get("weights")
    return f"; weights {rebuilt['weights']} against {record['weights']}" if both else ""


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


def named_bases(pre: PointCheck, checks: list[PointCheck]) -> dict[Path, str]:
    """The finished grid points that stand on pretraining `pre` at a seed where a point on it is still to train
    (the runs those new points will be paired with), each with the base weights it records; points recorded
    before fine-tunings named them are left out."""
    mine = [c for c in checks if c.stands_on == pre.stands_on]
    waiting = {c.identity.get("seed") for c in mine if not c.finished()}
    beside = [c for c in mine if c.finished() and c.identity.get("seed") in waiting]
    return {c.run_dir: w for c in beside if (w := _base_weights(c))}


def base_warnings(pretrainings: list[PointCheck], checks: list[PointCheck]) -> list[str]:
    """For the dry run (which reads records, not checkpoints): each pretraining under whose new points finished
    ones name base weights that its checkpoint will not hold. A rebuild is another model unless it reproduces
    their weights bit for bit; a checkpoint on disk holds the weights its record names. The sweep then stops
    before the grid (base_conflicts) rather than pair runs of two base models."""
    lines = []
    for pre in needed_pretrainings(pretrainings, checks):
        named = named_bases(pre, checks)
        if not named:
            continue
        if not (pre.run_dir / CHECKPOINT).exists():
            lines.append(
                f"{len(named)} finished point(s) beside points to train were fine-tuned from {pre.run_dir}, whose "
                "checkpoint is gone: unless its rebuild has their base weights bit for bit, the sweep stops before "
                "the grid (see --rerun)"
            )
        elif (weights := _record_weights(pre.run_dir)) and (other := [d for d, w in named.items() if w != weights]):
            lines.append(
                f"{len(other)} finished point(s) beside points to train (e.g. {other[0]}) were fine-tuned "
                f"from other weights than {pre.run_dir} holds ({weights}): the sweep stops before the grid (see "
                "--rerun)"
            )
    return lines


def base_conflicts(pretrainings: list[PointCheck], checks: list[PointCheck]) -> list[str]:
    """Each pretraining with points still to train on it whose finished points at those seeds were fine-tuned from
    other weights than its checkpoint's (a rebuild, or a pretraining run again): a study pairs its points by seed,
    so the new points would be compared with runs of another base model. Runs recorded before fine-tuning named
    its weights cannot be checked."""
    from moe_lab.train.checkpoint import load_checkpoint, weights_fingerprint

    problems = []
    for pre in needed_pretrainings(pretrainings, checks):
        named = named_bases(pre, checks)
        if not named:
            continue
        weights = weights_fingerprint(load_checkpoint(pre.run_dir / CHECKPOINT)["model"])
        other = [run_dir for run_dir, w in named.items() if w != weights]
        if other:
            problems.append(
                f"{len(other)} finished point(s) (e.g. {other[0]}) were fine-tuned from weights {named[other[0]]} of "
                f"{pre.run_dir}, whose checkpoint now holds weights {weights}"
            )
    return problems


def _base_weights(check: PointCheck) -> str | None:
    """The weights_fingerprint a finished fine-tuning point records of its base model (None before they did)."""
    return read_json(check.run_dir / "summary.json").get("pretrained_weights")


def _record_weights(run_dir: Path) -> str | None:
    """The weights a completed pretraining's record names (None for a record made before records named them)."""
    summary = run_dir / "summary.json"
    return read_json(summary).get("weights") if summary.is_file() else None


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
    extra = [f"finetune.pretrained={study.pretrained}"] if default_pretrained(study, overrides) else []
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


def refuse_or_move(checks: list[PointCheck], what: str, rerun: bool, console) -> None:
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
