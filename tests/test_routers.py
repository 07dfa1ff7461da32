"""BASE, hash and StableMoE routing: the balanced assignment, the layers' exact semantics, runs through the CLI."""

from __future__ import annotations

import csv
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe_lab.moe import MoEConfig, MoELayer, balanced_assignment, hash_table, stablemoe_balance_loss
from moe_lab.moe.balanced import expert_slots
from tests.conftest import run_cli


def top1_layer(routing: str, **overrides) -> MoELayer:
    """A small dropless top-1 layer of the given routing."""
    values = {"d_model": 8, "d_ff": 16, "num_experts": 4, "top_k": 1, "routing": routing, "vocab_size": 10}
    values |= {"train_capacity_factor": None, "eval_capacity_factor": None, **overrides}
    return MoELayer(MoEConfig(**values))


def manual_top1(layer: MoELayer, x_TD: torch.Tensor, expert_T: torch.Tensor, gate_T: torch.Tensor) -> torch.Tensor:
    """gate_t * FFN_{e_t}(x_t), one token at a time through the expert's own weights."""
    w_in, w_out = layer.experts.w_in_EDH, layer.experts.w_out_EFD
    rows = zip(x_TD, expert_T, gate_T, strict=True)
    return torch.stack([g * layer.experts.forward_one(x[None], w_in[e], w_out[e])[0] for x, e, g in rows])


def sigmoid_gate(layer: MoELayer, x_TD: torch.Tensor, expert_T: torch.Tensor) -> torch.Tensor:
    """BASE's and StableMoE's gate: sigmoid of the router logit of the chosen expert."""
    return torch.sigmoid(layer.router(x_TD)[0].gather(1, expert_T[:, None]).squeeze(1))


# --- balanced_assignment (BASE's auction) ---------------------------------------------------------------------


def brute_force_optimum(scores_TE: torch.Tensor, cap_E: torch.Tensor) -> float:
    """The best total score over all assignments giving expert e exactly cap_E[e] tokens."""
    slots = [e for e, c in enumerate(cap_E.tolist()) for _ in range(c)]
    perms = torch.tensor(sorted(set(itertools.permutations(slots))))
    return float(scores_TE.gather(1, perms.t()).sum(0).max())


def total_score(scores_TE: torch.Tensor, expert_T: torch.Tensor) -> float:
    return float(scores_TE.gather(1, expert_T[:, None]).sum())


