"""The routing decision: token-to-expert slots in the order they claim capacity, the capacity, and which slots it keeps.

A router (moe_lab.moe.routers) scores the tokens and calls one of the claim-order rules here (`route_token_choice`,
`route_expert_choice`, `route_assigned`); each gives a `Routing` with every group's capacity (`expert_capacity`).
`keep_slots` then applies the one keep rule: a slot is kept when fewer than its group's capacity of earlier slots of
that group went to its expert. The dispatch backends (moe_lab.moe.dispatch) only move the kept slots' tokens.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from moe_lab.moe.config import CAPACITY_CONVENTIONS


@dataclass
class Routing:
    """Token-to-expert assignments ("slots") of one forward, in the order they claim capacity.

    The order is group-major: all slots of group 0 come first. Inside a group, token-choice slots are
    ordered by choice rank (every first choice before any second choice), then by the drop policy's
    token priority. `keep_slots` keeps a slot when fewer than `capacity_G[group]` earlier slots of
    its group went to the same expert.
    """

    token_S: torch.Tensor  # [S] long, token index in the flattened input
    expert_S: torch.Tensor  # [S] long
    gate_S: torch.Tensor  # [S] float32, differentiable: the combine weight of the slot
    group_S: torch.Tensor  # [S] long
    choice_S: torch.Tensor  # [S] long, the slot's choice rank (0 = first choice)
    capacity_G: list[int] | None  # slots per expert in each group; None = dropless
    group_T: torch.Tensor  # [T] long, routing group of every token
    group_sizes: list[int]  # tokens per group: all equal but the last
    num_experts: int
    expert_index_TK: torch.Tensor  # [T, K] long: the experts each token chose (top-1 for expert choice)

    @property
    def num_tokens(self) -> int:
        return self.group_T.numel()

    @property
    def num_groups(self) -> int:
        return len(self.group_sizes)

    def group_token_bounds(self) -> list[tuple[int, int]]:
        """[start, end) token range of every group."""
        ends = itertools.accumulate(self.group_sizes)
        return [(end - n, end) for n, end in zip(self.group_sizes, ends, strict=True)]

    def capacity_tensor(self) -> torch.Tensor:
        """capacity_G on the routing's device, built without a host-to-device copy (no CUDA sync)."""
        assert self.capacity_G is not None
        cap_G = torch.full((self.num_groups,), self.capacity_G[0], device=self.group_T.device)
        if self.capacity_G[-1] != self.capacity_G[0]:  # only the last group can be shorter
            cap_G[-1] = self.capacity_G[-1]
        return cap_G


def count(index: torch.Tensor, size: int, where: torch.Tensor | None = None) -> torch.Tensor:
    """bincount with a fixed length, of the entries where `where` (bool) holds if given: a scatter-add, which
    unlike CUDA bincount or a boolean selection never syncs the host."""
    ones = torch.ones_like(index) if where is None else where.long()
    return torch.zeros(size, dtype=torch.long, device=index.device).scatter_add_(0, index, ones)


# --- capacity ---------------------------------------------------------------------------------------------------


def expert_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float | None, convention: str = "gshard"
) -> int | None:
    """Slots per expert in a group of num_tokens.

    "gshard": ceil(cf * k * tokens / E) (GShard Alg. 1, Switch Eq. 3), at least 1. "flaxformer":
    round(cf * tokens / E), at least 4 (flaxformer's moe_layers and Mesh TensorFlow's moe.py; round half to even,
    as jnp.round)."""
    if capacity_factor is None:
        return None
    if convention == "flaxformer":
        return max(4, round(capacity_factor * num_tokens / num_experts))
    if convention != "gshard":
        raise ValueError(f"capacity convention {convention!r} is not one of {list(CAPACITY_CONVENTIONS)}")
    # the small epsilon keeps float noise (1.1 * 100 = 110.00000000000001) from adding a slot
    return max(1, math.ceil(capacity_factor * top_k * num_tokens / num_experts - 1e-9))


