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
- `triton`: `sorted` with our Triton kernels (moe_lab.moe.triton_kernels): gather fused into the grouped matmul.

`grouped_mm` and `triton` never read a tensor on the host (`combine_on_device`): on CUDA a layer's forward and
backward are queued without waiting for the GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from moe_lab.moe.experts import Experts, grouped_mm_supports
from moe_lab.moe.router import Routing, count

Backend = Callable[[torch.Tensor, Routing, Experts], tuple[torch.Tensor, torch.Tensor]]


class SlotOrder(NamedTuple):
    """Every slot in dispatch order, built on the device: the kept slots first, sorted by (expert, group) in
    claim order inside each (each expert's block contiguous, as the grouped matmuls need), then the dropped."""

    order_S: torch.Tensor  # slot indices in dispatch order
    kept_E: torch.Tensor  # kept slots per expert: expert e's block is the kept_E[e] rows after those of e - 1
    keep_S: torch.Tensor  # bool, in the routing's slot order


def slot_order(routing: Routing) -> SlotOrder:
    """The keep rule shared by every sorted backend: a slot is kept when fewer than its group's capacity of
    earlier slots of that group went to its expert. Only sorts and scatters, so it never waits for the host."""
    num_experts, num_groups = routing.num_experts, routing.num_groups
    # segments by (expert, group): a stable sort keeps claim order inside each segment
    key_S = routing.expert_S * num_groups + routing.group_S
    sorted_idx = torch.argsort(key_S, stable=True)
    if routing.capacity_G is None:
        keep_S = torch.ones_like(routing.expert_S, dtype=torch.bool)
        return SlotOrder(sorted_idx, count(routing.expert_S, num_experts), keep_S)
    counts = count(key_S, num_experts * num_groups)
    starts = counts.cumsum(0) - counts
    key_sorted = key_S[sorted_idx]
    rank = torch.arange(key_S.numel(), device=key_S.device) - starts[key_sorted]
    keep_sorted = rank < routing.capacity_tensor()[key_sorted % num_groups]
    # a second stable sort moves the dropped slots behind the kept ones and keeps the kept ones' order: no
    # boolean selection, whose size the host would have to read
    order_S = sorted_idx[torch.argsort((~keep_sorted).to(torch.uint8), stable=True)]
    keep_S = torch.zeros_like(keep_sorted).scatter_(0, sorted_idx, keep_sorted)
    return SlotOrder(order_S, count(routing.expert_S, num_experts, where=keep_S), keep_S)


# the experts' outputs for the kept slots' tokens x_ND, given each slot's expert (sorted by expert) and the
# number of slots per expert
ExpertsOnSlots = Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]


def combine_sorted(
    x_TD: torch.Tensor, routing: Routing, run_experts: ExpertsOnSlots
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted path around its experts: keep and sort the slots, gather their tokens, `run_experts` on them
    (here, or on other ranks: moe_lab.moe.expert_parallel), then gate and scatter-add. Returns (y_TD, keep_S).

    It reads the experts' block sizes on the host, once: a loop over experts needs them."""
    slots = slot_order(routing)
    counts = slots.kept_E.tolist()
    kept_idx = slots.order_S[: sum(counts)]
    token_N = routing.token_S[kept_idx]
    h_ND = run_experts(x_TD.index_select(0, token_N), routing.expert_S[kept_idx], counts)
    # gate and scatter in the input's dtype, so that autocast's bf16 matmuls give the same output dtype
    h_ND = h_ND.to(x_TD.dtype) * routing.gate_S[kept_idx].to(x_TD.dtype)[:, None]
    return torch.zeros_like(x_TD).index_add(0, token_N, h_ND), slots.keep_S


# the experts' outputs for every slot in dispatch order: x_TD, each slot's token, the kept slots per expert
ExpertsOnRows = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def combine_on_device(
    x_TD: torch.Tensor, routing: Routing, run_experts: ExpertsOnRows
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted path without host reads: the experts see every slot in dispatch order (the kept ones in
    their blocks, the dropped ones after) and the dropped slots' outputs get a zero gate, so no tensor's size
    depends on the routing. Returns (y_TD, keep_S)."""
    slots = slot_order(routing)
    token_R = routing.token_S[slots.order_S]
    h_RD = run_experts(x_TD, token_R, slots.kept_E)
    kept_R = torch.arange(token_R.numel(), device=token_R.device) < slots.kept_E.sum()
    gate_R = torch.where(kept_R, routing.gate_S[slots.order_S], 0).to(x_TD.dtype)
    return torch.zeros_like(x_TD).index_add(0, token_R, h_RD.to(x_TD.dtype) * gate_R[:, None]), slots.keep_S


def dispatch_sorted(x_TD: torch.Tensor, routing: Routing, experts: Experts) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort + gather + grouped matmul + scatter-add. Returns (y_TD, keep_S)."""
    return combine_sorted(x_TD, routing, lambda x_ND, expert_N, counts: experts.forward_grouped(x_ND, counts))


def dispatch_grouped_mm(x_TD: torch.Tensor, routing: Routing, experts: Experts) -> tuple[torch.Tensor, torch.Tensor]:
    """`sorted` with torch._grouped_mm over the expert blocks: the block offsets stay on the device, so on CUDA
    a forward never waits for the host. Returns (y_TD, keep_S)."""
    problem = grouped_mm_supports(x_TD.dtype, x_TD.shape[-1], experts.d_ff)
    if problem is not None:
        raise ValueError(f"backend=grouped_mm: {problem}; use backend=sorted")

    def grouped(x_TD: torch.Tensor, token_R: torch.Tensor, kept_E: torch.Tensor) -> torch.Tensor:
        # torch._grouped_mm leaves rows past the last offset unset, so the dropped slots ride in the last
        # expert's block: their zero gate cancels their output and every gradient they would carry, at the
        # cost of their FLOPs (the fraction dropped) and of expert dropout drawing for them too
        offsets_E = kept_E.cumsum(0).to(torch.int32)
        offsets_E[-1] = token_R.numel()
        return experts.forward_grouped_mm(x_TD.index_select(0, token_R), offsets_E)

    return combine_on_device(x_TD, routing, grouped)


def triton_supports(x_TD: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run on this input, or None."""
    # imported on first use: Triton reads TRITON_INTERPRET when the kernels are defined
    from moe_lab.moe import triton_kernels

    return triton_kernels.supports(x_TD)


def dispatch_triton(x_TD: torch.Tensor, routing: Routing, experts: Experts) -> tuple[torch.Tensor, torch.Tensor]:
    """`sorted` with Triton kernels (moe_lab.moe.triton_kernels): the gather fused into the first grouped
    matmul, tiles laid out on the device, dropped slots never multiplied (the activation and expert dropout
    still run over their zero rows, so expert dropout draws for them too). Returns (y_TD, keep_S)."""
    problem = triton_supports(x_TD)
    if problem is not None:
        raise ValueError(f"backend=triton: {problem}; use backend=sorted")
    from moe_lab.moe.triton_kernels import grouped_ffn

    return combine_on_device(x_TD, routing, lambda x, token_R, kept_E: grouped_ffn(x, token_R, kept_E, experts))


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
    "triton": dispatch_triton,
    "loop": dispatch_loop,
    "einsum": dispatch_einsum,
}