@pytest.mark.parametrize("seed", range(8))
def test_balanced_assignment_is_exactly_balanced_and_optimal_on_small_problems(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for num_tokens, num_experts in itertools.product(range(2, 8), (2, 3)):
        if seed % 2:  # integer scores: many ties
            scores = torch.randint(0, 3, (num_tokens, num_experts), generator=gen).double()
        else:
            scores = torch.randn(num_tokens, num_experts, generator=gen, dtype=torch.float64)
        stats: dict = {}
        expert_T = balanced_assignment(scores, tolerance=1e-9, stats=stats)
        cap_E = expert_slots(num_tokens, num_experts)
        case = (num_tokens, num_experts, scores.tolist(), expert_T.tolist())
        assert expert_T.dtype == torch.long
        assert torch.equal(torch.bincount(expert_T, minlength=num_experts), cap_E), case
        assert total_score(scores, expert_T) == pytest.approx(brute_force_optimum(scores, cap_E), abs=1e-6), case
        if stats:  # left empty only when every assignment is optimal (all scores equal)
            assert stats["fallback"] is False and stats["rounds"] >= 1, case


def test_expert_slots_give_the_remainder_to_the_first_experts() -> None:
    assert expert_slots(7, 3).tolist() == [3, 2, 2]
    assert expert_slots(8, 3).tolist() == [3, 3, 2]
    assert expert_slots(2, 4).tolist() == [1, 1, 0, 0]
    assert expert_slots(12, 4).tolist() == [3, 3, 3, 3]


def greedy_balanced(scores_TE: torch.Tensor) -> torch.Tensor:
    """A baseline: tokens in order of their best score take their best expert that still has a slot."""
    left_E = expert_slots(*scores_TE.shape).clone()
    expert_T = torch.full((scores_TE.shape[0],), -1)
    for t in scores_TE.max(1).values.argsort(descending=True).tolist():
        e = int(scores_TE[t].masked_fill(left_E == 0, -math.inf).argmax())
        expert_T[t] = e
        left_E[e] -= 1
    return expert_T


def test_balanced_assignment_large_problem_is_balanced_and_near_optimal() -> None:
    gen = torch.Generator().manual_seed(0)
    num_tokens, num_experts, tolerance = 512, 8, 1e-6
    # correlated preferences: most tokens like expert 0, so greedy top-1 would be far from balanced
    scores = torch.randn(num_tokens, num_experts, generator=gen, dtype=torch.float64)
    scores[:, 0] += 1.0
    stats: dict = {}
    expert_T = balanced_assignment(scores, tolerance, stats=stats)
    assert stats["fallback"] is False and stats["rounds"] >= 1
    assert torch.bincount(expert_T, minlength=num_experts).tolist() == [64] * num_experts
    mean = total_score(scores, expert_T) / num_tokens
    assert mean >= total_score(scores, greedy_balanced(scores)) / num_tokens
    assert mean <= float(scores.max(1).values.mean())
    # within n * eps of the optimum, so no exchange of two tokens between two experts gains more than that
    slack = num_tokens * tolerance * float(scores.max() - scores.min())
    for e, f in itertools.permutations(range(num_experts), 2):
        in_e, in_f = expert_T == e, expert_T == f
        gain_to_f = (scores[in_e, f] - scores[in_e, e]).max()
        gain_to_e = (scores[in_f, e] - scores[in_f, f]).max()
        assert float(gain_to_f + gain_to_e) <= slack, (e, f)


def test_balanced_assignment_fewer_tokens_than_experts() -> None:
    scores = torch.tensor([[0.0, 5.0, 1.0, 9.0], [3.0, 0.0, 9.0, 9.0]])
    # only experts 0 and 1 have a slot (n % E = 2 extras go to the first two): token 0 -> 1, token 1 -> 0
    assert balanced_assignment(scores).tolist() == [1, 0]
    assert balanced_assignment(torch.tensor([[1.0, 2.0, 3.0]])).tolist() == [0]


def test_balanced_assignment_all_equal_scores_is_balanced() -> None:
    expert_T = balanced_assignment(torch.full((7, 3), 0.5))
    assert torch.bincount(expert_T, minlength=3).tolist() == [3, 2, 2]


def test_balanced_assignment_round_limit_falls_back_to_an_exactly_balanced_assignment() -> None:
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(64, 4, generator=gen)
    scores[:, 0] += 2.0  # everyone bids for expert 0 first: one round cannot finish
    stats: dict = {}
    expert_T = balanced_assignment(scores, max_rounds=1, stats=stats)
    assert stats == {"rounds": 1, "fallback": True}
    assert torch.bincount(expert_T, minlength=4).tolist() == [16] * 4


# --- BASE layer -----------------------------------------------------------------------------------------------


def test_base_layer_trains_on_a_balanced_assignment_and_drops_nothing() -> None:
    layer = top1_layer("base", train_capacity_factor=1.25)
    with torch.no_grad():
        layer.router.weight[0] += 1.0  # an unbalanced router: greedy routing would overload expert 0
    x = torch.randn(2, 8, 8) + 1.0
    y = layer(x)
    expert_T = layer.last_expert_index.reshape(-1)
    assert torch.bincount(expert_T, minlength=4).tolist() == [4, 4, 4, 4]
    assert layer.last_keep_TK.all()
    x_TD = x.reshape(-1, 8)
    logits = layer.router(x_TD)[0]
    assert torch.equal(expert_T, balanced_assignment(logits, layer.config.base_tolerance))
    assert not torch.equal(expert_T, logits.argmax(-1))
    expected = manual_top1(layer, x_TD, expert_T, sigmoid_gate(layer, x_TD, expert_T))
    torch.testing.assert_close(y.reshape(-1, 8), expected, rtol=1e-5, atol=1e-6)
    metrics = layer.metrics("train")
    assert metrics["load_imbalance"] == 1.0 and metrics["dropped_frac"] == 0.0


def test_base_layer_balances_each_routing_group_separately() -> None:
    layer = top1_layer("base", group_size=8)
    x = torch.randn(16, 8)
    layer(x)
    expert_T = layer.last_expert_index[:, 0]
    for group in (expert_T[:8], expert_T[8:]):
        assert torch.bincount(group, minlength=4).tolist() == [2, 2, 2, 2]


def test_base_layer_at_inference_takes_the_argmax() -> None:
    layer = top1_layer("base").eval()
    with torch.no_grad():
        layer.router.weight[0] += 1.0
    x = torch.randn(16, 8) + 1.0
    y = layer(x)
    logits = layer.router(x)[0]
    assert torch.equal(layer.last_expert_index[:, 0], logits.argmax(-1))
    assert torch.bincount(layer.last_expert_index[:, 0], minlength=4).max() > 4  # not balanced
    expected = manual_top1(layer, x, logits.argmax(-1), sigmoid_gate(layer, x, logits.argmax(-1)))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_base_layer_router_learns_through_the_sigmoid_gate() -> None:
    layer = top1_layer("base", z_loss_coef=0.0)
    x = torch.randn(16, 8)
    layer(x).square().sum().backward()
    grad = layer.router.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # no balance loss and the z-loss off: only the gate trains the router
    assert layer.last_losses.total.item() == 0.0


# --- hash routing ---------------------------------------------------------------------------------------------


def test_hash_table_is_seeded() -> None:
    table = hash_table(50, 4, 0)
    assert table.shape == (50,) and table.dtype == torch.long
    assert int(table.min()) >= 0 and int(table.max()) < 4
    assert torch.equal(table, hash_table(50, 4, 0))
    assert not torch.equal(table, hash_table(50, 4, 1))


def test_hash_table_is_the_same_in_another_process() -> None:
    code = "from moe_lab.moe.routers import hash_table; print(hash_table(50, 4, 0).tolist())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout) == hash_table(50, 4, 0).tolist()


def test_hash_layer_routes_by_the_table() -> None:
    vocab = 10
    layer = top1_layer("hash", vocab_size=vocab, hash_seed=3)
    assert not list(layer.router.parameters())  # nothing to learn
    assert not any("router" in name for name, _ in layer.named_parameters())
    ids = torch.tensor([[3, 1, 3, 7, 0, 9, 1, 3]])
    x = torch.randn(1, 8, 8)
    y = layer(x, ids)
    expert_T = layer.last_expert_index[0, :, 0]
    assert torch.equal(layer.router.hash_table_V, hash_table(vocab, 4, 3))
    assert torch.equal(expert_T, hash_table(vocab, 4, 3)[ids[0]])
    assert len({int(e) for e in expert_T[ids[0] == 3]}) == 1 and len({int(e) for e in expert_T[ids[0] == 1]}) == 1
    # the gate is 1: the output is the expert's
    torch.testing.assert_close(y[0], manual_top1(layer, x[0], expert_T, torch.ones(8)), rtol=1e-5, atol=1e-6)
    assert layer.last_losses.total.item() == 0.0
    # another input, same ids: same experts; a separately built layer with the same seed agrees
    other = top1_layer("hash", vocab_size=vocab, hash_seed=3)
    other(torch.randn(1, 8, 8), ids)
    assert torch.equal(other.last_expert_index, layer.last_expert_index)
    assert "router_entropy" not in layer.metrics("train")


def test_hash_layer_capacity_keeps_the_first_tokens() -> None:
    layer = top1_layer("hash", train_capacity_factor=1.0)
    ids = torch.full((8,), 4)  # all to one expert; capacity ceil(1.0 * 8 / 4) = 2
    y = layer(torch.randn(8, 8), ids)
    assert layer.last_keep_TK[:, 0].tolist() == [True, True] + [False] * 6
    assert torch.all(y[2:] == 0) and torch.all(y[:2] != 0)


def test_hash_layer_without_token_ids_raises() -> None:
    layer = top1_layer("hash")
    with pytest.raises(ValueError, match="token id"):
        layer(torch.randn(4, 8))


# --- StableMoE ------------------------------------------------------------------------------------------------


def test_stablemoe_balance_loss_by_hand() -> None:
    scores = torch.tensor([[2.0, -1.0], [0.5, 0.0], [1.0, 3.0], [-0.5, 1.5]], requires_grad=True)
    expert_T = torch.tensor([0, 0, 0, 1])
    # T = 4, E = 2, n_bar = 2; |A_0| = 3 (excess +0.5), |A_1| = 1 (excess -0.5)
    s = torch.sigmoid
    expected = 0.5 * (s(torch.tensor(2.0)) + s(torch.tensor(0.5)) + s(torch.tensor(1.0))) - 0.5 * s(torch.tensor(1.5))
    loss = stablemoe_balance_loss(scores, expert_T)
    assert loss.item() == pytest.approx(float(expected) / 4, rel=1e-6)
    loss.backward()
    # minimising it lowers the overloaded expert's chosen scores and raises the underloaded one's
    assert (scores.grad[:3, 0] > 0).all() and scores.grad[3, 1] < 0
    assert scores.grad[:3, 1].eq(0).all() and scores.grad[3, 0] == 0
    # a balanced assignment has no balance loss
    assert stablemoe_balance_loss(scores, torch.tensor([0, 1, 0, 1])).item() == 0.0


def test_stablemoe_stage1_routes_greedily_with_a_sigmoid_gate() -> None:
    layer = top1_layer("stablemoe")
    ids = torch.tensor([[1, 4, 4, 9, 0, 2]])
    x = torch.randn(1, 6, 8)
    y = layer(x, ids)
    logits = layer.router(x[0])[0]
    expert_T = logits.argmax(-1)
    assert torch.equal(layer.last_expert_index[0, :, 0], expert_T)
    expected = manual_top1(layer, x[0], expert_T, torch.sigmoid(logits.gather(1, expert_T[:, None]).squeeze(1)))
    torch.testing.assert_close(y[0], expected, rtol=1e-5, atol=1e-6)
    losses = layer.last_losses
    assert losses.aux_loss.item() == pytest.approx(stablemoe_balance_loss(logits, expert_T).item(), rel=1e-6)
    distill = F.cross_entropy(layer.distilled(ids[0]), expert_T)
    assert losses.distill_loss.item() == pytest.approx(distill.item(), rel=1e-6)
    assert losses.distill_loss_scaled.item() == pytest.approx(0.3 * distill.item(), rel=1e-6)


@pytest.mark.parametrize("eval_router", ["distilled", "learned"])
def test_stablemoe_stage1_evaluation_routes_by_the_chosen_router(eval_router: str) -> None:
    # the StableMoE fork evaluates with the light router in both stages; "learned" keeps the main router
    layer = top1_layer("stablemoe", stage1_eval_router=eval_router).eval()
    ids = torch.tensor([[1, 4, 4, 9, 0, 2, 7, 7]])
    with torch.no_grad():
        layer.distilled.centroids.mul_(-1.0)  # make the two routers disagree somewhere
    x = torch.randn(1, 8, 8)
    y = layer(x, ids)
    learned = layer.router(x[0])[0].argmax(-1)
    distilled = layer.distilled.route(ids[0])
    assert not torch.equal(learned, distilled)
    expert_T = distilled if eval_router == "distilled" else learned
    assert torch.equal(layer.last_expert_index[0, :, 0], expert_T)
    torch.testing.assert_close(y[0], manual_top1(layer, x[0], expert_T, sigmoid_gate(layer, x[0], expert_T)))
    assert not layer.distilled.frozen and layer.last_losses.distill_loss.item() == 0.0  # no distillation in eval
    layer.train()  # training in stage 1 always routes by the learned scores
    layer(x, ids)
    assert torch.equal(layer.last_expert_index[0, :, 0], learned)


def test_layer_reads_checkpoints_from_before_the_router_classes() -> None:
    # hash tables and light routers were saved as `hash_table_V` and `distilled.*` on the layer
    for routing, old_prefix in (("stablemoe", "distilled."), ("hash", "hash_table_V")):
        layer = top1_layer(routing, hash_seed=1)
        state = {
            (k.replace("router.", "", 1) if k.startswith("router." + old_prefix) else k): v.clone()
            for k, v in layer.state_dict().items()
        }
        assert any(k.startswith(old_prefix) for k in state)
        torch.manual_seed(7)
        fresh = top1_layer(routing, hash_seed=2)
        fresh.load_state_dict(state)
        for key, value in layer.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], value), key


