"""`moe-lab finetune`: a pretrained checkpoint + a classification head, trained with the same loop."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import pandas as pd
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console

from moe_lab.config import FINETUNE_MOE_KEYS, FinetuneConfig, ModelConfig, RunConfig, finetune_changes, to_run_config
from moe_lab.data.lm import lm_tokenizer
from moe_lab.data.tasks import ClassificationData, build_classification_data
from moe_lab.models import ClassifierModel
from moe_lab.models.transformer import ModelLosses, is_moe_position
from moe_lab.runs import identity_config, record_hash
from moe_lab.train.checkpoint import load_checkpoint, weights_fingerprint
from moe_lab.train.freeze import apply_freeze
from moe_lab.train.loop import CHECKPOINT, Evaluation
from moe_lab.train.run import Built, run_training


def macro_f1(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions (SuperGLUE CB)."""
    scores = []
    for c in range(num_classes):
        tp = ((pred == c) & (labels == c)).sum().item()
        fp = ((pred == c) & (labels != c)).sum().item()
        fn = ((pred != c) & (labels == c)).sum().item()
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


class ClassificationTask:
    """Padded batches of tokenized examples; batch i is a pure function of (seed, i)."""

    def __init__(self, data: ClassificationData, batch_size: int, seed: int, pad_id: int, train_eval: int) -> None:
        self.data = data
        self.batch_size = min(batch_size, len(data.train_ids))
        self.seed = seed
        self.pad_id = pad_id
        self.train_eval = train_eval
        self.batches_per_epoch = len(data.train_ids) // self.batch_size
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _collate(self, ids: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([len(x) for x in ids])
        width = max(1, int(lengths.max()))
        batch = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        for row, x in enumerate(ids):
            batch[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        # the mask from the lengths, not from pad_id: a tokenizer whose pad is its eos (a transformers fallback)
        # may put that token inside a text
        return batch.to(device), (torch.arange(width)[None, :] < lengths[:, None]).to(device)

    def train_batch(self, index: int, device: torch.device) -> dict[str, torch.Tensor]:
        epoch, j = divmod(index, self.batches_per_epoch)
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.data.train_ids), generator=gen), epoch
        rows = self._perm[j * self.batch_size : (j + 1) * self.batch_size].tolist()
        ids, mask = self._collate([self.data.train_ids[r] for r in rows], device)
        return {"ids": ids, "mask": mask, "labels": self.data.train_labels[rows].to(device)}

    def loss(self, model: ClassifierModel, batch: dict[str, torch.Tensor]) -> ModelLosses:
        return model.losses(batch["ids"], batch["labels"], batch["mask"])

    def tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["mask"].sum()  # on the device: the training loop reads it with the step's losses

    def _score(self, model, ids: list[list[int]], labels: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each example's log-probability of its label and its predicted class."""
        logprobs, preds = [], []
        for start in range(0, len(ids), self.batch_size):
            x, mask = self._collate(ids[start : start + self.batch_size], device)
            logp = torch.log_softmax(model(x, mask).float(), -1)
            y = labels[start : start + self.batch_size].to(device)
            logprobs.append(logp.gather(1, y[:, None])[:, 0].cpu())
            preds.append(logp.argmax(-1).cpu())
        return torch.cat(logprobs).double(), torch.cat(preds)

    def evaluate(self, model: ClassifierModel, device: torch.device) -> Evaluation:
        """Validation loss, accuracy and macro-F1, with each validation example's record ("val": example, label,
        prediction, label_logprob); training loss and accuracy on a fixed training subset."""
        d = self.data
        val_logp, val_pred = self._score(model, d.val_ids, d.val_labels, device)
        n = min(self.train_eval, len(d.train_ids))
        train_logp, train_pred = self._score(model, d.train_ids[:n], d.train_labels[:n], device)
        metrics = {
            "val_loss": float(-val_logp.mean()),
            "val_accuracy": (val_pred == d.val_labels).float().mean().item(),
            "val_f1": macro_f1(val_pred, d.val_labels, d.num_classes),
            "train_eval_loss": float(-train_logp.mean()),
            "train_accuracy": (train_pred == d.train_labels[:n]).float().mean().item(),
        }
        records = pd.DataFrame({
            "example": range(len(d.val_ids)),
            "label": d.val_labels.numpy(),
            "prediction": val_pred.numpy(),
            "label_logprob": val_logp.numpy(),
        })  # fmt: skip
        return Evaluation(metrics, {"val": records})


def pretrained_run(checkpoint: str) -> tuple[Path, RunConfig]:
    """The pretraining run directory and its config; a missing or unreadable file, or a fine-tuning run, names
    the path and what is expected."""
    path = Path(checkpoint)
    run_dir = path.parent if path.is_file() else path
    config = run_dir / ".hydra" / "config.yaml"
    expected = (
        f"a pretraining run directory with {CHECKPOINT} and .hydra/config.yaml (e.g. results/runs/small/<timestamp>)"
    )
    if not config.is_file():
        raise FileNotFoundError(f"checkpoint={checkpoint!r}: expected {expected}")
    try:
        pre = to_run_config(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(config)))
    except yaml.YAMLError as err:
        raise ValueError(f"checkpoint={checkpoint!r}: {config} is not valid YAML ({_yaml_problem(err)}); expected "
                         f"{expected}") from None  # fmt: skip
    except (OmegaConfBaseException, ValueError) as err:
        problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"checkpoint={checkpoint!r}: {config} is not the config `moe-lab pretrain` writes ({problem}); "
            f"expected {expected}"
        ) from None
    if pre.checkpoint:  # its weights are a classifier's, fine-tuned from another run
        raise ValueError(
            f"checkpoint={checkpoint!r}: {run_dir} is a fine-tuning run (of {pre.checkpoint}); expected {expected}: "
            f"fine-tune from checkpoint={pre.checkpoint}"
        )
    return run_dir, pre


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What the YAML parser found wrong, and where."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    return f"{problem} at line {mark.line + 1} column {mark.column + 1}" if mark else problem


