"""`python -m moe_lab ...` is the `moe-lab` command; `torchrun --nproc-per-node N -m moe_lab pretrain ...` runs it
data-parallel (moe_lab.parallel)."""

from moe_lab.cli import app

app(prog_name="moe-lab")
