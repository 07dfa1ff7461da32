"""Ablation studies: Hydra multiruns defined in experiments/NAME.yaml, resumable, summarised in runs.csv."""
