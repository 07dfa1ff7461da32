"""Expert parallelism: each of P ranks holds num_experts / P experts and the ranks exchange token slots.

Every rank routes its own tokens with the full (replicated) router, in its own routing groups, and keeps
the slots the single-process semantics keep: capacity is counted per routing group, and a group never
straddles ranks, so a rank's kept slots are what one process routing the same group would keep. Then
(GShard's dispatch / combine all-to-all, Lepikhin et al. 2021, here with uneven splits):

1. the kept slots, sorted by expert, are counted per expert; one all_to_all_single of the [E] counts tells
   every rank how many rows each source sends to each of its local experts;
2. the slots' token vectors go to their experts' ranks (all_to_all_single, uneven splits; the list form
   of all_to_all fails on gloo), are regrouped by local expert, run through the local experts with the
   same grouped matmul as the `sorted` backend, put back in arrival order and sent back;
3. each rank gates its slots and scatter-adds them into its tokens, as `sorted` does.

Both exchanges are differentiable (`exchange` runs the reverse exchange in backward), so an expert's
gradient sums the contributions of every rank's tokens (a small autograd Function over the public, blocking
c10d all_to_all_single, rather than the private functional-collectives one). Every rank must run both
exchanges' backward, also a rank none of whose experts got a row (Experts.forward_grouped keeps an empty
result in its input's graph for this).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from moe_lab.moe.dispatch import combine_sorted
from moe_lab.moe.experts import Experts
from moe_lab.moe.routing import KeptSlots, Routing, count

if TYPE_CHECKING:
    from moe_lab.moe.layer import MoELayer


@dataclass(frozen=True)
class ExpertGroup:
    """The ranks that share one set of experts: this rank holds experts [rank * E / P, (rank + 1) * E / P)."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None  # None: the default (world) group

    def local_experts(self, num_experts: int) -> range:
        if num_experts % self.size:
            raise ValueError(f"{num_experts} experts do not split over {self.size} expert-parallel ranks")
        per = num_experts // self.size
        return range(self.rank * per, (self.rank + 1) * per)


def local_experts(experts: Experts, group: ExpertGroup) -> Experts:
    """A copy of this rank's slice of `experts` (the others' weights are dropped)."""
    mine = group.local_experts(experts.num_experts)
    out = Experts(len(mine), experts.w_in_EDH.shape[1], experts.d_ff, experts.activation, experts.dropout.p)
    with torch.no_grad():
        out.w_in_EDH.copy_(experts.w_in_EDH[mine.start : mine.stop])
        out.w_out_EFD.copy_(experts.w_out_EFD[mine.start : mine.stop])
    return out.to(experts.w_in_EDH.device)


def shard_experts(layer: MoELayer, group: ExpertGroup) -> MoELayer:
    """Make `layer` expert-parallel over `group` in place: it keeps this rank's experts and dispatches over the
    group's ranks. The router and everything else stay whole (replicated)."""
    layer.experts = local_experts(layer.experts, group)
    layer.expert_group = group
    return layer


class _Exchange(torch.autograd.Function):
    """all_to_all_single of rows with uneven splits; backward sends the gradients back the other way."""

    @staticmethod
    def forward(ctx, x_ND, recv_splits, send_splits, group):
        ctx.splits, ctx.group = (recv_splits, send_splits), group
        out = x_ND.new_empty((sum(recv_splits), *x_ND.shape[1:]))
        dist.all_to_all_single(out, x_ND.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_MD):
        recv_splits, send_splits = ctx.splits
        back = grad_MD.new_empty((sum(send_splits), *grad_MD.shape[1:]))
        dist.all_to_all_single(back, grad_MD.contiguous(), send_splits, recv_splits, group=ctx.group)
        return back, None, None, None


def exchange(
    x_ND: torch.Tensor, recv_splits: list[int], send_splits: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Send send_splits[r] rows of x_ND to rank r and receive recv_splits[r] rows from it, differentiably."""
    return _Exchange.apply(x_ND, recv_splits, send_splits, group)


def dispatch_expert_parallel(
    x_TD: torch.Tensor, routing: Routing, kept: KeptSlots, experts: Experts, group: ExpertGroup
) -> torch.Tensor:
    """The `sorted` backend with the experts spread over `group`'s ranks. Returns y_TD."""
    num_experts, P = routing.num_experts, group.size
    per = num_experts // P

    def exchanged(x_ND: torch.Tensor, expert_N: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # 1. rows per (destination rank, its local expert), and what every source sends to mine
        counts_E = count(expert_N, num_experts)
        recv_PE = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_PE, counts_E, group=group.group)
        recv_PE = recv_PE.view(P, per)  # [source, my local expert]
        send_splits = [sum(counts[r * per : (r + 1) * per]) for r in range(P)]
        recv_splits = recv_PE.sum(1).tolist()
        # 2. there: regroup by local expert, run, restore arrival order; and back
        x_MD = exchange(x_ND, recv_splits, send_splits, group.group)
        expert_M = torch.arange(per, device=x_ND.device).repeat(P).repeat_interleave(recv_PE.flatten())
        order = torch.argsort(expert_M, stable=True)
        h_MD = experts.forward_grouped(x_MD.index_select(0, order), recv_PE.sum(0).tolist())
        h_MD = h_MD.index_select(0, torch.argsort(order))  # arrival order again
        return exchange(h_MD, send_splits, recv_splits, group.group)

    # 3. gate and scatter-add, as `sorted` does
    return combine_sorted(x_TD, routing, kept, exchanged)
