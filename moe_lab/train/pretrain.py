"""`moe-lab pretrain`: data + model + loop + logging for one language-model run."""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from moe_lab.config import RunConfig, to_run_config
from moe_lab.data.lm import LMData, build_lm_data, lm_tokenizer
from moe_lab.data.tokenizers import token_text
from moe_lab.models import LanguageModel, count_parameters, flops_per_token
from moe_lab.models.transformer import ModelLosses
from moe_lab.runs import identity_config
from moe_lab.track import RunLogger, WandbSink
from moe_lab.train.loop import resolve_device, train
from moe_lab.train.recall import FactRecall
from moe_lab.train.rundir import RunStart, begin_run, claim


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
    ) -> None:
        self.data = data
        self.recall = recall
        self.token_name = token_name
        self.batch_size = batch_size
        self.seed = seed
        self.eval_batches = eval_batches
        self.batches_per_epoch = data.train_BS.shape[0] // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(f"{data.train_BS.shape[0]} training sequences: too few for one batch of {batch_size}")
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

    def evaluate(self, model: LanguageModel, device: torch.device) -> dict[str, float]:
        """Cross-entropy and perplexity on the first eval_batches batches of validation (always the same)."""
        val = self.data.val_BS[: self.eval_batches * self.batch_size]
        total, count = 0.0, 0
        for start in range(0, val.shape[0], self.batch_size):
            rows = val[start : start + self.batch_size].to(device)
            loss = model.losses(rows[:, :-1], rows[:, 1:]).task.item()
            total += loss * rows[:, 1:].numel()
            count += rows[:, 1:].numel()
        val_loss = total / count
        out = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        if self.recall is not None:
            out.update(self.recall.evaluate(model, device, self.batch_size))
        return out


def fact_recall(run: RunConfig, tokenizer) -> FactRecall | None:
    """The held-out fact queries of a synthetic corpus with biographies (train.fact_queries of them), or None."""
    data = run.data
    if data.source != "synthetic" or not (data.num_people and data.fact_fraction) or not run.train.fact_queries:
        return None
    from moe_lab.data.facts import queries
    from moe_lab.data.synthetic import LANGUAGE_SEED

    chosen = queries(data.num_people, LANGUAGE_SEED, limit=run.train.fact_queries)
    return FactRecall(chosen, tokenizer, run.model.max_seq_len)


def describe_model(console: Console, name: str, params: dict[str, int], flops: int | None = None) -> None:
    """A table of total and active parameters (and FLOPs per token when known)."""
    table = Table(title=f"model {name}", show_header=False)
    table.add_row("parameters (total)", f"{params['total']:,}")
    table.add_row("parameters (active per token)", f"{params['active']:,}")
    table.add_row("of which experts (total)", f"{params['experts']:,}")
    if flops is not None:
        table.add_row("forward FLOPs per token", f"{flops:,}")
    console.print(table)


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
    console = console or Console()
    run = to_run_config(cfg).scaled()
    identity = identity_config(run)
    start = begin_run(run, identity, console, rerun)
    if start.previous is not None:
        return start.previous
    if run.train.seq_len > run.model.max_seq_len:
        raise ValueError(f"train.seq_len={run.train.seq_len} exceeds model.max_seq_len={run.model.max_seq_len}")

    # data and model first: a missing file or an unreachable hub fails before any run directory exists
    started = time.time()
    data = build_lm_data(run.data, run.tokenizer, run.train.seq_len)
    model = LanguageModel(run.model, run.moe, data.vocab_size)
    tokenizer = lm_tokenizer(run.data, run.tokenizer)
    recall = fact_recall(run, tokenizer)
    task = LMTask(
        data, run.train.batch_size, start.seed, run.train.eval_batches, partial(token_text, tokenizer), recall
    )
    start = claim(start, identity, cfg, overrides or [], console, wait)
    if start.previous is not None:  # another process finished it while we waited
        return start.previous
    run_dir = start.run_dir
    params = count_parameters(model)
    flops = flops_per_token(run.model, run.moe, data.vocab_size, run.train.seq_len)
    describe_model(console, run.name, params, flops)
    console.print(
        f"data: {data.train_tokens:,} train tokens ({data.tokenizer_name}), {data.val_BS.numel():,} val; "
        f"unigram val loss {data.unigram_val_loss:.4f}; run dir {run_dir}"
    )
    extra = {"flops_per_token": flops, "unigram_val_loss": data.unigram_val_loss}
    return train_and_record(run, cfg, start, model, task, params, extra, started, console)


