"""One training loop for pretraining and fine-tuning: a model, a task, a config, a run directory."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from moe_lab.config import OptimConfig, TrainConfig
from moe_lab.models.transformer import ModelLosses, moe_layers
from moe_lab.track import RunLogger
from moe_lab.train.checkpoint import rng_state, save_checkpoint, set_rng_state
from moe_lab.train.fluctuation import RoutingProbe
from moe_lab.train.optim import UpdateClipper, build_optimizer, build_scheduler

CHECKPOINT = "checkpoint.pt"


class Task(Protocol):
    """What the loop trains on: deterministic batches by index, a loss, an evaluation."""

    def train_batch(self, index: int, device: torch.device) -> dict[str, torch.Tensor]: ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ModelLosses: ...

    def tokens(self, batch: dict[str, torch.Tensor]) -> int: ...

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]: ...


@dataclass
class TrainResult:
    """How a run ended, for summary.json."""

    status: str  # completed | diverged
    step: int
    train_loss: float | None = None
    eval: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    diverged_at: int | None = None
    reason: str | None = None
    train_seconds: float = 0.0
    tokens: int = 0
    moe: dict[str, Any] = field(default_factory=dict)
    # routing fluctuation summary: fluctuation@0.2 etc. (moe_lab.train.fluctuation)
    fluctuation: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0


def resolve_device(name: str) -> torch.device:
    """auto -> cuda if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def moe_metrics(model: nn.Module, mode: str, prefix: str) -> dict[str, float]:
    """Every MoE layer's metrics since their last read, flattened to `prefix/<block>/<name>` keys."""
    out: dict[str, float] = {}
    for name, layer in moe_layers(model):
        block = name.split(".")[-2] if name.endswith(".ffn") else name
        for key, value in layer.metrics(mode).items():
            if isinstance(value, list):
                out.update({f"{prefix}/{block}/{key}/{e}": v for e, v in enumerate(value)})
            else:
                out[f"{prefix}/{block}/{key}"] = value
    return out


