"""The cost of routing alone (no experts) per router: what BASE's auction adds to a training step."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe_lab.moe import MoEConfig, MoELayer
from moe_lab.moe.balanced import balanced_assignment

# (name, routing, top_k): the routers of the router-fluctuation study
ROUTERS = {
    "switch": ("token_choice", 1),
    "top2": ("token_choice", 2),
    "hash": ("hash", 1),
    "base": ("base", 1),
    "stablemoe": ("stablemoe", 1),
}


@dataclass
class RoutingRecord:
    """One timed row: milliseconds per training-mode routing of `tokens` tokens (median of repeats)."""

    router: str
    num_experts: int
    tokens: int
    d_model: int
    ms_median: float
    ms_min: float
    auction_rounds: int | None
    threads: int
    torch_version: str
    device: str


def bench_routing(
    experts: tuple[int, ...] = (8, 32, 64),
    tokens: tuple[int, ...] = (2048, 8192),
    routers: tuple[str, ...] = tuple(ROUTERS),
    d_model: int = 256,
    vocab_size: int = 32_000,
    repeats: int = 5,
    seed: int = 0,
    device: str = "cpu",
    on_record: Callable[[RoutingRecord], None] | None = None,
) -> list[RoutingRecord]:
    """Time `MoELayer.route` in train mode for every (router, E, T) on seeded inputs."""
    unknown = sorted(set(routers) - set(ROUTERS))
    if unknown:
        raise ValueError(f"unknown router(s) {unknown}; valid: {list(ROUTERS)}")
    records = []
    gen = torch.Generator().manual_seed(seed)
    for num_tokens in tokens:
        x = torch.randn(num_tokens, d_model, generator=gen).to(device)
        ids = torch.randint(vocab_size, (num_tokens,), generator=gen).to(device)
        for num_experts in experts:
            for name in routers:
                routing, top_k = ROUTERS[name]
                torch.manual_seed(seed)
                config = MoEConfig(
                    d_model=d_model, d_ff=4, num_experts=num_experts, top_k=top_k, routing=routing,
                    vocab_size=vocab_size,
                )  # fmt: skip
                layer = MoELayer(config).to(device).train()
                # routers start near uniform; scale the scores up so BASE's auction sees a real spread
                if hasattr(layer.router, "weight"):  # hash routing has no scores
                    with torch.no_grad():
                        layer.router.weight.mul_(10)
                times = []
                for _ in range(repeats + 1):  # the first call warms up
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        layer.route(x, ids)
                    if x.is_cuda:
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                rounds = None
                if routing == "base":
                    stats: dict = {}
                    with torch.no_grad():
                        balanced_assignment(layer.router(x)[0], config.base_tolerance, stats=stats)
                    rounds = stats["rounds"]
                record = RoutingRecord(
                    router=name,
                    num_experts=num_experts,
                    tokens=num_tokens,
                    d_model=d_model,
                    ms_median=1000 * statistics.median(times[1:]),
                    ms_min=1000 * min(times[1:]),
                    auction_rounds=rounds,
                    threads=torch.get_num_threads(),
                    torch_version=torch.__version__,
                    device=device,
                )
                records.append(record)
                if on_record is not None:
                    on_record(record)
    return records
