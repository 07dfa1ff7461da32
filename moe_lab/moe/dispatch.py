"""Dispatch backends: send each kept slot's token to its expert and combine the weighted outputs.

All backends take the same `Routing` and must agree on which slots are kept (the first
`capacity_G[g]` slots of each (group, expert) in claim order), on the output and on gradients. They
differ only in how they move tokens:

- `einsum`: the GShard / Mesh TensorFlow reference. Positions from a cumulative sum of one-hot masks,
  a [tokens, experts, capacity] dispatch tensor, and two einsums. Readable, quadratic in memory.
- `loop`: a Python loop over experts that masks the slots of each one, as Hugging Face's models do.
- `sorted`: the fast path (MegaBlocks / ScatterMoE): sort slots by expert, gather the tokens once,
  a grouped matmul over contiguous expert blocks, a weighted scatter-add back. It never builds a
  [tokens, experts, capacity] tensor. Its grouped matmul is a Python loop over experts and reads the
  block sizes on the host.
- `grouped_mm`: `sorted` with torch._grouped_mm (one kernel per matmul, offsets on the device).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moe_lab.moe.experts import Experts, grouped_mm_supports
from moe_lab.moe.router import Routing, count

Backend = Callable[[torch.Tensor, Routing, Experts], tuple[torch.Tensor, torch.Tensor]]


def kept_in_expert_order(routing: Routing) -> torch.Tensor:
    """The indices of the kept slots, sorted by (expert, group), claim order inside each: a slot is kept when
    fewer than its group's capacity of earlier slots of that group went to its expert."""
    num_experts, num_groups = routing.num_experts, routing.num_groups
    # segments by (expert, group): a stable sort keeps claim order inside each segment and leaves
    # the slots of each expert contiguous, which is what the grouped matmul needs
    key_S = routing.expert_S * num_groups + routing.group_S
    sorted_idx = torch.argsort(key_S, stable=True)
    if routing.capacity_G is None:
        return sorted_idx
    counts = count(key_S, num_experts * num_groups)
    starts = counts.cumsum(0) - counts
    key_sorted = key_S[sorted_idx]
    rank = torch.arange(key_S.numel(), device=key_S.device) - starts[key_sorted]
    return sorted_idx[rank < routing.capacity_tensor()[key_sorted % num_groups]]


