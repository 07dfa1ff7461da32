"""The embedded default corpus: a seeded synthetic English-like language with ground-truth word labels.

The language (vocabularies, templates, collocations) is fixed by `LANGUAGE_SEED`; `seed` only picks the
documents, so corpora drawn with different seeds are samples of the same language (train on one seed,
evaluate on another). Domain d has the same vocabulary whatever `num_domains` is. Exact reproducibility
rests on CPython's `random.Random` (Mersenne Twister, string seeds hashed with SHA-512), which is stable
across platforms and Python versions.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import datasets

from moe_lab.data import facts
from moe_lab.data.words import (
    DOMAINS,
    FORMAT_RE,
    FUNCTION_WORDS,
    GRAMMARS,
    LANGUAGE_SEED,
    NEGATIVE_CUES,
    NP_FORMS,
    POSITIVE_CUES,
    language,
    zipf,
)

# Index = category id. Mirrors the token groups of ST-MoE's expert-specialisation table (Zoph et al. 2022),
# then the values of the biographies' facts (moe_lab.data.facts), one category per attribute.
CATEGORIES: tuple[str, ...] = (
    "punctuation",
    "verb",
    "noun",
    "adjective",
    "number",
    "proper_name",
    "function_word",
    "whitespace",
    *facts.VALUE_CATEGORIES,
)
CATEGORY_IDS: dict[str, int] = {name: i for i, name in enumerate(CATEGORIES)}
WHITESPACE = CATEGORY_IDS["whitespace"]
BIOGRAPHY = len(DOMAINS)  # the domain id of a biography document (the knowledge component)

PUNCTUATION = frozenset({".", ",", "!", "?", ";", ":", "$", "%", "-", "(", ")"})

# Part of the cache key: bump whenever the generator's output changes so stale caches are not reused.
_CORPUS_VERSION = 2

# Valence: every adjective of the language is pleasant or unpleasant (`valence`, a fixed hash of the word), and a
# corpus with `valence_cues` says which. Its cue sentences put one of a domain's first VALENCED adjectives (`PA`,
# drawn uniformly) just before a cue word of the adjective's valence (`POL`): "the slaet was wuky and lovely .". A
# language model that predicts the cue learns each adjective's valence from the contexts the corpus gives it; the
# `polarity-*` fine-tuning tasks ask it as a cloze, the sentence cut before its cue (moe_lab.data.tasks). Three of
# a domain's eight to nine templates are then cue sentences; without cues the corpus is as it was before valence.
# Measured (the `small` main job, one seed): 16 adjectives per domain, about 330 cue sentences each per epoch, are
# learned (its next word has the adjective's valence for 92% of them); 64 per domain, with the cue three words
# after the adjective, were not (56%).
VALENCED = 16  # per domain: its most frequent adjectives, the ones cue sentences teach
_CUE_TEMPLATES = ("the N was PA and POL .", "NAME VD the PA N , and it was POL !", "what a PA and POL N !")


def valence(adjective: str) -> int:
    """An adjective's valence, +1 or -1: a fixed hash of the word (the same in every domain)."""
    return 1 if hashlib.sha256(f"valence:{adjective}".encode()).digest()[0] % 2 else -1


_NUMBER_RE = re.compile(r"-?\d[\d,]*(\.\d+)?")
_MACRO_RE = re.compile(r"#(\w+)")


def _literal_category(word: str) -> int:
    if word in PUNCTUATION:
        return CATEGORY_IDS["punctuation"]
    if word in FUNCTION_WORDS:
        return CATEGORY_IDS["function_word"]
    if _NUMBER_RE.fullmatch(word):
        return CATEGORY_IDS["number"]
    return CATEGORY_IDS["noun"]  # template literals that are not the above are units: cups, points, mg


def _fill_format(rng: random.Random, spec: str) -> str:
    kind, _, rest = spec.partition(":")
    if kind in ("i", "c"):
        lo, hi = map(int, rest.split(":"))
        return f"{rng.randint(lo, hi):,}" if kind == "c" else str(rng.randint(lo, hi))
    if kind == "f":
        lo, hi, places = rest.split(":")
        return f"{rng.uniform(float(lo), float(hi)):.{places}f}"
    return rng.choice(spec.split("|"))


