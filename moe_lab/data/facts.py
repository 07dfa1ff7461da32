"""The knowledge component of the synthetic corpus: biographies of made-up people, and queries about them.

Each person has four attributes (birth city, profession, birth year, employer), stated in biographies in
several surface forms. Learning them is memorisation, which scales with parameters rather than FLOPs: the
component MoE layers are expected to help with at fixed active compute ("Mixture of Parrots", Jelassi et al.
2024: more experts keep improving memorisation at fixed active parameters; "Physics of Language Models 3.3",
Allen-Zhu and Li 2024: synthetic biographies in several forms, knowledge capacity per parameter, MoE included).

One form of every (person, attribute) is held out of the biographies: `queries` asks in that form, so recall
measures knowledge of a trained fact, not of a string seen verbatim (Allen-Zhu and Li's held-out query forms).
Every form ends with the value, then ` .`, so a query is a prompt whose continuation is the value.

Like the rest of the corpus, the people and their facts are fixed by the language seed: person i is the same
whatever the number of people, so a corpus with more people adds people and changes none.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from moe_lab.data.words import taken_words, word_maker

ATTRIBUTES: tuple[str, ...] = ("birth_city", "profession", "birth_year", "employer")
# The category label of each attribute's value (appended to synthetic.CATEGORIES).
VALUE_CATEGORIES: tuple[str, ...] = ("fact_city", "fact_profession", "fact_year", "fact_employer")

# Surface forms: NAME is the person's full name, VALUE the attribute's value, always last before the period.
FORMS: dict[str, tuple[str, ...]] = {
    "birth_city": (
        "NAME was born in VALUE .",
        "the birthplace of NAME is VALUE .",
        "NAME grew up in the town of VALUE .",
        "the hometown of NAME is VALUE .",
    ),
    "profession": (
        "NAME works as VALUE .",
        "the profession of NAME is VALUE .",
        "by trade , NAME is VALUE .",
        "NAME earns a living as VALUE .",
    ),
    "birth_year": (
        "NAME was born in the year VALUE .",
        "the birth year of NAME is VALUE .",
        "NAME came into the world in VALUE .",
        "the year NAME was born is VALUE .",
    ),
    "employer": (
        "NAME works for VALUE .",
        "the employer of NAME is VALUE .",
        "NAME is on the staff of VALUE .",
        "NAME draws a salary from VALUE .",
    ),
}
NUM_FORMS = 4
MAX_PEOPLE = 100_000
_YEARS = tuple(str(y) for y in range(1900, 2000))


@dataclass(frozen=True)
class Person:
    first: str
    last: str
    values: tuple[str, ...]  # one per attribute, in ATTRIBUTES order
    held_out: tuple[int, ...]  # per attribute: the form the biographies never use

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


@dataclass(frozen=True)
class Query:
    person: int
    attribute: int
    prompt: str  # the held-out form up to the value, e.g. "the hometown of Tavo Brekson is"
    answer: str  # the value

    @property
    def target(self) -> str:
        """What a model must continue the prompt with: the value and the end of the sentence."""
        return f" {self.answer} ."


def _taken() -> set[str]:
    """The words no name or value may be: the grammar's language and the words of the biographies' forms."""
    return set(taken_words()) | {word.lower() for forms in FORMS.values() for form in forms for word in form.split()}


@functools.cache
def _value_pools(language_seed: int) -> tuple[tuple[str, ...], ...]:
    """The values each attribute draws from: made-up cities, professions and employers, and years."""
    rng = random.Random(f"moe-lab-facts:{language_seed}:values")
    fresh = word_maker(rng, _taken())
    cities = tuple(fresh(1, 2, ("", "ton", "ford", "holm", "by")).capitalize() for _ in range(200))
    professions = tuple(fresh(1, 2, ("er", "ist", "ian", "or")) for _ in range(60))
    employers = tuple(fresh(1, 1, ("co", "tek", "corp", "works", "labs")).capitalize() for _ in range(300))
    return cities, professions, _YEARS, employers


@functools.cache
def _name_pools(language_seed: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    rng = random.Random(f"moe-lab-facts:{language_seed}:names")
    fresh = word_maker(rng, _taken() | {w.lower() for pool in _value_pools(language_seed) for w in pool})
    firsts = tuple(fresh(1, 1, ("a", "o", "is", "en", "ia")).capitalize() for _ in range(400))
    lasts = tuple(fresh(1, 2, ("man", "ek", "ova", "ley")).capitalize() for _ in range(400))
    return firsts, lasts


@functools.cache
def people(num_people: int, language_seed: int) -> tuple[Person, ...]:
    """The first `num_people` people: distinct full names, values drawn uniformly from each attribute's pool."""
    if not 0 <= num_people <= MAX_PEOPLE:
        raise ValueError(f"num_people={num_people}: expected 0..{MAX_PEOPLE}")
    firsts, lasts = _name_pools(language_seed)
    pools = _value_pools(language_seed)
    out, seen = [], set()
    i = 0
    while len(out) < num_people:
        rng = random.Random(f"moe-lab-facts:{language_seed}:person:{i}")
        i += 1
        first, last = rng.choice(firsts), rng.choice(lasts)
        if (first, last) in seen:  # the next draw: person i stays person i whatever num_people is
            continue
        seen.add((first, last))
        values = tuple(rng.choice(pool) for pool in pools)
        held_out = tuple(rng.randrange(NUM_FORMS) for _ in ATTRIBUTES)
        out.append(Person(first, last, values, held_out))
    return tuple(out)


