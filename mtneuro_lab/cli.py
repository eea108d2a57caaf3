"""Command-line entry points shared by ``train.py`` and ``evaluate.py``.

Before Hydra creates a run directory, a *preflight* composes the config with the same
overrides, validates it and instantiates the components (no data is read), so that a bad
input fails with one line (``error: <key>: <why>``, exit status 2) and writes nothing. Inside a
multirun, a failing job is recorded as failed in its own directory (``failed.json``) and the
sweep goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf, open_dict

from mtneuro_lab.config.hydra_runtime import hydra_node
from mtneuro_lab.errors import MtneuroError
from mtneuro_lab.io import atomic_write_bytes

ROOT = Path(__file__).resolve().parent.parent
#: the config tree and the multirun configs ship inside the package (``pip install .`` finds them)
PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR / "conf"
SWEEPS_DIR = PACKAGE_DIR / "sweeps"
log = logging.getLogger("mtneuro_lab")

_NO_PREFLIGHT_FLAGS = {
    "--cfg",
    "-c",
    "--help",
    "-h",
    "--hydra-help",
    "--info",
    "-i",
    "-m",
    "--multirun",
    "--shell-completion",
    "-sc",
    "--version",
    "--resolve",
    "-p",
    "--package",
}


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(ROOT))
    if not OmegaConf.has_resolver("package_dir"):
        OmegaConf.register_new_resolver("package_dir", lambda: str(PACKAGE_DIR))
    if not OmegaConf.has_resolver("job_subdir"):
        OmegaConf.register_new_resolver("job_subdir", job_subdir)
    if not OmegaConf.has_resolver("experiment_group"):
        OmegaConf.register_new_resolver("experiment_group", experiment_group)


def _short_name(name: str, limit: int = 120) -> str:
    """A directory/run name: ``/`` replaced, long names cut and made unique with a hash."""
    safe = name.replace("/", "_")
    if safe != name or len(safe) > limit:
        safe = f"{safe[: limit - 11]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return safe


def job_subdir(num: object, override_dirname: object) -> str:
    """Multirun job directory: the job's sorted overrides (stable across reruns), else its number."""
    return _short_name(str(override_dirname)) if override_dirname else str(num)


#: overrides that do not change the experiment (left out of W&B groups and report groups)
_NOT_EXPERIMENT = ("seed", "sweep", "logger", "ckpt_path", "paths", "extras", "tags")


def experiment_group() -> str:
    """``<task>-<model>`` plus every override except the seed: one W&B group per experiment."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    parts = [f"{hc.runtime.choices.get('task')}-{hc.runtime.choices.get('model')}"]
    for text in sorted(hc.overrides.task):
        key = text.lstrip("+~").split("=", 1)[0]
        if key not in ("task", "model") and key.split(".", 1)[0] not in (*_NOT_EXPERIMENT, "hydra"):
            parts.append(text.lstrip("+~"))
    return _short_name(",".join(parts))


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _hydra_error_line(err: BaseException) -> str:
    """Hydra's composition errors span several lines; keep what names the key or option."""
    text = str(err)
    if text.startswith("In '") and "Could not find '" in text or "Could not find '" in text:
        missing = text.split("Could not find '", 1)[1].split("'", 1)[0]
        group, _, option = missing.rpartition("/")
        options = sorted(p.stem for d in (CONF_DIR, SWEEPS_DIR) for p in (d / group).glob("*.yaml")) if group else []
        if options:
            return f"{group}={option}: unknown option; available: {', '.join(options)}"
    if "Could not override '" in text:
        key = text.split("Could not override '", 1)[1].split("'", 1)[0]
        return f"{key}: unknown key (to add a new key use +{key}=...)"
    return one_line(err)