def train_and_record(
    run: RunConfig,
    cfg: DictConfig,
    start: RunStart,
    model: torch.nn.Module,
    task: Any,
    params: dict[str, int],
    extra: dict[str, Any],
    started: float,
    console: Console,
) -> dict:
    """Train with logging to CSV (and W&B), and write summary.json however the run ends; returns the summary.
    Releases the run directory's lock at the end."""
    run_dir = start.run_dir
    try:
        resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        wandb_sink = None
        if run.logger.wandb:
            wandb_id = (start.record or {}).get("wandb_id")
            wandb_name = f"{run.name}/{run_dir.name}"
            wandb_sink = WandbSink(run_dir, run.logger.project, wandb_name, resolved, run.logger.wandb_mode, wandb_id)
        logger = RunLogger(run_dir, wandb_sink)
        summary: dict[str, Any] = {
            "name": run.name,
            "run_dir": str(run_dir),
            "identity": (start.record or {}).get("identity"),
            "status": "running",
            "parameters": params,
            **extra,
            "device": str(resolve_device(run.train.device)),
            "torch_version": torch.__version__,
            "started": datetime.fromtimestamp(started, timezone.utc).isoformat(),
            "config": resolved,
        }
        failed = False
        try:
            result = train(
                model, task, run.train, run.optim, run_dir, logger, resume_state=start.resume_state, console=console,
                show_progress=run.logger.progress,
            )  # fmt: skip
            summary.update(
                status=result.status,
                step=result.step,
                final_train_loss=result.train_loss,
                **{f"final_{k}": v for k, v in result.eval.items()},
                **{f"best_{k}": v for k, v in result.best.items()},
                diverged_at_step=result.diverged_at,
                reason=result.reason,
                train_seconds=result.train_seconds,
                tokens=result.tokens,
                tokens_per_s=result.tokens_per_s,
                **result.fluctuation,
            )
        except BaseException as err:
            failed = True
            summary.update(status="failed", reason=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
            if isinstance(err, Exception):
                raise RunFailedError(
                    f"{run_dir} failed while training ({type(err).__name__}: {err}); "
                    f"the traceback is in {run_dir / 'summary.json'}; resume=true continues from the last checkpoint"
                ) from err
            raise  # Ctrl-C or SystemExit: recorded as failed, resumable
        finally:
            summary["wall_seconds"] = time.time() - started
            logger.summary(summary)
            logger.finish(failed=failed)
        report_run(console, summary)
        return summary
    finally:
        start.release()


class RunFailedError(RuntimeError):
    """A run that started training and then raised: recorded as failed in its summary.json."""


def report_run(console: Console, summary: dict) -> None:
    """The end-of-run lines: status, losses against the unigram baseline, speed."""
    status = summary["status"]
    colour = {"completed": "green", "diverged": "red"}.get(status, "yellow")
    console.print(f"[{colour}]{status}[/{colour}] after {summary.get('step')} steps in {summary['wall_seconds']:.0f} s")
    if summary.get("unigram_val_loss") is not None and summary.get("final_val_loss") is not None:
        console.print(
            f"final val loss {summary['final_val_loss']:.4f} (ppl {summary['final_val_ppl']:.2f}) vs unigram "
            f"{summary['unigram_val_loss']:.4f}; {summary['tokens_per_s']:,.0f} train tokens/s"
        )
    elif summary.get("final_val_loss") is not None:
        finals = "  ".join(
            f"{k.removeprefix('final_')} {v:.4f}" for k, v in summary.items() if k.startswith("final_val")
        )
        console.print(f"{finals}; {summary['tokens_per_s']:,.0f} train tokens/s")
    console.print(f"results: {summary['run_dir']}/summary.json, metrics.csv")
