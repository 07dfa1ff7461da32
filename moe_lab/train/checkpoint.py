"""Checkpoints written atomically: model, optimizer, scheduler, RNG states, step, config."""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from moe_lab.io import atomic_write


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def weights_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """A model's weights as 16 hex digits: sha256 over each tensor's name, dtype, shape and bytes, in name order.
    Equal for the same weights however they were loaded or laid out; one bit of one weight changes it. Two builds
    of one config differ (float summation order varies between processes), which is what it is for: a fine-tuning
    run records its base model's, so runs of two builds are never paired as if they shared one."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # its buffer, not a copy of it
    return digest.hexdigest()[:16]


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save to a temporary file beside `path`, then rename: a kill never leaves half a checkpoint; a full
    disk is a StorageError naming `path`."""
    # serialised in memory and written by Python: torch's own file writer turns a full disk into a RuntimeError
    # that names neither the file nor the cause
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_write(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`; a missing, truncated or foreign file names the path."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises RuntimeError, EOFError or UnpicklingError, by how the file is broken
        text = str(err).strip()
        reason = text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(err).__name__  # torch's first clause
        raise CheckpointError(
            f"cannot read the checkpoint {path}: it is truncated or not a moe-lab checkpoint ({reason}); move it "
            "away to train that run again from step 0"
        ) from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"{path} is not a moe-lab checkpoint (no model state in it)")
    return payload


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read."""
