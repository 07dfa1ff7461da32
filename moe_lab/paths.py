"""Where results go, without importing torch (the report and the CLI's argument checks stay light)."""

from __future__ import annotations

import os
from pathlib import Path


def results_root() -> Path:
    """Where studies write and the report reads: $MOE_LAB_RESULTS or results/."""
    return Path(os.environ.get("MOE_LAB_RESULTS", "results"))
