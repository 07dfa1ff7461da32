"""The run configuration: what `moe-lab pretrain NAME [overrides]` composes.

- `schema`: one dataclass per group (model, data, tokenizer, optim, train, logger, task, finetune, study, parallel)
  and `RunConfig` holding them, each validated on construction; MoEConfig lives beside the MoE core
  (moe_lab.moe.config).
- `compose`: Hydra, and only there: conf/ composed with overrides into a validated RunConfig, a sweep's grid, the
  keys a fine-tuning run may change, and each Hydra or OmegaConf error as one line naming the key.

Neither imports torch: a command that only reads a configuration (`--show-config`, `--dry-run`) never loads it.
"""

from moe_lab.config.compose import (
    FINETUNE_MODEL_KEYS,
    ConfigError,
    compose,
    compose_config,
    compose_finetune,
    compose_runs,
    finetune_changes,
    override_dirname,
    parse_overrides,
    presets,
    register_configs,
    sweep_points,
    tasks,
    to_run_config,
)
from moe_lab.config.schema import (
    CONF_DIR,
    CONF_MODULE,
    FINETUNE_MOE_KEYS,
    PRESETS_DIR,
    DataConfig,
    FinetuneConfig,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    StudyConfig,
    TaskConfig,
    TokenizerConfig,
    TrainConfig,
)

__all__ = [
    "CONF_DIR",
    "CONF_MODULE",
    "FINETUNE_MODEL_KEYS",
    "FINETUNE_MOE_KEYS",
    "PRESETS_DIR",
    "ConfigError",
    "DataConfig",
    "FinetuneConfig",
    "LoggerConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "StudyConfig",
    "TaskConfig",
    "TokenizerConfig",
    "TrainConfig",
    "compose",
    "compose_config",
    "compose_finetune",
    "compose_runs",
    "finetune_changes",
    "override_dirname",
    "parse_overrides",
    "presets",
    "register_configs",
    "sweep_points",
    "tasks",
    "to_run_config",
]
