"""Optimizers, learning-rate schedules and update clipping."""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_lab.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; leave norms, biases and embeddings alone (nanoGPT's split, by dimensionality)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = name.endswith(("embed.weight", "pos.weight"))
        (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or Adafactor over the model's trainable parameters."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if not hasattr(torch.optim, "Adafactor"):
        raise RuntimeError(f"optim=adafactor needs torch >= 2.5 (this is {torch.__version__}); use optim=adamw")
    # torch's Adafactor clips each update to RMS <= d (Shazeer & Stern 2018, Sec. 6)
    d = cfg.update_clip if cfg.update_clip is not None else 1e9
    return torch.optim.Adafactor(groups, lr=cfg.lr, d=d)


def lr_lambda(cfg: OptimConfig, max_steps: int):
    """Multiplier of the base LR at a step: linear warmup, then cosine, linear, constant or rsqrt decay."""
    warmup = max(cfg.warmup_steps, 0)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "rsqrt":  # T5 / ST-MoE: 1/sqrt(step) after warmup
            return math.sqrt(max(warmup, 1) / max(step + 1, 1))
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        shape = 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """A LambdaLR with `lr_lambda`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, max_steps))


class UpdateClipper:
    """Clip every parameter's update, measured before the learning rate, to RMS <= threshold.

    Adafactor's update clipping (Shazeer & Stern 2018, Sec. 6; ST-MoE Table 4) applies to the unscaled
    update U (the normalised gradient), and the step is lr * U. For AdamW we recover U as the parameter's
    change divided by its group's learning rate and scale the change down when RMS(U) > threshold, so a
    threshold means the same for both optimizers. ST-MoE finds tight clipping (0.1) stabilises training at
    a quality cost.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, threshold: float) -> None:
        self.groups = [(group, [p for p in group["params"] if p.requires_grad]) for group in optimizer.param_groups]
        self.threshold = threshold
        self._before: list[list[torch.Tensor]] = []

    def before_step(self) -> None:
        self._before = [[p.detach().clone() for p in params] for _, params in self.groups]

    @torch.no_grad()
    def after_step(self) -> None:
        for (group, params), olds in zip(self.groups, self._before, strict=True):
            lr = float(group["lr"])
            if lr <= 0:
                continue
            for p, old in zip(params, olds, strict=True):
                change = p - old
                rms_unscaled = change.pow(2).mean().sqrt() / lr
                if rms_unscaled > self.threshold:
                    p.copy_(old + change * (self.threshold / rms_unscaled))
        self._before = []
