"""The life of one run, shared by pretraining and fine-tuning, top to bottom: find its directory, build what it
trains, claim the directory, describe the model, train and record (the steps are moe_lab.train.lifecycle's). What
differs is the `build` step."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from moe_lab.config import RunConfig
from moe_lab.models import count_parameters
from moe_lab.train.lifecycle import RunStart, begin_run, claim, keep_base_weights, train_and_record


@dataclass
class Built:
    """What a run trains, and what it says about it: the model, its task, the summary's extra keys, the model table's
    title (with FLOPs per token when known) and the line about the data."""

    model: torch.nn.Module
    task: Any
    extra: dict[str, Any]
    title: str
    about: str
    flops: int | None = None


def run_training(
    run: RunConfig,
    identity: dict[str, Any],
    build: Callable[[RunConfig], Built],
    cfg: DictConfig,
    overrides: list[str],
    console: Console,
    rerun: bool = False,
    wait: bool = False,
) -> dict:
    """Train `build(run)` in the run's directory; returns the summary written to summary.json, or the summary of
    the run there if it has already ended."""
    with run_directory(run, identity, cfg, overrides, console, rerun, wait) as directory:
        if directory.finished is not None:
            return directory.finished
        # data and model first: a missing file or an unreachable hub fails before any run directory exists
        started = time.time()
        built = build(run)
        start = directory.claim()
        if directory.finished is not None:  # another process finished it while we waited
            return directory.finished
        if (base := built.extra.get("pretrained_weights")) is not None:  # a fine-tuning resumes on its own base
            start = keep_base_weights(start, base)
        params = count_parameters(built.model)
        describe_model(console, built.title, params, built.flops)
        console.print(f"{built.about}; run dir {start.run_dir}")
        return train_and_record(run, cfg, start, built.model, built.task, params, built.extra, started, console)


@dataclass
class RunDirectory:
    """What `run_directory` yields: the run's start, its summary if it has already ended, and `claim` to lock it."""

    start: RunStart
    identity: dict[str, Any]
    cfg: DictConfig
    overrides: list[str]
    console: Console
    wait: bool

    @property
    def finished(self) -> dict | None:
        """The summary of the run if it has already ended (found at the start, or once claimed): nothing to do."""
        return self.start.previous

    def claim(self) -> RunStart:
        """`claim` the directory: lock it, record the run and load the checkpoint to resume from."""
        self.start = claim(self.start, self.identity, self.cfg, self.overrides, self.console, self.wait)
        return self.start


@contextlib.contextmanager
def run_directory(
    run: RunConfig,
    identity: dict[str, Any],
    cfg: DictConfig,
    overrides: list[str],
    console: Console,
    rerun: bool = False,
    wait: bool = False,
) -> Iterator[RunDirectory]:
    """The run's directory as `begin_run` finds it (nothing is written yet), to `claim` once the data and the model
    are built; its lock is released when the block ends, however it ends."""
    directory = RunDirectory(begin_run(run, identity, console, rerun), identity, cfg, overrides, console, wait)
    try:
        yield directory
    finally:
        directory.start.release()


def describe_model(console: Console, name: str, params: dict[str, int], flops: int | None = None) -> None:
    """A table of total and active parameters (and FLOPs per token when known)."""
    table = Table(title=f"model {name}", show_header=False)
    table.add_row("parameters (total)", f"{params['total']:,}")
    table.add_row("parameters (active per token)", f"{params['active']:,}")
    table.add_row("of which experts (total)", f"{params['experts']:,}")
    if flops is not None:
        table.add_row("forward FLOPs per token", f"{flops:,}")
    console.print(table)
