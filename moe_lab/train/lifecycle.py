"""One run's lifecycle, shared by pretraining and fine-tuning: its directory and whether the run there is this
one, seeding and the thread count, the lock, resuming from the checkpoint, logging, and the record
(run.json, the Hydra snapshot, summary.json however the run ends). `begin_run` -> build data and model ->
`claim` -> `train_and_record`, in that order in moe_lab.train.run."""

from __future__ import annotations

import contextlib
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from moe_lab.config import RunConfig
from moe_lab.io import CorruptFileError, StorageError, atomic_write
from moe_lab.parallel import World, from_main, init_from_env, world
from moe_lab.paths import FINISHED, runs_root
from moe_lab.runs import (
    RECORD,
    RunConflictError,
    RunLock,
    check_writable,
    describe_diff,
    identity_diff,
    move_aside,
    new_record,
    read_record,
    remove_orphans,
)
from moe_lab.track import RunLogger, WandbSink, read_summary, write_json_atomic
from moe_lab.train.checkpoint import load_checkpoint
from moe_lab.train.loop import CHECKPOINT, rank_seed, resolve_device, train


@dataclass
class RunStart:
    """A run about to train (or found finished): its directory, record, lock and checkpoint."""

    run_dir: Path
    resume: bool
    previous: dict | None = None  # the summary of a run that already ended: nothing to do
    record: dict | None = None  # run.json
    lock: RunLock | None = None
    resume_state: dict | None = None  # the checkpoint to continue from

    def release(self) -> None:
        """Let go of the run directory's lock."""
        if self.lock is not None:
            self.lock.release()


def resolve_run_dir(run: RunConfig) -> Path:
    """The run's directory: run_dir if given; on resume the newest run of this name; else a new timestamped one."""
    if run.run_dir:
        return Path(run.run_dir)
    root = runs_root(run.runs_root) / run.name
    if run.resume:
        previous = sorted(p.parent for p in root.glob(f"*/{CHECKPOINT}"))
        if previous:
            return previous[-1]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = root / stamp
    n = 1
    while path.exists():
        path, n = root / f"{stamp}-{n}", n + 1
    return path


def write_hydra_snapshot(run_dir: Path, cfg: DictConfig, overrides: list[str]) -> None:
    """.hydra/config.yaml (resolved) and .hydra/overrides.yaml, as a Hydra app run would leave them."""
    hydra_dir = run_dir / ".hydra"
    with atomic_write(hydra_dir / "config.yaml") as tmp:
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    with atomic_write(hydra_dir / "overrides.yaml") as tmp:
        tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))


def check_device(name: str) -> None:
    """Raise ValueError if train.device names a device this machine does not have."""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"train.device={name} but CUDA is not available (torch {torch.__version__}: {build}); "
                             "use train.device=auto or cpu")  # fmt: skip
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"train.device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("train.device=mps but MPS is not available; use train.device=auto or cpu")


def same_run(run_dir: Path, identity: dict[str, Any], resume: bool) -> dict | None:
    """The record of the run in run_dir if it is this run; None if there is none; RunConflictError if it is another."""
    record = read_record(run_dir)
    if record is None:
        return None
    if not resume:
        raise RunConflictError(
            f"{run_dir} already holds a run: add resume=true to continue it, or --rerun to move it aside and "
            "start again"
        )
    diffs = identity_diff(record["config"], identity, record.get("unknown"))
    if diffs:
        raise RunConflictError(
            f"{run_dir} holds a run of another config ({describe_diff(diffs)}; on disk -> now): keep it by using "
            "another run_dir or results directory, or add --rerun to move it aside and start again"
        )
    return record


def _on_main(w: World, work: Callable[[], Any], share: Callable[[Any], Any] = lambda value: value) -> Any:
    """`work()` on rank 0; the other ranks get `share` of its value, or raise its exception."""
    if w.size == 1:
        return work()
    value, outcome = None, ("ok", None)
    if w.main:
        try:
            value = work()
            outcome = ("ok", share(value))
        except Exception as err:
            outcome = ("error", err)
    kind, shared = from_main(outcome, w)
    if kind == "error":
        raise shared
    return value if w.main else shared


def begin_run(run: RunConfig, identity: dict[str, Any], console: Console, rerun: bool = False) -> RunStart:
    """Before any data is built: the run directory, and whether it holds this run already ended (`previous`),
    this run to resume, or another run (RunConflictError). Seeds the RNGs and sets the thread count.

    Under torchrun (moe_lab.parallel) it joins the process group first; rank 0 decides the directory and the
    others follow it."""
    check_device(run.train.device)
    w = init_from_env(run.train.device)
    if not w.main:
        console.quiet = True  # rank 0 speaks for the run
    if not run.logger.verbose:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    start = _on_main(w, lambda: _begin_on_main(run, identity, console, rerun))
    if start.previous is None:
        seed = rank_seed(run.seed)
        torch.manual_seed(seed)
        random.seed(seed)
        if run.train.threads > 0:
            torch.set_num_threads(run.train.threads)
    return start


