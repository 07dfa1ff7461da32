"""What a study file says about judging it: the margins of its claim's parts (experiments/NAME.yaml, `study.margins`),
fixed before its runs are judged, each derived in the file from the paper's effect size."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from moe_lab.paths import EXPERIMENTS


class StudySpecError(ValueError):
    """A study file without what its report needs (a margin), naming the file and what it has."""


@dataclass(frozen=True)
class Margins:
    """A study's margins by part name; a missing one is a StudySpecError naming the file."""

    path: Path
    values: dict[str, float]

    def __contains__(self, part: object) -> bool:
        """Whether the file states a margin for `part` (an optional part is judged only then)."""
        return part in self.values

    def __getitem__(self, part: str) -> float:
        if part not in self.values:
            raise StudySpecError(
                f"{self.path}: study.margins has no {part!r} (the margin its claim is judged with); "
                f"it has {sorted(self.values)}"
            )
        value = self.values[part]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise StudySpecError(f"{self.path}: study.margins.{part}={value!r} is not a positive number")
        return float(value)


def margins(name: str, root: Path | None = None) -> Margins:
    """The margins in ROOT/NAME.yaml (the installed experiments/ by default)."""
    path = Path(EXPERIMENTS if root is None else root) / f"{name}.yaml"
    if not path.is_file():
        raise StudySpecError(f"{path} does not exist: the study file states the margins its report judges with")
    study = (yaml.safe_load(path.read_text()) or {}).get("study") or {}
    return Margins(path, dict(study.get("margins") or {}))
