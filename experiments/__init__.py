"""Study files (moe-lab sweep NAME), installed as the package data moe_lab.experiments (pyproject maps it)."""
