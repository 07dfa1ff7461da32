"""One small router class per routing strategy: each owns its parameters, its routing and its losses.

A strategy turns the tokens of one forward into a `Routing` (slots in claim order; capacity and dropping are
the dispatch backends' shared logic) and names its auxiliary losses. `MoELayer` holds one as `layer.router`
and never branches on the strategy's name, so a new router is one class here and one entry in `ROUTERS`
(the pattern of OLMo-core's and torchtitan's router modules).

The learned routers subclass `Router` (the linear scorer), so their weights keep the checkpoint key
`router.weight`; hash routing's table and StableMoE's light router live under `router.` too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_lab.moe.balanced import balanced_assignment
from moe_lab.moe.config import MoEConfig
from moe_lab.moe.losses import load_balancing_loss, router_z_loss
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

    @classmethod
    def scaled(
        cls, config: MoEConfig, aux: torch.Tensor, z: torch.Tensor, distill: torch.Tensor | None = None
    ) -> MoELosses:
        """The losses with the config's coefficients applied."""
        distill_scaled = None if distill is None else config.distill_loss_coef * distill
        return cls(aux, z, config.aux_loss_coef * aux, config.z_loss_coef * z, distill, distill_scaled)


def _zero(like: torch.Tensor) -> torch.Tensor:
    return like.new_zeros((), dtype=torch.float32)


class LearnedRouter(Router):
    """A router with a learned linear scorer; its z-loss is ST-MoE's on the scorer's logits."""

    tokens_choose = True  # each slot is one of its token's choices, so a token's kept choices are defined

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(
            config.d_model,
            config.num_experts,
            dtype=config.router_dtype,
            jitter_eps=config.jitter_eps,
            bias=config.router_bias,
            init_scale=config.router_init_scale,
        )
        self.config = config

    def route(
        self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None, capacity_factor: float | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, Routing]:
        """Router logits, probabilities (None without a learned scorer) and the routing of x_TD."""
        raise NotImplementedError

    def losses(
        self,
        logits_TE: torch.Tensor | None,
        probs_TE: torch.Tensor | None,
        routing: Routing,
        keep_S: torch.Tensor,
        token_ids_T: torch.Tensor | None,
    ) -> MoELosses:
        """This forward's losses: the z-loss alone unless the strategy adds a balance term."""
        return MoELosses.scaled(self.config, _zero(keep_S), router_z_loss(logits_TE))

    def on_train_progress(self, fraction: float) -> None:
        """Called before every training step with the fraction of training done."""


class TokenChoiceRouter(LearnedRouter):
    """Each token takes its top-k experts (k=1 Switch, k=2 GShard/ST-MoE), balanced by the Switch aux loss."""

    def route(self, x_TD, token_ids_T, capacity_factor):
        cfg = self.config
        logits_TE, probs_TE = self(x_TD)
        routing = route_token_choice(
            probs_TE,
            cfg.top_k,
            capacity_factor,
            cfg.drop_policy,
            cfg.renormalize_gates,
            cfg.group_size,
            cfg.capacity_convention,
        )
        return logits_TE, probs_TE, routing

    def losses(self, logits_TE, probs_TE, routing, keep_S, token_ids_T):
        cfg = self.config
        keep = keep_S if cfg.aux_loss_after_capacity else None
        aux = load_balancing_loss(probs_TE, routing, cfg.aux_loss_type, keep)
        return MoELosses.scaled(cfg, aux, router_z_loss(logits_TE))


class ExpertChoiceRouter(LearnedRouter):
    """Each expert takes its top-C tokens (Zhou et al. 2022). Balanced by construction: no aux loss, as in
    flaxformer (the Switch loss would be the constant cf * k here), only the z-loss."""

    tokens_choose = False  # experts pick tokens: a slot is no choice of its token

    def route(self, x_TD, token_ids_T, capacity_factor):
        cfg = self.config
        logits_TE, probs_TE = self(x_TD)
        routing = route_expert_choice(probs_TE, cfg.top_k, capacity_factor, cfg.group_size, cfg.capacity_convention)
        return logits_TE, probs_TE, routing


def _sigmoid_gated(
    cfg: MoEConfig, logits_TE: torch.Tensor, expert_T: torch.Tensor, capacity_factor: float | None
) -> Routing:
    """Top-1 routing to expert_T gated by sigmoid of its score, h + sigmoid(s) FFN(h) (BASE Sec. 2; StableMoE
    Sec. 3.1)."""
    gate_T = torch.sigmoid(logits_TE.gather(1, expert_T[:, None]).squeeze(1))
    return route_assigned(expert_T, gate_T, cfg.num_experts, capacity_factor, cfg.group_size, cfg.capacity_convention)