def preflight(overrides: list[str], validate: Callable[[DictConfig], None]) -> None:
    """Compose and validate without Hydra's run directory; exit 2 with one line on bad input."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    # Hydra's own keys are left to Hydra, except the sweeper's (its direction is checked here)
    plain = [o for o in overrides if not o.lstrip("+~").startswith("hydra.") or o.startswith("hydra.sweeper.")]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=plain, return_hydra_config=True)
            from hydra.core.hydra_config import HydraConfig

            HydraConfig.instance().set_config(cfg)
    except Exception as err:  # noqa: BLE001 - any composition failure is the user's input
        _fail(_hydra_error_line(err))
    try:
        with open_dict(cfg):
            cfg.pop("hydra", None)
        validate(cfg)
    except MtneuroError as err:
        _fail(str(err))


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def needs_preflight(argv: list[str]) -> bool:
    return not any(a.split("=", 1)[0] in _NO_PREFLIGHT_FLAGS for a in argv)


def is_multirun_launch(argv: list[str]) -> bool:
    """``-m``/``--multirun`` without a flag that only prints (``--cfg``, ``--help``, ...)."""
    flags = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
    return bool(flags & {"-m", "--multirun"}) and not (flags - {"-m", "--multirun"}) & _NO_PREFLIGHT_FLAGS


def split_sweep_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(plain overrides, swept keys): Hydra's own parser tells ``a=1,2``/``choice(..)`` sweeps."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    plain = [text for text, o in zip(overrides, parsed) if not o.is_sweep_override()]
    swept = [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]
    return plain, swept


def _is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001
        return False


def _record_failure(cfg: DictConfig, err: BaseException) -> None:
    out = Path(str(cfg.paths.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    message = lines[-1] if len(lines) > 1 else one_line(err)  # a worker's traceback: its last line
    payload = {"error": message, "type": type(err).__name__, "traceback": traceback.format_exc()}
    tmp = out / ".failed.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, out / "failed.json")
    if not (out / "config.yaml").is_file():  # the report groups failed jobs by their config too
        # a DictConfig converts to a dict; the stubs return the union of every container type
        plain = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=False))
        # a config that cannot resolve is often why the job failed: keep it unresolved then
        with contextlib.suppress(Exception):
            plain = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
        plain.pop("hydra", None)
        atomic_write_bytes(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(plain)).encode())


def _inject_fault(cfg: DictConfig) -> None:
    """Fault injection (``+extras.fail_on_seed=N``): the job whose seed is N crashes on purpose,
    to rehearse how a sweep records a failed job and how the report names it."""
    fail = OmegaConf.select(cfg, "extras.fail_on_seed")
    if fail is not None and int(fail) == int(cfg.seed):
        raise RuntimeError(f"extras.fail_on_seed={fail}: injected failure of the job with seed {cfg.seed}")


def _parallel_threads(launcher: DictConfig) -> int | None:
    """Torch threads per job under the joblib launcher: the cores split among its workers."""
    if "joblib" not in str(launcher.get("_target_", "")).lower():
        return None
    cores = os.cpu_count() or 1
    n_jobs = int(launcher.get("n_jobs", -1))
    workers = cores if n_jobs <= 0 else min(n_jobs, cores)
    return max(1, cores // workers)


_DDP_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
)


@contextlib.contextmanager
def _multirun_job() -> Iterator[None]:
    """Context of one sweep job.

    Lightning's DDP launcher starts its worker processes by re-running ``sys.argv`` with
    ``hydra.run.dir`` set to ``HydraConfig.run.dir``; inside a multirun that would re-run the
    whole sweep. Here ``sys.argv`` becomes this job alone (its overrides, ``hydra.mode=RUN``) and
    ``run.dir`` the job's directory, so each worker joins exactly this job.
    """
    import torch
    from omegaconf import read_write

    hc = hydra_node()
    saved_argv, saved_threads = sys.argv, torch.get_num_threads()
    sys.argv = [sys.argv[0], *hc.overrides.task, "hydra.mode=RUN"]
    with read_write(hc), open_dict(hc):
        hc.run.dir = hc.runtime.output_dir
    threads = _parallel_threads(hc.launcher)
    if threads:
        torch.set_num_threads(threads)
    saved_env = {k: os.environ.get(k) for k in _DDP_ENV}
    try:
        yield
    finally:
        sys.argv = saved_argv
        torch.set_num_threads(saved_threads)
        # Lightning keeps the process group (and its port) for the next fit/test of the same
        # trainer; the next job of the sweep must form a new one with its own worker processes
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_job(flow: Callable[[DictConfig], object], cfg: DictConfig) -> object:
    """Run one job; turn user errors into one line, never let one sweep job stop the others.

    In a multirun, a job whose directory already holds ``metrics.json`` is skipped (rerunning a
    sweep into the same sweep dir finishes only what is missing or failed).
    """
    multirun = _is_multirun()
    out = Path(str(cfg.paths.output_dir))
    if multirun and (out / "metrics.json").is_file():
        log.info("skipped: %s already has metrics.json", out)
        return json.loads((out / "metrics.json").read_text())
    try:
        with _multirun_job() if multirun else contextlib.nullcontext():
            _inject_fault(cfg)
            result = flow(cfg)
        if multirun:
            (out / "failed.json").unlink(missing_ok=True)  # an earlier attempt failed, this one did not
        return result
    except MtneuroError as err:
        log.error("error: %s", err)
        if _is_multirun():
            _record_failure(cfg, err)
            return None
        _fail(str(err))
    except Exception as err:  # noqa: BLE001 - a crashed sweep job must not kill the sweep
        if _is_multirun():
            log.exception("job failed")
            _record_failure(cfg, err)
            return None
        raise
    return None


def _objective(cfg: DictConfig, result: object) -> object:
    """With ``sweep.objective`` (Optuna sweeps) a job returns that validation metric
    (``selection``: the value that chose its checkpoint, ``selection/value``); a failed job
    returns the worst value, so the study records a bad trial and goes on instead of stopping."""
    key = OmegaConf.select(cfg, "sweep.objective")
    if key is None:
        return result
    key = "selection/value" if str(key) == "selection" else str(key)
    if isinstance(result, dict) and key in result:
        return float(result[key])
    direction = str(OmegaConf.select(hydra_node(), "sweeper.direction", default="maximize"))
    return float("-inf") if "max" in direction.lower() else float("inf")


def main(flow_name: str) -> None:
    """Entry point: ``flow_name`` is ``train`` or ``evaluate`` (functions of mtneuro_lab.run)."""
    import hydra

    register_resolvers()
    argv = sys.argv[1:]
    if needs_preflight(argv):
        from mtneuro_lab import run

        preflight([a for a in argv if not a.startswith("-")], run.preflight_checks[flow_name])
    elif flow_name == "train" and is_multirun_launch(argv):
        # before any job: what selects trials (sweep.objective) on the config without swept values
        from mtneuro_lab import run

        try:
            plain, swept = split_sweep_overrides([a for a in argv if not a.startswith("-")])
        except Exception as err:  # noqa: BLE001 - Hydra reports bad override syntax itself
            log.debug("override parsing left to Hydra: %s", err)
        else:
            method_swept = any(k.split(".", 1)[0] in ("model", "task") for k in swept)
            preflight(plain, run.preflight_checks["sweep_names" if method_swept else "sweep"])

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _app(cfg: DictConfig) -> object:
        # imported here so that `--cfg job`, `--help` and `-m` sweeps start without torch
        from mtneuro_lab import run

        return _objective(cfg, run_job(getattr(run, flow_name), cfg))

    _app()
