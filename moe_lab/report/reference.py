"""What the papers report, as the report shows it beside ours: read from each study file (experiments/NAME.yaml,
`study.paper`, `study.description`, `study.paper_numbers`, `study.note`), which cites its table or figure.

Transcribed from ../shared/PAPERS.md (itself from the papers). ST-MoE and Switch "quality" is negative log
perplexity (higher is better); StableMoE reports perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moe_lab.report.spec import StudySpecError, study_spec


@dataclass(frozen=True)
class Reference:
    """One study's source in the papers: where, what it found, and its numbers keyed like our rows."""

    source: str
    finding: str
    # row label -> column label -> the paper's value (a number or a short text); numeric row labels are
    # written as f"{value:g}" (1.0 -> "1")
    numbers: dict[str, dict[str, float | str]] = field(default_factory=dict)
    note: str = ""


def reference(name: str, root: Path | None = None) -> Reference:
    """The paper's side of study `name`, from its study file; a study file that cannot be read gives an empty one
    (its report then says why it has no verdict)."""
    try:
        spec = study_spec(name, root)
    except StudySpecError:
        return Reference("", "")
    return Reference(spec.paper, spec.description, spec.paper_numbers, spec.note)
