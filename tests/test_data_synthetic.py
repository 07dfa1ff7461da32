"""The synthetic corpus: deterministic, labelled with meaningful categories, cached, and learnable."""

from __future__ import annotations

import collections
import itertools
import math
from pathlib import Path

import datasets
import pytest
import torch

from moe_lab.config import ModelConfig
from moe_lab.data import synthetic, tasks
from moe_lab.data.facts import VALUE_CATEGORIES
from moe_lab.data.synthetic import (
    CATEGORIES,
    DOMAINS,
    char_categories,
    generate_documents,
    load_synthetic,
    token_categories,
)
from moe_lab.data.tokenizers import ByteTokenizer, encode_context, train_bpe
from moe_lab.models import LanguageModel
from moe_lab.moe import MoEConfig
from moe_lab.train.recall import ValenceRecall

CAT = {name: i for i, name in enumerate(CATEGORIES)}

# Written out here rather than imported, so the test checks the labels against English, not against itself.
_ENGLISH_FUNCTION_WORDS = """
the a an this that these those every each some any no its their his her it they he she we of in on at to with
and but or nor for from by after before during while than then so because as into over under near about around
against toward towards up down did does do will would can could
"""
ENGLISH_FUNCTION_WORDS = set(_ENGLISH_FUNCTION_WORDS.split())


@pytest.fixture(scope="module")
def docs():
    return generate_documents(400, seed=0, num_domains=8)


def word_labels(ds) -> list[tuple[str, int, int]]:
    """(word, category, domain) for every word of every document."""
    return [
        (word, cat, row["domain"])
        for row in ds
        for word, cat in zip(row["text"].split(" "), row["word_categories"], strict=True)
    ]


def test_same_seed_gives_the_same_corpus_and_another_seed_another(docs) -> None:
    assert generate_documents(400, seed=0, num_domains=8).to_dict() == docs.to_dict()
    other = generate_documents(400, seed=1, num_domains=8)
    assert other["text"][:] != docs["text"][:]
    # A smaller corpus is a prefix of a larger one with the same seed.
    assert generate_documents(50, seed=0, num_domains=8).to_dict() == docs.select(range(50)).to_dict()


def test_one_category_per_word(docs) -> None:
    assert docs.column_names == ["text", "domain", "word_categories"]
    for row in docs:
        words = row["text"].split(" ")
        assert len(words) == len(row["word_categories"])
        assert all(words), "empty word: double or trailing space"


def test_categories_are_meaningful(docs) -> None:
    by_category = collections.defaultdict(set)
    category_of = collections.defaultdict(set)
    for word, cat, _ in word_labels(docs):
        by_category[CATEGORIES[cat]].add(word)
        category_of[word].add(cat)
    # a corpus without biographies has every category but whitespace and the facts' values
    assert set(by_category) == set(CATEGORIES) - {"whitespace", *VALUE_CATEGORIES}, "every word category occurs"
    assert by_category["punctuation"] <= set(".,!?;:$%-()")
    for word in by_category["number"]:
        float(word.replace(",", ""))  # raises if a "number" is not one
    assert by_category["function_word"] <= ENGLISH_FUNCTION_WORDS
    assert all(w.isalpha() and w[0].isupper() and w[1:].islower() for w in by_category["proper_name"])
    for name in ("noun", "verb", "adjective"):
        assert all(w.isalpha() and w.islower() for w in by_category[name]), name
        assert len(by_category[name]) > 150, f"{name}: the vocabulary should be large"
    # A word means one thing: ground-truth analysis can key on the surface form.
    assert all(len(cats) == 1 for cats in category_of.values())


def test_documents_are_several_sentences() -> None:
    for lo, hi in [(3, 8), (2, 2)]:
        for text in generate_documents(60, seed=5, sentences_per_doc=(lo, hi))["text"]:
            words = text.split(" ")
            assert lo <= sum(w in {".", "!", "?"} for w in words) <= hi
            assert words[-1] in {".", "!", "?"}


