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
    backends = ["dense", "sorted", "loop", "einsum", "hf-mixtral", "hf-mixtral-grouped_mm"]
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