def test_stablemoe_distillation_trains_only_the_light_router() -> None:
    layer = top1_layer("stablemoe")
    ids = torch.tensor([1, 4, 4, 9, 0, 2])
    layer(torch.randn(6, 8), ids)
    layer.last_losses.distill_loss.backward()
    assert layer.router.weight.grad is None
    assert layer.experts.w_in_EDH.grad is None and layer.experts.w_out_EFD.grad is None
    assert layer.distilled.centroids.grad.abs().sum() > 0
    embed_grad = layer.distilled.embed.weight.grad
    seen = torch.zeros(10, dtype=torch.bool)
    seen[ids] = True
    assert embed_grad[seen].abs().sum(1).gt(0).all() and embed_grad[~seen].eq(0).all()


def test_stablemoe_stage2_freezes_the_distilled_router_for_good() -> None:
    layer = top1_layer("stablemoe", stage1_fraction=0.25)
    layer.on_train_progress(0.2)
    assert not layer.distilled.frozen
    assert all(p.requires_grad for p in layer.distilled.parameters())
    layer.on_train_progress(0.25)
    assert layer.distilled.frozen
    assert not any(p.requires_grad for p in layer.distilled.parameters())
    layer.on_train_progress(0.0)  # never back to stage 1
    assert layer.distilled.frozen and not any(p.requires_grad for p in layer.distilled.parameters())

    ids = torch.tensor([[1, 4, 4, 9, 0, 2, 7, 7]])
    routed = layer.distilled.route(ids[0])
    for scale in (1.0, -3.0):
        x = scale * torch.randn(1, 8, 8)
        y = layer(x, ids)
        assert torch.equal(layer.last_expert_index[0, :, 0], routed)
        expected = manual_top1(layer, x[0], routed, sigmoid_gate(layer, x[0], routed))
        torch.testing.assert_close(y[0], expected, rtol=1e-5, atol=1e-6)
        losses = layer.last_losses
        assert losses.aux_loss.item() == 0.0 and losses.aux_loss_scaled.item() == 0.0
        assert losses.distill_loss.item() == 0.0 and losses.distill_loss_scaled.item() == 0.0
    # the router still learns through the gate; the frozen light router does not
    layer(torch.randn(1, 8, 8), ids).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in layer.distilled.parameters())


