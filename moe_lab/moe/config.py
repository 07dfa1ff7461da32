"""The MoE layer's configuration: one dataclass, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

ROUTINGS = ("token_choice", "expert_choice", "hash", "base", "stablemoe")
# routings that send every token to exactly one expert by a rule of their own (top_k must be 1)
TOP1_ROUTINGS = ("hash", "base", "stablemoe")
DROP_POLICIES = ("position", "priority")
ACTIVATIONS = ("relu", "gelu", "geglu", "swiglu")
BACKENDS = ("sorted", "einsum", "loop")
AUX_LOSS_TYPES = ("topk", "top1")
ROUTER_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass
class MoEConfig:
    """Everything that defines one MoE layer. Defaults follow ST-MoE (Zoph et al. 2022) where it says."""

    d_model: int = 256
    d_ff: int = 1024
    num_experts: int = 8
    top_k: int = 2
    # "token_choice": each token picks its top-k experts (k=1 Switch, k=2 GShard/ST-MoE).
    # "expert_choice": each expert picks its top-C tokens (Zhou et al. 2022); top_k is then the
    # average number of experts per token and only enters through the capacity.
    # "hash": a fixed seeded hash of the token id picks the expert (Roller et al. 2021), no learned router.
    # "base": a balanced assignment maximising token-expert affinity in training, greedy top-1 at inference
    # (Lewis et al. 2021). "stablemoe": StableMoE's two-stage router (Dai et al. 2022). These three are top-1.
    routing: str = "token_choice"
    # Divide the gates of a token's chosen experts by their sum (GShard, Mixtral). ST-MoE and Switch
    # use the raw router probabilities; with k=1 renormalising makes every gate 1 and cuts the router
    # off from the task loss.
    renormalize_gates: bool = False
    # capacity = ceil(capacity_factor * top_k * tokens_per_group / num_experts); None = dropless.
    # ST-MoE trains at 1.25 and evaluates at 2.0 (Sec. 4, Table 8). Under expert choice the capacity
    # sets how many experts a token gets, so an eval factor above the train one changes the function.
    train_capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = 2.0
    # Who wins a full expert: "position" (earlier tokens in the group) or "priority" (Batch Prioritized
    # Routing, Riquelme et al. 2021: higher top-1 router probability first). Under both, every token's
    # first choice claims capacity before any second choice (GShard, Mesh TensorFlow).
    drop_policy: str = "position"
    # Tokens per routing group; capacity is counted per group. None: all tokens of a forward are one group.
    group_size: int | None = None
    # Multiplicative jitter on the router input, U(1-eps, 1+eps), training only (Switch Sec. 2.4).
    jitter_eps: float = 0.0
    # Dtype of the router matmul and softmax ("selective precision", Switch Sec. 2.4): float32 whatever
    # the model's dtype; bfloat16 reproduces the unstable variant.
    router_dtype: str = "float32"
    router_bias: bool = False
    # Switch's router init: truncated normal, std sqrt(scale / fan_in) with scale 0.1 (Switch Sec. 2.4).
    router_init_scale: float = 0.1
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    # How f_i in the load-balancing loss E * sum_i f_i P_i counts tokens (see moe_lab.moe.losses).
    aux_loss_type: str = "topk"
    # Count f_i after capacity dropping (kept assignments) instead of before (all router choices).
    aux_loss_after_capacity: bool = False
    activation: str = "geglu"
    # Dropout on the experts' hidden activations, separate from the model's dropout (ST-MoE Sec. 4.3).
    expert_dropout: float = 0.0
    backend: str = "sorted"
    # Vocabulary size: hash routing and StableMoE's distilled router look at token ids. The model sets it.
    vocab_size: int | None = None
    hash_seed: int = 0
    # BASE's auction stops when the assignment is within base_tolerance * (max - min affinity) of the optimum
    # in total affinity per token; see moe_lab.moe.balanced.
    base_tolerance: float = 1e-3
    # StableMoE: the distilled router's embedding width (the paper: 50) and the weight of its distillation
    # loss (0.3); the balance loss uses aux_loss_coef (the paper's alpha = 0.3). Stage 1 lasts this fraction
    # of training (the paper: 10%); then the distilled router is frozen and routes alone. 1.0 = stage 1 only.
    distill_dim: int = 50
    distill_loss_coef: float = 0.3
    stage1_fraction: float = 0.1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field and what would be accepted."""
        check_choice("MoEConfig.routing", self.routing, ROUTINGS)
        check_choice("MoEConfig.drop_policy", self.drop_policy, DROP_POLICIES)
        check_choice("MoEConfig.activation", self.activation, ACTIVATIONS)
        check_choice("MoEConfig.backend", self.backend, BACKENDS)
        check_choice("MoEConfig.aux_loss_type", self.aux_loss_type, AUX_LOSS_TYPES)
        check_choice("MoEConfig.router_dtype", self.router_dtype, ROUTER_DTYPES)
        for name in ("d_model", "d_ff", "num_experts", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.routing in TOP1_ROUTINGS and self.top_k != 1:
            raise ValueError(f"MoEConfig.routing={self.routing!r} routes each token to one expert: top_k must be 1")
        if self.routing in TOP1_ROUTINGS and self.num_experts < 2:
            raise ValueError(f"MoEConfig.routing={self.routing!r} needs num_experts >= 2")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"MoEConfig.vocab_size must be >= 1 or None, got {self.vocab_size}")
        if not 0.0 < self.base_tolerance < 1.0:
            raise ValueError(f"MoEConfig.base_tolerance must be in (0, 1), got {self.base_tolerance}")
        if not 0.0 <= self.stage1_fraction <= 1.0:
            raise ValueError(f"MoEConfig.stage1_fraction must be in [0, 1], got {self.stage1_fraction}")
        if self.distill_dim < 1:
            raise ValueError(f"MoEConfig.distill_dim must be >= 1, got {self.distill_dim}")
        if self.routing == "token_choice" and self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        for name in ("train_capacity_factor", "eval_capacity_factor"):
            cf = getattr(self, name)
            if cf is not None and not cf > 0:
                raise ValueError(f"MoEConfig.{name} must be > 0 or None (dropless), got {cf}")
            if cf is None and self.routing == "expert_choice":
                raise ValueError(f"MoEConfig.{name}=None (dropless) is undefined for expert_choice routing")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"MoEConfig.group_size must be >= 1 or None, got {self.group_size}")
        if not 0.0 <= self.jitter_eps < 1.0:
            raise ValueError(f"MoEConfig.jitter_eps must be in [0, 1), got {self.jitter_eps}")
        if not 0.0 <= self.expert_dropout < 1.0:
            raise ValueError(f"MoEConfig.expert_dropout must be in [0, 1), got {self.expert_dropout}")

    @classmethod
    def from_dict(cls, values: dict) -> MoEConfig:
        """Build from a mapping, naming the valid keys if one is unknown."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"unknown MoEConfig key(s) {unknown}; valid keys: {sorted(valid)}")
        return cls(**values)


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise ValueError naming the field, its value and the accepted values."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float | None) -> int | None:
    """Slots per expert in a group of num_tokens: ceil(cf * k * tokens / E) (GShard Alg. 1, Switch Eq. 3)."""
    if capacity_factor is None:
        return None
    # the small epsilon keeps float noise (1.1 * 100 = 110.00000000000001) from adding a slot
    return max(1, math.ceil(capacity_factor * top_k * num_tokens / num_experts - 1e-9))
