"""The MoE layer's configuration: one dataclass, validated on construction."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import MISSING, dataclass, field, fields
from importlib import import_module
from typing import Any

DROP_POLICIES = ("position", "priority")
CAPACITY_CONVENTIONS = ("gshard", "flaxformer")
ACTIVATIONS = ("relu", "gelu", "geglu", "swiglu")
AUX_LOSS_TYPES = ("topk", "top1")
STAGE1_EVAL_ROUTERS = ("distilled", "learned")
ROUTER_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass(frozen=True)
class RouterSpec:
    """One value of `MoEConfig.routing`: the router class that routes and what it asks of the other fields, known
    without importing torch. OLMo-core splits a router the same way (a config that names it, a module that routes):
    the commands that only compose and check a configuration (`--show-config`, `--dry-run`) never load the router
    classes. A new router is its class (a `moe_lab.moe.routers.Router` subclass), one `register_router(RouterSpec(
    ...))` and a `conf/moe/NAME.yaml` to train it by name."""

    name: str
    # the class, or "package.module:Class" to import when a layer is first built (the built-ins: no torch here)
    router: str | type
    top1: bool = False  # each token goes to one expert by the router's own rule: top_k must be 1, experts >= 2
    by_token_id: bool = False  # it looks at token ids, so the layer needs vocab_size (the model sets it)
    distinct_choices: bool = False  # a token's top_k choices are distinct experts: top_k <= num_experts
    needs_capacity: bool = False  # capacity sets how many experts a token gets: no dropless (None) factor

    def check(self, config: MoEConfig, prefix: str) -> None:
        """Raise ValueError naming the field of `config` this router cannot work with."""
        if self.top1 and config.top_k != 1:
            raise ValueError(f"{prefix}.routing={self.name!r} routes each token to one expert: top_k must be 1")
        if self.top1 and config.num_experts < 2:
            raise ValueError(f"{prefix}.routing={self.name!r} needs num_experts >= 2")
        if self.distinct_choices and config.top_k > config.num_experts:
            raise ValueError(f"{prefix}.top_k={config.top_k} exceeds num_experts={config.num_experts}")
        for name in ("train_capacity_factor", "eval_capacity_factor") if self.needs_capacity else ():
            if getattr(config, name) is None:
                raise ValueError(f"{prefix}.{name}=None (dropless) is undefined for {self.name} routing")

    @property
    def where(self) -> str:
        """'package.module:Class', the router class's address."""
        if isinstance(self.router, str):
            return self.router
        return f"{self.router.__module__}:{self.router.__qualname__}"

    def router_class(self) -> type:
        """The class that routes, imported on first use."""
        if isinstance(self.router, str):
            module, _, name = self.router.partition(":")
            return getattr(import_module(module), name)
        return self.router


# MoEConfig.routing -> its RouterSpec: the one list of routers (register_router adds to it)
ROUTINGS: dict[str, RouterSpec] = {}


def register_router(spec: RouterSpec) -> RouterSpec:
    """Make `spec.name` a valid `MoEConfig.routing`; a name already taken by another router is an error."""
    taken = ROUTINGS.get(spec.name)
    if taken is not None and taken != spec:
        raise ValueError(f"router name {spec.name!r} is taken by {taken.where}")
    ROUTINGS[spec.name] = spec
    return spec


for _spec in (
    # each token takes its top-k experts (k=1 Switch, k=2 GShard/ST-MoE)
    RouterSpec("token_choice", "moe_lab.moe.routers:TokenChoiceRouter", distinct_choices=True),
    # each expert takes its top-C tokens (Zhou et al. 2022)
    RouterSpec("expert_choice", "moe_lab.moe.routers:ExpertChoiceRouter", needs_capacity=True),
    # a fixed seeded hash of the token id (Roller et al. 2021)
    RouterSpec("hash", "moe_lab.moe.routers:HashRouter", top1=True, by_token_id=True),
    # a balanced assignment in training, greedy at inference (Lewis et al. 2021)
    RouterSpec("base", "moe_lab.moe.routers:BaseRouter", top1=True),
    # two stages, then a frozen router of token ids (Dai et al. 2022)
    RouterSpec("stablemoe", "moe_lab.moe.routers:StableMoERouter", top1=True, by_token_id=True),
):
    register_router(_spec)

