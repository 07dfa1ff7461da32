"""Classification tasks for fine-tuning, all through `datasets`: SuperGLUE CB, GLUE SST-2, synthetic, local."""

from __future__ import annotations

import csv
import hashlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from moe_lab.config import TaskConfig
from moe_lab.data.sources import data_files, load_files
from moe_lab.data.tokenizers import encode_context
from moe_lab.hub import require_hub


@dataclass
class ClassificationData:
    """Tokenized, truncated examples."""

    train_ids: list[list[int]]
    train_labels: torch.Tensor
    val_ids: list[list[int]]
    val_labels: torch.Tensor
    num_classes: int
    label_names: list[str]


def _adjective_polarity(word: str) -> int:
    """A fixed hidden polarity of every adjective: +1 or -1 from a hash of the word."""
    return 1 if hashlib.sha256(f"polarity:{word}".encode()).digest()[0] % 2 else -1


def synthetic_sentiment(cache_dir: Path, num_train: int, num_val: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The word-list tasks (`synth-*`): sentences of the synthetic corpus labelled 1 if their adjectives are
    mostly "positive", else 0, by a hidden polarity that nothing in the corpus shows (a hash of the word).

    A model must memorise which adjectives are which, and pretraining cannot help: a few hundred examples
    cover few of them (the small task overfits), tens of thousands cover most. Sentences with no adjective or a
    tie are left out. Documents come from seed 1, not the pretraining corpus's seed 0.
    """
    from moe_lab.data.synthetic import CATEGORIES, load_synthetic

    adjective = CATEGORIES.index("adjective")
    needed = num_train + num_val
    num_docs = max(200, needed // 2)
    while True:
        docs = load_synthetic(cache_dir, num_docs=num_docs, seed=1)
        texts, labels = [], []
        for text, cats in zip(docs["text"], docs["word_categories"], strict=True):
            words, sentence, score = text.split(" "), [], 0
            for word, cat in zip(words, cats, strict=True):
                sentence.append(word)
                score += _adjective_polarity(word) if cat == adjective else 0
                if word in (".", "!", "?"):
                    if score:
                        texts.append(" ".join(sentence))
                        labels.append(int(score > 0))
                    sentence, score = [], 0
        if len(texts) >= needed:
            break
        num_docs *= 2
    # validation first, from the first documents: the small and the large task share it
    val = datasets.Dataset.from_dict({"text": texts[:num_val], "label": labels[:num_val]})
    train = datasets.Dataset.from_dict({"text": texts[num_val:needed], "label": labels[num_val:needed]})
    return train, val


def held_out_adjectives(words: dict[int, tuple[str, ...]]) -> frozenset[str]:
    """The polarity task's validation adjectives: half of the taught ones, and half of each valence (the
    adjectives of each valence in the order of a fixed hash, every second one), so that both halves are balanced."""
    from moe_lab.data.synthetic import valence

    unique = sorted({w for ws in words.values() for w in ws})
    held = set()
    for sign in (1, -1):
        ranked = sorted((w for w in unique if valence(w) == sign), key=lambda w: hashlib.sha256(w.encode()).digest())
        held.update(ranked[1::2])
    return frozenset(held)


def polarity_task(
    num_train: int, num_val: int, num_domains: int, held_out_only: bool = True
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The valence the pretraining corpus teaches, asked as a cloze: a cue sentence of the embedded language cut
    where its cue word would come ("what a wuky and "), labelled 1 if the corpus would go on with a pleasant word,
    0 if with an unpleasant one (moe_lab.data.synthetic).

    The adjectives cue sentences teach are split in two halves, each balanced in valence: the validation sentences
    ask about one. With `held_out_only` the training sentences ask about the other half alone, so only what
    pretraining learned of an adjective's valence answers the validation set, and a model trained from scratch
    stays at chance there (the small task); without it they ask about every taught adjective (the large task,
    which covers the validation adjectives). Tasks of any size share the validation set (the first `num_val`
    sentences of its stream)."""
    from moe_lab.data.synthetic import cue_contexts, valenced_adjectives

    words = valenced_adjectives(num_domains)
    held_out = held_out_adjectives(words)
    split = {
        held: {d: tuple(i for i, w in enumerate(ws) if (w in held_out) == held) for d, ws in words.items()}
        for held in (True, False)
    }

    def sentences(seed: int, adjectives: dict, n: int) -> datasets.Dataset:
        texts, labels = [], []
        for text, sign in itertools.islice(cue_contexts(seed, adjectives), n):
            texts.append(text)
            labels.append(int(sign > 0))
        return datasets.Dataset.from_dict({"text": texts, "label": labels})

    train_adjectives = split[False] if held_out_only else {d: tuple(range(len(ws))) for d, ws in words.items()}
    return sentences(2, train_adjectives, num_train), sentences(1, split[True], num_val)


def _load_file(path: str, cfg: TaskConfig) -> datasets.Dataset:
    kwargs = {}
    if cfg.format == "csv":
        # GLUE's tsv files are unquoted: a quote character is text, not a field delimiter
        kwargs = {"delimiter": cfg.delimiter or ",", "quoting": csv.QUOTE_NONE if cfg.delimiter == "\t" else 0}
    elif cfg.format != "json":
        raise ValueError(f"task.format={cfg.format!r} is not one of ['json', 'csv']")
    return load_files(cfg.format, data_files(path, "task path"), "task path", **kwargs)


