"""The training loop's parts in-process: accumulation, clipping, schedules, optimizers, precision, models."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moe_lab.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TokenizerConfig,
    TrainConfig,
    compose,
    to_run_config,
)
from moe_lab.data.lm import build_lm_data
from moe_lab.models import ClassifierModel, LanguageModel, count_parameters, flops_per_token, moe_layers
from moe_lab.moe import MoEConfig
from moe_lab.track import RunLogger
from moe_lab.train.loop import Trainer, train
from moe_lab.train.optim import UpdateClipper, lr_lambda
from moe_lab.train.pretrain import LMTask
from tests.conftest import DeviceSyncs, HostReads

TINY = ModelConfig(d_model=32, num_layers=2, num_heads=2, d_ff=64, max_seq_len=32, moe_every=2)
MOE = MoEConfig(d_model=32, d_ff=64, num_experts=4, top_k=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("cache")
    return build_lm_data(DataConfig(num_docs=150, cache_dir=str(cache)), TokenizerConfig(), seq_len=32)


def run_steps(model, data, tmp_path: Path, steps: int, batch: int, accum: int = 1, **optim) -> list[float]:
    torch.manual_seed(0)
    train_cfg = TrainConfig(max_steps=steps, batch_size=batch, grad_accum=accum, seq_len=32, eval_every=1000,
                            eval_batches=1, log_every=1, ckpt_every=1000)  # fmt: skip
    optim_cfg = OptimConfig(**{"warmup_steps": 0, "schedule": "constant", **optim})
    logger = RunLogger(tmp_path)
    train(model, LMTask(data, batch, seed=0, eval_batches=1), train_cfg, optim_cfg, tmp_path, logger,
          show_progress=False)  # fmt: skip
    return [float(r["task_loss"]) for r in logger.csv.rows if r.get("task_loss") not in (None, "")]


def test_gradient_accumulation_equals_the_full_batch(data, tmp_path: Path) -> None:
    dense = replace(TINY, moe_every=0)  # MoE capacity is per forward, so only a dense model is exactly equal
    torch.manual_seed(0)
    a = LanguageModel(dense, MOE, data.vocab_size)
    b = LanguageModel(dense, MOE, data.vocab_size)
    b.load_state_dict(a.state_dict())
    full = run_steps(a, data, tmp_path / "a", steps=4, batch=8)
    halves = run_steps(b, data, tmp_path / "b", steps=4, batch=4, accum=2)
    assert full == pytest.approx(halves, rel=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("optim", [{"name": "adamw"}, {"name": "adafactor", "lr": 1e-2, "update_clip": 1.0}])
def test_optimizers_reduce_the_loss(data, tmp_path: Path, optim: dict) -> None:
    torch.manual_seed(0)
    losses = run_steps(LanguageModel(TINY, MOE, data.vocab_size), data, tmp_path, steps=25, batch=8, **optim)
    assert losses[-1] < losses[0] - 0.5


def test_bf16_autocast_trains(data, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LanguageModel(TINY, MOE, data.vocab_size)
    train_cfg = TrainConfig(max_steps=3, batch_size=4, seq_len=32, precision="bf16", eval_every=3, eval_batches=1,
                            log_every=1, ckpt_every=100)  # fmt: skip
    result = train(model, LMTask(data, 4, 0, 1), train_cfg, OptimConfig(warmup_steps=0), tmp_path,
                   RunLogger(tmp_path), show_progress=False)  # fmt: skip
    assert result.status == "completed" and math.isfinite(result.eval["val_loss"])


def test_update_clipper_caps_the_rms_of_each_update_before_the_learning_rate() -> None:
    p = torch.nn.Parameter(torch.zeros(100))
    q = torch.nn.Parameter(torch.zeros(4))
    r = torch.nn.Parameter(torch.zeros(9))
    optimizer = torch.optim.SGD([{"params": [p, q], "lr": 0.5}, {"params": [r], "lr": 0.0}])
    clipper = UpdateClipper(optimizer, threshold=0.1)
    clipper.before_step()
    with torch.no_grad():
        p += 1.0  # unscaled RMS 1.0 / 0.5 = 2.0: scaled to 0.1, a change of lr * 0.1 = 0.05
        q += 0.04  # unscaled RMS 0.08: left alone
        r += 3.0  # a group at lr 0 has no unscaled update to measure: left alone
    clipper.after_step()
    torch.testing.assert_close(p.detach(), torch.full((100,), 0.05))
    torch.testing.assert_close(q.detach(), torch.full((4,), 0.04))
    torch.testing.assert_close(r.detach(), torch.full((9,), 3.0))


def test_lr_schedule_shapes() -> None:
    cfg = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    f = lr_lambda(cfg, max_steps=110)
    assert [f(0), f(4), f(9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)  # halfway through the cosine: 0.1 + 0.9 * 0.5
    assert f(110) == pytest.approx(0.1)
    assert lr_lambda(replace(cfg, schedule="linear"), 110)(60) == pytest.approx(0.55)
    assert lr_lambda(replace(cfg, schedule="rsqrt"), 110)(39) == pytest.approx(math.sqrt(10 / 40))
    assert lr_lambda(replace(cfg, schedule="constant"), 110)(100) == 1.0


def test_dense_twin_matches_the_sparse_models_active_compute() -> None:
    sparse = LanguageModel(TINY, MOE, 258)
    dense = LanguageModel(replace(TINY, sparse=False), MOE, 258)
    ps, pd = count_parameters(sparse), count_parameters(dense)
    router = TINY.d_model * MOE.num_experts
    assert ps["active"] - pd["active"] == router
    assert ps["total"] - ps["experts"] + ps["experts"] // 2 == ps["active"]  # top-2 of 4 experts
    fs, fd = flops_per_token(TINY, MOE, 258, 32), flops_per_token(replace(TINY, sparse=False), MOE, 258, 32)
    assert fs - fd == 2 * router


def test_moe_positions_follow_moe_every() -> None:
    def kinds(every: int) -> list[bool]:
        model = LanguageModel(replace(TINY, num_layers=8, moe_every=every), MOE, 258)
        return [type(b.ffn).__name__ == "MoELayer" for b in model.transformer.blocks]

    assert kinds(4) == [False, False, False, True] * 2  # ST-MoE: every 4th FFN
    assert kinds(1) == [True] * 8
    assert kinds(0) == [False] * 8


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dense_stacking", [False, True])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_classifier_ignores_padding(causal: bool, dense_stacking: bool, pooling: str) -> None:
    """An example's logits are those of the example alone, however much padding its batch adds, and its loss's
    gradients (MoE losses included) do not change when the batch is padded further."""
    torch.manual_seed(0)
    cfg = replace(TINY, num_layers=4, causal=causal, dense_stacking=dense_stacking)
    model = ClassifierModel(cfg, replace(MOE, train_capacity_factor=None, eval_capacity_factor=None), 258, 3, pooling)
    lengths = [10, 4, 7]
    examples = [torch.randint(0, 256, (n,)) for n in lengths]

    def batch(width: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(examples), width), 257)
        for row, x in enumerate(examples):
            ids[row, : len(x)] = x
        return ids, ids != 257

    model.eval()
    with torch.no_grad():
        alone = torch.cat([model(x[None]) for x in examples])
        for width in (10, 16):
            torch.testing.assert_close(model(*batch(width)), alone, rtol=1e-4, atol=1e-5)

    model.train()
    labels = torch.tensor([0, 2, 1])
    grads = []
    for width in (10, 16):
        model.zero_grad()
        ids, mask = batch(width)
        model.losses(ids, labels, mask).total.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for short, long in zip(*grads, strict=True):
        torch.testing.assert_close(short, long, rtol=1e-4, atol=1e-6)


def test_padding_takes_no_projection_or_ffn_work() -> None:
    """Every position-wise layer (attention's projections, dense and stacked FFNs, experts) sees only a padded
    batch's real tokens."""
    torch.manual_seed(0)
    model = ClassifierModel(replace(TINY, dense_stacking=True), MOE, 258, 2)
    rows: dict[str, int] = {}
    block = model.transformer.blocks[1]  # the MoE block, with a stacked dense FFN
    for name, module in [("qkv", block.attn.qkv), ("out", block.attn.out), ("stacked", block.stacked),
                         ("dense", model.transformer.blocks[0].ffn), ("moe", block.ffn)]:  # fmt: skip
        module.register_forward_hook(lambda m, args, out, name=name: rows.update({name: args[0].numel() // 32}))
    ids = torch.randint(0, 256, (3, 9))
    mask = torch.arange(9)[None, :] < torch.tensor([[9], [2], [5]])
    model(ids, mask)
    assert rows == dict.fromkeys(["qkv", "out", "stacked", "dense", "moe"], 16)


def test_padding_costs_one_host_read_per_forward() -> None:
    """Skipping the padding finds the real tokens once per forward (on CUDA a host read) and moves them with
    index ops, which read nothing: with the grouped_mm backend (no reads of its own) a padded forward and backward
    wait for the device once more than an unpadded one, however many blocks."""
    torch.manual_seed(0)
    moe = replace(MOE, backend="grouped_mm", train_capacity_factor=None, eval_capacity_factor=None)
    model = ClassifierModel(replace(TINY, num_layers=4, dense_stacking=True), moe, 258, 2)
    ids = torch.randint(0, 256, (3, 9))
    syncs = []
    for mask in (None, torch.arange(9)[None, :] < torch.tensor([[9], [2], [5]])):
        with DeviceSyncs() as counted:
            model.losses(ids, torch.tensor([0, 1, 0]), mask).total.backward()
        syncs.append(counted.ops)
    assert sorted(syncs[1]) == sorted([*syncs[0], "aten.nonzero.default"])


def test_output_z_loss_is_added() -> None:
    torch.manual_seed(0)
    model = LanguageModel(replace(TINY, output_z_loss_coef=1e-2), MOE, 258)
    ids = torch.randint(0, 258, (2, 8))
    losses = model.losses(ids, ids)
    logits = model(ids).float()
    assert losses.output_z.item() == pytest.approx(1e-2 * torch.logsumexp(logits, -1).square().mean().item(), rel=1e-5)


def test_eval_at_several_capacity_factors(data, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LanguageModel(TINY, replace(MOE, train_capacity_factor=0.5), data.vocab_size)
    train_cfg = TrainConfig(max_steps=4, batch_size=8, seq_len=32, eval_every=4, eval_batches=2, log_every=1,
                            ckpt_every=100, eval_capacity_factors=[0.25, 4.0])  # fmt: skip
    result = train(model, LMTask(data, 8, 0, 2), train_cfg, OptimConfig(warmup_steps=0), tmp_path,
                   RunLogger(tmp_path), show_progress=False)  # fmt: skip
    assert result.eval["dropped_frac@cf0.25"] > 0.3 and result.eval["dropped_frac@cf4"] == 0.0
    assert result.eval["val_loss@cf4"] != result.eval["val_loss@cf0.25"]
    # the layers are back at their own eval capacity factor
    assert all(layer.config.eval_capacity_factor == 2.0 for _, layer in moe_layers(model))
    assert "dropped_frac@cf4" not in result.best


def test_scale_multiplies_the_training_length() -> None:
    run = to_run_config(compose("tiny", ["scale=2.5"]))
    scaled = run.scaled()
    assert (scaled.train.max_steps, scaled.train.eval_every, scaled.train.ckpt_every) == (75, 25, 25)
    assert scaled.scale == 1.0 and run.scaled().scaled() == scaled
    with pytest.raises(ConfigError, match="scale must be > 0"):
        compose("tiny", ["scale=0"])


def test_a_step_reads_its_losses_once_however_many_micro_batches(data, tmp_path: Path) -> None:
    """The loss parts accumulate on the device and are read once per optimizer step (each read is a host sync
    on CUDA): a step of 4 micro-batches reads no more than a step of 1. With grouped_mm the MoE layers read
    nothing."""
    reads = []
    for accum in (1, 4):
        torch.manual_seed(0)
        model = LanguageModel(TINY, replace(MOE, backend="grouped_mm", train_capacity_factor=None), data.vocab_size)
        train_cfg = TrainConfig(max_steps=2, batch_size=8 // accum, grad_accum=accum, seq_len=32, eval_every=1000,
                                eval_batches=1, log_every=1, ckpt_every=1000, fluctuation_every=0)  # fmt: skip
        optim_cfg = OptimConfig(warmup_steps=0, schedule="constant")
        task = LMTask(data, 8 // accum, seed=0, eval_batches=1)
        trainer = Trainer(model, task, train_cfg, optim_cfg, tmp_path / str(accum), RunLogger(tmp_path / str(accum)))
        with HostReads() as host:
            trainer.step(0)
        reads.append(host.ours)
    assert reads == [2, 2]  # the step's losses, and its gradient norm


def test_weights_fingerprint_names_the_weights_not_how_they_are_held(tmp_path: Path) -> None:
    from moe_lab.train.checkpoint import load_checkpoint, save_checkpoint, weights_fingerprint

    torch.manual_seed(0)
    state = torch.nn.Linear(4, 3).state_dict()
    fingerprint = weights_fingerprint(state)
    save_checkpoint(tmp_path / "c.pt", {"model": state})
    assert weights_fingerprint(load_checkpoint(tmp_path / "c.pt")["model"]) == fingerprint  # saved and loaded
    assert weights_fingerprint(dict(reversed(state.items()))) == fingerprint  # in another order
    assert weights_fingerprint({k: v.t().contiguous().t() for k, v in state.items()}) == fingerprint  # other strides
    nudged = {**state, "bias": state["bias"].clone()}
    nudged["bias"][1] = torch.nextafter(nudged["bias"][1], torch.tensor(math.inf))  # one ulp of one weight
    renamed = {("b" if k == "bias" else k): v for k, v in state.items()}
    halved = {k: v.to(torch.bfloat16) for k, v in state.items()}
    reshaped = {**state, "weight": state["weight"].reshape(3, 2, 2)}
    others = [weights_fingerprint(s) for s in (nudged, renamed, halved, reshaped)]
    assert len({fingerprint, *others}) == 5
