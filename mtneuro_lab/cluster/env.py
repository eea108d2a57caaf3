"""Where this process runs and what it implies, decided before any process group forms.

Launchers: one plain process (Lightning starts the other DDP processes itself, handing them
the run directory), ``torchrun`` (every rank is started by the torchrun agent and runs
``train.py`` from the start), SLURM tasks (``srun``: one task per GPU, each runs ``train.py``), and
Hydra's submitit launcher (jobs run on other machines). From the environment this module gives:

* :func:`run_stamp`: the run directory name, the same in every rank of one launch (torchrun:
  the rendezvous id or the agent's start; SLURM: job and step id, stable when the job is
  requeued) instead of each rank's own clock;
* :func:`rank_overrides`: ranks > 0 of torchrun/SLURM write no ``.hydra/`` and log to their
  own file;
* :func:`check_launch`: one-line errors for launches that would hang or fail later: a global
  batch that does not divide by the processes, ``trainer.num_nodes`` vs
  ``hydra.launcher.nodes``, a GPU trainer without GPUs, a torchrun world size that is not
  ``trainer.devices x trainer.num_nodes``, DDP inside submitit's local launcher.

Standard library and OmegaConf only at import time: the CLI uses it before torch is imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from mtneuro_lab.errors import ConfigError

STAMP_FORMAT = "%Y-%m-%d_%H-%M-%S_%f"
GPU_ACCELERATORS = ("gpu", "cuda")


def torchrun_world() -> int | None:
    """WORLD_SIZE when this process was started by torchrun (its agent sets TORCHELASTIC_RUN_ID)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return int(os.environ.get("WORLD_SIZE", "1"))


def _slurm_step() -> str | None:
    """``<job>_<step>`` inside a SLURM step started by srun (not an interactive shell)."""
    env = os.environ
    if "SLURM_JOB_ID" not in env or "SLURM_STEP_ID" not in env:
        return None
    if env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    return f"{env['SLURM_JOB_ID']}_{env['SLURM_STEP_ID']}"


def external_rank() -> int:
    """This process's rank when torchrun or srun (several tasks) started every rank, else 0."""
    if torchrun_world() is not None:
        return int(os.environ.get("RANK", "0"))
    if _slurm_step() is not None and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", "0"))
    return 0


def _agent_start() -> str:
    """Start time of the parent process (the torchrun agent), the same for all its workers."""
    parent = os.getppid()
    try:
        fields = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime"))
        started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return f"{datetime.fromtimestamp(started).strftime('%Y-%m-%d_%H-%M-%S')}_{parent}"
    except (OSError, IndexError, ValueError, StopIteration):
        return str(parent)


def run_stamp() -> str:
    """The run directory's last component (``hydra.run.dir``), the same in every rank.

    torchrun: ``torchrun_<rendezvous id>`` (``--standalone`` or ``--rdzv-id``; survives torchrun's
    own restarts), else ``torchrun_<agent start>_<agent pid>`` (one node). SLURM steps:
    ``slurm_<job>_<step>`` (a requeued job gets the same one and resumes there). Otherwise the
    local time with microseconds.
    """
    if torchrun_world() is not None:
        run_id = os.environ["TORCHELASTIC_RUN_ID"]
        return f"torchrun_{run_id}" if run_id not in ("", "none") else f"torchrun_{_agent_start()}"
    step = _slurm_step()
    if step is not None:
        return f"slurm_{step}"
    return datetime.now().strftime(STAMP_FORMAT)


def _given(argv: Sequence[str], key: str) -> bool:
    return any(a.lstrip("+~").split("=", 1)[0] == key for a in argv)


def rank_overrides(flow: str, argv: Sequence[str]) -> list[str]:
    """Hydra overrides for ranks > 0 started by torchrun/srun: no ``.hydra/`` of their own (rank 0
    writes it) and their own log file, as Lightning does for the processes it starts."""
    rank = external_rank()
    if rank == 0:
        return []
    extra = []
    if not _given(argv, "hydra.output_subdir"):
        extra.append("hydra.output_subdir=null")
    if not _given(argv, "hydra.job.name"):
        extra.append(f"hydra.job.name={flow}_rank_{rank}")
    return extra


def shared_dir_problem(argv: Sequence[str]) -> str | None:
    """Why the ranks of this launch cannot agree on a run directory (None if they can)."""
    env = os.environ
    multi_node = int(env.get("WORLD_SIZE", "1")) != int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1")))
    static = env.get("TORCHELASTIC_RUN_ID") in ("", "none")
    if torchrun_world() is not None and multi_node and static and not _given(argv, "hydra.run.dir"):
        return (
            "hydra.run.dir: torchrun across nodes without a rendezvous id; pass --rdzv-id=<name> to "
            "torchrun or hydra.run.dir=<shared dir> so that every node writes to one run directory"
        )
    return None


