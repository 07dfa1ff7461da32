"""The corpus's knowledge component: people, biographies that never use a fact's held-out form, and recall."""

from __future__ import annotations

import pytest
import torch

from moe_lab.data import facts
from moe_lab.data.synthetic import BIOGRAPHY, CATEGORIES, LANGUAGE_SEED, generate_documents
from moe_lab.data.tokenizers import ByteTokenizer
from moe_lab.train.recall import FactRecall


def test_people_are_the_same_whatever_their_number() -> None:
    few, many = facts.people(50, LANGUAGE_SEED), facts.people(300, LANGUAGE_SEED)
    assert many[:50] == few
    assert len({p.name for p in many}) == 300  # distinct full names
    for person in many:
        assert person.values[facts.ATTRIBUTES.index("birth_year")] in {str(y) for y in range(1900, 2000)}
        assert all(0 <= f < facts.NUM_FORMS for f in person.held_out)


def test_biographies_state_every_fact_never_in_its_held_out_form() -> None:
    crowd = facts.people(40, LANGUAGE_SEED)
    docs = generate_documents(400, seed=3, num_people=40, fact_fraction=0.5)
    bios = [row for row in docs if row["domain"] == BIOGRAPHY]
    assert 150 < len(bios) < 250  # about half
    first_value = CATEGORIES.index(facts.VALUE_CATEGORIES[0])
    for row in bios:
        text = row["text"]
        person = next(p for p in crowd if text.count(p.name) == len(facts.ATTRIBUTES))
        for a, attribute in enumerate(facts.ATTRIBUTES):
            for f, form in enumerate(facts.FORMS[attribute]):
                sentence = form.replace("NAME", person.name).replace("VALUE", person.values[a])
                if f == person.held_out[a]:
                    assert sentence not in text, sentence
            assert person.values[a] in text.split(" ")
        words, cats = text.split(" "), row["word_categories"]
        labelled = {w: c for w, c in zip(words, cats, strict=True) if c >= first_value}
        assert labelled == {v: first_value + a for a, v in enumerate(person.values)}


def test_queries_ask_each_fact_in_its_held_out_form() -> None:
    crowd = facts.people(30, LANGUAGE_SEED)
    queries = facts.queries(30, LANGUAGE_SEED)
    assert len(queries) == 30 * len(facts.ATTRIBUTES)
    for q in queries:
        person = crowd[q.person]
        form = facts.FORMS[facts.ATTRIBUTES[q.attribute]][person.held_out[q.attribute]]
        assert q.prompt + q.target == form.replace("NAME", person.name).replace(" VALUE", f" {q.answer}")
    sample = facts.queries(30, LANGUAGE_SEED, limit=10)
    assert len(sample) == 10 and set(sample) <= set(queries)


class _Oracle(torch.nn.Module):
    """Predicts the next token of the true text at every position, except at `wrong` query rows' last target."""

    def __init__(self, ids: torch.Tensor, wrong: set[int]) -> None:
        super().__init__()
        self.rows = {tuple(r.tolist()): i for i, r in enumerate(ids[:, :-1])}
        self.ids, self.wrong = ids, wrong

    def forward(self, ids_BS: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids_BS.shape, 258)
        for b, row in enumerate(ids_BS):
            i = self.rows[tuple(row.tolist())]
            nxt = self.ids[i, 1:].clone()
            if i in self.wrong:
                nxt[-1] = (nxt[-1] + 1) % 256  # the last token of the longest row: always a target token
            logits[b, torch.arange(len(nxt)), nxt] = 1.0
        return logits


def test_recall_is_exact_match_of_the_greedy_continuation() -> None:
    queries = facts.queries(5, LANGUAGE_SEED)
    recall = FactRecall(queries, ByteTokenizer(), max_len=128)
    # every row is eos + prompt + target (then eos padding): the scored positions are exactly the target's
    for q, ids, scored in zip(queries, recall.ids_QL, recall.scored_QL, strict=True):
        length = 1 + len((q.prompt + q.target).encode())
        assert int(scored.sum()) == len(q.target.encode())
        assert scored[length - 2] and not scored[length - 1 - len(q.target.encode()) - 1]
        assert bytes(ids[1:length].tolist()).decode() == q.prompt + q.target
    longest = max(range(len(queries)), key=lambda i: len((queries[i].prompt + queries[i].target).encode()))
    assert recall.evaluate(_Oracle(recall.ids_QL, set()), torch.device("cpu"), batch_size=7)[0]["fact_recall"] == 1.0
    out, records = recall.evaluate(_Oracle(recall.ids_QL, {longest}), torch.device("cpu"), batch_size=7)
    assert out["fact_recall"] == pytest.approx((len(queries) - 1) / len(queries))
    attribute = facts.ATTRIBUTES[queries[longest].attribute]
    assert out[f"fact_recall/{attribute}"] == 4 / 5
    # one record per query, in order: only the query the oracle gets wrong misses
    assert records["query"].tolist() == list(range(len(queries)))
    assert records["hit"].tolist() == [int(i != longest) for i in range(len(queries))]
    assert records["attribute"][longest] == attribute


def test_fact_verification_validation_asks_about_pairs_no_training_statement_mentions() -> None:
    crowd = facts.people(300, LANGUAGE_SEED)
    train, val = facts.verification(300, LANGUAGE_SEED, num_train=3000, num_val=600)
    assert (len(train), len(val)) == (3000, 600)

    def pair(text: str) -> tuple[int, int]:
        # the statement is the person's held-out form: find who and which attribute it names
        hits = [
            (p, a)
            for p, person in enumerate(crowd)
            for a in range(len(facts.ATTRIBUTES))
            if text.rsplit(" ", 2)[0] == facts.statement(person, a, "\0").split(" \0")[0]
        ]
        assert len(hits) == 1, (text, hits)
        return hits[0]

    val_pairs = {pair(t) for t, _ in val}
    train_pairs = {pair(t) for t, _ in train}
    assert len(val_pairs) == 600 and not val_pairs & train_pairs
    assert len(train_pairs) == 300 * 4 - 600  # 3000 training statements cycle through every other pair
    for text, label in val + train:
        p, a = pair(text)
        value = text.removesuffix(" .").rsplit(" ", 1)[1]
        assert (value == crowd[p].values[a]) == bool(label), text
    # balanced: the true fraction is within 4 binomial errors of 1/2
    assert abs(sum(y for _, y in val) / 600 - 0.5) < 4 * (0.25 / 600) ** 0.5


def test_fact_verification_small_task_is_a_prefix_of_the_large_one_with_the_same_validation() -> None:
    small, val_small = facts.verification(600, LANGUAGE_SEED, num_train=250, num_val=2000)
    large, val_large = facts.verification(600, LANGUAGE_SEED, num_train=20_000, num_val=2000)
    assert small == large[:250] and val_small == val_large


def test_fact_verification_names_the_people_it_needs() -> None:
    with pytest.raises(ValueError, match=r"2000 validation examples.*400 .*100 people.*above 500"):
        facts.verification(100, LANGUAGE_SEED, num_train=10, num_val=2000)
