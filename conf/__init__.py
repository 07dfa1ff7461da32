"""Hydra configs, installed as the package data moe_lab.conf (pyproject maps it); see docs/configuration.md."""
