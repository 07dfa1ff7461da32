"""Data parallelism under torchrun: the process group, this process's rank, and the few collectives the run
lifecycle and the loop need. One process (no WORLD_SIZE, or 1) is the same code with every collective a no-op.

What data parallelism does to a run (docs/scaling-out.md):
- every rank seeds as the run says and builds the same global batch, then keeps its slice of rows
  (`shard`): rank r of W takes rows [r B / W, (r + 1) B / W) of each batch of B;
- DistributedDataParallel averages the ranks' gradients, which is the gradient of the global batch's mean
  loss when the ranks hold equal tokens (LM batches do);
- MoE routing groups are formed per rank from its rows: with `moe.group_size` equal to a rank's tokens (or
  dropless routing), capacity, dropping and the per-group aux loss are those of the one-process run with
  the same group size; with one group per forward (the default) a rank's group is its slice;
- the loss parts and the MoE metrics are averaged over ranks before they are logged, so they describe the
  global batch; rank 0 alone writes metrics.csv, summary.json, checkpoints and W&B.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's rank and the number of ranks (0 of 1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_from_env(device: str = "auto") -> World:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1): NCCL when training on
    CUDA, else gloo, one CUDA device per rank (LOCAL_RANK). Without torchrun it is one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return world()
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={size} but this torch build has no torch.distributed")
    cuda = device != "cpu" and torch.cuda.is_available() and not device.startswith("mps")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return world()


def shard(batch: dict[str, torch.Tensor], w: World) -> dict[str, torch.Tensor]:
    """This rank's rows of a global batch (every tensor's first dimension is the batch)."""
    if w.size == 1:
        return batch
    rows = next(iter(batch.values())).shape[0]
    if rows % w.size:
        raise ValueError(f"a batch of {rows} rows does not split over {w.size} ranks: make train.batch_size a multiple")
    per = rows // w.size
    return {k: v[w.rank * per : (w.rank + 1) * per] for k, v in batch.items()}


def _device() -> torch.device:
    """Where a collective's tensors live: NCCL reduces CUDA tensors, gloo CPU ones."""
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def mean_over_ranks(values: dict[str, float], w: World) -> dict[str, float]:
    """Each value averaged over the ranks (every rank passes the same keys), in float64."""
    if w.size == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return dict(zip(keys, (t / w.size).tolist(), strict=True))


def sum_over_ranks(t: torch.Tensor, w: World) -> torch.Tensor:
    """`t` summed over the ranks (every rank passes the same shape), on t's device."""
    if w.size == 1:
        return t
    summed = t.to(_device())
    dist.all_reduce(summed)
    return summed.to(t.device)


def gather(obj: Any, w: World) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if w.size == 1:
        return [obj]
    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def leave() -> None:
    """End this process's process group, if it joined one (a no-op on one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def from_main(obj: Any, w: World) -> Any:
    """Rank 0's `obj` on every rank (any picklable value)."""
    if w.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