def fact_verification(num_people: int, num_train: int, num_val: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """True/false statements about the pretraining corpus's people (moe_lab.data.facts.verification)."""
    from moe_lab.data.facts import verification
    from moe_lab.data.synthetic import LANGUAGE_SEED

    train, val = verification(num_people, LANGUAGE_SEED, num_train, num_val)

    def table(rows: list[tuple[str, int]]) -> datasets.Dataset:
        labels = [("false", "true")[y] for _, y in rows]
        return datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": labels})

    return table(train), table(val)


def load_task(
    cfg: TaskConfig, cache_dir: str, num_people: int = 0, num_domains: int = 4
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, validation) datasets with the task's columns; `num_people`: the pretraining corpus's people, which
    a facts task asks about; `num_domains`: its domains, whose adjectives a polarity task uses."""
    if cfg.source == "polarity":
        return polarity_task(cfg.synthetic_train, cfg.synthetic_val, num_domains, cfg.held_out_only)
    if cfg.source == "facts":
        if not num_people:
            raise ValueError(
                f"task {cfg.name!r} asks about the facts of the pretraining corpus, but the pretrained model's "
                "corpus has none: pretrain on data.source=synthetic with data.num_people > 0 and data.fact_fraction > 0"
            )
        return fact_verification(num_people, cfg.synthetic_train, cfg.synthetic_val)
    if cfg.source == "synthetic":
        return synthetic_sentiment(Path(os.path.expanduser(cache_dir)), cfg.synthetic_train, cfg.synthetic_val)
    if cfg.source in ("cb", "sst2", "local"):
        if not cfg.train_path or not cfg.val_path:
            raise ValueError(f"task {cfg.name!r} needs task.train_path and task.val_path")
        return _load_file(cfg.train_path, cfg), _load_file(cfg.val_path, cfg)
    if cfg.source == "hub":
        hint = "offline? point at local files: task.train_path=... task.val_path=... (see conf/task/cb.yaml)"
        require_hub(f"dataset {cfg.hub_name!r}", hint)
        ds = datasets.load_dataset(cfg.hub_name, cfg.hub_subset)
        return ds["train"], ds["validation"]
    raise ValueError(
        f"task.source={cfg.source!r} is not one of ['polarity', 'synthetic', 'facts', 'cb', 'sst2', 'local', 'hub']"
    )


def _label_names(cfg: TaskConfig, train: datasets.Dataset, val: datasets.Dataset) -> tuple[list[str], bool]:
    """(the classes, whether labels are looked up by name): task.label_names if given; else integer labels are
    the classes 0..C-1, and text labels are named by the data, sorted (the run's summary.json lists them)."""
    if cfg.label_names is not None:
        return list(cfg.label_names), True
    values = {v for ds in (train, val) for v in ds[cfg.label_column]}
    if None in values:
        raise ValueError(f"task {cfg.name!r}: some examples have no label in column {cfg.label_column!r}")
    if all(isinstance(v, str) for v in values):
        return sorted(values), True
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        shown = sorted(map(str, values))[:5]
        raise ValueError(
            f"task {cfg.name!r}: labels {shown} are neither all integers 0..C-1 nor all text; list the classes in "
            "order with task.label_names=[...]"
        )
    if min(values, default=0) < 0 or not values:
        raise ValueError(
            f"task {cfg.name!r}: integer labels must be 0..C-1, found {sorted(values)}; map them to 0..C-1 or "
            f"name the classes in order with task.label_names={sorted(map(str, values))}"
        )
    return [str(i) for i in range(max(values) + 1)], False


def build_classification_data(
    cfg: TaskConfig, tokenizer, cache_dir: str, seed: int, num_people: int = 0, num_domains: int = 4
) -> ClassificationData:
    """Load, label-map, tokenize and truncate a task's train and validation examples."""
    train, val = load_task(cfg, cache_dir, num_people, num_domains)
    for split, ds in (("train", train), ("validation", val)):
        missing = [c for c in [*cfg.text_columns, cfg.label_column] if c not in ds.column_names]
        if missing:
            raise ValueError(f"task {cfg.name!r} {split}: no column(s) {missing}; columns: {ds.column_names}")
    names, by_name = _label_names(cfg, train, val)
    if cfg.num_train is not None:
        train = train.shuffle(seed=seed).select(range(min(cfg.num_train, len(train))))

    def encode(ds: datasets.Dataset) -> tuple[list[list[int]], torch.Tensor]:
        texts = [" | ".join(str(row[c]) for c in cfg.text_columns) for row in ds]
        # a text ending in whitespace is read as the context before its next word (a polarity cloze; SST-2)
        encoded = zip(texts, tokenizer.encode_batch(texts), strict=True)
        ids = [(encode_context(tokenizer, t) if t[-1:].isspace() else x)[: cfg.max_len] for t, x in encoded]
        raw = ds[cfg.label_column]
        if by_name:
            text = [v if isinstance(v, str) or v is None else str(v) for v in raw]
            unknown = sorted({v for v in text if v not in names} - {None})
            if unknown or None in text:
                raise ValueError(f"task {cfg.name!r}: labels {unknown or [None]} not in task.label_names={names}")
            labels = [names.index(v) for v in text]
        else:
            labels = [int(v) for v in raw]
        return ids, torch.tensor(labels, dtype=torch.long)

    train_ids, train_labels = encode(train)
    val_ids, val_labels = encode(val)
    return ClassificationData(train_ids, train_labels, val_ids, val_labels, len(names), names)
