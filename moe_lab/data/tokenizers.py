"""Tokenizers behind one protocol: UTF-8 bytes (the default), any `transformers` tokenizer, trained BPE."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from moe_lab.hub import hub_reachable, hub_unavailable_error
from moe_lab.io import atomic_write

KINDS = ("byte", "hf", "bpe")
EOS_TOKEN = "<eos>"
PAD_TOKEN = "<pad>"


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) character offsets into `text`."""
        ...

    def decode(self, ids: list[int]) -> str: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then eos = 256 and pad = 257."""

    name = "byte"
    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text`."""
        return list(text.encode("utf-8"))

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Bytes and the character span of each (all bytes of a multi-byte character share its span)."""
        data = text.encode("utf-8")
        if len(data) == len(text):  # ASCII: byte i is character i
            return list(data), list(zip(range(len(data)), range(1, len(data) + 1), strict=True))
        bytes_B = np.frombuffer(data, dtype=np.uint8)
        # Continuation bytes look like 0b10xxxxxx; every other byte starts a new character.
        char_B = np.cumsum((bytes_B & 0xC0) != 0x80) - 1
        return list(data), list(zip(char_B.tolist(), (char_B + 1).tolist(), strict=True))

    def decode(self, ids: list[int]) -> str:
        """Text from byte ids; eos and pad are dropped, invalid UTF-8 becomes U+FFFD."""
        ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids_N.size and (ids_N.min() < 0 or ids_N.max() >= self.vocab_size):
            bad = ids_N[(ids_N < 0) | (ids_N >= self.vocab_size)][0]
            raise ValueError(f"token id {bad} is out of range: expected 0..{self.vocab_size - 1}")
        return ids_N[ids_N < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of every text."""
        return [list(text.encode("utf-8")) for text in texts]


def _in_hf_cache(name: str) -> bool:
    """Whether the local Hugging Face cache holds a tokenizer file for the Hub repo `name`."""
    from huggingface_hub import try_to_load_from_cache  # light: keeps transformers' import off the fast path

    for filename in ("tokenizer_config.json", "tokenizer.json"):
        try:
            if isinstance(try_to_load_from_cache(name, filename), str):
                return True
        except ValueError:  # not a valid repo id (huggingface_hub's HFValidationError)
            return False
    return False


class HFTokenizer:
    """A `transformers` tokenizer loaded by Hub name or local path; special tokens are not added."""

    def __init__(self, name_or_path: str) -> None:
        local = Path(name_or_path).expanduser()
        # Hub unreachable: a tokenizer already in the Hugging Face cache still loads (offline mode).
        cache_only = not local.exists() and not hub_reachable()
        if cache_only and not _in_hf_cache(name_or_path):
            # Fail in seconds: without this check transformers retries the Hub for ~25 s before giving up.
            raise hub_unavailable_error(
                f"cannot load tokenizer {name_or_path!r}",
                "Use a local tokenizer directory instead (tokenizer.name=/path/to/tokenizer_dir) "
                "or the default byte tokenizer (tokenizer=byte).",
            )
        from transformers import AutoTokenizer  # importing transformers takes seconds; only pay it here

        source = str(local) if local.exists() else name_or_path
        self._tok = AutoTokenizer.from_pretrained(source, local_files_only=cache_only)
        self.name = f"hf:{name_or_path}"
        self.vocab_size = len(self._tok)
        # Encoder-only tokenizers (BERT) have no eos; their sep token separates documents the same way.
        eos = self._tok.eos_token_id if self._tok.eos_token_id is not None else self._tok.sep_token_id
        if eos is None:
            raise ValueError(f"tokenizer {name_or_path!r} has neither an eos nor a sep token; expected one of them")
        self.eos_id = int(eos)
        self.pad_id = int(self._tok.pad_token_id if self._tok.pad_token_id is not None else eos)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""
        return self._tok(text, add_special_tokens=False, verbose=False)["input_ids"]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets; needs a tokenizer backed by the `tokenizers` library."""
        if not self._tok.is_fast:
            raise NotImplementedError(
                f"{self.name}: character offsets need a fast (tokenizers-backed) tokenizer, got "
                f"{type(self._tok).__name__}"
            )
        enc = self._tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return enc["input_ids"], [tuple(span) for span in enc["offset_mapping"]]

    def decode(self, ids: list[int]) -> str:
        """Text from token ids."""
        return self._tok.decode(ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of every text."""
        return self._tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]


class BPETokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` with `<eos>` and `<pad>` special tokens."""

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self._tok = tokenizer
        eos, pad = tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(PAD_TOKEN)
        if eos is None or pad is None:
            raise ValueError(f"BPE tokenizer lacks special tokens: expected {EOS_TOKEN!r} and {PAD_TOKEN!r}")
        self.eos_id, self.pad_id = eos, pad
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        # The hash tells apart tokenizers of one size trained on different texts (e.g. in cache keys).
        digest = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:8]
        self.name = f"bpe{self.vocab_size}-{digest}"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets; a token's span includes the space it starts with."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, list(enc.offsets)

    def decode(self, ids: list[int]) -> str:
        """Text from token ids; eos and pad are dropped."""
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of every text (in parallel, in the `tokenizers` library)."""
        return [enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json at `path` (a file, or a directory to hold it); return the file written."""
        path = _json_path(path)
        with atomic_write(path) as tmp:  # a killed process never leaves a truncated tokenizer.json
            tmp.write_text(self._tok.to_str(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Read a tokenizer saved by `save` (the file, or the directory holding tokenizer.json)."""
        return cls(tokenizers.Tokenizer.from_file(str(_json_path(path))))


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """One token as text for tables and plots: `<eos>` and `<pad>` by name (they decode to nothing), else
    its decoded text."""
    if token == tokenizer.eos_id:
        return EOS_TOKEN
    if token == tokenizer.pad_id:
        return PAD_TOKEN
    return tokenizer.decode([token])


def encode_context(tokenizer: Tokenizer, text: str) -> list[int]:
    """The tokens of `text` as a language model reads them just before the word that would follow it.

    A text ending in whitespace (a cloze cut before its answer, or GLUE's SST-2 sentences) loses the tokens that
    would reach past its end once a word followed: a BPE that starts each word with its space (GPT-2's, ours) then
    ends on the last word, where its pretraining predicted the next one, not on a lone space token it never saw
    end a context; a byte tokenizer keeps the space, the byte before every word. The next word is probed with
    "the", which any BPE trained on English-like text merges with its space (a rare letter might not be: a
    space the next word does not take stays). Fact recall splits a prompt from its answer the same way
    (moe_lab.train.recall). Other texts, and tokenizers without character offsets: `encode`."""
    if not text[-1:].isspace():
        return tokenizer.encode(text)
    try:
        ids, offsets = tokenizer.encode_with_offsets(text + "the")
    except NotImplementedError:  # a slow transformers tokenizer has no offsets
        return tokenizer.encode(text)
    return ids[: next((i for i, (_, end) in enumerate(offsets) if end > len(text)), len(ids))]


def _json_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path / "tokenizer.json" if path.is_dir() else path


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (fewer if the texts run out of merges)."""
    # No seed: training is deterministic, the same texts give the same merges in every process.
    min_size = len(pre_tokenizers.ByteLevel.alphabet()) + 2
    if vocab_size < min_size:
        raise ValueError(f"vocab_size={vocab_size!r}: expected >= {min_size} (256 bytes + {EOS_TOKEN}, {PAD_TOKEN})")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return BPETokenizer(tok)


def build_tokenizer(
    kind: str,
    name: str | None = None,
    vocab_size: int = 4096,
    train_texts: Iterable[str] | None = None,
    cache_path: Path | None = None,
) -> Tokenizer:
    """The tokenizer of `kind`: "byte", "hf" (Hub name or local path `name`) or "bpe" (trained or cached)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        if not name:
            raise ValueError("tokenizer kind 'hf' needs a name: a Hub name or a local tokenizer directory")
        return HFTokenizer(name)
    if kind == "bpe":
        # The caller keys cache_path by what the tokenizer depends on (texts, vocab_size); it is not checked.
        if cache_path is not None and _json_path(cache_path).is_file():
            return BPETokenizer.load(cache_path)
        if train_texts is None:
            raise ValueError(f"tokenizer kind 'bpe' needs train_texts (no tokenizer cached at {cache_path})")
        tok = train_bpe(train_texts, vocab_size)
        if cache_path is not None:
            tok.save(cache_path)
        return tok
    raise ValueError(f"unknown tokenizer kind {kind!r}: expected one of {', '.join(KINDS)}")