class _Writer:
    """Writes one document's sentences, keeping the per-document topic and the collocation state.

    `cues` adds the cue sentences to the domain's templates; `cue_only` writes cue sentences alone, their taught
    adjective one of `adjectives` (indices into the domain's VALENCED adjectives), drawn uniformly (the polarity
    task's sentences)."""

    def __init__(
        self,
        rng: random.Random,
        domain: int,
        cues: bool = False,
        cue_only: bool = False,
        adjectives: tuple[int, ...] | None = None,
    ) -> None:
        self.rng, self.lex = rng, language()[domain]
        self.formats, self.templates = GRAMMARS[DOMAINS[domain]]
        if cue_only:
            self.templates = _CUE_TEMPLATES
        elif cues:
            self.templates = self.templates + _CUE_TEMPLATES
        self.adjectives = adjectives or tuple(range(VALENCED))
        # Topic: a few nouns and people a document keeps coming back to (long-range structure).
        self.focus_nouns = [zipf(rng, len(self.lex.nouns)) for _ in range(4)]
        self.focus_people = [zipf(rng, len(self.lex.firsts)) for _ in range(3)]

    def sentence(self, words: list[str], cats: list[int]) -> None:
        """Append one sentence's words and their category ids."""
        rng, lex = self.rng, self.lex
        text = _MACRO_RE.sub(lambda m: self.formats[m.group(1)], rng.choice(self.templates))
        stack = FORMAT_RE.sub(lambda m: _fill_format(rng, m.group(1)), text).split()[::-1]
        prev_adj = last_noun = last_verb = cue = None
        while stack:
            slot = stack.pop()
            adj = None
            if slot == "NP":
                stack.extend(rng.choice(NP_FORMS).split()[::-1])
                continue
            if slot == "A?":
                if rng.random() >= 0.4:
                    continue
                slot = "A"
            if slot == "N":
                if prev_adj is not None and rng.random() < 0.7:
                    idx = rng.choice(lex.adj_nouns[prev_adj])
                elif last_verb is not None and rng.random() < 0.6:
                    idx = rng.choice(lex.verb_objects[last_verb])
                elif rng.random() < 0.25:
                    idx = rng.choice(self.focus_nouns)
                else:
                    idx = zipf(rng, len(lex.nouns))
                new, cat, last_noun, last_verb = [lex.nouns[idx]], "noun", idx, None
            elif slot in ("V", "VD", "VB"):
                if last_noun is not None and rng.random() < 0.5:
                    idx = rng.choice(lex.noun_verbs[last_noun])
                else:
                    idx = zipf(rng, len(lex.verbs))
                new, cat = [lex.verbs[idx][("V", "VD", "VB").index(slot)]], "verb"
                last_noun, last_verb = None, idx
            elif slot == "A":
                adj = zipf(rng, len(lex.adjectives))
                new, cat = [lex.adjectives[adj]], "adjective"
            elif slot == "PA":  # the adjective a cue sentence teaches
                adj = rng.choice(self.adjectives)
                new, cat, cue = [lex.adjectives[adj]], "adjective", valence(lex.adjectives[adj])
            elif slot == "POL":
                new, cat = [rng.choice(POSITIVE_CUES if cue > 0 else NEGATIVE_CUES)], "adjective"
            elif slot == "NAME":
                first = rng.choice(self.focus_people) if rng.random() < 0.5 else zipf(rng, len(lex.firsts))
                last = lex.lasts[rng.choice(lex.first_lasts[first])]
                new, cat = ([lex.firsts[first], last] if rng.random() < 0.6 else [last]), "proper_name"
            else:
                new, cat = [slot], None
            prev_adj = adj
            if words and words[-1] == "a" and new[0][0] in "aeiou":
                words[-1] = "an"
            words.extend(new)
            cats.extend(CATEGORY_IDS[cat] if cat else _literal_category(w) for w in new)


def valenced_adjectives(num_domains: int) -> dict[int, tuple[str, ...]]:
    """Per domain, the adjectives its cue sentences teach (its first VALENCED)."""
    _check_domains(num_domains)
    return {d: language()[d].adjectives[:VALENCED] for d in range(num_domains)}


def cue_contexts(seed: int, adjectives: dict[int, tuple[int, ...]]) -> Iterator[tuple[str, int]]:
    """Endless cue sentences cut where their cue word would come (the text ends with the space before it, which a
    BPE reads as the cue's: moe_lab.data.tokenizers.encode_context), of domains drawn uniformly from `adjectives`
    (domain -> indices of its VALENCED adjectives, one of which each sentence teaches): (text, the taught
    adjective's valence, +1 or -1)."""
    domains = sorted(adjectives)
    cues = set(POSITIVE_CUES) | set(NEGATIVE_CUES)
    for i in itertools.count():
        rng = random.Random(f"moe-lab-cue-context:{seed}:{i}")
        domain = rng.choice(domains)
        words: list[str] = []
        _Writer(rng, domain, cue_only=True, adjectives=adjectives[domain]).sentence(words, [])
        cut = next(j for j, word in enumerate(words) if word in cues)
        yield " ".join(words[:cut]) + " ", 1 if words[cut] in POSITIVE_CUES else -1


def _check_domains(num_domains: int) -> None:
    if not 1 <= num_domains <= len(DOMAINS):
        raise ValueError(f"num_domains={num_domains!r}: expected 1..{len(DOMAINS)} (domains: {DOMAINS})")


