"""The embedded default corpus: a seeded synthetic English-like language with ground-truth word labels.

The language (vocabularies, templates, collocations) is fixed by `LANGUAGE_SEED`; `seed` only picks the
documents, so corpora drawn with different seeds are samples of the same language (train on one seed,
evaluate on another). Domain d has the same vocabulary whatever `num_domains` is. Exact reproducibility
rests on CPython's `random.Random` (Mersenne Twister, string seeds hashed with SHA-512), which is stable
across platforms and Python versions.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets

from moe_lab.data import facts

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
DOMAINS: tuple[str, ...] = ("cooking", "sports", "finance", "space", "medicine", "music", "law", "weather")
BIOGRAPHY = len(DOMAINS)  # the domain id of a biography document (the knowledge component)

PUNCTUATION = frozenset({".", ",", "!", "?", ";", ":", "$", "%", "-", "(", ")"})
_FUNCTION_WORDS = """
the a an this that every each some its their it they of in on at to with and but or for from by after before
during while than then so because as into over under near about around against toward up did does will can
"""
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS.split())

LANGUAGE_SEED = 1729
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
POSITIVE_CUES = ("superb", "lovely", "splendid", "wonderful")
NEGATIVE_CUES = ("awful", "dismal", "dreadful", "terrible")
VALENCED = 16  # per domain: its most frequent adjectives, the ones cue sentences teach
_CUE_TEMPLATES = ("the N was PA and POL .", "NAME VD the PA N , and it was POL !", "what a PA and POL N !")


def valence(adjective: str) -> int:
    """An adjective's valence, +1 or -1: a fixed hash of the word (the same in every domain)."""
    return 1 if hashlib.sha256(f"valence:{adjective}".encode()).digest()[0] % 2 else -1


_NUMBER_RE = re.compile(r"-?\d[\d,]*(\.\d+)?")
_FORMAT_RE = re.compile(r"\{([^{}]*)\}")
_MACRO_RE = re.compile(r"#(\w+)")

_SYLLABLE_ONSETS = (
    "b c d f g h j k l m n p r s t v w z br cr dr fl gr pl st tr sh ch th sk sl sn sp qu bl cl fr gl pr sw"
)
_ONSETS = tuple(_SYLLABLE_ONSETS.split())
_VOWELS = ("a", "e", "i", "o", "u")
_DIGRAPHS = ("ai", "ea", "ee", "oo", "ou", "ie", "oa")
_CODAS = ("n", "r", "l", "s", "t", "m", "k", "nd", "st", "rt", "ng", "sh", "x", "ck", "lt", "mp", "rn")
_NOUN_SUFFIXES = ("", "", "er", "on", "et", "ment", "ite", "ade", "ium", "al", "ock", "ling")
_ADJ_SUFFIXES = ("y", "ish", "ous", "al", "ic", "ful", "ive", "less", "en", "ant")
_FIRST_SUFFIXES = ("o", "a", "ia", "in", "ell", "ine", "ie", "us")
_LAST_SUFFIXES = ("son", "ov", "ez", "ard", "berg", "ski", "ton", "well", "ani")

# Noun-phrase shapes every domain shares; the templates' `NP` slot picks one.
_NP_FORMS = ("the N", "the A N", "a N", "a A N", "NAME", "this N", "their A N", "the N of the N")

