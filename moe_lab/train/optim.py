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
    """Clip every parameter's update to RMS <= threshold (Adafactor's update clipping, for any optimizer).

    Used for AdamW; Adafactor does it itself through `d`. ST-MoE Table 4 finds tight clipping (0.1)
    stabilises training at a large quality cost.
    """

    def __init__(self, params: list[nn.Parameter], threshold: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.threshold = threshold
        self._before: list[torch.Tensor] = []

    def before_step(self) -> None:
        self._before = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def after_step(self) -> None:
        for p, old in zip(self.params, self._before, strict=True):
            update = p - old
            rms = update.pow(2).mean().sqrt()
            if rms > self.threshold:
                p.copy_(old + update * (self.threshold / rms))
        self._before = []
