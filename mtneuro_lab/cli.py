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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from mtneuro_lab.cluster import env as cluster_env
from mtneuro_lab.config.hydra_runtime import hydra_node
from mtneuro_lab.config.schema import validate_config
from mtneuro_lab.errors import ConfigError, MtneuroError, existing_checkpoint
from mtneuro_lab.io import atomic_write_bytes, unwritable_reason

#: the config tree and the multirun configs ship inside the package (``pip install .`` finds them)
PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR / "conf"
SWEEPS_DIR = PACKAGE_DIR / "sweeps"
#: the checkout around the package when it runs from a clone (``train.py`` beside it), else None
CLONE_DIR = PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "train.py").is_file() else None
log = logging.getLogger("mtneuro_lab")
#: flags of ours that Hydra does not know: they are taken off the command line before Hydra parses it
VERBOSE_FLAGS = ("-v", "--verbose")


def project_root() -> Path:
    """``paths.root_dir``: where ``outputs/``, ``.cache/`` and ``data/`` go by default.

    ``$MTNEURO_HOME`` if set; else the clone the package runs from; else (an installed package)
    the working directory, like any command-line tool writing its results where it is started.
    """
    home = os.environ.get("MTNEURO_HOME")
    if home:
        return Path(home).expanduser().absolute()
    return CLONE_DIR if CLONE_DIR is not None else Path.cwd()


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
        OmegaConf.register_new_resolver("project_root", lambda: str(project_root()))
    if not OmegaConf.has_resolver("package_dir"):
        OmegaConf.register_new_resolver("package_dir", lambda: str(PACKAGE_DIR))
    if not OmegaConf.has_resolver("job_subdir"):
        OmegaConf.register_new_resolver("job_subdir", job_subdir)
    if not OmegaConf.has_resolver("experiment_group"):
        OmegaConf.register_new_resolver("experiment_group", experiment_group)
    if not OmegaConf.has_resolver("run_stamp"):  # cached like ${now:}: one value per config
        OmegaConf.register_new_resolver("run_stamp", cluster_env.run_stamp, use_cache=True)
    if not OmegaConf.has_resolver("wandb_group"):
        OmegaConf.register_new_resolver("wandb_group", wandb_group)


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


def wandb_group(sweep_name: object = None) -> str:
    """The W&B group: a named sweep (``+sweep=table1``), a multirun's directory, else the experiment."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if sweep_name:
        return _short_name(str(sweep_name))
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return _short_name(f"multirun-{Path(str(hc.sweep.dir)).name}")
    return experiment_group()


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _group_options(group: str, config_dirs: Sequence[str] = ()) -> list[str]:
    """The options of a config group in the package's tree, its sweeps and the user's config dirs."""
    roots = (CONF_DIR, SWEEPS_DIR, *map(Path, config_dirs))
    return sorted({p.stem for d in roots for p in (d / group).glob("*.yaml")})


def _hydra_error_line(err: BaseException, config_dirs: Sequence[str] = ()) -> str:
    """Hydra's composition errors span several lines; keep what names the key or option."""
    text = str(err)
    if "Could not find '" in text:
        missing = text.split("Could not find '", 1)[1].split("'", 1)[0]
        group, _, option = missing.rpartition("/")
        options = _group_options(group, config_dirs) if group else []
        if options:
            return f"{group}={option}: unknown option; available: {', '.join(options)}"
    if "Could not override '" in text:
        key = text.split("Could not override '", 1)[1].split("'", 1)[0]
        return f"{key}: unknown key (to add a new key use +{key}=...)"
    return one_line(err)


def _override_key(text: str) -> str:
    return text.lstrip("+~").split("=", 1)[0]


def _list_step(base: DictConfig, key: str) -> str | None:
    """If ``key`` walks into a list with a name instead of an index, say so (None otherwise)."""
    node: Any = base
    parts = key.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, ListConfig):
            if not part.lstrip("-").isdigit():
                where = ".".join(parts[:i])
                example = ".".join([where, "0", *parts[i:]])
                return f"{key}: {where} is a list; name an item by its index (e.g. {example})"
            if not -len(node) <= int(part) < len(node):
                return f"{key}: {'.'.join(parts[:i])} has {len(node)} items; no item {part}"
            node = node[int(part)]
        elif isinstance(node, DictConfig) and part in node:
            node = node._get_node(part)
            node = node if isinstance(node, (DictConfig, ListConfig)) else None
        else:
            return None
    return None