def test_every_domain_appears_and_only_the_requested_ones(docs) -> None:
    assert set(docs["domain"]) == set(range(len(DOMAINS)))
    assert set(generate_documents(100, seed=0, num_domains=3)["domain"]) == {0, 1, 2}
    with pytest.raises(ValueError, match=r"1\.\.8"):
        generate_documents(1, num_domains=len(DOMAINS) + 1)


def test_domains_have_their_own_vocabulary_and_number_formats(docs) -> None:
    nouns = collections.defaultdict(set)
    words = collections.defaultdict(set)
    for word, cat, domain in word_labels(docs):
        words[DOMAINS[domain]].add(word)
        if cat == CAT["noun"]:
            nouns[domain].add(word)
    for a, b in itertools.combinations(sorted(nouns), 2):
        jaccard = len(nouns[a] & nouns[b]) / len(nouns[a] | nouns[b])
        assert jaccard < 0.15, (DOMAINS[a], DOMAINS[b], jaccard)
    assert "$" in words["finance"] and "$" not in words["cooking"]
    assert "cups" in words["cooking"] and "cups" not in words["sports"]
    assert "points" in words["sports"] and "points" not in words["finance"]


def test_char_and_token_categories_on_a_hand_written_example() -> None:
    text = "the chef stirs 3 cups ."
    cats = [CAT[c] for c in ("function_word", "noun", "verb", "number", "noun", "punctuation")]
    fw, noun, verb, num, punct, ws = (
        CAT[c] for c in ("function_word", "noun", "verb", "number", "punctuation", "whitespace")
    )
    chars = char_categories(text, cats)
    assert chars == [fw] * 3 + [ws] + [noun] * 4 + [ws] + [verb] * 5 + [ws, num, ws] + [noun] * 4 + [
        ws,
        punct,
    ]
    assert len(chars) == len(text)
    # Tokens as a byte-level BPE cuts them: a leading space belongs to the token that follows it.
    offsets = [(0, 3), (3, 8), (8, 12), (12, 14), (14, 15), (15, 16), (16, 21), (21, 23), (23, 23)]
    assert token_categories(offsets, chars) == [fw, noun, verb, verb, ws, num, noun, punct, ws]
    with pytest.raises(ValueError, match="6 space-separated words"):
        char_categories(text, cats[:-1])
    with pytest.raises(ValueError, match=r"token offsets \(20, 30\)"):
        token_categories([(20, 30)], chars)


def test_load_synthetic_reads_the_cache_the_second_time(tmp_path: Path, monkeypatch) -> None:
    expected = generate_documents(30, seed=3).to_dict()
    first = load_synthetic(tmp_path, num_docs=30, seed=3)
    (entry,) = tmp_path.iterdir()  # one complete cache directory, no temporary leftovers
    assert entry.name.startswith("synthetic-")

    def fail(*args, **kwargs):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr(synthetic, "generate_documents", fail)
    second = load_synthetic(tmp_path, num_docs=30, seed=3)
    assert first.to_dict() == second.to_dict() == expected
    with pytest.raises(AssertionError, match="generated again"):  # other parameters, other cache entry
        load_synthetic(tmp_path, num_docs=30, seed=4)


