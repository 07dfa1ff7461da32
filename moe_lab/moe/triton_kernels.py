"""Triton kernels for the experts' grouped matmuls: gather-GEMM forward, GEMM input gradient, grouped weight gradient.

The design is ScatterMoE's (Tan et al. 2024, "Scattered Mixture-of-Experts Implementation"): the rows (kept slots)
are sorted by expert, and each kernel reads a slot's token through an index instead of from a gathered copy, so
only indices are ever padded, never activations. The tiles of the row dimension are laid out per expert on the
device (`RowTiles`): the launch grid is a fixed bound (ceil(rows / BLOCK_M) + num_experts tiles, MegaBlocks'
bound for block-padded groups), and tiles past an expert's rows return at once, so nothing waits for the host.

Three kernels, one autograd Function (`GatheredGroupedLinear`):
- forward   y[r] = x[src[r]] @ w[e(r)]                       (`_rows_kernel`, with the gather)
- input     dx[src[r]] += dy[r] @ w[e(r)]^T                  (`_rows_kernel` on w's transposed strides, then a
                                                              scatter-add in torch: top-k tokens appear k times)
- weights   dw[e] = sum over e's rows r of x[src[r]]^T dy[r] (`_weight_grad_kernel`, one program per
                                                              (expert, K tile, N tile), looping over its rows)

Under `TRITON_INTERPRET=1` the kernels run on CPU tensors in Triton's numpy interpreter (the tests run them so).
The interpreter reads this module's environment when the kernels are defined, so import this module only after
setting it (moe_lab.moe.dispatch imports it on first use).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the optional [gpu] extra
    triton = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_M = 64  # rows per tile: the padding of each expert's block is at most BLOCK_M - 1 row indices

# Triton's interpreter (3.7 to 3.9) multiplies bfloat16 tiles as their raw uint16 bits (interpreter.py, create_dot), so
# under it the kernels widen each tile to float32 before tl.dot. On a GPU, tl.dot of bf16 tiles accumulates
# the exact bf16 x bf16 products in float32 too, so the widened product is the same arithmetic.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def supports(x: torch.Tensor) -> str | None:
    """Why the Triton backend cannot run on this input, or None."""
    if triton is None:
        return "triton is not installed (pip install 'moe-lab[gpu]')"
    if x.dtype not in DTYPES:
        return f"the Triton kernels take float32, bfloat16 or float16, not {x.dtype}"
    if INTERPRETING and x.is_cuda:
        return "TRITON_INTERPRET=1 runs the kernels on CPU tensors only; unset it to run them on CUDA"
    if not INTERPRETING and not x.is_cuda:
        return "the Triton kernels run on CUDA, or on CPU under TRITON_INTERPRET=1"
    return None


if triton is not None:

    @triton.jit
    def _sources(src_ptr, rows, row_ok, GATHER: tl.constexpr):
        """The rows of x that rows read: src[rows] with the gather, else rows themselves."""
        if GATHER:
            return tl.load(src_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        return rows.to(tl.int64)

    @triton.jit
    def _rows_kernel(
        x_ptr, src_ptr, w_ptr, y_ptr,
        tile_expert_ptr, tile_row_ptr, tile_end_ptr,
        N, K,
        stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_yn,
        GATHER: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """y[r, n] = sum_k x[src[r], k] * w[e, k, n] for the rows r of one tile of expert e."""
        tile = tl.program_id(0)
        row0 = tl.load(tile_row_ptr + tile)
        row_end = tl.load(tile_end_ptr + tile)
        if row0 >= row_end:  # a tile past its expert's rows: the grid is an upper bound
            return
        expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        src = _sources(src_ptr, rows, row_ok, GATHER)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(
                x_ptr + src[:, None] * stride_xm + ks[None, :] * stride_xk,
                mask=row_ok[:, None] & k_ok[None, :], other=0.0,
            )  # fmt: skip
            b = tl.load(
                w_ptr + expert * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                mask=k_ok[:, None] & col_ok[None, :], other=0.0,
            )  # fmt: skip
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b, input_precision=PRECISION)
        out = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _weight_grad_kernel(
        x_ptr, src_ptr, dy_ptr, dw_ptr, start_ptr, end_ptr,
        K, N,
        stride_xm, stride_xk, stride_dym, stride_dyn, stride_we, stride_wk, stride_wn,
        GATHER: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """dw[e, k, n] = sum over expert e's rows r of x[src[r], k] * dy[r, n]; zero for an expert with no row."""
        expert = tl.program_id(0)
        ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok, col_ok = ks < K, cols < N
        start = tl.load(start_ptr + expert)
        end = tl.load(end_ptr + expert)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for r0 in range(start, end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < end
            src = _sources(src_ptr, rows, row_ok, GATHER)
            a_t = tl.load(
                x_ptr + src[None, :] * stride_xm + ks[:, None] * stride_xk,
                mask=k_ok[:, None] & row_ok[None, :], other=0.0,
            )  # fmt: skip
            dy = tl.load(
                dy_ptr + rows.to(tl.int64)[:, None] * stride_dym + cols[None, :] * stride_dyn,
                mask=row_ok[:, None] & col_ok[None, :], other=0.0,
            )  # fmt: skip
            if UPCAST:
                a_t, dy = a_t.to(tl.float32), dy.to(tl.float32)
            acc += tl.dot(a_t, dy, input_precision=PRECISION)
        out = dw_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
        tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])


