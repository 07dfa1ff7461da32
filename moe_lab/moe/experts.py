"""The experts: E feed-forward networks with stacked weights, run in the layouts the backends need."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GATED = {"geglu": F.gelu, "swiglu": F.silu}
PLAIN = {"relu": F.relu, "gelu": F.gelu}
# d act(z) / dz times a gradient, as torch's own backward kernels compute it (F.gelu is the exact, erf form)
ACT_BACKWARD = {
    "relu": lambda grad, z: torch.ops.aten.threshold_backward(grad, z, 0),
    "gelu": lambda grad, z: torch.ops.aten.gelu_backward(grad, z),
    "geglu": lambda grad, z: torch.ops.aten.gelu_backward(grad, z),
    "swiglu": lambda grad, z: torch.ops.aten.silu_backward(grad, z),
}


class Experts(nn.Module):
    """E FFNs, w_in [E, D, H] and w_out [E, F, D]; H = 2F for gated units (GEGLU, SwiGLU)."""

    def __init__(
        self, num_experts: int, d_model: int, d_ff: int, activation: str = "geglu", dropout: float = 0.0
    ) -> None:
        super().__init__()
        if activation not in GATED and activation not in PLAIN:
            raise ValueError(f"activation={activation!r} is not one of {sorted({**GATED, **PLAIN})}")
        self.num_experts = num_experts
        self.d_ff = d_ff
        self.activation = activation
        self.gated = activation in GATED
        self.act = GATED.get(activation) or PLAIN[activation]
        hidden = 2 * d_ff if self.gated else d_ff
        self.w_in_EDH = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fan-in scaled normal init (T5/Mesh TensorFlow): std = fan_in ** -0.5."""
        nn.init.normal_(self.w_in_EDH, std=self.w_in_EDH.shape[1] ** -0.5)
        nn.init.normal_(self.w_out_EFD, std=self.w_out_EFD.shape[1] ** -0.5)

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Activation (gated or not) and expert dropout on pre-activations [..., H] -> [..., F]."""
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.dropout(h)

    def forward_padded(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Every expert on its own fixed-size buffer: two batched matmuls."""
        return torch.bmm(self.hidden(torch.bmm(x_ECD, self.w_in_EDH)), self.w_out_EFD)

    def forward_one(self, x_ND: torch.Tensor, w_in_DH: torch.Tensor, w_out_FD: torch.Tensor) -> torch.Tensor:
        """One expert, given its weights (slices from `unbind`, never `w[e]`: see forward_grouped)."""
        return self.hidden(x_ND @ w_in_DH) @ w_out_FD

    def forward_grouped_mm(self, x_ND: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """Grouped matmul on the device: rows sorted by expert, expert e's rows end at offsets_E[e] (int32
        cumulative counts). Two torch._grouped_mm calls, no host sync; fp32, bf16 or fp16, with every row
        a multiple of 16 bytes (`grouped_mm_supports`)."""
        h = torch._grouped_mm(x_ND, self.w_in_EDH.to(x_ND.dtype), offs=offsets_E)
        return torch._grouped_mm(self.hidden(h), self.w_out_EFD.to(x_ND.dtype), offs=offsets_E)

    def forward_grouped(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Grouped matmul: rows sorted by expert, counts[e] contiguous rows for expert e.

        Without expert dropout or autocast, one autograd Function (`_GroupedFFN`) loops over the experts in
        forward and backward and writes every block's result into one preallocated tensor. Otherwise the
        weights are split with one `unbind`, whose backward stacks the E gradients once (indexing `w[e]` per
        expert would build a full [E, D, H] gradient for every expert).
        """
        active = [e for e, n in enumerate(counts) if n > 0]
        if not active:
            # no rows: still a function of x_ND, so a backward through it always runs (expert parallelism
            # needs this: a rank whose experts got no row must still run its exchanges' backward)
            return x_ND.new_zeros(0, self.w_out_EFD.shape[-1]) + x_ND.sum() * 0
        dropout = self.training and self.dropout.p > 0
        if not dropout and not torch.is_autocast_enabled(x_ND.device.type):
            return _GroupedFFN.apply(x_ND, self.w_in_EDH, self.w_out_EFD, counts, self)
        w_in = self.w_in_EDH.unbind(0)
        w_out = self.w_out_EFD.unbind(0)
        x_chunks = x_ND.split(counts)
        # the whole FFN per block, then one concatenation of the [N, D] outputs: running the
        # activation over one [N, H] tensor instead was 1.5x slower on CPU (memory-bound, cache-cold)
        return torch.cat([self.forward_one(x_chunks[e], w_in[e], w_out[e]) for e in active])


class _GroupedFFN(torch.autograd.Function):
    """The experts' FFNs over contiguous blocks of rows, forward and backward as loops over the experts.

    Autograd through a per-expert loop spends a fifth of a CPU step at E=64 concatenating: the [E, D, H] and
    [E, F, D] weight gradients stacked from E slices, and each gated block's [n, H] input gradient from its two
    halves. Here every matmul writes into its slice of one preallocated tensor (torch.mm(..., out=)), and the
    activation's gradient comes from torch's own backward kernels (ACT_BACKWARD)."""

    @staticmethod
    def forward(ctx, x_ND, w_in_EDH, w_out_EFD, counts: list[int], experts: Experts):
        x_ND = x_ND.contiguous()
        h_NH = x_ND.new_empty(x_ND.shape[0], w_in_EDH.shape[-1])
        y_ND = x_ND.new_empty(x_ND.shape[0], w_out_EFD.shape[-1])
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                torch.mm(x_ND[rows], w_in_EDH[e], out=h_NH[rows])
                torch.mm(experts.hidden(h_NH[rows]), w_out_EFD[e], out=y_ND[rows])
                start += n
        ctx.save_for_backward(x_ND, w_in_EDH, w_out_EFD, h_NH)
        ctx.counts, ctx.experts = counts, experts
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND):
        x_ND, w_in_EDH, w_out_EFD, h_NH = ctx.saved_tensors
        experts, act_backward = ctx.experts, ACT_BACKWARD[ctx.experts.activation]
        dy_ND = dy_ND.contiguous()
        want_dx, want_dw_in, want_dw_out = ctx.needs_input_grad[:3]  # frozen experts need no weight gradients
        dx_ND = torch.empty_like(x_ND) if want_dx else None
        dw_in = torch.empty_like(w_in_EDH) if want_dw_in else None
        dw_out = torch.empty_like(w_out_EFD) if want_dw_out else None
        d_ff = w_out_EFD.shape[1]
        start = 0
        for e, n in enumerate(ctx.counts):
            if not n:  # an expert with no row
                for dw in (dw_in, dw_out):
                    if dw is not None:
                        dw[e].zero_()
                continue
            rows = slice(start, start + n)
            start += n
            h, dy = h_NH[rows], dy_ND[rows]
            da = dy @ w_out_EFD[e].t()
            dh = torch.empty_like(h)
            if experts.gated:  # a = act(gate) * up
                gate, up = h[:, :d_ff], h[:, d_ff:]
                act_gate = experts.act(gate)
                if dw_out is not None:
                    torch.mm((act_gate * up).t(), dy, out=dw_out[e])
                torch.mul(da, act_gate, out=dh[:, d_ff:])
                dh[:, :d_ff] = act_backward(da * up, gate)
            else:
                if dw_out is not None:
                    torch.mm(experts.act(h).t(), dy, out=dw_out[e])
                dh.copy_(act_backward(da, h))
            if dw_in is not None:
                torch.mm(x_ND[rows].t(), dh, out=dw_in[e])
            if dx_ND is not None:
                torch.mm(dh, w_in_EDH[e].t(), out=dx_ND[rows])
        return dx_ND, dw_in, dw_out, None, None


def grouped_mm_supports(dtype: torch.dtype, d_model: int, d_ff: int) -> str | None:
    """Why torch._grouped_mm cannot run these experts, or None: it takes fp32/bf16/fp16 matrices whose rows
    (d_model, the input width H and d_ff) are multiples of 16 bytes (torch's own check)."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"torch._grouped_mm takes float32, bfloat16 or float16, not {dtype}"
    size = torch.empty((), dtype=dtype).element_size()
    bad = [f"{name}={n}" for name, n in (("d_model", d_model), ("d_ff", d_ff)) if n * size % 16]
    if bad:
        return f"torch._grouped_mm needs rows of a multiple of 16 bytes: {', '.join(bad)} at {size} bytes per {dtype}"
    return None
