"""Hydra: the schemas registered in its ConfigStore, conf/ composed with overrides, a sweep's grid expanded, and
every error it raises turned into one line that names the key and what would be accepted. The only module that
knows Hydra."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moe_lab.config.schema import (
    CONF_DIR,
    CONF_MODULE,
    FINETUNE_MOE_KEYS,
    PRESETS_DIR,
    RunConfig,
)
from moe_lab.paths import EXPERIMENTS


@functools.cache
def register_configs() -> None:
    """Register the schemas so conf/*.yaml files are type-checked against them; once per process (ConfigStore is
    process-wide, and building the structured node costs a third of a compose)."""
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
    return compose_config("finetune", [f"task={task}", *(overrides or [])])


def compose(preset: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/config.yaml + preset + overrides with Hydra and validate the result."""
    if preset not in presets():
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {presets()}")
    return compose_config("config", [f"preset={preset}", *(overrides or [])])


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose conf/CONFIG_NAME.yaml with overrides (Hydra's Compose API) and validate it; errors are ConfigError."""
    return _compose(config_name, overrides)[0]


def _compose(config_name: str, overrides: list[str]) -> tuple[DictConfig, RunConfig]:
    """`compose_config`'s config and the RunConfig its validation built."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_explain(err)) from None
    finally:
        GlobalHydra.instance().clear()
    return cfg, to_run_config(cfg)


def compose_runs(config_name: str, common: list[str], points: list[list[str]]) -> Iterator[RunConfig]:
    """The RunConfig of `compose_config(config_name, [*common, *point])` for each point in turn, with Hydra composing
    only once for points that differ in plain values alone (`key=value` on a key that is no config group; no `+`,
    `++`, `~` or package): they reuse that composition with their values set, as Hydra sets values after merging
    the defaults list. A grid's points mostly differ so (seed, lr), and a Hydra compose costs ~0.1 s, which a dry
    run of a 50-point study paid 50 times. A point the shortcut cannot take is composed in full, so its error is
    Hydra's."""
    composed: dict[tuple, DictConfig] = {}
    for point in points:
        values = dict(_plain_values(point))
        shape = (tuple(o for o in point if o.partition("=")[0] not in values), tuple(values))
        cfg = composed.get(shape)
        if cfg is not None:
            try:  # every point of a shape sets all of its values, so the composition is updated in place
                for key, value in values.items():
                    OmegaConf.update(cfg, key, value, merge=False)
                yield to_run_config(cfg)
                continue
            except (ValueError, OmegaConfBaseException):
                pass  # composed in full below: Hydra raises its own error
        composed[shape], run = _compose(config_name, [*common, *point])
        yield run


def _plain_values(overrides: list[str]) -> Iterator[tuple[str, Any]]:
    """(key, value) of each override that only sets a value; unparsable ones are left to Hydra's compose."""
    from hydra.core.override_parser.types import OverrideType, ValueType

    try:
        parsed = parse_overrides(overrides)
    except ConfigError:
        return
    for override in parsed:
        key = override.key_or_group
        if override.type != OverrideType.CHANGE or override.value_type != ValueType.ELEMENT or override.package:
            continue
        if key.split(".")[0] == "hydra" or (CONF_DIR / key.replace(".", "/")).is_dir():  # a config group
            continue
        yield key, override.value()


# the groups validated one by one when the whole config fails, so an error names the key a user sets
# (model.d_model) rather than the MoE field interpolated from it (moe.d_model)
_GROUPS = ("model", "data", "tokenizer", "optim", "train", "logger", "task", "finetune", "parallel")


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The typed, validated RunConfig of a composed config; every error is one ConfigError line."""
    _reject_unknown_keys(cfg, RunConfig, "")
    try:
        run = _to_object(cfg)
        if not isinstance(run, RunConfig):
            raise ConfigError(f"composed config is a {type(run).__name__}, expected RunConfig")
        run.validate()
    except ValueError as err:
        _check_groups(cfg)  # a group that fails alone names its own key
        raise ConfigError(str(err)) from None
    return run


def _check_groups(cfg: DictConfig) -> None:
    """Raise ConfigError for the first group of `cfg` that fails validation on its own (looked for only once the
    whole config failed: a valid config pays for one conversion, not ten)."""
    for group in _GROUPS:
        if group in cfg:
            node = _to_object(cfg[group])
            try:
                node.validate()
            except ValueError as err:
                raise ConfigError(str(err)) from None


def _to_object(node: DictConfig) -> Any:
    try:
        return OmegaConf.to_object(node)
    except Exception as err:  # OmegaConf wraps dataclass __post_init__ errors (MoEConfig validates itself)
        first = str(err).strip().split("\n")[0].replace("MoEConfig.", "moe.")
        key = getattr(err, "full_key", None)
        raise ConfigError(f"{key}: {first}" if key and key not in first else first) from None


def _reject_unknown_keys(cfg: DictConfig, schema: type, path: str) -> None:
    """`+key=value` adds keys the schema does not have; name them with the valid ones instead of ignoring them."""
    names = {f.name: f for f in dataclasses.fields(schema)}
    for key in cfg:
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            where = f"of {path}" if path else "at the top level"
            raise ConfigError(f"unknown key {full!r}; valid keys {where}: {sorted(names)}")
        factory = names[key].default_factory  # type: ignore[misc]
        if dataclasses.is_dataclass(factory) and isinstance(cfg[key], DictConfig):
            _reject_unknown_keys(cfg[key], factory, full)  # type: ignore[arg-type]


def parse_overrides(overrides: list[str]) -> list:
    """Hydra's parse of command-line overrides; one it cannot parse is a ConfigError saying how to quote it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        raise ConfigError(_explain(err)) from None


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """Every combination of the overrides' values, each a list of `key=value`: a sweep (`key=a,b`, `range(...)`)
    gives each of its values, any other override its one value. The rules of Hydra's BasicSweeper
    (hydra/_internal/core_plugins/basic_sweeper.py, `split_arguments`): a key given twice keeps its place and
    takes the last value; an interval sweep cannot be enumerated."""
    from hydra.errors import HydraException

    values: dict[str, list[str]] = {}
    for override in parse_overrides(overrides):
        key = override.get_key_element()
        if not override.is_sweep_override():
            values[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            values[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            kind = override.value_type.name if override.value_type else "unknown"
            raise HydraException(f"BasicSweeper does not support sweep type : {kind}")
    return [list(point) for point in itertools.product(*values.values())]


def override_dirname(overrides: list[str], exclude_keys: list[str]) -> str:
    """The folder Hydra names a job by (`hydra.job.override_dirname` with item_sep ',' and kv_sep '='): the
    overrides whose key (or group) is not excluded, as given, sorted and joined with ','. The rule of Hydra's
    `get_overrides_dirname` (hydra/_internal/config_loader_impl.py)."""
    kept = [o.input_line for o in parse_overrides(overrides) if o.key_or_group not in exclude_keys]
    return ",".join(sorted(kept))


def _overridden(overrides: list[str], prefix: str) -> set[str]:
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    return {k[len(prefix) :] for k in keys if k.startswith(prefix)}


def _study_keys(overrides: list[str], group: str) -> set[str]:
    """The keys of `group` (moe, model) that the study a sweep point runs under (`+experiments=NAME`) sets."""
    keys: set[str] = set()
    for item in overrides:
        key, _, name = item.partition("=")
        if key.lstrip("+") == "experiments" and name:
            section = OmegaConf.load(EXPERIMENTS / f"{name}.yaml").get(group)
            keys |= set(section.keys()) if section else set()
    return keys


FINETUNE_MODEL_KEYS = ("dropout",)


def finetune_changes(overrides: list[str]) -> tuple[set[str], set[str]]:
    """(MoE keys, model keys) a fine-tuning run changes from its pretrained model: those set on the command line
    or by the study. A key the checkpoint fixes (the architecture) raises ValueError naming the ones that may."""
    changes = {}
    for group, allowed in (("moe", FINETUNE_MOE_KEYS), ("model", FINETUNE_MODEL_KEYS)):
        keys = _overridden(overrides, f"{group}.") | _study_keys(overrides, group)
        fixed = sorted(keys - set(allowed))
        if fixed:
            raise ValueError(
                f"{', '.join(f'{group}.{k}' for k in fixed)}: fixed by the pretrained checkpoint (its architecture); "
                f"fine-tuning may change {', '.join(f'{group}.{k}' for k in allowed)}"
            )
        changes[group] = keys
    return changes["moe"], changes["model"]


LEXER_ERROR = "LexerNoViableAltException: "


def _unparsable(override: str, text: str) -> str:
    """Hydra's lexer error as what to do. Unquoted, a value is read in Hydra's override grammar, which has no
    non-ASCII letters and no `;` or `"`; quoted, it is a plain string."""
    lines = text.splitlines()
    caret = next((ln for ln in lines[1:] if ln.strip() == "^"), "")
    at = len(caret) - len(caret.lstrip()) - len(LEXER_ERROR)  # the caret stands under the character
    char = f" at {override[at]!r}" if 0 <= at < len(override) else ""
    key, equals, value = override.partition("=")
    if not equals or 0 <= at < len(key):
        return f"cannot parse the override {override!r}{char}: a key is a dotted name such as model.d_model"
    if "'" in value:
        quoted, shell = f'{key}="{value}"', ""
    else:
        quoted, shell = f"{key}='{value}'", f": \"{key}='{value}'\""
    shell = f" (in a shell, quote it once more{shell})"
    return f"cannot parse the override {override!r}{char}: put it in quotes, {quoted}{shell}"


def _explain(err: Exception) -> str:
    """Hydra's message on one line: the options of a group, or the valid keys where a key was not found."""
    text = str(err).strip()
    if LEXER_ERROR in text and getattr(err, "override", None):
        return _unparsable(err.override, text[text.index(LEXER_ERROR) :])
    if err.__cause__ is not None:
        text += f"\n{str(err.__cause__).strip().splitlines()[0]}"
    parts: list[str] = []
    options: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("Config search path"):
            break
        if options is not None and line.startswith("\t"):
            options.append(line.strip())
        elif line.startswith("Available options in"):
            parts.append(line.strip().rstrip(":").replace("Available", "available"))
            options = []
        # Hydra suggests "+key=value" to append; the schema forbids new keys, so that hint only misleads
        elif line.strip() and not line.startswith(("To append to your config", "See https://")):
            parts.append(line.strip().rstrip("."))
    message = "; ".join(parts) + (f": {', '.join(options)}" if options else "")
    full_key = getattr(err, "full_key", None) or _key_from_message(text)
    if full_key and " not in '" in text:
        parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
        valid = _valid_keys(parent)
        if valid:
            return f"unknown key {full_key!r}; valid keys {f'of {parent}' if parent else 'at the top level'}: {valid}"
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
