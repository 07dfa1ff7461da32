"""Studies: every experiment composes, --dry-run shows the grid, sweeps run, resume and record failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from moe_lab.config import CONF_DIR, to_run_config
from moe_lab.sweeps.study import check_points, compose_point, grid, load_study, studies, swept_keys
from tests.conftest import MOE_LAB, run_cli


def assert_applied(run: object, path: str, expected: object) -> None:
    """Every leaf of `expected` (a yaml mapping placed at `path`) is the run config's value there."""
    if isinstance(expected, dict):
        for key, value in expected.items():
            assert_applied(run, f"{path}.{key}" if path else key, value)
        return
    node = run
    for part in path.split("."):
        node = getattr(node, part)
    actual = list(node) if isinstance(node, tuple | list) else node
    assert actual == expected or str(actual) == str(expected), (path, actual, expected)


@pytest.mark.parametrize("name", studies())
def test_every_grid_point_of_every_study_composes(name: str) -> None:
    study = load_study(name)
    points = grid(study)
    assert len(points) >= 2 and swept_keys(points)
    study_values = yaml.safe_load((CONF_DIR.parent / "experiments" / f"{name}.yaml").read_text())
    # the sweep's check composes with Hydra once per config-group choice and sets the other values itself
    # (moe_lab.config.compose_runs): every point must come out as Hydra's own compose of it
    checked = check_points(study, points)
    seen = set()
    for point, fast in zip(points, checked, strict=True):
        # Hydra's compose once per setting: points that differ only in seed differ only there (z-loss-stability's
        # 231 points are 35 settings)
        setting = frozenset(item for item in point if not item.startswith("seed="))
        if setting in seen:
            assert [f"seed={fast.seed}"] == [item for item in point if item.startswith("seed=")], point
            continue
        seen.add(setting)
        run = to_run_config(compose_point(study, point))
        assert fast == run, point
        assert run.study.name == name and run.study.paper
        for item in point:
            key, value = item.split("=", 1)
            group = CONF_DIR / key.lstrip("+")
            if group.is_dir():  # a config group option: its file's values arrive, except those the study sets
                text = (group / f"{value}.yaml").read_text()
                values = yaml.safe_load(text) or {}
                if "@package _global_" not in text:
                    own = study_values.get(key.lstrip("+"), {})
                    values = {k: own.get(k, v) for k, v in values.items()}
                assert_applied(run, "" if "@package _global_" in text else key.lstrip("+"), values)
            else:
                assert_applied(run, key, yaml.safe_load(value))


def test_a_bad_value_at_a_later_grid_point_is_hydras_error_naming_the_point() -> None:
    from moe_lab.config import ConfigError

    study = load_study("top-k")
    # the second point reuses the first's composition; its bad values must fail as Hydra's compose fails them
    with pytest.raises(ConfigError, match=r"grid point 1 \(moe.top_k=2 seed=x\): .*seed"):
        check_points(study, [["moe.top_k=1", "seed=0"], ["moe.top_k=2", "seed=x"]])
    with pytest.raises(ConfigError, match=r"grid point 1 \(moe.top_k=0 seed=1\): moe.top_k must be >= 1"):
        check_points(study, [["moe.top_k=1", "seed=0"], ["moe.top_k=0", "seed=1"]])