@dataclass
class RowTiles:
    """The row tiles of a grouped matmul, built on the device: tile t covers rows [row[t], end[t]) of expert
    expert[t] (at most BLOCK_M of them); tiles past the last expert's rows have row >= end. `start_E` and
    `end_E` bound each expert's rows."""

    expert: torch.Tensor
    row: torch.Tensor
    end: torch.Tensor
    start_E: torch.Tensor
    end_E: torch.Tensor

    @classmethod
    def build(cls, counts_E: torch.Tensor, num_rows: int, block_m: int = BLOCK_M) -> RowTiles:
        """Tiles for rows sorted by expert, counts_E[e] of them for expert e, inside num_rows rows in all."""
        num_experts = counts_E.numel()
        counts_E = counts_E.to(torch.int32)
        end_E = counts_E.cumsum(0, dtype=torch.int32)
        start_E = end_E - counts_E
        tiles_E = (counts_E + block_m - 1) // block_m
        tile_end_E = tiles_E.cumsum(0)
        # each expert adds at most one partial tile to ceil(rows / BLOCK_M)
        tile = torch.arange(triton.cdiv(num_rows, block_m) + num_experts, device=counts_E.device)
        expert = torch.searchsorted(tile_end_E, tile, right=True).clamp_(max=num_experts - 1)
        row = start_E[expert] + (tile - (tile_end_E - tiles_E)[expert]) * block_m
        return cls(expert.to(torch.int32), row.to(torch.int32), end_E[expert], start_E, end_E)