def _explain_composition_error(overrides: Sequence[str], config_dirs: Sequence[str], err: BaseException) -> str:
    """Name the override behind a composition failure whose own message does not (e.g. ``int('z')``).

    ``config_dirs``: every user config directory (their options are listed in errors); only
    ``--config-dir`` ones need prepending, ``hydra.searchpath`` comes with the overrides.
    """
    line = _hydra_error_line(err, config_dirs)
    if any(s in line for s in (": unknown option", ": unknown key")):
        return line
    groups = [o for o in overrides if "." not in _override_key(o)]
    try:
        with hydra_context(config_dirs):
            from hydra import compose

            base = compose(config_name="config", overrides=groups)
    except Exception:  # noqa: BLE001 - the group choices themselves fail: keep Hydra's line
        return line
    for text in overrides:
        if "." in _override_key(text):
            reason = _list_step(base, _override_key(text))
            if reason:
                return reason
    return line


@contextlib.contextmanager
def hydra_context(config_dirs: Sequence[str] = ()) -> Iterator[None]:
    """Hydra's global state set up as ``@hydra.main`` does: the package's config tree, with each
    ``--config-dir`` put in front of it (user configs win over packaged ones of the same name)."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    version.setbase("1.3")
    search = create_config_search_path(str(CONF_DIR))
    for directory in config_dirs:
        url = f"file://{Path(directory).absolute()}"
        search.prepend(provider="command-line", path=url, anchor=SearchPathQuery(provider="schema"))
    try:
        Hydra.create_main_hydra2(task_name="cli", config_search_path=search)
        yield
    finally:
        restore_gh_from_backup(backup)


def searchpath_dirs(overrides: Sequence[str]) -> list[str]:
    """The ``file://`` directories of a ``hydra.searchpath=[...]`` override; one line if one is missing."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    dirs = []
    for text in overrides:
        if _override_key(text) != "hydra.searchpath":
            continue
        value = OverridesParser.create().parse_overrides([text])[0].value()
        for entry in value if isinstance(value, list) else [value]:
            entry = str(entry)
            if entry.startswith("file://") and "${" not in entry:
                path = Path(entry[len("file://") :])
                if not path.is_dir():
                    raise ConfigError(f"hydra.searchpath: no config directory at {path.absolute()}")
                dirs.append(str(path))
    return dirs


def check_config_dir(config_dir: str | None) -> list[str]:
    """``--config-dir``/``-cd``: the user's config directory, which must exist."""
    if config_dir is None:
        return []
    if not Path(config_dir).is_dir():
        raise ConfigError(f"--config-dir: no config directory at {Path(config_dir).absolute()}")
    return [str(Path(config_dir).absolute())]


def check_writable(cfg: DictConfig, multirun: bool = False) -> None:
    """Every directory the run will write to can be created and written, before any work.

    The run directory (``hydra.run.dir``, or ``hydra.sweep.dir`` for multiruns, under
    ``paths.output_root``), ``paths.cache_dir``, each logger's ``save_dir`` and W&B's own
    directories (``WANDB_DIR``, ``WANDB_CACHE_DIR``, ``WANDB_CONFIG_DIR``).
    """
    hydra_cfg = cfg.get("hydra")
    run_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    candidates: list[tuple[str, Any]] = [("paths.cache_dir", lambda: cfg.paths.cache_dir)]
    if hydra_cfg is not None:
        candidates.append((run_key, lambda: OmegaConf.select(cfg, run_key)))
    for name, sub in (cfg.get("logger") or {}).items():
        if isinstance(sub, DictConfig) and "save_dir" in sub:
            candidates.append((f"logger.{name}.save_dir", lambda sub=sub: sub.save_dir))
    if "wandb" in (cfg.get("logger") or {}):
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
            if os.environ.get(var):
                candidates.append((var, lambda var=var: os.environ[var]))
    for key, value in candidates:
        try:
            path = value()
        except Exception:  # noqa: BLE001 - e.g. ${hydra:runtime.output_dir}: the run dir, checked above
            continue
        if path in (None, ""):
            continue
        reason = unwritable_reason(str(path))
        if reason:
            shown = f"{key} (under paths.output_root)" if key == run_key and run_key not in _given_keys() else key
            raise ConfigError(f"{shown}: {reason}")


