"""Dispatch backends: send each kept slot's token to its expert and combine the weighted outputs.

Which slots are kept is decided before any backend runs (moe_lab.moe.routing: `keep_slots`, the first
`capacity_G[g]` slots of each (group, expert) in claim order); every backend takes the `Routing` and those
`KeptSlots` and must agree on the output and on gradients. They differ only in how they move tokens:

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

import torch
import torch.nn.functional as F

from moe_lab.moe import config
from moe_lab.moe.experts import Experts, grouped_mm_supports
from moe_lab.moe.routing import KeptSlots, Routing, count

# x_TD, the routing, the slots capacity kept (moe_lab.moe.routing.keep_slots), the experts -> y_TD
Backend = Callable[[torch.Tensor, Routing, KeptSlots, Experts], torch.Tensor]


# the experts' outputs for the kept slots' tokens x_ND, given each slot's expert (sorted by expert) and the
# number of slots per expert
ExpertsOnSlots = Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]


def combine_sorted(x_TD: torch.Tensor, routing: Routing, kept: KeptSlots, run_experts: ExpertsOnSlots) -> torch.Tensor:
    """The sorted path around its experts: gather the kept slots' tokens in dispatch order, `run_experts` on them
    (here, or on other ranks: moe_lab.moe.expert_parallel), then gate and scatter-add. Returns y_TD.

    It reads the experts' block sizes on the host, once: a loop over experts needs them."""
    counts = kept.kept_E.tolist()
    kept_idx = kept.order_S[: sum(counts)]
    token_N = routing.token_S[kept_idx]
    h_ND = run_experts(x_TD.index_select(0, token_N), routing.expert_S[kept_idx], counts)
    # gate and scatter in the input's dtype, so that autocast's bf16 matmuls give the same output dtype
    h_ND = h_ND.to(x_TD.dtype) * routing.gate_S[kept_idx].to(x_TD.dtype)[:, None]
    return torch.zeros_like(x_TD).index_add(0, token_N, h_ND)


# the experts' outputs for every slot in dispatch order: x_TD, each slot's token, the kept slots per expert
ExpertsOnRows = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def combine_on_device(
    x_TD: torch.Tensor, routing: Routing, kept: KeptSlots, run_experts: ExpertsOnRows
) -> torch.Tensor:
    """The sorted path without host reads: the experts see every slot in dispatch order (the kept ones in
    their blocks, the dropped ones after) and the dropped slots' outputs get a zero gate, so no tensor's size
    depends on the routing. Returns y_TD."""
    token_R = routing.token_S[kept.order_S]
    h_RD = run_experts(x_TD, token_R, kept.kept_E)
    kept_R = torch.arange(token_R.numel(), device=token_R.device) < kept.kept_E.sum()
    gate_R = torch.where(kept_R, routing.gate_S[kept.order_S], 0).to(x_TD.dtype)
    return torch.zeros_like(x_TD).index_add(0, token_R, h_RD.to(x_TD.dtype) * gate_R[:, None])


def dispatch_sorted(x_TD: torch.Tensor, routing: Routing, kept: KeptSlots, experts: Experts) -> torch.Tensor:
    """Sort + gather + grouped matmul + scatter-add."""
    return combine_sorted(x_TD, routing, kept, lambda x_ND, expert_N, counts: experts.forward_grouped(x_ND, counts))


def dispatch_grouped_mm(x_TD: torch.Tensor, routing: Routing, kept: KeptSlots, experts: Experts) -> torch.Tensor:
    """`sorted` with torch._grouped_mm over the expert blocks: the block offsets stay on the device, so on CUDA
    a forward never waits for the host."""
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

    return combine_on_device(x_TD, routing, kept, grouped)


def triton_supports(x_TD: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run on this input, or None."""
    # imported on first use: Triton reads TRITON_INTERPRET when the kernels are defined
    from moe_lab.moe import triton_kernels

    return triton_kernels.supports(x_TD)


def dispatch_triton(x_TD: torch.Tensor, routing: Routing, kept: KeptSlots, experts: Experts) -> torch.Tensor:
    """`sorted` with Triton kernels (moe_lab.moe.triton_kernels): the gather fused into the first grouped
    matmul, tiles laid out on the device, dropped slots never multiplied (the activation and expert dropout
    still run over their zero rows, so expert dropout draws for them too)."""
    problem = triton_supports(x_TD)
    if problem is not None:
        raise ValueError(f"backend=triton: {problem}; use backend=sorted")
    from moe_lab.moe.triton_kernels import grouped_ffn

    return combine_on_device(x_TD, routing, kept, lambda x, token_R, kept_E: grouped_ffn(x, token_R, kept_E, experts))


def dispatch_loop(x_TD: torch.Tensor, routing: Routing, kept: KeptSlots, experts: Experts) -> torch.Tensor:
    """One masked pass per expert."""
    y_TD = torch.zeros_like(x_TD)
    w_in, w_out = experts.w_in_EDH.unbind(0), experts.w_out_EFD.unbind(0)
    for e in range(routing.num_experts):
        idx = torch.nonzero((routing.expert_S == e) & kept.keep_S).squeeze(1)  # this expert's kept slots
        if idx.numel() == 0:
            continue
        token = routing.token_S[idx]
        h = experts.forward_one(x_TD[token], w_in[e], w_out[e]).to(x_TD.dtype)
        y_TD = y_TD.index_add(0, token, h * routing.gate_S[idx].to(x_TD.dtype)[:, None])
    return y_TD


def dispatch_einsum(x_TD: torch.Tensor, routing: Routing, kept: KeptSlots, experts: Experts) -> torch.Tensor:
    """GShard's one-hot dispatch and combine, one routing group at a time."""
    num_experts = routing.num_experts
    outputs = []
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
        # the kept slots are the first `capacity` of each expert, so their positions fit its buffer
        keep = kept.keep_S[s]
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
    return torch.cat(outputs)


# name -> backend: `dispatch_NAME` for each name of the one list, moe_lab.moe.config.BACKENDS (torch-free, so a
# configuration is checked without importing this module)
BACKENDS: dict[str, Backend] = {name: globals()[f"dispatch_{name}"] for name in config.BACKENDS}
