"""Which parameters fine-tuning updates (ST-MoE Sec. 4.2, Fig. 5): presets over parameter kinds."""

from __future__ import annotations

from torch import nn

from moe_lab.models.transformer import DenseFFN, moe_layers

KINDS = ("embedding", "attention", "norm", "dense_ffn", "experts", "router", "head")
# ST-MoE Fig. 5: all, non-MoE, MoE-only, attention-only, FFN-only (the dense FFNs). The classification
# head is new, so it always trains.
PRESETS: dict[str, frozenset[str]] = {
    "all": frozenset(KINDS),
    "non_moe": frozenset(KINDS) - {"experts", "router"},
    "moe": frozenset({"experts", "router", "head"}),
    "attention": frozenset({"attention", "head"}),
    "ffn": frozenset({"dense_ffn", "head"}),
}


def parameter_kinds(model: nn.Module) -> dict[str, str]:
    """The kind of every named parameter."""
    kinds: dict[str, str] = {}
    moe_prefixes = [name for name, _ in moe_layers(model)]
    dense_prefixes = [name for name, m in model.named_modules() if isinstance(m, DenseFFN)]
    for name, _ in model.named_parameters():
        if any(name.startswith(p + ".router.") for p in moe_prefixes):
            kinds[name] = "router"
        elif any(name.startswith(p + ".experts.") for p in moe_prefixes):
            kinds[name] = "experts"
        elif any(name.startswith(p + ".") for p in dense_prefixes):
            kinds[name] = "dense_ffn"
        elif ".attn." in name:
            kinds[name] = "attention"
        elif name.startswith("head."):
            kinds[name] = "head"
        elif "norm" in name.rsplit(".", 2)[-2]:
            kinds[name] = "norm"
        elif name.startswith("transformer.embed.") or name.startswith("transformer.pos."):
            kinds[name] = "embedding"
        else:
            raise ValueError(f"parameter {name!r} has no kind; the freeze presets cannot place it")
    return kinds


def apply_freeze(model: nn.Module, preset: str, freeze_router: bool = False) -> dict[str, int]:
    """Set requires_grad by preset (and freeze routers if asked); return trainable/total parameter counts."""
    if preset not in PRESETS:
        raise ValueError(f"freeze preset {preset!r} is not one of {list(PRESETS)}")
    trainable = set(PRESETS[preset]) - ({"router"} if freeze_router else set())
    kinds = parameter_kinds(model)
    counts = {"trainable": 0, "total": 0}
    for name, p in model.named_parameters():
        p.requires_grad_(kinds[name] in trainable)
        counts["total"] += p.numel()
        counts["trainable"] += p.numel() if p.requires_grad else 0
    return counts
