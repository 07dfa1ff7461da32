"""Tokenizers: byte round trips and offsets, trained BPE, fail-fast Hub loading, and the factory."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moe_lab.data.synthetic import (
    CATEGORIES,
    NEGATIVE_CUES,
    POSITIVE_CUES,
    char_categories,
    generate_documents,
    token_categories,
)
from moe_lab.data.tokenizers import (
    KINDS,
    BPETokenizer,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    build_tokenizer,
    encode_context,
    token_text,
    train_bpe,
)
from moe_lab.hub import HubUnavailableError, hub_reachable, require_hub

NON_ASCII = "naïve café — 東京 🚀 done"


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return generate_documents(300, seed=0)["text"][:]


@pytest.fixture(scope="module")
def bpe(corpus: list[str]) -> BPETokenizer:
    return train_bpe(corpus, vocab_size=600)


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No offline switch set, whatever the environment running the tests says."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_byte_tokenizer_round_trips_any_text() -> None:
    tok = ByteTokenizer()
    ids = tok.encode(NON_ASCII)
    assert ids == list(NON_ASCII.encode("utf-8")) and len(ids) > len(NON_ASCII)
    assert tok.decode(ids) == NON_ASCII
    assert tok.decode([tok.eos_id, *ids, tok.pad_id]) == NON_ASCII  # special tokens are not text
    assert tok.encode_batch([NON_ASCII, "ab", ""]) == [ids, [97, 98], []]
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
    with pytest.raises(ValueError, match=r"token id 258 .*0\.\.257"):
        tok.decode([104, 258])


def test_token_text_names_the_special_tokens(bpe: BPETokenizer) -> None:
    byte = ByteTokenizer()
    assert [token_text(byte, t) for t in (97, 10, byte.eos_id, byte.pad_id)] == ["a", "\n", "<eos>", "<pad>"]
    the = bpe.encode("the")
    assert [token_text(bpe, t) for t in (*the, bpe.eos_id, bpe.pad_id)] == [bpe.decode([t]) for t in the] + [
        "<eos>",
        "<pad>",
    ]


def test_byte_offsets_map_every_byte_of_a_character_to_it() -> None:
    tok = ByteTokenizer()
    ids, offsets = tok.encode_with_offsets("aé東🚀b")
    assert len(ids) == 1 + 2 + 3 + 4 + 1
    assert offsets == [(0, 1)] + [(1, 2)] * 2 + [(2, 3)] * 3 + [(3, 4)] * 4 + [(4, 5)]
    ids, offsets = tok.encode_with_offsets(NON_ASCII)
    for start, end in set(offsets):  # the bytes mapped to a span are exactly that span's encoding
        span_bytes = [i for i, span in zip(ids, offsets, strict=True) if span == (start, end)]
        assert bytes(span_bytes) == NON_ASCII[start:end].encode("utf-8")
    assert tok.encode_with_offsets("hi!") == ([104, 105, 33], [(0, 1), (1, 2), (2, 3)])


def test_bpe_round_trips_and_compresses(bpe: BPETokenizer) -> None:
    held_out = generate_documents(20, seed=1)["text"][:]
    encoded = bpe.encode_batch(held_out)
    assert encoded == [bpe.encode(text) for text in held_out]
    assert [bpe.decode(ids) for ids in encoded] == held_out
    num_bytes = sum(len(text.encode("utf-8")) for text in held_out)
    assert sum(map(len, encoded)) < 0.5 * num_bytes
    assert bpe.decode(bpe.encode(NON_ASCII)) == NON_ASCII  # byte-level: unseen characters still round-trip
    assert bpe.vocab_size == 600
    assert len({bpe.eos_id, bpe.pad_id}) == 2 and max(bpe.eos_id, bpe.pad_id) < bpe.vocab_size
    assert bpe.decode([bpe.eos_id, *bpe.encode("the end"), bpe.pad_id]) == "the end"


@given(st.text(max_size=40))
def test_a_byte_context_is_its_bytes_trailing_space_and_all(text: str) -> None:
    assert encode_context(ByteTokenizer(), text) == ByteTokenizer().encode(text)


def test_a_bpe_context_ends_on_its_last_word_where_the_next_word_begins(bpe: BPETokenizer) -> None:
    from moe_lab.data.tasks import polarity_task

    clozes = polarity_task(0, 40, 4)[1]["text"]  # "what a wuky and ": cut before the cue word
    assert all(text.endswith(" ") for text in clozes)
    for text in clozes:
        context = encode_context(bpe, text)
        assert bpe.decode(context) == text[:-1]
        assert bpe.encode(text)[:-1] == context and bpe.decode(bpe.encode(text)[-1:]) == " "  # encode: a lone space
        for cue in (*POSITIVE_CUES, *NEGATIVE_CUES):
            full = bpe.encode(text + cue)
            # the context's tokens are the ones the sentence has before its cue, and the cue follows whole
            assert full[: len(context)] == context and bpe.decode(full[len(context) :]) == f" {cue}"
    assert encode_context(bpe, "the end") == bpe.encode("the end")  # no trailing space: nothing to cut


def test_bpe_offsets_give_tokens_the_category_of_their_word(bpe: BPETokenizer) -> None:
    row = generate_documents(1, seed=2)[0]
    text = row["text"]
    ids, offsets = bpe.encode_with_offsets(text)
    assert len(ids) == len(offsets)
    assert "".join(text[s:e] for s, e in offsets) == text  # byte-level spans tile the text
    cats = token_categories(offsets, char_categories(text, row["word_categories"]))
    starts = {0} | {i + 1 for i, c in enumerate(text) if c == " "}
    word_cat = dict(zip(sorted(starts), row["word_categories"], strict=True))
    for (start, end), cat in zip(offsets, cats, strict=True):
        first = start + (text[start] == " ")
        if first < end and first in starts:  # a token that begins a word is labelled with that word
            assert CATEGORIES[cat] == CATEGORIES[word_cat[first]]


def test_bpe_saves_and_loads_identically(bpe: BPETokenizer, corpus: list[str], tmp_path: Path) -> None:
    path = bpe.save(tmp_path / "bpe" / "tokenizer.json")
    assert path.is_file()
    for loaded in (BPETokenizer.load(path), BPETokenizer.load(path.parent)):
        assert (loaded.name, loaded.vocab_size, loaded.eos_id, loaded.pad_id) == (
            bpe.name,
            bpe.vocab_size,
            bpe.eos_id,
            bpe.pad_id,
        )
        assert loaded.encode_batch(corpus[:20]) == bpe.encode_batch(corpus[:20])
    assert train_bpe(corpus, vocab_size=600).name == bpe.name  # training is deterministic
    assert train_bpe(corpus[:100], vocab_size=600).name != bpe.name  # the name tells the texts apart


def test_build_tokenizer(corpus: list[str], tmp_path: Path) -> None:
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="nope") as err:
        build_tokenizer("nope")
    assert all(kind in str(err.value) for kind in ("byte", "hf", "bpe")) and KINDS == ("byte", "hf", "bpe")
    with pytest.raises(ValueError, match="needs a name"):
        build_tokenizer("hf")
    with pytest.raises(ValueError, match="needs train_texts"):
        build_tokenizer("bpe", cache_path=tmp_path / "missing.json")
    cache = tmp_path / "bpe.json"
    trained = build_tokenizer("bpe", vocab_size=400, train_texts=corpus, cache_path=cache)
    assert cache.is_file() and trained.vocab_size == 400
    cached = build_tokenizer("bpe", vocab_size=400, cache_path=cache)  # no texts: must come from the cache
    assert cached.name == trained.name
    for tok in (trained, build_tokenizer("byte")):
        assert isinstance(tok, Tokenizer)


def test_hf_tokenizer_fails_fast_when_offline(online: pytest.MonkeyPatch) -> None:
    online.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(HubUnavailableError) as err:
        HFTokenizer("moe-lab-tests/no-such-tokenizer")
    assert time.monotonic() - start < 5
    message = str(err.value)
    for part in ("moe-lab-tests/no-such-tokenizer", "unreachable", "tokenizer.name=", "tokenizer=byte"):
        assert part in message
    assert isinstance(err.value, RuntimeError)


def test_hf_tokenizer_loads_a_local_directory_offline(bpe: BPETokenizer, online, tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    online.setenv("HF_HUB_OFFLINE", "1")  # a local path needs no Hub
    wrapped = PreTrainedTokenizerFast(tokenizer_object=bpe._tok, eos_token="<eos>", pad_token="<pad>")
    wrapped.save_pretrained(tmp_path / "with_pad")
    PreTrainedTokenizerFast(tokenizer_object=bpe._tok, eos_token="<eos>").save_pretrained(tmp_path / "no_pad")
    tok = HFTokenizer(str(tmp_path / "with_pad"))
    text = "the chef stirs 3 cups of flour . " + NON_ASCII
    assert tok.encode(text) == bpe.encode(text)
    assert tok.encode_with_offsets(text) == bpe.encode_with_offsets(text)
    assert tok.encode_batch([text, "ok"]) == bpe.encode_batch([text, "ok"])
    assert tok.decode(tok.encode(text)) == text
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (bpe.vocab_size, bpe.eos_id, bpe.pad_id)
    assert isinstance(tok, Tokenizer)
    assert HFTokenizer(str(tmp_path / "no_pad")).pad_id == bpe.eos_id  # pad falls back to eos


def test_hf_tokenizer_offline_still_loads_from_the_hf_cache(bpe: BPETokenizer, online, tmp_path: Path) -> None:
    from huggingface_hub import constants
    from transformers import PreTrainedTokenizerFast

    repo = tmp_path / "models--moe-lab-tests--cached-tokenizer"  # the Hub cache layout
    commit = "0123456789" * 4
    PreTrainedTokenizerFast(tokenizer_object=bpe._tok, eos_token="<eos>").save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / ".no_exist" / commit).mkdir(parents=True)  # how the cache records "the repo has no config.json"
    (repo / ".no_exist" / commit / "config.json").touch()
    online.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    online.setenv("HF_HUB_OFFLINE", "1")
    tok = HFTokenizer("moe-lab-tests/cached-tokenizer")
    assert tok.encode(NON_ASCII) == bpe.encode(NON_ASCII)
    with pytest.raises(HubUnavailableError):
        HFTokenizer("moe-lab-tests/not-cached")


def test_hub_reachable_follows_hf_endpoint(online: pytest.MonkeyPatch) -> None:
    online.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: closed, refused at once
    start = time.monotonic()
    assert hub_reachable() is False
    assert time.monotonic() - start < 2
    with socket.socket() as server:  # a listening port stands in for a reachable Hub
        server.bind(("127.0.0.1", 0))
        server.listen()
        online.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_reachable() is True
        require_hub("dataset x", "hint y")  # does not raise
        for var, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "true")):
            with online.context() as env:
                env.setenv(var, value)
                assert hub_reachable() is False
                with pytest.raises(HubUnavailableError, match=r"dataset x: .*unreachable.*hint y"):
                    require_hub("dataset x", "hint y")
