"""`moe-lab pretrain`: data + model + loop + logging for one language-model run."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from functools import partial

import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from rich.console import Console

from moe_lab.config import RunConfig, to_run_config
from moe_lab.data.lm import LMData, build_lm_data, lm_tokenizer
from moe_lab.data.tokenizers import token_text
from moe_lab.models import LanguageModel, flops_per_token
from moe_lab.models.transformer import ModelLosses
from moe_lab.runs import identity_config
from moe_lab.train.loop import Evaluation
from moe_lab.train.recall import VALENCE_SENTENCES, FactRecall, ValenceRecall
from moe_lab.train.run import Built, run_training


class LMTask:
    """Next-token prediction on packed sequences; batch i is a pure function of (seed, i)."""

    def __init__(
        self,
        data: LMData,
        batch_size: int,
        seed: int,
        eval_batches: int,
        token_name: Callable[[int], str] | None = None,
        recall: FactRecall | None = None,
        valence: ValenceRecall | None = None,
    ) -> None:
        self.data = data
        self.recall, self.valence = recall, valence
        self.token_name = token_name
        self.batch_size = batch_size
        self.seed = seed
        self.eval_batches = eval_batches
        self.batches_per_epoch = data.train_BS.shape[0] // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{data.train_BS.shape[0]} training sequences: too few for one batch of train.batch_size={batch_size}"
            )
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.data.train_BS.shape[0], generator=gen), epoch
        return self._perm

    def train_batch(self, index: int, device: torch.device) -> dict[str, torch.Tensor]:
        epoch, j = divmod(index, self.batches_per_epoch)
        rows = self.data.train_BS[self._permutation(epoch)[j * self.batch_size : (j + 1) * self.batch_size]]
        return {"ids": rows[:, :-1].to(device), "targets": rows[:, 1:].to(device)}

    def loss(self, model: LanguageModel, batch: dict[str, torch.Tensor]) -> ModelLosses:
        return model.losses(batch["ids"], batch["targets"])

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["ids"].numel()

    def _probe_rows(self, num_tokens: int, seed: int) -> torch.Tensor:
        val = self.data.val_BS
        rows = min(val.shape[0], -(-num_tokens // (val.shape[1] - 1)))
        return torch.randperm(val.shape[0], generator=torch.Generator().manual_seed(seed))[:rows]

    def probe_ids(self, num_tokens: int, seed: int = 0) -> torch.Tensor:
        """A fixed, seeded sample of validation sequences with at least num_tokens tokens, for routing probes."""
        return self.data.val_BS[self._probe_rows(num_tokens, seed), :-1]

    def probe_labels(
        self, num_tokens: int, seed: int = 0, top_tokens: int = 20
    ) -> tuple[torch.Tensor, list[str]] | tuple[None, None]:
        """Labels of the tokens of `probe_ids(num_tokens, seed)` for the expert-specialisation table: the
        synthetic corpus's word categories, else the `top_tokens` most frequent token ids of the probe (the
        rest unlabelled, -1)."""
        if self.data.categories_val_BS is not None:
            from moe_lab.data.synthetic import CATEGORIES

            return self.data.categories_val_BS[self._probe_rows(num_tokens, seed), :-1], list(CATEGORIES)
        if self.token_name is None:
            return None, None
        ids_BS = self.probe_ids(num_tokens, seed)
        values, counts = ids_BS.reshape(-1).unique(return_counts=True)
        top = values[counts.argsort(descending=True, stable=True)[:top_tokens]]  # ties: the smaller id
        labels = torch.full_like(ids_BS, -1)
        for i, token in enumerate(top.tolist()):
            labels[ids_BS == token] = i
        return labels, [repr(self.token_name(t)) for t in top.tolist()]

    def evaluate(self, model: LanguageModel, device: torch.device) -> Evaluation:
        """Cross-entropy and perplexity on the first eval_batches batches of validation (always the same), with
        each sequence's loss as a record ("val": sequence, tokens, loss in nats per token), and fact recall
        with each query's hit ("facts") where the corpus has facts, and valence recall with each cue sentence's
        ("valence") where its cue sentences teach valence."""
        val = self.data.val_BS[: self.eval_batches * self.batch_size]
        losses = []
        for start in range(0, val.shape[0], self.batch_size):
            rows = val[start : start + self.batch_size].to(device)
            logits = model(rows[:, :-1]).float()
            losses.append(F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none").cpu())
        loss_BS = torch.cat(losses).double()
        val_loss = float(loss_BS.mean())  # every sequence has the same number of tokens
        out = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        records = {
            "val": pd.DataFrame({
                "sequence": range(loss_BS.shape[0]),
                "tokens": loss_BS.shape[1],
                "loss": loss_BS.mean(1).numpy(),
            })
        }  # fmt: skip
        if self.recall is not None:
            metrics, hits = self.recall.evaluate(model, device, self.batch_size)
            out.update(metrics)
            records["facts"] = hits
        if self.valence is not None:
            metrics, sentences = self.valence.evaluate(model, device, self.batch_size)
            out.update(metrics)
            records["valence"] = sentences
        return Evaluation(out, records)


def fact_recall(run: RunConfig, tokenizer) -> FactRecall | None:
    """The held-out fact queries of a synthetic corpus with biographies (train.fact_queries of them), or None."""
    data = run.data
    if data.source != "synthetic" or not (data.num_people and data.fact_fraction) or not run.train.fact_queries:
        return None
    from moe_lab.data.facts import queries
    from moe_lab.data.synthetic import LANGUAGE_SEED

    chosen = queries(data.num_people, LANGUAGE_SEED, limit=run.train.fact_queries)
    return FactRecall(chosen, tokenizer, run.model.max_seq_len)


def valence_recall(run: RunConfig, tokenizer) -> ValenceRecall | None:
    """VALENCE_SENTENCES cue sentences over every adjective a synthetic corpus with valence cues teaches (a
    stream of their own, not the polarity tasks'), or None."""
    if run.data.source != "synthetic" or not run.data.valence_cues:
        return None
    from moe_lab.data.synthetic import cue_contexts, valenced_adjectives

    taught = {d: tuple(range(len(ws))) for d, ws in valenced_adjectives(run.data.num_domains).items()}
    sentences = list(itertools.islice(cue_contexts(3, taught), VALENCE_SENTENCES))
    return ValenceRecall(sentences, tokenizer, run.model.max_seq_len)


def build_pretraining(run: RunConfig) -> Built:
    """The data, language model and next-token task of a pretraining run."""
    if run.train.seq_len > run.model.max_seq_len:
        raise ValueError(f"train.seq_len={run.train.seq_len} exceeds model.max_seq_len={run.model.max_seq_len}")
    data = build_lm_data(run.data, run.tokenizer, run.train.seq_len)
    model = LanguageModel(run.model, run.moe, data.vocab_size)
    tokenizer = lm_tokenizer(run.data, run.tokenizer)
    recall, valence = fact_recall(run, tokenizer), valence_recall(run, tokenizer)
    task = LMTask(
        data, run.train.batch_size, run.seed, run.train.eval_batches, partial(token_text, tokenizer), recall, valence
    )
    flops = flops_per_token(run.model, run.moe, data.vocab_size, run.train.seq_len)
    about = (
        f"data: {data.train_tokens:,} train tokens ({data.tokenizer_name}), {data.val_BS.numel():,} val; "
        f"unigram val loss {data.unigram_val_loss:.4f}"
    )
    extra = {"flops_per_token": flops, "unigram_val_loss": data.unigram_val_loss}
    return Built(model, task, extra, run.name, about, flops)


def run_pretrain(
    cfg: DictConfig,
    overrides: list[str] | None = None,
    console: Console | None = None,
    rerun: bool = False,
    wait: bool = False,
) -> dict:
    """Train one language model as `cfg` says; returns the summary written to summary.json.

    `rerun` moves a run already in the run directory aside first; `wait` waits for another process training
    that directory instead of stopping (sweeps)."""
    run = to_run_config(cfg).scaled()
    return run_training(
        run, identity_config(run), build_pretraining, cfg, overrides or [], console or Console(), rerun, wait
    )