def _begin_on_main(run: RunConfig, identity: dict[str, Any], console: Console, rerun: bool) -> RunStart:
    run_dir = resolve_run_dir(run)
    check_writable(run_dir)
    if rerun and run_dir.is_dir() and any(run_dir.iterdir()):
        console.print(f"moved {run_dir} aside to {move_aside(run_dir)}")
    same_run(run_dir, identity, run.resume)
    previous = _previous_summary(run_dir)
    if run.resume and previous and previous.get("status") in FINISHED:
        console.print(f"{run_dir} already {previous['status']}; nothing to resume")
        return RunStart(run_dir, run.resume, previous=previous)
    return RunStart(run_dir, run.resume)


def _previous_summary(run_dir: Path) -> dict | None:
    """The summary.json of the run in run_dir, None if it has none; one cut short or garbled names the file."""
    try:
        return read_summary(run_dir)
    except CorruptFileError as err:
        raise err.hint("move the run away, or add --rerun to move it aside and start again") from None


def claim(
    start: RunStart,
    identity: dict[str, Any],
    cfg: DictConfig,
    overrides: list[str],
    console: Console,
    wait: bool = False,
) -> RunStart:
    """Lock the run directory (waiting for another process if `wait`), then under the lock check the run again,
    remove what a kill left, write run.json and the Hydra snapshot once, and load the checkpoint to resume from.
    Call it once the data and the model are built, so bad input leaves no directory behind. Rank 0 does all of
    this; the other ranks then load the same checkpoint."""
    w = world()
    # the lock stays rank 0's, and the checkpoint is read from disk by each rank, not sent
    claimed = _on_main(
        w,
        lambda: _claim_on_main(start, identity, cfg, overrides, console, wait),
        lambda value: replace(value, lock=None, resume_state=None),
    )
    if not w.main and claimed.previous is None and start.resume and (start.run_dir / CHECKPOINT).exists():
        claimed = replace(claimed, resume_state=load_checkpoint(start.run_dir / CHECKPOINT))
    return claimed


def _claim_on_main(
    start: RunStart,
    identity: dict[str, Any],
    cfg: DictConfig,
    overrides: list[str],
    console: Console,
    wait: bool,
) -> RunStart:
    run_dir = start.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    lock.acquire(wait, lambda message: console.print(message, soft_wrap=True))
    try:
        record = same_run(run_dir, identity, start.resume)  # another process may have started or ended it
        previous = _previous_summary(run_dir)
        if start.resume and previous and previous.get("status") in FINISHED:
            console.print(f"{run_dir} already {previous['status']}; nothing to resume")
            lock.release()
            return replace(start, previous=previous)
        for path in remove_orphans(run_dir):
            console.print(f"removed {path.name}, left by a killed process")
        if record is None or record.get("legacy"):
            record = new_record(identity)
            write_json_atomic(run_dir / RECORD, record)
        if not (run_dir / ".hydra" / "config.yaml").exists():  # a resume keeps the config the run started with
            write_hydra_snapshot(run_dir, cfg, overrides)
        state = None
        if start.resume and (run_dir / CHECKPOINT).exists():
            state = load_checkpoint(run_dir / CHECKPOINT)
    except BaseException:
        lock.release()
        raise
    return replace(start, record=record, lock=lock, resume_state=state)


def keep_base_weights(start: RunStart, weights: str) -> RunStart:
    """Record in run.json the weights_fingerprint of the base model a fine-tuning starts from; a resume whose base
    checkpoint now holds other weights (rebuilt or pretrained again) is a RunConflictError, since it would finish
    on another model what it began on one. Every rank checks (the record is shared); rank 0 writes."""
    record = start.record or {}
    recorded = record.get("pretrained_weights")
    if recorded == weights:
        return start
    if recorded is not None and start.resume_state is not None:
        raise RunConflictError(
            f"{start.run_dir} was fine-tuned from base weights {recorded}, and its base checkpoint now holds "
            f"{weights}: resuming would finish it on another model; restore that checkpoint, or add --rerun "
            "(rerun=true) to train it again from step 0 on these weights"
        )
    record = {**record, "pretrained_weights": weights}  # a first start, or one that had not checkpointed yet
    if world().main:
        write_json_atomic(start.run_dir / RECORD, record)
    return replace(start, record=record)


class SilentLogger:
    """The logger of ranks other than 0 under data parallelism: rank 0 writes the run's records."""

    def resume(self, step: int) -> None: ...

    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def finish(self, failed: bool = False) -> None: ...


