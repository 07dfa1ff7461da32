"""The layer against a naive float64 re-implementation of the documented semantics, and edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint

from moe_lab.moe import MoEConfig, MoELayer


def naive_moe(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Token by token, slot by slot, in docs/moe-core.md's claim order; float64 throughout."""
    cfg = layer.config
    x_TD = x.reshape(-1, cfg.d_model).double()
    T, E, K = x_TD.shape[0], cfg.num_experts, cfg.top_k
    probs = torch.softmax(x_TD @ layer.router.weight.double().t(), -1)
    w_in, w_out = layer.experts.w_in_EDH.double(), layer.experts.w_out_EFD.double()
    group = cfg.group_size if cfg.group_size and cfg.group_size < T else T
    cf = layer.capacity_factor
    y = torch.zeros_like(x_TD)

    def expert(e: int, t: int) -> torch.Tensor:
        return layer.experts.hidden(x_TD[t] @ w_in[e]) @ w_out[e]

    for start in range(0, T, group):
        tokens = list(range(start, min(T, start + group)))
        cap = None if cf is None else max(1, math.ceil(cf * K * len(tokens) / E - 1e-9))
        if cfg.routing == "expert_choice":
            for e in range(E):
                for t in sorted(tokens, key=lambda t: -probs[t, e].item())[: min(cap, len(tokens))]:
                    y[t] += probs[t, e] * expert(e, t)
            continue
        choices = {t: sorted(range(E), key=lambda e: -probs[t, e].item())[:K] for t in tokens}
        order = tokens
        if cfg.drop_policy == "priority":
            order = sorted(tokens, key=lambda t: -probs[t].max().item())
        used = [0] * E
        for rank in range(K):
            for t in order:
                e = choices[t][rank]
                if cap is not None and used[e] >= cap:
                    continue
                used[e] += 1
                gates = probs[t, choices[t]]
                gate = gates[rank] / gates.sum() if cfg.renormalize_gates else gates[rank]
                y[t] += gate * expert(e, t)
    return y.view(x.shape)


@settings(max_examples=80, deadline=None)
@given(
    num_experts=st.integers(1, 6),
    top_k=st.integers(1, 2),
    routing=st.sampled_from(["token_choice", "token_choice", "expert_choice"]),
    cf=st.sampled_from([0.5, 1.0, 1.25, 2.0, None]),
    policy=st.sampled_from(["position", "priority"]),
    renormalize=st.booleans(),
    group_size=st.sampled_from([None, 3, 5, 7]),
    shape=st.tuples(st.integers(1, 2), st.integers(1, 13)),
    mode=st.sampled_from(["train", "eval"]),
    seed=st.integers(0, 10_000),
)
def test_layer_matches_naive_reference(
    num_experts, top_k, routing, cf, policy, renormalize, group_size, shape, mode, seed
) -> None:
    top_k = min(top_k, num_experts)
    if routing == "expert_choice" and cf is None:
        cf = 1.0
    torch.manual_seed(seed)
    layer = MoELayer(
        MoEConfig(
            d_model=6, d_ff=5, num_experts=num_experts, top_k=top_k, routing=routing, train_capacity_factor=cf,
            eval_capacity_factor=cf if routing == "expert_choice" else 2.0, drop_policy=policy,
            renormalize_gates=renormalize, group_size=group_size, activation="relu",
        )
    )  # fmt: skip
    # wide logits make ties (where the naive order and topk may differ) practically impossible
    torch.nn.init.normal_(layer.router.weight, std=1.5)
    layer.train(mode == "train")
    x = torch.randn(*shape, 6)
    expected = naive_moe(layer, x)
    for backend in ("sorted", "loop", "einsum"):
        layer.backend = backend
        with torch.no_grad():
            torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-4, msg=backend)


def test_aux_loss_weights_groups_by_their_tokens() -> None:
    # 5 tokens, groups of 4: group 0 has 4 tokens, group 1 one token. Hand computation per group.
    torch.manual_seed(1)
    layer = MoELayer(MoEConfig(d_model=4, d_ff=4, num_experts=2, top_k=1, group_size=4, train_capacity_factor=None))
    torch.nn.init.normal_(layer.router.weight, std=2.0)
    x = torch.randn(5, 4)
    layer(x)
    probs = torch.softmax(x @ layer.router.weight.t(), -1)
    chosen = probs.argmax(-1)
    per_group = []
    for tokens in (slice(0, 4), slice(4, 5)):
        f = torch.stack([(chosen[tokens] == e).float().mean() for e in range(2)])
        per_group.append(2 * (f * probs[tokens].mean(0)).sum())
    expected = 4 / 5 * per_group[0] + 1 / 5 * per_group[1]
    assert layer.last_losses.aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_load_imbalance_is_averaged_per_forward() -> None:
    # forward 1 sends every token to expert 0, forward 2 to expert 1: each is maximally imbalanced
    layer = MoELayer(MoEConfig(d_model=2, d_ff=4, num_experts=2, top_k=1, train_capacity_factor=None))
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    layer(torch.tensor([[1.0, 0.0]]).repeat(4, 1))
    layer(torch.tensor([[0.0, 1.0]]).repeat(4, 1))
    metrics = layer.metrics("train")
    assert metrics["load_imbalance"] == 2.0
    assert metrics["tokens_per_expert"] == [0.5, 0.5]
    p = torch.softmax(torch.tensor([1.0, -1.0]), 0)[0].item()
    assert metrics["mean_max_prob"] == pytest.approx(p)


@pytest.mark.parametrize("backend", ["sorted", "loop", "einsum"])
def test_autocast_keeps_the_router_in_float32(backend: str) -> None:
    layer = MoELayer(MoEConfig(d_model=16, d_ff=16, num_experts=4, backend=backend))
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        logits, _ = layer.router(x.reshape(-1, 16))
    assert y.dtype == torch.float32
    torch.testing.assert_close(logits, x.reshape(-1, 16) @ layer.router.weight.t(), rtol=1e-6, atol=1e-6)
    assert not torch.equal(logits, logits.to(torch.bfloat16).float())
    torch.testing.assert_close(y, MoELayer.forward(layer, x), atol=5e-2, rtol=5e-2)


def test_non_reentrant_checkpointing_keeps_loss_gradients_and_counts_once() -> None:
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4))
    x = torch.randn(2, 16, 8, requires_grad=True)
    y = checkpoint(layer, x, use_reentrant=False)
    losses = layer.last_losses
    assert losses.total.requires_grad
    (y.sum() + losses.total).backward()
    assert layer.router.weight.grad is not None
    layer(x)
    metrics = layer.metrics("train")
    assert metrics  # two real forwards, each counted once: 2 x 32 tokens
    assert layer._metrics["train"].num_forwards == 0  # read with reset


def test_no_grad_forward_in_train_mode_is_not_counted() -> None:
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4))
    with torch.no_grad():
        layer(torch.randn(4, 8))
    assert layer.metrics("train") == {}
    layer(torch.randn(4, 8))
    assert layer._metrics["train"].num_tokens == 4


@pytest.mark.parametrize("backend", ["sorted", "loop", "einsum"])
def test_empty_input(backend: str) -> None:
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, backend=backend))
    y = layer(torch.randn(0, 5, 8))
    assert y.shape == (0, 5, 8)
    assert layer.last_losses.total.item() == 0.0
