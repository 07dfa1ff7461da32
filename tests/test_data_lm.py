"""Language-model data through `datasets`: the shared real corpora, local formats, packing, splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moe_lab.config import DataConfig, TokenizerConfig, compose, to_run_config
from moe_lab.data.lm import _sequences, build_lm_data, unigram_loss
from tests.conftest import SHARED, needs_shared


@needs_shared
def test_tinyshakespeare_through_the_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_LAB_SHARED", str(SHARED))
    run = to_run_config(compose("tiny", ["data=tinyshakespeare", f"data.cache_dir={tmp_path}"]))
    data = build_lm_data(run.data, run.tokenizer, seq_len=64)
    # every line's newline becomes one eos token, so the token count is the file's byte count: 1,115,394
    total = 1_115_394
    n_train = data.train_BS.shape[0] * 64 + 1
    assert n_train <= int(total * 0.9) < n_train + 64
    assert data.val_BS.shape[0] == (total - int(total * 0.9) - 1) // 64
    text = (SHARED / "data" / "tinyshakespeare" / "input.txt").read_text()
    assert bytes(data.train_BS[0, :14].tolist()).decode() == text[:14] == "First Citizen:"
    assert data.train_BS[0, 14].item() == 256  # eos where the first newline was
    assert data.unigram_val_loss == pytest.approx(3.3, abs=0.3)  # ~65 characters, English letter frequencies
    assert data.categories_train_BS is None


@needs_shared
def test_wikitext2_train_on_valid_validate_on_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_LAB_SHARED", str(SHARED))
    run = to_run_config(compose("tiny", ["data=wikitext2", f"data.cache_dir={tmp_path}"]))
    data = build_lm_data(run.data, run.tokenizer, seq_len=128)
    # bytes of each file (non-ASCII characters are several bytes), newlines -> eos
    assert data.train_BS.shape[0] == (1_121_681 - 1) // 128
    assert data.val_BS.shape[0] == (1_256_449 - 1) // 128


def test_local_json_csv_parquet_agree(tmp_path: Path) -> None:
    import pandas as pd

    texts = [f"document number {i} says hello" for i in range(50)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    pd.DataFrame({"body": texts}).to_csv(tmp_path / "d.tsv", sep="\t", index=False)
    pd.DataFrame({"body": texts}).to_parquet(tmp_path / "d.parquet")
    streams = []
    formats = [("json", "d.jsonl", {}), ("csv", "d.tsv", {"delimiter": "\t"}), ("parquet", "d.parquet", {})]
    for fmt, name, extra in formats:
        cfg = DataConfig(source="local", path=str(tmp_path / name), format=fmt, text_column="body",
                         cache_dir=str(tmp_path / f"cache-{fmt}"), **extra)  # fmt: skip
        data = build_lm_data(cfg, TokenizerConfig(), seq_len=16)
        streams.append(np.concatenate([data.train_BS[:, :-1].reshape(-1), data.val_BS[:, :-1].reshape(-1)]))
    assert all(np.array_equal(streams[0], s) for s in streams[1:])
    expected = np.frombuffer(b"document number 0 says hello", dtype=np.uint8)
    assert np.array_equal(streams[0][: len(expected)], expected)


def test_wrong_text_column_lists_the_columns(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"body": "hi"}\n')
    cfg = DataConfig(source="local", path=str(tmp_path / "d.jsonl"), format="json", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"no column 'text'; columns: \['body'\]"):
        build_lm_data(cfg, TokenizerConfig(), seq_len=4)


def test_synthetic_tokens_carry_their_categories(tmp_path: Path) -> None:
    from moe_lab.data.synthetic import CATEGORIES

    cfg = DataConfig(num_docs=100, cache_dir=str(tmp_path))
    data = build_lm_data(cfg, TokenizerConfig(), seq_len=32)
    assert data.categories_train_BS.shape == data.train_BS.shape
    ids, cats = data.train_BS.reshape(-1).numpy(), data.categories_train_BS.reshape(-1).numpy()
    space, period = ord(" "), ord(".")
    assert set(cats[ids == space]) == {CATEGORIES.index("whitespace")}
    # a period standing alone is punctuation ("12.50" keeps its period inside the number)
    lone_period = (ids[1:] == period) & (ids[:-1] == space)
    assert lone_period.sum() > 0
    assert set(cats[1:][lone_period]) == {CATEGORIES.index("punctuation")}
    digits = (ids >= ord("0")) & (ids <= ord("9"))
    assert set(cats[digits]) == {CATEGORIES.index("number")}
    # the cache: a second build reads the same arrays
    again = build_lm_data(cfg, TokenizerConfig(), seq_len=32)
    assert np.array_equal(again.train_BS, data.train_BS)


def test_bpe_tokenizer_is_trained_and_cached(tmp_path: Path) -> None:
    cfg = DataConfig(num_docs=200, cache_dir=str(tmp_path))
    data = build_lm_data(cfg, TokenizerConfig(kind="bpe", vocab_size=512), seq_len=32)
    assert data.vocab_size == 512
    assert data.tokenizer_name.startswith("bpe512")
    byte = build_lm_data(cfg, TokenizerConfig(), seq_len=32)
    assert data.train_tokens < byte.train_tokens / 2  # merges compress the text
    assert len(list(tmp_path.glob("bpe-*.json"))) == 1


def test_packing_predicts_every_token_once() -> None:
    ids = np.arange(10)
    seqs = _sequences(ids, 3)
    assert seqs.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]


def test_unigram_loss_closed_form() -> None:
    # train counts (+1 smoothing) over vocab 2: token 0 seen 3 times, token 1 once -> p = (4/6, 2/6)
    loss = unigram_loss(np.array([0, 0, 0, 1]), np.array([0, 1]), vocab_size=2)
    assert loss == pytest.approx(-(np.log(4 / 6) + np.log(2 / 6)) / 2)
