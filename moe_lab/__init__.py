"""moe-lab: sparse Mixture-of-Experts ablations (ST-MoE, StableMoE) at small scale."""

__version__ = "0.1.0"