def train_and_record(
    run: RunConfig,
    cfg: DictConfig,
    start: RunStart,
    model: torch.nn.Module,
    task: Any,
    params: dict[str, int],
    extra: dict[str, Any],
    started: float,
    console: Console,
) -> dict:
    """Train with logging to CSV (and W&B), and write summary.json however the run ends; returns the summary.
    A summary.json the machine will not take (a full disk) leaves a short one recording the run as failed, and
    raises RunFailedError."""
    run_dir = start.run_dir
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    wandb_sink = None
    if run.logger.wandb and world().main:
        wandb_id = (start.record or {}).get("wandb_id")
        wandb_name = f"{run.name}/{run_dir.name}"
        wandb_sink = WandbSink(
            run_dir, run.logger.project, wandb_name, resolved, run.logger.wandb_mode, wandb_id,
            silent=not run.logger.verbose,
        )  # fmt: skip
    logger = RunLogger(run_dir, wandb_sink) if world().main else SilentLogger()
    summary: dict[str, Any] = {
        "name": run.name,
        "run_dir": str(run_dir),
        "identity": (start.record or {}).get("identity"),
        "status": "running",
        "world_size": world().size,
        "parameters": params,
        **extra,
        "device": str(resolve_device(run.train.device)),
        "torch_version": torch.__version__,
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "config": resolved,
    }
    failed = False
    try:
        result = train(
            model, task, run.train, run.optim, run_dir, logger, resume_state=start.resume_state, console=console,
            show_progress=run.logger.progress, expert_parallel=run.parallel.expert,
        )  # fmt: skip
        summary.update(
            status=result.status,
            step=result.step,
            final_train_loss=result.train_loss,
            **{f"final_{k}": v for k, v in result.eval.items()},
            **{f"best_{k}": v for k, v in result.best.items()},
            diverged_at_step=result.diverged_at,
            reason=result.reason,
            train_seconds=result.train_seconds,
            tokens=result.tokens,
            tokens_per_s=result.tokens_per_s,
            weights=result.weights,
            **result.fluctuation,
        )
    except BaseException as err:
        failed = True
        summary.update(status="failed", reason=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        if isinstance(err, Exception):
            raise RunFailedError(
                f"{run_dir} failed while training ({type(err).__name__}: {err}); "
                f"the traceback is in {run_dir / 'summary.json'}; resume=true continues from the last checkpoint"
            ) from err
        raise  # Ctrl-C or SystemExit: recorded as failed, resumable
    finally:
        summary["wall_seconds"] = time.time() - started
        unwritten = _record(logger, summary)
        logger.finish(failed=failed or unwritten is not None)
    if unwritten is not None:
        raise RunFailedError(
            f"{run_dir} trained to step {summary.get('step')} but its record could not be written ({unwritten}); "
            "it is recorded as failed: free space, and resume=true records it from the last checkpoint"
        ) from unwritten
    report_run(console, summary)
    return summary


def _record(logger: RunLogger | SilentLogger, summary: dict[str, Any]) -> StorageError | None:
    """Write summary.json; where the machine refuses it (a full disk), write the few lines that record the run as
    failed instead (they may fit where the whole summary did not), and return why."""
    try:
        logger.summary(summary)
        return None
    except StorageError as err:
        short = {key: summary.get(key) for key in ("name", "run_dir", "identity", "step", "wall_seconds")}
        short.update(status="failed", reason=f"StorageError: {err}")
        with contextlib.suppress(OSError):
            logger.summary(short)
        return err


class RunFailedError(RuntimeError):
    """A run that started training and then raised: recorded as failed in its summary.json."""


def report_run(console: Console, summary: dict) -> None:
    """The end-of-run lines: status, losses against the unigram baseline, speed."""
    status = summary["status"]
    colour = {"completed": "green", "diverged": "red"}.get(status, "yellow")
    console.print(f"[{colour}]{status}[/{colour}] after {summary.get('step')} steps in {summary['wall_seconds']:.0f} s")
    if summary.get("unigram_val_loss") is not None and summary.get("final_val_loss") is not None:
        console.print(
            f"final val loss {summary['final_val_loss']:.4f} (ppl {summary['final_val_ppl']:.2f}) vs unigram "
            f"{summary['unigram_val_loss']:.4f}; {summary['tokens_per_s']:,.0f} train tokens/s"
        )
    elif summary.get("final_val_loss") is not None:
        finals = "  ".join(
            f"{k.removeprefix('final_')} {v:.4f}" for k, v in summary.items() if k.startswith("final_val")
        )
        console.print(f"{finals}; {summary['tokens_per_s']:,.0f} train tokens/s")
    console.print(f"results: {summary['run_dir']}/summary.json, metrics.csv")
