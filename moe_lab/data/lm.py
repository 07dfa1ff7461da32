"""Language-model data: documents from any source -> token ids -> fixed-length sequences, train/val split."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from moe_lab.config import DataConfig, TokenizerConfig
from moe_lab.data.sources import load_documents
from moe_lab.data.tokenizers import build_tokenizer
from moe_lab.io import atomic_write

CACHE_VERSION = 1


@dataclass
class LMData:
    """Token streams cut into sequences of seq_len + 1 (inputs and shifted targets)."""

    train_BS: torch.Tensor  # [N, seq_len + 1] long
    val_BS: torch.Tensor
    vocab_size: int
    tokenizer_name: str
    unigram_val_loss: float  # nats/token of a unigram model fitted on train, scored on val
    categories_train_BS: torch.Tensor | None = None  # synthetic only: category id of every token
    categories_val_BS: torch.Tensor | None = None

    @property
    def train_tokens(self) -> int:
        return self.train_BS.numel()


def unigram_loss(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of val under add-one-smoothed unigram frequencies of train."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[val_ids].mean())


def _cache_key(data: DataConfig, tok: TokenizerConfig) -> str:
    fields = {k: v for k, v in asdict(data).items() if k not in ("cache_dir", "val_fraction", "max_tokens")}
    blob = json.dumps({"v": CACHE_VERSION, "data": fields, "tok": asdict(tok)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _tokenize(docs, tokenizer, with_categories: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Concatenate every document's ids with an eos after each; categories too when the corpus has them."""
    from moe_lab.data.synthetic import CATEGORIES, char_categories, token_categories

    eos = tokenizer.eos_id

    def encode(batch: dict) -> dict:
        if not with_categories:
            return {"ids": [[*ids, eos] for ids in tokenizer.encode_batch(batch["text"])]}
        out_ids, out_cats = [], []
        for text, words in zip(batch["text"], batch["word_categories"], strict=True):
            ids, offsets = tokenizer.encode_with_offsets(text)
            cats = token_categories(offsets, char_categories(text, words))
            out_ids.append([*ids, eos])
            out_cats.append([*cats, CATEGORIES.index("punctuation")])  # eos ends a document like a period
        return {"ids": out_ids, "categories": out_cats}

    columns = docs.column_names
    encoded = docs.map(encode, batched=True, batch_size=1000, remove_columns=columns, desc="tokenizing")
    ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in encoded["ids"]]) if len(encoded) else np.empty(0)
    cats = None
    if with_categories:
        cats = np.concatenate([np.asarray(x, dtype=np.int8) for x in encoded["categories"]])
    return ids, cats


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_write(path, suffix=".npz") as tmp:  # np.savez would append .npz to any other name
        np.savez(tmp, **arrays)


def _sequences(ids: np.ndarray, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of seq_len + 1 tokens with stride seq_len (each target predicted once)."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"only {len(ids)} tokens: too few for one sequence of {seq_len + 1}")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(ids[idx])


def _too_few(split: str, num_tokens: int, seq_len: int, data: DataConfig) -> str:
    """The error for a split shorter than one sequence, naming the key that made it so."""
    need = f"too few for one sequence of {seq_len + 1} (train.seq_len={seq_len} + 1)"
    if data.max_tokens is not None:
        return (
            f"data.max_tokens={data.max_tokens} leaves only {num_tokens} {split} tokens: {need}; raise "
            "data.max_tokens or lower train.seq_len"
        )
    more = " or raise data.val_fraction" if split == "validation" and data.val_path is None else ""
    return f"the corpus has only {num_tokens} {split} tokens: {need}; lower train.seq_len{more}"


def lm_tokenizer(data: DataConfig, tok: TokenizerConfig, docs=None):
    """The tokenizer of a corpus: byte, a transformers one, or a BPE trained on it (cached beside the data)."""
    cache_dir = Path(os.path.expanduser(data.cache_dir))
    bpe_path = cache_dir / f"bpe-{_cache_key(data, tok)}.json"
    if tok.kind == "bpe" and not bpe_path.exists() and docs is None:
        docs = load_documents(data)
    return build_tokenizer(
        tok.kind,
        name=tok.name,
        vocab_size=tok.vocab_size,
        train_texts=iter(docs[0]["text"]) if docs is not None else None,
        cache_path=bpe_path,
    )


def build_lm_data(data: DataConfig, tok: TokenizerConfig, seq_len: int) -> LMData:
    """Load, tokenize (cached per data + tokenizer config), split and pack a corpus."""
    cache = Path(os.path.expanduser(data.cache_dir)) / f"tokens-{_cache_key(data, tok)}.npz"
    docs = None if cache.exists() else load_documents(data)
    tokenizer = lm_tokenizer(data, tok, docs)
    if cache.exists():
        arrays = dict(np.load(cache))
    else:
        train_docs, val_docs = docs
        with_cats = data.source == "synthetic"
        train_ids, train_cats = _tokenize(train_docs, tokenizer, with_cats)
        arrays = {"train_ids": train_ids}
        if train_cats is not None:
            arrays["train_cats"] = train_cats
        if val_docs is not None:
            val_ids, val_cats = _tokenize(val_docs, tokenizer, with_cats)
            arrays["val_ids"] = val_ids
            if val_cats is not None:
                arrays["val_cats"] = val_cats
        _save_arrays(cache, arrays)

    train_ids, val_ids = arrays["train_ids"], arrays.get("val_ids")
    train_cats, val_cats = arrays.get("train_cats"), arrays.get("val_cats")
    if data.max_tokens is not None:
        train_ids = train_ids[: data.max_tokens]
        train_cats = None if train_cats is None else train_cats[: data.max_tokens]
    if val_ids is None:  # the last val_fraction of the stream (nanoGPT's split, contiguous)
        cut = int(len(train_ids) * (1 - data.val_fraction))
        train_ids, val_ids = train_ids[:cut], train_ids[cut:]
        if train_cats is not None:
            train_cats, val_cats = train_cats[:cut], train_cats[cut:]
    for split, ids in (("training", train_ids), ("validation", val_ids)):
        if len(ids) < seq_len + 1:
            raise ValueError(_too_few(split, len(ids), seq_len, data))
    return LMData(
        train_BS=_sequences(train_ids, seq_len),
        val_BS=_sequences(val_ids, seq_len),
        vocab_size=tokenizer.vocab_size,
        tokenizer_name=tokenizer.name,
        unigram_val_loss=unigram_loss(train_ids, val_ids, tokenizer.vocab_size),
        categories_train_BS=None if train_cats is None else _sequences(train_cats.astype(np.int64), seq_len),
        categories_val_BS=None if val_cats is None else _sequences(val_cats.astype(np.int64), seq_len),
    )
