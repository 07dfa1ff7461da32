"""Training with the experts spread over the ranks (`parallel.expert=P`, moe_lab.moe.expert_parallel).

What the training loop needs beyond the layer's dispatch, so that a run at P ranks is the one-process run:
- every rank takes rank 0's full model (fresh or resumed) and keeps its experts (`ExpertSharding.shard`);
- DistributedDataParallel leaves the expert weights alone (each rank's are its own); their gradients arrive
  through the all-to-all's backward summed over the ranks' losses, each the mean over one rank's tokens,
  so dividing them by the number of ranks gives the gradient of the global batch's mean loss, as DDP's
  average does for the replicated weights (`scale_expert_grads`);
- the gradient norm that clipping uses is that of the whole model: the replicated weights' squared norm
  plus the sum over ranks of each rank's experts' squared norm (`clip_grad_norm`);
- checkpoints hold the full layout: every rank's experts, and their optimizer state, gathered along the
  expert dimension (`full_model_state`, `full_optimizer_state`), so a checkpoint saved at any P resumes at
  any other P, on one process or under data parallelism, and fine-tuning reads it as any other.

Today P is the number of ranks (every rank holds a distinct slice; no expert is replicated). The optimizer
must be elementwise in the experts' weights (AdamW, SGD): Adafactor's and `optim.update_clip`'s per-tensor
RMS would be taken over one rank's slice, so those are refused.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe_lab.config import OptimConfig
from moe_lab.models.transformer import moe_layers
from moe_lab.moe.expert_parallel import ExpertGroup, shard_experts


def check_expert_parallel(expert: int, ranks: int, optim: OptimConfig) -> None:
    """Raise ValueError naming the keys when `parallel.expert` cannot run on `ranks` processes."""
    if expert == 1:
        return
    if expert != ranks:
        raise ValueError(
            f"parallel.expert={expert} with {ranks} process(es): expert parallelism spreads the experts over "
            f"every rank, so it must equal the number of processes (--nproc {expert}), or be 1"
        )
    if optim.name == "adafactor" or optim.update_clip is not None:
        raise ValueError(
            f"parallel.expert={expert} with optim={optim.name}, optim.update_clip={optim.update_clip}: a per-tensor "
            "update RMS would be taken over one rank's experts; use optim=adamw with optim.update_clip=null"
        )


class ExpertSharding:
    """The expert weights of a model sharded over `group`: their names and the layers' expert counts."""

    def __init__(self, model: nn.Module, group: ExpertGroup) -> None:
        layers = moe_layers(model)
        if not layers:
            raise ValueError(f"parallel.expert={group.size}: this model has no MoE layer to spread over ranks")
        self.group = group
        self.num_experts: dict[str, int] = {}  # expert parameter name -> experts in the full tensor
        for name, layer in layers:
            group.local_experts(layer.experts.num_experts)  # raises when they do not split evenly
            for pname, _ in layer.experts.named_parameters():
                self.num_experts[f"{name}.experts.{pname}"] = layer.experts.num_experts
        self.model = model

    def shard(self) -> None:
        """Take rank 0's full weights (ranks initialise with their own seeds; DistributedDataParallel's own
        broadcast skips the experts) and keep this rank's experts in every MoE layer."""
        with torch.no_grad():
            for tensor in [*self.model.parameters(), *self.model.buffers()]:
                dist.broadcast(tensor, 0, group=self.group.group)
        for _, layer in moe_layers(self.model):
            shard_experts(layer, self.group)

    def parameters(self) -> list[nn.Parameter]:
        named = dict(self.model.named_parameters())
        return [named[name] for name in self.num_experts]

    def _mine(self, name: str) -> slice:
        mine = self.group.local_experts(self.num_experts[name])
        return slice(mine.start, mine.stop)

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(self.group.size)]
        dist.all_gather(parts, local.contiguous(), group=self.group.group)
        return torch.cat(parts, 0)

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The model's state dict with every rank's experts (a collective: every rank calls it)."""
        state = self.model.state_dict()
        for name in self.num_experts:
            state[name] = self._gather(state[name])
        return state

    def _optimizer_indices(self, optimizer: torch.optim.Optimizer) -> dict[int, str]:
        """The optimizer state's parameter index (torch numbers them across groups in order) -> expert name."""
        names = {id(p): n for n, p in self.model.named_parameters() if n in self.num_experts}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return {i: names[id(p)] for i, p in enumerate(params) if id(p) in names}

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state dict with the experts' per-expert tensors gathered (collective)."""
        state = optimizer.state_dict()
        experts = self._optimizer_indices(optimizer)
        per_param = dict(state["state"])
        for index, name in sorted(experts.items()):
            local = self.num_experts[name] // self.group.size
            entry = dict(per_param.get(index, {}))
            for key, value in sorted(entry.items()):
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == local:
                    entry[key] = self._gather(value)
            per_param[index] = entry
        return {**state, "state": per_param}

    def local_optimizer_state(self, full: dict, optimizer: torch.optim.Optimizer) -> dict:
        """A full-layout optimizer state dict cut down to this rank's experts."""
        per_param = dict(full["state"])
        for index, name in self._optimizer_indices(optimizer).items():
            if index not in per_param:
                continue
            total, cut = self.num_experts[name], self._mine(name)
            per_param[index] = {
                key: value[cut] if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == total
                else value
                for key, value in per_param[index].items()
            }  # fmt: skip
        return {**full, "state": per_param}

    def scale_expert_grads(self) -> None:
        """Expert gradients summed over the ranks' mean losses -> the global mean's (divide by the ranks).

        One process gives a layer's whole expert tensor a gradient (zero rows for idle experts) when any of
        its experts ran; a rank whose experts all sat idle has none, so it takes zeros when another rank's
        ran (AdamW then steps every rank's slice, as it steps the whole tensor on one process)."""
        params = self.parameters()
        used = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
        dist.all_reduce(used, group=self.group.group)
        for p, anywhere in zip(params, used.tolist(), strict=True):
            if p.grad is None and anywhere > 0:
                p.grad = torch.zeros_like(p)
            elif p.grad is not None:
                p.grad.div_(self.group.size)

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """torch.nn.utils.clip_grad_norm_ over the whole (sharded) model: the 2-norm of every gradient, the
        experts' summed over ranks, and grads scaled by min(1, max_norm / (norm + 1e-6)) (torch's rule)."""
        experts = {id(p) for p in self.parameters()}
        shared = [p.grad for p in params if p.grad is not None and id(p) not in experts]
        mine = [p.grad for p in params if p.grad is not None and id(p) in experts]
        device = (shared or mine)[0].device
        zero = torch.zeros((), dtype=torch.float32, device=device)
        sq_mine = sum((torch.linalg.vector_norm(g.float()) ** 2 for g in mine), zero)
        dist.all_reduce(sq_mine, group=self.group.group)
        sq_shared = sum((torch.linalg.vector_norm(g.float()) ** 2 for g in shared), zero)
        total = torch.sqrt(sq_shared + sq_mine)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in shared + mine:
            g.mul_(coef.to(g.dtype))
        return float(total)
