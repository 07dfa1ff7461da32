"""The three dispatch backends agree: same kept tokens, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import make_layer, run_backend


def assert_agree(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, msg: str) -> None:
    """float32: elementwise. bfloat16: by relative norm within a few bf16 epsilons (2**-7 = 0.8%): sums over
    tokens in another order (per group in einsum, per expert elsewhere) differ by an ulp of the sum, 0.06
    at magnitude 16, and the router's gradient is a product of such sums. A wrong routing is off by O(1)."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4, msg=msg)
        return
    err = (got.float() - ref.float()).norm().item()
    assert err <= 3e-2 * ref.float().norm().item() + 1e-3, f"{msg}: relative error {err / ref.float().norm():.4f}"


@st.composite
def layer_cases(draw):
    num_experts = draw(st.integers(1, 8))
    routing = draw(st.sampled_from(["token_choice", "token_choice", "expert_choice"]))
    top_k = draw(st.integers(1, min(2, num_experts)))
    cf = draw(st.sampled_from([0.5, 0.75, 1.0, 1.25, 2.0, None]))
    if routing == "expert_choice" and cf is None:
        cf = 1.0
    return {
        "config": {
            "d_model": draw(st.sampled_from([4, 8, 16])),
            "d_ff": draw(st.sampled_from([8, 12])),
            "num_experts": num_experts,
            "top_k": top_k,
            "routing": routing,
            "train_capacity_factor": cf,
            "drop_policy": draw(st.sampled_from(["position", "priority"])),
            "renormalize_gates": draw(st.booleans()),
            "group_size": draw(st.sampled_from([None, None, 5, 16])),
            "activation": draw(st.sampled_from(["relu", "gelu", "geglu", "swiglu"])),
        },
        "shape": (draw(st.integers(1, 3)), draw(st.integers(1, 24))),
        "dtype": draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=layer_cases())
def test_backends_agree(case: dict) -> None:
    torch.manual_seed(case["seed"])
    dtype = case["dtype"]
    layer = make_layer(dtype, **case["config"])
    # a larger router init spreads the routing so capacity limits actually bite
    torch.nn.init.normal_(layer.router.weight, std=1.0)
    x = torch.randn(*case["shape"], case["config"]["d_model"]).to(dtype)
    grad_out = torch.randn(*case["shape"], case["config"]["d_model"])
    ref = run_backend(layer, "einsum", x, grad_out)
    for backend in ("loop", "sorted"):
        got = run_backend(layer, backend, x, grad_out)
        if ref["keep"] is not None:
            assert torch.equal(got["keep"], ref["keep"]), backend
        for key in ("y", "x_grad", "router_grad", "w_in_grad", "w_out_grad"):
            assert_agree(got[key], ref[key], dtype, f"{backend}: {key}")
        torch.testing.assert_close(got["losses"].aux_loss, ref["losses"].aux_loss)


@pytest.mark.parametrize("backend", ["sorted", "loop", "einsum"])
def test_dropped_token_outputs_zero(backend: str) -> None:
    layer = make_layer(top_k=1, train_capacity_factor=0.25, activation="relu")
    torch.nn.init.normal_(layer.router.weight, std=2.0)
    layer.backend = backend
    y = layer(torch.randn(2, 16, 8))
    dropped = ~layer.last_keep_TK[..., 0]
    assert dropped.any()
    assert torch.all(y[dropped] == 0)
    assert torch.all(y[~dropped].abs().sum(-1) > 0)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize(("backend", "builds_tec"), [("sorted", False), ("loop", False), ("einsum", True)])
def test_only_einsum_builds_a_tokens_experts_capacity_tensor(backend: str, builds_tec: bool) -> None:
    tokens, experts, capacity = 512, 16, 64  # top-1, cf 2.0: capacity = 2 * 512 / 16
    layer = make_layer(d_model=4, d_ff=4, num_experts=experts, top_k=1, train_capacity_factor=2.0)
    layer.backend = backend
    x = torch.randn(1, tokens, 4, requires_grad=True)
    with _LargestTensor() as mode:
        layer(x).sum().backward()
    assert (mode.largest >= tokens * experts * capacity) == builds_tec, mode.largest
