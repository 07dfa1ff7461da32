"""Hand-worked capacity and dropping cases, under every backend."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lab.moe import MoEConfig, MoELayer, expert_capacity

BACKENDS = ["sorted", "loop", "einsum"]


def controlled_layer(logits_TE: torch.Tensor, **overrides) -> tuple[MoELayer, torch.Tensor]:
    """A layer whose router produces exactly `logits_TE`: x is the identity, the router weight is logits^T."""
    num_tokens, num_experts = logits_TE.shape
    values = {"d_model": num_tokens, "d_ff": 4, "num_experts": num_experts, "activation": "relu", **overrides}
    layer = MoELayer(MoEConfig(**values))
    with torch.no_grad():
        layer.router.weight.copy_(logits_TE.t())
    return layer, torch.eye(num_tokens)[None]


# 8 tokens, all preferring expert 0 with these margins; CF 1.0, top-1: capacity ceil(1 * 1 * 8 / 2) = 4
MARGINS = torch.tensor([0.5, 3.0, 1.0, 2.5, 0.1, 4.0, 1.5, 2.0])
ALL_PREFER_0 = torch.stack([MARGINS, torch.zeros(8)], dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("policy", "kept"),
    [
        ("position", [0, 1, 2, 3]),  # earlier tokens win
        ("priority", [1, 3, 5, 7]),  # highest router probability wins: margins 3.0, 2.5, 4.0, 2.0
    ],
)
def test_top1_all_tokens_prefer_one_expert(backend: str, policy: str, kept: list[int]) -> None:
    layer, x = controlled_layer(ALL_PREFER_0, top_k=1, train_capacity_factor=1.0, drop_policy=policy, backend=backend)
    y = layer(x)
    assert layer.last_keep_TK[0, :, 0].nonzero().squeeze(1).tolist() == kept
    dropped = [t for t in range(8) if t not in kept]
    assert torch.all(y[0, dropped] == 0)
    metrics = layer.metrics("train")
    assert metrics["dropped_frac"] == 0.5
    assert metrics["tokens_fully_dropped_frac"] == 0.5
    assert metrics["tokens_per_expert"] == [1.0, 0.0]
    assert metrics["load_imbalance"] == 2.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("policy", "kept"),
    [("position", [0, 1, 2, 3]), ("priority", [1, 3, 5, 7])],
)
def test_top2_second_choices_fill_the_other_expert(backend: str, policy: str, kept: list[int]) -> None:
    # CF 0.5, top-2, 2 experts: capacity ceil(0.5 * 2 * 8 / 2) = 4 per expert
    layer, x = controlled_layer(ALL_PREFER_0, top_k=2, train_capacity_factor=0.5, drop_policy=policy, backend=backend)
    layer(x)
    keep = layer.last_keep_TK[0]
    assert keep[:, 0].nonzero().squeeze(1).tolist() == kept
    assert keep[:, 1].nonzero().squeeze(1).tolist() == kept


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_choices_claim_capacity_before_second_choices(backend: str) -> None:
    # 4 tokens, 2 experts, top-2, CF 0.5: capacity 2. Token 0 prefers expert 1, the others expert 0.
    # First choices: e0 <- t1, t2 (t3 dropped); e1 <- t0. Second choices: t0 -> e0 is full (dropped)
    # even though t0 is the earliest token; t1 -> e1 kept; t2, t3 -> e1 full.
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    layer, x = controlled_layer(logits, top_k=2, train_capacity_factor=0.5, backend=backend)
    y = layer(x)
    assert layer.last_keep_TK[0].tolist() == [[True, False], [True, True], [True, False], [False, False]]
    assert layer.last_expert_index[0].tolist() == [[1, 0], [0, 1], [0, 1], [0, 1]]
    assert torch.all(y[0, 3] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropless_keeps_everything(backend: str) -> None:
    layer, x = controlled_layer(ALL_PREFER_0, top_k=2, train_capacity_factor=None, backend=backend)
    layer(x)
    assert layer.last_keep_TK.all()
    assert layer.metrics("train")["dropped_frac"] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_have_their_own_capacity(backend: str) -> None:
    # groups of 4 tokens: capacity ceil(1.0 * 1 * 4 / 2) = 2 in each group, so tokens 0, 1 and 4, 5 win
    layer, x = controlled_layer(ALL_PREFER_0, top_k=1, train_capacity_factor=1.0, group_size=4, backend=backend)
    layer(x)
    assert layer.last_keep_TK[0, :, 0].nonzero().squeeze(1).tolist() == [0, 1, 4, 5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_last_group(backend: str) -> None:
    # groups of 5: [0..4] capacity ceil(5 / 2) = 3, [5..7] capacity ceil(3 / 2) = 2
    layer, x = controlled_layer(ALL_PREFER_0, top_k=1, train_capacity_factor=1.0, group_size=5, backend=backend)
    layer(x)
    assert layer.last_keep_TK[0, :, 0].nonzero().squeeze(1).tolist() == [0, 1, 2, 5, 6]


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_choice_each_expert_takes_its_top_tokens(backend: str) -> None:
    # expert 0 likes tokens by MARGINS, expert 1 is indifferent (probs 1 - p0); capacity ceil(1*1*8/2) = 4
    layer, x = controlled_layer(ALL_PREFER_0, top_k=1, routing="expert_choice", train_capacity_factor=1.0)
    layer.backend = backend
    _, _, routing = layer.route(x[0])
    by_expert = {e: sorted(routing.token_S[routing.expert_S == e].tolist()) for e in range(2)}
    assert by_expert == {0: [1, 3, 5, 7], 1: [0, 2, 4, 6]}
    layer(x)
    metrics = layer.metrics("train")
    assert metrics["tokens_per_expert"] == [0.5, 0.5]
    assert metrics["load_imbalance"] == 1.0


def test_gates_are_router_probabilities_unless_renormalised() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    probs = torch.softmax(logits, -1)[0]
    for renormalize, expected in [(False, probs[:2]), (True, probs[:2] / probs[:2].sum())]:
        layer, x = controlled_layer(logits, top_k=2, num_experts=3, renormalize_gates=renormalize)
        _, _, routing = layer.route(x[0])
        torch.testing.assert_close(routing.gate_S, expected)


@pytest.mark.parametrize(
    ("tokens", "experts", "k", "cf", "expected"),
    [
        (8192, 64, 2, 1.25, 320),
        (8192, 64, 1, 1.25, 160),
        (8, 2, 1, 1.0, 4),
        (100, 2, 1, 1.1, 55),  # 1.1 * 100 / 2 is 55.000000000000007 in floats
        (10, 4, 2, 0.75, 4),  # ceil(3.75)
        (3, 64, 1, 0.5, 1),  # never zero
        (10, 4, 2, None, None),
    ],
)
def test_expert_capacity_formula(tokens: int, experts: int, k: int, cf: float | None, expected: int | None) -> None:
    assert expert_capacity(tokens, experts, k, cf) == expected


@pytest.mark.parametrize(
    ("tokens", "experts", "k", "cf", "expected"),
    [
        (8192, 64, 2, 2.5, 320),  # flaxformer CF 2.5 at top-2 = gshard CF 1.25: no factor k
        (8192, 64, 1, 1.25, 160),
        (100, 8, 1, 1.25, 16),  # round(15.625)
        (40, 8, 2, 2.5, 12),  # round(12.5) is 12: half to even, as jnp.round
        (10, 4, 2, 0.75, 4),  # round(1.875) = 2, raised to the minimum of 4
        (10, 4, 2, None, None),
    ],
)
def test_flaxformer_capacity_convention(
    tokens: int, experts: int, k: int, cf: float | None, expected: int | None
) -> None:
    assert expert_capacity(tokens, experts, k, cf, "flaxformer") == expected


def test_layer_counts_capacity_in_its_convention() -> None:
    # 8 tokens, 2 experts, top-1, CF 1.0: gshard holds ceil(4) = 4 per expert, flaxformer max(4, round(4)) = 4;
    # at CF 0.5 gshard holds 2, flaxformer its minimum 4
    for convention, kept in (("gshard", 2), ("flaxformer", 4)):
        layer, x = controlled_layer(ALL_PREFER_0, top_k=1, train_capacity_factor=0.5, capacity_convention=convention)
        layer.train()
        layer(x)
        assert int(layer.last_keep_TK.sum()) == kept, convention
    with pytest.raises(ValueError, match="capacity_convention"):
        MoEConfig(capacity_convention="mesh")


def test_train_and_eval_capacity_factors_switch_with_mode() -> None:
    # top-1, 8 tokens on one expert: train CF 0.5 -> capacity 2, eval CF 2.0 -> capacity 8
    layer, x = controlled_layer(ALL_PREFER_0, top_k=1, train_capacity_factor=0.5, eval_capacity_factor=2.0)
    layer.train()
    assert layer.capacity_factor == 0.5
    layer(x)
    assert layer.last_keep_TK.sum().item() == math.ceil(0.5 * 8 / 2)
    layer.eval()
    assert layer.capacity_factor == 2.0
    with torch.no_grad():
        layer(x)
        layer(x)
    assert layer.last_keep_TK.all()
    # eval forwards went to the eval counters only
    assert layer.metrics("train")["dropped_frac"] == pytest.approx(0.75)
    assert layer.metrics("eval")["dropped_frac"] == 0.0
    assert layer.metrics("train") == {}  # read with reset


def test_jitter_only_in_training() -> None:
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, jitter_eps=0.1))
    x = torch.randn(16, 8)
    layer.eval()
    torch.testing.assert_close(layer.router(x)[0], layer.router(x)[0], rtol=0, atol=0)
    layer.train()
    a, b = layer.router(x)[0], layer.router(x)[0]
    assert not torch.equal(a, b)
    # multiplicative U(0.9, 1.1) noise on the input moves each logit by at most 10% of sum_d |w x|
    bound = 0.1 * (x.abs() @ layer.router.weight.abs().t())
    clean = x @ layer.router.weight.t()
    assert torch.all((a - clean).abs() <= bound + 1e-6)


def test_router_runs_in_float32_in_a_bfloat16_model() -> None:
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4)).to(torch.bfloat16)
    x = torch.randn(16, 8).to(torch.bfloat16)
    logits, _ = layer.router(x)
    assert logits.dtype == torch.float32
    expected = x.float() @ layer.router.weight.float().t()
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    assert layer(x[None]).dtype == torch.bfloat16


def test_bfloat16_router_rounds_its_logits() -> None:
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, router_dtype="bfloat16"))
    torch.nn.init.normal_(layer.router.weight)
    logits, probs = layer.router(torch.randn(64, 8))
    assert torch.equal(logits, logits.to(torch.bfloat16).float())
    assert torch.equal(probs, probs.to(torch.bfloat16).float())


def test_expert_choice_has_no_switch_aux_loss_but_keeps_the_z_loss() -> None:
    # expert choice is balanced by construction: flaxformer adds no balance loss (Switch's would be cf * k)
    layer, x = controlled_layer(ALL_PREFER_0, top_k=1, routing="expert_choice", train_capacity_factor=1.0)
    layer.train()
    layer(x)
    losses = layer.last_losses
    assert losses.aux_loss.item() == 0.0 and losses.aux_loss_scaled.item() == 0.0
    logits = ALL_PREFER_0.double()
    expected_z = (torch.logsumexp(logits, dim=-1) ** 2).mean().item()
    assert losses.z_loss.item() == pytest.approx(expected_z, rel=1e-5)
