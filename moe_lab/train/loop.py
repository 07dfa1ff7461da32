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

import pandas as pd
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from moe_lab.config import OptimConfig, TrainConfig
from moe_lab.io import atomic_write
from moe_lab.models.transformer import ModelLosses, moe_layers
from moe_lab.moe.expert_parallel import ExpertGroup
from moe_lab.parallel import gather, mean_over_ranks, shard, sum_over_ranks, world
from moe_lab.paths import CHECKPOINT, records_path
from moe_lab.track import RunLogger
from moe_lab.train.checkpoint import rng_state, save_checkpoint, set_rng_state, weights_fingerprint
from moe_lab.train.expert_state import ExpertSharding, check_expert_parallel
from moe_lab.train.fluctuation import RoutingProbe
from moe_lab.train.optim import UpdateClipper, build_optimizer, build_scheduler


@dataclass
class Evaluation:
    """One evaluation of a task: its metrics, and per-example records by name (one row per validation example,
    sequence or query), which the report pairs across runs example by example."""

    metrics: dict[str, float]
    records: dict[str, pd.DataFrame] = field(default_factory=dict)


class Task(Protocol):
    """What the loop trains on: deterministic batches by index, a loss, an evaluation."""

    def train_batch(self, index: int, device: torch.device) -> dict[str, torch.Tensor]: ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ModelLosses: ...

    def tokens(self, batch: dict[str, torch.Tensor]) -> int | torch.Tensor:
        """The batch's tokens: an int, or a 0-d tensor on the device where counting them would read it."""
        ...

    def evaluate(self, model: nn.Module, device: torch.device) -> Evaluation: ...


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
    weights: str | None = None  # weights_fingerprint of the model the last checkpoint holds

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


LOSS_PARTS = ("loss", "task_loss", "aux_loss", "z_loss", "output_z_loss", "distill_loss")