# One block per domain: `#key = format` lines define number formats, the other lines are sentence templates.
# Slots: N noun, A adjective, A? optional adjective, V / VD / VB verb (present, past, base form), NAME proper
# name, NP noun phrase, #key a format; {i:a:b} integer, {c:a:b} integer with thousands commas, {f:a:b:p}
# decimal, {x|y} choice. Any other word is a literal: punctuation, function word, number, or else a noun
# (units such as `cups`).
_GRAMMAR_SPEC = """
[cooking]
#qty = {1|2|3|4|6|8|12|0.5|1.5|250|500} {cups|grams|spoons|pinches|slices} of
#min = {i:2:90} minutes
#temp = {160|180|200|220} degrees
NAME V #qty N into the A? N .
VB #qty N and VB it for #min .
VB the N at #temp for #min .
the A? N V well with the A N .
NAME VD the N , then VD #qty N .
NP V NP with #qty N .
[sports]
#score = {i:0:7} - {i:0:7}
#minute = in minute {i:1:90}
#points = {i:2:48} points
NAME V NP #score in the A? N .
the N VD NAME #minute .
NAME VD #points and {i:2:15} N against the N .
after the A N , NAME V the N .
did NAME VB the N #score ?
NP V NP and NP !
[finance]
#price = $ {i:1:999}.{i:10:99}
#pct = {f:0.1:9.9:1} %
#shares = {c:1000:900000} shares
#year = {i:1990:2030}
shares of NAME VD #pct to #price .
the A? N VD #price , up #pct from the N .
NAME V #shares of the A? N .
in #year , NAME VD NP by #pct .
NP V NP , but NP V #price .
will the N VB #pct ?
[space]
#dist = {c:1000:9000000} kilometers
#year = {i:2030:2090}
#speed = {f:1:40:1} kilometers per second
the N V #dist from the A? N .
NAME VD the A? N in #year .
NP V at #speed toward the N .
{i:2:12} N V around the A N .
NAME V that NP V NP .
can NP VB the N ?
[medicine]
#dose = {5|10|20|50|100|250} mg
#freq = {i:1:4} times a day
#temp = {f:36:41:1} degrees
NAME V #dose of N #freq .
the A? N VD after {i:2:30} days .
NP V the N at #temp .
NAME VD that NP V NP .
does the N VB the A N ?
[music]
#bpm = at {i:60:180} bpm
#track = track {i:1:20}
#year = {i:1950:2030}
NAME V the A? N #bpm .
on #track , NAME VD NP .
NP V NP in #year .
the A N V with the N and the N .
did NAME VB the A N ?
[law]
#section = section {i:1:99}
#years = {i:1:25} years
#fine = $ {c:500:2000000}
under #section , NP V NP .
NAME VD NP for #years .
the A? N V a fine of #fine .
NAME V that NP VD the N .
can the N VB NAME ?
[weather]
#deg = {i:-20:40} degrees
#pct = {i:5:95} %
#rain = {i:1:80} mm of rain
the N V #deg in the A? N .
NP V a #pct chance of N .
#rain VD over NAME .
after the A N , the N V to #deg .
will the N VB the N ?
"""
_FORMAT_LINE_RE = re.compile(r"#(\w+) = (.+)")


def _parse_grammars(spec: str) -> dict[str, tuple[dict[str, str], tuple[str, ...]]]:
    """Domain name -> (number formats by key, sentence templates)."""
    grammars = {}
    for block in spec.split("[")[1:]:
        name, _, body = block.partition("]")
        formats, templates = {}, []
        for line in filter(None, map(str.strip, body.splitlines())):
            if match := _FORMAT_LINE_RE.fullmatch(line):
                formats[match.group(1)] = match.group(2)
            else:
                templates.append(line)
        grammars[name] = (formats, tuple(templates))
    return grammars


_GRAMMARS = _parse_grammars(_GRAMMAR_SPEC)
_LITERALS = frozenset(
    word
    for formats, templates in _GRAMMARS.values()
    for text in (*formats.values(), *templates, *_NP_FORMS)
    for part in _FORMAT_RE.sub(lambda m: " ".join(m.group(1).split("|")), text).split()
    for word in [part.strip("#:")]
    if word.isalpha()
)


@dataclass(frozen=True)
class _Lexicon:
    """One domain's words (Zipf-ranked) and the collocations that give the language bigram structure."""

    nouns: tuple[str, ...]
    verbs: tuple[tuple[str, str, str], ...]  # (present, past, base)
    adjectives: tuple[str, ...]
    firsts: tuple[str, ...]
    lasts: tuple[str, ...]
    verb_objects: tuple[tuple[int, ...], ...]  # per verb: preferred object nouns
    adj_nouns: tuple[tuple[int, ...], ...]  # per adjective: preferred nouns
    noun_verbs: tuple[tuple[int, ...], ...]  # per noun: preferred verbs when it is the subject
    first_lasts: tuple[tuple[int, ...], ...]  # per first name: the surnames it goes with