def test_dry_run_lists_the_grid(tmp_path: Path) -> None:
    result = run_cli("sweep", "capacity-factor", "--dry-run", env={"MOE_LAB_RESULTS": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "20 runs" in " ".join(result.stdout.split())  # 4 train CFs x the study's 5 seeds (the title may wrap)
    rows = [ln for ln in result.stdout.splitlines() if ln.startswith("│")]
    cells = [[c.strip() for c in row.split("│")[1:-1]] for row in rows]
    assert cells == [[str(i), cf, seed, "to run"] for i, (cf, seed) in enumerate(
        (cf, seed) for cf in ("0.75", "1.0", "1.25", "2.0") for seed in ("0", "1", "2", "3", "4")
    )]  # fmt: skip
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
    committed_results = Path(__file__).resolve().parents[1] / "results"
    committed = run_cli("sweep", "capacity-factor", "--dry-run", env={"MOE_LAB_RESULTS": str(committed_results)})
    assert "20 points: 20 finished" in committed.stdout  # the committed results are this study's runs
    grid_2d = run_cli("sweep", "capacity-factor", "moe.eval_capacity_factor=1.0,2.0", "--dry-run")
    assert "40 runs" in " ".join(grid_2d.stdout.split())
    extra = run_cli("sweep", "top-k", "seed=0,1", "--dry-run")
    assert "6 runs" in " ".join(extra.stdout.split()) and "seed" in extra.stdout


def _extended(tmp_path: Path, extend: object) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "study": {"name": "s", "extend": extend},
        "hydra": {"sweeper": {"params": {"+stability": "baseline,z-loss,jitter", "seed": "0,1"}}},
    }))  # fmt: skip
    return path


def test_extend_adds_points_for_some_settings_and_the_command_line_wins_in_every_grid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moe_lab.sweeps.study as study_module

    monkeypatch.setattr(study_module, "EXPERIMENTS", tmp_path)
    _extended(tmp_path, [{"+stability": "baseline,z-loss", "seed": "1,2,3"}])
    study = load_study("study")
    # the grid's 6 points, then the entry's 6 less the 2 the grid has (baseline and z-loss at seed 1)
    assert [" ".join(p) for p in grid(study)] == [
        *(f"+stability={s} seed={i}" for s in ("baseline", "z-loss", "jitter") for i in (0, 1)),
        *(f"+stability={s} seed={i}" for s in ("baseline", "z-loss") for i in (2, 3)),
    ]
    # a swept command-line value replaces the key in the entry too: seed=5 leaves one point per setting
    assert [" ".join(p) for p in grid(study, ["seed=5"])] == [
        f"+stability={s} seed=5" for s in ("baseline", "z-loss", "jitter")
    ]
    assert [" ".join(p) for p in grid(study, ["+stability=jitter"])] == [
        f"+stability=jitter seed={i}" for i in (0, 1, 2, 3)
    ]

    _extended(tmp_path, [{"optim.lr": "0.1"}])
    with pytest.raises(ValueError, match=r"names \['optim.lr'\], which the grid does not sweep; swept keys: "
                       r"\['\+stability', 'seed'\]"):  # fmt: skip
        load_study("study")
    _extended(tmp_path, {"seed": "3"})
    with pytest.raises(ValueError, match=r"study\.extend must be a list of mappings"):
        load_study("study")


