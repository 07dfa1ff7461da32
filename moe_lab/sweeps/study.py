"""What a study is: its experiment file read into a `Study`, the grid of its points expanded as Hydra's multirun
would, each point composed and checked, and the folder each point's run gets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from moe_lab.paths import EXPERIMENTS

# Hydra finds the group `experiments` under a search-path root: the directory above it, which is the repository
# in an editable install and site-packages/moe_lab in a wheel's. (pkg://moe_lab would miss it in an editable
# install, where moe_lab.experiments is mapped to a directory outside moe_lab/.)
SEARCH_PATH = f"hydra.searchpath=[file://{EXPERIMENTS.parent}]"


@dataclass
class Study:
    """One ablation study as its experiments/NAME.yaml describes it."""

    name: str
    command: str  # pretrain | finetune
    paper: str
    description: str
    params: dict[str, str]  # hydra.sweeper.params: key -> comma-separated values
    pretrained: str | None  # fine-tuning studies: the pretraining preset their checkpoint comes from
    path: Path
    pretraining: str = "shared"  # fine-tuning studies: one pretraining for every seed, or per_seed
    # more points beyond the grid: each entry gives some swept keys other values (the rest keep the grid's), as
    # ST-MoE ran its baseline at 6 seeds and the other settings at 3
    extend: tuple[dict[str, str], ...] = ()


def studies() -> list[str]:
    """Names of the studies in experiments/."""
    return sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))


def load_study(name: str) -> Study:
    """Read experiments/NAME.yaml; an unknown name lists the valid ones."""
    path = EXPERIMENTS / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown study {name!r}; valid studies: {studies()}")
    raw = yaml.safe_load(path.read_text()) or {}
    study = raw.get("study") or {}
    command = study.get("command", "pretrain")
    if command not in ("pretrain", "finetune"):
        raise ValueError(f"{path}: study.command={command!r} is not one of ['pretrain', 'finetune']")
    pretraining = study.get("pretraining", "shared")
    if pretraining not in ("shared", "per_seed"):
        raise ValueError(f"{path}: study.pretraining={pretraining!r} is not one of ['shared', 'per_seed']")
    params = ((raw.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    params = {str(k): str(v) for k, v in params.items()}
    extend = study.get("extend") or []
    if not isinstance(extend, list) or not all(isinstance(e, dict) and e for e in extend):
        raise ValueError(f"{path}: study.extend must be a list of mappings of swept keys to values")
    for entry in extend:
        if unknown := sorted(set(map(str, entry)) - set(params)):
            raise ValueError(
                f"{path}: study.extend names {unknown}, which the grid does not sweep; swept keys: {sorted(params)}"
            )
    return Study(
        name=name,
        command=command,
        paper=study.get("paper", ""),
        description=study.get("description", ""),
        params=params,
        pretrained=study.get("pretrained"),
        path=path,
        pretraining=pretraining,
        extend=tuple({str(k): str(v) for k, v in e.items()} for e in extend),
    )


# Hydra keys that move or rename the folders of a study's points: the sweep and the report read the runs back from
# RESULTS/STUDY/runs/<the point's values>, so these are fixed (MOE_LAB_RESULTS moves the whole results directory)
FIXED_HYDRA_KEYS = (
    "hydra.sweep", "hydra.run", "hydra.job.chdir", "hydra.job.config.override_dirname", "hydra.output_subdir",
)  # fmt: skip


def check_hydra_overrides(study: Study, overrides: list[str]) -> None:
    """Raise ValueError naming an override of one of FIXED_HYDRA_KEYS, which would train the points where the
    study never looks for them."""
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if any(key == fixed or key.startswith(f"{fixed}.") for fixed in FIXED_HYDRA_KEYS):
            raise ValueError(
                f"{override}: a study's folder is fixed (RESULTS/{study.name}/runs/<each point's values>, where the "
                "sweep and the report read its runs back); to write elsewhere, set MOE_LAB_RESULTS=DIR"
            )


def grid(study: Study, overrides: list[str] | None = None) -> list[list[str]]:
    """Every grid point's overrides, expanded by the rules of Hydra's BasicSweeper (user overrides may sweep too):
    the grid's points, then those of each `extend` entry the grid lacks. A command-line value of a key replaces
    it in the grid and in every entry."""
    return [point for _, points in launch_plan(study, overrides) for point in points]


def launch_plan(study: Study, overrides: list[str] | None = None) -> list[tuple[list[str], list[list[str]]]]:
    """The multiruns that train the grid, each with the points it adds: the grid's, then each `extend` entry's
    that no earlier one trains. An entry whose every point is already there (the command line overrode all its
    keys, as a recheck at other seeds does) is left out, so no Hydra start-up is spent on it."""
    from moe_lab.config import sweep_points

    check_hydra_overrides(study, overrides or [])
    # hydra.* overrides (hydra.launcher.partition=...) set up the launcher, not a run: Hydra gets them from
    # hydra_command, the points do not carry them
    runs = [o for o in overrides or [] if not o.lstrip("+~").startswith("hydra.")]
    sweep = [f"{k}={v}" for k, v in study.params.items()]
    plan, seen = [], set()
    # the grid, then each entry's values; the command line's come last in every launch (a key given again takes
    # its last value)
    for launch in [[], *([f"{k}={v}" for k, v in entry.items()] for entry in study.extend)]:
        new = []
        for point in sweep_points([*sweep, *launch, *runs]):
            if frozenset(point) not in seen:
                seen.add(frozenset(point))
                new.append(point)
        if new:
            plan.append((launch, new))
    return plan


def _point_overrides(study: Study, point: list[str]) -> list[str]:
    """What the sweep job of a grid point composes: the study, then the point (a fine-tuning point names no
    checkpoint yet: the job gets its pretraining's)."""
    given = any(item.startswith("checkpoint=") for item in point)
    extra = ["checkpoint=unused"] if study.command == "finetune" and not given else []
    return [*extra, *point]


def _root(study: Study) -> str:
    return "finetune" if study.command == "finetune" else "config"


def compose_point(study: Study, point: list[str]):
    """The validated config of one grid point, composed with the Compose API as the sweep job would be."""
    from moe_lab.config import compose_config

    return compose_config(_root(study), [SEARCH_PATH, f"+experiments={study.name}", *_point_overrides(study, point)])


def check_points(study: Study, points: list[list[str]]) -> list:
    """Every grid point's RunConfig; the first point that does not compose raises ConfigError naming it."""
    from moe_lab.config import ConfigError, compose_runs, finetune_changes

    common = [SEARCH_PATH, f"+experiments={study.name}"]
    configs = compose_runs(_root(study), common, [_point_overrides(study, point) for point in points])
    runs = []
    for i, point in enumerate(points):
        try:
            runs.append(next(configs))
            if study.command == "finetune":
                finetune_changes([*point, f"+experiments={study.name}"])
        except (ConfigError, ValueError) as err:
            raise ConfigError(f"grid point {i} ({' '.join(point)}): {err}") from None
    return runs


def swept_keys(points: list[list[str]]) -> list[str]:
    """The keys whose value differs between grid points."""
    keys: dict[str, set[str]] = {}
    for point in points:
        for item in point:
            key, _, value = item.partition("=")
            keys.setdefault(key, set()).add(value)
    return [k for k, values in keys.items() if len(values) > 1]


def results_dir(study: Study, root: Path) -> Path:
    return root / study.name


def default_pretrained(study: Study, overrides: list[str]) -> bool:
    """Whether the study's own pretraining preset is used (not swept, not overridden)."""
    return bool(
        study.command == "finetune"
        and study.pretrained
        and "finetune.pretrained" not in study.params
        and not any(o.startswith("finetune.pretrained=") for o in overrides)
    )


def exclude_keys(study: Study, overrides: list[str]) -> list[str]:
    """Keys left out of a grid point's directory name: the bookkeeping, and the fixed overrides (not swept) of keys
    the study does not sweep; `moe.top_k=1` on the top-k study still names its one point `moe.top_k=1`."""
    fixed = [o.split("=", 1)[0] for o in overrides if "=" in o and "," not in o]
    fixed = [key for key in fixed if key not in study.params]
    exclude = ["experiments", "checkpoint", *fixed]
    return [*exclude, "finetune.pretrained"] if default_pretrained(study, overrides) else exclude


def point_dirname(study: Study, point: list[str], overrides: list[str]) -> str:
    """The directory Hydra's multirun gives a grid point (hydra.job.override_dirname, as hydra_command sets it)."""
    from moe_lab.config import override_dirname

    return override_dirname(point, exclude_keys(study, overrides))
