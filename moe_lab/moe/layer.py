"""MoELayer: router + capacity and dropping + dispatch + experts + losses + metrics, a drop-in FFN."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_lab.moe.config import MoEConfig
from moe_lab.moe.dispatch import BACKENDS
from moe_lab.moe.experts import Experts
from moe_lab.moe.losses import load_balancing_loss, router_z_loss
from moe_lab.moe.metrics import RouterMetrics
from moe_lab.moe.router import Router, Routing, route_expert_choice, route_token_choice


@dataclass
class MoELosses:
    """One forward's auxiliary losses, unscaled and scaled by their coefficients."""

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    aux_loss_scaled: torch.Tensor
    z_loss_scaled: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        """The term to add to the task loss."""
        return self.aux_loss_scaled + self.z_loss_scaled


class MoELayer(nn.Module):
    """A sparse FFN for inputs [..., d_model]; returns the experts' weighted output (no residual).

    After each forward, `last_losses` holds the auxiliary losses (with gradients) for the training
    loop to add, `last_expert_index` the experts each token chose (token choice; for expert choice the
    top-1 expert by router probability), `last_keep_TK` which of a token's choices were kept (token
    choice only); routing statistics accumulate in `metrics(...)`, separately for train and eval.

    Activation checkpointing: use `use_reentrant=False`. The reentrant variant runs the first forward
    without grad, so `last_losses` would carry no gradient; such no-grad forwards in train mode are
    also left out of the train metrics, which would otherwise count the recomputation twice.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.router = Router(
            config.d_model,
            config.num_experts,
            dtype=config.router_dtype,
            jitter_eps=config.jitter_eps,
            bias=config.router_bias,
            init_scale=config.router_init_scale,
        )
        self.experts = Experts(
            config.num_experts, config.d_model, config.d_ff, config.activation, config.expert_dropout
        )
        self.backend = config.backend
        self._metrics = {
            "train": RouterMetrics(config.num_experts),
            "eval": RouterMetrics(config.num_experts),
        }
        self.last_losses: MoELosses | None = None
        self.last_expert_index: torch.Tensor | None = None
        self.last_keep_TK: torch.Tensor | None = None

    @property
    def capacity_factor(self) -> float | None:
        """The capacity factor in force: the train one in train mode, the eval one in eval mode."""
        return self.config.train_capacity_factor if self.training else self.config.eval_capacity_factor

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Routing]:
        """Router logits, probabilities and the routing of x_TD, without running any expert."""
        cfg = self.config
        logits_TE, probs_TE = self.router(x_TD)
        if cfg.routing == "expert_choice":
            routing = route_expert_choice(probs_TE, cfg.top_k, self.capacity_factor, cfg.group_size)
        else:
            routing = route_token_choice(
                probs_TE,
                cfg.top_k,
                self.capacity_factor,
                cfg.drop_policy,
                cfg.renormalize_gates,
                cfg.group_size,
            )
        return logits_TE, probs_TE, routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        x_TD = x.reshape(-1, x.shape[-1])
        if x_TD.shape[0] == 0:
            zero = x.new_zeros((), dtype=torch.float32)
            self.last_losses = MoELosses(zero, zero, zero, zero)
            self.last_keep_TK = self.last_expert_index = None
            return torch.zeros_like(x)
        logits_TE, probs_TE, routing = self.route(x_TD)
        y_TD, keep_S = BACKENDS[self.backend](x_TD, routing, self.experts)

        aux = load_balancing_loss(probs_TE, routing, cfg.aux_loss_type, keep_S if cfg.aux_loss_after_capacity else None)
        z = router_z_loss(logits_TE)
        self.last_losses = MoELosses(aux, z, cfg.aux_loss_coef * aux, cfg.z_loss_coef * z)
        self.last_expert_index = routing.expert_index_TK.detach().view(*x.shape[:-1], -1)
        self.last_keep_TK = None
        if cfg.routing == "token_choice":
            keep_TK = torch.zeros_like(routing.expert_index_TK, dtype=torch.bool)
            keep_TK[routing.token_S, routing.choice_S] = keep_S
            self.last_keep_TK = keep_TK.view(*x.shape[:-1], -1)
        if not (self.training and not torch.is_grad_enabled()):
            self._metrics["train" if self.training else "eval"].update(
                logits_TE, probs_TE, routing.expert_S, routing.token_S, keep_S, aux, z
            )
        return y_TD.view_as(x)

    def metrics(self, mode: str | None = None, reset: bool = True) -> dict[str, float | list[float]]:
        """Routing statistics averaged since the last reset, for "train", "eval" or the current mode."""
        mode = mode or ("train" if self.training else "eval")
        if mode not in self._metrics:
            raise ValueError(f"mode={mode!r} is not one of {sorted(self._metrics)}")
        values = self._metrics[mode].compute()
        if reset:
            self._metrics[mode].reset()
        return values

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"experts={c.num_experts}, top_k={c.top_k}, routing={c.routing}, backend={self.backend}, "
            f"cf(train/eval)={c.train_capacity_factor}/{c.eval_capacity_factor}, drop={c.drop_policy}"
        )
