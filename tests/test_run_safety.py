"""Runs and sweeps that never give a wrong answer: run identity, locks, atomic records, one line per bad input.

Every test drives the real `moe-lab` command into a temporary results directory and checks the exit code, that an
error is one line on stderr naming the key or file, and that nothing was written or lost."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from moe_lab.runs import RunLock, lock_holder
from tests.conftest import MOE_LAB, run_cli, signal_at_first_checkpoint

TINY = ("preset=tiny", "train.max_steps=8", "train.eval_every=4", "logger.progress=false")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"data.cache_dir={tmp_path_factory.mktemp('cache')}"


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """Exit `code`, a single `error: ...` line on stderr naming every needle, and no traceback anywhere."""
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def tree(root: Path) -> dict[str, int]:
    """Every file under root with its modification time: what a refused command must leave as it was."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


# 1. a run's identity is its config


def test_a_sweep_under_another_config_stops_and_rerun_moves_the_old_runs_aside(tmp_path: Path, cache: str) -> None:
    env = {"MOE_LAB_RESULTS": str(tmp_path / "results")}
    study = tmp_path / "results" / "top-k"
    first = run_cli("sweep", "top-k", *TINY, cache, "moe.top_k=1,2", "seed=0", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    before = tree(study)

    # the same grid points, 10 steps instead of 8: not the runs on disk
    stale = run_cli("sweep", "top-k", *TINY, cache, "moe.top_k=1,2", "seed=0", "train.max_steps=10", env=env)
    line = assert_one_line_error(stale, "2 of 2 grid points", "train.max_steps 8 -> 10", "--rerun", "MOE_LAB_RESULTS")
    assert "already completed" not in stale.stdout
    assert tree(study) == before, line  # nothing was run, rewritten or removed

    # settings that do not change the numbers are the same run
    same = run_cli(
        "sweep", "top-k", *TINY, cache, "moe.top_k=1,2", "seed=0", "train.threads=1", "train.ckpt_every=3", env=env
    )
    assert same.returncode == 0, same.stdout + same.stderr
    assert same.stdout.count("already completed") == 2

    rerun = run_cli("sweep", "top-k", *TINY, cache, "moe.top_k=1,2", "seed=0", "train.max_steps=10", "--rerun", env=env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    moved = sorted((study / "runs" / "replaced").glob("*/moe.top_k=*"))
    assert [p.name for p in moved] == ["moe.top_k=1,seed=0", "moe.top_k=2,seed=0"]
    for old in moved:  # the old runs are kept whole
        assert json.loads((old / "summary.json").read_text())["step"] == 8
        assert (old / "checkpoint.pt").exists() and (old / ".hydra" / "config.yaml").exists()
    frame = pd.read_csv(study / "runs.csv")
    assert sorted(frame["moe.top_k"]) == [1, 2] and set(frame["step"]) == {10}


def test_a_resume_under_another_config_stops_and_keeps_the_run(tmp_path: Path, cache: str) -> None:
    run_dir = tmp_path / "run"
    common = ("pretrain", "tiny", f"run_dir={run_dir}", cache, "logger.progress=false")
    assert run_cli(*common, "train.max_steps=8").returncode == 0
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    before = tree(run_dir)

    other = run_cli(*common, "train.max_steps=6", "resume=true")
    assert_one_line_error(other, str(run_dir), "train.max_steps 8 -> 6", "--rerun")
    again = run_cli(*common, "train.max_steps=8")  # no resume=true: a fresh run would overwrite this one
    assert_one_line_error(again, str(run_dir), "already holds a run", "resume=true")
    assert tree(run_dir) == before

    same = run_cli(*common, "train.max_steps=8", "resume=true", "train.threads=1", "logger.wandb=false")
    assert same.returncode == 0 and "already completed" in same.stdout
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config  # a resume never rewrites the config

    rerun = run_cli(*common, "train.max_steps=6", "--rerun")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    (old,) = (tmp_path / "replaced").glob("*/run")
    assert json.loads((old / "summary.json").read_text())["step"] == 8
    assert (old / ".hydra" / "config.yaml").read_text() == config
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 6


def test_a_fine_tuning_run_is_tied_to_the_identity_of_its_pretrained_model(tmp_path: Path, cache: str) -> None:
    pre = tmp_path / "pre"
    assert run_cli("pretrain", "tiny", f"run_dir={pre}", cache, "train.max_steps=4").returncode == 0
    args = ("finetune", "synth-small", f"checkpoint={pre}", f"run_dir={tmp_path / 'ft'}", "train.max_steps=2",
            "train.eval_every=2", "task.synthetic_val=50", cache, "logger.progress=false", "resume=true")  # fmt: skip
    assert run_cli(*args).returncode == 0
    record = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert record["config"]["checkpoint"] == json.loads((pre / "run.json").read_text())["identity"]

    # pretraining again with another config makes the fine-tuning run a different one
    assert run_cli("pretrain", "tiny", f"run_dir={pre}", cache, "train.max_steps=5", "--rerun").returncode == 0
    assert_one_line_error(run_cli(*args), "checkpoint ")


# 2. a lock per run directory


def test_a_sweep_waits_for_a_point_another_process_is_training(tmp_path: Path, cache: str) -> None:
    point = tmp_path / "results" / "top-k" / "runs" / "moe.top_k=1,seed=0"
    point.mkdir(parents=True)
    lock = RunLock(point)
    lock.acquire(wait=False)
    env = {**os.environ, "WANDB_MODE": "disabled", "MOE_LAB_RESULTS": str(tmp_path / "results"), "COLUMNS": "200"}
    proc = subprocess.Popen(
        [MOE_LAB, "sweep", "top-k", *TINY, cache, "moe.top_k=1,2", "seed=0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        seen = ""
        deadline = time.time() + 120
        while "waiting for" not in seen and time.time() < deadline:
            seen += proc.stdout.readline()
        assert f"waiting for {point}: pid {os.getpid()}" in " ".join(seen.split()), seen
        time.sleep(1.0)
        assert not (point / "summary.json").exists() and not (point / "checkpoint.pt").exists()
    finally:
        lock.release()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, seen + out
    assert json.loads((point / "summary.json").read_text())["status"] == "completed"

    # a single run in a directory another process holds stops at once and says who holds it
    held = tmp_path / "held"
    held.mkdir()
    lock = RunLock(held)
    lock.acquire(wait=False)
    try:
        result = run_cli("pretrain", "tiny", f"run_dir={held}", cache, "resume=true")
        assert_one_line_error(result, f"{held} is being trained by pid {os.getpid()}")
    finally:
        lock.release()
    assert [p.name for p in held.iterdir()] == [".lock"]


def test_a_run_that_fails_after_claiming_its_directory_releases_the_lock(
    tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    from moe_lab.config import compose
    from moe_lab.train import run as run_module
    from moe_lab.train.pretrain import run_pretrain

    def broken(*args, **kwargs):
        raise RuntimeError("the model table could not be drawn")

    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", cache, "train.max_steps=2", "logger.progress=false"]
    monkeypatch.setattr(run_module, "describe_model", broken)  # between claiming the directory and training
    with pytest.raises(RuntimeError, match="could not be drawn"):
        run_pretrain(compose("tiny", overrides), overrides, Console(quiet=True))
    assert (run_dir / ".lock").exists() and lock_holder(run_dir) is None  # claimed, then released
    monkeypatch.undo()
    summary = run_pretrain(compose("tiny", [*overrides, "resume=true"]), overrides, Console(quiet=True))
    assert summary["status"] == "completed"


def test_two_sweeps_of_one_study_at_once_train_each_point_once(tmp_path: Path, cache: str) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "MOE_LAB_RESULTS": str(tmp_path / "results"), "COLUMNS": "200"}
    args = [MOE_LAB, "sweep", "top-k", *TINY, cache, "moe.top_k=1,2", "seed=0", "train.max_steps=24"]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    time.sleep(0.5)
    procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    both = "\n".join(outputs)
    assert both.count("completed after 24 steps") == 2, both  # each point trained by one sweep only
    assert both.count("already completed") == 2, both
    for k in (1, 2):
        steps = pd.read_csv(tmp_path / "results" / "top-k" / "runs" / f"moe.top_k={k},seed=0" / "metrics.csv")["step"]
        assert steps.is_monotonic_increasing, steps.tolist()  # no half-written, interleaved or duplicated rows


# 3. runs.csv is written atomically and checked by the report


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory: pytest.TempPathFactory, cache: str) -> Path:
    root = tmp_path_factory.mktemp("sweep") / "results"
    result = run_cli("sweep", "top-k", *TINY, cache, "seed=0", env={"MOE_LAB_RESULTS": str(root)})
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def _broken_copy(root: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "results"
    shutil.copytree(root, copy)
    path = copy / "top-k" / "runs.csv"
    path.write_text(edit(path.read_text()))
    return copy


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda text: text[: len(text) - 40], "ends in the middle of a line"),  # cut inside the last row
        (lambda text: text.replace("completed", "diverged", 1), "row 'moe.top_k=1,seed=0' has status='diverged'"),
        (lambda text: "\n".join(text.splitlines()[:-1]) + "\n", "has 2 rows but"),  # a whole row lost
        (lambda text: text[:7], "has no column(s) ['status']"),  # cut inside the header
        (lambda text: "", "cannot be read as CSV"),
        (lambda text: text.replace("run,", "name,", 1), "has no column(s) ['run']"),
    ],
    ids=["cut-mid-row", "edited-value", "row-lost", "cut-header", "empty", "wrong-columns"],
)
def test_the_report_names_a_runs_csv_that_disagrees_with_its_runs(
    finished_sweep: Path, tmp_path: Path, edit, needle: str
) -> None:
    from typer.testing import CliRunner

    from moe_lab.cli import app

    results = _broken_copy(finished_sweep, tmp_path, edit)
    result = CliRunner().invoke(app, ["report", "top-k", "--results", str(results), "--format", "md"])
    error = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert result.exit_code == 2 and len(error) == 1, result.output
    for part in (str(results / "top-k" / "runs.csv"), needle, "moe-lab sweep top-k"):
        assert part in error[0], (part, error[0])
    report = (results / "report.md").read_text()
    assert "no data" in report and needle in report  # the report still says what it could


def test_the_report_cli_exits_2_on_a_cut_runs_csv(finished_sweep: Path, tmp_path: Path) -> None:
    results = _broken_copy(finished_sweep, tmp_path, lambda text: text[: len(text) - 40])
    result = run_cli("report", "top-k", "--results", str(results), "--format", "md")
    assert_one_line_error(result, str(results / "top-k" / "runs.csv"), "ends in the middle of a line")


def test_the_report_accepts_the_runs_csv_a_sweep_wrote(finished_sweep: Path, tmp_path: Path) -> None:
    result = run_cli("report", "top-k", "--results", str(finished_sweep), "--out", str(tmp_path), "--format", "md")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no data" not in (tmp_path / "report.md").read_text().split("## top-k")[1].split("\n## ")[0]


def test_runs_csv_is_replaced_whole_or_not_at_all(finished_sweep: Path, tmp_path: Path, monkeypatch) -> None:
    from moe_lab.sweeps.runner import collect
    from moe_lab.sweeps.study import load_study

    root = tmp_path / "results"
    shutil.copytree(finished_sweep, root)
    before = (root / "top-k" / "runs.csv").read_text()

    def cut(self, path, **kwargs):  # a process killed while writing: half a file, then gone
        Path(path).write_text(before[: len(before) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", cut)
    with pytest.raises(KeyboardInterrupt):
        collect(load_study("top-k"), root)
    assert (root / "top-k" / "runs.csv").read_text() == before
    assert not [p.name for p in (root / "top-k").iterdir() if p.name.startswith(".runs.csv")]


def test_a_sweep_over_a_garbled_point_summary_names_it_and_changes_nothing(
    finished_sweep: Path, tmp_path: Path, cache: str
) -> None:
    root = tmp_path / "results"
    shutil.copytree(finished_sweep, root)
    run_dir = root / "top-k" / "runs" / "moe.top_k=1,seed=0"
    summary = run_dir / "summary.json"
    summary.write_text(summary.read_text()[:100])  # cut short
    before = tree(root)
    result = run_cli("sweep", "top-k", *TINY, cache, "seed=0", env={"MOE_LAB_RESULTS": str(root)})
    assert_one_line_error(result, f"{summary} is not valid JSON", f"move {run_dir} aside")
    # Hydra rewrites its multirun.yaml; the runs and runs.csv stay as they were
    assert {k: v for k, v in tree(root).items() if not k.endswith("multirun.yaml")} == {
        k: v for k, v in before.items() if not k.endswith("multirun.yaml")
    }


# 4. a sweep with a failed point exits non-zero, after writing runs.csv


def test_a_sweep_with_a_failed_point_exits_1_after_writing_runs_csv(tmp_path: Path, cache: str) -> None:
    env = {"MOE_LAB_RESULTS": str(tmp_path / "results")}
    # 40 tokens are too few for one batch: that point fails when it builds its data, the other trains
    result = run_cli("sweep", "top-k", *TINY, cache, "moe.top_k=2", "seed=0", "data.max_tokens=40,100000", env=env)
    assert_one_line_error(result, "1 of 2 grid points of top-k failed", "data.max_tokens=40", code=1)
    frame = pd.read_csv(tmp_path / "results" / "top-k" / "runs.csv")
    statuses = dict(zip(frame["data.max_tokens"], frame["status"], strict=True))
    assert statuses == {40: "failed", 100000: "completed"}
    assert "too few for one sequence" in frame.set_index("data.max_tokens").loc[40, "reason"]


def test_a_diverged_point_is_a_result_not_a_failure(tmp_path: Path, cache: str) -> None:
    env = {"MOE_LAB_RESULTS": str(tmp_path / "results")}
    result = run_cli(
        "sweep", "top-k", *TINY, cache, "moe.top_k=1", "seed=0", "optim.lr=1e6", "optim.warmup_steps=0",
        "optim.grad_clip=null", "train.divergence_loss=20", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(pd.read_csv(tmp_path / "results" / "top-k" / "runs.csv")["status"]) == {"diverged"}


# 5. bad inputs: one line naming the key or file, exit 2, no run directory


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, cache: str) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    files = {
        "empty": root / "empty.txt",
        "binary": root / "binary.bin",
        "latin1": root / "latin1.txt",
        "labels": root / "labels.jsonl",
    }
    files["empty"].write_bytes(b"")
    files["binary"].write_bytes(bytes(range(256)) * 40)
    files["latin1"].write_bytes("caf\xe9 au lait\nplain text\n".encode("latin-1"))
    files["labels"].write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": -1}\n')
    pre = root / "pre"
    assert run_cli("pretrain", "tiny", f"run_dir={pre}", cache, "train.max_steps=2").returncode == 0
    cut = root / "cut"
    shutil.copytree(pre, cut)
    data = (cut / "checkpoint.pt").read_bytes()
    (cut / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    files.update(pre=pre, cut=cut)
    return files


BAD_INPUTS = {
    "local-empty": (["data=local", "data.path={empty}"], ["data.path", "{empty}", "is empty"]),
    "local-binary": (["data=local", "data.path={binary}"], ["{binary}", "looks binary"]),
    "local-not-utf8": (["data=local", "data.path={latin1}"], ["{latin1}", "not UTF-8", "offset 3"]),
    "eval-batches-0": (["train.eval_batches=0"], ["train.eval_batches must be >= 1, got 0"]),
    "max-tokens-50": (["data.max_tokens=50"], ["data.max_tokens=50 leaves only 5 validation tokens", "too few"]),
}
# config errors stop before any data or model is built: the same CLI, run in this process (quicker)
BAD_CONFIGS = {
    "lr-nan": (["optim.lr=nan"], ["optim.lr must be > 0, got nan"]),
    "lr-inf": (["optim.lr=inf"], ["optim.lr must be > 0, got inf"]),
    "no-layers": (["model.num_layers=0"], ["model.num_layers must be >= 1, got 0"]),
    "d-model-0": (["model.d_model=0"], ["model.d_model must be >= 1, got 0"]),
    "dropout-2": (["model.dropout=2"], ["model.dropout must be in [0, 1), got 2.0"]),
    "unknown-key": (["model.foo=1"], ["unknown key 'model.foo'", "valid keys of model", "num_layers"]),
    "added-key": (["+model.foo=1"], ["unknown key 'model.foo'"]),
    "not-an-int": (["model.d_model=abc"], ["model.d_model=abc", "could not be converted to Integer"]),
    "no-such-option": (["optim=sgd"], ["optim/sgd", "available options in 'optim': adafactor, adamw"]),
    "unquoted-unicode": (["name=é"], ["cannot parse the override 'name=é' at 'é'", "put it in quotes, name='é'"]),
    "unquoted-path": (["data.path=/d/é.txt"], ["cannot parse the override 'data.path=/d/é.txt'", "quotes"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_bad_config_is_one_line_and_leaves_nothing(case: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from moe_lab.cli import app

    overrides, needles = BAD_CONFIGS[case]
    result = CliRunner().invoke(app, ["pretrain", "tiny", f"runs_root={tmp_path / 'runs'}", *overrides])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: config: "), result.output
    assert all(n in lines[0] for n in needles), (needles, lines[0])
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_bad_pretraining_input_is_one_line_and_leaves_nothing(
    case: str, bad_files: dict[str, Path], tmp_path: Path, cache: str
) -> None:
    overrides, needles = BAD_INPUTS[case]
    names = {k: str(v) for k, v in bad_files.items()}
    result = run_cli(
        "pretrain", "tiny", f"runs_root={tmp_path / 'runs'}", cache, *(o.format(**names) for o in overrides)
    )
    assert_one_line_error(result, *(n.format(**names) for n in needles))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("lookup", ["default", "variable"])
def test_a_missing_shared_data_set_names_its_absolute_path_and_where_it_is_looked_up(
    lookup: str, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    # ../shared from the working directory (tmp_path/shared, not there), or $MOE_LAB_SHARED
    shared = tmp_path / ("shared" if lookup == "default" else "elsewhere")
    env = {"MOE_LAB_SHARED": None if lookup == "default" else str(shared)}
    result = run_cli("pretrain", "tiny", "data=tinyshakespeare", f"runs_root={tmp_path / 'runs'}", env=env, cwd=work)
    missing = shared / "data" / "tinyshakespeare" / "input.txt"
    source = "../shared" if lookup == "default" else "$MOE_LAB_SHARED"
    assert_one_line_error(result, f"data.path: no such file '{missing}'", "looked up in $MOE_LAB_SHARED",
                          f"here {source}: {shared}", "MOE_LAB_SHARED=DIR")  # fmt: skip
    assert list(tmp_path.iterdir()) == [work] and list(work.iterdir()) == []


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path: Path) -> None:
    result = run_cli("pretrain", "tiny", f"runs_root={tmp_path / 'runs'}", "train.device=cuda")
    assert_one_line_error(result, "train.device=cuda but CUDA is not available", "train.device=auto or cpu")
    assert not (tmp_path / "runs").exists()


def test_labels_outside_0_to_c_minus_1_are_one_line(bad_files: dict[str, Path], tmp_path: Path) -> None:
    labels = bad_files["labels"]
    result = run_cli(
        "finetune", "local", f"checkpoint={bad_files['pre']}", f"task.train_path={labels}",
        f"task.val_path={labels}", f"runs_root={tmp_path / 'runs'}",
    )  # fmt: skip
    assert_one_line_error(result, "integer labels must be 0..C-1, found [-1, 1]", "task.label_names")
    assert not (tmp_path / "runs").exists()


def test_a_truncated_checkpoint_is_named(bad_files: dict[str, Path], tmp_path: Path, cache: str) -> None:
    cut = bad_files["cut"] / "checkpoint.pt"
    result = run_cli("finetune", "synth-small", f"checkpoint={bad_files['cut']}", f"runs_root={tmp_path / 'runs'}")
    assert_one_line_error(result, f"cannot read the checkpoint {cut}", "truncated")
    assert not (tmp_path / "runs").exists()

    # resuming a killed run whose checkpoint was cut (by a full disk, say) names it too, and changes nothing
    run_dir = tmp_path / "killed"
    shutil.copytree(bad_files["cut"], run_dir)
    (run_dir / "summary.json").unlink()  # as if the run had been killed
    before = tree(run_dir)
    result = run_cli("pretrain", "tiny", f"run_dir={run_dir}", cache, "train.max_steps=2", "resume=true")
    assert_one_line_error(result, f"cannot read the checkpoint {run_dir / 'checkpoint.pt'}")
    assert {k: v for k, v in tree(run_dir).items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


@pytest.mark.parametrize("dry_run", [True, False])
def test_sweeping_a_key_that_does_not_exist_is_one_line(tmp_path: Path, dry_run: bool) -> None:
    env = {"MOE_LAB_RESULTS": str(tmp_path / "results")}
    result = run_cli("sweep", "top-k", "model.foo=1,2", *(["--dry-run"] if dry_run else []), env=env)
    assert_one_line_error(result, "grid point 0", "unknown key 'model.foo'", "valid keys of model")
    assert not (tmp_path / "results").exists()


def test_an_unquoted_non_ascii_override_of_a_sweep_is_one_line(tmp_path: Path) -> None:
    env = {"MOE_LAB_RESULTS": str(tmp_path / "results")}
    result = run_cli("sweep", "top-k", *TINY, "data.path=é.txt", env=env)
    assert_one_line_error(result, "cannot parse the override 'data.path=é.txt'", "put it in quotes")
    assert not (tmp_path / "results").exists()


def test_a_sweep_whose_points_are_all_invalid_stops_before_running(tmp_path: Path) -> None:
    env = {"MOE_LAB_RESULTS": str(tmp_path / "results")}
    assert_one_line_error(run_cli("sweep", "top-k", *TINY, "optim.lr=nan", env=env), "optim.lr must be > 0, got nan")
    assert not (tmp_path / "results").exists()


def _read_only(folder: Path, command: list[str]) -> list[str]:
    """`command` run where `folder` cannot be written: chmod for a user; for root, who writes through permission
    bits, a read-only bind mount in a mount namespace of the command's own (util-linux unshare)."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        return command
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    if probe.returncode != 0 or not shutil.which("unshare"):
        pytest.skip(f"root without a mount namespace cannot make {folder} read-only: {probe.stderr!r}")
    script = f'mount --bind "{folder}" "{folder}" && mount -o remount,bind,ro "{folder}" && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", script, "sh", *command]


def test_a_read_only_results_directory_is_one_line(tmp_path: Path, cache: str) -> None:
    results = tmp_path / "results"
    results.mkdir()
    env = {**os.environ, "WANDB_MODE": "disabled", "COLUMNS": "200", "MOE_LAB_RESULTS": str(results)}
    for args in (
        ["pretrain", "tiny", f"runs_root={results / 'runs'}", cache],
        ["sweep", "top-k", *TINY, cache, "seed=0"],
    ):
        command = _read_only(results, [MOE_LAB, *args])
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert_one_line_error(result, f"cannot write under {results}", "is not writable")
    os.chmod(results, 0o755)
    assert list(results.iterdir()) == []


def limit_file_size(limit: int):
    """A preexec_fn: the process may write files of up to `limit` bytes; a write past it fails with EFBIG, as on a
    full disk (SIGXFSZ, which would kill it instead, is ignored)."""

    def limit_writes() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_writes


@pytest.mark.parametrize(
    ("limit", "file"), [(64 * 1024, "checkpoint.pt"), (2000, "run.json")], ids=["while-training", "at-the-start"]
)
def test_a_full_disk_is_one_line_naming_the_file_and_exit_1(
    bad_files: dict[str, Path], tmp_path: Path, cache: str, limit: int, file: str
) -> None:
    # bad_files' pretraining has built the data cache, which a process this limited could not write
    run_dir = tmp_path / "run"
    args = ["pretrain", "tiny", f"run_dir={run_dir}", cache, *TINY[1:], "resume=true"]
    env = {**os.environ, "WANDB_MODE": "disabled", "COLUMNS": "200"}
    result = subprocess.run(
        [MOE_LAB, *args], capture_output=True, text=True, env=env, timeout=300, preexec_fn=limit_file_size(limit)
    )
    assert_one_line_error(result, f"cannot write {run_dir / file}: File too large (EFBIG)", code=1)
    assert not list(run_dir.glob(".*.tmp.*"))
    if file == "checkpoint.pt":  # the run had started: it is recorded as failed, naming the file
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "failed" and f"cannot write {run_dir / file}" in summary["reason"]
    else:  # nothing of the run was written yet
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    resumed = run_cli(*args)  # with room, the same command completes it
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_a_summary_the_disk_will_not_take_still_records_the_run_as_failed(
    tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    from moe_lab.config import compose
    from moe_lab.io import atomic_write
    from moe_lab.track import loggers
    from moe_lab.train.lifecycle import RunFailedError
    from moe_lab.train.pretrain import run_pretrain

    write = loggers.write_json_atomic

    def nearly_full(path: Path, data: dict) -> None:  # room for a few hundred bytes, not for the whole summary
        if len(json.dumps(data, default=str)) > 1000:
            with atomic_write(path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(path, data)

    monkeypatch.setattr(loggers, "write_json_atomic", nearly_full)
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", cache, "train.max_steps=2", "logger=csv", "logger.progress=false"]
    with pytest.raises(RunFailedError, match=f"cannot write {run_dir / 'summary.json'}: No space left"):
        run_pretrain(compose("tiny", overrides), overrides, Console(quiet=True))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["step"] == 2 and "ENOSPC" in summary["reason"]

    monkeypatch.setattr(loggers, "write_json_atomic", write)  # room again: resume=true records it
    resumed = run_pretrain(compose("tiny", [*overrides, "resume=true"]), overrides, Console(quiet=True))
    assert resumed["status"] == "completed" and resumed["step"] == 2


# 6 and 7. a resumed run continues its W&B run; the next start removes what a kill left


def test_a_killed_run_resumes_its_wandb_run_and_removes_its_temporary_files(tmp_path: Path, cache: str) -> None:
    run_dir = tmp_path / "run"
    args = ["pretrain", "tiny", f"run_dir={run_dir}", cache, "train.max_steps=150", "train.ckpt_every=2"]
    signal_at_first_checkpoint(args, run_dir, signal.SIGKILL, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert not (run_dir / "summary.json").exists(), "the run ended before it was killed"
    orphans = [run_dir / ".checkpoint.pt.tmp.k1ll3d", run_dir / ".metrics.csv.tmp.abc", run_dir / ".summary.json.x"]
    for path in orphans:
        path.write_bytes(b"half a file")

    result = run_cli(*args, "train.max_steps=12", "resume=true", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert result.returncode == 2  # the kill left a 150-step run: 12 steps is another run
    result = run_cli(*args, "resume=true", env={"WANDB_MODE": "offline"}, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout and "left by a killed process" in result.stdout
    assert not [p for p in orphans if p.exists()]
    wandb_id = json.loads((run_dir / "run.json").read_text())["wandb_id"]
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(f"-{wandb_id}") for p in runs), runs


def test_ctrl_c_exits_130_with_one_line_and_the_run_resumes(tmp_path: Path, cache: str) -> None:
    run_dir = tmp_path / "run"
    args = ["pretrain", "tiny", f"run_dir={run_dir}", cache, "train.max_steps=150", "train.ckpt_every=2"]
    result = signal_at_first_checkpoint(args, run_dir, signal.SIGINT)
    assert_one_line_error(result, "interrupted", "resume=true", code=130)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    resumed = run_cli(*args, "resume=true", timeout=600)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout + resumed.stderr


def test_sigterm_is_recorded_like_ctrl_c_and_exits_143(tmp_path: Path, cache: str) -> None:
    run_dir = tmp_path / "run"
    args = ["pretrain", "tiny", f"run_dir={run_dir}", cache, "train.max_steps=150", "train.ckpt_every=2"]
    result = signal_at_first_checkpoint(args, run_dir, signal.SIGTERM)  # what a scheduler sends
    assert_one_line_error(result, "terminated (SIGTERM)", "resume=true", code=143)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["reason"] == "Terminated: SIGTERM", summary["reason"]
    resumed = run_cli(*args, "resume=true", timeout=600)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout + resumed.stderr


def test_a_field_added_to_the_identity_at_its_old_value_keeps_the_hash() -> None:
    """A fine-tuning run names its pretrained model by the pretraining's identity hash: a field the schema gains
    (ADDED_KEYS) must not change that hash at the value every earlier run had, and must change it at another."""
    from moe_lab.config import RunConfig
    from moe_lab.runs import ADDED_KEYS, identity_config, identity_hash

    now = identity_config(RunConfig())
    assert set(ADDED_KEYS) <= set(now)  # each is a real identity key, at its old value by default
    before = {k: v for k, v in now.items() if k not in ADDED_KEYS}  # as a run recorded before them
    assert identity_hash(now) == identity_hash(before)
    for key in ADDED_KEYS:
        other = {**now, key: "something else"}
        assert identity_hash(other) != identity_hash(before), key
    assert identity_hash({**now, "data.num_docs": 7}) != identity_hash(now)


# 8. runs stay in the results directory they are given


def test_pretrain_and_finetune_write_under_moe_lab_results(tmp_path: Path, cache: str) -> None:
    work, results = tmp_path / "work", tmp_path / "results"
    work.mkdir()
    env = {"MOE_LAB_RESULTS": str(results)}
    pre = run_cli("pretrain", "tiny", cache, "train.max_steps=2", "logger.progress=false", env=env, cwd=work)
    assert pre.returncode == 0, pre.stdout + pre.stderr
    (run,) = (results / "runs" / "tiny").iterdir()
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    ft = run_cli(
        "finetune", "synth-small", f"checkpoint={run}", "train.max_steps=2", "train.eval_every=2",
        "task.synthetic_val=50", cache, "logger.progress=false", env=env, cwd=work,
    )  # fmt: skip
    assert ft.returncode == 0, ft.stdout + ft.stderr
    (ft_run,) = (results / "runs" / "finetune-synth-small").iterdir()
    assert (ft_run / "summary.json").is_file()
    assert list(work.iterdir()) == []  # nothing in the working directory

    # without the variable (or with it empty), results/ in the working directory
    plain = run_cli("pretrain", "tiny", cache, "train.max_steps=2", env={"MOE_LAB_RESULTS": ""}, cwd=work)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert [p.name for p in (work / "results" / "runs").iterdir()] == ["tiny"]


OUTSIDE = "{tmp}/outside"
ESCAPES = {
    "name-dotdot": (["pretrain", "tiny", "name=abc/../../../x"], ["name='abc/../../../x' contains '/'"]),
    "name-parent": (["pretrain", "tiny", "name=.."], ["name='..' is not a folder's name"]),
    "name-absolute": (["pretrain", "tiny", f"name={OUTSIDE}"], ["name=", "contains '/'"]),
    "name-backslash": (["pretrain", "tiny", "name=a\\b"], ["name='a\\\\b' contains '\\\\'"]),
    "name-long": (["pretrain", "tiny", "name=" + "x" * 101], ["name='xxx", "is 101 characters"]),
    "task-name": (["finetune", "synth-small", "task.name=../../x"], ["task.name='../../x' contains '/'"]),
    "sweep-dir": (["sweep", "top-k", *TINY, f"hydra.sweep.dir={OUTSIDE}"], ["hydra.sweep.dir=", "MOE_LAB_RESULTS=DIR"]),
    "sweep-subdir": (["sweep", "top-k", *TINY, "hydra.sweep.subdir=../../x"], ["hydra.sweep.subdir=../../x"]),
    "run-dir": (["sweep", "top-k", *TINY, f"hydra.run.dir={OUTSIDE}", "--dry-run"], ["hydra.run.dir="]),
    "chdir": (["sweep", "top-k", *TINY, "hydra.job.chdir=true"], ["hydra.job.chdir=true", "MOE_LAB_RESULTS"]),
    "swept-path": (
        ["sweep", "top-k", *TINY, "data=local", "data.path=a/../../../../x,b"],
        ["grid point 0", "a swept value holds '/'", "{tmp}/results/top-k/runs"],
    ),
}


@pytest.mark.parametrize("case", list(ESCAPES))
def test_a_run_cannot_escape_the_results_directory(case: str, tmp_path: Path, cache: str) -> None:
    """A run's name is one folder, and a study's folder is fixed: anything else is one line, exit 2, no file."""
    args, needles = ESCAPES[case]
    work, results = tmp_path / "work", tmp_path / "results"
    work.mkdir()
    before = tree(tmp_path)
    # one short grid point, or two steps: what would run if the input were accepted
    extra = ["moe.top_k=1", "seed=0"] if args[0] == "sweep" else ["train.max_steps=2", "logger.progress=false"]
    args = [a.format(tmp=tmp_path) for a in [*args, *extra]]
    result = run_cli(*args, cache, env={"MOE_LAB_RESULTS": str(results)}, cwd=work)
    assert_one_line_error(result, *(n.format(tmp=tmp_path) for n in needles))
    assert tree(tmp_path) == before
