"""The installed `moe-lab` command, invoked as a user would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli as run


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for command in ("pretrain", "finetune", "sweep", "report", "bench"):
        assert command in result.stdout


def test_bench_dispatch_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run(
        "bench", "dispatch", "--experts", "4,8", "--top-k", "1,2", "--tokens", "256", "--d-model", "16",
        "--d-ff", "32", "--repeats", "1", "--warmup", "0", "--threads", "1", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    records = json.loads(out.read_text())
    backends = ["dense", "sorted", "grouped_mm", "loop", "einsum", "hf-mixtral", "hf-mixtral-grouped_mm"]
    assert len(records) == 2 * 2 * len(backends)
    assert {r["backend"] for r in records} == set(backends)
    for r in records:
        assert {"backend", "num_experts", "top_k", "tokens_per_s", "ratio_to_dense"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["threads"] == 1  # --threads reached torch before timing
        dense = next(
            d for d in records
            if d["backend"] == "dense" and (d["num_experts"], d["top_k"]) == (r["num_experts"], r["top_k"])
        )  # fmt: skip
        assert r["ratio_to_dense"] == pytest.approx(dense["tokens_per_s"] / r["tokens_per_s"])
    assert "x dense" in result.stdout


def test_bench_rejects_an_unknown_backend() -> None:
    result = run("bench", "dispatch", "--backends", "sorted,warp", "--tokens", "64")
    assert result.returncode != 0
    assert "unknown backend(s) ['warp']" in result.stdout + result.stderr


def test_bench_times_bfloat16_and_refuses_rows_it_cannot_time() -> None:
    from moe_lab.bench.dispatch import bench_dispatch

    small = {"experts": (4,), "top_ks": (1,), "tokens": 64, "d_model": 16, "d_ff": 32, "repeats": 1, "warmup": 0}
    records = bench_dispatch(**small, backends=("sorted",), dtype="bfloat16")
    assert [(r.backend, r.dtype) for r in records] == [("dense", "bfloat16"), ("sorted", "bfloat16")]
    with pytest.raises(ValueError, match="backend triton cannot run on cpu in float32: the Triton kernels are timed"):
        bench_dispatch(**small, backends=("triton",))
    with pytest.raises(ValueError, match="multiple of 16 bytes: d_model=6"):
        bench_dispatch(**{**small, "d_model": 6}, backends=("grouped_mm",))
    with pytest.raises(ValueError, match=r"dtype='float64' is not one of \['float32', 'bfloat16', 'float16'\]"):
        bench_dispatch(**small, backends=("sorted",), dtype="float64")


def test_bench_capacity_factor_zero_is_dropless(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run(
        "bench", "dispatch", "--experts", "8", "--top-k", "2", "--tokens", "128", "--d-model", "8", "--d-ff", "8",
        "--capacity-factor", "0", "--backends", "sorted,einsum", "--repeats", "1", "--warmup", "0",
        "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    records = json.loads(out.read_text())
    assert [r["backend"] for r in records] == ["dense", "sorted", "einsum"]
    assert all(r["capacity_factor"] is None for r in records)
    assert [r["dropped_frac"] for r in records[1:]] == [0.0, 0.0]


def test_bench_parallel_counts_what_the_ranks_send(tmp_path: Path) -> None:
    """One process, DP=2 and EP=2 (gloo): the exchange's bytes are those of the slots each rank routes to the
    other's experts, counted here from the same layer and tokens routed on one process."""
    import torch

    from moe_lab.bench.parallel import _layer

    out = tmp_path / "parallel.json"
    spec = {"experts": 4, "top_k": 2, "tokens": 256, "d_model": 16, "d_ff": 32}
    result = run(
        "bench", "parallel", "--experts", "4", "--top-k", "2", "--tokens", "256", "--d-model", "16", "--d-ff", "32",
        "--repeats", "2", "--warmup", "1", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    one, dp, ep = json.loads(out.read_text())
    assert [r["layout"] for r in (one, dp, ep)] == ["one", "dp2", "ep2"] and [one["ranks"], dp["ranks"]] == [1, 2]
    assert all(r["step_ms_median"] > 0 and r["tokens_per_s"] > 0 for r in (one, dp, ep))

    layer = _layer(spec["experts"], spec["top_k"], spec["d_model"], spec["d_ff"], None)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    remote = 0
    for rank in (0, 1):  # rank r routes its half and holds experts [2r, 2r + 2)
        layer(x[rank * 128 : (rank + 1) * 128])
        remote += int((layer.last_expert_index // 2 != rank).sum())  # dropless: every slot is kept
    assert ep["exchange_bytes_per_step"] == 2 * remote * 16 * 4
    assert ep["all_to_all_bytes_per_s"] > 0 and ep["allreduce_bytes_per_step"] is None
    assert dp["allreduce_bytes_per_step"] == 4 * sum(p.numel() for p in layer.parameters())
    assert one["exchange_bytes_per_step"] is None and one["allreduce_bytes_per_step"] is None
    assert "all-to-all MB/s" in result.stdout
