"""Transformer language and classification models with MoE layers every N blocks."""

from moe_lab.models.transformer import (
    ClassifierModel,
    LanguageModel,
    ModelLosses,
    Transformer,
    count_parameters,
    flops_per_token,
    moe_layers,
)

__all__ = [
    "ClassifierModel",
    "LanguageModel",
    "ModelLosses",
    "Transformer",
    "count_parameters",
    "flops_per_token",
    "moe_layers",
]
