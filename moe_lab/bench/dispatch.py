"""Forward+backward throughput of the MoE layer per dispatch backend, against the dense speed limit."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from moe_lab.moe import MoEConfig, MoELayer
from moe_lab.moe.dispatch import BACKENDS, triton_supports
from moe_lab.moe.experts import Experts, grouped_mm_supports

OUR_BACKENDS = tuple(BACKENDS)
PEERS = ("hf-mixtral", "hf-mixtral-grouped_mm")
ALL_BACKENDS = ("dense", *OUR_BACKENDS, *PEERS)
# the rows `moe-lab bench dispatch` times by default on each kind of device
DEFAULT_BACKENDS = {
    "cpu": ("dense", "sorted", "grouped_mm", "loop", "einsum", "hf-mixtral", "hf-mixtral-grouped_mm"),
    "cuda": ("dense", "sorted", "grouped_mm", "triton", "hf-mixtral-grouped_mm"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cannot_run(backend: str, config: MoEConfig, device: str, dtype: torch.dtype) -> str | None:
    """Why a row cannot be timed on this device and dtype, or None."""
    if backend in ("grouped_mm", "hf-mixtral-grouped_mm"):
        return grouped_mm_supports(dtype, config.d_model, config.d_ff)
    if backend == "triton":
        if not device.startswith("cuda"):
            return "the Triton kernels are timed on CUDA only (on CPU they run in Triton's interpreter, for tests)"
        return triton_supports(torch.empty(0, config.d_model, device=device, dtype=dtype))
    return None


@dataclass
class BenchRecord:
    """One timed row; `ratio_to_dense` = dense tokens/s / this row's tokens/s (1.0 = at the limit)."""

    backend: str
    num_experts: int
    top_k: int
    tokens: int
    d_model: int
    d_ff: int
    capacity_factor: float | None
    activation: str
    seconds_median: float
    seconds_min: float
    tokens_per_s: float
    ratio_to_dense: float
    dropped_frac: float | None
    threads: int
    torch_version: str
    device: str
    dtype: str = "float32"


class DenseFFN(nn.Module):
    """The speed limit: one dense FFN over the k*T routed token copies, the same FLOPs as the experts."""

    def __init__(self, d_model: int, d_ff: int, activation: str, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.ffn = Experts(1, d_model, d_ff, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_ND = x.reshape(-1, x.shape[-1]).repeat(self.top_k, 1)
        y_ND = self.ffn.forward_one(x_ND, self.ffn.w_in_EDH[0], self.ffn.w_out_EFD[0])
        return y_ND.view(self.top_k, *x.shape).sum(0)  # the combine: k outputs per token


def _hf_mixtral(d_model: int, d_ff: int, num_experts: int, top_k: int, implementation: str) -> nn.Module:
    """Hugging Face's Mixtral sparse MoE block from a small config (no download); dropless, SwiGLU."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=d_model,
        intermediate_size=d_ff,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        hidden_act="silu",
    )
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():  # its weights are allocated uninitialised outside from_pretrained
            p.normal_(std=p.shape[-1] ** -0.5)
    return block


def _dropped(module: nn.Module) -> float | None:
    return module.metrics("train")["dropped_frac"] if isinstance(module, MoELayer) else None


def _build(backend: str, config: MoEConfig, device: str, dtype: torch.dtype, seed: int) -> nn.Module:
    """The module a bench row times; every MoELayer row starts from the same seeded weights."""
    if backend == "dense":
        return DenseFFN(config.d_model, config.d_ff, config.activation, config.top_k).to(device, dtype)
    if backend in OUR_BACKENDS:
        torch.manual_seed(seed)
        return MoELayer(replace(config, backend=backend)).to(device, dtype)
    impl = "grouped_mm" if backend.endswith("grouped_mm") else "eager"
    return _hf_mixtral(config.d_model, config.d_ff, config.num_experts, config.top_k, impl).to(device, dtype)


def _time_interleaved(
    modules: dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Forward+backward seconds per module, in round-robin rounds so that drift in the machine's speed
    (shared CPUs, frequency scaling) falls on every row alike instead of on whichever ran last."""

    def step(module: nn.Module) -> float:
        t0 = time.perf_counter()
        xx = x.detach().requires_grad_()
        (module(xx) * grad).sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        module.zero_grad(set_to_none=True)
        return elapsed

    for _ in range(warmup):
        for module in modules.values():
            step(module)
    for module in modules.values():
        if isinstance(module, MoELayer):
            module.metrics("train")  # count drops over the timed steps only
    times: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(repeats):
        for name, module in modules.items():
            times[name].append(step(module))
    return times


def bench_dispatch(
    experts: tuple[int, ...] = (8, 32, 64),
    top_ks: tuple[int, ...] = (1, 2),
    tokens: int = 8192,
    d_model: int = 256,
    d_ff: int = 1024,
    capacity_factor: float | None = 1.25,
    activation: str = "swiglu",
    backends: tuple[str, ...] | None = None,
    repeats: int = 5,
    warmup: int = 2,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    on_record: Callable[[BenchRecord], None] | None = None,
) -> list[BenchRecord]:
    """Time forward+backward for every (E, k, backend); the dense row of each (E, k) sets the limit. The default
    rows are DEFAULT_BACKENDS of the device's kind."""
    if backends is None:
        backends = DEFAULT_BACKENDS["cuda" if device.startswith("cuda") else "cpu"]
    unknown = sorted(set(backends) - set(ALL_BACKENDS))
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; valid: {list(ALL_BACKENDS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {list(DTYPES)}")
    if "dense" not in backends:
        backends = ("dense", *backends)  # every ratio refers to it
    probe = MoEConfig(d_model=d_model, d_ff=d_ff)
    for backend in backends:
        problem = cannot_run(backend, probe, device, DTYPES[dtype])
        if problem is not None:
            raise ValueError(f"backend {backend} cannot run on {device} in {dtype}: {problem}")
    records: list[BenchRecord] = []
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, d_model, generator=gen).to(device, DTYPES[dtype])
    grad = torch.randn(1, tokens, d_model, generator=gen).to(device, DTYPES[dtype])
    for num_experts in experts:
        for top_k in top_ks:
            config = MoEConfig(
                d_model=d_model,
                d_ff=d_ff,
                num_experts=num_experts,
                top_k=top_k,
                train_capacity_factor=capacity_factor,
                activation=activation,
            )
            modules = {b: _build(b, config, device, DTYPES[dtype], seed) for b in backends}
            times = _time_interleaved(modules, x, grad, repeats, warmup)
            dense_tps = tokens / statistics.median(times["dense"])
            for backend, module in modules.items():
                median = statistics.median(times[backend])
                tps = tokens / median
                record = BenchRecord(
                    backend=backend,
                    num_experts=num_experts,
                    top_k=top_k,
                    tokens=tokens,
                    d_model=d_model,
                    d_ff=d_ff,
                    capacity_factor=capacity_factor,
                    activation=activation,
                    seconds_median=median,
                    seconds_min=min(times[backend]),
                    tokens_per_s=tps,
                    ratio_to_dense=dense_tps / tps,
                    dropped_frac=_dropped(module),
                    threads=torch.get_num_threads(),
                    torch_version=torch.__version__,
                    device=device,
                    dtype=dtype,
                )
                records.append(record)
                if on_record is not None:
                    on_record(record)
    return records


def write_json(records: list, path: Path) -> None:
    """Write dataclass records as a JSON list, with the machine they ran on in each record's `machine` key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine()}
    path.write_text(json.dumps([{**asdict(r), "machine": machine} for r in records], indent=2) + "\n")