def _given_keys() -> set[str]:
    return {_override_key(a) for a in sys.argv[1:] if not a.startswith("-")}


#: build/validate functions and the config section each one processes (see :func:`failing_section`)
_SECTION_OF_FUNCTION = {
    "catalog_from_config": "cubes",
    "build_task": "task",
    "bind": "task",
    "build_source": "source",
    "check_source": "source",
    "build_datamodule": "data",
    "data_config": "data",
    "build_method": "model",
    "check_checkpoint_fits": "ckpt_path",
    "build_callbacks": "callbacks",
    "build_loggers": "logger",
    "build_trainer": "trainer",
}


def failing_section(err: BaseException) -> str:
    """The config section being processed when ``err`` escaped: the innermost project frame that
    knows it (a schema check's ``key``, or a build function of :data:`_SECTION_OF_FUNCTION`)."""
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        if not frame.f_globals.get("__name__", "").startswith("mtneuro_lab"):
            continue
        key = frame.f_locals.get("key")
        if frame.f_globals.get("__name__") == "mtneuro_lab.config.schema" and isinstance(key, str):
            return key
        if frame.f_code.co_name in _SECTION_OF_FUNCTION:
            return _SECTION_OF_FUNCTION[frame.f_code.co_name]
    return "config"


#: ``-v``/``--verbose`` on the command line (or HYDRA_FULL_ERROR=1): unexpected errors show their traceback
_verbose = False


def _unexpected(err: BaseException) -> str:
    if _verbose or os.environ.get("HYDRA_FULL_ERROR") == "1":
        traceback.print_exception(err, file=sys.stderr)
    return (
        f"{failing_section(err)}: {type(err).__name__}: {one_line(err)} (-v or HYDRA_FULL_ERROR=1 shows the traceback)"
    )


def preflight(
    overrides: list[str],
    validate: Callable[[DictConfig], None],
    config_dirs: Sequence[str] = (),
    multirun: bool = False,
) -> None:
    """Compose and validate without Hydra's run directory; exit 2 with one line on bad input."""
    from hydra import compose

    register_resolvers()
    # Hydra's own keys are left to Hydra, except the sweeper's (its direction is checked here),
    # the launcher's (nodes and tasks are checked against the trainer's), the search path (user
    # config dirs) and the run/sweep directory (checked for writing)
    hydra_keys = ("hydra.sweeper.", "hydra.launcher.", "hydra.searchpath", "hydra.run.dir", "hydra.sweep.dir")
    plain = [
        o for o in overrides if not _override_key(o).startswith("hydra.") or _override_key(o).startswith(hydra_keys)
    ]
    try:
        user_dirs = [*config_dirs, *searchpath_dirs(plain)]  # their options are named in errors
    except MtneuroError as err:
        _fail(str(err))
    try:
        with hydra_context(config_dirs):
            cfg = compose(config_name="config", overrides=plain, return_hydra_config=True)
            from hydra.core.hydra_config import HydraConfig

            HydraConfig.instance().set_config(cfg)
    except Exception as err:  # noqa: BLE001 - any composition failure is the user's input
        _fail(_explain_composition_error(plain, user_dirs, err))
    try:
        check_writable(cfg, multirun)
        with open_dict(cfg):
            cfg.pop("hydra", None)
        validate(cfg)
    except MtneuroError as err:
        _fail(str(err))
    except Exception as err:  # noqa: BLE001 - a bug or an input no check knows: one line, the section
        _fail(_unexpected(err))


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