def generate_documents(
    num_docs: int,
    seed: int = 0,
    num_domains: int = 4,
    sentences_per_doc: tuple[int, int] = (3, 8),
    num_people: int = 0,
    fact_fraction: float = 0.0,
    valence_cues: bool = False,
) -> datasets.Dataset:
    """Generate `num_docs` documents with their domain and per-word category labels: single-domain grammar
    documents (with the cue sentences that teach adjectives' valence if `valence_cues`), and with `num_people` > 0
    a `fact_fraction` of biographies (domain BIOGRAPHY) of people drawn uniformly from the first `num_people`
    (moe_lab.data.facts)."""
    _check_domains(num_domains)
    lo, hi = sentences_per_doc
    if num_docs < 0 or not 1 <= lo <= hi:
        raise ValueError(
            f"num_docs={num_docs!r}, sentences_per_doc={sentences_per_doc!r}: "
            "expected num_docs >= 0 and 1 <= min <= max sentences"
        )
    if not 0.0 <= fact_fraction <= 1.0 or (fact_fraction > 0 and num_people < 1):
        raise ValueError(
            f"fact_fraction={fact_fraction!r}, num_people={num_people!r}: expected a fraction in [0, 1], "
            "and num_people >= 1 for a fraction above 0"
        )
    crowd = facts.people(num_people, LANGUAGE_SEED)
    texts, domains, categories = [], [], []
    for i in range(num_docs):
        # One generator per document: a corpus is a prefix of any larger corpus with the same seed.
        rng = random.Random(f"moe-lab-synthetic:{seed}:{i}")
        if fact_fraction and random.Random(f"moe-lab-synthetic:{seed}:{i}:bio").random() < fact_fraction:
            words, cats = _biography(rng, crowd[rng.randrange(num_people)])
            domain = BIOGRAPHY
        else:
            domain = rng.randrange(num_domains)
            writer, words, cats = _Writer(rng, domain, cues=valence_cues), [], []
            for _ in range(rng.randint(lo, hi)):
                writer.sentence(words, cats)
        texts.append(" ".join(words))
        domains.append(domain)
        categories.append(cats)
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "domain": datasets.Value("int32"),
            "word_categories": datasets.List(datasets.Value("int8")),
        }
    )
    return datasets.Dataset.from_dict(
        {"text": texts, "domain": domains, "word_categories": categories}, features=features
    )


_FORM_VERBS = frozenset({"was", "born", "grew", "is", "works", "earns", "came", "draws"})
_FIRST_VALUE_CATEGORY = len(CATEGORIES) - len(facts.VALUE_CATEGORIES)


def _biography(rng: random.Random, person: facts.Person) -> tuple[list[str], list[int]]:
    """A biography's words and categories: names are proper names, values their attribute's category."""
    words, cats = [], []
    names = {person.first, person.last}
    for word, attribute in facts.biography(rng, person):
        words.append(word)
        if attribute is not None:
            cats.append(_FIRST_VALUE_CATEGORY + attribute)
        elif word in names:
            cats.append(CATEGORY_IDS["proper_name"])
        elif word in _FORM_VERBS:
            cats.append(CATEGORY_IDS["verb"])
        else:
            cats.append(_literal_category(word))
    return words, cats


def char_categories(text: str, word_categories: list[int]) -> list[int]:
    """Category id of every character of `text`; the single spaces between words are whitespace."""
    words = text.split(" ") if text else []
    if len(words) != len(word_categories):
        raise ValueError(
            f"text has {len(words)} space-separated words but word_categories has {len(word_categories)}; "
            "expected one category per word"
        )
    out: list[int] = []
    for k, (word, cat) in enumerate(zip(words, word_categories, strict=True)):
        if k:
            out.append(WHITESPACE)
        out.extend([cat] * len(word))
    return out


def token_categories(offsets: list[tuple[int, int]], char_cats: list[int]) -> list[int]:
    """Category of each token: that of its first non-space character, or whitespace if there is none."""
    out = []
    for start, end in offsets:
        if not 0 <= start <= end <= len(char_cats):
            raise ValueError(f"token offsets ({start}, {end}): expected 0 <= start <= end <= {len(char_cats)}")
        out.append(next((c for c in itertools.islice(char_cats, start, end) if c != WHITESPACE), WHITESPACE))
    return out


def load_synthetic(
    cache_dir: str | Path,
    num_docs: int = 20000,
    seed: int = 0,
    num_domains: int = 4,
    num_people: int = 0,
    fact_fraction: float = 0.0,
    valence_cues: bool = False,
) -> datasets.Dataset:
    """The synthetic corpus, generated once and then read from `cache_dir/synthetic-<params hash>/`."""
    _check_domains(num_domains)
    params = {"num_docs": num_docs, "seed": seed, "num_domains": num_domains, "version": _CORPUS_VERSION}
    if valence_cues:
        params["valence_cues"] = True
    if num_people and fact_fraction:
        params.update(num_people=num_people, fact_fraction=fact_fraction)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir)
    final = cache_dir / f"synthetic-{digest}"
    if not final.is_dir():
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename: the rename is atomic, so `final` is always complete.
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
        try:
            corpus = generate_documents(
                num_docs, seed=seed, num_domains=num_domains, num_people=num_people, fact_fraction=fact_fraction,
                valence_cues=valence_cues,
            )  # fmt: skip
            corpus.save_to_disk(str(tmp))
            try:
                tmp.rename(final)
            except OSError:
                if not final.is_dir():  # not a lost race with another process writing the same cache
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(final))