# the experts' outputs for the kept slots' tokens x_ND, given each slot's expert (sorted by expert)
ExpertsOnSlots = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def combine_sorted(
    x_TD: torch.Tensor, routing: Routing, run_experts: ExpertsOnSlots
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted path around its experts: keep and sort the slots, gather their tokens, `run_experts` on them
    (here, or on other ranks: moe_lab.moe.expert_parallel), then gate and scatter-add. Returns (y_TD, keep_S)."""
    kept_idx = kept_in_expert_order(routing)
    keep_S = torch.zeros_like(routing.expert_S, dtype=torch.bool).index_fill_(0, kept_idx, True)
    token_N = routing.token_S[kept_idx]
    h_ND = run_experts(x_TD.index_select(0, token_N), routing.expert_S[kept_idx])
    # gate and scatter in the input's dtype, so that autocast's bf16 matmuls give the same output dtype
    h_ND = h_ND.to(x_TD.dtype) * routing.gate_S[kept_idx].to(x_TD.dtype)[:, None]
    return torch.zeros_like(x_TD).index_add(0, token_N, h_ND), keep_S


def dispatch_sorted(x_TD: torch.Tensor, routing: Routing, experts: Experts) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort + gather + grouped matmul + scatter-add. Returns (y_TD, keep_S)."""

    def grouped(x_ND: torch.Tensor, expert_N: torch.Tensor) -> torch.Tensor:
        # the one host sync of this path: block sizes for the grouped matmul (a GPU kernel takes offsets instead)
        return experts.forward_grouped(x_ND, count(expert_N, routing.num_experts).tolist())

    return combine_sorted(x_TD, routing, grouped)


def dispatch_grouped_mm(x_TD: torch.Tensor, routing: Routing, experts: Experts) -> tuple[torch.Tensor, torch.Tensor]:
    """`sorted` with torch._grouped_mm over the expert blocks: the block offsets stay on the device, so on CUDA
    a forward never waits for the host. Returns (y_TD, keep_S)."""
    problem = grouped_mm_supports(x_TD.dtype, x_TD.shape[-1], experts.d_ff)
    if problem is not None:
        raise ValueError(f"backend=grouped_mm: {problem}; use backend=sorted")

    def grouped(x_ND: torch.Tensor, expert_N: torch.Tensor) -> torch.Tensor:
        offsets_E = count(expert_N, routing.num_experts).cumsum(0).to(torch.int32)
        return experts.forward_grouped_mm(x_ND, offsets_E)

    return combine_sorted(x_TD, routing, grouped)


def dispatch_loop(x_TD: torch.Tensor, routing: Routing, experts: Experts) -> tuple[torch.Tensor, torch.Tensor]:
    """One masked pass per expert. Returns (y_TD, keep_S)."""
    y_TD = torch.zeros_like(x_TD)
    keep_S = torch.zeros_like(routing.expert_S, dtype=torch.bool)
    w_in, w_out = experts.w_in_EDH.unbind(0), experts.w_out_EFD.unbind(0)
    capacity_G = routing.capacity_tensor() if routing.capacity_G is not None else None
    for e in range(routing.num_experts):
        idx = torch.nonzero(routing.expert_S == e).squeeze(1)  # this expert's slots, in claim order
        if capacity_G is not None and idx.numel() > 0:
            # slots are group-major, so each group's slots of this expert form one run
            group = routing.group_S[idx]
            per_group = count(group, routing.num_groups)
            rank = torch.arange(idx.numel(), device=idx.device) - (per_group.cumsum(0) - per_group)[group]
            idx = idx[rank < capacity_G[group]]
        if idx.numel() == 0:
            continue
        keep_S[idx] = True
        token = routing.token_S[idx]
        h = experts.forward_one(x_TD[token], w_in[e], w_out[e]).to(x_TD.dtype)
        y_TD = y_TD.index_add(0, token, h * routing.gate_S[idx].to(x_TD.dtype)[:, None])
    return y_TD, keep_S


def dispatch_einsum(x_TD: torch.Tensor, routing: Routing, experts: Experts) -> tuple[torch.Tensor, torch.Tensor]:
    """GShard's one-hot dispatch and combine, one routing group at a time. Returns (y_TD, keep_S)."""
    num_experts = routing.num_experts
    outputs, keeps = [], []
    slot_counts = count(routing.group_S, routing.num_groups).tolist()
    slot_start = 0
    for g, (t0, t1) in enumerate(routing.group_token_bounds()):
        s = slice(slot_start, slot_start + slot_counts[g])
        slot_start = s.stop
        token_S, expert_S, gate_S = routing.token_S[s] - t0, routing.expert_S[s], routing.gate_S[s]
        # position of each slot in its expert's buffer: cumulative count of that expert so far
        mask_SE = F.one_hot(expert_S, num_experts)
        position_S = ((mask_SE.cumsum(0) - 1) * mask_SE).sum(-1)
        if routing.capacity_G is None:
            capacity = int(mask_SE.sum(0).max().item()) if expert_S.numel() else 1
        else:
            capacity = routing.capacity_G[g]
        keep = position_S < capacity
        keeps.append(keep)
        # dispatch[t, e, c] = 1 if token t sits in slot c of expert e; combine adds the gate
        cell = expert_S[keep] * capacity + position_S[keep]
        shape = (t1 - t0, num_experts * capacity)
        dispatch_TEC = x_TD.new_zeros(shape).index_put((token_S[keep], cell), x_TD.new_ones(()))
        combine_TEC = x_TD.new_zeros(shape).index_put((token_S[keep], cell), gate_S[keep].to(x_TD.dtype))
        dispatch_TEC = dispatch_TEC.view(-1, num_experts, capacity)
        combine_TEC = combine_TEC.view(-1, num_experts, capacity)
        x_ECD = torch.einsum("tec,td->ecd", dispatch_TEC, x_TD[t0:t1])
        h_ECD = experts.forward_padded(x_ECD)
        outputs.append(torch.einsum("tec,ecd->td", combine_TEC, h_ECD).to(x_TD.dtype))
    return torch.cat(outputs), torch.cat(keeps)


BACKENDS: dict[str, Backend] = {
    "sorted": dispatch_sorted,
    "grouped_mm": dispatch_grouped_mm,
    "loop": dispatch_loop,
    "einsum": dispatch_einsum,
}