def parse_command_line(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(overrides, ``--config-dir``) as Hydra will read them; one line if the config dir is missing."""
    from hydra._internal.utils import get_args_parser

    try:
        args, _ = get_args_parser().parse_known_args(list(argv))
    except SystemExit:  # argparse already printed why; Hydra will refuse the same command line
        return [a for a in argv if not a.startswith("-")], []
    return list(args.overrides or []), check_config_dir(args.config_dir)


def evaluate_overrides(argv: Sequence[str]) -> list[str]:
    """``evaluate.py``: every key of the checkpoint's saved ``config.yaml`` can be overridden as written.

    The default composition (task=roi_c1 ...) may not have the key (``task.postprocess.threshold``
    of a SNEMI3D run); such overrides become ``++key=value`` for Hydra, and
    :func:`mtneuro_lab.rundir.evaluation_config` applies them onto the saved config.
    """
    ckpt = next((a.split("=", 1)[1] for a in argv if a.startswith("ckpt_path=")), None)
    saved_path = Path(ckpt).resolve().parent if ckpt else None
    if saved_path is not None and saved_path.name == "checkpoints":
        saved_path = saved_path.parent
    if saved_path is None or not (saved_path / "config.yaml").is_file():
        return list(argv)
    saved = OmegaConf.load(saved_path / "config.yaml")
    out = []
    for arg in argv:
        key = arg.split("=", 1)[0]
        plain = "=" in arg and not arg.startswith(("-", "+", "~")) and "." in key and not key.startswith("hydra.")
        if plain and OmegaConf.select(saved, key, default=_ABSENT, throw_on_resolution_failure=False) is not _ABSENT:
            arg = f"++{arg}"
        out.append(arg)
    return out


_ABSENT = object()


def _flow_checks(flow_name: str) -> Callable[[DictConfig], None]:
    """The flow's preflight checks, the schema first: a typo or a bad value in a training
    command fails before torch and Lightning are loaded (seconds earlier, and cheaply)."""

    def check(cfg: DictConfig) -> None:
        if flow_name == "train":
            validate_config(cfg)
        ckpt = cfg.get("ckpt_path")
        if flow_name == "evaluate" and ckpt:
            # a checkpoint named but absent: refused before torch loads, for every kind of task
            existing_checkpoint(str(ckpt))
        from mtneuro_lab import run

        run.preflight_checks[flow_name](cfg)

    return check


def main(flow_name: str) -> None:
    """Entry point: ``flow_name`` is ``train`` or ``evaluate`` (functions of mtneuro_lab.run)."""
    import hydra

    global _verbose
    register_resolvers()
    argv = [a for a in sys.argv[1:] if a not in VERBOSE_FLAGS]
    _verbose = len(argv) < len(sys.argv) - 1
    if flow_name == "evaluate":
        argv = evaluate_overrides(argv)
    problem = cluster_env.shared_dir_problem(argv)
    if problem:
        _fail(problem)
    # ranks > 0 started by torchrun/srun: no .hydra/ of their own, their own log file
    argv += cluster_env.rank_overrides(flow_name, argv)
    sys.argv = [sys.argv[0], *argv]  # Hydra parses sys.argv (and Lightning's DDP workers re-run it)
    try:
        overrides, config_dirs = parse_command_line(argv)
    except ConfigError as err:
        _fail(str(err))
    if needs_preflight(argv):
        preflight(overrides, _flow_checks(flow_name), config_dirs)
    elif flow_name == "train" and is_multirun_launch(argv):
        # before any job: what selects trials (sweep.objective) on the config without swept values
        from mtneuro_lab import run

        try:
            plain, swept = split_sweep_overrides(overrides)
        except Exception as err:  # noqa: BLE001 - Hydra reports bad override syntax itself
            log.debug("override parsing left to Hydra: %s", err)
        else:
            method_swept = any(k.split(".", 1)[0] in ("model", "task") for k in swept)
            check = run.preflight_checks["sweep_names" if method_swept else "sweep"]
            preflight(plain, check, config_dirs, multirun=True)

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _app(cfg: DictConfig) -> object:
        # imported here so that `--cfg job`, `--help` and `-m` sweeps start without torch
        from mtneuro_lab import run

        return _objective(cfg, run_job(getattr(run, flow_name), cfg))

    _app()


def train() -> None:
    """``mtneuro-train`` (console script) and ``python -m mtneuro_lab.train``."""
    main("train")


def evaluate() -> None:
    """``mtneuro-eval`` (console script) and ``python -m mtneuro_lab.evaluate``."""
    main("evaluate")
