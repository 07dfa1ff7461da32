"""Processes that end with their parent. `moe-lab pretrain --nproc N` runs torchrun, whose workers start sessions of
their own: killing the launcher's process group (kill -9, a scheduler's cancel) would leave them training.

Linux only (prctl(2) PR_SET_PDEATHSIG, <linux/prctl.h>); elsewhere these are no-ops. The signal is SIGTERM, which a
run handles like Ctrl-C: it records itself as failed and stays resumable; a worker then exits at once, without
waiting on its peers (moe_lab.cli)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send `sig` to this process when the thread that started it ends (a no-op off Linux)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def child_dies_with_us(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` for subprocess: the child gets `sig` when this process ends, also if it ended before the
    child could ask (between fork and prctl)."""
    parent = os.getpid()

    def preexec() -> None:
        die_with_parent(sig)
        if sys.platform.startswith("linux") and os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


# `moe-lab ... --nproc N` names itself to torchrun's workers: they check that their torchrun is still its child
LAUNCHER_ENV = "MOE_LAB_LAUNCHER_PID"


def under_torchrun() -> bool:
    """Whether this process is a worker that torchrun (torch.distributed.run) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def die_with_torchrun(sig: int = signal.SIGTERM) -> None:
    """A torchrun worker: end with the torchrun that started it. Started by `--nproc`, it also ends now if that
    torchrun or its launcher already ended (between the worker's start and this call)."""
    die_with_parent(sig)
    launcher = os.environ.get(LAUNCHER_ENV)
    if launcher and sys.platform.startswith("linux") and _parent_of(os.getppid()) != int(launcher):
        os.kill(os.getpid(), sig)


def _parent_of(pid: int) -> int | None:
    """The parent of process `pid` (from /proc/PID/stat, proc(5)), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm)": state, then ppid
