"""Routing fluctuation (StableMoE, Dai et al. 2022, Sec. 2 and Fig. 2): how often a token's expert changes.

A fixed probe set of validation tokens is routed every `fluctuation_every` steps (eval mode, no gradient;
the expert is the token's first choice, the one it would be sent to at inference). The snapshots are kept
in the run directory as `routing_probe.npz` (steps [N], experts uint8 [N, layers, tokens]) and summarised
in `fluctuation.csv`, one row per snapshot and MoE layer:
- `changed_vs_final`: fraction of probe tokens whose expert differs from their expert at the last snapshot;
- `changed_vs_prev`: ... from their expert at the previous snapshot;
- `still_fluctuating`: fraction of tokens whose last change (the last snapshot at which their expert differs
  from the final one) is at or after this snapshot: StableMoE's Fig. 2 measure ("40.9% of tokens still
  change their expert after 20% of training" for BASE).

With labels for the probe tokens (the synthetic corpus's word categories, or the most frequent tokens of
real text), the final snapshot is also written as `specialisation.csv`: probe tokens per layer, label and
expert, the data of ST-MoE's expert-specialisation table (Tables 13-14).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from moe_lab.io import atomic_write
from moe_lab.models.transformer import moe_layers

PROBE_FILE = "routing_probe.npz"
TABLE_FILE = "fluctuation.csv"
SPECIALISATION_FILE = "specialisation.csv"
# StableMoE reports the share of tokens still changing after these fractions of training
REPORTED_FRACTIONS = (0.2, 0.5, 0.8)


def fluctuation_table(steps: np.ndarray, experts_NLT: np.ndarray, layers: list[str]) -> pd.DataFrame:
    """The per-snapshot, per-layer fluctuation measures of a stack of assignments (see the module doc)."""
    rows = []
    differs_NLT = experts_NLT != experts_NLT[-1]
    num_snapshots = len(steps)
    # last snapshot index at which each token's expert differs from its final one (-1: never)
    index_N = np.arange(num_snapshots)[:, None, None]
    last_change_LT = np.where(differs_NLT, index_N, -1).max(axis=0)
    for n, step in enumerate(steps):
        for layer_idx, layer in enumerate(layers):
            prev = experts_NLT[n - 1, layer_idx] if n > 0 else experts_NLT[n, layer_idx]
            rows.append({
                "step": int(step),
                "layer": layer,
                "changed_vs_final": float(differs_NLT[n, layer_idx].mean()),
                "changed_vs_prev": float((experts_NLT[n, layer_idx] != prev).mean()),
                "still_fluctuating": float((last_change_LT[layer_idx] >= n).mean()),
            })  # fmt: skip
    return pd.DataFrame(rows)


def fluctuation_summary(table: pd.DataFrame, max_steps: int) -> dict[str, float]:
    """Mean over layers of `still_fluctuating` at the first snapshot at or after 20%, 50% and 80% of training.

    The final snapshot does not count (it is the reference); a fraction with no snapshot left is omitted.
    """
    out: dict[str, float] = {}
    if table.empty:
        return out
    by_step = table.groupby("step")["still_fluctuating"].mean()
    by_step = by_step.iloc[:-1]  # the final snapshot is compared with itself: always 0, never a measurement
    for fraction in REPORTED_FRACTIONS:
        later = by_step[by_step.index >= fraction * max_steps]
        if len(later):
            out[f"fluctuation@{fraction:g}"] = float(later.iloc[0])
    return out


def specialisation_table(
    experts_LT: np.ndarray, labels_T: np.ndarray, layers: list[str], label_names: list[str]
) -> pd.DataFrame:
    """Probe tokens per (layer, label, expert); unlabelled tokens (label -1) are left out."""
    rows = []
    labelled = labels_T >= 0
    for layer_idx, layer in enumerate(layers):
        pairs = pd.DataFrame({"label": labels_T[labelled], "expert": experts_LT[layer_idx][labelled]})
        for (label, expert), count in pairs.value_counts().sort_index().items():
            rows.append({"layer": layer, "label": label_names[label], "expert": int(expert), "tokens": int(count)})
    return pd.DataFrame(rows, columns=["layer", "label", "expert", "tokens"])


@contextmanager
def metrics_paused(model: nn.Module) -> Iterator[None]:
    """Run forwards that the MoE layers' routing metrics do not count."""
    layers = [layer for _, layer in moe_layers(model)]
    saved = [layer.track_metrics for layer in layers]
    for layer in layers:
        layer.track_metrics = False
    try:
        yield
    finally:
        for layer, value in zip(layers, saved, strict=True):
            layer.track_metrics = value