def test_a_sweep_launches_the_grid_then_each_extension_and_together_they_train_every_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_study hands Hydra one multirun per grid (Hydra's sweeper knows no union); the points those multiruns
    expand to are the dry run's grid (expanded by `sweep_points`, which follows Hydra's BasicSweeper:
    test_hydra_rules_sweep_points_match_the_basic_sweeper)."""
    import moe_lab.sweeps.runner as runner
    from moe_lab.config import sweep_points

    study = load_study("z-loss-stability")
    assert study.extend, "z-loss-stability runs its two compared settings at more seeds"
    launched = []
    monkeypatch.setattr(runner, "plan_study", lambda *a: ([], []))
    monkeypatch.setattr(runner, "collect", lambda *a: pd.DataFrame())
    monkeypatch.setattr(
        runner.subprocess, "run", lambda cmd, env: launched.append(cmd) or subprocess.CompletedProcess(cmd, 0)
    )
    overrides = ["optim.lr=0.01", "train.threads=1"]
    runner.run_study("z-loss-stability", overrides, root=tmp_path)
    assert len(launched) == 1 + len(study.extend)
    from_hydra = set()
    for cmd in launched:
        given = [a for a in cmd if "=" in a and not a.startswith(("hydra", "--", "+experiments"))]
        # Hydra's multirun: the study file's sweeper params, then the command's overrides (the later value wins)
        params = [f"{k}={v}" for k, v in study.params.items()]
        from_hydra |= {frozenset(p) for p in sweep_points([*params, *given])}
    assert from_hydra == {frozenset(p) for p in grid(study, overrides)}
    runs = {s: sum(f"+stability={s}" in p for p in grid(study, overrides)) for s in ("baseline", "jitter")}
    assert runs["baseline"] > runs["jitter"] == 3  # one learning rate: jitter's 3 seeds, the baseline's more
    # a recheck at other seeds gives every key of the entry: its multirun would add no point, so it is not started
    launched.clear()
    recheck = ["+stability=baseline,z-loss", "seed=12,13", "train.threads=1"]
    runner.run_study("z-loss-stability", recheck, root=tmp_path)
    assert len(launched) == 1 and [a for a in launched[0] if a in recheck] == recheck
    assert len(grid(study, recheck)) == 2 * 2 * len(str(study.params["optim.lr"]).split(","))


def test_a_fine_tuning_sweep_refuses_an_architecture_key_before_running() -> None:
    result = run_cli("sweep", "freeze", "moe.num_experts=4", "--dry-run")
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert line.startswith("error: grid point 0 (") and "moe.num_experts: fixed by the pretrained checkpoint" in line


def test_unknown_study_lists_the_studies() -> None:
    result = run_cli("sweep", "nope", "--dry-run")
    assert result.returncode == 2 and f"valid studies: {studies()}" in result.stderr


TINY = ("preset=tiny", "train.max_steps=8", "train.eval_every=4", "logger.progress=false")


def test_sweep_runs_resumes_and_records_failures(tmp_path: Path) -> None:
    env = {"MOE_LAB_RESULTS": str(tmp_path / "results")}
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    runs = tmp_path / "results" / "top-k" / "runs"

    # kill the sweep as soon as its first run has finished
    proc = subprocess.Popen(
        [MOE_LAB, "sweep", "top-k", *TINY, cache, "seed=0"], env={**os.environ, "WANDB_MODE": "disabled", **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    first = runs / "moe.top_k=1,seed=0" / "summary.json"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists()
    assert not (runs / "moe.top_k=4,seed=0" / "summary.json").exists(), "the sweep finished before it was killed"
    first_written = first.stat().st_mtime_ns

    result = run_cli("sweep", "top-k", *TINY, cache, "seed=0", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert first.stat().st_mtime_ns == first_written  # the finished run was skipped, not redone
    assert "already completed" in result.stdout
    frame = pd.read_csv(tmp_path / "results" / "top-k" / "runs.csv")
    assert sorted(frame["moe.top_k"]) == [1, 2, 4]
    assert set(frame["status"]) == {"completed"}
    assert {"final_val_loss", "tokens_per_s", "moe_dropped_frac", "eval_moe_dropped_frac"} <= set(frame.columns)

    # a grid point that cannot compose stops the sweep before anything runs (a point that fails while it runs
    # is recorded as failed: tests/test_run_safety.py)
    result = run_cli("sweep", "top-k", *TINY, cache, "moe.top_k=2,9", "seed=0", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "grid point 1" in result.stderr and "moe.top_k=9 exceeds num_experts=4" in result.stderr
    assert not (runs / "moe.top_k=9,seed=0").exists()


def test_finetune_study_pretrains_its_checkpoint_once(tmp_path: Path) -> None:
    env = {"MOE_LAB_RESULTS": str(tmp_path / "results")}
    args = ("sweep", "freeze", "finetune.pretrained=tiny", "study.pretraining=shared", "train.max_steps=4",
            "train.eval_every=4", "task.synthetic_val=100", "task.synthetic_train=200", "data.valence_cues=true",
            "logger.progress=false", f"data.cache_dir={tmp_path / 'cache'}", "finetune.freeze=all,moe",
            "seed=0")  # fmt: skip
    result = run_cli(*args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    pretrained = tmp_path / "results" / "pretrained" / "tiny" / "summary.json"
    assert json.loads(pretrained.read_text())["status"] == "completed"
    frame = pd.read_csv(tmp_path / "results" / "freeze" / "runs.csv")
    assert sorted(frame["finetune.freeze"]) == ["all", "moe"]
    assert set(frame["status"]) == {"completed"}
    trainable = dict(zip(frame["finetune.freeze"], frame["trainable_parameters"], strict=True))
    assert trainable["moe"] < trainable["all"]
    written = pretrained.stat().st_mtime_ns
    assert run_cli(*args, env=env).returncode == 0
    assert pretrained.stat().st_mtime_ns == written  # the checkpoint is not pretrained again

    # a fresh clone holds the committed records without the checkpoint (.gitignore): with every point finished there
    # is nothing to fine-tune, so nothing is pretrained again
    record = pretrained.read_bytes()
    (pretrained.parent / "checkpoint.pt").unlink()
    result = run_cli(*args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (pretrained.parent / "checkpoint.pt").exists() and "pretraining again" not in result.stdout
    assert pd.read_csv(tmp_path / "results" / "freeze" / "runs.csv").equals(frame)
    # a direct fine-tuning from that record names what is missing
    result = run_cli("finetune", "synth-small", f"checkpoint={pretrained.parent}", f"runs_root={tmp_path / 'runs'}")
    assert result.returncode == 2 and "is a pretraining record without its checkpoint.pt" in result.stderr
    # a point still to train needs the weights: the sweep rebuilds them beside the record, checks that they reproduce
    # the record's final loss, and leaves the record as it was
    point = tmp_path / "results" / "freeze" / "runs" / "finetune.freeze=moe,seed=0"
    shutil.rmtree(point)
    dry = " ".join(run_cli(*args, "--dry-run", env=env).stdout.split())  # says so first, and changes nothing
    assert "2 points: 1 finished, 1 to run" in dry and f"rebuilds the checkpoint of {pretrained.parent}" in dry
    assert not point.exists() and not (pretrained.parent / "checkpoint.pt").exists()
    result = run_cli(*args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checkpoint rebuilt; its final val loss" in " ".join(result.stdout.split())
    assert (pretrained.parent / "checkpoint.pt").exists()
    assert pretrained.read_bytes() == record
    assert sorted(p.name for p in pretrained.parent.parent.iterdir()) == ["tiny"]  # no tiny.rebuild, nothing aside

    # the record names its weights, and each fine-tuning the weights it started from: the same here, where one
    # thread on one machine rebuilds tiny bit for bit
    weights = json.loads(record)["weights"]
    assert len(weights) == 16 and weights == json.loads((point / "summary.json").read_text())["pretrained_weights"]

    # a rebuild that does not reproduce its record (here a record edited to other weights) becomes the record, and
    # the old one is moved aside, so the record always describes the checkpoint beside it
    edited = json.loads(record)
    original_dir = edited["run_dir"]
    edited["weights"] = "0" * 16
    pretrained.write_text(json.dumps(edited))
    (pretrained.parent / "checkpoint.pt").unlink()
    shutil.rmtree(point)
    result = run_cli(*args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"weights {weights} against {'0' * 16}): it replaces the record" in " ".join(result.stdout.split())
    rebuilt = json.loads(pretrained.read_text())
    assert rebuilt["weights"] == weights and rebuilt["run_dir"] == original_dir
    assert (pretrained.parent / "checkpoint.pt").exists()
    assert "tiny.rebuild" not in (pretrained.parent / ".hydra" / "overrides.yaml").read_text()
    (moved,) = (pretrained.parent.parent / "replaced").glob("*/tiny/summary.json")
    assert json.loads(moved.read_text())["weights"] == edited["weights"]

    # a finished point fine-tuned from other weights than the checkpoint's (here its record edited, as after a
    # rebuild that is another model) would be paired with new points on this one: the dry run warns while the
    # checkpoint is to be rebuilt, the sweep stops before the grid and trains nothing, and --rerun trains them all
    finished = tmp_path / "results" / "freeze" / "runs" / "finetune.freeze=all,seed=0" / "summary.json"
    other = {**json.loads(finished.read_text()), "pretrained_weights": "1" * 16}
    finished.write_text(json.dumps(other))
    (pretrained.parent / "checkpoint.pt").unlink()
    shutil.rmtree(point)
    dry = " ".join(run_cli(*args, "--dry-run", env=env).stdout.split())
    gone = f"1 finished point(s) beside points to train were fine-tuned from {pretrained.parent}, whose checkpoint is"
    assert gone in dry
    result = run_cli(*args, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    message = " ".join(result.stderr.split())
    assert f"(e.g. {finished.parent}) were fine-tuned from weights {'1' * 16}" in message
    assert f"whose checkpoint now holds weights {weights}" in message and "--rerun" in message
    assert not point.exists() and json.loads(finished.read_text()) == other
    dry = " ".join(run_cli(*args, "--dry-run", env=env).stdout.split())  # the rebuild is on disk: from its record
    held = f"(e.g. {finished.parent}) were fine-tuned from other weights than {pretrained.parent} holds ({weights})"
    assert held in dry
    result = run_cli(*args, "--rerun", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = pd.read_csv(tmp_path / "results" / "freeze" / "runs.csv")
    assert set(runs["pretrained_weights"]) == {weights} and set(runs["status"]) == {"completed"}


def test_a_per_seed_study_fine_tunes_each_seed_from_the_pretraining_of_that_seed(tmp_path: Path) -> None:
    env = {"MOE_LAB_RESULTS": str(tmp_path / "results")}
    args = ("sweep", "freeze", "finetune.pretrained=tiny", "study.pretraining=per_seed", "train.max_steps=4",
            "train.eval_every=4", "task.synthetic_val=100", "task.synthetic_train=200", "data.valence_cues=true",
            "logger.progress=false",
            f"data.cache_dir={tmp_path / 'cache'}", "finetune.freeze=all", "seed=0,1", "--launcher", "joblib",
            "train.threads=1")  # fmt: skip
    result = run_cli(*args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    root = tmp_path / "results"
    assert not (root / "pretrained").exists()
    pretrained = {s: json.loads((root / "pretrain" / "tiny" / f"seed{s}" / "summary.json").read_text()) for s in (0, 1)}
    assert [pretrained[s]["config"]["seed"] for s in (0, 1)] == [0, 1]
    assert pretrained[0]["final_val_loss"] != pretrained[1]["final_val_loss"]
    for seed in (0, 1):  # each fine-tuning names the pretraining of its own seed, by path and by identity
        run = root / "freeze" / "runs" / f"finetune.freeze=all,seed={seed}"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["pretrained"] == str(root / "pretrain" / "tiny" / f"seed{seed}")
        record = json.loads((run / "run.json").read_text())
        assert record["config"]["checkpoint"] == pretrained[seed]["identity"]
    assert run_cli(*args, env=env).returncode == 0  # a second sweep finds every run, pretraining included, done


def test_make_reproduce_runs_a_study_with_its_default_arguments_and_reports(tmp_path: Path) -> None:
    """`make reproduce` as committed: joblib grid points with one thread each, then the report."""
    repo = Path(__file__).resolve().parents[1]
    make = ["make", "-s", "-C", str(repo), "-o", ".venv/.installed", f"BIN={Path(sys.executable).parent}"]
    default = subprocess.run(
        [*make, "--eval", "print-sweep-args: ; @echo $(SWEEP_ARGS)", "print-sweep-args"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert "--launcher" in default and "train.threads=1" in default
    args = [*default, *TINY, f"data.cache_dir={tmp_path / 'cache'}", "seed=0"]
    env = {**os.environ, "WANDB_MODE": "disabled", "MOE_LAB_RESULTS": str(tmp_path / "results")}
    result = subprocess.run(
        [*make, "reproduce", "STUDIES=top-k", f"SWEEP_ARGS={' '.join(args)}"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "== top-k took" in result.stdout and "== make reproduce took" in result.stdout
    runs = tmp_path / "results" / "top-k" / "runs"
    launcher = yaml.safe_load((runs / "multirun.yaml").read_text())["hydra"]["launcher"]["_target_"]
    assert "joblib" in launcher.lower()
    for k in (1, 2, 4):
        summary = json.loads((runs / f"moe.top_k={k},seed=0" / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["config"]["train"]["threads"] == 1
    assert "| top-k |" in (tmp_path / "results" / "report.md").read_text()
    assert (tmp_path / "results" / "report.html").exists() and (tmp_path / "results" / "report.csv").exists()


@pytest.mark.parametrize("name", studies())
def test_the_committed_results_are_the_runs_of_the_committed_studies(name: str) -> None:
    """`make reproduce` on a fresh clone reuses results/ only if each run there is its grid point's config: a
    study file or default changed since without rerunning the study would stop it (and mislead a reader)."""
    from moe_lab.sweeps.plan import plan_study

    repo = Path(__file__).resolve().parents[1]
    pretrainings, checks = plan_study(load_study(name), ["train.threads=1", "logger.progress=false"], repo / "results")
    assert all(c.on_disk for c in checks), [str(c.run_dir) for c in checks if not c.on_disk]
    assert not [c for c in pretrainings + checks if c.diffs], [(str(c.run_dir), c.diffs) for c in checks if c.diffs]


def test_runs_csv_keeps_an_appended_config_group_as_a_swept_value(tmp_path: Path) -> None:
    # `+stability=z-loss` is what z-loss-stability sweeps; `+experiments=NAME` only names the study
    from moe_lab.sweeps.runner import _point_values

    (tmp_path / ".hydra").mkdir()
    overrides = ["+stability=z-loss", "optim.lr=0.1", "+experiments=z-loss-stability", "hydra.run.dir=x", "~foo"]
    (tmp_path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, "checkpoint=/a/b"]))
    assert _point_values(tmp_path) == {"+stability": "z-loss", "optim.lr": "0.1"}


# moe_lab.config reimplements two rules of Hydra's private modules with its public API; these grids check that the
# copies give what Hydra's own functions give (a Hydra upgrade that changed either rule would fail here)
HYDRA_GRIDS = [
    ["moe.top_k=1,2,4", "seed=0,1,2"],
    ["+stability=z-loss,none", "moe.capacity_factor=1.0,1.25", "train.steps=20"],
    ["seed=range(0,3)", "model=tiny", "optim.lr=1e-3,3e-4", "data.num_docs=500"],
    ["moe.top_k=2", "moe.top_k=1,2", "~logger.wandb", "task=polarity-small,cb", "checkpoint=/tmp/x"],
    ["+experiments=top-k", "moe.router='token_choice','expert_choice'", "train.threads=1"],
]


@pytest.mark.parametrize("overrides", HYDRA_GRIDS)
def test_hydra_rules_sweep_points_match_the_basic_sweeper(overrides: list[str]) -> None:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # noqa: TID251 (the reference)

    from moe_lab.config import parse_overrides, sweep_points

    assert sweep_points(overrides) == BasicSweeper.split_arguments(parse_overrides(overrides), None)[0]


@pytest.mark.parametrize("overrides", HYDRA_GRIDS)
@pytest.mark.parametrize("exclude", [[], ["experiments", "checkpoint"], ["seed", "train.threads", "stability"]])
def test_hydra_rules_override_dirname_matches_hydras(overrides: list[str], exclude: list[str]) -> None:
    from hydra._internal.config_loader_impl import get_overrides_dirname  # noqa: TID251 (the reference)

    from moe_lab.config import override_dirname, parse_overrides, sweep_points

    for point in sweep_points(overrides):
        expected = get_overrides_dirname(parse_overrides(point), exclude, item_sep=",", kv_sep="=")
        assert override_dirname(point, exclude) == expected