class TaskLoss(nn.Module):
    """A task's training loss as a module's forward, so that DistributedDataParallel runs it and synchronises
    its backward (the models' losses are methods, not forward)."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelLosses:
        return self.task.loss(self.model, batch)


class Trainer:
    """The training loop's parts, each readable alone: `step` (one optimizer step over its micro-batches),
    `evaluate` (the task's evaluation, at each extra eval capacity factor too), `checkpoint`; `run` strings
    them together with logging and the progress bar."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train_cfg: TrainConfig,
        optim_cfg: OptimConfig,
        run_dir: Path,
        logger: RunLogger,
        resume_state: dict[str, Any] | None = None,
        console: Console | None = None,
        expert_parallel: int = 1,
    ) -> None:
        self.console = console or Console()
        self.model, self.task, self.cfg, self.optim_cfg, self.logger = model, task, train_cfg, optim_cfg, logger
        self.device = resolve_device(train_cfg.device)
        self.world = world()
        model.to(self.device)
        if resume_state is not None:  # full-layout weights, before any sharding
            model.load_state_dict(resume_state["model"])
        self.experts = self._shard_experts(expert_parallel)
        self.optimizer = build_optimizer(model, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, train_cfg.max_steps)
        self.clipper = None
        if optim_cfg.update_clip is not None and optim_cfg.name != "adafactor":
            self.clipper = UpdateClipper(self.optimizer, optim_cfg.update_clip)
        bf16 = train_cfg.precision == "bf16"
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        self.run_dir = Path(run_dir)
        self.ckpt_path = self.run_dir / CHECKPOINT
        self.result = TrainResult(status="running", step=0)
        if resume_state is not None:
            optimizer_state = resume_state["optimizer"]
            if self.experts is not None:
                optimizer_state = self.experts.local_optimizer_state(optimizer_state, self.optimizer)
            self.optimizer.load_state_dict(optimizer_state)  # moves the state to the parameters' device
            self.scheduler.load_state_dict(resume_state["scheduler"])
            by_rank = resume_state.get("rng_by_rank") or [resume_state["rng"]]
            set_rng_state(by_rank[self.world.rank] if len(by_rank) == self.world.size else resume_state["rng"])
            self.result = resume_state["result"]
            logger.resume(self.result.step)
            self.console.print(f"resumed from {self.ckpt_path} at step {self.result.step}")
        self.layers = [layer for _, layer in moe_layers(model)]
        # the layers whose router acts on each step's expert loads (Router.post_step)
        self.load_layers = [layer for layer in self.layers if layer.router.wants_loads]
        if resume_state is not None:
            self._restore_router_metrics(resume_state.get("router_metrics_by_rank"))
        self.set_progress(self.result.step)
        self.ddp = None
        if self.world.size > 1:  # built after the resume: it broadcasts rank 0's parameters to every rank
            from torch.nn.parallel import DistributedDataParallel

            wrapped = TaskLoss(model, task)
            if self.experts is not None:  # each rank's experts are its own (moe_lab.train.expert_state)
                ignored = [f"model.{name}" for name in self.experts.num_experts]
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapped, ignored)
            ids = [self.device.index or 0] if self.device.type == "cuda" else None
            # experts that no token of a rank's slice reaches get no gradient there
            self.ddp = DistributedDataParallel(wrapped, device_ids=ids, find_unused_parameters=True)
        # rank 0 probes the routing and writes the snapshots; under expert parallelism a forward is a
        # collective, so every rank probes and rank 0 alone writes
        self.probe = None
        probing = train_cfg.fluctuation_every > 0 and self.layers and hasattr(task, "probe_ids")
        if probing and (self.world.main or self.experts is not None):
            num_tokens = train_cfg.fluctuation_tokens
            labels, names = task.probe_labels(num_tokens) if hasattr(task, "probe_labels") else (None, None)
            self.probe = RoutingProbe(
                task.probe_ids(num_tokens), train_cfg.fluctuation_every, run_dir, labels, names, write=self.world.main
            )  # fmt: skip
            self.probe.resume(self.result.step)
            if self.result.step == 0:
                self.probe.snapshot(model, 0)  # the routing before training

    def _shard_experts(self, expert_parallel: int) -> ExpertSharding | None:
        """parallel.expert=P: keep this rank's experts (None when every rank holds them all)."""
        if expert_parallel == 1:
            return None
        check_expert_parallel(expert_parallel, self.world.size, self.optim_cfg)
        # a process group of its own: DDP's gradient all-reduces, issued while backward runs, would otherwise
        # queue on the default group between the exchanges' backward all-to-alls, in an order that may differ
        # between ranks (a deadlock on gloo)
        ranks = list(range(self.world.size))
        group = ExpertGroup(self.world.rank, self.world.size, dist.new_group(ranks))
        sharding = ExpertSharding(self.model, group)
        sharding.shard()
        return sharding

    def _restore_router_metrics(self, by_rank: list[list[dict]] | None) -> None:
        """Continue each MoE layer's running averages from the checkpoint, so the first row logged after a resume
        is the uninterrupted run's. Each rank averaged its own tokens: under another number of ranks (or from a
        checkpoint without them) the layers start afresh, and that row averages only the steps after the resume."""
        if by_rank is None or len(by_rank) != self.world.size:
            return
        for layer, state in zip(self.layers, by_rank[self.world.rank], strict=True):
            layer.load_metrics_state(state)

    def set_progress(self, steps_done: int) -> None:
        """Routers with a schedule (StableMoE's stage 2) see how much training is done."""
        for layer in self.layers:
            layer.on_train_progress(steps_done / self.cfg.max_steps)

    def post_step(self) -> None:
        """After an optimizer step: hand each router that wants them the expert loads of the step's training forwards,
        summed over the ranks in one collective, so that every rank's router makes the same update."""
        if not self.load_layers:
            return
        loads_LE = torch.stack([layer.router.take_loads().to(self.device) for layer in self.load_layers])
        loads_LE = sum_over_ranks(loads_LE, self.world)
        for layer, loads_E in zip(self.load_layers, loads_LE, strict=True):
            layer.router.post_step(loads_E)

    def step(self, step: int) -> tuple[dict[str, float], float | None]:
        """Optimizer step `step` over its micro-batches: the losses (averaged over them) and the gradient norm,
        or None for it when the loss diverged (nothing is updated then)."""
        model, accum = self.model, self.cfg.grad_accum
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        summed = None  # the loss parts summed over micro-batches, on the device
        tokens: int | torch.Tensor = 0  # a device tensor for tasks that count on the device (fine-tuning's mask)
        for micro in range(accum):
            batch = shard(self.task.train_batch(step * accum + micro, self.device), self.world)
            # under DDP the gradients are averaged over ranks once, after the last micro-batch
            last = self.ddp is None or micro == accum - 1
            with nullcontext() if last else self.ddp.no_sync():
                with self.autocast:
                    losses = self.ddp(batch) if self.ddp is not None else self.task.loss(model, batch)
                (losses.total / accum).backward()
            tokens = tokens + self.task.tokens(batch)
            distill = losses.distill if losses.distill is not None else losses.task.new_zeros(())
            values = (losses.total, losses.task, losses.aux, losses.z, losses.output_z, distill)
            values = torch.stack([v.detach().to(torch.float64) for v in values])
            summed = values if summed is None else summed + values
        # one read per step (a host sync on CUDA, where reading each part of each micro-batch was six): the
        # divergence verdict below must come before the update
        read = summed / accum
        if isinstance(tokens, torch.Tensor):  # read with the losses, not once per micro-batch
            read = torch.cat([read, tokens.to(torch.float64).view(1)])
        values = read.tolist()
        if isinstance(tokens, torch.Tensor):
            tokens = round(values.pop())
        parts = dict(zip(LOSS_PARTS, values, strict=True))
        if self.world.size > 1:  # the global batch's losses and tokens: every rank then judges divergence alike
            reduced = mean_over_ranks({**parts, "tokens": tokens}, self.world)
            tokens = round(reduced.pop("tokens") * self.world.size)
            parts = {k: reduced[k] for k in LOSS_PARTS}
        self.result.tokens += tokens
        loss = parts["loss"]
        if not math.isfinite(loss) or loss > self.cfg.divergence_loss:
            for layer in self.load_layers:  # no update: its loads call for none either
                layer.router.take_loads()
            return parts, None
        if self.experts is not None:
            self.experts.scale_expert_grads()
        params = [p for p in model.parameters() if p.grad is not None]
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip is not None else float("inf")
        if self.experts is not None:
            grad_norm = self.experts.clip_grad_norm(params, max_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        if self.clipper is not None:
            self.clipper.before_step()
        self.optimizer.step()
        if self.clipper is not None:
            self.clipper.after_step()
        self.scheduler.step()
        self.post_step()
        return parts, grad_norm

    def evaluate(self) -> dict[str, float]:
        """The task's evaluation with the MoE layers' eval metrics, and again at each extra eval capacity factor;
        updates the result's latest and best values and writes each evaluation's per-example records."""
        model, task, device, autocast = self.model, self.task, self.device, self.autocast
        model.eval()
        with torch.no_grad(), autocast:
            found = task.evaluate(model, device)
        self.result.eval = dict(found.metrics)
        self._write_records(found.records, None)
        eval_metrics = {**self.result.eval, **moe_metrics(model, "eval", "eval_moe")}
        for cf in self.cfg.eval_capacity_factors:
            with torch.no_grad(), autocast, eval_capacity(model, cf):
                found = task.evaluate(model, device)
            self._write_records(found.records, cf)
            dropped = [v for k, v in moe_metrics(model, "eval", "").items() if k.endswith("/dropped_frac")]
            extra = {**found.metrics, "dropped_frac": sum(dropped) / len(dropped) if dropped else 0.0}
            extra = {f"{k}@cf{cf:g}": v for k, v in extra.items()}
            self.result.eval.update(extra)
            eval_metrics.update(extra)
        for key, value in self.result.eval.items():
            if key.startswith("dropped_frac"):
                continue
            better = min if "loss" in key or "ppl" in key else max
            self.result.best[key] = better(self.result.best.get(key, value), value)
        return eval_metrics

    def _write_records(self, records: dict[str, pd.DataFrame], capacity_factor: float | None) -> None:
        """eval/<name>-step<N>[-cf<X>].csv.gz for each record table, written atomically by rank 0 (every rank
        evaluates the whole validation set); a resumed run that evaluates a step again rewrites them."""
        if not self.world.main:
            return
        for name, frame in records.items():
            path = records_path(self.run_dir, name, self.result.step, capacity_factor)
            with atomic_write(path, suffix=".csv.gz") as tmp:
                # mtime 0: the same records give the same bytes
                frame.to_csv(tmp, index=False, compression={"method": "gzip", "mtime": 0})

    def checkpoint(self) -> None:
        """Everything a resume needs, written atomically by rank 0 (with every rank's RNG state and MoE metrics
        since the last logged step), in the one-process layout (every expert), so that any number of ranks may
        resume it."""
        by_rank = gather(rng_state(), self.world)
        # what each rank's MoE layers have averaged since the last logged step (moe_lab.moe.metrics)
        metrics_by_rank = gather([layer.metrics_state() for layer in self.layers], self.world)
        if self.experts is not None:  # the full layout, whatever the number of ranks (expert_state)
            model_state = self.experts.full_model_state()
            optimizer_state = self.experts.full_optimizer_state(self.optimizer)
        elif self.world.main:
            model_state, optimizer_state = self.model.state_dict(), self.optimizer.state_dict()
        if not self.world.main:
            return
        self.result.weights = weights_fingerprint(model_state)
        save_checkpoint(
            self.ckpt_path,
            {
                "model": model_state,
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(),
                "rng": by_rank[0],
                "rng_by_rank": by_rank,
                "router_metrics_by_rank": metrics_by_rank,
                "result": self.result,
            },
        )

    def run(self, show_progress: bool = True) -> TrainResult:
        """Train to max_steps (or divergence), logging, evaluating and checkpointing as the config says."""
        cfg, result, logger = self.cfg, self.result, self.logger
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not show_progress,
        )
        bar = progress.add_task("train", total=cfg.max_steps, completed=result.step, loss="-", tps="-")
        with progress:
            for step in range(result.step, cfg.max_steps):
                t0 = time.perf_counter()
                parts, grad_norm = self.step(step)
                loss = parts["loss"]
                if grad_norm is None:
                    result.status, result.diverged_at, result.train_loss = "diverged", step, loss
                    result.reason = f"loss {loss} at step {step} (limit {cfg.divergence_loss})"
                    logger.log({**parts, "diverged": 1}, step + 1)
                    self.console.print(f"[red]diverged[/red]: {result.reason}")
                    break
                result.train_seconds += time.perf_counter() - t0
                result.step = step + 1
                result.train_loss = loss
                self.set_progress(result.step)

                done = result.step == cfg.max_steps
                probe = self.probe
                if (
                    probe is not None
                    and probe.due(result.step, done)
                    and (changed := probe.snapshot(self.model, result.step))
                ):
                    logger.log(changed, result.step)
                if result.step % cfg.log_every == 0 or done:
                    metrics = {**parts, "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0]}
                    metrics["tokens_per_s"] = result.tokens_per_s
                    metrics.update(mean_over_ranks(moe_metrics(self.model, "train", "moe"), self.world))
                    logger.log(metrics, result.step)
                    progress.update(bar, loss=f"{loss:.3f}", tps=f"{result.tokens_per_s:,.0f}")
                if result.step % cfg.eval_every == 0 or done:
                    eval_metrics = self.evaluate()
                    logger.log(eval_metrics, result.step)
                    summary = "  ".join(f"{k} {v:.4f}" for k, v in result.eval.items())
                    progress.console.print(f"step {result.step}: train loss {loss:.4f}  {summary}")
                if result.step % cfg.ckpt_every == 0 or done:
                    self.checkpoint()
                progress.update(bar, completed=result.step)
        if result.status == "running":
            result.status = "completed"
        if self.probe is not None:
            result.fluctuation = self.probe.finish(cfg.max_steps)
        return result


def train(*args: Any, show_progress: bool = True, **kwargs: Any) -> TrainResult:
    """Train a model on a task (the arguments are `Trainer`'s), continuing from `resume_state` (a loaded
    checkpoint) if given; checkpoints to run_dir; a NaN/inf or exploding loss ends it as diverged."""
    return Trainer(*args, **kwargs).run(show_progress)


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