def test_an_interrupted_write_leaves_no_cache(tmp_path: Path, monkeypatch) -> None:
    def save_then_die(self, path: str, *args, **kwargs) -> None:
        Path(path, "data-00000-of-00001.arrow").write_text("half written")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(datasets.Dataset, "save_to_disk", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            load_synthetic(tmp_path, num_docs=5)
    assert list(tmp_path.iterdir()) == []
    assert load_synthetic(tmp_path, num_docs=5).to_dict() == generate_documents(5).to_dict()


def test_a_bigram_model_beats_a_unigram_model_by_over_one_nat() -> None:
    words = " ".join(generate_documents(2000, seed=11)["text"]).split(" ")
    cut = int(0.8 * len(words))
    train, test = words[:cut], words[cut:]
    unigram = collections.Counter(train)
    bigram = collections.Counter(itertools.pairwise(train))
    total, vocab = len(train), len(unigram) + 1  # +1: unseen words share one add-one slot

    def p_unigram(w: str) -> float:
        return (unigram[w] + 1) / (total + vocab)

    beta = 2.0  # Dirichlet smoothing of the bigram towards the unigram
    pairs = list(itertools.pairwise(test))
    h_unigram = -sum(math.log(p_unigram(w)) for _, w in pairs) / len(pairs)
    h_bigram = -sum(math.log((bigram[v, w] + beta * p_unigram(w)) / (unigram[v] + beta)) for v, w in pairs)
    h_bigram /= len(pairs)
    assert h_unigram - h_bigram > 1.0, (h_unigram, h_bigram)


# --- valence: cue sentences and the polarity task -------------------------------------------------------------------


def test_cue_sentences_teach_each_taught_adjective_its_valence() -> None:
    plain = synthetic.generate_documents(400, seed=3)
    cued = synthetic.generate_documents(400, seed=3, valence_cues=True)
    cues = {c: 1 for c in synthetic.POSITIVE_CUES} | {c: -1 for c in synthetic.NEGATIVE_CUES}
    assert not any(w in cues for text in plain["text"] for w in text.split())  # no cue without valence_cues
    taught = {w for ws in synthetic.valenced_adjectives(4).values() for w in ws}
    seen, pairs = collections.Counter(), 0
    for text in cued["text"]:
        words = text.split()
        for i, word in enumerate(words):
            if word in cues:
                # the cue follows its adjective: "was wuky and lovely", "a wuky and lovely N", "wuky N , and it was"
                adjective = next(w for w in reversed(words[max(0, i - 6) : i]) if w in taught)
                assert synthetic.valence(adjective) == cues[word], (adjective, word)
                seen[adjective] += 1
                pairs += 1
    assert pairs > 500 and len(seen) == len(taught)  # every taught adjective, uniformly drawn
    assert len(taught) == 61  # 16 per domain over 4 domains; some general adjectives are in every domain


def test_the_polarity_task_asks_about_adjectives_its_small_training_set_never_shows() -> None:
    small_train, val = tasks.polarity_task(250, 2000, 4)
    large_train, large_val = tasks.polarity_task(3000, 2000, 4, held_out_only=False)
    assert val["text"] == large_val["text"] and val["label"] == large_val["label"]  # one shared validation set
    taught = synthetic.valenced_adjectives(4)
    held = tasks.held_out_adjectives(taught)
    every = {w for ws in taught.values() for w in ws}
    assert {synthetic.valence(w) for w in held} == {1, -1}
    # the halves are balanced: as many pleasant adjectives held out as kept, within one
    assert abs(sum(synthetic.valence(w) > 0 for w in held) - sum(synthetic.valence(w) > 0 for w in every - held)) <= 1

    def asked(dataset) -> list[str]:
        return [next(w for w in text.split() if w in every) for text in dataset["text"]]

    assert set(asked(val)) == held
    assert set(asked(small_train)).isdisjoint(held)
    assert set(asked(large_train)) == every  # the large task covers the validation adjectives too
    for dataset in (small_train, val, large_train):
        for text, label, adjective in zip(dataset["text"], dataset["label"], asked(dataset), strict=True):
            assert text.endswith(" ") and not set(text.split()) & set(synthetic.POSITIVE_CUES + synthetic.NEGATIVE_CUES)
            assert label == int(synthetic.valence(adjective) > 0)
    assert 0.4 < sum(val["label"]) / len(val) < 0.65


# --- valence recall: what a pretrained model learnt of the cue sentences --------------------------------------------


class _ValenceOracle(torch.nn.Module):
    """Puts a logit of 5 on each next token of the rows whose cue word has the valence of its sentence, flipped for
    the sentences in `wrong`, and 0 everywhere else (byte vocabulary)."""

    def __init__(self, recall: ValenceRecall, wrong: set[int]) -> None:
        super().__init__()
        self.rows = {tuple(r.tolist()): i for i, r in enumerate(recall.ids_RL[:, :-1])}
        self.recall, self.wrong = recall, wrong

    def forward(self, ids_BS: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids_BS.shape, 258)
        words = len(self.recall.words)
        for b, row in enumerate(ids_BS):
            r = self.rows[tuple(row.tolist())]
            sentence, word = divmod(r, words)
            pleasant = (word < self.recall.positive) == (self.recall.signs[sentence] > 0)
            if pleasant != (sentence in self.wrong):
                nxt = self.recall.ids_RL[r, 1:]
                logits[b, torch.arange(len(nxt)), nxt] = 5.0
        return logits


def test_valence_recall_scores_the_cue_words_after_each_sentence() -> None:
    taught = {d: tuple(range(len(ws))) for d, ws in synthetic.valenced_adjectives(4).items()}
    sentences = list(itertools.islice(synthetic.cue_contexts(3, taught), 9))
    recall = ValenceRecall(sentences, ByteTokenizer(), max_len=128)
    cues = (*synthetic.POSITIVE_CUES, *synthetic.NEGATIVE_CUES)
    # a row per (sentence, cue word): eos + sentence + word, the word's bytes scored and nothing else
    for r, (ids, scored) in enumerate(zip(recall.ids_RL, recall.scored_RL, strict=True)):
        text, word = sentences[r // len(cues)][0], cues[r % len(cues)]
        length = 1 + len((text + word).encode())
        assert bytes(ids[1:length].tolist()).decode() == text + word
        assert scored.nonzero().flatten().tolist() == list(range(length - 1 - len(word), length - 1))
    out, records = recall.evaluate(_ValenceOracle(recall, set()), torch.device("cpu"), batch_size=5)
    assert out["valence_recall"] == 1.0
    out, records = recall.evaluate(_ValenceOracle(recall, {2, 7}), torch.device("cpu"), batch_size=5)
    assert out["valence_recall"] == pytest.approx(7 / 9)
    assert records["hit"].tolist() == [int(n not in (2, 7)) for n in range(9)]
    assert records["valence"].tolist() == [sign for _, sign in sentences]
    assert ((records["log_odds"] > 0) == (records["valence"] > 0)).tolist() == records["hit"].astype(bool).tolist()
    # a model of a shorter context reads each sentence from its end, the cue word whole
    short = ValenceRecall(sentences, ByteTokenizer(), max_len=20)
    assert short.ids_RL.shape[1] == 21
    for r, (ids, scored) in enumerate(zip(short.ids_RL, short.scored_RL, strict=True)):
        text, word = sentences[r // len(cues)][0], cues[r % len(cues)]
        row = [256, *(text + word).encode()][-21:]
        assert ids[: len(row)].tolist() == row
        assert scored.nonzero().flatten().tolist() == list(range(len(row) - 1 - len(word), len(row) - 1))


def test_valence_recall_matches_each_word_scored_alone_on_a_bpe_model() -> None:
    torch.manual_seed(0)
    bpe = train_bpe(synthetic.generate_documents(200, seed=0, valence_cues=True)["text"], 600)
    cfg = ModelConfig(d_model=32, num_layers=2, num_heads=2, d_ff=64, max_seq_len=64, moe_every=2)
    model = LanguageModel(cfg, MoEConfig(d_model=32, d_ff=64, num_experts=4, train_capacity_factor=None), 600)
    taught = {d: tuple(range(len(ws))) for d, ws in synthetic.valenced_adjectives(4).items()}
    sentences = list(itertools.islice(synthetic.cue_contexts(3, taught), 6))
    _, records = ValenceRecall(sentences, bpe, max_len=64).evaluate(model, torch.device("cpu"), batch_size=7)
    expected = []
    with torch.no_grad():
        for text, _ in sentences:
            start = 1 + len(encode_context(bpe, text))  # the cue word's first token, after eos + the context
            scores = []
            for word in (*synthetic.POSITIVE_CUES, *synthetic.NEGATIVE_CUES):
                ids = torch.tensor([bpe.eos_id, *bpe.encode(text + word)])
                logp = model(ids[None, :-1])[0].log_softmax(-1)
                scores.append(sum(logp[t - 1, ids[t]] for t in range(start, len(ids))))
            score = torch.stack(scores)
            expected.append(float(score[:4].logsumexp(0) - score[4:].logsumexp(0)))
    assert records["log_odds"].tolist() == pytest.approx(expected, abs=1e-4)
