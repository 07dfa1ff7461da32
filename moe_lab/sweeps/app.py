"""The Hydra app one sweep job runs in: `python -m moe_lab.sweeps.app --multirun ...` (see sweeps.runner)."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console

from moe_lab.config import CONF_MODULE, register_configs
from moe_lab.parallel import leave
from moe_lab.paths import results_root
from moe_lab.runs import RunConflictError
from moe_lab.sweeps.plan import pretrained_dir
from moe_lab.track import write_json_atomic

register_configs()


@hydra.main(version_base="1.3", config_path=f"pkg://{CONF_MODULE}", config_name="config")
def main(cfg: DictConfig) -> None:
    """Run one grid point in the job's own directory; a finished run is skipped, a failure recorded, and a
    point another process is training is waited for."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    main_task = _join_submitit_tasks()
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
        cfg.resume = True  # continue a killed run; a completed or diverged one is returned as it is
        if cfg.get("checkpoint") is None and cfg.finetune.pretrained:
            seed = cfg.seed if cfg.study.pretraining == "per_seed" else None
            cfg.checkpoint = str(pretrained_dir(results_root(), cfg.finetune.pretrained, seed))
    console = Console()
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if main_task and not overrides_file.exists():  # what runs.csv reads the point's values from, even if it fails
        overrides_file.parent.mkdir(parents=True, exist_ok=True)
        overrides_file.write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    try:
        if hc.job.config_name == "finetune":
            from moe_lab.train.finetune import run_finetune as run
        else:
            from moe_lab.train.pretrain import run_pretrain as run
        run(cfg, overrides, console, wait=True)
    except RunConflictError as err:  # another run is there: not this point's failure, and not ours to overwrite
        console.print(f"[red]skipped[/red] {run_dir}: {err}")
    except Exception as err:  # one broken grid point must not end the sweep: record it and go on
        summary_path = run_dir / "summary.json"
        if main_task and not summary_path.exists():
            write_json_atomic(
                summary_path,
                {"status": "failed", "reason": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()},
            )
        console.print(f"[red]failed[/red] {run_dir}: {err}")
    finally:
        leave()


def _join_submitit_tasks() -> bool:
    """Under a submitit job of several tasks (hydra.launcher.tasks_per_node > 1), make the tasks one
    torch.distributed run: export the rank, world size and rendezvous address that torchrun would set
    (moe_lab.parallel then joins the group). Returns whether this process is the run's main task."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return True
    import submitit

    job = submitit.JobEnvironment()
    if job.num_tasks > 1:
        # one GPU per task is the cluster's business (gpus_per_task), not a CUDA_VISIBLE_DEVICES rewrite here
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return job.global_rank == 0


if __name__ == "__main__":
    main()