def _blocks(n: int, k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for an output width n and a reduction width k: powers of two, 16 (tl.dot's least) to
    128 and 64."""
    return min(128, max(16, triton.next_power_of_2(n))), min(64, max(16, triton.next_power_of_2(k)))


def _tf32_allowed() -> bool:
    try:
        return torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:  # torch refuses the legacy flag once its newer fp32_precision setting was used
        return torch.backends.cuda.matmul.fp32_precision == "tf32"


def _precision(dtype: torch.dtype) -> str | None:
    """tl.dot's input precision: float32 follows torch's own matmul setting (TF32 only where torch allows it),
    so the backends agree; 16-bit inputs leave it to Triton (whose default differs by GPU vendor)."""
    if dtype != torch.float32:
        return None
    return "tf32" if _tf32_allowed() else "ieee"


def _on_device(x: torch.Tensor):
    """Launch on x's GPU: Triton launches on the current device, whatever its arguments' device."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _rows(
    x: torch.Tensor, src: torch.Tensor | None, w_ENK: torch.Tensor, tiles: RowTiles, num_rows: int, transpose: bool
) -> torch.Tensor:
    """[num_rows, N] rows r of x[src[r]] @ w[e(r)] (w[e(r)]^T when transpose); rows past the tiles are zero."""
    w_strides = w_ENK.stride()
    if transpose:  # w[e]^T: swap the roles of w's last two dimensions
        w_strides = (w_strides[0], w_strides[2], w_strides[1])
    K, N = (w_ENK.shape[2], w_ENK.shape[1]) if transpose else (w_ENK.shape[1], w_ENK.shape[2])
    y = x.new_zeros(num_rows, N)
    block_n, block_k = _blocks(N, K)
    grid = (tiles.row.numel(), triton.cdiv(N, block_n))
    with _on_device(x):
        _rows_kernel[grid](
            x, src if src is not None else tiles.row, w_ENK, y,
            tiles.expert, tiles.row, tiles.end,
            N, K,
            x.stride(0), x.stride(1), *w_strides, y.stride(0), y.stride(1),
            GATHER=src is not None, UPCAST=INTERPRETING, PRECISION=_precision(x.dtype),
            BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k,
        )  # fmt: skip
    return y


def _weight_grad(
    x: torch.Tensor, src: torch.Tensor | None, dy: torch.Tensor, tiles: RowTiles, like_ENK: torch.Tensor
) -> torch.Tensor:
    """dw[e] = x[src[rows of e]]^T dy[rows of e], shaped and typed like `like_ENK`."""
    num_experts, K, N = like_ENK.shape
    dw = torch.empty_like(like_ENK)
    block_n, block_k = _blocks(N, K)
    grid = (num_experts, triton.cdiv(K, block_k), triton.cdiv(N, block_n))
    with _on_device(x):
        _weight_grad_kernel[grid](
            x, src if src is not None else tiles.start_E, dy, dw, tiles.start_E, tiles.end_E,
            K, N,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), *dw.stride(),
            GATHER=src is not None, UPCAST=INTERPRETING, PRECISION=_precision(x.dtype),
            BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k,
        )  # fmt: skip
    return dw


class GatheredGroupedLinear(torch.autograd.Function):
    """y[r] = x[src[r]] @ w[e(r)] over rows sorted by expert (src None: x's own rows); rows past the experts'
    blocks are zero."""

    @staticmethod
    def forward(ctx, x, w_ENK, src, tiles: RowTiles, num_rows: int):
        x, w_ENK = x.contiguous(), w_ENK.contiguous()
        ctx.save_for_backward(x, w_ENK, src)
        ctx.tiles = tiles
        return _rows(x, src, w_ENK, tiles, num_rows, transpose=False)

    @staticmethod
    def backward(ctx, dy):
        x, w_ENK, src = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx_rows = _rows(dy, None, w_ENK, ctx.tiles, dy.shape[0], transpose=True)
            dx = dx_rows if src is None else torch.zeros_like(x).index_add_(0, src, dx_rows)
        if ctx.needs_input_grad[1]:
            dw = _weight_grad(x, src, dy, ctx.tiles, w_ENK)
        return dx, dw, None, None, None


def grouped_ffn(x_TD: torch.Tensor, token_R: torch.Tensor, counts_E: torch.Tensor, experts) -> torch.Tensor:
    """The experts on rows token_R (sorted by expert, counts_E[e] kept rows for expert e first, then rows that
    are left at zero): gather-GEMM, activation, GEMM. Returns [rows, d_model] in x_TD's dtype, or in
    autocast's."""
    num_rows = token_R.numel()
    tiles = RowTiles.build(counts_E, num_rows)
    device = x_TD.device.type
    # under autocast, the matmuls run in autocast's dtype, as torch's own matmuls in `sorted` do
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_TD.dtype
    x_TD = x_TD.to(dtype)
    w_in, w_out = experts.w_in_EDH.to(dtype), experts.w_out_EFD.to(dtype)
    h_RH = GatheredGroupedLinear.apply(x_TD, w_in, token_R, tiles, num_rows)
    return GatheredGroupedLinear.apply(experts.hidden(h_RH), w_out, None, tiles, num_rows)
