"""The run configuration's schemas: one dataclass per group (model, data, ..., study), validated on construction;
the MoE layer's own, MoEConfig, sits beside the core it configures (moe_lab.moe.config)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from moe_lab.moe.config import ACTIVATIONS, MoEConfig, bounded, check_fields
from moe_lab.paths import check_name

# conf/ ships as the package moe_lab.conf (pyproject's package-dir): the repository's conf/ in an editable
# install, site-packages/moe_lab/conf in a wheel's. Hydra reads it as pkg://moe_lab.conf; the listings glob it.
CONF_MODULE = "moe_lab.conf"
CONF_DIR = Path(str(files(CONF_MODULE)))
PRESETS_DIR = CONF_DIR / "preset"


@dataclass
class ModelConfig:
    """A Transformer with MoE layers every `moe_every` blocks (ST-MoE Sec. 3: every 4th)."""

    d_model: int = bounded(128, ge=1)
    num_layers: int = bounded(4, ge=1)
    num_heads: int = bounded(4, ge=1)
    d_ff: int = bounded(512, ge=1)
    activation: str = bounded("geglu", choices=ACTIVATIONS)  # FFN of dense blocks; experts use moe.activation
    max_seq_len: int = bounded(128, ge=1)
    causal: bool = True  # decoder (LM pretraining) or bidirectional encoder (classification)
    # 0: no MoE layer; N: blocks N-1, 2N-1, ... are MoE (ST-MoE: 4); 1: every block
    moe_every: int = bounded(2, ge=0)
    # False builds the FLOP-matched dense twin: each MoE position gets a dense FFN of width top_k * d_ff
    sparse: bool = True
    # ST-MoE Table 16: an extra dense FFN stacked after each sparse one
    dense_stacking: bool = False
    norm: str = bounded("rmsnorm", choices=("rmsnorm", "layernorm"))
    dropout: float = bounded(0.0, ge=0, lt=1)
    tie_embeddings: bool = True
    # z-loss on the output logits, coefficient (0 = off); ST-MoE uses 1e-4 on the final logits
    output_z_loss_coef: float = bounded(0.0, ge=0)

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        check_fields(self, "model")
        if self.d_model % self.num_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}")


@dataclass
class DataConfig:
    """Where the text comes from: the embedded synthetic corpus, local files or a hub name."""

    source: str = bounded("synthetic", choices=("synthetic", "local", "hub"))
    # local: a file, a glob or a list of them; format is a `datasets` builder: text, json, csv, parquet
    path: Any = None
    format: str = bounded("text", choices=("text", "json", "csv", "parquet"))
    val_path: Any = None  # a separate validation file; otherwise the last val_fraction of the tokens
    text_column: str = "text"
    delimiter: str | None = None  # csv/tsv: "\t" for tsv
    # hub: `datasets.load_dataset(name, subset, split=split)`; needs network
    name: str | None = None
    subset: str | None = None
    split: str = "train"
    val_fraction: float = bounded(0.1, gt=0, lt=1)
    # synthetic corpus
    num_docs: int = bounded(20000, ge=1)
    num_domains: int = bounded(4, ge=1, le=8)  # synthetic.DOMAINS
    corpus_seed: int = bounded(0, ge=0)
    # the knowledge component (moe_lab.data.facts): biographies of num_people people, fact_fraction of the docs
    num_people: int = bounded(0, ge=0, le=100_000)
    fact_fraction: float = bounded(0.0, ge=0.0, le=1.0)
    # cue sentences that teach each adjective's valence (moe_lab.data.synthetic), which the polarity-* tasks ask
    valence_cues: bool = False
    cache_dir: str = "~/.cache/moe-lab"
    max_tokens: int | None = bounded(None, ge=1, none="all")  # cap on the tokens used (train + val), for quick runs

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        check_fields(self, "data")
        if self.source == "local" and not self.path:
            raise ValueError("data=local needs data.path=FILE (and data.format=text|json|csv|parquet)")
        if self.source == "hub" and not self.name:
            raise ValueError("data=hub needs data.name=DATASET (e.g. data.name=wikitext data.subset=wikitext-2-raw-v1)")


@dataclass
class TokenizerConfig:
    """byte (default, no download), hf (a transformers tokenizer by name or local path), bpe (trained here)."""

    kind: str = bounded("byte", choices=("byte", "hf", "bpe"))
    name: str | None = None
    vocab_size: int = bounded(4096, ge=258)  # bpe only: 256 bytes + <eos>, <pad> and the merges

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        check_fields(self, "tokenizer")
        if self.kind == "hf" and not self.name:
            raise ValueError("tokenizer=hf needs tokenizer.name=NAME_OR_PATH")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: str = bounded("adamw", choices=("adamw", "adafactor"))
    lr: float = bounded(3e-3, gt=0)
    weight_decay: float = bounded(0.1, ge=0)
    betas: tuple[float, float] = bounded((0.9, 0.95), ge=0, lt=1)
    eps: float = bounded(1e-8, gt=0)
    warmup_steps: int = bounded(50, ge=0)
    schedule: str = bounded("cosine", choices=("cosine", "linear", "constant", "rsqrt"))
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)
    grad_clip: float | None = bounded(1.0, gt=0, none="off")  # max global gradient norm
    # clip each parameter's update to this RMS (Adafactor's "d", ST-MoE Table 4)
    update_clip: float | None = bounded(None, gt=0, none="off")

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        check_fields(self, "optim")


@dataclass
class TrainConfig:
    """The training loop."""

    max_steps: int = bounded(1000, ge=1)
    batch_size: int = bounded(32, ge=1)
    grad_accum: int = bounded(1, ge=1)
    seq_len: int = bounded(128, ge=1)
    # bf16 matmuls are ~100x slower on AVX2-only CPUs
    precision: str = bounded("fp32", choices=("fp32", "bf16"))
    eval_every: int = bounded(100, ge=1)
    eval_batches: int = bounded(20, ge=1)
    fact_queries: int = bounded(512, ge=0)  # held-out fact queries scored at each evaluation (facts corpus only)
    log_every: int = bounded(10, ge=1)
    ckpt_every: int = bounded(250, ge=1)
    # a loss above this, or NaN/inf, ends the run as diverged (inf: only NaN/inf do)
    divergence_loss: float = bounded(50.0, gt=0, inf_ok=True)
    # also evaluate at these eval capacity factors (one trained model, several eval CFs: ST-MoE Table 8)
    eval_capacity_factors: list[float] = bounded(factory=list, gt=0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int = bounded(0, ge=0)  # torch CPU threads; 0 = torch's default
    # routing fluctuation (StableMoE): route a fixed probe of validation tokens every this many steps and
    # keep their experts (moe_lab.train.fluctuation); 0 = off. Language-model runs only.
    fluctuation_every: int = bounded(50, ge=0)
    fluctuation_tokens: int = bounded(4096, ge=1)

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        check_fields(self, "train")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"train.device={self.device!r} is not one of ['auto', 'cpu', 'cuda', 'cuda:N', 'mps']")


@dataclass
class LoggerConfig:
    """W&B (offline unless said otherwise) and CSV; CSV and summary.json are the record of truth."""

    wandb: bool = True
    # offline | online | disabled; null = $WANDB_MODE, else offline
    wandb_mode: str | None = bounded(None, choices=("offline", "online", "disabled"), none="$WANDB_MODE, else offline")
    project: str = "moe-lab"
    progress: bool = True
    # W&B's own console output (its end-of-run summary) and the datasets library's progress bars; off keeps
    # the console to the run's own lines (errors and the final result lines always show)
    verbose: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        check_fields(self, "logger")


@dataclass
class TaskConfig:
    """A text classification task: where its examples are and how to read them."""

    name: str = "synth-small"
    # cb, sst2: the real tasks from local files (../shared/data or your own copies); polarity: the valence of the
    # embedded language's adjectives, which its pretraining corpus teaches; synthetic: word lists to memorise;
    # facts: true/false statements about the pretraining corpus's people (closed-book);
    # local: any jsonl/csv/tsv with text and label columns; hub: `datasets` name
    source: str = bounded("synthetic", choices=("polarity", "synthetic", "facts", "cb", "sst2", "local", "hub"))
    train_path: str | None = None
    val_path: str | None = None
    format: str = bounded("json", choices=("json", "csv"))  # tsv: format=csv delimiter="\t"
    delimiter: str | None = None
    text_columns: list[str] = field(default_factory=lambda: ["text"])  # joined with " | " (CB: premise | hypothesis)
    label_column: str = "label"
    label_names: list[str] | None = None  # string labels in this order; None: integer labels 0..C-1
    # reported both; this one is the headline
    metric: str = bounded("accuracy", choices=("accuracy", "f1_macro"))
    # what the classification head reads: the mean over the tokens, or the last one (a cloze task: what comes next)
    pooling: str = bounded("mean", choices=("mean", "last"))
    max_len: int = bounded(128, ge=1)
    # keep the first N training examples (after a seeded shuffle)
    num_train: int | None = bounded(None, ge=1, none="all")
    # synthetic, polarity and facts tasks: training and validation examples
    synthetic_train: int = bounded(250, ge=1)
    synthetic_val: int = bounded(1000, ge=1)
    # polarity tasks: train only on the adjectives the validation set does not ask about (moe_lab.data.tasks)
    held_out_only: bool = True
    hub_name: str | None = None
    hub_subset: str | None = None

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        check_fields(self, "task")
        check_name(self.name, "task.name")  # a fine-tuning run's folder is named after its task


@dataclass
class FinetuneConfig:
    """What fine-tuning changes beyond the task: which parameters update (ST-MoE Fig. 5)."""

    # fine-tune the run that `moe-lab sweep` pretrained with this preset (results/pretrained/PRESET), when
    # no checkpoint= is given: lets a study sweep over pretrained models (finetune.pretrained=mini,dense-mini)
    pretrained: str | None = None
    # moe_lab/train/freeze.py
    freeze: str = bounded("all", choices=("all", "non_moe", "moe", "attention", "ffn"))
    freeze_router: bool = False
    # pretrained: start from the checkpoint's weights; random: its architecture from a fresh initialisation (the
    # baseline that shows what pretraining brings to a task)
    init: str = bounded("pretrained", choices=("pretrained", "random"))
    # training accuracy is measured on this many training examples at every evaluation (overfitting curves)
    train_eval_examples: int = bounded(512, ge=1)

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        check_fields(self, "finetune")


# fine-tuning may change these MoE fields of a pretrained model; the rest is its architecture
FINETUNE_MOE_KEYS = (
    "train_capacity_factor",
    "eval_capacity_factor",
    "drop_policy",
    "aux_loss_coef",
    "z_loss_coef",
    "expert_dropout",
    "jitter_eps",
    "backend",
    "group_size",
)


@dataclass
class StudyConfig:
    """What an experiments/NAME.yaml says about itself; read by `moe-lab sweep` and `moe-lab report`."""

    name: str | None = None
    paper: str = ""  # the paper's table or figure the study mirrors (the report's source)
    command: str = "pretrain"  # pretrain | finetune
    pretrained: str | None = None  # fine-tuning studies: the pretraining preset of their checkpoint
    # fine-tuning studies: shared (every seed fine-tunes one pretraining) or per_seed (seed S fine-tunes the
    # pretraining of seed S, results/pretrain/PRESET/seed<S>, so the seeds measure pretraining noise too)
    pretraining: str = bounded("shared", choices=("shared", "per_seed"))
    description: str = ""  # the paper's finding, as the report states it
    order: int | None = bounded(None, ge=0, none="after the ordered ones, by name")  # its place in the report
    # the paper's numbers the report prints beside ours: row label -> column label -> a number or a short text,
    # numeric row labels written as f"{value:g}" (1.0 -> "1")
    paper_numbers: dict[str, dict[str, Any]] = field(default_factory=dict)
    note: str = ""  # what else the paper says that the report should show
    # what counts as "about equal" for each part of the study's claim, fixed before its runs are judged
    # (moe-lab report reads them from experiments/NAME.yaml)
    margins: dict[str, float] = field(default_factory=dict)
    # ranges [low, high] that decide which settings a claim is judged on (token-drop: the share dropped)
    windows: dict[str, list[float]] = field(default_factory=dict)
    # other thresholds of the judgement (router-fluctuation: eval drops that confound a comparison of losses)
    tolerances: dict[str, float] = field(default_factory=dict)
    # points beyond the grid (moe_lab.sweeps.study.grid): each entry gives some swept keys other values, the rest
    # keep the grid's; z-loss-stability runs the two settings its claim compares at more seeds
    extend: list[dict[str, Any]] = field(default_factory=list)

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        check_fields(self, "study")
        for group, values in (("margins", self.margins), ("tolerances", self.tolerances)):
            for key, value in values.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise ValueError(f"study.{group}.{key}={value!r} is not a positive number")
        for key, window in self.windows.items():
            if len(window) != 2 or not window[0] <= window[1]:
                raise ValueError(f"study.windows.{key}={list(window)!r} is not a range [low, high] with low <= high")


@dataclass
class ParallelConfig:
    """How a torchrun run spreads over its ranks (moe_lab.parallel); every layout gives the same numbers."""

    # ranks that share one set of experts, each holding num_experts / expert of them (moe_lab.moe.expert_parallel);
    # 1 = every rank holds every expert (data parallel). Today: 1 or the number of ranks.
    expert: int = bounded(1, ge=1)

    def validate(self) -> None:
        check_fields(self, "parallel")


@dataclass
class RunConfig:
    """One run: what `moe-lab pretrain NAME [overrides]` composes."""

    name: str = "small"
    seed: int = bounded(0, ge=0)
    runs_root: str | None = None  # null: $MOE_LAB_RESULTS/runs, else results/runs (moe_lab.paths.runs_root)
    run_dir: str | None = None  # null: runs_root/NAME/TIMESTAMP (resume: the latest one)
    resume: bool = False
    # multiplies the training length (max_steps, eval_every, ckpt_every): `scale=4` runs a study 4x longer
    scale: float = bounded(1.0, gt=0)
    checkpoint: str | None = None  # fine-tuning: a pretraining run directory
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        """Validate every group."""
        check_fields(self, "")
        check_name(self.name)
        self.moe.validate("moe")
        groups = (
            self.model, self.data, self.tokenizer, self.optim, self.train, self.logger, self.task, self.parallel,
            self.study,
        )  # fmt: skip
        for group in groups:
            group.validate()
        self.finetune.validate()

    def scaled(self) -> RunConfig:
        """This config with the training length multiplied by `scale` (and scale reset to 1)."""
        if self.scale == 1.0:
            return self
        t = self.train
        train = dataclasses.replace(
            t,
            max_steps=max(1, round(t.max_steps * self.scale)),
            eval_every=max(1, round(t.eval_every * self.scale)),
            ckpt_every=max(1, round(t.ckpt_every * self.scale)),
        )
        return dataclasses.replace(self, train=train, scale=1.0)
