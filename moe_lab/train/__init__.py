"""Training: the loop, pretraining, fine-tuning, checkpoints and what a run measures."""
