"""The router's auxiliary losses: Switch load balancing and ST-MoE's router z-loss."""

from __future__ import annotations

import torch

from moe_lab.moe.routing import Routing, count


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of logsumexp(logits)^2 (ST-MoE Eq. 5)."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def load_balancing_loss(
    probs_TE: torch.Tensor,
    routing: Routing,
    aux_loss_type: str = "topk",
    keep_S: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch load-balancing loss E * sum_i f_i * P_i (Switch Eq. 4-6, ST-MoE App. A), averaged over groups.

    Groups are weighted by their share of the tokens, so equal groups average plainly (flaxformer) and a
    short last group counts no more than its tokens.

    P_i is the mean router probability of expert i over the group's tokens (it carries the gradient).
    f_i is the number of the group's tokens that chose expert i, divided by the number of tokens:
    - "topk": every one of a token's k choices counts, so sum_i f_i = k and perfectly uniform routing
      gives a loss of k (flaxformer's ST-MoE `load_balancing_loss`; Mixtral's sums the same terms);
    - "top1": only first choices count, so sum_i f_i = 1 and uniform routing gives 1 (GShard, Switch).
    Expert-choice slots all count as first choices. With `keep_S`, f_i counts only the assignments
    kept after capacity; without it (the default), all router choices, before capacity.
    """
    num_experts, num_groups = routing.num_experts, routing.num_groups
    with torch.no_grad():
        counted = torch.ones_like(routing.expert_S, dtype=torch.bool)
        if aux_loss_type == "top1":
            counted &= routing.choice_S == 0
        if keep_S is not None:
            counted &= keep_S
        cell = routing.group_S * num_experts + routing.expert_S
        counts_GE = count(cell, num_groups * num_experts, where=counted).view(num_groups, num_experts)
        tokens_G = count(routing.group_T, num_groups).clamp(min=1)
        f_GE = counts_GE.float() / tokens_G[:, None]
        weight_G = tokens_G.float() / routing.num_tokens
    prob_sum_GE = probs_TE.new_zeros(num_groups, num_experts).index_add(0, routing.group_T, probs_TE)
    P_GE = prob_sum_GE / tokens_G[:, None]
    return num_experts * ((f_GE * P_GE).sum(-1) * weight_G).sum()
