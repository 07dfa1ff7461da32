"""The shared MoE core: one layer, three dispatch backends with the same semantics."""

from moe_lab.moe.config import MoEConfig, expert_capacity
from moe_lab.moe.dispatch import BACKENDS
from moe_lab.moe.experts import Experts
from moe_lab.moe.layer import MoELayer, MoELosses
from moe_lab.moe.losses import load_balancing_loss, router_z_loss
from moe_lab.moe.router import Router, Routing, route_expert_choice, route_token_choice

__all__ = [
    "BACKENDS",
    "Experts",
    "MoEConfig",
    "MoELayer",
    "MoELosses",
    "Router",
    "Routing",
    "expert_capacity",
    "load_balancing_loss",
    "route_expert_choice",
    "route_token_choice",
    "router_z_loss",
]
