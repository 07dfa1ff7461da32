"""The Triton backend (moe_lab.moe.triton_kernels) against `sorted` and a float64 reference.

Without a CUDA device the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with one, the same tests run the compiled kernels on CUDA.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_layer, run_backend, run_cli
from tests.test_backends import assert_agree, assert_backends_agree, layer_cases, skewed_layer

pytest.importorskip("triton", reason="triton is not installed: pip install -e '.[gpu]'")

from moe_lab.moe import triton_kernels as tk  # after the skip: it needs triton

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def reference_rows(x, w_ENK, src, counts, num_rows):
    """float64 y[r] = x[src[r]] @ w[e(r)] by an explicit loop over experts; rows past the blocks are zero."""
    x, w = x.double(), w_ENK.double()
    gathered = x if src is None else x[src]
    y = torch.zeros(num_rows, w.shape[-1], dtype=torch.float64)
    start = 0
    for e, n in enumerate(counts):
        y[start : start + n] = gathered[start : start + n] @ w[e]
        start += n
    return y


@st.composite
def block_counts(draw):
    """Rows per expert: up to 128 experts, empty ones, one expert with every row, blocks over BLOCK_M rows."""
    num_experts = draw(st.sampled_from([1, 3, 8, 128]))
    shape = draw(st.sampled_from(["random", "one_takes_all", "mostly_empty"]))
    if shape == "random":  # at most ~600 rows: the interpreter runs a tile in numpy
        most = 150 if num_experts <= 3 else 70 if num_experts <= 8 else 4
        counts = draw(st.lists(st.integers(0, most), min_size=num_experts, max_size=num_experts))
    else:
        counts = [0] * num_experts
        hot = draw(st.integers(0, num_experts - 1))
        counts[hot] = draw(st.integers(1, 200))
        if shape == "mostly_empty" and num_experts > 1:
            counts[(hot + 1) % num_experts] = draw(st.integers(1, 70))
    return counts, draw(st.integers(0, 40))  # extra rows past the blocks (dropped slots)


@settings(max_examples=60, deadline=None)
@given(case=block_counts(), block_m=st.sampled_from([16, 64]))
def test_row_tiles_cover_each_row_once_inside_its_expert(case, block_m: int) -> None:
    counts, extra = case
    total = sum(counts) + extra
    tiles = tk.RowTiles.build(torch.tensor(counts), total, block_m)
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    covered = torch.zeros(total, dtype=torch.long)
    for e, r0, r1 in zip(tiles.expert.tolist(), tiles.row.tolist(), tiles.end.tolist(), strict=True):
        if r0 >= r1:
            continue  # past its expert's rows: the kernel returns
        rows = torch.arange(r0, min(r1, r0 + block_m))
        assert (expert_of_row[rows] == e).all()  # a tile never crosses into another expert
        covered[rows] += 1
    assert (covered[: sum(counts)] == 1).all()
    assert (covered[sum(counts) :] == 0).all()  # the dropped rows are never computed


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=block_counts(), gather=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_gathered_grouped_linear_matches_a_float64_loop(case, gather: bool, dtype: torch.dtype) -> None:
    """Forward and both gradients of one grouped matmul, against an explicit per-expert loop in float64."""
    counts, extra = case
    num_rows, (K, N) = sum(counts) + extra, (24, 40)  # widths that are no multiple of the blocks
    gen = torch.Generator().manual_seed(sum(counts) * 31 + extra)
    num_tokens = max(num_rows // 2, 1)
    x = torch.randn(num_tokens if gather else num_rows, K, generator=gen).to(dtype)
    w = torch.randn(len(counts), K, N, generator=gen).to(dtype)
    src = torch.randint(0, num_tokens, (num_rows,), generator=gen) if gather else None
    dy = torch.randn(num_rows, N, generator=gen).to(dtype)
    dy[sum(counts) :] = 0  # what the zero gate sends back for dropped rows

    xd, wd = x.to(DEVICE, copy=True).requires_grad_(), w.to(DEVICE, copy=True).requires_grad_()
    tiles = tk.RowTiles.build(torch.tensor(counts, device=DEVICE), num_rows)
    y = tk.GatheredGroupedLinear.apply(xd, wd, None if src is None else src.to(DEVICE), tiles, num_rows)
    y.backward(dy.to(DEVICE))

    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = reference_rows(x64, w64, src, counts, num_rows)
    if ref.requires_grad:  # not when every expert is empty: then both gradients are zero
        ref.backward(dy.double())
    assert (y[sum(counts) :] == 0).all()
    ref_dx = torch.zeros_like(x64) if x64.grad is None else x64.grad
    ref_dw = torch.zeros_like(w64) if w64.grad is None else w64.grad
    for got, want, name in ((y, ref, "y"), (xd.grad, ref_dx, "dx"), (wd.grad, ref_dw, "dw")):
        assert_agree(got.detach().cpu().float(), want.float(), dtype, name)


@st.composite
def triton_cases(draw):
    """layer_cases, with E up to 128 now and then and enough tokens to fill several BLOCK_M tiles."""
    case = draw(layer_cases())
    if draw(st.integers(0, 4)) == 0:
        case["config"]["num_experts"] = 128
    case["shape"] = (draw(st.integers(1, 2)), draw(st.sampled_from([7, 24, 96])))
    return case


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=triton_cases())
def test_triton_agrees_with_sorted_and_the_float64_reference(case: dict) -> None:
    """Same kept slots, outputs and gradients of input, router and experts as `sorted`, and as the einsum
    reference in float64: token and expert choice, k 1/2, both drop policies, dropless, routing groups, fp32
    and bf16."""
    assert_backends_agree(case, ("triton",), reference="sorted", device=DEVICE)
    assert_backends_agree(case, ("triton",), reference="einsum", device=DEVICE, float64_reference=True)


def test_triton_handles_empty_experts_and_one_expert_with_every_token() -> None:
    x = torch.randn(1, 96, 8).abs()  # positive, so a large weight row toward expert 0 wins for every token
    grad_out = torch.randn(1, 96, 8)
    for bias in (0.0, 50.0):  # spread, then every token's first choice is expert 0 (96 rows: two tiles)
        layer = skewed_layer(128, x, bias)
        ref = run_backend(layer, "sorted", x, grad_out)
        got = run_backend(layer.to(DEVICE), "triton", x.to(DEVICE), grad_out.to(DEVICE))
        for key in ("y", "x_grad", "router_grad", "w_in_grad", "w_out_grad"):
            torch.testing.assert_close(got[key].cpu(), ref[key], atol=1e-5, rtol=1e-4)


def test_triton_under_autocast_runs_in_autocasts_dtype_like_sorted() -> None:
    """bf16 autocast over an fp32 layer: the kernels get bf16 operands, as sorted's torch matmuls do."""
    torch.manual_seed(0)
    layer = make_layer(num_experts=4, top_k=2, train_capacity_factor=1.0, d_model=16, d_ff=32)
    x, grad_out = torch.randn(1, 48, 16), torch.randn(1, 48, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = run_backend(layer, "sorted", x, grad_out)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = run_backend(layer.to(DEVICE), "triton", x.to(DEVICE), grad_out.to(DEVICE))
    fp32 = run_backend(layer, "sorted", x, grad_out)
    for key in ("y", "x_grad", "w_in_grad", "w_out_grad"):
        assert_agree(got[key].cpu().float(), ref[key].float(), torch.bfloat16, key)
    # and not the fp32 result: the bf16 rounding shows at this size
    assert (got["y"].cpu().float() - fp32["y"]).abs().max() > 1e-4


def test_triton_refuses_what_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_layer(torch.float64).to(DEVICE)
    layer.backend = "triton"
    with pytest.raises(ValueError, match=r"take float32, bfloat16 or float16, not torch\.float64; use backend=sorted"):
        layer(torch.randn(1, 4, 8, dtype=torch.float64, device=DEVICE))
    x = torch.randn(4, 8)
    monkeypatch.setattr(tk, "INTERPRETING", False)
    assert tk.supports(x) == "the Triton kernels run on CUDA, or on CPU under TRITON_INTERPRET=1"
    monkeypatch.setattr(tk, "triton", None)
    assert tk.supports(x) == "triton is not installed (pip install 'moe-lab[gpu]')"


def test_pretraining_with_triton_follows_sorted(tmp_path: Path) -> None:
    """`moe-lab pretrain tiny moe.backend=triton`: the same losses, gradient norms and routing as sorted."""
    rows = {}
    for backend in ("sorted", "triton"):
        run_dir = tmp_path / backend
        device = [] if DEVICE == "cpu" else ["train.device=cuda"]
        result = run_cli(
            "pretrain", "tiny", f"moe.backend={backend}", "train.max_steps=10", f"run_dir={run_dir}",
            f"data.cache_dir={tmp_path / 'cache'}", "logger.progress=false", *device,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        with (run_dir / "metrics.csv").open() as f:
            rows[backend] = [r for r in csv.DictReader(f) if r["task_loss"] or r.get("val_loss")]
    assert len(rows["triton"]) == len(rows["sorted"]) >= 3
    for got, want in zip(rows["triton"], rows["sorted"], strict=True):
        for key in ("task_loss", "aux_loss", "grad_norm", "val_loss", "moe/1/dropped_frac", "moe/1/load_imbalance"):
            if want.get(key):
                assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-4, abs=1e-6), (want["step"], key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_auto_on_cuda_picks_triton_where_grouped_mm_cannot_run() -> None:
    layer = make_layer(d_model=6, d_ff=16, backend="auto").cuda()  # 24-byte rows: torch._grouped_mm refuses
    assert layer.resolve_backend(torch.randn(4, 6, device="cuda")) == "triton"
    layer = make_layer(d_model=64, d_ff=128, backend="auto").cuda()
    assert layer.resolve_backend(torch.randn(4, 64, device="cuda")) == "grouped_mm"
