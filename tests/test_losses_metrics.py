"""Auxiliary losses against closed forms; metrics; experts; configuration errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_lab.moe import MoEConfig, MoELayer, router_z_loss
from moe_lab.moe.experts import Experts


def uniform_layer(**overrides) -> MoELayer:
    """A zero router: every expert has probability 1/E for every token."""
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, **overrides))
    torch.nn.init.zeros_(layer.router.weight)
    return layer


@pytest.mark.parametrize("num_experts", [2, 8])
@pytest.mark.parametrize(("top_k", "aux_type", "expected"), [(1, "topk", 1.0), (2, "topk", 2.0), (2, "top1", 1.0)])
def test_aux_loss_of_uniform_router(num_experts: int, top_k: int, aux_type: str, expected: float) -> None:
    # P_i = 1/E for all i, so E * sum_i f_i P_i = sum_i f_i: k for "topk", 1 for "top1"
    layer = uniform_layer(num_experts=num_experts, top_k=top_k, aux_loss_type=aux_type)
    layer(torch.randn(4, 16, 8))
    assert layer.last_losses.aux_loss.item() == pytest.approx(expected)
    assert layer.last_losses.aux_loss_scaled.item() == pytest.approx(1e-2 * expected)
    metrics = layer.metrics("train")
    assert metrics["router_entropy"] == pytest.approx(math.log(num_experts))
    assert metrics["mean_max_prob"] == pytest.approx(1 / num_experts)
    assert metrics["z_loss"] == pytest.approx(math.log(num_experts) ** 2)


def test_aux_loss_against_a_hand_computation() -> None:
    torch.manual_seed(3)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, train_capacity_factor=None))
    torch.nn.init.normal_(layer.router.weight)
    x = torch.randn(10, 8)
    layer(x)
    probs = torch.softmax(x @ layer.router.weight.t(), -1)
    chosen = probs.topk(2, -1).indices
    f = torch.tensor([(chosen == i).any(-1).float().mean() for i in range(4)])
    expected = 4 * (f * probs.mean(0)).sum()
    assert layer.last_losses.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    top1 = torch.tensor([(chosen[:, 0] == i).float().mean() for i in range(4)])
    layer.config.aux_loss_type = "top1"
    layer(x)
    assert layer.last_losses.aux_loss.item() == pytest.approx((4 * (top1 * probs.mean(0)).sum()).item(), rel=1e-5)


def test_aux_loss_after_capacity_counts_only_kept_assignments() -> None:
    # all 8 tokens prefer expert 0, top-1, capacity 4: before capacity f = (1, 0), after f = (0.5, 0)
    layer = MoELayer(MoEConfig(d_model=2, d_ff=4, num_experts=2, top_k=1, train_capacity_factor=1.0))
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0]]).repeat(8, 1)
    p0 = torch.sigmoid(torch.tensor(1.0)).item()
    layer(x)
    assert layer.last_losses.aux_loss.item() == pytest.approx(2 * 1.0 * p0)
    layer.config.aux_loss_after_capacity = True
    layer(x)
    assert layer.last_losses.aux_loss.item() == pytest.approx(2 * 0.5 * p0)


def test_aux_loss_gradient_pushes_toward_balance() -> None:
    layer = MoELayer(MoEConfig(d_model=2, d_ff=4, num_experts=2, top_k=1, aux_loss_coef=1.0, z_loss_coef=0.0))
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0]]).repeat(8, 1)
    layer(x)
    layer.last_losses.total.backward()
    # descending the gradient lowers expert 0's logit: the overloaded expert loses probability
    assert layer.router.weight.grad[0, 0] > 0


def test_z_loss_of_known_logits() -> None:
    # logsumexp([0, 0]) = ln 2, logsumexp([ln 3, 0]) = ln 4 = 2 ln 2: mean of squares = 2.5 (ln 2)^2
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert router_z_loss(logits).item() == pytest.approx(2.5 * math.log(2) ** 2)


def test_z_loss_through_the_layer() -> None:
    layer = MoELayer(MoEConfig(d_model=2, d_ff=4, num_experts=2, top_k=1))
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]]))
    layer(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert layer.last_losses.z_loss.item() == pytest.approx(2.5 * math.log(2) ** 2)
    assert layer.last_losses.z_loss_scaled.item() == pytest.approx(1e-3 * 2.5 * math.log(2) ** 2)
    assert layer.metrics("train")["max_logit"] == pytest.approx(math.log(3.0))


def test_metrics_average_over_forwards_and_reset() -> None:
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2))
    for _ in range(3):
        layer(torch.randn(2, 8, 8))
    metrics = layer.metrics("train", reset=False)
    assert sum(metrics["tokens_per_expert"]) == pytest.approx(1.0)
    assert metrics["load_imbalance"] >= 1.0
    assert 0.0 <= metrics["dropped_frac"] <= 1.0
    assert layer.metrics("train") == metrics
    assert layer.metrics("train") == {}
    assert layer.last_expert_index.shape == (2, 8, 2)
    with pytest.raises(ValueError, match="'test' is not one of"):
        layer.metrics("test")


def test_metrics_continue_from_their_state() -> None:
    """A layer that loads another's metrics state (a resumed run's) averages as if it had seen its forwards."""
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2))
    xs = [torch.randn(2, 8, 8) for _ in range(4)]
    for x in xs[:2]:
        layer(x)
    state = layer.metrics_state()
    resumed = MoELayer(layer.config)
    resumed.load_state_dict(layer.state_dict())
    resumed.load_metrics_state(state)
    for x in xs[2:]:
        layer(x)
        resumed(x)
    assert resumed.metrics("train") == layer.metrics("train") != {}
    assert resumed.metrics_state()["train"]["num_forwards"] == 0  # read and reset like any other


@pytest.mark.parametrize("activation", ["relu", "gelu", "geglu", "swiglu"])
def test_expert_ffn_formula(activation: str) -> None:
    experts = Experts(2, 4, 6, activation)
    x = torch.randn(5, 4)
    w_in, w_out = experts.w_in_EDH[1], experts.w_out_EFD[1]
    h = x @ w_in
    if activation == "geglu":
        h = F.gelu(h[:, :6]) * h[:, 6:]
    elif activation == "swiglu":
        h = F.silu(h[:, :6]) * h[:, 6:]
    else:
        h = getattr(F, activation)(h)
    expected = h @ w_out
    torch.testing.assert_close(experts.forward_one(x, w_in, w_out), expected)
    torch.testing.assert_close(experts.forward_grouped(x, [0, 5]), expected)
    torch.testing.assert_close(experts.forward_padded(torch.stack([x, x]))[1], expected)


def test_expert_dropout_only_in_training() -> None:
    layer = MoELayer(MoEConfig(d_model=8, d_ff=64, num_experts=2, top_k=1, expert_dropout=0.5))
    x = torch.randn(4, 8)
    w_in, w_out = layer.experts.w_in_EDH[0], layer.experts.w_out_EFD[0]
    layer.eval()
    torch.testing.assert_close(layer.experts.forward_one(x, w_in, w_out), layer.experts.forward_one(x, w_in, w_out))
    layer.train()
    h = layer.experts.hidden(torch.ones(1000, 128))
    zero_frac = (h == 0).float().mean().item()
    assert zero_frac == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"backend": "fast"},
            r"backend='fast' is not one of \['sorted', 'grouped_mm', 'triton', 'einsum', 'loop', 'auto'\]",
        ),
        ({"drop_policy": "random"}, "drop_policy='random' is not one of"),
        ({"activation": "tanh"}, "activation='tanh' is not one of"),
        ({"top_k": 3, "num_experts": 2}, "top_k=3 exceeds num_experts=2"),
        ({"train_capacity_factor": 0.0}, "train_capacity_factor must be > 0"),
        ({"routing": "expert_choice", "eval_capacity_factor": None}, "undefined for expert_choice"),
        ({"jitter_eps": 1.5}, "jitter_eps must be in"),
    ],
)
def test_bad_config_names_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MoEConfig(**overrides)


def test_unknown_config_key_lists_valid_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown MoEConfig key\(s\) \['num_expert'\]; valid keys: .*'num_experts'"):
        MoEConfig.from_dict({"num_expert": 8})
    assert MoEConfig.from_dict({"num_experts": 16}).num_experts == 16


def test_defaults_are_st_moe() -> None:
    cfg = MoEConfig()
    assert (cfg.aux_loss_coef, cfg.z_loss_coef) == (1e-2, 1e-3)
    assert (cfg.train_capacity_factor, cfg.eval_capacity_factor) == (1.25, 2.0)
    assert (cfg.top_k, cfg.router_dtype, cfg.backend) == (2, "float32", "sorted")


def test_layer_is_a_drop_in_ffn() -> None:
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8))
    x = torch.randn(3, 5, 8)
    y = layer(x)
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    y.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
