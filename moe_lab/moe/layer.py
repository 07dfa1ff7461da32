"""MoELayer: router + capacity and dropping + dispatch + experts + losses + metrics, a drop-in FFN."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_lab.moe.balanced import balanced_assignment
from moe_lab.moe.config import MoEConfig
from moe_lab.moe.dispatch import BACKENDS
from moe_lab.moe.experts import Experts
from moe_lab.moe.losses import load_balancing_loss, router_z_loss
from moe_lab.moe.metrics import RouterMetrics
from moe_lab.moe.router import (
    Router,
    Routing,
    group_ids,
    hash_table,
    route_assigned,
    route_expert_choice,
    route_token_choice,
)
from moe_lab.moe.stablemoe import DistilledRouter, stablemoe_balance_loss


@dataclass
class MoELosses:
    """One forward's auxiliary losses, unscaled and scaled by their coefficients."""

    aux_loss: torch.Tensor  # the router's balance loss: Switch's, or StableMoE's in its stage 1
    z_loss: torch.Tensor
    aux_loss_scaled: torch.Tensor
    z_loss_scaled: torch.Tensor
    distill_loss: torch.Tensor | None = None  # StableMoE stage 1: the light router's distillation loss
    distill_loss_scaled: torch.Tensor | None = None

    @property
    def total(self) -> torch.Tensor:
        """The term to add to the task loss."""
        total = self.aux_loss_scaled + self.z_loss_scaled
        return total if self.distill_loss_scaled is None else total + self.distill_loss_scaled


