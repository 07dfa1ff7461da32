"""A command that trains nothing imports no heavy library: `import moe_lab.cli`, `--help`, `--show-config`, a config
error and `sweep --dry-run` answer before torch alone would have loaded (STYLE.md, "Heavy libraries are imported
where they are used"). The one-way layering of moe_lab's own imports is import-linter's (`make lint`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "datasets", "transformers", "wandb", "matplotlib", "pandas", "scipy")

# Runs the CLI in this process, then prints which heavy libraries it imported and its exit code, as JSON.
RUN_CLI = (
    f"HEAVY = {HEAVY!r}\n"
    + """
import json, sys
from moe_lab.cli import app
try:
    app(args=sys.argv[1:], prog_name="moe-lab")
    code = 0
except SystemExit as exit:
    code = exit.code
print(json.dumps({"heavy": sorted(m for m in HEAVY if m in sys.modules), "code": code}))
"""
)


def heavy_imports(args: list[str], tmp_path: Path) -> tuple[list[str], int]:
    """The heavy libraries `moe-lab ARGS` imports in a fresh interpreter, and its exit code."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "MOE_LAB_RESULTS": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", RUN_CLI, *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    return out["heavy"], out["code"]


def test_importing_the_cli_imports_no_heavy_library() -> None:
    code = f"import sys, moe_lab.cli; print([m for m in {HEAVY!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


# A command that validates a run's config checks each router's needs through its RouterSpec (moe_lab.moe.config),
# never the router classes: torch is not among them.
@pytest.mark.parametrize(
    ("args", "exit_code"),
    [
        (["--help"], 0),
        (["pretrain", "tiny", "--show-config"], 0),
        (["pretrain", "tiny", "model.num_layer=3"], 2),  # a config error: one line naming the key
        (["pretrain", "tiny", "moe.routing=hash", "--show-config"], 2),  # a router's own rule: hash needs top_k 1
        (["pretrain", "tiny", "moe.backend=fast", "--show-config"], 2),  # not a backend: names the valid ones
        (["sweep", "top-k", "--dry-run"], 0),
    ],
)
def test_a_command_that_trains_nothing_imports_no_heavy_library(
    args: list[str], exit_code: int, tmp_path: Path
) -> None:
    heavy, code = heavy_imports(args, tmp_path)
    assert code == exit_code
    assert heavy == []