def group_ids(num_tokens: int, group_size: int | None, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Routing group of each token (consecutive runs of group_size; the last may be shorter) and group sizes."""
    if group_size is None or group_size >= num_tokens:
        return torch.zeros(num_tokens, dtype=torch.long, device=device), [num_tokens]
    num_groups = math.ceil(num_tokens / group_size)
    sizes = [group_size] * (num_groups - 1) + [num_tokens - group_size * (num_groups - 1)]
    return torch.arange(num_tokens, device=device) // group_size, sizes


def group_capacities(
    sizes: list[int], num_experts: int, top_k: int, capacity_factor: float | None, convention: str
) -> list[int] | None:
    """The capacity of every routing group (None: dropless)."""
    if capacity_factor is None:
        return None
    return [expert_capacity(n, num_experts, top_k, capacity_factor, convention) for n in sizes]


# --- claim order: who asks first --------------------------------------------------------------------------------


def route_token_choice(
    probs_TE: torch.Tensor,
    top_k: int,
    capacity_factor: float | None,
    drop_policy: str = "position",
    renormalize: bool = False,
    group_size: int | None = None,
    convention: str = "gshard",
) -> Routing:
    """Token-choice top-k routing: each token picks its k most probable experts."""
    num_tokens, num_experts = probs_TE.shape
    device = probs_TE.device
    group_T, sizes = group_ids(num_tokens, group_size, device)
    gate_TK, expert_TK = probs_TE.topk(top_k, dim=-1)
    top1_T = gate_TK[:, 0].detach()
    if renormalize:
        gate_TK = gate_TK / gate_TK.sum(dim=-1, keepdim=True)

    # token priority inside each group: position = token order; priority = BPR, highest top-1 prob first
    if drop_policy == "priority":
        order_T = torch.argsort(-top1_T, stable=True)
        order_T = order_T[torch.argsort(group_T[order_T], stable=True)]
    else:
        order_T = torch.arange(num_tokens, device=device)

    # slots in claim order: group, then choice rank, then token priority
    token_TK = order_T[:, None].expand(num_tokens, top_k)
    choice_TK = torch.arange(top_k, device=device)[None, :].expand(num_tokens, top_k)
    claim_key = (group_T[token_TK] * top_k + choice_TK).reshape(-1)
    perm = torch.argsort(claim_key, stable=True)
    token_S = token_TK.reshape(-1)[perm]
    choice_S = choice_TK.reshape(-1)[perm]
    return Routing(
        token_S=token_S,
        expert_S=expert_TK[token_S, choice_S],
        gate_S=gate_TK[token_S, choice_S],
        group_S=group_T[token_S],
        choice_S=choice_S,
        capacity_G=group_capacities(sizes, num_experts, top_k, capacity_factor, convention),
        group_T=group_T,
        group_sizes=sizes,
        num_experts=num_experts,
        expert_index_TK=expert_TK,
    )


def route_expert_choice(
    probs_TE: torch.Tensor,
    top_k: int,
    capacity_factor: float,
    group_size: int | None = None,
    convention: str = "gshard",
) -> Routing:
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens of every group, so no slot
    is ever dropped: the capacity (at most the group's size) decides how many slots there are."""
    num_tokens, num_experts = probs_TE.shape
    device = probs_TE.device
    group_T, sizes = group_ids(num_tokens, group_size, device)
    capacity_G = group_capacities(sizes, num_experts, top_k, capacity_factor, convention)
    routing = Routing(
        token_S=torch.empty(0, dtype=torch.long, device=device),
        expert_S=torch.empty(0, dtype=torch.long, device=device),
        gate_S=probs_TE.new_empty(0),
        group_S=torch.empty(0, dtype=torch.long, device=device),
        choice_S=torch.empty(0, dtype=torch.long, device=device),
        capacity_G=None,
        group_T=group_T,
        group_sizes=sizes,
        num_experts=num_experts,
        expert_index_TK=probs_TE.argmax(dim=-1, keepdim=True),
    )
    tokens, experts, gates, groups, caps = [], [], [], [], []
    for g, (start, end) in enumerate(routing.group_token_bounds()):
        cap = min(capacity_G[g], end - start)
        # a stable sort, not topk: tied scores go to the earlier token, the same on every device
        scores_ES = probs_TE[start:end].t()
        token_EC = torch.argsort(scores_ES, dim=-1, descending=True, stable=True)[:, :cap]
        gate_EC = scores_ES.gather(1, token_EC)
        tokens.append(token_EC.reshape(-1) + start)
        experts.append(torch.arange(num_experts, device=device).repeat_interleave(cap))
        gates.append(gate_EC.reshape(-1))
        groups.append(torch.full((num_experts * cap,), g, dtype=torch.long, device=device))
        caps.append(cap)
    routing.token_S = torch.cat(tokens)
    routing.expert_S = torch.cat(experts)
    routing.gate_S = torch.cat(gates)
    routing.group_S = torch.cat(groups)
    # an expert's picks are ranked by score; none is a "second choice" of its token
    routing.choice_S = torch.zeros_like(routing.token_S)
    routing.capacity_G = caps
    return routing


def route_assigned(
    expert_T: torch.Tensor,
    gate_T: torch.Tensor,
    num_experts: int,
    capacity_factor: float | None,
    group_size: int | None = None,
    convention: str = "gshard",
) -> Routing:
    """Top-1 routing to given experts with given gates (hash, BASE, StableMoE); capacity goes by position."""
    num_tokens = expert_T.shape[0]
    device = expert_T.device
    group_T, sizes = group_ids(num_tokens, group_size, device)
    token_S = torch.arange(num_tokens, device=device)
    return Routing(
        token_S=token_S,
        expert_S=expert_T,
        gate_S=gate_T,
        group_S=group_T,
        choice_S=torch.zeros_like(token_S),
        capacity_G=group_capacities(sizes, num_experts, 1, capacity_factor, convention),
        group_T=group_T,
        group_sizes=sizes,
        num_experts=num_experts,
        expert_index_TK=expert_T[:, None],
    )


# --- the keep rule: who gets in ---------------------------------------------------------------------------------


class KeptSlots(NamedTuple):
    """Which slots capacity keeps, and every slot in dispatch order: the kept slots first, sorted by (expert, group)
    in claim order inside each (each expert's block contiguous, as the grouped matmuls need), then the dropped."""

    keep_S: torch.Tensor  # bool, in the routing's slot order
    order_S: torch.Tensor  # slot indices in dispatch order
    kept_E: torch.Tensor  # kept slots per expert: expert e's block is the kept_E[e] rows after those of e - 1


def keep_slots(routing: Routing) -> KeptSlots:
    """The keep rule every backend obeys: a slot is kept when fewer than its group's capacity of earlier slots of
    that group went to its expert. Only sorts and scatters, so it never waits for the host."""
    num_experts, num_groups = routing.num_experts, routing.num_groups
    # segments by (expert, group): a stable sort keeps claim order inside each segment
    key_S = routing.expert_S * num_groups + routing.group_S
    sorted_idx = torch.argsort(key_S, stable=True)
    if routing.capacity_G is None:
        keep_S = torch.ones_like(routing.expert_S, dtype=torch.bool)
        return KeptSlots(keep_S, sorted_idx, count(routing.expert_S, num_experts))
    counts = count(key_S, num_experts * num_groups)
    starts = counts.cumsum(0) - counts
    key_sorted = key_S[sorted_idx]
    rank = torch.arange(key_S.numel(), device=key_S.device) - starts[key_sorted]
    keep_sorted = rank < routing.capacity_tensor()[key_sorted % num_groups]
    # a second stable sort moves the dropped slots behind the kept ones and keeps the kept ones' order: no
    # boolean selection, whose size the host would have to read
    order_S = sorted_idx[torch.argsort((~keep_sorted).to(torch.uint8), stable=True)]
    keep_S = torch.zeros_like(keep_sorted).scatter_(0, sorted_idx, keep_sorted)
    return KeptSlots(keep_S, order_S, count(routing.expert_S, num_experts, where=keep_S))
