"""The moe-lab command line: thin commands that compose a configuration and call one function."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moe_lab.bench.cli import app as bench_app

# `datasets` draws a progress bar for every local file it reads: noise on stderr, where errors go. A user who
# wants them sets the variable to 0.
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

app = typer.Typer(
    help="moe-lab: reproduce the ST-MoE and StableMoE ablations at small scale.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(bench_app, name="bench")
console = Console()
# errors go to stderr on one line whatever the terminal's width (a wrapped message is hard to grep or parse)
err_console = Console(stderr=True, soft_wrap=True, highlight=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: MESSAGE` as one line on stderr and exit with `code` (2: bad input; 1: a run failed)."""
    line = "; ".join(part.strip() for part in str(message).splitlines() if part.strip())
    err_console.print(f"[red]error:[/red] {escape(line)}")
    raise typer.Exit(code=code)


def fail_on(err: BaseException) -> NoReturn:
    """`fail` for a caught error: exit 1 for a write error of the machine (a full disk, naming the file), else 2
    (bad input)."""
    from moe_lab.io import storage_error

    machine = storage_error(err)
    if machine is not None:
        fail(f"{machine}; free space (or raise the limit) and run the command again", code=1)
    fail(str(err))


INTERRUPTED = 130  # the shell's code for Ctrl-C
TERMINATED = 143  # 128 + SIGTERM: what a scheduler (SLURM, Kubernetes, systemd) sends to stop a job
RESUME = "the same command with resume=true continues from the last checkpoint"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt: a run records itself as failed and stays resumable."""


def _raise_terminated(signum: int, frame: object) -> NoReturn:
    raise Terminated("SIGTERM")


def _terminated() -> NoReturn:
    """Exit 143 saying so once: a torchrun worker leaves the line to its `--nproc` launcher, or to rank 0."""
    from moe_lab.orphans import LAUNCHER_ENV, under_torchrun

    if not under_torchrun():
        fail(f"terminated (SIGTERM); {RESUME}", TERMINATED)
    if LAUNCHER_ENV not in os.environ and os.environ.get("RANK", "0") == "0":
        err_console.print(f"[red]error:[/red] terminated (SIGTERM); {RESUME}")
    # the run is recorded; leaving the process group would wait for a peer that may be blocked in a collective
    # with this rank (gloo waits 30 minutes), so end here: the peers' collectives then fail at once
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(TERMINATED)


def handle_sigterm() -> None:
    """From now on SIGTERM raises Terminated in the main thread, as Ctrl-C raises KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGTERM, _raise_terminated)


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a bad input raises: a config, a file, a run directory holding another run, an unreachable hub."""
    from moe_lab.hub import HubUnavailableError

    return (ValueError, OSError, HubUnavailableError)


OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}


def _compose(kind: str, name: str, overrides: list[str]):
    """Compose a pretraining preset or a fine-tuning task; a config error prints one line and exits 2."""
    from moe_lab.config import ConfigError, compose, compose_finetune

    try:
        return (compose if kind == "pretrain" else compose_finetune)(name, overrides)
    except ConfigError as err:
        fail(f"config: {err}")


RERUN = typer.Option("--rerun", help="move the run already in run_dir aside (never deleted) and start again")
WAIT = typer.Option("--wait", help="wait for another process training this run_dir instead of stopping")
NPROC = typer.Option(
    "--nproc",
    min=1,
    help="processes on this machine (data parallel; with parallel.expert=N, experts spread over them): "
    "relaunches itself under torchrun (gloo on CPU)",
)


@app.command(context_settings=OVERRIDES)
def pretrain(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="preset in conf/preset: tiny, small, dense-small")] = "small",
    show_config: Annotated[bool, typer.Option("--show-config", help="print the composed config and exit")] = False,
    rerun: Annotated[bool, RERUN] = False,
    wait: Annotated[bool, WAIT] = False,
    nproc: Annotated[int, NPROC] = 1,
) -> None:
    """Pretrain a language model: `moe-lab pretrain small [key=value ...]` (Hydra override syntax)."""
    _compose_and_run("pretrain", name, list(ctx.args), show_config, rerun, wait, nproc)


def _torchrun(kind: str, name: str, overrides: list[str], rerun: bool, wait: bool, nproc: int) -> None:
    """`moe-lab KIND NAME ... --nproc N` is `torchrun --standalone --nproc-per-node N -m moe_lab KIND NAME ...`."""
    import subprocess

    from moe_lab.orphans import LAUNCHER_ENV, child_dies_with_us

    flags = [*(["--rerun"] if rerun else []), *(["--wait"] if wait else [])]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    # torchrun ends with this process, and its workers with it (moe_lab.orphans), however this process ends
    env = {**os.environ, LAUNCHER_ENV: str(os.getpid())}
    command = [*launch, "-m", "moe_lab", kind, name, *flags, *overrides]
    code = subprocess.run(command, env=env, preexec_fn=child_dies_with_us()).returncode
    if code:
        raise typer.Exit(code=code)


def _compose_and_run(
    kind: str, name: str, overrides: list[str], show_config: bool, rerun: bool, wait: bool, nproc: int = 1
) -> None:
    """Compose, then print the config or run. Exit 0: completed or diverged; 1: the run failed while training, or
    the machine refused a write (a full disk; the line names the file); 2: bad input (one line naming the key, file
    or directory); 130: interrupted; 143: terminated (SIGTERM)."""
    from omegaconf import OmegaConf

    from moe_lab.orphans import die_with_torchrun, under_torchrun

    if under_torchrun():  # a worker: torchrun started it in a session of its own, so end it with torchrun
        die_with_torchrun()
    cfg = _compose(kind, name, overrides)  # a bad config fails here, before any process starts
    if show_config:
        console.print(OmegaConf.to_yaml(cfg, resolve=True))
        return
    from moe_lab.train.expert_state import check_expert_parallel

    try:  # under torchrun the ranks are WORLD_SIZE; --nproc launches that many
        check_expert_parallel(
            cfg.parallel.expert, nproc if nproc > 1 else int(os.environ.get("WORLD_SIZE", "1")), cfg.optim
        )
    except ValueError as err:
        fail(str(err))
    handle_sigterm()
    if nproc > 1:
        if cfg.train.batch_size % nproc:
            fail(f"--nproc {nproc}: train.batch_size={cfg.train.batch_size} must be a multiple of it")
        try:  # torchrun and its workers end with this process (moe_lab.orphans); rank 0 records the run
            _torchrun(kind, name, overrides, rerun, wait, nproc)
        except Terminated:
            _terminated()
        return
    if kind == "pretrain":
        from moe_lab.train.pretrain import run_pretrain as runner
    else:
        from moe_lab.train.finetune import run_finetune as runner
    from moe_lab.train.lifecycle import RunFailedError

    try:
        summary = runner(cfg, overrides, console, rerun=rerun, wait=wait)
    except RunFailedError as err:
        fail(str(err), code=1)
    except _user_errors() as err:
        fail_on(err)
    except Terminated:
        _terminated()
    except KeyboardInterrupt:
        fail(f"interrupted; {RESUME}", INTERRUPTED)
    finally:
        from moe_lab.parallel import leave

        leave()
    from moe_lab.paths import FINISHED

    if summary["status"] not in FINISHED:
        raise typer.Exit(code=1)


@app.command(context_settings=OVERRIDES)
def finetune(
    ctx: typer.Context,
    task: Annotated[str, typer.Argument(help="task in conf/task: polarity-small, polarity-large, cb, sst2, ...")],
    show_config: Annotated[bool, typer.Option("--show-config", help="print the composed config and exit")] = False,
    rerun: Annotated[bool, RERUN] = False,
    wait: Annotated[bool, WAIT] = False,
    nproc: Annotated[int, NPROC] = 1,
) -> None:
    """Fine-tune a pretrained model: `moe-lab finetune cb checkpoint=RUN_DIR [finetune.freeze=non_moe ...]`."""
    _compose_and_run("finetune", task, list(ctx.args), show_config, rerun, wait, nproc)


@app.command(context_settings=OVERRIDES)
def sweep(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="a study in experiments/ (e.g. top-k, capacity-factor, freeze)")],
    launcher: Annotated[
        str,
        typer.Option(
            help="Hydra launcher: basic (one after another), joblib (processes here), submitit_local (submitit "
            "jobs here) or submitit_slurm (a SLURM job array; set hydra.launcher.partition=... etc.)"
        ),
    ] = "basic",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="check every grid point's config, print the grid, exit")
    ] = False,
    rerun: Annotated[
        bool,
        typer.Option(
            "--rerun",
            help="move this grid's runs already on disk aside (never deleted) and run them again; the shared "
            "pretraining of a fine-tuning study only if its config differs",
        ),
    ] = False,
) -> None:
    """Run an ablation study as a Hydra multirun; finished runs are skipped, so a killed sweep resumes.

    Exit 0: every point completed or diverged; 1: a point failed (runs.csv is written first); 2: bad input."""
    from moe_lab.sweeps.plan import SweepError
    from moe_lab.sweeps.runner import run_study
    from moe_lab.sweeps.study import check_points, grid, load_study, swept_keys

    overrides = list(ctx.args)
    try:
        study = load_study(name)
        points = grid(study, overrides)
        if not dry_run:  # a bad point fails before the table; the dry run's plan checks every point itself
            check_points(study, points)
    except ValueError as err:
        fail(str(err))
    states, plan, warnings = [""] * len(points), [], []
    if dry_run:  # what the sweep would do with what is on disk
        from moe_lab.paths import results_root
        from moe_lab.sweeps.plan import base_warnings, plan_study, point_state, pretraining_plan

        try:
            pretrainings, checks = plan_study(study, overrides, results_root())
        except _user_errors() as err:
            fail_on(err)
        states, plan = [point_state(c) for c in checks], pretraining_plan(pretrainings, checks)
        warnings = base_warnings(pretrainings, checks)
    keys = swept_keys(points) or [p.split("=")[0] for p in points[0]]
    table = Table(title=f"{study.name}: {study.paper} ({len(points)} runs, moe-lab {study.command})")
    table.add_column("#", justify="right")
    for key in keys:
        table.add_column(key)
    if dry_run:
        table.add_column("on disk")
    for i, point in enumerate(points):
        values = dict(item.split("=", 1) for item in point)
        table.add_row(str(i), *(values.get(k, "") for k in keys), *([states[i]] if dry_run else []))
    console.print(table)
    if dry_run:
        counts = {state: states.count(state) for state in dict.fromkeys(states)}
        console.print(f"{len(points)} points: " + ", ".join(f"{n} {state}" for state, n in counts.items()))
        for line in plan:
            console.print(f"before the grid, the sweep {line}")
        for line in warnings:
            console.print(f"[yellow]{line}[/yellow]")
        return
    handle_sigterm()
    try:
        frame = run_study(name, overrides, launcher, rerun=rerun, console=console)
    except SweepError as err:
        fail(str(err), code=1)
    except _user_errors() as err:
        fail_on(err)
    except Terminated:
        fail("terminated (SIGTERM); the same command resumes the sweep (finished points are skipped)", TERMINATED)
    except KeyboardInterrupt:
        fail("interrupted; the same command resumes the sweep (finished points are skipped)", INTERRUPTED)
    statuses = frame["status"].value_counts().to_dict() if len(frame) else {}
    console.print(f"{len(frame)} runs; statuses: {statuses}")
    failed = frame[frame["status"] == "failed"] if len(frame) else frame
    if len(failed):
        fail(
            f"{len(failed)} of {len(frame)} grid points of {name} failed ({', '.join(failed['run'])}); the reasons "
            "are in runs.csv and each run's summary.json; the same command retries them",
            code=1,
        )


@app.command()
def report(
    studies: Annotated[list[str] | None, typer.Argument(help="studies to report (default: all)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="md, html, csv, or several comma-separated")] = "md,html",
    out: Annotated[Path | None, typer.Option(help="where to write (default: the results directory)")] = None,
    results: Annotated[
        Path | None, typer.Option(help="results directory (default: $MOE_LAB_RESULTS or results/)")
    ] = None,
) -> None:
    """Render the papers' tables with our numbers beside them, a verdict per study, and plots."""
    from moe_lab.paths import results_root
    from moe_lab.report import make_report

    formats = tuple(f.strip() for f in fmt.split(",") if f.strip())
    try:
        reports, written = make_report(results or results_root(), studies or None, formats, out, console)
    except (ValueError, OSError) as err:
        fail_on(err)
    for path in written:
        console.print(f"wrote {path}")
    problems = [r.problem for r in reports if r.problem]
    if problems:  # reported as "no data" in the files; the exit code says that something needs fixing
        fail(" | ".join(problems))


@app.command()
def version() -> None:
    """Print moe-lab's version."""
    from moe_lab import __version__

    console.print(__version__)


if __name__ == "__main__":
    app()
