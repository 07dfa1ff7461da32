"""What makes resuming or skipping a run safe: its identity (the config that decides its numbers), a lock held
by the process that trains it, moving an old run aside instead of deleting it, and cleaning up after a kill."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import secrets
import socket
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from hashlib import sha256
from pathlib import Path
from typing import Any

import yaml

from moe_lab.io import CorruptFileError, read_json
from moe_lab.paths import EVAL_DIR

RECORD = "run.json"
LOCK = ".lock"
# what a run directory holds; a file named ".<one of these>.<anything>" is a temporary file of an atomic
# write (moe_lab.io) that a kill left behind
RUN_FILES = (
    "checkpoint.pt", "metrics.csv", "summary.json", "routing_probe.npz", "fluctuation.csv", "specialisation.csv",
    RECORD, "config.yaml", "overrides.yaml",
)  # fmt: skip

# Keys that do not change a run's numbers, so a resume or a sweep may differ in them. Thread count, device and
# the parallel layout change the order of float sums (the last bits of a loss), not the experiment; checkpoint
# cadence does not change anything (resume is bit-exact); the rest name a run, say where things go and how
# they are logged, or describe a study.
IGNORED_KEYS = (
    "name", "run_dir", "runs_root", "resume", "logger", "study", "data.cache_dir", "train.threads", "train.device",
    "train.ckpt_every", "parallel",
)  # fmt: skip


class RunConflictError(ValueError):
    """A run directory holds another run than the one asked for, or is being trained by another process."""


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in IGNORED_KEYS)


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{full}."))
        else:
            out[full] = list(value) if isinstance(value, tuple) else value
    return out


def identity_config(run: Any, checkpoint_identity: str | None = None) -> dict[str, Any]:
    """The keys of a RunConfig (as trained: scale applied) that decide its numbers, flattened to dotted keys.

    A fine-tuning run's `checkpoint` is the identity of the pretrained run it starts from, not its path, so
    moving a results directory keeps its runs, and pretraining again with another config changes them."""
    flat = _flatten(dataclasses.asdict(run.scaled()))
    flat = {k: v for k, v in flat.items() if not _ignored(k)}
    flat["checkpoint"] = checkpoint_identity if run.checkpoint else None
    return flat


# Keys the schema gained after identities were first hashed, with the value every run had before them: at that
# value a key is left out of the hash, so that a fine-tuning run recorded before the key existed still names its
# pretrained model by the same hash. Add a key here when a field joins the identity with a default that changes
# no run's numbers.
ADDED_KEYS = {
    "data.valence_cues": False,
    "task.pooling": "mean",
    "task.held_out_only": True,
    "finetune.init": "pretrained",
}


def identity_hash(config: dict[str, Any]) -> str:
    """A short hash of an identity config, to name it in records and messages (ADDED_KEYS at their old value
    left out)."""
    kept = {k: v for k, v in config.items() if not (k in ADDED_KEYS and v == ADDED_KEYS[k])}
    return sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _defaults() -> dict[str, Any]:
    from moe_lab.config import RunConfig

    return identity_config(RunConfig())


def identity_diff(stored: dict[str, Any], current: dict[str, Any], unknown: list[str] | None = None) -> list[str]:
    """'key: on disk -> now' for each key that differs. A key the stored run lacks (a field added to the schema
    since) counts as its default; a key it has that the schema no longer knows, or one listed in `unknown`
    (what an old run's record cannot tell), is not compared."""
    defaults = _defaults()
    diffs = []
    for key, now in current.items():
        if key in (unknown or []):
            continue
        before = stored.get(key, defaults.get(key))
        if before != now and not (_is_number(before) and _is_number(now) and float(before) == float(now)):
            diffs.append(f"{key} {_show(before)} -> {_show(now)}")
    return diffs


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def describe_diff(diffs: list[str], most: int = 6) -> str:
    """The first few differences on one line, and how many more."""
    text = ", ".join(diffs[:most])
    return text + (f" and {len(diffs) - most} more" if len(diffs) > most else "")


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """A run's run.json; for a run made before run.json existed, one built from its saved config; None if the
    directory holds no run."""
    run_dir = Path(run_dir)
    path = run_dir / RECORD
    if path.is_file():
        try:
            return read_json(path)
        except CorruptFileError as err:
            raise RunConflictError(f"{err}; move the run away or add --rerun") from None
    saved = None
    summary = run_dir / "summary.json"
    if summary.is_file():
        with contextlib.suppress(CorruptFileError):  # a summary cut short: the saved Hydra config may still say
            values = read_json(summary)
            saved = values.get("config") if isinstance(values, dict) else None
    hydra_config = run_dir / ".hydra" / "config.yaml"
    if saved is None and hydra_config.is_file():
        try:
            saved = yaml.safe_load(hydra_config.read_text())
        except yaml.YAMLError as err:
            problem = str(err).strip().splitlines()[0]
            raise RunConflictError(f"{hydra_config} is not valid YAML ({problem}); move the run away") from None
    if not isinstance(saved, dict):
        return None
    from omegaconf import OmegaConf

    from moe_lab.config import RunConfig, to_run_config

    try:
        run = to_run_config(OmegaConf.merge(OmegaConf.structured(RunConfig), saved))
    except Exception as err:  # an older schema, or values it no longer accepts: say so rather than guess
        raise RunConflictError(f"{run_dir} holds a run whose config this version cannot read ({err})") from None
    checkpoint = record_hash(Path(run.checkpoint)) if run.checkpoint else None
    config = identity_config(run, checkpoint)
    # a fine-tuning run whose pretrained model is no longer there (results/pretrained/ is not committed)
    unknown = ["checkpoint"] if run.checkpoint and checkpoint is None else []
    return {"identity": identity_hash(config), "config": config, "wandb_id": None, "legacy": True, "unknown": unknown}


def record_hash(run_dir: Path) -> str | None:
    """The identity hash of the run in run_dir (a fine-tuning checkpoint's), None if there is none."""
    record = read_record(run_dir)
    return record["identity"] if record else None


def new_record(config: dict[str, Any]) -> dict[str, Any]:
    """The run.json of a run starting now: its identity, the config behind it, and its W&B id."""
    from moe_lab import __version__

    return {
        "identity": identity_hash(config),
        "config": config,
        "ignored_keys": list(IGNORED_KEYS),
        "wandb_id": secrets.token_hex(4),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "moe_lab_version": __version__,
    }


class RunLock:
    """An exclusive lock on a run directory, held by the process that trains it and released by the kernel
    when that process ends, however it ends (flock(2)). The lock file names its holder."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self, wait: bool, on_wait: Callable[[str], None] | None = None) -> None:
        """Take the lock; if another process holds it, wait for it (saying who) or raise RunConflictError."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _holder(fd)
            if not wait:
                os.close(fd)
                raise RunConflictError(
                    f"{self.path.parent} is being trained by {holder}; wait for it to end, or use another run_dir"
                ) from None
            if on_wait is not None:
                on_wait(f"waiting for {self.path.parent}: {holder} is training it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": datetime.now().isoformat("T", "seconds")}
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let go of the lock (the file stays: removing it would race with a process opening it)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


def _holder(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except json.JSONDecodeError:
        owner = {}
    if not owner:
        return "another process"
    return f"pid {owner.get('pid')} on {owner.get('host')} (since {owner.get('since')})"


def lock_holder(run_dir: Path) -> str | None:
    """Who holds run_dir's lock, or None if nobody does."""
    path = Path(run_dir) / LOCK
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _holder(fd)
    finally:
        os.close(fd)  # also drops the shared lock taken to look
    return None


def move_aside(run_dir: Path) -> Path:
    """Move a run to <parent>/replaced/<time>/<name>, never deleting it; refuses while a process trains it."""
    run_dir = Path(run_dir)
    holder = lock_holder(run_dir)
    if holder is not None:
        raise RunConflictError(f"cannot move {run_dir} aside: {holder} is training it")
    dest = run_dir.parent / "replaced" / datetime.now().strftime("%Y%m%d-%H%M%S-%f") / run_dir.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    run_dir.rename(dest)
    return dest


def remove_orphans(run_dir: Path) -> list[Path]:
    """Delete the temporary files of atomic writes that a killed process left (call it holding the lock)."""
    removed = []
    for folder in (Path(run_dir), Path(run_dir) / ".hydra", Path(run_dir) / EVAL_DIR):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            name = path.name
            orphan = name.startswith(".") and (".tmp." in name or any(name.startswith(f".{f}.") for f in RUN_FILES))
            if orphan and path.is_file():
                path.unlink()
                removed.append(path)
    return removed


def check_writable(path: Path) -> None:
    """Raise PermissionError naming the first existing folder on the way to `path` that cannot be written to."""
    folder = Path(path).absolute()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write under {path}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise PermissionError(f"cannot write under {path}: {folder} is not writable ({err.strerror})") from None
