"""Fact recall: exact match of a language model's greedy continuation on held-out queries of trained facts.

A query is a prompt in the form its fact was never trained in ("the hometown of Fingo Plimindman is") and a
target, the value and the end of the sentence (" Prartnanford ."). Greedy decoding produces the target exactly
iff, teacher-forced on the target, the argmax at every target position is the target's token, so one forward
pass per batch scores it (no sampling loop). The prompt starts after an eos, as a document does.
"""

from __future__ import annotations

from collections import defaultdict

import pandas as pd
import torch

from moe_lab.data import facts
from moe_lab.data.tokenizers import Tokenizer


class FactRecall:
    """Encoded queries and their scoring; `evaluate` gives overall and per-attribute exact-match recall."""

    def __init__(self, queries: list[facts.Query], tokenizer: Tokenizer, max_len: int) -> None:
        if not queries:
            raise ValueError("fact recall needs at least one query")
        self.attributes = [q.attribute for q in queries]
        rows, starts = [], []
        for q in queries:
            text = q.prompt + q.target
            ids, offsets = tokenizer.encode_with_offsets(text)
            # the first token that reaches into the target: a BPE token may straddle the boundary
            first = next(i for i, (_, end) in enumerate(offsets) if end > len(q.prompt))
            rows.append([tokenizer.eos_id, *ids])
            starts.append(first + 1)
        longest = max(map(len, rows))
        if longest > max_len + 1:
            raise ValueError(f"a fact query is {longest} tokens, more than the model's {max_len} + 1")
        self.ids_QL = torch.full((len(rows), longest), tokenizer.eos_id, dtype=torch.long)
        # scored_QL[q, t]: the logits at t predict token t + 1, a target token
        self.scored_QL = torch.zeros((len(rows), longest - 1), dtype=torch.bool)
        for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
            self.ids_QL[i, : len(row)] = torch.tensor(row)
            self.scored_QL[i, start - 1 : len(row) - 1] = True

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
