"""`moe-lab bench`: benchmarks of the MoE core, each a table on the terminal and its records as JSON."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Benchmarks of the MoE core (JSON output).", no_args_is_help=True)
console = Console()


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{name} takes comma-separated integers, got {text!r}") from None


def _bench_table(title: str, columns: tuple[str, ...], threads: int) -> Table:
    """Set torch's thread count (0 keeps its default) and start a bench's table, first column left-aligned."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    return table


def _run_bench(run: Callable[[], list], table: Table, json_path: Path | None) -> None:
    """Run a benchmark, print its table and write its records as JSON if asked; a bad option is BadParameter."""
    from moe_lab.bench.dispatch import write_json

    try:
        records = run()
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    console.print(table)
    if json_path is not None:
        write_json(records, json_path)
        console.print(f"wrote {json_path}")


@app.command("dispatch")
def bench_dispatch_cmd(
    experts: Annotated[str, typer.Option(help="numbers of experts, comma-separated")] = "8,32,64",
    top_k: Annotated[str, typer.Option(help="top-k values, comma-separated")] = "1,2",
    tokens: Annotated[int, typer.Option(help="tokens per forward")] = 8192,
    d_model: Annotated[int, typer.Option()] = 256,
    d_ff: Annotated[int, typer.Option()] = 1024,
    capacity_factor: Annotated[float, typer.Option(help="train capacity factor; 0 = dropless")] = 1.25,
    activation: Annotated[str, typer.Option(help="relu, gelu, geglu or swiglu (Mixtral's)")] = "swiglu",
    backends: Annotated[
        str, typer.Option(help="comma-separated rows to time; default: the device's rows (see docs/benchmarks.md)")
    ] = "",
    repeats: Annotated[int, typer.Option(help="timed repeats per row (the median is reported)")] = 5,
    warmup: Annotated[int, typer.Option()] = 2,
    threads: Annotated[int, typer.Option(help="torch threads; 0 = torch's default")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    json_path: Annotated[Path | None, typer.Option("--json", help="write the records here")] = None,
) -> None:
    """Time forward+backward of the MoE layer per dispatch backend against a dense FFN of equal FLOPs."""
    from moe_lab.bench.dispatch import bench_dispatch

    table = _bench_table(
        f"MoE dispatch, fwd+bwd, T={tokens}, d={d_model}, d_ff={d_ff}, {activation}, {dtype} on {device}",
        ("backend", "E", "k", "tokens/s", "x dense", "dropped"),
        threads,
    )

    def show(r) -> None:
        ratio = f"{r.ratio_to_dense:.2f}"
        dropped = "-" if r.dropped_frac is None else f"{r.dropped_frac:.1%}"
        table.add_row(r.backend, str(r.num_experts), str(r.top_k), f"{r.tokens_per_s:,.0f}", ratio, dropped)
        console.print(f"  {r.backend:<22} E={r.num_experts:<3} k={r.top_k} {r.tokens_per_s:>10,.0f} tok/s  x{ratio}")

    _run_bench(
        lambda: bench_dispatch(
            experts=_ints(experts, "--experts"),
            top_ks=_ints(top_k, "--top-k"),
            tokens=tokens,
            d_model=d_model,
            d_ff=d_ff,
            capacity_factor=capacity_factor or None,
            activation=activation,
            backends=tuple(b.strip() for b in backends.split(",") if b.strip()) or None,
            repeats=repeats,
            warmup=warmup,
            device=device,
            dtype=dtype,
            on_record=show,
        ),
        table,
        json_path,
    )


@app.command("routing")
def bench_routing_cmd(
    experts: Annotated[str, typer.Option(help="numbers of experts, comma-separated")] = "8,32,64",
    tokens: Annotated[str, typer.Option(help="tokens per routing call, comma-separated")] = "2048,8192",
    routers: Annotated[str, typer.Option(help="switch, top2, hash, base, stablemoe (comma-separated)")] = (
        "switch,top2,hash,base,stablemoe"
    ),
    repeats: Annotated[int, typer.Option(help="timed repeats per row (the median is reported)")] = 5,
    threads: Annotated[int, typer.Option(help="torch threads; 0 = torch's default")] = 0,
    device: Annotated[str, typer.Option()] = "cpu",
    json_path: Annotated[Path | None, typer.Option("--json", help="write the records here")] = None,
) -> None:
    """Time routing alone (no experts) per router, in training mode: the price of BASE's auction."""
    from moe_lab.bench.routing import bench_routing

    table = _bench_table(
        "routing only, training mode, d_model 256", ("router", "E", "tokens", "ms", "auction rounds"), threads
    )

    def show(r) -> None:
        rounds = "-" if r.auction_rounds is None else str(r.auction_rounds)
        table.add_row(r.router, str(r.num_experts), str(r.tokens), f"{r.ms_median:.2f}", rounds)
        console.print(f"  {r.router:<10} E={r.num_experts:<3} T={r.tokens:<6} {r.ms_median:>9.2f} ms")

    _run_bench(
        lambda: bench_routing(
            experts=_ints(experts, "--experts"),
            tokens=_ints(tokens, "--tokens"),
            routers=tuple(r.strip() for r in routers.split(",") if r.strip()),
            repeats=repeats,
            device=device,
            on_record=show,
        ),
        table,
        json_path,
    )


@app.command("parallel")
def bench_parallel_cmd(
    layouts: Annotated[str, typer.Option(help="one, dp2, ep2 (comma-separated)")] = "one,dp2,ep2",
    experts: Annotated[int, typer.Option()] = 8,
    top_k: Annotated[int, typer.Option()] = 2,
    tokens: Annotated[int, typer.Option(help="the global batch's tokens, split over the ranks")] = 8192,
    d_model: Annotated[int, typer.Option()] = 256,
    d_ff: Annotated[int, typer.Option()] = 1024,
    capacity_factor: Annotated[float, typer.Option(help="train capacity factor; 0 = dropless")] = 0.0,
    repeats: Annotated[int, typer.Option(help="timed steps (the median is reported)")] = 5,
    warmup: Annotated[int, typer.Option()] = 2,
    threads: Annotated[int, typer.Option(help="torch threads per process")] = 1,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the records here")] = None,
) -> None:
    """Time a training step of one MoE layer in one process, data parallel over 2 and expert parallel over 2
    (gloo on CPU), with the exchange's bytes and all_to_all_single's bytes/s."""
    from moe_lab.bench.parallel import bench_parallel

    table = _bench_table(
        f"one MoE layer, fwd+bwd+grad sync, T={tokens}, E={experts}, k={top_k}, d={d_model}, d_ff={d_ff}",
        ("layout", "ranks", "step ms", "tokens/s", "exchange MB/step", "all-to-all MB/s", "all-reduce MB/step"),
        0,
    )

    def mb(value: float | None) -> str:
        return "-" if value is None else f"{value / 1e6:.2f}"

    def show(r) -> None:
        table.add_row(
            r.layout, str(r.ranks), f"{r.step_ms_median:.1f}", f"{r.tokens_per_s:,.0f}",
            mb(r.exchange_bytes_per_step), mb(r.all_to_all_bytes_per_s), mb(r.allreduce_bytes_per_step),
        )  # fmt: skip
        console.print(f"  {r.layout:<4} {r.step_ms_median:>8.1f} ms/step {r.tokens_per_s:>10,.0f} tok/s")

    _run_bench(
        lambda: bench_parallel(
            layouts=tuple(x.strip() for x in layouts.split(",") if x.strip()),
            experts=experts,
            top_k=top_k,
            tokens=tokens,
            d_model=d_model,
            d_ff=d_ff,
            capacity_factor=capacity_factor or None,
            repeats=repeats,
            warmup=warmup,
            threads=threads,
            on_record=show,
        ),
        table,
        json_path,
    )