# -- launch checks ---------------------------------------------------------------------------
LAUNCHER_KEYS = ("_target_", "nodes", "tasks_per_node", "gpus_per_node")


def hydra_launcher() -> Mapping[str, Any] | None:
    """What the checks need of the current app's (or preflight's) Hydra launcher: its target,
    nodes and tasks (None outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        launcher = HydraConfig.get().launcher
    except Exception:  # noqa: BLE001 - outside a Hydra app (tests, notebooks)
        return None
    if launcher is None:
        return None
    return {key: launcher.get(key) for key in LAUNCHER_KEYS if key in launcher}


def runs_elsewhere(launcher: Mapping[str, Any] | None) -> bool:
    """Jobs of this launcher run on other machines (SLURM): this machine's GPUs do not matter."""
    return launcher is not None and "slurm" in str(launcher.get("_target_", "")).lower()


def runs_one_task_locally(launcher: Mapping[str, Any] | None) -> bool:
    """submitit's LocalExecutor (``hydra/launcher=submitit_local``): each job is one
    ``python -m submitit.core._submit`` task, which Lightning cannot start again as another rank."""
    target = str(launcher.get("_target_", "")) if launcher is not None else ""
    return "submitit" in target.lower() and not runs_elsewhere(launcher)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def devices_per_node(trainer: Mapping[str, Any], launcher: Mapping[str, Any] | None) -> int:
    """How many processes ``trainer.devices`` means on one node."""
    devices, accelerator = trainer.get("devices"), str(trainer.get("accelerator", "auto")).lower()
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    if text not in ("-1", "auto"):
        return int(text)
    if runs_elsewhere(launcher):
        return int(launcher.get("tasks_per_node") or 1)  # type: ignore[union-attr]
    if accelerator in GPU_ACCELERATORS or (accelerator == "auto" and _gpu_count() > 0):
        return max(_gpu_count(), 1)  # every visible GPU
    return (os.cpu_count() or 1) if text == "-1" else 1  # Lightning: -1 = every core, auto = one


def process_count(trainer: Mapping[str, Any], launcher: Mapping[str, Any] | None = None) -> int:
    """DDP processes of a run: devices per node x ``trainer.num_nodes``."""
    return devices_per_node(trainer, launcher) * int(trainer.get("num_nodes") or 1)


def check_launch(cfg: DictConfig, launcher: Mapping[str, Any] | None = None) -> None:
    """One line for a launch that cannot work, before any process group forms (see module)."""
    trainer = cast(dict[str, Any], OmegaConf.to_container(cfg.trainer, resolve=True))
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    nodes = int(trainer.get("num_nodes") or 1)
    if accelerator in GPU_ACCELERATORS and not runs_elsewhere(launcher) and _gpu_count() == 0:
        raise ConfigError(
            f"trainer.accelerator: {accelerator} (e.g. trainer=gpu or trainer=ddp) but no GPU is visible "
            "on this machine; use trainer=cpu, or trainer=ddp_cpu for DDP on CPU processes"
        )
    if launcher is not None and "nodes" in launcher and int(launcher["nodes"]) != nodes:
        raise ConfigError(
            f"trainer.num_nodes: {nodes} but hydra.launcher.nodes: {launcher['nodes']}; set both to the number of nodes"
        )
    per_node = devices_per_node(trainer, launcher)
    tasks = launcher.get("tasks_per_node") if runs_elsewhere(launcher) else None  # type: ignore[union-attr]
    if tasks is not None and int(tasks) != per_node:
        raise ConfigError(
            f"trainer.devices: {trainer.get('devices')} processes per node but hydra.launcher.tasks_per_node: "
            f"{tasks}; SLURM starts one task per device"
        )
    processes = per_node * nodes
    if processes > 1 and runs_one_task_locally(launcher):
        raise ConfigError(
            f"trainer.devices: {per_node} DDP processes per job, but hydra/launcher=submitit_local runs each job "
            "as one submitit task that Lightning cannot re-run for the other ranks; use trainer=cpu there, "
            "hydra/launcher=slurm on a cluster, or torchrun"
        )
    world = torchrun_world()
    if world is not None and world != processes:
        raise ConfigError(
            f"trainer.devices: torchrun started {world} processes (WORLD_SIZE) but trainer.devices x "
            f"trainer.num_nodes is {per_node} x {nodes}; run torchrun --nproc_per_node={per_node} or set "
            f"trainer.devices={world // nodes}"
        )
    data = cfg.get("data") or {}
    for key in ("batch_size", "eval_batch_size"):
        batch = data.get(key)
        if batch is not None and int(batch) % processes:
            raise ConfigError(
                f"data.{key}: global batch {batch} is not divisible by the {processes} DDP processes "
                f"(trainer.devices {per_node} x trainer.num_nodes {nodes})"
            )
