"""What spreading one MoE layer over processes costs on this machine: a training step (forward, backward and
the gradient synchronisation) of one MoE layer for the same global batch in three layouts, on gloo:

- `one`: one process routes all T tokens through all E experts;
- `dp2`: 2 ranks each route T/2 tokens through a full copy of the experts, then average every gradient with
  one flat all-reduce (what DistributedDataParallel does, without its overlap);
- `ep2`: 2 ranks each route T/2 tokens and hold E/2 experts (moe_lab.moe.expert_parallel); the kept slots go
  to their experts' ranks and back with all_to_all_single, and only the router's gradient is all-reduced.

Each step is timed on every rank after a barrier and the slowest rank's time is the step's. For `ep2` the
bytes that the four exchanges of a step (two in forward, their reverses in backward) send to the other rank
are counted from the layer's kept slots, and all_to_all_single alone is timed on one exchange's worth of
rows: its bytes/s is what the exchange gets from this machine's gloo.

Every process runs `threads` torch threads, the one-process layout too: the comparison is what a second
process (and its cores) buys, and what the communication takes back.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_lab.moe import MoEConfig, MoELayer
from moe_lab.moe.expert_parallel import ExpertGroup, shard_experts

LAYOUTS = ("one", "dp2", "ep2")


@dataclass
class ParallelRecord:
    """One layout's training step of one MoE layer (median and best of the timed repeats)."""

    layout: str
    ranks: int
    num_experts: int
    top_k: int
    tokens: int  # the global batch, over all ranks
    d_model: int
    d_ff: int
    step_ms_median: float
    step_ms_min: float
    tokens_per_s: float
    # ep2: bytes one rank sends to the other per step (both exchanges, forward and backward), and the
    # bytes/s of all_to_all_single alone on that much data; dp2: bytes of the gradient all-reduce per step
    exchange_bytes_per_step: int | None
    all_to_all_bytes_per_s: float | None
    allreduce_bytes_per_step: int | None
    threads_per_rank: int
    torch_version: str
    device: str


def _layer(num_experts: int, top_k: int, d_model: int, d_ff: int, capacity_factor: float | None) -> MoELayer:
    config = MoEConfig(
        d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k, train_capacity_factor=capacity_factor,
        backend="sorted", activation="gelu",
    )  # fmt: skip
    torch.manual_seed(0)
    return MoELayer(config)


