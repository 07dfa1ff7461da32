"""The made-up language of the synthetic corpus: its phonology, a maker of unseen words, the domains' grammar
templates and every domain's lexicon (Zipf-ranked words and collocations).

Everything here is fixed by `LANGUAGE_SEED`. The corpus (moe_lab.data.synthetic) writes documents in this
language; the biographies (moe_lab.data.facts) make their names and values with `word_maker`, avoiding
`taken_words`. Both import this module, and it imports neither.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import random
import re
from dataclasses import dataclass

DOMAINS: tuple[str, ...] = ("cooking", "sports", "finance", "space", "medicine", "music", "law", "weather")

_FUNCTION_WORDS = """
the a an this that every each some its their it they of in on at to with and but or for from by after before
during while than then so because as into over under near about around against toward up did does will can
"""
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS.split())

LANGUAGE_SEED = 1729

# The cue words of the valence sentences (moe_lab.data.synthetic): no generated stem may be one.
POSITIVE_CUES = ("superb", "lovely", "splendid", "wonderful")
NEGATIVE_CUES = ("awful", "dismal", "dreadful", "terrible")

FORMAT_RE = re.compile(r"\{([^{}]*)\}")

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
NP_FORMS = ("the N", "the A N", "a N", "a A N", "NAME", "this N", "their A N", "the N of the N")

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


GRAMMARS = _parse_grammars(_GRAMMAR_SPEC)
_LITERALS = frozenset(
    word
    for formats, templates in GRAMMARS.values()
    for text in (*formats.values(), *templates, *NP_FORMS)
    for part in FORMAT_RE.sub(lambda m: " ".join(m.group(1).split("|")), text).split()
    for word in [part.strip("#:")]
    if word.isalpha()
)


@dataclass(frozen=True)
class Lexicon:
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


def zipf(rng: random.Random, n: int) -> int:
    """A rank in 0..n-1 drawn with probability proportional to 1 / (rank + 1)."""
    cum = _zipf_cumweights(n)
    return bisect.bisect_right(cum, rng.random() * cum[-1])


def word_maker(rng: random.Random, taken: set[str]):
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
    """Every word of the grammar's language (lower case): the biographies' names and values avoid them (and the
    words of their own forms, which moe_lab.data.facts adds)."""
    taken = _fixed_words()
    for lex in language():
        taken.update(lex.nouns, lex.adjectives, (w.lower() for w in lex.firsts + lex.lasts))
        taken.update(w for forms in lex.verbs for w in forms)
    return frozenset(taken)


@functools.cache
def language() -> tuple[Lexicon, ...]:
    """Every domain's lexicon; depends on nothing but `LANGUAGE_SEED`."""
    taken = _fixed_words()
    general_rng = random.Random(LANGUAGE_SEED)
    fresh = word_maker(general_rng, taken)
    general_nouns = [fresh(1, 2, ("",)) for _ in range(30)]
    general_verbs = [fresh(1, 1, ("",), _verb_forms) for _ in range(20)]
    general_adjs = [fresh(1, 1, _ADJ_SUFFIXES) for _ in range(20)]
    lexicons = []
    for d in range(len(DOMAINS)):
        rng = random.Random(LANGUAGE_SEED * 100 + d)
        fresh = word_maker(rng, taken)
        noun_suffixes = tuple(rng.sample(_NOUN_SUFFIXES, 4))
        adj_suffixes = tuple(rng.sample(_ADJ_SUFFIXES, 3))
        nouns = _interleave([fresh(1, 2, noun_suffixes) for _ in range(400)], general_nouns)
        verbs = _interleave([fresh(1, 2, ("",), _verb_forms) for _ in range(250)], general_verbs)
        adjs = _interleave([fresh(1, 2, adj_suffixes) for _ in range(300)], general_adjs)
        firsts = tuple(fresh(1, 2, _FIRST_SUFFIXES).capitalize() for _ in range(150))
        lasts = tuple(fresh(1, 2, _LAST_SUFFIXES).capitalize() for _ in range(150))

        def prefs(num_owners: int, num_targets: int, k: int, rng=rng) -> tuple[tuple[int, ...], ...]:
            return tuple(tuple(zipf(rng, num_targets) for _ in range(k)) for _ in range(num_owners))

        lexicons.append(
            Lexicon(
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
