"""The shared MoE core: one layer, three dispatch backends with the same semantics."""

from moe_lab.moe.balanced import balanced_assignment
from moe_lab.moe.config import MoEConfig, expert_capacity
from moe_lab.moe.dispatch import BACKENDS
from moe_lab.moe.experts import Experts
from moe_lab.moe.layer import MoELayer, MoELosses
from moe_lab.moe.losses import load_balancing_loss, router_z_loss
from moe_lab.moe.router import Router, Routing, hash_table, route_assigned, route_expert_choice, route_token_choice
from moe_lab.moe.stablemoe import DistilledRouter, stablemoe_balance_loss

__all__ = [
    "BACKENDS",
    "DistilledRouter",
    "Experts",
    "MoEConfig",
    "MoELayer",
    "MoELosses",
    "Router",
    "Routing",
    "balanced_assignment",
    "expert_capacity",
    "hash_table",
    "load_balancing_loss",
    "route_assigned",
    "route_expert_choice",
    "route_token_choice",
    "router_z_loss",
    "stablemoe_balance_loss",
]
