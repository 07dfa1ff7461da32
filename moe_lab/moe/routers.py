"""The routers: one base class, one subclass per routing strategy (the layout of OLMo-core's router module).

A router scores the tokens of one forward, turns them into a `Routing` with one of the claim-order rules of
moe_lab.moe.routing (which also says what capacity keeps), names its auxiliary losses, counts its metrics, and may
act after every optimizer step (`post_step`, called by the training loop with the step's expert loads).
`MoEConfig.routing` selects a class through its `RouterSpec` (moe_lab.moe.config: the one list of routers and
what each asks of the other fields, torch-free), so a new router is one class here or anywhere, one
`register_router(RouterSpec(...))` and a `conf/moe/NAME.yaml` to train it by name. `MoELayer` holds one as
`layer.router` and never branches on its name.

The learned routers keep their scorer's weights under the checkpoint key `router.weight`; hash routing's table
and StableMoE's light router live under `router.` too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moe_lab.moe.balanced import balanced_assignment
from moe_lab.moe.config import ROUTINGS, MoEConfig
from moe_lab.moe.losses import load_balancing_loss, router_z_loss
from moe_lab.moe.metrics import RouterMetrics
from moe_lab.moe.routing import Routing, count, group_ids, route_assigned, route_expert_choice, route_token_choice
from moe_lab.moe.stablemoe import DistilledRouter, stablemoe_balance_loss

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


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


class Router(nn.Module):
    """What every router does; a subclass routes (`route`) and may add losses, a schedule and a post-step update."""

    tokens_choose: ClassVar[bool] = True  # each slot is one of its token's choices, so its kept choices are defined

    def __init__(self, config: MoEConfig) -> None:
        if ROUTINGS[config.routing].by_token_id and config.vocab_size is None:
            raise ValueError(f"MoEConfig.routing={config.routing!r} needs MoEConfig.vocab_size (the model sets it)")
        super().__init__()
        self.config = config
        # statistics accumulated since they were last read, train and eval apart (moe_lab.moe.metrics)
        self.metrics = {"train": RouterMetrics(config.num_experts), "eval": RouterMetrics(config.num_experts)}
        self._loads_E: torch.Tensor | None = None  # slots per expert since the last post_step, if it wants them

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
        """This forward's auxiliary losses: none unless the router adds them."""
        zero = _zero(keep_S)
        return MoELosses.scaled(self.config, zero, zero)

    def on_train_progress(self, fraction: float) -> None:
        """Called before every training step with the fraction of training done."""

    def post_step(self, loads_E: torch.Tensor) -> None:
        """Called by the training loop after every optimizer step with the slots the step's training forwards sent
        to each expert before capacity ([E] long, summed over micro-batches and data-parallel ranks)."""

    @property
    def wants_loads(self) -> bool:
        """Whether this router does something with the loads: counting them costs a collective per step."""
        return type(self).post_step is not Router.post_step

    def observe(
        self,
        logits_TE: torch.Tensor | None,
        probs_TE: torch.Tensor | None,
        routing: Routing,
        keep_S: torch.Tensor,
        losses: MoELosses,
    ) -> None:
        """Count one forward in the metrics of its mode and, in training, in the loads the next post_step gets."""
        self.metrics["train" if self.training else "eval"].update(
            logits_TE, probs_TE, routing.expert_S, routing.token_S, keep_S, losses.aux_loss, losses.z_loss,
            losses.distill_loss,
        )  # fmt: skip
        if self.training and self.wants_loads:
            loads_E = count(routing.expert_S, routing.num_experts)
            self._loads_E = loads_E if self._loads_E is None else self._loads_E + loads_E

    def take_loads(self) -> torch.Tensor:
        """The loads counted since the last call ([E] long; zeros if none), and start counting afresh."""
        loads_E, self._loads_E = self._loads_E, None
        return torch.zeros(self.config.num_experts, dtype=torch.long) if loads_E is None else loads_E


class LearnedRouter(Router):
    """A router with a learned linear scorer, logits and softmax probabilities computed in its own dtype; its
    z-loss is ST-MoE's on the scorer's logits."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.compute_dtype = _DTYPES[config.router_dtype]
        self.jitter_eps = config.jitter_eps
        self.init_scale = config.router_init_scale
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.d_model))
        self.bias = nn.Parameter(torch.zeros(config.num_experts)) if config.router_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Switch Transformer init: truncated normal with std sqrt(scale / fan_in)."""
        std = math.sqrt(self.init_scale / self.weight.shape[1])
        nn.init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits_TE, probs_TE), both float32 tensors holding values computed in the router dtype."""
        dt = self.compute_dtype
        # autocast would silently run the matmul in its own dtype: the router's precision is ours to set
        with torch.autocast(x_TD.device.type, enabled=False):
            if self.training and self.jitter_eps > 0:
                # drawn in float32: in bfloat16, U(1 - 1e-2, 1 + 1e-2) has only four values, none above 1
                x_TD = x_TD.float()
                x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            bias = None if self.bias is None else self.bias.to(dt)
            logits_TE = F.linear(x_TD.to(dt), self.weight.to(dt), bias)
            probs_TE = torch.softmax(logits_TE, dim=-1)
        return logits_TE.float(), probs_TE.float()

    def losses(self, logits_TE, probs_TE, routing, keep_S, token_ids_T):
        """This forward's losses: the z-loss alone unless the strategy adds a balance term."""
        return MoELosses.scaled(self.config, _zero(keep_S), router_z_loss(logits_TE))


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


def hash_table(vocab_size: int, num_experts: int, seed: int) -> torch.Tensor:
    """Roller et al.'s (2021) "random hash": a fixed expert for every token id, drawn once from `seed`.

    Drawn on the CPU from its own generator, so every run, process and device gets the same table.
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(num_experts, (vocab_size,), generator=gen)


class HashRouter(Router):
    """Hash layers (Roller et al. 2021): a fixed seeded hash of the token id picks the expert, gate 1; nothing
    is learned, so there is no balance or z-loss."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
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
