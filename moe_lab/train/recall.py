"""What a language model recalls of its corpus: facts, and the valence its cue sentences teach.

Fact recall: exact match of a language model's greedy continuation on held-out queries of trained facts.

A query is a prompt in the form its fact was never trained in ("the hometown of Fingo Plimindman is") and a
target, the value and the end of the sentence (" Prartnanford ."). Greedy decoding produces the target exactly
iff, teacher-forced on the target, the argmax at every target position is the target's token, so one forward
pass per batch scores it (no sampling loop). The prompt starts after an eos, as a document does.

Valence recall: whether the model has learnt each taught adjective's valence, the thing the polarity fine-tuning
tasks ask, so that a base model that never learnt it is seen before fine-tuning reads chance off it.
"""

from __future__ import annotations

from collections import defaultdict

import pandas as pd
import torch

from moe_lab.data import facts
from moe_lab.data.tokenizers import Tokenizer

VALENCE_SENTENCES = 64  # cue sentences a valence recall scores, each with all 8 cue words (binomial SE <= 6 points)


class FactRecall:
    """Encoded queries and their scoring; `evaluate` gives overall and per-attribute exact-match recall."""

    def __init__(self, queries: list[facts.Query], tokenizer: Tokenizer, max_len: int) -> None:
        if not queries:
            raise ValueError("fact recall needs at least one query")
        self.attributes = [q.attribute for q in queries]
        pairs = [(q.prompt, q.target) for q in queries]
        self.ids_QL, self.scored_QL = _prompt_rows(pairs, tokenizer)
        if self.ids_QL.shape[1] > max_len + 1:
            raise ValueError(f"a fact query is {self.ids_QL.shape[1]} tokens, more than the model's {max_len} + 1")

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, device: torch.device, batch_size: int = 64
    ) -> tuple[dict[str, float], pd.DataFrame]:
        """Overall and per-attribute recall, and each query's record (query, attribute, hit)."""
        was_training = model.training
        model.eval()
        hits = []
        for start in range(0, self.ids_QL.shape[0], batch_size):
            ids = self.ids_QL[start : start + batch_size].to(device)
            scored = self.scored_QL[start : start + batch_size].to(device)
            predicted = model(ids[:, :-1]).argmax(-1)
            correct = (predicted == ids[:, 1:]) | ~scored
            hits.append(correct.all(dim=1).cpu())
        model.train(was_training)
        hit_Q = torch.cat(hits).float()
        out = {"fact_recall": float(hit_Q.mean())}
        by: dict[int, list[float]] = defaultdict(list)
        for attribute, hit in zip(self.attributes, hit_Q.tolist(), strict=True):
            by[attribute].append(hit)
        for attribute, values in sorted(by.items()):
            out[f"fact_recall/{facts.ATTRIBUTES[attribute]}"] = sum(values) / len(values)
        records = pd.DataFrame({
            "query": range(len(self.attributes)),
            "attribute": [facts.ATTRIBUTES[a] for a in self.attributes],
            "hit": hit_Q.int().numpy(),
        })  # fmt: skip
        return out, records


def _prompt_rows(
    pairs: list[tuple[str, str]], tokenizer: Tokenizer, window: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [R, L], scored [R, L - 1]) of (prompt, target) pairs, each row an eos then prompt + target, padded with
    eos; scored[r, t] marks the logits at t that predict a target token (the first token reaching into the
    target onward: a BPE token may straddle the boundary). A row longer than `window` keeps its last `window`
    tokens, as a model of that context length would read it (the target whole)."""
    rows, starts = [], []
    for prompt, target in pairs:
        ids, offsets = tokenizer.encode_with_offsets(prompt + target)
        row = [tokenizer.eos_id, *ids]
        start = 1 + next(i for i, (_, end) in enumerate(offsets) if end > len(prompt))
        cut = max(0, len(row) - window) if window else 0
        if start - cut < 1:
            raise ValueError(f"the target {target!r} is longer than a window of {window} tokens")
        rows.append(row[cut:])
        starts.append(start - cut)
    ids_RL = torch.full((len(rows), max(map(len, rows))), tokenizer.eos_id, dtype=torch.long)
    scored_RL = torch.zeros((len(rows), ids_RL.shape[1] - 1), dtype=torch.bool)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        ids_RL[i, : len(row)] = torch.tensor(row)
        scored_RL[i, start - 1 : len(row) - 1] = True
    return ids_RL, scored_RL


class ValenceRecall:
    """How many cue sentences, cut before their cue (moe_lab.data.synthetic.cue_contexts, over every taught
    adjective), the model goes on with a word of the right valence: the pleasant cue words' probability together
    against the unpleasant ones', each word teacher-forced after the sentence (its tokens' log-probabilities
    summed), as the polarity tasks' clozes ask it."""

    def __init__(self, sentences: list[tuple[str, int]], tokenizer: Tokenizer, max_len: int) -> None:
        from moe_lab.data.words import NEGATIVE_CUES, POSITIVE_CUES

        if not sentences:
            raise ValueError("valence recall needs at least one cue sentence")
        self.words = (*POSITIVE_CUES, *NEGATIVE_CUES)
        self.positive = len(POSITIVE_CUES)
        self.texts = [text for text, _ in sentences]
        self.signs = torch.tensor([sign for _, sign in sentences])
        pairs = [(text, word) for text in self.texts for word in self.words]
        # a sentence longer than the model's context is read from its end: the cue hangs on the last few words
        self.ids_RL, self.scored_RL = _prompt_rows(pairs, tokenizer, window=max_len + 1)

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, device: torch.device, batch_size: int = 64
    ) -> tuple[dict[str, float], pd.DataFrame]:
        """valence_recall (the share of sentences answered with the right valence) and each sentence's record
        (sentence, valence, the pleasant words' log-odds against the unpleasant ones', hit)."""
        was_training = model.training
        model.eval()
        scores = []
        for start in range(0, self.ids_RL.shape[0], batch_size):
            ids = self.ids_RL[start : start + batch_size].to(device)
            logp = model(ids[:, :-1]).float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
            scores.append((logp * self.scored_RL[start : start + batch_size].to(device)).sum(1).cpu())
        model.train(was_training)
        score_NW = torch.cat(scores).view(len(self.texts), len(self.words))
        log_odds_N = score_NW[:, : self.positive].logsumexp(1) - score_NW[:, self.positive :].logsumexp(1)
        hit_N = (log_odds_N > 0) == (self.signs > 0)
        records = pd.DataFrame({
            "sentence": range(len(self.texts)),
            "valence": self.signs.numpy(),
            "log_odds": log_odds_N.numpy(),
            "hit": hit_N.int().numpy(),
        })  # fmt: skip
        return {"valence_recall": float(hit_N.float().mean())}, records