class BaseRouter(LearnedRouter):
    """BASE layers (Lewis et al. 2021): a balanced assignment of every group in training, greedy at inference."""

    def route(self, x_TD, token_ids_T, capacity_factor):
        logits_TE, probs_TE = self(x_TD)
        if self.training:
            # Sec. 2.2: the assignment is balanced per group, so nothing overflows at capacity factor 1
            expert_T = self._balanced_experts(logits_TE)
            capacity_factor = 1.0
        else:
            expert_T = logits_TE.argmax(dim=-1)
        return logits_TE, probs_TE, _sigmoid_gated(self.config, logits_TE, expert_T, capacity_factor)

    def _balanced_experts(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """Every routing group balanced exactly, total affinity maximal."""
        expert_T = torch.empty(logits_TE.shape[0], dtype=torch.long, device=logits_TE.device)
        start = 0
        for size in group_ids(logits_TE.shape[0], self.config.group_size, logits_TE.device)[1]:
            expert_T[start : start + size] = balanced_assignment(
                logits_TE[start : start + size].detach(), self.config.base_tolerance
            )
            start += size
        return expert_T


class StableMoERouter(LearnedRouter):
    """StableMoE (Dai et al. 2022): stage 1 routes greedily by the learned scores (Eq. 7) and distils the
    assignment into a light router of token ids; stage 2 freezes that router and routes by it alone.

    Evaluation in stage 1 routes by the light router when `stage1_eval_router` is "distilled" (the fork's
    behaviour), else by the learned scores."""

    def __init__(self, config: MoEConfig) -> None:
        if config.vocab_size is None:
            raise ValueError("MoEConfig.routing='stablemoe' needs MoEConfig.vocab_size (the model sets it)")
        super().__init__(config)
        self.distilled = DistilledRouter(config.vocab_size, config.num_experts, config.distill_dim)

    def _routes_by_distilled(self) -> bool:
        if self.distilled.frozen:
            return True
        return not self.training and self.config.stage1_eval_router == "distilled"

    def route(self, x_TD, token_ids_T, capacity_factor):
        if token_ids_T is None:
            raise ValueError("routing='stablemoe' routes by token id: call the layer as layer(x, token_ids)")
        logits_TE, probs_TE = self(x_TD)
        if self._routes_by_distilled():
            expert_T = self.distilled.route(token_ids_T.reshape(-1))
        else:
            expert_T = logits_TE.argmax(dim=-1)
        return logits_TE, probs_TE, _sigmoid_gated(self.config, logits_TE, expert_T, capacity_factor)

    def losses(self, logits_TE, probs_TE, routing, keep_S, token_ids_T):
        aux = _zero(keep_S)
        distill = _zero(keep_S)
        if not self.distilled.frozen:  # stage 1: balance the scores, teach the light router
            expert_T = routing.expert_index_TK[:, 0]
            aux = stablemoe_balance_loss(logits_TE, expert_T)
            if self.training:  # training in stage 1 routes by the learned scores: the light router learns them
                distill = self.distilled.distill_loss(token_ids_T.reshape(-1), expert_T)
        return MoELosses.scaled(self.config, aux, router_z_loss(logits_TE), distill)

    def on_train_progress(self, fraction: float) -> None:
        """Stage 2 starts once `fraction >= stage1_fraction` (unless that is 1.0: stage 1 only), for good."""
        stage1 = self.config.stage1_fraction
        if not self.distilled.frozen and stage1 < 1.0 and fraction >= stage1:
            self.distilled.freeze()
        if self.distilled.frozen:  # also after loading a stage-2 checkpoint
            self.distilled.requires_grad_(False)


class HashRouter(nn.Module):
    """Hash layers (Roller et al. 2021): a fixed seeded hash of the token id picks the expert, gate 1; nothing
    is learned, so there is no balance or z-loss."""

    tokens_choose = True

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("MoEConfig.routing='hash' needs MoEConfig.vocab_size (the model sets it)")
        self.config = config
        self.register_buffer("hash_table_V", hash_table(config.vocab_size, config.num_experts, config.hash_seed))

    def route(self, x_TD, token_ids_T, capacity_factor):
        if token_ids_T is None:
            raise ValueError("routing='hash' routes by token id: call the layer as layer(x, token_ids)")
        cfg = self.config
        expert_T = self.hash_table_V[token_ids_T.reshape(-1)]
        gate_T = x_TD.new_ones(x_TD.shape[0], dtype=torch.float32)
        routing = route_assigned(
            expert_T, gate_T, cfg.num_experts, capacity_factor, cfg.group_size, cfg.capacity_convention
        )
        return None, None, routing

    def losses(self, logits_TE, probs_TE, routing, keep_S, token_ids_T):
        zero = _zero(keep_S)
        return MoELosses.scaled(self.config, zero, zero)

    def on_train_progress(self, fraction: float) -> None:
        """Hash routing has no stages."""


ROUTERS: dict[str, type[nn.Module]] = {
    "token_choice": TokenChoiceRouter,
    "expert_choice": ExpertChoiceRouter,
    "hash": HashRouter,
    "base": BaseRouter,
    "stablemoe": StableMoERouter,
}