def test_stablemoe_stage1_fraction_one_never_freezes() -> None:
    layer = top1_layer("stablemoe", stage1_fraction=1.0)
    layer.on_train_progress(1.0)  # the loop's call after the last step: "stage 1 only" stays in stage 1
    assert not layer.distilled.frozen and all(p.requires_grad for p in layer.distilled.parameters())
    immediate = top1_layer("stablemoe", stage1_fraction=0.0)
    immediate.on_train_progress(0.0)  # no stage 1 at all: the untrained distilled router routes from step 0
    assert immediate.distilled.frozen


def test_stablemoe_stage2_survives_a_state_dict_round_trip() -> None:
    layer = top1_layer("stablemoe", stage1_fraction=0.5)
    layer.on_train_progress(0.5)
    torch.manual_seed(123)  # the fresh layer starts from other weights
    fresh = top1_layer("stablemoe", stage1_fraction=0.5)
    assert not fresh.distilled.frozen
    fresh.load_state_dict(layer.state_dict())
    assert fresh.distilled.frozen
    fresh.on_train_progress(0.0)  # the loop calls it on resume: stays in stage 2 and stops the light router
    assert fresh.distilled.frozen and not any(p.requires_grad for p in fresh.distilled.parameters())
    ids = torch.arange(10)
    fresh(torch.randn(10, 8), ids)
    assert torch.equal(fresh.last_expert_index[:, 0], layer.distilled.route(ids))