@functools.cache
def _zipf_cumweights(n: int) -> tuple[float, ...]:
    return tuple(itertools.accumulate(1.0 / (rank + 1) for rank in range(n)))


def _zipf(rng: random.Random, n: int) -> int:
    cum = _zipf_cumweights(n)
    return bisect.bisect_right(cum, rng.random() * cum[-1])


def _word_maker(rng: random.Random, taken: set[str]):
    """A maker of unseen stems in a phonology of its own (a subset of the syllable pools)."""
    onsets = rng.sample(_ONSETS, 14)
    vowels = rng.sample(_VOWELS, 4) + rng.sample(_DIGRAPHS, 1)
    codas = ["", "", "", *rng.sample(_CODAS, 5)]  # mostly open syllables keep words short

    def fresh(min_syllables: int, max_syllables: int, suffixes: tuple[str, ...], forms=lambda w: (w,)):
        while True:
            num = rng.randint(min_syllables, max_syllables)
            stem = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(num))
            words = forms(stem + rng.choice(suffixes))
            if not taken.intersection(words):
                taken.update(words)
                return words if len(words) > 1 else words[0]

    return fresh


def _verb_forms(stem: str) -> tuple[str, str, str]:
    present = stem + ("es" if stem.endswith(("s", "sh", "ch", "x", "z")) else "s")
    past = stem + ("d" if stem.endswith("e") else "ed")
    return present, past, stem


def _interleave(specific: list, general: list, every: int = 13) -> tuple:
    """Insert the shared general words at spread-out ranks of a domain's list."""
    out = list(specific)
    for j, word in enumerate(general):
        out.insert(5 + every * j, word)
    return tuple(out)


def _fixed_words() -> set[str]:
    """The words no generated stem may be: function words, the templates' literals and the cue words."""
    return set(FUNCTION_WORDS) | {w.lower() for w in _LITERALS} | set(POSITIVE_CUES) | set(NEGATIVE_CUES)


@functools.cache
def taken_words() -> frozenset[str]:
    """Every word of the grammar's language (lower case): the biographies' names and values avoid them."""
    taken = _fixed_words()
    for text in (w for form in facts.FORMS.values() for f in form for w in f.split()):
        taken.add(text.lower())
    for lex in _language():
        taken.update(lex.nouns, lex.adjectives, (w.lower() for w in lex.firsts + lex.lasts))
        taken.update(w for forms in lex.verbs for w in forms)
    return frozenset(taken)