def load_pretrained(model: ClassifierModel, pre_dir: Path) -> str:
    """The pretrained transformer's weights into `model`, returning the checkpoint's weights_fingerprint; a
    checkpoint that does not fit the model its config describes is a ValueError naming both files."""
    state = load_checkpoint(pre_dir / CHECKPOINT)["model"]
    weights = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
    try:
        model.transformer.load_state_dict(weights)
    except RuntimeError as err:  # missing, unexpected or misshapen weights, one per line after torch's heading
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ValueError(
            f"{pre_dir / CHECKPOINT} does not hold the model that {pre_dir / '.hydra' / 'config.yaml'} describes "
            f"({(lines[1:] or lines or [type(err).__name__])[0]}); expected the two files of one `moe-lab pretrain` run"
        ) from None
    return weights_fingerprint(state)


def has_moe_layers(model: ModelConfig) -> bool:
    """Whether a model of this config has an MoE layer (not the dense twin, and some block at an MoE position)."""
    return model.sparse and any(is_moe_position(i, model.moe_every) for i in range(model.num_layers))


def check_dense_settings(model: ModelConfig, moe_keys: set[str], finetune: FinetuneConfig, where: Path) -> None:
    """Raise ValueError naming a setting that would change nothing on a pretrained model without MoE layers: a
    changed moe.* key, finetune.freeze=moe (only the new head would train) or finetune.freeze_router=true."""
    if has_moe_layers(model):
        return
    dense = (
        f"the pretrained model {where} has no MoE layer (model.sparse={str(model.sparse).lower()}, "
        f"model.moe_every={model.moe_every})"
    )
    if moe_keys:
        keys = ", ".join(f"moe.{k}" for k in sorted(moe_keys))
        raise ValueError(f"{keys}: {dense}, so it would change nothing; leave it out, or fine-tune a sparse model")
    if finetune.freeze == "moe":
        raise ValueError(
            f"finetune.freeze=moe: {dense}, so only the new classification head would train; use finetune.freeze="
            "all, non_moe, attention or ffn"
        )
    if finetune.freeze_router:
        raise ValueError(f"finetune.freeze_router=true: {dense}, so there is no router to freeze; leave it out")


