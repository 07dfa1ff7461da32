"""The three dispatch backends agree: same kept tokens, outputs and gradients."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from moe_lab.moe import MoELayer
from tests.conftest import DeviceSyncs, HostReads, make_layer, run_backend


def assert_agree(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, msg: str, noise: float = 0.0) -> None:
    """float32: elementwise. bfloat16: by relative norm within a few bf16 epsilons (2**-7 = 0.8%): sums over
    tokens in another order (per group in einsum, per expert elsewhere) differ by an ulp of the sum, 0.06
    at magnitude 16, and the router's gradient is a product of such sums. A wrong routing is off by O(1).
    `noise` is the reference backend's own bf16 error against float64: where a result cancels (the router's
    gradient is a difference of the experts' outputs), bf16 resolves it no better, so twice that is allowed."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4, msg=msg)
        return
    err = (got.float() - ref.float()).norm().item()
    bound = 3e-2 * ref.float().norm().item() + 2 * noise + 1e-3
    assert err <= bound, f"{msg}: error {err:.2e} > {bound:.2e} (relative {err / ref.float().norm():.4f})"


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


def assert_backends_agree(
    case: dict, backends: tuple[str, ...], reference: str, device: str = "cpu", float64_reference: bool = False
) -> None:
    """Each backend keeps the reference's slots and gives its outputs, gradients and aux loss on the case, on
    `device`; with float64_reference, the reference runs on CPU in float64 (the router stays in float32, its
    configured dtype, so both route alike)."""
    torch.manual_seed(case["seed"])
    dtype = case["dtype"]
    layer = make_layer(dtype, **case["config"])
    # a larger router init spreads the routing so capacity limits actually bite
    torch.nn.init.normal_(layer.router.weight, std=1.0)
    x = torch.randn(*case["shape"], case["config"]["d_model"]).to(dtype)
    grad_out = torch.randn(*case["shape"], case["config"]["d_model"])
    # float64 runs only where they are used: as the reference, or to measure the bf16 reference's own error
    need64 = float64_reference or dtype == torch.bfloat16
    ref64 = run_backend(copy.deepcopy(layer).double(), reference, x.double(), grad_out) if need64 else None
    ref_same = run_backend(layer, reference, x, grad_out)  # the reference in the case's dtype
    ref = ref64 if float64_reference else ref_same
    layer, x, grad_out = layer.to(device), x.to(device), grad_out.to(device)
    for backend in backends:
        got = {
            k: v.cpu() if isinstance(v, torch.Tensor) else v
            for k, v in run_backend(layer, backend, x, grad_out).items()
        }
        if ref["keep"] is not None:
            assert torch.equal(got["keep"], ref["keep"]), backend
        for key in ("y", "x_grad", "router_grad", "w_in_grad", "w_out_grad"):
            noise = (ref_same[key].double() - ref64[key]).norm().item() if dtype == torch.bfloat16 else 0.0
            assert_agree(got[key], ref[key].to(got[key].dtype), dtype, f"{backend} vs {reference}: {key}", noise)
        torch.testing.assert_close(got["losses"].aux_loss.cpu(), ref["losses"].aux_loss.to(torch.float32))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=layer_cases())
def test_backends_agree(case: dict) -> None:
    assert_backends_agree(case, ("loop", "sorted"), reference="einsum")


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


# --- grouped_mm: torch._grouped_mm over the sorted blocks ------------------------------------------------------------


@st.composite
def grouped_mm_cases(draw):
    """layer_cases with widths torch._grouped_mm takes (rows of a multiple of 16 bytes in fp32 and bf16)."""
    case = draw(layer_cases())
    case["config"]["d_model"] = draw(st.sampled_from([8, 16]))
    case["config"]["d_ff"] = draw(st.sampled_from([8, 16, 24]))
    return case


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=grouped_mm_cases())
def test_grouped_mm_agrees_with_sorted_and_the_reference(case: dict) -> None:
    """Same kept slots, outputs and gradients as `sorted` and as einsum, for token and expert choice, k 1/2, both
    drop policies, dropless and routing groups."""
    assert_backends_agree(case, ("grouped_mm",), reference="sorted")
    assert_backends_agree(case, ("grouped_mm",), reference="einsum")


