"""What a study file says about itself and about judging it (experiments/NAME.yaml, `study:`): the paper's source,
finding and numbers, and the margins, windows and tolerances of its claim's parts, fixed before its runs are
judged, each derived in the file from the paper's effect size."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moe_lab.paths import EXPERIMENTS

# the fields of moe_lab.config.StudyConfig, the schema a sweep composes the file with (a test keeps the two equal):
# importing it here would import torch into the report
KEYS = (
    "name", "paper", "command", "pretrained", "pretraining", "description", "order", "paper_numbers", "note",
    "margins", "windows", "tolerances", "extend",
)  # fmt: skip


class StudySpecError(ValueError):
    """A study file without what its report needs (a margin), naming the file and what it has."""


@dataclass(frozen=True)
class Values:
    """A group of a study's numbers by part name (`study.margins`, `study.tolerances`); a missing one is a
    StudySpecError naming the file."""

    path: Path
    values: dict[str, float]
    group: str = "margins"
    what: str = "the margin its claim is judged with"

    def __contains__(self, part: object) -> bool:
        """Whether the file states a value for `part` (an optional part is judged only then)."""
        return part in self.values

    def __getitem__(self, part: str) -> float:
        if part not in self.values:
            raise StudySpecError(
                f"{self.path}: study.{self.group} has no {part!r} ({self.what}); it has {sorted(self.values)}"
            )
        value = self.values[part]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise StudySpecError(f"{self.path}: study.{self.group}.{part}={value!r} is not a positive number")
        return float(value)


Margins = Values  # the name the builders and tests know


@dataclass(frozen=True)
class StudySpec:
    """A study file's `study:` section, as the report reads it."""

    name: str
    path: Path
    paper: str = ""
    description: str = ""
    order: int | None = None
    paper_numbers: dict[str, dict[str, Any]] = field(default_factory=dict)
    note: str = ""
    margins: Values = field(default_factory=lambda: Values(Path(), {}))
    windows: dict[str, list[float]] = field(default_factory=dict)
    tolerances: Values = field(default_factory=lambda: Values(Path(), {}, "tolerances", ""))

    def window(self, part: str) -> tuple[float, float]:
        """The range [low, high] `study.windows.PART`; a missing or malformed one is a StudySpecError."""
        value = self.windows.get(part)
        if value is None:
            raise StudySpecError(f"{self.path}: study.windows has no {part!r}; it has {sorted(self.windows)}")
        if not isinstance(value, list) or len(value) != 2 or not value[0] <= value[1]:
            raise StudySpecError(f"{self.path}: study.windows.{part}={value!r} is not a range [low, high]")
        return float(value[0]), float(value[1])


def experiments_dir() -> Path:
    """Where the study files are: the installed experiments/ (tests point it elsewhere)."""
    return Path(EXPERIMENTS)


def study_spec(name: str, root: Path | None = None) -> StudySpec:
    """The `study:` section of ROOT/NAME.yaml (the installed experiments/ by default). A key the schema
    (moe_lab.config.StudyConfig) does not know is a StudySpecError naming the valid ones."""
    path = Path(root or experiments_dir()) / f"{name}.yaml"
    if not path.is_file():
        raise StudySpecError(f"{path} does not exist: the study file states the margins its report judges with")
    study = (yaml.safe_load(path.read_text()) or {}).get("study") or {}
    unknown = sorted(set(study) - set(KEYS))
    if unknown:
        raise StudySpecError(f"{path}: unknown key(s) {[f'study.{k}' for k in unknown]}; valid keys: {list(KEYS)}")
    return StudySpec(
        name=name,
        path=path,
        paper=str(study.get("paper") or ""),
        description=str(study.get("description") or ""),
        order=study.get("order"),
        paper_numbers=dict(study.get("paper_numbers") or {}),
        note=str(study.get("note") or ""),
        margins=Values(path, dict(study.get("margins") or {})),
        windows=dict(study.get("windows") or {}),
        tolerances=Values(path, dict(study.get("tolerances") or {}), "tolerances", "a threshold its claim needs"),
    )


def margins(name: str, root: Path | None = None) -> Values:
    """The margins in ROOT/NAME.yaml (the installed experiments/ by default)."""
    return study_spec(name, root).margins