def biography(rng: random.Random, person: Person) -> list[tuple[str, int | None]]:
    """One biography: every attribute once, in a random trained form and order; (word, value attribute or None)."""
    words: list[tuple[str, int | None]] = []
    for a in rng.sample(range(len(ATTRIBUTES)), len(ATTRIBUTES)):
        form = rng.choice([f for f in range(NUM_FORMS) if f != person.held_out[a]])
        for word in FORMS[ATTRIBUTES[a]][form].split():
            if word == "NAME":
                words += [(person.first, None), (person.last, None)]
            elif word == "VALUE":
                words.append((person.values[a], a))
            else:
                words.append((word, None))
    return words


def queries(num_people: int, language_seed: int, limit: int | None = None, seed: int = 0) -> list[Query]:
    """Held-out queries of trained facts: every (person, attribute) in its held-out form, or a seeded sample
    of `limit` of them."""
    pairs = [(p, a) for p in range(num_people) for a in range(len(ATTRIBUTES))]
    if limit is not None and limit < len(pairs):
        pairs = sorted(random.Random(f"moe-lab-facts:queries:{seed}").sample(pairs, limit))
    crowd = people(num_people, language_seed)
    out = []
    for p, a in pairs:
        person = crowd[p]
        form = FORMS[ATTRIBUTES[a]][person.held_out[a]]
        prompt = form.split(" VALUE")[0].replace("NAME", person.name)
        out.append(Query(p, a, prompt, person.values[a]))
    return out


def statement(person: Person, attribute: int, value: str) -> str:
    """The person's held-out form of `attribute` stating `value` (true or not), e.g. "the hometown of X is Y ."."""
    form = FORMS[ATTRIBUTES[attribute]][person.held_out[attribute]]
    return form.replace("NAME", person.name).replace("VALUE", value)


def verification(
    num_people: int, language_seed: int, num_train: int, num_val: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """A closed-book task over the corpus's facts: is the statement true (1) or false (0)?

    Every example states one (person, attribute) in its held-out form, with the true value or a distractor
    drawn from the same attribute's values, true or false with probability 1/2. The validation examples ask
    about (person, attribute) pairs that no training example mentions, so fine-tuning can teach the task but
    not the answers: only what pretraining stored can (ST-MoE's largest fine-tuning gains are closed-book QA).
    Training examples cycle through the other pairs in a seeded order, so a small task is the first
    `num_train` examples of a large one and both share the validation set.
    """
    pairs = [(p, a) for p in range(num_people) for a in range(len(ATTRIBUTES))]
    if num_val >= len(pairs):
        raise ValueError(
            f"a fact-verification task with {num_val} validation examples needs more than {num_val} "
            f"(person, attribute) pairs; the corpus has {len(pairs)} ({num_people} people x {len(ATTRIBUTES)} "
            f"attributes): raise data.num_people above {num_val // len(ATTRIBUTES)}"
        )
    random.Random(f"moe-lab-facts:verify:{language_seed}:pairs").shuffle(pairs)
    crowd, pools = people(num_people, language_seed), _value_pools(language_seed)
    rng = random.Random(f"moe-lab-facts:verify:{language_seed}:examples")

    def example(p: int, a: int) -> tuple[str, int]:
        truth = value = crowd[p].values[a]
        label = rng.randrange(2)
        while not label and value == truth:
            value = rng.choice(pools[a])
        return statement(crowd[p], a, value), label

    val = [example(p, a) for p, a in pairs[:num_val]]
    rest, train = pairs[num_val:], []
    while len(train) < num_train:
        order = rng.sample(rest, len(rest))
        train += [example(p, a) for p, a in order[: num_train - len(train)]]
    return train, val