def skewed_layer(num_experts: int, x: torch.Tensor, bias: float) -> MoELayer:
    """A dropless top-1 layer whose router sends every token of the positive x to expert 0 when bias is large
    (50), and spreads them with some experts empty when it is 0; asserts that it does."""
    layer = make_layer(num_experts=num_experts, top_k=1, train_capacity_factor=None)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] += bias
        layer.router.weight.add_(torch.randn_like(layer.router.weight) * 0.1)
    flat = x.view(-1, x.shape[-1])
    loads = torch.bincount(layer.route(flat)[2].expert_index_TK.flatten(), minlength=num_experts)
    assert (loads == 0).any() and (loads.max() == flat.shape[0]) == (bias > 0)  # empty experts; one with all
    return layer


def test_grouped_mm_handles_empty_experts_and_one_expert_with_every_token() -> None:
    x = torch.randn(1, 32, 8).abs()  # positive, so a large weight row toward expert 0 wins for every token
    grad_out = torch.randn(1, 32, 8)
    for bias in (0.0, 50.0):  # spread, then every token's first choice is expert 0
        layer = skewed_layer(16, x, bias)
        got, ref = run_backend(layer, "grouped_mm", x, grad_out), run_backend(layer, "sorted", x, grad_out)
        for key in ("y", "x_grad", "w_in_grad", "w_out_grad"):
            torch.testing.assert_close(got[key], ref[key], atol=1e-6, rtol=1e-5)


def test_grouped_mm_refuses_what_torch_cannot_take() -> None:
    layer = make_layer(torch.float64, d_model=8, d_ff=16)
    layer.backend = "grouped_mm"
    with pytest.raises(ValueError, match=r"takes float32, bfloat16 or float16, not torch\.float64; use backend=sorted"):
        layer(torch.randn(1, 4, 8, dtype=torch.float64))
    layer = make_layer(d_model=6, d_ff=16)
    layer.backend = "grouped_mm"
    with pytest.raises(ValueError, match="multiple of 16 bytes: d_model=6 at 4 bytes"):
        layer(torch.randn(1, 4, 6))


@pytest.mark.parametrize("cf", [None, 0.75])
@pytest.mark.parametrize(("backend", "reads"), [("sorted", 1), ("grouped_mm", 0), ("triton", 0)])
def test_device_paths_never_wait_for_the_host(backend: str, reads: int, cf: float | None) -> None:
    """A layer's forward and backward, dropless and with a capacity (routing, keep rule, dispatch, aux loss and
    metrics): `sorted` reads its block sizes once; grouped_mm and triton read nothing. No backend runs an op
    whose output size depends on the data (the keep rule's boolean selection did, before)."""
    device = "cpu"
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is not installed: pip install -e '.[gpu]'")
        device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"  # compiled kernels need CUDA
    layer = make_layer(top_k=2, train_capacity_factor=cf)
    torch.nn.init.normal_(layer.router.weight, std=2.0)
    layer = layer.to(device)
    layer.backend = backend
    x = torch.randn(2, 24, 8, device=device, requires_grad=True)
    with HostReads() as host, DeviceSyncs() as syncs:
        layer(x).sum().backward()
    assert host.ours == reads
    assert syncs.ops == []
    if cf is not None:
        assert not layer.last_keep_TK.all()  # the capacity dropped slots


def test_auto_is_sorted_on_cpu() -> None:
    layer = make_layer(backend="auto")
    assert layer.resolve_backend(torch.randn(4, 8)) == "sorted"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_grouped_mm_on_cuda_agrees_with_sorted() -> None:
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for top_k, cf in ((1, 1.25), (2, None)):
            layer = make_layer(dtype, d_model=64, d_ff=128, num_experts=8, top_k=top_k, train_capacity_factor=cf)
            layer = layer.cuda()
            x = torch.randn(4, 64, 64, device="cuda").to(dtype)
            grad_out = torch.randn(4, 64, 64, device="cuda")
            auto = make_layer(dtype, d_model=64, d_ff=128, backend="auto").cuda()
            assert auto.resolve_backend(x.view(-1, 64)) == "grouped_mm"
            got, ref = run_backend(layer, "grouped_mm", x, grad_out), run_backend(layer, "sorted", x, grad_out)
            for key in ("y", "x_grad", "router_grad", "w_in_grad", "w_out_grad"):
                assert_agree(got[key], ref[key], dtype, f"cuda {dtype}: {key}")