def _flat_all_reduce(grads: list[torch.Tensor], size: int) -> int:
    """Average `grads` over the ranks in one flat all-reduce; returns its bytes."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat.numel() * flat.element_size()


def _worker(rank: int, size: int, port: int, layout: str, spec: dict, out: str) -> None:
    torch.set_num_threads(spec["threads"])
    if size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=size)
    layer = _layer(spec["experts"], spec["top_k"], spec["d_model"], spec["d_ff"], spec["capacity_factor"])
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(spec["tokens"], spec["d_model"], generator=gen)
    per = spec["tokens"] // size
    x = x_all[rank * per : (rank + 1) * per].clone().requires_grad_(True)
    if layout == "ep2":
        group = ExpertGroup(rank, size, dist.new_group(list(range(size))))
        shard_experts(layer, group)
        mine = group.local_experts(spec["experts"])
    replicated = [p for n, p in layer.named_parameters() if layout != "ep2" or not n.startswith("experts.")]
    allreduce_bytes = 0

    def step() -> float:
        nonlocal allreduce_bytes
        layer.zero_grad(set_to_none=True)
        x.grad = None
        if size > 1:
            dist.barrier()
        t0 = time.perf_counter()
        y = layer(x)
        loss = y.pow(2).mean() + layer.last_losses.aux_loss
        loss.backward()
        if size > 1:
            grads = [p.grad for p in replicated if p.grad is not None]
            allreduce_bytes = _flat_all_reduce(grads, size)
        return (time.perf_counter() - t0) * 1000

    for _ in range(spec["warmup"]):
        step()
    times, remote = [], 0
    for _ in range(spec["repeats"]):
        times.append(step())
        if layout == "ep2":  # my kept slots whose expert another rank holds
            kept = layer.last_expert_index[layer.last_keep_TK]
            remote += int(((kept < mine.start) | (kept >= mine.stop)).sum())
    exchange_bytes = None
    if layout == "ep2":
        # a rank sends its remote slots (exchange 1) and returns the other's (exchange 2); backward sends both
        # again the other way: per step and rank, 2 x (both ranks' remote slots) rows of d_model floats
        both = torch.tensor([remote], dtype=torch.float64)
        dist.all_reduce(both)
        exchange_bytes = round(2 * float(both) / spec["repeats"] * spec["d_model"] * 4)
    slowest = torch.tensor(times, dtype=torch.float64)
    if size > 1:
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    a2a_rate = None
    if layout == "ep2":
        rows = max(1, exchange_bytes // 4 // (spec["d_model"] * 4))  # one exchange's rows to the other rank
        buf = torch.randn(rows * size, spec["d_model"])
        recv = torch.empty_like(buf)
        for _ in range(2):
            dist.all_to_all_single(recv, buf)
        rates = []
        for _ in range(spec["repeats"]):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_to_all_single(recv, buf)
            rates.append(rows * spec["d_model"] * 4 * (size - 1) / (time.perf_counter() - t0))
        a2a_rate = statistics.median(rates)
    if rank == 0:
        median = statistics.median(slowest.tolist())
        record = ParallelRecord(
            layout=layout, ranks=size, num_experts=spec["experts"], top_k=spec["top_k"], tokens=spec["tokens"],
            d_model=spec["d_model"], d_ff=spec["d_ff"], step_ms_median=median, step_ms_min=min(slowest.tolist()),
            tokens_per_s=spec["tokens"] / (median / 1000),
            exchange_bytes_per_step=exchange_bytes,
            all_to_all_bytes_per_s=a2a_rate, allreduce_bytes_per_step=allreduce_bytes if layout == "dp2" else None,
            threads_per_rank=spec["threads"], torch_version=torch.__version__, device="cpu",
        )  # fmt: skip
        Path(out).write_text(json.dumps(asdict(record)))
    if size > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_parallel(
    layouts: tuple[str, ...] = LAYOUTS,
    experts: int = 8,
    top_k: int = 2,
    tokens: int = 8192,
    d_model: int = 256,
    d_ff: int = 1024,
    capacity_factor: float | None = None,
    repeats: int = 5,
    warmup: int = 2,
    threads: int = 1,
    on_record: Callable[[ParallelRecord], None] | None = None,
) -> list[ParallelRecord]:
    """Time a training step of one MoE layer per layout (each in fresh processes, gloo on CPU)."""
    unknown = sorted(set(layouts) - set(LAYOUTS))
    if unknown:
        raise ValueError(f"unknown layout(s) {unknown}; valid: {list(LAYOUTS)}")
    if experts % 2 or tokens % 2:
        raise ValueError(f"--experts {experts} and --tokens {tokens} must be even to split over 2 ranks")
    spec = dict(
        experts=experts, top_k=top_k, tokens=tokens, d_model=d_model, d_ff=d_ff, capacity_factor=capacity_factor,
        repeats=repeats, warmup=warmup, threads=threads,
    )  # fmt: skip
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for layout in layouts:
            out = str(Path(tmp) / f"{layout}.json")
            size = 1 if layout == "one" else 2
            args = (size, _free_port(), layout, spec, out)
            if size == 1:
                _worker(0, *args)
            else:
                mp.start_processes(_worker, args=args, nprocs=size, start_method="spawn")
            record = ParallelRecord(**json.loads(Path(out).read_text()))
            records.append(record)
            if on_record is not None:
                on_record(record)
    return records