def train(
    model: nn.Module,
    task: Task,
    train_cfg: TrainConfig,
    optim_cfg: OptimConfig,
    run_dir: Path,
    logger: RunLogger,
    resume_state: dict[str, Any] | None = None,
    console: Console | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train `model` on `task`, continuing from `resume_state` (a loaded checkpoint) if given; checkpoints to
    run_dir; a NaN/inf or exploding loss ends it as diverged."""
    console = console or Console()
    device = resolve_device(train_cfg.device)
    model.to(device)
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, train_cfg.max_steps)
    clipper = None
    if optim_cfg.update_clip is not None and optim_cfg.name != "adafactor":
        clipper = UpdateClipper(optimizer, optim_cfg.update_clip)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if train_cfg.precision == "bf16" else nullcontext()

    ckpt_path = Path(run_dir) / CHECKPOINT
    result = TrainResult(status="running", step=0)
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])  # moves the state to the parameters' device
        scheduler.load_state_dict(resume_state["scheduler"])
        set_rng_state(resume_state["rng"])
        result = resume_state["result"]
        logger.resume(result.step)
        console.print(f"resumed from {ckpt_path} at step {result.step}")

    layers = [layer for _, layer in moe_layers(model)]

    def set_progress(steps_done: int) -> None:
        # routers with a schedule (StableMoE's stage 2) see how much training is done
        for layer in layers:
            layer.on_train_progress(steps_done / train_cfg.max_steps)

    set_progress(result.step)
    probe = None
    if train_cfg.fluctuation_every > 0 and layers and hasattr(task, "probe_ids"):
        num_tokens = train_cfg.fluctuation_tokens
        labels, names = task.probe_labels(num_tokens) if hasattr(task, "probe_labels") else (None, None)
        probe = RoutingProbe(task.probe_ids(num_tokens), train_cfg.fluctuation_every, run_dir, labels, names)
        probe.resume(result.step)
        if result.step == 0:
            probe.snapshot(model, 0)  # the routing before training

    def checkpoint() -> None:
        save_checkpoint(
            ckpt_path,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "result": result,
            },
        )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"),
        TimeRemainingColumn(),
        console=console,
        disable=not show_progress,
    )
    bar = progress.add_task("train", total=train_cfg.max_steps, completed=result.step, loss="-", tps="-")
    accum = train_cfg.grad_accum
    with progress:
        for step in range(result.step, train_cfg.max_steps):
            t0 = time.perf_counter()
            model.train()
            optimizer.zero_grad(set_to_none=True)
            parts = dict.fromkeys(("loss", "task_loss", "aux_loss", "z_loss", "output_z_loss", "distill_loss"), 0.0)
            for micro in range(accum):
                batch = task.train_batch(step * accum + micro, device)
                with autocast:
                    losses = task.loss(model, batch)
                (losses.total / accum).backward()
                result.tokens += task.tokens(batch)
                distill = losses.distill if losses.distill is not None else losses.task.new_zeros(())
                values = (losses.total, losses.task, losses.aux, losses.z, losses.output_z, distill)
                for key, value in zip(parts, values, strict=True):
                    parts[key] += value.item() / accum
            loss = parts["loss"]
            if not math.isfinite(loss) or loss > train_cfg.divergence_loss:
                result.status, result.diverged_at, result.train_loss = "diverged", step, loss
                result.reason = f"loss {loss} at step {step} (limit {train_cfg.divergence_loss})"
                logger.log({**parts, "diverged": 1}, step + 1)
                console.print(f"[red]diverged[/red]: {result.reason}")
                break
            params = [p for p in model.parameters() if p.grad is not None]
            max_norm = optim_cfg.grad_clip if optim_cfg.grad_clip is not None else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
            if clipper is not None:
                clipper.before_step()
            optimizer.step()
            if clipper is not None:
                clipper.after_step()
            scheduler.step()
            result.train_seconds += time.perf_counter() - t0
            result.step = step + 1
            result.train_loss = loss
            set_progress(result.step)

            done = result.step == train_cfg.max_steps
            if probe is not None and probe.due(result.step, done) and (changed := probe.snapshot(model, result.step)):
                logger.log(changed, result.step)
            if result.step % train_cfg.log_every == 0 or done:
                metrics = {**parts, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0]}
                metrics["tokens_per_s"] = result.tokens_per_s
                metrics.update(moe_metrics(model, "train", "moe"))
                logger.log(metrics, result.step)
                progress.update(bar, loss=f"{loss:.3f}", tps=f"{result.tokens_per_s:,.0f}")
            if result.step % train_cfg.eval_every == 0 or done:
                model.eval()
                with torch.no_grad(), autocast:
                    result.eval = task.evaluate(model, device)
                eval_metrics = {**result.eval, **moe_metrics(model, "eval", "eval_moe")}
                for cf in train_cfg.eval_capacity_factors:
                    with torch.no_grad(), autocast, eval_capacity(model, cf):
                        extra = task.evaluate(model, device)
                    dropped = [v for k, v in moe_metrics(model, "eval", "").items() if k.endswith("/dropped_frac")]
                    extra["dropped_frac"] = sum(dropped) / len(dropped) if dropped else 0.0
                    extra = {f"{k}@cf{cf:g}": v for k, v in extra.items()}
                    result.eval.update(extra)
                    eval_metrics.update(extra)
                for key, value in result.eval.items():
                    if key.startswith("dropped_frac"):
                        continue
                    better = min if "loss" in key or "ppl" in key else max
                    result.best[key] = better(result.best.get(key, value), value)
                logger.log(eval_metrics, result.step)
                summary = "  ".join(f"{k} {v:.4f}" for k, v in result.eval.items())
                progress.console.print(f"step {result.step}: train loss {loss:.4f}  {summary}")
            if result.step % train_cfg.ckpt_every == 0 or done:
                checkpoint()
            progress.update(bar, completed=result.step)
    if result.status == "running":
        result.status = "completed"
    if probe is not None:
        result.fluctuation = probe.finish(train_cfg.max_steps)
    return result


@contextmanager
def eval_capacity(model: nn.Module, capacity_factor: float | None) -> Iterator[None]:
    """Evaluate every MoE layer at another eval capacity factor for the duration of the block."""
    layers = [layer for _, layer in moe_layers(model)]
    saved = [layer.config.eval_capacity_factor for layer in layers]
    for layer in layers:
        layer.config = replace(layer.config, eval_capacity_factor=capacity_factor)
    try:
        yield
    finally:
        for layer, cf in zip(layers, saved, strict=True):
            layer.config = replace(layer.config, eval_capacity_factor=cf)


def rank_seed(seed: int) -> int:
    """The seed of this process: the run's seed offset by its distributed rank (0 on one process)."""
    return seed + int(os.environ.get("RANK", "0"))
