"""Routing metrics each MoE layer accumulates itself; training code only reads and resets them."""

from __future__ import annotations

from typing import Any

import torch

from moe_lab.moe.routing import count


class RouterMetrics:
    """Running sums over forwards, kept as tensors on the layer's device so no step syncs the host."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.num_forwards = 0
        self.num_tokens = 0
        self._sums: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict[str, Any]:
        """What has accumulated since the last reset, on the CPU: a checkpoint keeps it, so that the averages a
        resumed run logs are those of the uninterrupted run."""
        sums = {k: v.detach().cpu().clone() for k, v in self._sums.items()}
        return {"num_forwards": self.num_forwards, "num_tokens": self.num_tokens, "sums": sums}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s sums (they follow the layer to its device at the next forward)."""
        self.num_forwards, self.num_tokens = state["num_forwards"], state["num_tokens"]
        self._sums = {k: v.clone() for k, v in state["sums"].items()}

    def _add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach()
        old = self._sums.get(name)
        # .to() follows the layer if it moved device since the last forward
        self._sums[name] = value.clone() if old is None else old.to(value.device) + value

    def _max(self, name: str, value: torch.Tensor) -> None:
        value = value.detach()
        old = self._sums.get(name)
        self._sums[name] = value.clone() if old is None else torch.maximum(old.to(value.device), value)

    @torch.compiler.disable
    @torch.no_grad()
    def update(
        self,
        logits_TE: torch.Tensor | None,
        probs_TE: torch.Tensor | None,
        expert_S: torch.Tensor,
        token_S: torch.Tensor,
        keep_S: torch.Tensor,
        aux_loss: torch.Tensor,
        z_loss: torch.Tensor,
        distill_loss: torch.Tensor | None = None,
    ) -> None:
        """Add one forward's routing statistics; logits and probs are None for routers without scores (hash)."""
        # without scores the routing is top-1 (hash): one slot per token
        num_tokens = token_S.numel() if probs_TE is None else probs_TE.shape[0]
        self.num_forwards += 1
        self.num_tokens += num_tokens
        routed_E = count(expert_S, self.num_experts).float()
        self._add("routed_E", routed_E)
        self._add("kept_E", count(expert_S, self.num_experts, where=keep_S).float())
        # per forward, then averaged: summing counts first would let opposite imbalances cancel
        self._add("imbalance", routed_E.max() / routed_E.mean().clamp(min=1e-9))
        kept_per_token = count(token_S, num_tokens, where=keep_S)
        self._add("tokens_fully_dropped", (kept_per_token == 0).sum().float())
        if logits_TE is not None:
            log_probs = torch.log_softmax(logits_TE.float(), dim=-1)
            self._add("entropy_sum", -(log_probs.exp() * log_probs).sum(-1).sum())
            self._add("max_prob_sum", probs_TE.max(dim=-1).values.sum())
            self._max("max_logit", logits_TE.max())
        self._add("aux_loss_sum", aux_loss.float())
        self._add("z_loss_sum", z_loss.float())
        if distill_loss is not None:
            self._add("distill_loss_sum", distill_loss.float())

    def compute(self) -> dict[str, float | list[float]]:
        """The averages since the last reset (empty if nothing was routed)."""
        if self.num_forwards == 0:
            return {}
        s = {k: v.cpu() for k, v in self._sums.items()}
        routed, kept, tokens, forwards = s["routed_E"], s["kept_E"], self.num_tokens, self.num_forwards
        total_slots = routed.sum().clamp(min=1)
        out: dict[str, float | list[float]] = {
            # fractions of all routed assignments (before capacity), summed over forwards
            "tokens_per_expert": (routed / total_slots).tolist(),
            "kept_per_expert": (kept / kept.sum().clamp(min=1)).tolist(),
            # max/mean of routed assignments per expert, per forward, averaged: 1.0 is perfectly balanced
            "load_imbalance": float(s["imbalance"] / forwards),
            # fraction of token-expert assignments dropped by capacity
            "dropped_frac": float(1 - kept.sum() / total_slots),
            # fraction of tokens none of whose assignments were kept (they only pass the residual)
            "tokens_fully_dropped_frac": float(s["tokens_fully_dropped"] / tokens),
            "aux_loss": float(s["aux_loss_sum"] / forwards),
            "z_loss": float(s["z_loss_sum"] / forwards),
        }
        if "entropy_sum" in s:  # routers with scores
            out["router_entropy"] = float(s["entropy_sum"] / tokens)
            out["mean_max_prob"] = float(s["max_prob_sum"] / tokens)
            out["max_logit"] = float(s["max_logit"])
        if "distill_loss_sum" in s:
            out["distill_loss"] = float(s["distill_loss_sum"] / forwards)
        return out
