"""Every config file composes; presets and group options validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moe_lab.config import CONF_DIR, ConfigError, compose, presets, to_run_config

# what an option needs before it validates (a path, a name)
REQUIRED = {
    ("data", "local"): ["data.path=x.txt"],
    ("data", "hub"): ["data.name=wikitext"],
    ("tokenizer", "hf"): ["tokenizer.name=gpt2"],
}
# presets and `# @package _global_` groups (stability) are checked through the presets and the studies
GROUP_OPTIONS = sorted(
    (path.parent.name, path.stem)
    for path in CONF_DIR.glob("*/*.yaml")
    if path.parent.name not in ("preset", "hydra") and "@package _global_" not in path.read_text()
)


@pytest.mark.parametrize("preset", presets())
def test_every_preset_composes(preset: str) -> None:
    run = to_run_config(compose(preset))
    assert run.name == preset
    assert run.moe.d_model == run.model.d_model


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_group_option_composes(group: str, option: str) -> None:
    required = REQUIRED.get((group, option), [])
    run = to_run_config(compose("tiny", [f"{group}={option}", *required]))
    values = yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text()) or {}
    # the option's own values arrive, except where the tiny preset or a required override sets them
    preset = yaml.safe_load((CONF_DIR / "preset" / "tiny.yaml").read_text()).get(group, {})
    overridden = set(preset) | {r.split("=")[0].split(".", 1)[1] for r in required}
    node = getattr(run, group)
    for key, value in values.items():
        if key in overridden or (isinstance(value, str) and "${" in value):
            continue
        actual = getattr(node, key)
        assert (list(actual) if isinstance(actual, tuple | list) else actual) == value, (group, option, key)


def test_group_options_exist() -> None:
    assert {"st-moe", "switch", "expert-choice", "dropless"} <= {o for g, o in GROUP_OPTIONS if g == "moe"}
    assert {"synthetic", "local", "hub", "tinyshakespeare", "wikitext2"} <= {o for g, o in GROUP_OPTIONS if g == "data"}


def test_dense_small_is_small_without_experts() -> None:
    small, dense = to_run_config(compose("small")), to_run_config(compose("dense-small"))
    assert dense.model.sparse is False and small.model.sparse is True
    assert (dense.model.d_model, dense.train.max_steps) == (small.model.d_model, small.train.max_steps)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.num_layer=3"], "valid keys here: ['activation'"),
        (["optim=sgd"], "Could not find 'optim/sgd'"),
        (["train.max_steps=abc"], "could not be converted to Integer"),
        (["moe.top_k=9"], "top_k=9 exceeds num_experts=4"),
        (["data=local"], "data=local needs data.path=FILE"),
        (["model.d_model=30", "model.num_heads=4"], "not divisible"),
    ],
)
def test_bad_overrides_fail_before_training(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose("tiny", overrides)
    assert message in str(err.value)


def test_conf_files_have_no_hydra_interpolations() -> None:
    # the Compose API cannot resolve ${hydra:...}
    for path in Path(CONF_DIR).rglob("*.yaml"):
        assert "${hydra:" not in path.read_text(), path