# the values of `backend`: moe_lab.moe.dispatch defines `dispatch_NAME` for each, and "auto" picks one per device
BACKENDS = ("sorted", "grouped_mm", "triton", "einsum", "loop")
BACKEND_NAMES = (*BACKENDS, "auto")


@dataclass(frozen=True)
class Bounds:
    """The values a numeric or choice field accepts. It lives in the field's metadata, so validation, error
    messages and the tests that draw bad values all read one declaration."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: Collection[str] | None = None
    inf_ok: bool = False  # +inf is accepted (a limit that never triggers)
    none: str = ""  # what null means, when the field accepts it: "dropless", "off"

    def describe(self) -> str:
        """'in [0, 1)', '>= 1', 'one of [...]', with what null means."""
        if self.choices is not None:
            text = f"one of {list(self.choices)}"
        elif self.lt is not None or self.le is not None:
            lo = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else "(-inf"
            hi = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})"
            text = f"in {lo}, {hi}"
        elif self.ge is not None:
            text = f">= {self.ge:g}"
        elif self.gt is not None:
            text = f"> {self.gt:g}"
        else:
            text = "a finite number"
        return f"{text} or null ({self.none})" if self.none else text

    def accepts(self, value: Any) -> bool:
        """Whether one value (an element, for list fields) is allowed."""
        if value is None:
            return bool(self.none)
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if math.isnan(value) or (math.isinf(value) and not (self.inf_ok and value > 0)):
            return False
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )


def bounded(default: Any = MISSING, *, factory: Any = MISSING, **bounds: Any) -> Any:
    """A dataclass field with its accepted values: `d_model: int = bounded(128, ge=1)`."""
    meta = {"bounds": Bounds(**bounds)}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def field_bounds(cls: type) -> dict[str, Bounds]:
    """Each bounded field of a dataclass and what it accepts."""
    return {f.name: f.metadata["bounds"] for f in fields(cls) if "bounds" in f.metadata}


def check_fields(obj: Any, prefix: str) -> None:
    """Raise ValueError naming the first field of `obj` outside its bounds (every float must also be finite)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}.{f.name}" if prefix else f.name
        bounds = f.metadata.get("bounds")
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if bounds is not None and not bounds.accepts(v):
                if bounds.choices is not None:
                    check_choice(name, v, bounds.choices)
                raise ValueError(f"{name} must be {bounds.describe()}, got {value!r}")
            if bounds is None and isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass
class MoEConfig:
    """Everything that defines one MoE layer. Defaults follow ST-MoE (Zoph et al. 2022) where it says."""

    d_model: int = bounded(256, ge=1)
    d_ff: int = bounded(1024, ge=1)
    num_experts: int = bounded(8, ge=1)
    top_k: int = bounded(2, ge=1)
    # "token_choice": each token picks its top-k experts (k=1 Switch, k=2 GShard/ST-MoE).
    # "expert_choice": each expert picks its top-C tokens (Zhou et al. 2022); top_k is then the
    # average number of experts per token and only enters through the capacity.
    # "hash": a fixed seeded hash of the token id picks the expert (Roller et al. 2021), no learned router.
    # "base": a balanced assignment maximising token-expert affinity in training, greedy top-1 at inference
    # (Lewis et al. 2021). "stablemoe": StableMoE's two-stage router (Dai et al. 2022). These three are top-1.
    routing: str = bounded("token_choice", choices=ROUTINGS)
    # Divide the gates of a token's chosen experts by their sum (GShard, Mixtral). ST-MoE and Switch
    # use the raw router probabilities; with k=1 renormalising makes every gate 1 and cuts the router
    # off from the task loss.
    renormalize_gates: bool = False
    # capacity = ceil(capacity_factor * top_k * tokens_per_group / num_experts); None = dropless.
    # That is the "gshard" convention (GShard Alg. 1, DeepSpeed, Tutel). "flaxformer" (flaxformer and Mesh
    # TensorFlow, the code of ST-MoE's tables) counts round(capacity_factor * tokens_per_group / num_experts),
    # at least 4, with no factor top_k: at top-2, gshard CF 1.25 holds the slots of flaxformer CF 2.5.
    # ST-MoE trains at 1.25 and evaluates at 2.0 (Sec. 4, Table 8). Under expert choice the capacity
    # sets how many experts a token gets, so an eval factor above the train one changes the function.
    train_capacity_factor: float | None = bounded(1.25, gt=0, none="dropless")
    eval_capacity_factor: float | None = bounded(2.0, gt=0, none="dropless")
    capacity_convention: str = bounded("gshard", choices=CAPACITY_CONVENTIONS)
    # Who wins a full expert: "position" (earlier tokens in the group) or "priority" (Batch Prioritized
    # Routing, Riquelme et al. 2021: higher top-1 router probability first). Under both, every token's
    # first choice claims capacity before any second choice (GShard, Mesh TensorFlow).
    drop_policy: str = bounded("position", choices=DROP_POLICIES)
    # Tokens per routing group; capacity is counted per group. None: all tokens of a forward are one group.
    group_size: int | None = bounded(None, ge=1, none="one group per forward")
    # Multiplicative jitter on the router input, U(1-eps, 1+eps), training only (Switch Sec. 2.4).
    jitter_eps: float = bounded(0.0, ge=0, lt=1)
    # Dtype of the router matmul and softmax ("selective precision", Switch Sec. 2.4): float32 whatever
    # the model's dtype; bfloat16 reproduces the unstable variant.
    router_dtype: str = bounded("float32", choices=ROUTER_DTYPES)
    router_bias: bool = False
    # Switch's router init: truncated normal, std sqrt(scale / fan_in) with scale 0.1 (Switch Sec. 2.4).
    router_init_scale: float = bounded(0.1, gt=0)
    aux_loss_coef: float = bounded(1e-2, ge=0)
    z_loss_coef: float = bounded(1e-3, ge=0)
    # How f_i in the load-balancing loss E * sum_i f_i P_i counts tokens (see moe_lab.moe.losses).
    aux_loss_type: str = bounded("topk", choices=AUX_LOSS_TYPES)
    # Count f_i after capacity dropping (kept assignments) instead of before (all router choices).
    aux_loss_after_capacity: bool = False
    activation: str = bounded("geglu", choices=ACTIVATIONS)
    # Dropout on the experts' hidden activations, separate from the model's dropout (ST-MoE Sec. 4.3).
    expert_dropout: float = bounded(0.0, ge=0, lt=1)
    # auto: grouped_mm on CUDA (when torch._grouped_mm takes the shapes), sorted elsewhere
    backend: str = bounded("sorted", choices=BACKEND_NAMES)
    # Vocabulary size: hash routing and StableMoE's distilled router look at token ids. The model sets it.
    vocab_size: int | None = bounded(None, ge=1, none="set by the model")
    hash_seed: int = bounded(0, ge=0)
    # BASE's auction stops when the assignment is within base_tolerance * (max - min affinity) of the optimum
    # in total affinity per token; see moe_lab.moe.balanced.
    base_tolerance: float = bounded(1e-3, gt=0, lt=1)
    # StableMoE: the distilled router's embedding width (the paper: 50) and the weight of its distillation
    # loss (0.3); the balance loss uses aux_loss_coef (the paper's alpha = 0.3). Stage 1 lasts this fraction
    # of training (the paper: 10%); then the distilled router is frozen and routes alone. 1.0 = stage 1 only.
    distill_dim: int = bounded(50, ge=1)
    distill_loss_coef: float = bounded(0.3, ge=0)
    stage1_fraction: float = bounded(0.1, ge=0, le=1)
    # Which router decides at evaluation during stage 1: "distilled" (the StableMoE fork's fairseq code routes
    # every evaluation by the light router, in both stages) or "learned" (the main router, as in training).
    # It changes stage-1 validation and the fluctuation probe; stage 2 always routes by the distilled router.
    stage1_eval_router: str = bounded("distilled", choices=STAGE1_EVAL_ROUTERS)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "MoEConfig") -> None:
        """Raise ValueError naming the bad field and what would be accepted."""
        check_fields(self, prefix)
        # what a router needs of the other fields (the top-1 routers: top_k 1) its spec says
        ROUTINGS[self.routing].check(self, prefix)

    @classmethod
    def from_dict(cls, values: dict) -> MoEConfig:
        """Build from a mapping, naming the valid keys if one is unknown."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"unknown MoEConfig key(s) {unknown}; valid keys: {sorted(valid)}")
        return cls(**values)


def check_choice(name: str, value: str, allowed: Collection[str]) -> None:
    """Raise ValueError naming the field, its value and the accepted values."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")
