"""Run configuration: dataclass schemas registered in Hydra's ConfigStore; the only module that knows Hydra."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moe_lab.moe.config import ACTIVATIONS, MoEConfig, check_choice

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PRESETS_DIR = CONF_DIR / "preset"


@dataclass
class ModelConfig:
    """A Transformer with MoE layers every `moe_every` blocks (ST-MoE Sec. 3: every 4th)."""

    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    d_ff: int = 512
    activation: str = "geglu"  # FFN of dense blocks; experts use moe.activation
    max_seq_len: int = 128
    causal: bool = True  # decoder (LM pretraining) or bidirectional encoder (classification)
    # 0: no MoE layer; N: blocks N-1, 2N-1, ... are MoE (ST-MoE: 4); 1: every block
    moe_every: int = 2
    # False builds the FLOP-matched dense twin: each MoE position gets a dense FFN of width top_k * d_ff
    sparse: bool = True
    # ST-MoE Table 16: an extra dense FFN stacked after each sparse one
    dense_stacking: bool = False
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    dropout: float = 0.0
    tie_embeddings: bool = True
    # z-loss on the output logits, coefficient (0 = off); ST-MoE uses 1e-4 on the final logits
    output_z_loss_coef: float = 0.0

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        check_choice("model.norm", self.norm, ("rmsnorm", "layernorm"))
        check_choice("model.activation", self.activation, ACTIVATIONS)
        if self.d_model % self.num_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}")
        if self.moe_every < 0:
            raise ValueError(f"model.moe_every must be >= 0 (0 = dense), got {self.moe_every}")


@dataclass
class DataConfig:
    """Where the text comes from: the embedded synthetic corpus, local files or a hub name."""

    source: str = "synthetic"  # synthetic | local | hub
    # local: a file, a glob or a list of them; format is a `datasets` builder: text, json, csv, parquet
    path: Any = None
    format: str = "text"
    val_path: Any = None  # a separate validation file; otherwise the last val_fraction of the tokens
    text_column: str = "text"
    delimiter: str | None = None  # csv/tsv: "\t" for tsv
    # hub: `datasets.load_dataset(name, subset, split=split)`; needs network
    name: str | None = None
    subset: str | None = None
    split: str = "train"
    val_fraction: float = 0.1
    # synthetic corpus
    num_docs: int = 20000
    num_domains: int = 4
    corpus_seed: int = 0
    cache_dir: str = "~/.cache/moe-lab"
    max_tokens: int | None = None  # cap on the tokens used (train + val), for quick runs

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        check_choice("data.source", self.source, ("synthetic", "local", "hub"))
        if self.source == "local" and not self.path:
            raise ValueError("data=local needs data.path=FILE (and data.format=text|json|csv|parquet)")
        if self.source == "hub" and not self.name:
            raise ValueError("data=hub needs data.name=DATASET (e.g. data.name=wikitext data.subset=wikitext-2-raw-v1)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class TokenizerConfig:
    """byte (default, no download), hf (a transformers tokenizer by name or local path), bpe (trained here)."""

    kind: str = "byte"
    name: str | None = None
    vocab_size: int = 4096  # bpe only

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        check_choice("tokenizer.kind", self.kind, ("byte", "hf", "bpe"))
        if self.kind == "hf" and not self.name:
            raise ValueError("tokenizer=hf needs tokenizer.name=NAME_OR_PATH")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: str = "adamw"  # adamw | adafactor
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | linear | constant | rsqrt
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0  # max global gradient norm; null = off
    # clip each parameter's update to this RMS (Adafactor's "d", ST-MoE Table 4); null = off
    update_clip: float | None = None

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        check_choice("optim.name", self.name, ("adamw", "adafactor"))
        check_choice("optim.schedule", self.schedule, ("cosine", "linear", "constant", "rsqrt"))
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")


@dataclass
class TrainConfig:
    """The training loop."""

    max_steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    seq_len: int = 128
    precision: str = "fp32"  # fp32 | bf16 (bf16 matmuls are ~100x slower on AVX2-only CPUs)
    eval_every: int = 100
    eval_batches: int = 20
    log_every: int = 10
    ckpt_every: int = 250
    # a loss above this, or NaN/inf, ends the run as diverged
    divergence_loss: float = 50.0
    # also evaluate at these eval capacity factors (one trained model, several eval CFs: ST-MoE Table 8)
    eval_capacity_factors: list[float] = field(default_factory=list)
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads; 0 = torch's default
    # routing fluctuation (StableMoE): route a fixed probe of validation tokens every this many steps and
    # keep their experts (moe_lab.train.fluctuation); 0 = off. Language-model runs only.
    fluctuation_every: int = 50
    fluctuation_tokens: int = 4096

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        check_choice("train.precision", self.precision, ("fp32", "bf16"))
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "eval_every", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.fluctuation_every < 0 or self.fluctuation_tokens < 1:
            raise ValueError(
                f"train.fluctuation_every must be >= 0 (0 = off) and train.fluctuation_tokens >= 1, got "
                f"{self.fluctuation_every} and {self.fluctuation_tokens}"
            )


@dataclass
class LoggerConfig:
    """W&B (offline unless said otherwise) and CSV; CSV and summary.json are the record of truth."""

    wandb: bool = True
    # offline | online | disabled; null = $WANDB_MODE, else offline
    wandb_mode: str | None = None
    project: str = "moe-lab"
    progress: bool = True


@dataclass
class TaskConfig:
    """A text classification task: where its examples are and how to read them."""

    name: str = "synth-small"
    # cb, sst2: the real tasks from local files (../shared/data or your own copies); synthetic: derived
    # from the embedded corpus; local: any jsonl/csv/tsv with text and label columns; hub: `datasets` name
    source: str = "synthetic"
    train_path: str | None = None
    val_path: str | None = None
    format: str = "json"  # json | csv (tsv: format=csv delimiter="\t")
    delimiter: str | None = None
    text_columns: list[str] = field(default_factory=lambda: ["text"])  # joined with " | " (CB: premise | hypothesis)
    label_column: str = "label"
    label_names: list[str] | None = None  # string labels in this order; None: integer labels 0..C-1
    metric: str = "accuracy"  # accuracy | f1_macro (reported both; this one is the headline)
    max_len: int = 128
    num_train: int | None = None  # keep the first N training examples (after a seeded shuffle)
    # synthetic tasks
    synthetic_train: int = 250
    synthetic_val: int = 1000
    hub_name: str | None = None
    hub_subset: str | None = None


@dataclass
class FinetuneConfig:
    """What fine-tuning changes beyond the task: which parameters update (ST-MoE Fig. 5)."""

    # fine-tune the run that `moe-lab sweep` pretrained with this preset (results/pretrained/PRESET), when
    # no checkpoint= is given: lets a study sweep over pretrained models (finetune.pretrained=mini,dense-mini)
    pretrained: str | None = None
    freeze: str = "all"  # all | non_moe | moe | attention | ffn (moe_lab/train/freeze.py)
    freeze_router: bool = False
    # training accuracy is measured on this many training examples at every evaluation (overfitting curves)
    train_eval_examples: int = 512

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        check_choice("finetune.freeze", self.freeze, ("all", "non_moe", "moe", "attention", "ffn"))


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
    paper: str = ""  # the paper's table or figure the study mirrors
    command: str = "pretrain"  # pretrain | finetune
    pretrained: str | None = None  # fine-tuning studies: the pretraining preset of their checkpoint
    description: str = ""


@dataclass
class RunConfig:
    """One run: what `moe-lab pretrain NAME [overrides]` composes."""

    name: str = "small"
    seed: int = 0
    runs_root: str = "results/runs"
    run_dir: str | None = None  # null: runs_root/NAME/TIMESTAMP (resume: the latest one)
    resume: bool = False
    # multiplies the training length (max_steps, eval_every, ckpt_every): `scale=4` runs a study 4x longer
    scale: float = 1.0
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

    def validate(self) -> None:
        """Validate every group."""
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        for group in (self.model, self.moe, self.data, self.tokenizer, self.optim, self.train, self.finetune):
            group.validate()

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


def register_configs() -> None:
    """Register the schemas so conf/*.yaml files are type-checked against them."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="run_schema", node=RunConfig)


class ConfigError(ValueError):
    """A configuration that cannot be composed or is invalid; the message says what would be accepted."""


def presets() -> list[str]:
    """Names of the presets in conf/preset/."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def tasks() -> list[str]:
    """Names of the tasks in conf/task/."""
    return sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))


def compose_finetune(task: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/finetune.yaml (config.yaml + fine-tuning defaults) with task=TASK and overrides."""
    if task not in tasks():
        raise ConfigError(f"unknown task {task!r}; valid tasks: {tasks()}")
    return _compose("finetune", [f"task={task}", *(overrides or [])])


def compose(preset: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/config.yaml + preset + overrides with Hydra and validate the result."""
    if preset not in presets():
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {presets()}")
    return _compose("config", [f"preset={preset}", *(overrides or [])])


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_explain(err)) from None
    finally:
        GlobalHydra.instance().clear()
    to_run_config(cfg)  # validates
    return cfg


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The typed, validated RunConfig of a composed config."""
    try:
        run = OmegaConf.to_object(cfg)
    except Exception as err:  # OmegaConf wraps dataclass __post_init__ errors
        raise ConfigError(str(err).split("\n")[0]) from None
    if not isinstance(run, RunConfig):
        raise ConfigError(f"composed config is a {type(run).__name__}, expected RunConfig")
    try:
        run.validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return run


def _explain(err: Exception) -> str:
    """Hydra's message, plus the valid keys where a key was not found."""
    # Hydra suggests "+key=value" to append; the schema forbids new keys, so that hint only misleads
    lines = [ln for ln in str(err).strip().splitlines() if not ln.startswith("To append to your config")]
    message = "\n".join(lines)
    if err.__cause__ is not None:
        message += f"\n{str(err.__cause__).splitlines()[0]}"
    full_key = getattr(err, "full_key", None) or _key_from_message(message)
    if full_key:
        valid = _valid_keys(full_key.rsplit(".", 1)[0] if "." in full_key else "")
        if valid:
            message += f"\nvalid keys here: {valid}"
    return message


def _key_from_message(message: str) -> str | None:
    # "Could not override 'model.foo'." / "Key 'foo' not in 'ModelConfig'" + "full_key: model.foo"
    for marker in ("full_key: ", "Could not override '", "Could not append to config. An item is already at '"):
        if marker in message:
            rest = message.split(marker, 1)[1]
            return rest.split("'")[0].split("\n")[0].strip().rstrip(".")
    return None


def _valid_keys(path: str) -> list[str]:
    node: Any = RunConfig
    for part in [p for p in path.split(".") if p]:
        fields_by_name = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields_by_name:
            return []
        default = fields_by_name[part].default_factory  # type: ignore[misc]
        node = default if default is not dataclasses.MISSING else None
        if node is None:
            return []
    return sorted(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else []