# --- configuration --------------------------------------------------------------------------------------------


def test_top1_routings_validate_their_config() -> None:
    for routing in ("base", "hash", "stablemoe"):
        with pytest.raises(ValueError, match="top_k"):
            MoEConfig(routing=routing, top_k=2, vocab_size=10)
    for routing in ("hash", "stablemoe"):
        config = MoEConfig(routing=routing, top_k=1, d_model=8, d_ff=16, num_experts=4)
        with pytest.raises(ValueError, match=f"MoEConfig.routing='{routing}' needs MoEConfig.vocab_size"):
            MoELayer(config)
    with pytest.raises(ValueError, match="'hash', 'base', 'stablemoe'"):
        MoEConfig(routing="random_hash", top_k=1)


# --- end to end through the CLI -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


MAX_STEPS = 6
STAGE1_FRACTION = 0.5
FREEZE_STEP = math.ceil(STAGE1_FRACTION * MAX_STEPS)  # the loop freezes after the step that reaches the fraction


@pytest.mark.parametrize("routing", ["hash", "base", "stablemoe", "stablemoe-learned-eval"])
def test_pretrain_with_the_router_through_the_cli(routing: str, tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    extra = [f"moe.stage1_fraction={STAGE1_FRACTION}"] if routing.startswith("stablemoe") else []
    if routing == "stablemoe-learned-eval":  # the probe then sees the learned router in stage 1
        routing, extra = "stablemoe", [*extra, "moe.stage1_eval_router=learned"]
    result = run_cli(
        "pretrain", "tiny", f"moe={routing}", f"run_dir={run_dir}", f"data.cache_dir={cache_dir}", "logger=csv",
        "logger.progress=false", f"train.max_steps={MAX_STEPS}", "train.eval_every=3", "train.ckpt_every=3",
        "train.log_every=1", "train.fluctuation_every=1", "train.fluctuation_tokens=256", "train.threads=1", *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == MAX_STEPS
    assert math.isfinite(summary["final_val_loss"])
    assert summary["config"]["moe"]["routing"] == routing

    table = read_csv(run_dir / "fluctuation.csv")
    assert [int(r["step"]) for r in table] == list(range(MAX_STEPS + 1))
    train_rows = [r for r in read_csv(run_dir / "metrics.csv") if r.get("task_loss")]
    assert len(train_rows) == MAX_STEPS
    if routing == "hash":  # a token's expert is a function of its id: it never changes
        for row in table:
            assert float(row["changed_vs_prev"]) == float(row["changed_vs_final"]) == 0.0, row
    if routing == "base":  # every training batch (8 x 32 tokens, 4 experts) is split exactly evenly
        for row in train_rows:
            assert float(row["moe/1/load_imbalance"]) == 1.0 and float(row["moe/1/dropped_frac"]) == 0.0, row
    if routing == "stablemoe":
        ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
        assert bool(ckpt["model"]["transformer.blocks.1.ffn.router.distilled.frozen"])
        assert all(float(r["distill_loss"]) > 0 for r in train_rows[:FREEZE_STEP])
        assert all(float(r["distill_loss"]) == 0 for r in train_rows[FREEZE_STEP:])
        for row in table:
            step = int(row["step"])
            if step >= FREEZE_STEP:  # routed by the frozen light router from here on
                assert float(row["changed_vs_final"]) == 0.0, row
            if step > FREEZE_STEP:
                assert float(row["changed_vs_prev"]) == 0.0, row
        if extra[-1] == "moe.stage1_eval_router=learned":
            # the stage-1 routing differed: the freeze is what stopped the fluctuation
            assert float(table[FREEZE_STEP - 1]["changed_vs_final"]) > 0
