"""Balanced token-to-expert assignment for BASE layers (Lewis et al. 2021), solved by an auction.

The problem: n tokens, E experts, scores a[t, e]; give every expert exactly cap_e tokens (cap_e = n // E,
plus one for the first n % E experts: which experts take the remainder is fixed, not optimised) and
maximise sum_t a[t, e_t]. It is a linear assignment problem
(each expert = cap_e identical slots). BASE solves it with Bertsekas' auction algorithm; so do we.

Auction (Bertsekas 1988, "The auction algorithm: a distributed relaxation method"; the Jacobi variant,
with one price per expert): every unassigned token bids for its best expert e1 at prices p,
    bid = p[e1] + (v1 - v2) + eps,   v1, v2 = best and second-best a[t, e] - p[e];
each expert keeps its cap_e highest bids (old holders included) and, once full, its price is its lowest
kept bid. A held token t of expert e then satisfies a[t, e] - p[e] >= max_e' (a[t, e'] - p[e']) - eps
(prices only rise and p[e] <= t's bid), so when everyone is assigned, weak LP duality puts the total
within n * eps of the optimum. Epsilon scaling (start coarse, divide by 4 per phase, keep the prices)
keeps the number of rounds small. The final eps is tolerance * (max a - min a), so the mean score per
token is within tolerance * (max a - min a) of the optimum's.

Cost: each round is a few O(n E) tensor ops plus a sort of the held tokens (O(n log n)); the number of
rounds grows with E and with log(1 / tolerance), typically tens to a few hundred for n in the thousands.
A round limit guards the worst case; past it the free tokens fill the remaining slots greedily (still
exactly balanced, no longer guaranteed optimal) and `last_stats["fallback"]` says so.
"""

from __future__ import annotations

import torch


def expert_slots(num_tokens: int, num_experts: int, device: torch.device | None = None) -> torch.Tensor:
    """Tokens each expert takes in a balanced assignment: n // E, plus one for the first n % E experts."""
    base, extra = divmod(num_tokens, num_experts)
    return base + (torch.arange(num_experts, device=device) < extra).long()


@torch.no_grad()
def balanced_assignment(
    scores_TE: torch.Tensor,
    tolerance: float = 1e-3,
    max_rounds: int = 10_000,
    stats: dict | None = None,
) -> torch.Tensor:
    """The expert of every token in a balanced assignment maximising total score (within tolerance)."""
    num_tokens, num_experts = scores_TE.shape
    device = scores_TE.device
    scores = scores_TE.double()
    cap_E = expert_slots(num_tokens, num_experts, device)
    if num_tokens == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    spread = float(scores.max() - scores.min())
    if spread == 0.0 or num_tokens == 1 or num_experts == 1:  # every balanced assignment is optimal
        if stats is not None:
            stats.update(rounds=0, fallback=False)
        return torch.repeat_interleave(torch.arange(num_experts, device=device), cap_E)
    if num_tokens < num_experts:  # only the first n experts have a slot: solve among them
        return balanced_assignment(scores_TE[:, :num_tokens], tolerance, max_rounds, stats)
    final_eps = tolerance * spread
    eps = max(spread / 4, final_eps)
    price_E = torch.zeros(num_experts, dtype=torch.float64, device=device)
    rounds = 0
    while True:
        owner_T, rounds = _auction_phase(scores, cap_E, price_E, eps, rounds, max_rounds)
        if eps <= final_eps or rounds >= max_rounds:
            break
        eps = max(eps / 4, final_eps)
    fallback = bool((owner_T < 0).any())
    if fallback:
        owner_T = _fill_greedily(scores, cap_E, owner_T)
    if stats is not None:
        stats.update(rounds=rounds, fallback=fallback)
    return owner_T


def _auction_phase(
    scores: torch.Tensor, cap_E: torch.Tensor, price_E: torch.Tensor, eps: float, rounds: int, max_rounds: int
) -> tuple[torch.Tensor, int]:
    """One epsilon phase from an empty assignment; updates price_E in place."""
    num_tokens, num_experts = scores.shape
    device = scores.device
    owner_T = torch.full((num_tokens,), -1, dtype=torch.long, device=device)
    bid_T = torch.zeros(num_tokens, dtype=torch.float64, device=device)
    while rounds < max_rounds:
        free_F = (owner_T < 0).nonzero().squeeze(1)
        if free_F.numel() == 0:
            break
        rounds += 1
        values_FE = scores[free_F] - price_E
        top_F2, best_F2 = values_FE.topk(2, dim=1)
        e1_F = best_F2[:, 0]
        owner_T[free_F] = e1_F
        bid_T[free_F] = price_E[e1_F] + (top_F2[:, 0] - top_F2[:, 1]) + eps
        # every expert keeps its cap highest bids among its old holders and the new bidders
        held_H = (owner_T >= 0).nonzero().squeeze(1)
        by_bid = held_H[torch.argsort(bid_T[held_H], descending=True, stable=True)]
        ordered = by_bid[torch.argsort(owner_T[by_bid], stable=True)]
        counts_E = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(
            0, owner_T[ordered], torch.ones_like(ordered)
        )
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        experts_H = owner_T[ordered]
        rank_H = torch.arange(ordered.numel(), device=device) - starts_E[experts_H]
        rejected = ordered[rank_H >= cap_E[experts_H]]
        owner_T[rejected] = -1
        kept = ordered[rank_H < cap_E[experts_H]]
        # a full expert's price is its lowest kept bid; it never falls (bids are at least the price)
        lowest_E = torch.full((num_experts,), float("inf"), dtype=torch.float64, device=device)
        lowest_E = lowest_E.scatter_reduce(0, owner_T[kept], bid_T[kept], reduce="amin")
        full_E = torch.minimum(counts_E, cap_E) == cap_E
        price_E.copy_(torch.where(full_E & (cap_E > 0), torch.maximum(price_E, lowest_E), price_E))
    return owner_T, rounds


def _fill_greedily(scores: torch.Tensor, cap_E: torch.Tensor, owner_T: torch.Tensor) -> torch.Tensor:
    """Give the unassigned tokens the free slots, best score first (keeps the balance exact)."""
    owner_T = owner_T.clone()
    assigned = owner_T[owner_T >= 0]
    left_E = cap_E - torch.zeros_like(cap_E).scatter_add_(0, assigned, torch.ones_like(assigned))
    for t in (owner_T < 0).nonzero().squeeze(1).tolist():
        open_scores = scores[t].masked_fill(left_E <= 0, float("-inf"))
        e = int(open_scores.argmax())
        owner_T[t] = e
        left_E[e] -= 1
    return owner_T
