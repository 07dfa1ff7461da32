"""A new router is one class and its spec: defined here alone, it is a valid `moe.routing`, trains through the real
training loop, and gets the step's expert loads after every optimizer step (`Router.post_step`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_lab.config import DataConfig, ModelConfig, OptimConfig, TokenizerConfig, TrainConfig, compose, to_run_config
from moe_lab.data.lm import build_lm_data
from moe_lab.models import LanguageModel, moe_layers
from moe_lab.moe import ROUTINGS, LearnedRouter, MoEConfig, RouterSpec, register_router, route_assigned
from moe_lab.track import RunLogger
from moe_lab.train.loop import train
from moe_lab.train.pretrain import LMTask

NAME = "test_bias_balanced"
BATCH, SEQ, ACCUM, STEPS = 4, 32, 2, 3


class BiasBalancedRouter(LearnedRouter):
    """Top-1 auxiliary-loss-free balancing in the manner of DeepSeek-V3: a per-expert bias, added to the scores for
    choosing only, moves after every step toward the experts that got fewer tokens than the mean."""

    rate = 0.1

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.register_buffer("bias_E", torch.zeros(config.num_experts))
        self.seen: list[torch.Tensor] = []

    def route(self, x_TD, token_ids_T, capacity_factor):
        cfg = self.config
        logits_TE, probs_TE = self(x_TD)
        expert_T = (probs_TE.detach() + self.bias_E).argmax(dim=-1)
        gate_T = probs_TE.gather(1, expert_T[:, None]).squeeze(1)
        routing = route_assigned(
            expert_T, gate_T, cfg.num_experts, capacity_factor, cfg.group_size, cfg.capacity_convention
        )
        return logits_TE, probs_TE, routing

    def post_step(self, loads_E: torch.Tensor) -> None:
        self.seen.append(loads_E.clone())
        self.bias_E += self.rate * torch.sign(loads_E.float().mean() - loads_E.float())


register_router(RouterSpec(NAME, BiasBalancedRouter, top1=True))


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The router is registered while this file's tests run, and no longer after."""
    assert ROUTINGS[NAME].router_class() is BiasBalancedRouter
    yield
    del ROUTINGS[NAME]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("cache")
    return build_lm_data(DataConfig(num_docs=150, cache_dir=str(cache)), TokenizerConfig(), seq_len=SEQ)


def _model(vocab_size: int) -> LanguageModel:
    model_cfg = ModelConfig(d_model=32, num_layers=2, num_heads=2, d_ff=64, max_seq_len=SEQ, moe_every=1)
    moe_cfg = MoEConfig(d_model=32, d_ff=64, num_experts=4, top_k=1, routing=NAME, train_capacity_factor=None)
    return LanguageModel(model_cfg, moe_cfg, vocab_size)


def _train(model: LanguageModel, data, run_dir: Path, batch: int) -> None:
    train_cfg = TrainConfig(max_steps=STEPS, batch_size=batch, grad_accum=ACCUM, seq_len=SEQ, eval_every=1000,
                            eval_batches=1, log_every=1, ckpt_every=1000)  # fmt: skip
    optim_cfg = OptimConfig(warmup_steps=0, schedule="constant")
    train(model, LMTask(data, batch, seed=0, eval_batches=1), train_cfg, optim_cfg, run_dir, RunLogger(run_dir),
          show_progress=False)  # fmt: skip


def test_the_configs_valid_routings_come_from_the_router_specs() -> None:
    assert NAME in ROUTINGS and list(ROUTINGS)[:5] == ["token_choice", "expert_choice", "hash", "base", "stablemoe"]
    run = to_run_config(compose("tiny", [f"moe.routing={NAME}", "moe.top_k=1"]))
    assert run.moe.routing == NAME
    with pytest.raises(ValueError, match="routes each token to one expert: top_k must be 1"):
        MoEConfig(routing=NAME, top_k=2)
    with pytest.raises(ValueError, match=rf"routing='nope' is not one of \[.*'{NAME}'\]"):
        MoEConfig(routing="nope")


def test_a_duplicate_router_name_is_refused() -> None:
    with pytest.raises(ValueError, match=f"router name '{NAME}' is taken by .*:BiasBalancedRouter"):
        register_router(RouterSpec(NAME, LearnedRouter, top1=True))
    register_router(RouterSpec(NAME, BiasBalancedRouter, top1=True))  # the same spec again: a reloaded module
    with pytest.raises(ValueError, match=r"router name 'hash' is taken by moe_lab\.moe\.routers:HashRouter"):
        register_router(RouterSpec("hash", "moe_lab.moe.routers:TokenChoiceRouter"))


def test_post_step_gets_each_steps_loads_after_the_update(data, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _model(data.vocab_size)
    layers = [layer for _, layer in moe_layers(model)]
    assert len(layers) == 2 and all(isinstance(layer.router, BiasBalancedRouter) for layer in layers)
    _train(model, data, tmp_path, BATCH)
    for layer in layers:
        router = layer.router
        assert len(router.seen) == STEPS  # once per optimizer step, not per micro-batch or forward
        for loads_E in router.seen:
            # every token of the step's micro-batches, top-1, before capacity; evaluation does not count
            assert loads_E.dtype == torch.long and loads_E.sum() == BATCH * SEQ * ACCUM
        assert router.bias_E.abs().sum() > 0  # the update ran and moved the bias
        expected = sum(torch.sign(s.float().mean() - s.float()) for s in router.seen) * router.rate
        torch.testing.assert_close(router.bias_E, expected)
    # the bias is router state: the checkpoint keeps it
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    torch.testing.assert_close(state["transformer.blocks.0.ffn.router.bias_E"], layers[0].router.bias_E)


def _worker(rank: int, store: str, cache: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        data = build_lm_data(DataConfig(num_docs=150, cache_dir=f"{cache}{rank}"), TokenizerConfig(), seq_len=SEQ)
        torch.manual_seed(0)
        model = _model(data.vocab_size)
        _train(model, data, Path(out).parent / f"run{rank}", 2 * BATCH)  # each rank trains on half of each batch
        routers = [layer.router for _, layer in moe_layers(model)]
        seen = [[loads_E.tolist() for loads_E in router.seen] for router in routers]
        result = {"seen": seen, "bias": [router.bias_E.tolist() for router in routers]}
    finally:
        dist.destroy_process_group()
    Path(f"{out}.{rank}").write_text(json.dumps(result))


def test_post_step_gets_the_loads_of_every_rank(tmp_path: Path) -> None:
    args = (str(tmp_path / "store"), str(tmp_path / "cache"), str(tmp_path / "result"))
    mp.spawn(_worker, args=args, nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"result.{rank}").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]  # the same loads, so the same bias on every rank
    for seen in ranks[0]["seen"]:
        assert len(seen) == STEPS
        assert all(sum(loads) == 2 * BATCH * SEQ * ACCUM for loads in seen)  # both ranks' tokens
