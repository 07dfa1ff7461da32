"""MoELayer: router (scores, losses, metrics) + capacity and dropping + dispatch + experts, a drop-in FFN."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_lab.moe.config import ROUTINGS, MoEConfig
from moe_lab.moe.dispatch import BACKENDS, triton_supports
from moe_lab.moe.expert_parallel import ExpertGroup, dispatch_expert_parallel
from moe_lab.moe.experts import Experts, grouped_mm_supports
from moe_lab.moe.metrics import RouterMetrics
from moe_lab.moe.routers import MoELosses
from moe_lab.moe.routing import Routing, keep_slots


class MoELayer(nn.Module):
    """A sparse FFN for inputs [..., d_model]; returns the experts' weighted output (no residual).

    Hash routing and StableMoE's distilled router need the token ids: call `layer(x, token_ids)`.

    After each forward, `last_losses` holds the auxiliary losses (with gradients) for the training
    loop to add, `last_expert_index` the experts each token chose (token choice; for expert choice the
    top-1 expert by router probability), `last_keep_TK` which of a token's choices were kept (token
    choice only); the router's statistics accumulate in `metrics(...)`, separately for train and eval.

    Activation checkpointing: use `use_reentrant=False`. The reentrant variant runs the first forward
    without grad, so `last_losses` would carry no gradient; such no-grad forwards in train mode are
    also left out of the train metrics, which would otherwise count the recomputation twice.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        # the routing strategy: its parameters, its routing, its losses and metrics (moe_lab.moe.routers)
        self.router = ROUTINGS[config.routing].router_class()(config)
        self.experts = Experts(
            config.num_experts, config.d_model, config.d_ff, config.activation, config.expert_dropout
        )
        self.backend = config.backend
        # expert parallelism (moe_lab.moe.expert_parallel.shard_experts): this rank's experts, the others' ranks
        self.expert_group: ExpertGroup | None = None
        self.last_losses: MoELosses | None = None
        self.last_expert_index: torch.Tensor | None = None
        self.last_keep_TK: torch.Tensor | None = None
        # off while something else (a routing probe) runs forwards that must not count in the metrics
        self.track_metrics = True

    @property
    def capacity_factor(self) -> float | None:
        """The capacity factor in force: the train one in train mode, the eval one in eval mode."""
        return self.config.train_capacity_factor if self.training else self.config.eval_capacity_factor

    @property
    def _metrics(self) -> dict[str, RouterMetrics]:
        """The router's running metrics, by mode."""
        return self.router.metrics

    @property
    def distilled(self) -> nn.Module | None:
        """StableMoE's light router (None for the other strategies)."""
        return getattr(self.router, "distilled", None)

    def on_train_progress(self, fraction: float) -> None:
        """Called by the training loop before every step with the fraction of training done (StableMoE's
        router enters stage 2 at its `stage1_fraction` and never goes back)."""
        self.router.on_train_progress(fraction)

    def route(
        self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, Routing]:
        """Router logits, probabilities (None for hash routing) and the routing of x_TD, without any expert."""
        return self.router.route(x_TD, token_ids_T, self.capacity_factor)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints from before the router classes kept the hash table and StableMoE's light router on the
        # layer itself: read them under router.
        for old, new in (("hash_table_V", "router.hash_table_V"), ("distilled.", "router.distilled.")):
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old) :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        if x_TD.shape[0] == 0:
            zero = x.new_zeros((), dtype=torch.float32)
            self.last_losses = MoELosses(zero, zero, zero, zero)
            self.last_keep_TK = self.last_expert_index = None
            return torch.zeros_like(x)
        logits_TE, probs_TE, routing = self.route(x_TD, token_ids)
        kept = keep_slots(routing)  # capacity: which slots are kept (moe_lab.moe.routing)
        if self.expert_group is not None and self.expert_group.size > 1:
            y_TD = dispatch_expert_parallel(x_TD, routing, kept, self.experts, self.expert_group)
        else:
            y_TD = BACKENDS[self.resolve_backend(x_TD)](x_TD, routing, kept, self.experts)

        keep_S = kept.keep_S
        self.last_losses = self.router.losses(logits_TE, probs_TE, routing, keep_S, token_ids)
        self.last_expert_index = routing.expert_index_TK.detach().view(*x.shape[:-1], -1)
        self.last_keep_TK = None
        if self.router.tokens_choose:  # each slot is one of its token's choices (not under expert choice)
            keep_TK = torch.zeros_like(routing.expert_index_TK, dtype=torch.bool)
            keep_TK[routing.token_S, routing.choice_S] = keep_S
            self.last_keep_TK = keep_TK.view(*x.shape[:-1], -1)
        if self.track_metrics and not (self.training and not torch.is_grad_enabled()):
            self.router.observe(logits_TE, probs_TE, routing, keep_S, self.last_losses)
        return y_TD.view_as(x)

    def resolve_backend(self, x_TD: torch.Tensor) -> str:
        """The dispatch backend for this input. `auto`, on CUDA: grouped_mm when torch._grouped_mm takes the
        dtype and widths, else triton when it is installed and takes the dtype (neither reads the host per
        forward); on CPU, and on CUDA when neither fits, sorted (the fastest CPU path)."""
        if self.backend != "auto":
            return self.backend
        if not x_TD.is_cuda:
            return "sorted"
        if grouped_mm_supports(x_TD.dtype, x_TD.shape[-1], self.experts.d_ff) is None:
            return "grouped_mm"
        return "triton" if triton_supports(x_TD) is None else "sorted"

    def metrics(self, mode: str | None = None, reset: bool = True) -> dict[str, float | list[float]]:
        """Routing statistics averaged since the last reset, for "train", "eval" or the current mode."""
        mode = mode or ("train" if self.training else "eval")
        if mode not in self._metrics:
            raise ValueError(f"mode={mode!r} is not one of {sorted(self._metrics)}")
        values = self._metrics[mode].compute()
        if reset:
            self._metrics[mode].reset()
        return values

    def metrics_state(self) -> dict[str, dict[str, Any]]:
        """The train and eval metrics accumulated since their last read, for a checkpoint."""
        return {mode: metrics.state_dict() for mode, metrics in self._metrics.items()}

    def load_metrics_state(self, state: dict[str, dict[str, Any]]) -> None:
        """Continue the metrics from `metrics_state()`."""
        for mode, values in state.items():
            self._metrics[mode].load_state_dict(values)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"experts={c.num_experts}, top_k={c.top_k}, routing={c.routing}, backend={self.backend}, "
            f"cf(train/eval)={c.train_capacity_factor}/{c.eval_capacity_factor}, drop={c.drop_policy}"
        )
