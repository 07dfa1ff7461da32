"""The shared MoE core: one layer, the router classes, one keep rule for capacity, and dispatch backends.

- `routers`: the router base class and one subclass per routing strategy (scores, losses, metrics, post-step hook);
  the registry `ROUTERS` that `MoEConfig.routing` selects from.
- `routing`: the routing decision: claim order, capacity, and which slots capacity keeps.
- `dispatch`: the backends that move the kept slots' tokens through the experts (`BACKENDS`).
- `layer`: `MoELayer`, which strings them together.
"""

from moe_lab.moe.balanced import balanced_assignment
from moe_lab.moe.config import MoEConfig
from moe_lab.moe.dispatch import BACKENDS
from moe_lab.moe.experts import Experts
from moe_lab.moe.layer import MoELayer, MoELosses
from moe_lab.moe.losses import load_balancing_loss, router_z_loss
from moe_lab.moe.routers import ROUTERS, LearnedRouter, Router, hash_table
from moe_lab.moe.routing import (
    KeptSlots,
    Routing,
    expert_capacity,
    keep_slots,
    route_assigned,
    route_expert_choice,
    route_token_choice,
)
from moe_lab.moe.stablemoe import DistilledRouter, stablemoe_balance_loss

__all__ = [
    "BACKENDS",
    "ROUTERS",
    "DistilledRouter",
    "Experts",
    "KeptSlots",
    "LearnedRouter",
    "MoEConfig",
    "MoELayer",
    "MoELosses",
    "Router",
    "Routing",
    "balanced_assignment",
    "expert_capacity",
    "hash_table",
    "keep_slots",
    "load_balancing_loss",
    "route_assigned",
    "route_expert_choice",
    "route_token_choice",
    "router_z_loss",
    "stablemoe_balance_loss",
]