def build_finetuning(run: RunConfig, pre_dir: Path, pre: RunConfig, moe_keys: set[str], model_keys: set[str]) -> Built:
    """The task's data and the pretrained model with a classification head, frozen as finetune.freeze says.
    Called once the run is known not to have ended: a finished run needs no weights (a fresh clone holds records,
    not checkpoints)."""
    if not (pre_dir / CHECKPOINT).is_file():
        raise FileNotFoundError(
            f"checkpoint={run.checkpoint!r}: {pre_dir} is a pretraining record without its {CHECKPOINT} (checkpoints "
            "are not committed): a `moe-lab sweep` of a study that stands on it pretrains it again, or fine-tune "
            "from a pretraining run of your own"
        )

    # the architecture is the checkpoint's; fine-tuning may change capacity, losses and dropout
    moe_cfg = replace(pre.moe, **{k: getattr(run.moe, k) for k in moe_keys})
    model_cfg = replace(pre.model, **{k: getattr(run.model, k) for k in model_keys})
    tokenizer = lm_tokenizer(pre.data, pre.tokenizer)
    # examples longer than the model's context are cut to it
    task_cfg = replace(run.task, max_len=min(run.task.max_len, model_cfg.max_seq_len))
    num_people = pre.data.num_people if pre.data.source == "synthetic" and pre.data.fact_fraction else 0
    if run.task.source == "polarity" and not (pre.data.source == "synthetic" and pre.data.valence_cues):
        raise ValueError(
            f"task {run.task.name!r} asks what the embedded corpus's cue sentences teach about adjectives, but the "
            f"pretrained model read data.source={pre.data.source!r} with data.valence_cues={pre.data.valence_cues}: "
            "pretrain on data.source=synthetic with data.valence_cues=true"
        )
    data = build_classification_data(
        task_cfg, tokenizer, pre.data.cache_dir, run.seed, num_people, pre.data.num_domains
    )
    model = ClassifierModel(model_cfg, moe_cfg, tokenizer.vocab_size, data.num_classes, run.task.pooling)
    base = None  # the weights it starts from, so that runs of two builds of one pretraining are never paired
    if run.finetune.init == "pretrained":  # else the checkpoint's architecture from the seed's initialisation
        base = load_pretrained(model, pre_dir)
    counts = apply_freeze(model, run.finetune.freeze, run.finetune.freeze_router)
    task = ClassificationTask(data, run.train.batch_size, run.seed, tokenizer.pad_id, run.finetune.train_eval_examples)
    about = (
        f"task {run.task.name}: {len(data.train_ids):,} train / {len(data.val_ids):,} val examples, "
        f"{data.num_classes} classes; trainable parameters {counts['trainable']:,} of {counts['total']:,} "
        f"(freeze={run.finetune.freeze}{', router frozen' if run.finetune.freeze_router else ''})"
    )
    extra = {
        "task": run.task.name,
        "metric": run.task.metric,
        "val_examples": len(data.val_ids),
        "label_names": list(data.label_names),
        "pretrained": str(pre_dir),
        "pretrained_weights": base,
        "trainable_parameters": counts["trainable"],
        "moe": {k: getattr(moe_cfg, k) for k in FINETUNE_MOE_KEYS},
    }
    return Built(model, task, extra, f"{pre.name} -> {run.task.name}", about)


def run_finetune(
    cfg: DictConfig,
    overrides: list[str] | None = None,
    console: Console | None = None,
    rerun: bool = False,
    wait: bool = False,
) -> dict:
    """Fine-tune a pretrained model on a classification task; returns the summary written to summary.json."""
    console = console or Console()
    overrides = list(overrides or [])
    run = to_run_config(cfg).scaled()
    if not run.checkpoint:
        raise ValueError("fine-tuning needs checkpoint=RUN_DIR (a `moe-lab pretrain` run directory)")
    moe_keys, model_keys = finetune_changes(overrides)
    pre_dir, pre = pretrained_run(run.checkpoint)
    check_dense_settings(pre.model, moe_keys, run.finetune, pre_dir)
    run = replace(run, name=f"finetune-{run.task.name}")
    identity = identity_config(run, record_hash(pre_dir))
    build = partial(build_finetuning, pre_dir=pre_dir, pre=pre, moe_keys=moe_keys, model_keys=model_keys)
    return run_training(run, identity, build, cfg, overrides, console, rerun, wait)
