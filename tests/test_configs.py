"""Every config file composes; presets and group options validate."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from moe_lab.config import CONF_DIR, ConfigError, RunConfig, compose, presets, to_run_config
from moe_lab.moe.config import Bounds, field_bounds

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
    # the same corpus, with its knowledge component, for both
    assert dense.data == small.data and small.data.num_people > 0 and small.data.fact_fraction > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.num_layer=3"], "unknown key 'model.num_layer'; valid keys of model: ['activation'"),
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


# --- bad values for every bounded field: one line, exit 2, nothing written ----------------------------------------

GROUPS = {
    "": RunConfig,
    **{f.name: f.default_factory for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(f.default_factory)},
}
BOUNDED = sorted(
    (f"{group}.{name}" if group else name, bounds)
    for group, schema in GROUPS.items()
    for name, bounds in field_bounds(schema).items()
)
# fields a fine-tuning run or the model fills in, not a user's pretraining input
NOT_USER_SET = {"moe.vocab_size", "moe.d_model", "moe.d_ff"}


def test_every_numeric_field_of_the_schema_declares_what_it_accepts() -> None:
    bounded = {key for key, _ in BOUNDED}
    for group, schema in GROUPS.items():
        for f in dataclasses.fields(schema):
            key = f"{group}.{f.name}" if group else f.name
            if f.type in ("int", "float", "int | None", "float | None", "list[float]", "tuple[float, float]"):
                assert key in bounded, f"{key} ({f.type}) has no bounds: bad values would reach training"


def bad_value(bounds: Bounds, draw) -> str:
    """An override value outside `bounds`, as a user would type it."""
    if bounds.choices is not None:
        word = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
        assume(word not in bounds.choices and word not in ("null", "true", "false", "nan", "inf"))
        return word
    options = ["nan", "-inf"] + ([] if bounds.inf_ok else ["inf"])
    low = bounds.ge if bounds.ge is not None else bounds.gt
    if low is not None:
        below = draw(st.integers(min_value=1, max_value=10**6))
        options += [str(low - below)] + ([f"{low:g}"] if bounds.gt is not None else [])
    high = bounds.le if bounds.le is not None else bounds.lt
    if high is not None:
        above = draw(st.floats(min_value=1e-3, max_value=1e6))
        options += [repr(high + above)] + ([f"{high:g}"] if bounds.lt is not None else [])
    return draw(st.sampled_from(options))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_bad_value_for_any_field_is_one_line_and_exit_2(data, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from moe_lab.cli import app

    key, bounds = data.draw(st.sampled_from([(k, b) for k, b in BOUNDED if k not in NOT_USER_SET]), label="field")
    value = bad_value(bounds, data.draw)
    if key in ("optim.betas",):
        value = f"[{value},0.9]"
    elif key == "train.eval_capacity_factors":
        value = f"[{value}]"
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["pretrain", "tiny", f"{key}={value}", f"runs_root={runs}"])
    output = result.output  # stdout and stderr together
    assert result.exit_code == 2, (key, value, output)
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: config: ") and key.split(".")[-1] in lines[0], lines
    assert "Traceback" not in output and not runs.exists()


# the parts of a run's name a user (or a script) might type: '..', '/', an absolute path, unicode and control
# characters, very long components
NAME_PARTS = st.one_of(
    st.sampled_from(["..", ".", "", "~", "-x", "a b", "a\nb", "nul\x00", "back\\slash", "$HOME"]),
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12),
    st.text(alphabet="abcé字🙂", min_size=90, max_size=300),
)
# one folder's name as often as a path of several
NAMES = st.one_of(NAME_PARTS.map(lambda part: [part]), st.lists(NAME_PARTS, min_size=2, max_size=4))
DEPTH = 6  # the results directory sits this deep in the example's folder: deeper than a drawn name climbs (4)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=NAMES, absolute=st.booleans(), quoted=st.booleans())
def test_any_run_name_is_refused_in_one_line_or_runs_inside_the_results_directory(
    parts: list[str], absolute: bool, quoted: bool, tmp_path_factory: pytest.TempPathFactory, monkeypatch
) -> None:
    from typer.testing import CliRunner

    from moe_lab.cli import app

    root = tmp_path_factory.mktemp("names")
    monkeypatch.chdir(root)  # a run that ignored $MOE_LAB_RESULTS would land in ./results, outside it
    results = root.joinpath(*[f"d{i}" for i in range(DEPTH)], "results")
    name = "/".join([str(root / "outside"), *parts] if absolute else parts)
    # Hydra reads an unquoted value as a primitive (non-ASCII is a parse error); quoted, as this string
    value = "'" + name.replace("\\", "\\\\").replace("'", "\\'") + "'" if quoted else name
    short = ["train.max_steps=1", "train.eval_batches=1", "train.fluctuation_every=0", "logger=csv"]
    cache = f"data.cache_dir={tmp_path_factory.getbasetemp() / 'names-cache'}"
    args = ["pretrain", "tiny", f"name={value}", *short, "logger.progress=false", cache]
    result = CliRunner().invoke(app, args, env={"MOE_LAB_RESULTS": str(results)})
    output = result.output  # stdout and stderr together
    event(f"exit {result.exit_code}")  # pytest --hypothesis-show-statistics: how many ran, how many were refused
    assert "Traceback" not in output and result.exit_code in (0, 2), (name, result.exit_code, output)
    written = [p for p in root.rglob("*") if p.is_file()]
    if result.exit_code == 2:
        lines = [ln for ln in output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, lines)
        assert written == [], (name, written)
    else:
        (run,) = (results / "runs").iterdir()  # one folder, named as asked
        assert run.name == name and (run / next(run.iterdir()).name / "summary.json").is_file(), name
    assert all(results in p.parents for p in written), (name, [p for p in written if results not in p.parents])