class MoELayer(nn.Module):
    """A sparse FFN for inputs [..., d_model]; returns the experts' weighted output (no residual).

    Hash routing and StableMoE's distilled router need the token ids: call `layer(x, token_ids)`.

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
        # hash routing has no learned router; the others score tokens against expert centroids
        self.router = None
        if config.routing != "hash":
            self.router = Router(
                config.d_model,
                config.num_experts,
                dtype=config.router_dtype,
                jitter_eps=config.jitter_eps,
                bias=config.router_bias,
                init_scale=config.router_init_scale,
            )
        self.distilled = None
        if config.routing in ("hash", "stablemoe") and config.vocab_size is None:
            raise ValueError(f"MoEConfig.routing={config.routing!r} needs MoEConfig.vocab_size (the model sets it)")
        if config.routing == "hash":
            self.register_buffer("hash_table_V", hash_table(config.vocab_size, config.num_experts, config.hash_seed))
        if config.routing == "stablemoe":
            self.distilled = DistilledRouter(config.vocab_size, config.num_experts, config.distill_dim)
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
        # off while something else (a routing probe) runs forwards that must not count in the metrics
        self.track_metrics = True

    @property
    def capacity_factor(self) -> float | None:
        """The capacity factor in force: the train one in train mode, the eval one in eval mode."""
        return self.config.train_capacity_factor if self.training else self.config.eval_capacity_factor

    def on_train_progress(self, fraction: float) -> None:
        """Called by the training loop before every step with the fraction of training done.

        StableMoE enters stage 2 (distilled router frozen) once `fraction >= stage1_fraction` (unless that is
        1.0: stage 1 only); it never goes back.
        """
        if self.distilled is None:
            return
        # stage1_fraction 1.0 means stage 1 only: the end of training is not a switch to stage 2
        stage1 = self.config.stage1_fraction
        if not self.distilled.frozen and stage1 < 1.0 and fraction >= stage1:
            self.distilled.freeze()
        if self.distilled.frozen:  # also after loading a stage-2 checkpoint
            self.distilled.requires_grad_(False)

    def route(
        self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, Routing]:
        """Router logits, probabilities (None for hash routing) and the routing of x_TD, without any expert."""
        cfg = self.config
        num_tokens, num_experts = x_TD.shape[0], cfg.num_experts
        if cfg.routing in ("hash", "stablemoe") and token_ids_T is None:
            raise ValueError(f"routing={cfg.routing!r} routes by token id: call the layer as layer(x, token_ids)")
        if cfg.routing == "hash":
            expert_T = self.hash_table_V[token_ids_T.reshape(-1)]
            gate_T = x_TD.new_ones(num_tokens, dtype=torch.float32)
            return None, None, route_assigned(expert_T, gate_T, num_experts, self.capacity_factor, cfg.group_size)
        logits_TE, probs_TE = self.router(x_TD)
        if cfg.routing == "expert_choice":
            routing = route_expert_choice(probs_TE, cfg.top_k, self.capacity_factor, cfg.group_size)
        elif cfg.routing == "token_choice":
            routing = route_token_choice(
                probs_TE,
                cfg.top_k,
                self.capacity_factor,
                cfg.drop_policy,
                cfg.renormalize_gates,
                cfg.group_size,
            )
        else:
            capacity_factor = self.capacity_factor
            if cfg.routing == "base" and self.training:
                # BASE (Lewis et al. 2021, Sec. 2.2): a balanced assignment per group, so nothing overflows
                expert_T = self._balanced_experts(logits_TE)
                capacity_factor = 1.0
            elif cfg.routing == "stablemoe" and self.distilled.frozen:
                expert_T = self.distilled.route(token_ids_T.reshape(-1))  # StableMoE stage 2
            else:  # BASE at inference, StableMoE stage 1 (Eq. 7): greedy argmax of the scores
                expert_T = logits_TE.argmax(dim=-1)
            # both gate the expert by sigmoid of its score, h + sigmoid(s) FFN(h) (BASE Sec. 2; StableMoE Sec. 3.1)
            gate_T = torch.sigmoid(logits_TE.gather(1, expert_T[:, None]).squeeze(1))
            routing = route_assigned(expert_T, gate_T, num_experts, capacity_factor, cfg.group_size)
        return logits_TE, probs_TE, routing

    def _balanced_experts(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """BASE's training assignment: every routing group balanced exactly, total affinity maximal."""
        expert_T = torch.empty(logits_TE.shape[0], dtype=torch.long, device=logits_TE.device)
        start = 0
        for size in group_ids(logits_TE.shape[0], self.config.group_size, logits_TE.device)[1]:
            expert_T[start : start + size] = balanced_assignment(
                logits_TE[start : start + size].detach(), self.config.base_tolerance
            )
            start += size
        return expert_T

    def _losses(
        self,
        logits_TE: torch.Tensor | None,
        probs_TE: torch.Tensor | None,
        routing: Routing,
        keep_S: torch.Tensor,
        token_ids_T: torch.Tensor | None,
    ) -> MoELosses:
        """This forward's balance, z and distillation losses (zero where the routing has none)."""
        cfg = self.config
        zero = keep_S.new_zeros((), dtype=torch.float32)
        aux = z = zero
        distill = None
        if cfg.routing in ("token_choice", "expert_choice"):
            keep = keep_S if cfg.aux_loss_after_capacity else None
            aux = load_balancing_loss(probs_TE, routing, cfg.aux_loss_type, keep)
        if logits_TE is not None:
            z = router_z_loss(logits_TE)
        if self.distilled is not None:
            distill = zero
            if not self.distilled.frozen:  # stage 1: balance the scores, teach the light router
                expert_T = routing.expert_index_TK[:, 0]
                aux = stablemoe_balance_loss(logits_TE, expert_T)
                if self.training:
                    distill = self.distilled.distill_loss(token_ids_T.reshape(-1), expert_T)
        return MoELosses(
            aux,
            z,
            cfg.aux_loss_coef * aux,
            cfg.z_loss_coef * z,
            distill,
            None if distill is None else cfg.distill_loss_coef * distill,
        )

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        if x_TD.shape[0] == 0:
            zero = x.new_zeros((), dtype=torch.float32)
            self.last_losses = MoELosses(zero, zero, zero, zero)
            self.last_keep_TK = self.last_expert_index = None
            return torch.zeros_like(x)
        logits_TE, probs_TE, routing = self.route(x_TD, token_ids)
        y_TD, keep_S = BACKENDS[self.backend](x_TD, routing, self.experts)

        self.last_losses = self._losses(logits_TE, probs_TE, routing, keep_S, token_ids)
        self.last_expert_index = routing.expert_index_TK.detach().view(*x.shape[:-1], -1)
        keep_TK = torch.zeros_like(routing.expert_index_TK, dtype=torch.bool)
        self.last_keep_TK = None
        if self.config.routing != "expert_choice":
            keep_TK[routing.token_S, routing.choice_S] = keep_S
            self.last_keep_TK = keep_TK.view(*x.shape[:-1], -1)
        if self.track_metrics and not (self.training and not torch.is_grad_enabled()):
            losses = self.last_losses
            self._metrics["train" if self.training else "eval"].update(
                logits_TE, probs_TE, routing.expert_S, routing.token_S, keep_S, losses.aux_loss, losses.z_loss,
                losses.distill_loss,
            )  # fmt: skip
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