class RoutingProbe:
    """Snapshots of the probe tokens' experts in every MoE layer, saved to the run directory as they come."""

    def __init__(
        self,
        ids_BS: torch.Tensor,
        every: int,
        run_dir: Path,
        labels_BS: torch.Tensor | None = None,
        label_names: list[str] | None = None,
        write: bool = True,
    ) -> None:
        self.ids_BS = ids_BS
        self.write = write  # False: route and measure, write nothing (expert-parallel ranks other than 0)
        self.labels_BS = labels_BS  # a label id per probe token (-1: unlabelled), named by label_names
        self.label_names = label_names
        self.every = every
        self.path = Path(run_dir) / PROBE_FILE
        self.table_path = Path(run_dir) / TABLE_FILE
        self.steps: list[int] = []
        self.snapshots: list[np.ndarray] = []
        self.layers: list[str] = []

    def resume(self, step: int) -> None:
        """Load the snapshots of a resumed run, up to its checkpoint's step."""
        if not self.path.exists():
            return
        with np.load(self.path) as saved:
            keep = saved["steps"] <= step
            self.steps = saved["steps"][keep].tolist()
            self.snapshots = list(saved["experts"][keep])
            self.layers = saved["layers"].tolist()

    def due(self, step: int, done: bool) -> bool:
        """Whether to snapshot after `step` (also at step 0, before training, and at the end)."""
        return step % self.every == 0 or done

    @torch.no_grad()
    def snapshot(self, model: nn.Module, step: int) -> dict[str, float]:
        """Route the probe tokens, save, and return each layer's change since the previous snapshot."""
        layers = moe_layers(model)
        if not layers or (self.steps and self.steps[-1] == step):
            return {}
        was_training = model.training
        model.eval()
        try:
            with metrics_paused(model):
                model(self.ids_BS.to(next(model.parameters()).device))
        finally:
            model.train(was_training)
        experts = np.stack([layer.last_expert_index[..., 0].reshape(-1).cpu().numpy() for _, layer in layers])
        self.layers = [name.split(".")[-2] if name.endswith(".ffn") else name for name, _ in layers]
        self.steps.append(step)
        self.snapshots.append(experts.astype(np.uint8 if experts.max() < 256 else np.int32))
        self._save()
        changed = {}
        if len(self.snapshots) > 1:
            prev = self.snapshots[-2]
            for i, layer in enumerate(self.layers):
                changed[f"fluct/{layer}/changed_vs_prev"] = float((experts[i] != prev[i]).mean())
        return changed

    def _save(self) -> None:
        if not self.write:
            return
        with atomic_write(self.path, suffix=".npz") as tmp:
            np.savez_compressed(
                tmp, steps=np.array(self.steps), experts=np.stack(self.snapshots), layers=np.array(self.layers)
            )

    def finish(self, max_steps: int) -> dict[str, float]:
        """Write fluctuation.csv (relative to the last snapshot) and return the summary numbers."""
        if not self.snapshots:
            return {}
        table = fluctuation_table(np.array(self.steps), np.stack(self.snapshots), self.layers)
        if not self.write:
            return fluctuation_summary(table, max_steps)
        with atomic_write(self.table_path, suffix=".csv") as tmp:
            table.to_csv(tmp, index=False)
        if self.labels_BS is not None and self.label_names is not None:
            counts = specialisation_table(self.snapshots[-1], self.labels_BS.reshape(-1).numpy(), self.layers,
                                          self.label_names)  # fmt: skip
            with atomic_write(self.table_path.parent / SPECIALISATION_FILE, suffix=".csv") as tmp:
                counts.to_csv(tmp, index=False)
        return fluctuation_summary(table, max_steps)
