"""Routing fluctuation: the table's three measures, the summary, and the probe inside a real training run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from rich.console import Console

from moe_lab.config import compose, to_run_config
from moe_lab.models import LanguageModel
from moe_lab.models.transformer import moe_layers
from moe_lab.train.fluctuation import (
    PROBE_FILE,
    SPECIALISATION_FILE,
    TABLE_FILE,
    RoutingProbe,
    fluctuation_summary,
    fluctuation_table,
    metrics_paused,
    specialisation_table,
)
from moe_lab.train.pretrain import run_pretrain
from tests.conftest import SHARED, needs_shared

MEASURES = ["changed_vs_final", "changed_vs_prev", "still_fluctuating"]


def column(table: pd.DataFrame, name: str, layer: str) -> list[float]:
    return table.loc[table["layer"] == layer, name].tolist()


# --- fluctuation_table ----------------------------------------------------------------------------------------


def test_constant_routing_does_not_fluctuate() -> None:
    experts = np.tile(np.array([[0, 3, 1, 1, 2], [2, 2, 0, 1, 3]], dtype=np.uint8), (4, 1, 1))
    table = fluctuation_table(np.array([0, 5, 10, 15]), experts, ["1", "3"])
    assert len(table) == 8
    assert table["step"].tolist() == [0, 0, 5, 5, 10, 10, 15, 15]
    assert table["layer"].tolist() == ["1", "3"] * 4
    assert (table[MEASURES] == 0.0).all().all()


def test_hand_built_example() -> None:
    # token 0 never changes; token 1 changes once, after snapshot 0; token 2 leaves its final expert at
    # snapshot 1 and comes back; token 3 settles only at the end
    experts = np.array([[[0, 1, 2, 3]], [[0, 2, 3, 1]], [[0, 2, 2, 0]]], dtype=np.uint8)
    table = fluctuation_table(np.array([0, 10, 20]), experts, ["1"])
    assert table["step"].tolist() == [0, 10, 20]
    assert table["changed_vs_final"].tolist() == [0.5, 0.5, 0.0]  # tokens 1, 3; tokens 2, 3; none
    assert table["changed_vs_prev"].tolist() == [0.0, 0.75, 0.5]  # none; tokens 1, 2, 3; tokens 2, 3
    # last snapshot differing from the final expert: token 0 never, token 1 at 0, tokens 2 and 3 at 1
    assert table["still_fluctuating"].tolist() == [0.75, 0.5, 0.0]


def test_independent_random_routing_fluctuates_as_expected() -> None:
    rng = np.random.default_rng(0)
    num_snapshots, num_experts, num_tokens = 5, 4, 20_000
    experts = rng.integers(0, num_experts, size=(num_snapshots, 2, num_tokens)).astype(np.uint8)
    table = fluctuation_table(np.arange(num_snapshots) * 10, experts, ["1", "3"])
    changed = (num_experts - 1) / num_experts
    for layer_idx, layer in enumerate(["1", "3"]):
        vs_prev, vs_final = column(table, "changed_vs_prev", layer), column(table, "changed_vs_final", layer)
        still = column(table, "still_fluctuating", layer)
        assert vs_prev[0] == 0.0 and vs_final[-1] == 0.0 and still[-1] == 0.0
        assert vs_prev[1:] == pytest.approx([changed] * (num_snapshots - 1), abs=0.02)
        assert vs_final[:-1] == pytest.approx([changed] * (num_snapshots - 1), abs=0.02)
        final = experts[-1, layer_idx]
        for n in range(num_snapshots - 1):
            # differs from the final expert at some snapshot >= n; independent snapshots: 1 - (1/E)^(N-1-n)
            direct = float((experts[n:, layer_idx] != final).any(axis=0).mean())
            assert still[n] == direct
            assert still[n] == pytest.approx(1 - num_experts ** -(num_snapshots - 1 - n), abs=0.02)
            assert still[n] >= vs_final[n]


# --- fluctuation_summary --------------------------------------------------------------------------------------


def test_summary_takes_the_first_snapshot_at_or_after_each_fraction_averaged_over_layers() -> None:
    steps = [0, 5, 10, 15, 17, 20]
    still = {"1": [0.9, 0.8, 0.6, 0.4, 0.2, 0.0], "3": [0.7, 0.6, 0.2, 0.1, 0.0, 0.0]}
    rows = [(s, layer, still[layer][i]) for i, s in enumerate(steps) for layer in still]
    table = pd.DataFrame(rows, columns=["step", "layer", "still_fluctuating"])
    summary = fluctuation_summary(table, max_steps=20)
    # 20% of 20 = 4 -> step 5; 50% = 10 -> step 10 (at); 80% = 16 -> step 17
    assert summary == pytest.approx({"fluctuation@0.2": 0.7, "fluctuation@0.5": 0.4, "fluctuation@0.8": 0.1})
    assert list(summary) == ["fluctuation@0.2", "fluctuation@0.5", "fluctuation@0.8"]
    # a run whose snapshots stop before 80% reports only what it has
    assert list(fluctuation_summary(table[table["step"] <= 15], max_steps=20)) == ["fluctuation@0.2", "fluctuation@0.5"]
    assert fluctuation_summary(table.iloc[0:0], max_steps=20) == {}


# --- the probe in a real run ----------------------------------------------------------------------------------

MAX_STEPS = 6
EVERY = 2
PROBE_TOKENS = 200
SEQ_LEN = 32  # the tiny preset's


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tiny pretraining run with a routing probe every EVERY steps (in-process, checkpoints every 3 steps)."""
    root = tmp_path_factory.mktemp("probe-run")
    run_dir = root / "run"
    overrides = [
        f"run_dir={run_dir}", f"data.cache_dir={root / 'cache'}", "logger=csv", "logger.progress=false",
        f"train.max_steps={MAX_STEPS}", "train.eval_every=3", "train.ckpt_every=3", "train.log_every=1",
        f"train.fluctuation_every={EVERY}", f"train.fluctuation_tokens={PROBE_TOKENS}", "train.threads=1",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        summary = run_pretrain(compose("tiny", overrides), overrides, console=Console(quiet=True))
    finally:
        torch.set_num_threads(threads)
    return run_dir, summary


def test_probe_records_the_routing_of_a_run(probe_run: tuple[Path, dict]) -> None:
    run_dir, summary = probe_run
    assert summary["status"] == "completed"
    with np.load(run_dir / PROBE_FILE) as saved:
        steps, experts, layers = saved["steps"], saved["experts"], saved["layers"]
    assert steps.tolist() == [0, 2, 4, 6]  # before training, every EVERY steps, and the last step
    rows = -(-PROBE_TOKENS // SEQ_LEN)  # whole validation sequences covering PROBE_TOKENS
    assert experts.shape == (4, 1, rows * SEQ_LEN) and experts.dtype == np.uint8
    assert int(experts.max()) < 4
    assert layers.tolist() == ["1"]  # the tiny model's one MoE layer, in block 1

    table = pd.read_csv(run_dir / TABLE_FILE, dtype={"layer": str})
    expected = fluctuation_table(steps, experts, layers.tolist())
    pd.testing.assert_frame_equal(table, expected, check_dtype=False)
    # 80% of 6 steps is 4.8: only the final snapshot (the reference) is later, so @0.8 is left out
    summary_keys = {"fluctuation@0.2", "fluctuation@0.5"}
    assert summary_keys == {k for k in summary if k.startswith("fluctuation@")}
    assert {k: summary[k] for k in summary_keys} == pytest.approx(fluctuation_summary(expected, MAX_STEPS))
    assert json.loads((run_dir / "summary.json").read_text())["fluctuation@0.2"] == summary["fluctuation@0.2"]

    # every later snapshot also logs its change since the previous one
    with (run_dir / "metrics.csv").open() as f:
        key = "fluct/1/changed_vs_prev"
        logged = {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}
    assert logged == pytest.approx(dict(zip(steps[1:].tolist(), table["changed_vs_prev"][1:].tolist(), strict=True)))


def test_probe_resume_drops_the_snapshots_after_the_checkpoint(probe_run: tuple[Path, dict]) -> None:
    run_dir, _ = probe_run
    with np.load(run_dir / PROBE_FILE) as saved:
        experts = saved["experts"]
    probe = RoutingProbe(torch.zeros(1, SEQ_LEN, dtype=torch.long), EVERY, run_dir)
    probe.resume(3)
    assert probe.steps == [0, 2] and probe.layers == ["1"]
    assert len(probe.snapshots) == 2
    for got, want in zip(probe.snapshots, experts[:2], strict=True):
        assert np.array_equal(got, want)
    probe.resume(MAX_STEPS)
    assert probe.steps == [0, 2, 4, 6]
    empty = RoutingProbe(torch.zeros(1, SEQ_LEN, dtype=torch.long), EVERY, run_dir / "nowhere")
    empty.resume(3)
    assert empty.steps == [] and empty.snapshots == []


def tiny_model() -> LanguageModel:
    run = to_run_config(compose("tiny"))
    return LanguageModel(run.model, run.moe, 40)


def test_probe_forwards_leave_the_routing_metrics_alone(tmp_path: Path) -> None:
    model = tiny_model()
    ((_, layer),) = moe_layers(model)
    ids = torch.randint(0, 40, (2, 16))

    model.eval()
    with metrics_paused(model):
        model(ids)
        assert layer.track_metrics is False
    assert layer.track_metrics is True
    assert layer.metrics("eval") == {} and layer.metrics("train") == {}
    model(ids)  # the same forward outside the context counts
    assert layer.metrics("eval")["tokens_per_expert"]

    with pytest.raises(RuntimeError), metrics_paused(model):
        raise RuntimeError("a failing probe")
    assert layer.track_metrics is True

    model.train()
    probe = RoutingProbe(ids, every=2, run_dir=tmp_path)
    assert probe.snapshot(model, 0) == {}
    assert model.training  # routed in eval mode, then put back
    assert layer.metrics("eval") == {} and layer.metrics("train") == {}
    assert probe.snapshot(model, 0) == {} and probe.steps == [0]  # the same step twice is one snapshot
    changed = probe.snapshot(model, 2)
    assert list(changed) == ["fluct/1/changed_vs_prev"] and changed["fluct/1/changed_vs_prev"] == 0.0
    assert layer.metrics("eval") == {} and layer.metrics("train") == {}
    # the snapshot is the first choice in eval mode
    model.eval()
    model(ids)
    assert np.array_equal(probe.snapshots[-1][0], layer.last_expert_index[..., 0].reshape(-1).numpy())


def test_the_probe_records_expert_specialisation_by_word_category(probe_run: tuple[Path, dict]) -> None:
    from moe_lab.data.synthetic import CATEGORIES

    run_dir, _ = probe_run
    counts = pd.read_csv(run_dir / SPECIALISATION_FILE, dtype={"layer": str})
    with np.load(run_dir / PROBE_FILE) as saved:
        final = saved["experts"][-1, 0]
    assert list(counts.columns) == ["layer", "label", "expert", "tokens"]
    assert set(counts["label"]) <= set(CATEGORIES) and len(set(counts["label"])) > 2
    # every probe token has a category on the synthetic corpus, so the counts are the final snapshot's experts
    by_expert = counts.groupby("expert")["tokens"].sum()
    assert by_expert.to_dict() == {int(e): int(n) for e, n in zip(*np.unique(final, return_counts=True), strict=True)}


def test_specialisation_on_real_text_labels_the_most_frequent_tokens() -> None:
    from moe_lab.data.lm import LMData
    from moe_lab.train.pretrain import LMTask

    val = torch.tensor([[5, 5, 5, 5, 7, 9, 1], [3, 7, 3, 3, 3, 3, 2]])  # inputs: 3 x5, 5 x4, 7 x2, 9 x1
    data = LMData(train_BS=val.clone(), val_BS=val, vocab_size=10, tokenizer_name="test", unigram_val_loss=1.0)
    task = LMTask(data, batch_size=1, seed=0, eval_batches=1, token_name=lambda t: "abcdefghij"[t])
    ids = task.probe_ids(12)
    labels, names = task.probe_labels(12, top_tokens=2)
    assert names == ["'d'", "'f'"]  # tokens 3 and 5, named by the tokenizer
    assert torch.equal(labels == 0, ids == 3) and torch.equal(labels == 1, ids == 5)
    assert bool((labels[(ids != 3) & (ids != 5)] == -1).all())

    experts = np.array([[0, 1, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0]])
    table = specialisation_table(experts, np.array([0, 0, 1, -1, -1, 0, 1, 1, 0, 0, -1, 1]), ["1"], ["a", "b"])
    assert table.values.tolist() == [["1", "a", 0, 1], ["1", "a", 1, 4], ["1", "b", 0, 2], ["1", "b", 1, 2]]


@needs_shared
def test_specialisation_of_a_real_text_run_names_its_most_frequent_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moe_lab.data.lm import build_lm_data
    from moe_lab.data.tokenizers import ByteTokenizer

    monkeypatch.setenv("MOE_LAB_SHARED", str(SHARED))
    overrides = [
        "data=tinyshakespeare", f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
        "logger=csv", "logger.progress=false", "train.max_steps=2", "train.eval_every=2",
        "train.fluctuation_every=2", "train.fluctuation_tokens=1024", "train.threads=1",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        run_pretrain(compose("tiny", overrides), overrides, console=Console(quiet=True))
    finally:
        torch.set_num_threads(threads)
    counts = pd.read_csv(tmp_path / "run" / SPECIALISATION_FILE, dtype={"layer": str}, keep_default_na=False)

    run = to_run_config(compose("tiny", overrides))
    ids = build_lm_data(run.data, run.tokenizer, run.train.seq_len).val_BS
    with np.load(tmp_path / "run" / PROBE_FILE) as saved:
        num_tokens = saved["experts"].shape[-1]
    values = np.unique(ids[:, :-1].numpy())  # the probe's rows are a subset of these
    assert num_tokens >= 1024
    labels = set(counts["label"])
    assert len(labels) == 20 and "'<eos>'" in labels and "' '" in labels and "'e'" in labels  # newline = eos
    assert "''" not in labels  # no token is named by an empty string
    byte = ByteTokenizer()
    assert labels <= {repr(byte.decode([v])) if v < 256 else "'<eos>'" for v in values.tolist()}
    # every layer counts the same labelled tokens: each is routed to exactly one expert (top-1 probe snapshot)
    per_layer = counts.groupby("layer")["tokens"].sum()
    assert per_layer.nunique() == 1 and 0 < per_layer.iloc[0] < num_tokens
