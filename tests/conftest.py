"""Shared test helpers."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from torch.utils._python_dispatch import TorchDispatchMode

# Without a CUDA device the Triton kernels run in Triton's interpreter, on CPU tensors. Set before anything
# imports moe_lab.moe.triton_kernels: Triton reads it when the kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moe_lab.moe import MoEConfig, MoELayer

# CI explores the same examples every run, so a red CI is reproducible; local runs keep exploring
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# ../shared beside the repository (what MOE_LAB_SHARED points at); its data/ holds the real corpora and tasks
SHARED = Path(__file__).resolve().parents[2] / "shared"
needs_shared = pytest.mark.skipif(
    not (SHARED / "data").is_dir(), reason=f"the shared data sets are not at {SHARED / 'data'}"
)

MOE_LAB = shutil.which("moe-lab", path=str(Path(sys.executable).parent)) or "moe-lab"


def run_cli(
    *args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run the installed `moe-lab` as a user would (W&B disabled unless env says otherwise), in `cwd` if given;
    a variable set to None in `env` is unset."""
    return subprocess.run([MOE_LAB, *args], capture_output=True, text=True, env=_cli_env(env), timeout=timeout, cwd=cwd)


def _cli_env(env: dict | None) -> dict:
    full_env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    return {k: v for k, v in full_env.items() if v is not None}


def signal_at_first_checkpoint(
    args: list[str] | tuple[str, ...], run_dir: Path, sig: int, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Start `moe-lab ARGS` as run_cli does, send it `sig` once RUN_DIR/checkpoint.pt exists (at most 120 s on),
    and wait for it to end: a run stopped mid-training, as kill -9, Ctrl-C or a scheduler stops it. Its output goes
    to files, not pipes, so a chatty run cannot block on a full pipe before its first checkpoint."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # a shell starts a background job (`make test &`) with SIGINT ignored, which the child would inherit: Ctrl-C
        # is the terminal's, so the child gets the default action back, as a foreground run of moe-lab has it
        proc = subprocess.Popen(
            [MOE_LAB, *args], env=_cli_env(env), stdout=out, stderr=err, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        deadline = time.time() + 120
        while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def run_backend(layer: MoELayer, backend: str, x: torch.Tensor, grad_out: torch.Tensor) -> dict:
    """Forward+backward a copy of `layer` under `backend`; return outputs, keep mask and gradients."""
    layer = copy.deepcopy(layer)
    layer.backend = backend
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    (y.float() * grad_out).sum().backward()

    def grad(p: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(p) if p.grad is None else p.grad

    return {
        "y": y.detach(),
        "keep": layer.last_keep_TK,
        "x_grad": x.grad,
        "router_grad": grad(layer.router.weight),
        "w_in_grad": grad(layer.experts.w_in_EDH),
        "w_out_grad": grad(layer.experts.w_out_EFD),
        "losses": layer.last_losses,
    }


def make_layer(dtype: torch.dtype = torch.float32, **overrides) -> MoELayer:
    """A small layer with test-friendly defaults."""
    values = {"d_model": 8, "d_ff": 16, "num_experts": 4, "top_k": 2, **overrides}
    return MoELayer(MoEConfig(**values)).to(dtype)


class HostReads:
    """Counts the reads of tensor values into Python (tolist, item, bool, int, float): on CUDA each is a sync.
    `ours` counts those that moe-lab's own code makes (torch's optimizers read their CPU step counters)."""

    NAMES = ("tolist", "item", "__bool__", "__int__", "__index__", "__float__")

    def __enter__(self) -> HostReads:
        self.count, self.ours, self.saved = 0, 0, {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def counting(original):
            def read(tensor, *args, **kwargs):
                self.count += 1
                caller = sys._getframe(1).f_code.co_filename
                self.ours += f"{os.sep}moe_lab{os.sep}" in caller
                return original(tensor, *args, **kwargs)

            return read

        for name, original in self.saved.items():
            setattr(torch.Tensor, name, counting(original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)


class DeviceSyncs(TorchDispatchMode):
    """Counts the ops that make the host wait for the device on CUDA: reads of a value (`.item()` and the
    like) and ops whose output size depends on the data (nonzero, boolean masks, unique, bincount, ...).
    On CPU nothing waits, but the same ops run, so this tells on CPU what would sync on CUDA. `tolist` is no
    aten op: HostReads counts it."""

    aten = torch.ops.aten
    SYNCING = frozenset({
        aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
        aten.masked_scatter.default, aten.bincount.default, aten.repeat_interleave.Tensor,
        aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default, aten.equal.default,
    })  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        boolean_index = func in (self.aten.index.Tensor, self.aten.index_put.default, self.aten.index_put_.default)
        boolean_index = boolean_index and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        )
        if func in self.SYNCING or boolean_index:
            self.ops.append(str(func))
        return func(*args, **kwargs)
