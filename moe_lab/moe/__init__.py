"""The shared MoE core: one layer, the router classes, one keep rule for capacity, and dispatch backends.

- `config`: `MoEConfig`, and `ROUTINGS`, the registry of `RouterSpec`s that `MoEConfig.routing` selects from (what
  each router asks of the configuration and where its class lives; `register_router` adds one).
- `routers`: the router base class and one subclass per routing strategy (scores, losses, metrics, post-step hook).
- `routing`: the routing decision: claim order, capacity, and which slots capacity keeps.
- `dispatch`: the backends that move the kept slots' tokens through the experts (`BACKENDS`).
- `layer`: `MoELayer`, which strings them together.

Names are imported on first use (PEP 562 module `__getattr__`): `moe_lab.config` imports `moe_lab.moe.config`,
which runs this file, and the commands that train nothing (`--help`, `--dry-run`, `--show-config`) should not pay
for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moe_lab.moe.balanced import balanced_assignment
    from moe_lab.moe.config import ROUTINGS, MoEConfig, RouterSpec, register_router
    from moe_lab.moe.dispatch import BACKENDS
    from moe_lab.moe.experts import Experts
    from moe_lab.moe.layer import MoELayer, MoELosses
    from moe_lab.moe.losses import load_balancing_loss, router_z_loss
    from moe_lab.moe.routers import LearnedRouter, Router, hash_table
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

# each public name -> the module that defines it
_MODULES = {
    "BACKENDS": "dispatch",
    "DistilledRouter": "stablemoe",
    "Experts": "experts",
    "KeptSlots": "routing",
    "LearnedRouter": "routers",
    "MoEConfig": "config",
    "MoELayer": "layer",
    "MoELosses": "layer",
    "ROUTINGS": "config",
    "RouterSpec": "config",
    "register_router": "config",
    "Router": "routers",
    "Routing": "routing",
    "balanced_assignment": "balanced",
    "expert_capacity": "routing",
    "hash_table": "routers",
    "keep_slots": "routing",
    "load_balancing_loss": "losses",
    "route_assigned": "routing",
    "route_expert_choice": "routing",
    "route_token_choice": "routing",
    "router_z_loss": "losses",
    "stablemoe_balance_loss": "stablemoe",
}


def __getattr__(name: str) -> Any:
    """Import a public name's module when the name is first asked for."""
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULES])


__all__ = [
    "BACKENDS",
    "ROUTINGS",
    "DistilledRouter",
    "Experts",
    "KeptSlots",
    "LearnedRouter",
    "MoEConfig",
    "MoELayer",
    "MoELosses",
    "Router",
    "RouterSpec",
    "Routing",
    "balanced_assignment",
    "expert_capacity",
    "hash_table",
    "keep_slots",
    "load_balancing_loss",
    "register_router",
    "route_assigned",
    "route_expert_choice",
    "route_token_choice",
    "router_z_loss",
    "stablemoe_balance_loss",
]
