"""Expert parallelism on 2 gloo processes: an EP layer gives the one-process layer's outputs, kept slots and gradients.

The one-process layer routes both ranks' tokens, with `group_size` = one rank's tokens so that its routing
groups are the ranks' own; each rank then holds half the experts (moe_lab.moe.expert_parallel)."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_lab.moe import MoEConfig, MoELayer
from moe_lab.moe.expert_parallel import ExpertGroup, shard_experts

TOKENS = 24  # per rank
CASES = [
    {"top_k": k, "drop_policy": policy, "train_capacity_factor": cf}
    for k, policy, cf in itertools.product((1, 2), ("position", "priority"), (0.75, None))
]


def _grads(layer: MoELayer) -> dict[str, torch.Tensor]:
    return {
        "router": layer.router.weight.grad.clone(),
        "w_in": layer.experts.w_in_EDH.grad.clone(),
        "w_out": layer.experts.w_out_EFD.grad.clone(),
    }


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    worst: dict[str, float] = {}
    try:
        for i, case in enumerate(CASES):
            torch.manual_seed(i)
            config = MoEConfig(d_model=8, d_ff=16, num_experts=4, group_size=TOKENS, **case)
            full = MoELayer(config)
            x = torch.randn(2 * TOKENS, 8)
            grad_out = torch.randn(2 * TOKENS, 8)
            ep = copy.deepcopy(full)

            xr = x.clone().requires_grad_()  # the one-process reference over both ranks' tokens
            y_ref = full(xr)
            ((y_ref * grad_out).sum() + full.last_losses.aux_loss).backward()
            ref = _grads(full)

            shard_experts(ep, ExpertGroup(rank, 2))
            mine = slice(rank * TOKENS, (rank + 1) * TOKENS)
            xe = x[mine].clone().requires_grad_()
            y = ep(xe)
            # the reference's aux loss is the mean over its groups, one per rank: each rank adds its half
            ((y * grad_out[mine]).sum() + ep.last_losses.aux_loss / 2).backward()
            got = _grads(ep)
            dist.all_reduce(got["router"])  # the router is replicated: its gradient sums the ranks'
            experts = slice(rank * 2, rank * 2 + 2)
            keep_ref = full.last_keep_TK[mine]
            assert torch.equal(ep.last_keep_TK, keep_ref), case
            diffs = {
                "y": (y - y_ref[mine]).abs().max(),
                "x_grad": (xe.grad - xr.grad[mine]).abs().max(),
                "router": (got["router"] - ref["router"]).abs().max(),
                "w_in": (got["w_in"] - ref["w_in"][experts]).abs().max(),
                "w_out": (got["w_out"] - ref["w_out"][experts]).abs().max(),
            }
            for name, value in diffs.items():
                worst[name] = max(worst.get(name, 0.0), float(value.detach()))
            worst["dropped"] = max(worst.get("dropped", 0.0), float((~keep_ref).float().mean()))
    finally:
        dist.destroy_process_group()
    Path(f"{out}.{rank}").write_text(json.dumps(worst))


def test_two_rank_expert_parallel_layer_is_the_one_process_layer(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path / "worst")), nprocs=2, join=True)
    for rank in (0, 1):
        worst = json.loads((tmp_path / f"worst.{rank}").read_text())
        assert worst.pop("dropped") > 0  # CF 0.75 drops: the keep rule was exercised
        assert max(worst.values()) < 1e-5, worst


def test_experts_must_split_over_the_ranks() -> None:
    with pytest.raises(ValueError, match="4 experts do not split over 3 expert-parallel ranks"):
        ExpertGroup(0, 3).local_experts(4)