@functools.cache
def _language() -> tuple[_Lexicon, ...]:
    """Every domain's lexicon; depends on nothing but `LANGUAGE_SEED`."""
    taken = _fixed_words()
    general_rng = random.Random(LANGUAGE_SEED)
    fresh = _word_maker(general_rng, taken)
    general_nouns = [fresh(1, 2, ("",)) for _ in range(30)]
    general_verbs = [fresh(1, 1, ("",), _verb_forms) for _ in range(20)]
    general_adjs = [fresh(1, 1, _ADJ_SUFFIXES) for _ in range(20)]
    lexicons = []
    for d in range(len(DOMAINS)):
        rng = random.Random(LANGUAGE_SEED * 100 + d)
        fresh = _word_maker(rng, taken)
        noun_suffixes = tuple(rng.sample(_NOUN_SUFFIXES, 4))
        adj_suffixes = tuple(rng.sample(_ADJ_SUFFIXES, 3))
        nouns = _interleave([fresh(1, 2, noun_suffixes) for _ in range(400)], general_nouns)
        verbs = _interleave([fresh(1, 2, ("",), _verb_forms) for _ in range(250)], general_verbs)
        adjs = _interleave([fresh(1, 2, adj_suffixes) for _ in range(300)], general_adjs)
        firsts = tuple(fresh(1, 2, _FIRST_SUFFIXES).capitalize() for _ in range(150))
        lasts = tuple(fresh(1, 2, _LAST_SUFFIXES).capitalize() for _ in range(150))

        def prefs(num_owners: int, num_targets: int, k: int, rng=rng) -> tuple[tuple[int, ...], ...]:
            return tuple(tuple(_zipf(rng, num_targets) for _ in range(k)) for _ in range(num_owners))

        lexicons.append(
            _Lexicon(
                nouns=nouns,
                verbs=verbs,
                adjectives=adjs,
                firsts=firsts,
                lasts=lasts,
                verb_objects=prefs(len(verbs), len(nouns), 4),
                adj_nouns=prefs(len(adjs), len(nouns), 3),
                noun_verbs=prefs(len(nouns), len(verbs), 3),
                first_lasts=tuple(tuple(rng.sample(range(len(lasts)), 2)) for _ in firsts),
            )
        )
    return tuple(lexicons)


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
        self.rng, self.lex = rng, _language()[domain]
        self.formats, self.templates = _GRAMMARS[DOMAINS[domain]]
        if cue_only:
            self.templates = _CUE_TEMPLATES
        elif cues:
            self.templates = self.templates + _CUE_TEMPLATES
        self.adjectives = adjectives or tuple(range(VALENCED))
        # Topic: a few nouns and people a document keeps coming back to (long-range structure).
        self.focus_nouns = [_zipf(rng, len(self.lex.nouns)) for _ in range(4)]
        self.focus_people = [_zipf(rng, len(self.lex.firsts)) for _ in range(3)]

    def sentence(self, words: list[str], cats: list[int]) -> None:
        """Append one sentence's words and their category ids."""
        rng, lex = self.rng, self.lex
        text = _MACRO_RE.sub(lambda m: self.formats[m.group(1)], rng.choice(self.templates))
        stack = _FORMAT_RE.sub(lambda m: _fill_format(rng, m.group(1)), text).split()[::-1]
        prev_adj = last_noun = last_verb = cue = None
        while stack:
            slot = stack.pop()
            adj = None
            if slot == "NP":
                stack.extend(rng.choice(_NP_FORMS).split()[::-1])
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
                    idx = _zipf(rng, len(lex.nouns))
                new, cat, last_noun, last_verb = [lex.nouns[idx]], "noun", idx, None
            elif slot in ("V", "VD", "VB"):
                if last_noun is not None and rng.random() < 0.5:
                    idx = rng.choice(lex.noun_verbs[last_noun])
                else:
                    idx = _zipf(rng, len(lex.verbs))
                new, cat = [lex.verbs[idx][("V", "VD", "VB").index(slot)]], "verb"
                last_noun, last_verb = None, idx
            elif slot == "A":
                adj = _zipf(rng, len(lex.adjectives))
                new, cat = [lex.adjectives[adj]], "adjective"
            elif slot == "PA":  # the adjective a cue sentence teaches
                adj = rng.choice(self.adjectives)
                new, cat, cue = [lex.adjectives[adj]], "adjective", valence(lex.adjectives[adj])
            elif slot == "POL":
                new, cat = [rng.choice(POSITIVE_CUES if cue > 0 else NEGATIVE_CUES)], "adjective"
            elif slot == "NAME":
                first = rng.choice(self.focus_people) if rng.random() < 0.5 else _zipf(rng, len(lex.firsts))
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
    return {d: _language()[d].adjectives[:VALENCED] for d in range(num_domains)}


def cue_contexts(seed: int, adjectives: dict[int, tuple[int, ...]]) -> Iterator[tuple[str, int]]:
    """Endless cue sentences cut where their cue word would come (the text ends with the space before it), of
    domains drawn uniformly from `adjectives` (domain -> indices of its VALENCED adjectives, one of which each
    sentence teaches): (text, the taught adjective's valence, +1 or -1)."""
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
