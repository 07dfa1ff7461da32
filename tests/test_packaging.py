"""moe-lab installs as a wheel and runs outside a checkout: its configs and studies ship inside the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_pyproject_lists_every_package() -> None:
    """The explicit package list (needed for the conf/ and experiments/ mapping) misses nothing on disk."""
    on_disk = {"moe_lab.conf", "moe_lab.experiments"}
    on_disk |= {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "moe_lab").rglob("__init__.py")}
    for yaml_file in (ROOT / "conf").rglob("*.yaml"):  # every group, nested ones (hydra/launcher) and their parents
        parts = yaml_file.parent.relative_to(ROOT / "conf").parts
        on_disk |= {".".join(("moe_lab.conf", *parts[:i])) for i in range(1, len(parts) + 1)}
    assert sorted(_setuptools()["packages"]) == sorted(on_disk)
    assert _setuptools()["package-dir"] == {
        "moe_lab": "moe_lab",
        "moe_lab.conf": "conf",
        "moe_lab.experiments": "experiments",
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("moe_lab-*.whl")
    return path


def test_wheel_holds_every_config_and_study(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in [*(ROOT / "conf").rglob("*.yaml"), *(ROOT / "experiments").glob("*.yaml")]:
        top = "conf" if path.is_relative_to(ROOT / "conf") else "experiments"
        assert f"moe_lab/{top}/{path.relative_to(ROOT / top).as_posix()}" in names


def test_installed_wheel_runs_from_an_empty_directory(wheel: Path, tmp_path: Path) -> None:
    """pip install of the wheel (not editable) into a fresh venv, then pretrain, a sweep's dry run and the report
    from a directory with no checkout in sight. The venv borrows this one's dependencies through a .pth file."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "moe_lab_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel], check=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MOE_LAB_RESULTS", "PYTHONPATH")}
    env |= {"WANDB_MODE": "disabled", "HOME": str(tmp_path / "home")}

    def moe_lab(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [env_dir / "bin" / "moe-lab", *args], cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    where = subprocess.run(
        [python, "-c", "import moe_lab.config as c; print(c.CONF_DIR)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert Path(where.stdout.strip()) == Path(site) / "moe_lab" / "conf"  # the wheel's copy, not the checkout's
    moe_lab("pretrain", "tiny", "train.max_steps=4", "train.eval_every=2", "logger=csv")
    assert list((work / "results" / "runs" / "tiny").glob("*/summary.json"))
    assert "top-k" in moe_lab("sweep", "top-k", "--dry-run").stdout
    # the report needs a study's results (an empty results directory is one line and exit 2): the committed top-k's
    shutil.copytree(ROOT / "results" / "top-k", work / "results" / "top-k")
    moe_lab("report", "top-k")
    assert "## top-k" in (work / "results" / "report.md").read_text()
    (work / "results").rename(work / "mine")
    (work / "mine" / "report.md").unlink()
    env["MOE_LAB_RESULTS"] = str(work / "mine")
    moe_lab("report", "top-k")
    assert (work / "mine" / "report.md").is_file()
