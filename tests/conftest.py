"""Shared test fixtures: config composition, CLI runs in temporary run directories.

Tiny run sizes live in one place, the ``debug`` config group (``mtneuro_lab/conf/debug/``):
every CLI run of the tests adds ``+debug=fast`` (``fast_resnet`` for the default supervised
ResNet, or another option of that group) unless ``fast=False``; keys the test gives itself still
win, as on a real command line.

Most CLI runs are **in-process** (:func:`run_inproc`): the same entry point as ``train.py`` /
``evaluate.py`` (:func:`mtneuro_lab.cli.main`: preflight, Hydra's run directory, one-line errors
and exit codes via ``SystemExit``) without paying Python, torch and Lightning start-up, with the
global state a run changes put back afterwards (:func:`_isolated_run`). Real processes
(:func:`run_cli`) are kept only where the process itself is what is tested:

- ``test_cli.py::test_real_processes_*``: the shell sees exit status 2 and exactly one line on
  stderr from ``evaluate.py``/``train.py``, and a real ``train.py`` writes a run directory (the
  scripts themselves are run nowhere else);
- ``test_resume.py``: the run killed with SIGKILL mid-epoch (``_kill_after_checkpoints``);
- ``test_ddp.py``: ``trainer=ddp_cpu`` starts its worker processes by re-running ``sys.argv``
  of a real script (the 2-process equivalence run; its 1-process reference runs in-process);
- ``test_sweeps.py`` (slow): the joblib launcher runs jobs in worker processes;
- ``test_bossdb.py`` (slow): ``python -m mtneuro_lab.download`` as a user types it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from threadpoolctl import threadpool_limits

from mtneuro_lab.errors import ConfigError, MtneuroError

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

#: under pytest-xdist (`make test` runs 2 workers on 2 cores) every process uses one thread:
#: torch's pool, and the BLAS/OpenMP pools of numpy, scipy and scikit-learn, already loaded by
#: now (the variables reach the CLI subprocesses). Two workers with two BLAS threads each on two
#: busy cores made a 960x40 least-squares fit take 0.25 s of CPU instead of 1.3 ms.
_THREADS = (
    {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    if os.environ.get("PYTEST_XDIST_WORKER")
    else {}
)
if _THREADS:
    os.environ.update(_THREADS)  # pools of libraries loaded later (scipy's own OpenBLAS)
    torch.set_num_threads(1)
    threadpool_limits(1)  # pools already loaded

#: what every CLI run of the tests sees in its environment
_RUN_ENV = {"WANDB_MODE": "disabled", **_THREADS}
#: the entry points: script -> flow of mtneuro_lab.run
FLOWS = {"train.py": "train", "evaluate.py": "evaluate"}


#: composed configs of this test process, by overrides (Hydra's composition takes 0.2-0.5 s)
_COMPOSED: dict[tuple[tuple[str, ...], bool], DictConfig] = {}


def compose(overrides: Iterable[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """Compose the project's config like the CLI does (resolvers registered).

    The same overrides compose once per process; each call gets its own deep copy, so a test
    that edits its config changes nobody else's. Composition errors are not kept (raised again).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mtneuro_lab.cli import CONF_DIR, register_resolvers

    register_resolvers()
    key = (tuple(overrides), return_hydra_config)
    if key not in _COMPOSED:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            _COMPOSED[key] = hydra_compose(
                config_name="config", overrides=list(key[0]), return_hydra_config=return_hydra_config
            )
    cfg = copy.deepcopy(_COMPOSED[key])
    if return_hydra_config:  # let ${hydra:...} interpolations resolve, as in a real run
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def boss(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The fake Boss server (tests/fake_boss.py) with ``BOSSDB_TOKEN`` set and no other Boss or
    intern variable of the machine in the way."""
    from fake_boss import TOKEN, FakeBoss

    monkeypatch.setenv("BOSSDB_TOKEN", TOKEN)
    for name in ("INTERN_TOKEN", "BOSS_HOST", "INTERN_HOST", "BOSS_PROTOCOL", "INTERN_PROTOCOL"):
        monkeypatch.delenv(name, raising=False)
    with FakeBoss(z_extent=(100, 140), token=TOKEN) as server:
        yield server


def one_line_error(
    call: Any, *args: Any, raises: type[Exception] | tuple[type[Exception], ...] = MtneuroError, **kwargs: Any
) -> str:
    """The message of the error ``call(*args, **kwargs)`` raises (``raises``), checked to be one line."""
    with pytest.raises(raises) as err:
        call(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def config_error(call: Any, *args: Any, **kwargs: Any) -> str:
    """:func:`one_line_error` for a ``ConfigError`` (a bad key or value, before any work)."""
    return one_line_error(call, *args, raises=ConfigError, **kwargs)


@pytest.fixture(autouse=True)
def _no_hydra_app_left_behind() -> Iterator[None]:
    """Every test starts outside a Hydra app: ``compose(..., return_hydra_config=True)`` sets
    ``HydraConfig`` for the test that asks, and it is cleared afterwards (code that asks
    "am I inside Hydra?" would otherwise answer by the tests that ran before on the worker)."""
    yield
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None  # type: ignore[assignment]


#: models run with ``+debug=fast_resnet`` when a test asks for ``fast=True`` (the supervised
#: ResNet, the default model): the same layout 16 channels wide, a 16th of the work and bytes
RESNET_MODELS = frozenset({"supervised", "mixup"})


def debug_option(overrides: Iterable[str], fast: bool | str, script: str = "train.py") -> str | None:
    """The ``+debug`` option of a test run: ``fast`` if it names one; for ``fast=True``,
    ``fast_resnet`` when ``train.py`` trains the supervised ResNet (no other model, experiment or
    sweep config chosen), else ``fast`` (``evaluate.py`` keeps the checkpoint's model)."""
    if not fast:
        return None
    if fast is not True:
        return fast
    chosen = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in overrides if "=" in o}
    if script != "train.py" or "experiment" in chosen or "sweep" in chosen:
        return "fast"
    return "fast_resnet" if set(chosen.get("model", "supervised").split(",")) <= RESNET_MODELS else "fast"


def cli_args(
    overrides: Iterable[str],
    run_dir: Path | None = None,
    fast: bool | str = True,
    multirun: bool = False,
    script: str = "train.py",
) -> list[str]:
    """Command-line arguments of a test run: the test's overrides, then ``+debug=<option>``.

    ``fast=True`` picks the option by the run's model (:func:`debug_option`); a string names an
    option of the debug group. The debug option comes last so that it overlays ``+sweep=...``
    configs too (a ``+group`` given later is merged later); plain ``key=value`` overrides win
    over it wherever they stand.
    """
    overrides = list(overrides)
    args = ["-m"] if multirun else []
    args += overrides
    option = debug_option(overrides, fast, script)
    if option:
        args.append(f"+debug={option}")
    if run_dir is not None:
        args.append(f"{'hydra.sweep.dir' if multirun else 'hydra.run.dir'}={run_dir}")
    return args


def build(*overrides: str) -> Any:
    """The run's components (task, datamodule, method ...) of a composed, validated config."""
    from omegaconf import open_dict

    from mtneuro_lab.build import build_components
    from mtneuro_lab.config.schema import validate_config

    cfg = compose(list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = "unused"
    validate_config(cfg)
    return build_components(cfg)


def run_cli(
    script: str,
    *overrides: str,
    run_dir: Path | None = None,
    fast: bool | str = True,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    multirun: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``train.py``/``evaluate.py`` in a real subprocess (see the module docstring for when)."""
    args = [sys.executable, str(ROOT / script), *cli_args(overrides, run_dir, fast, multirun, script)]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=cli_env(env))


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of every CLI subprocess of the tests (same thread count everywhere)."""
    return {**os.environ, "PYTHONHASHSEED": "0", **_RUN_ENV, **(extra or {})}


def run_inproc(
    script: str,
    *overrides: str,
    run_dir: Path | None = None,
    fast: bool | str = True,
    env: dict[str, str] | None = None,
    multirun: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``train.py``/``evaluate.py`` in this process; same arguments and result as :func:`run_cli`.

    ``returncode`` is what the process would exit with (``SystemExit`` code, 1 for an uncaught
    exception, whose traceback goes to ``stderr`` as Python would print it); ``stdout``/``stderr``
    hold what the run printed and logged (Hydra's console handler writes to ``stdout``).
    Warnings are left to pytest (recorded in its summary, not printed to ``stderr``).
    """
    from mtneuro_lab.cli import main

    argv = [str(ROOT / script), *cli_args(overrides, run_dir, fast, multirun, script)]
    out, err = io.StringIO(), io.StringIO()
    with (
        _isolated_run(argv, {**_RUN_ENV, **(env or {})}),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            main(FLOWS[script])
            code = 0
        except SystemExit as exc:
            code = _exit_status(exc.code, err)
        except Exception:  # noqa: BLE001 - what an uncaught exception does to a process
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def _exit_status(code: object, err: io.StringIO) -> int:
    """The status ``sys.exit(code)`` gives a process (a message is printed to stderr and means 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=err)
    return 1


@contextlib.contextmanager
def _isolated_run(argv: list[str], env: dict[str, str]) -> Iterator[None]:
    """Give a run a fresh process's view of the global state it touches, then put it all back.

    Saved and restored: ``sys.argv``, the environment (Lightning's seed and DDP variables,
    W&B's), the working directory, logging (Hydra's ``dictConfig`` replaces the root handlers
    and opens ``<run>/cli.log``), warning filters, signal handlers, torch's thread count,
    deterministic and matmul-precision flags, the random generators (``seed_everything``),
    Hydra's singletons (``GlobalHydra``, ``HydraConfig``) and W&B's run and service.
    """
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    saved_argv, saved_env, saved_cwd = sys.argv[:], dict(os.environ), os.getcwd()
    saved_logging = _logging_state()
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    saved_torch = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    saved_rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    saved_hydra_cfg = HydraConfig.instance().cfg
    GlobalHydra.instance().clear()
    sys.argv = argv
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:  # what the variable does to a process starting torch
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    try:
        with warnings.catch_warnings():
            yield
    finally:
        _finish_wandb()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = saved_hydra_cfg
        random.setstate(saved_rng[0])
        np.random.set_state(saved_rng[1])
        torch.set_rng_state(saved_rng[2])
        threads, deterministic, warn_only, precision, cudnn_deterministic, cudnn_benchmark = saved_torch
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_deterministic, cudnn_benchmark
        for signum, handler in saved_signals.items():
            signal.signal(signum, handler)
        _restore_logging(saved_logging)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv


def _finish_wandb() -> None:
    """A W&B run left open (a crashed job) would receive the next run's logs; stop its service too."""
    wandb = sys.modules.get("wandb")
    if wandb is None:
        return
    if wandb.run is not None:
        wandb.finish(exit_code=1)
    wandb.teardown()


_LoggerState = tuple[int, list[logging.Handler], bool, bool]


def _logging_state() -> dict[str, _LoggerState]:
    loggers = {name: lg for name, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    loggers[""] = logging.getLogger()
    return {name: (lg.level, lg.handlers[:], lg.propagate, lg.disabled) for name, lg in loggers.items()}


def _restore_logging(saved: dict[str, _LoggerState]) -> None:
    """Close the handlers the run gave the loggers that existed before (Hydra's console and
    ``<run>/cli.log`` handlers on the root logger) and give those loggers their old set-up.
    Loggers first created during the run (a module imported by it) keep what their module set."""
    kept = {id(h) for _, handlers, _, _ in saved.values() for h in handlers}
    current = _logging_state()
    for name, (level, handlers, propagate, disabled) in saved.items():
        for handler in current[name][1]:
            if id(handler) not in kept:
                handler.close()
        lg = logging.getLogger(name or None)
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate, lg.disabled = propagate, disabled


_SAVED_TMP: dict[str, Any] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Every temporary file of the session (this process's and its subprocesses') in one
    directory deleted at the end. Set before collection: W&B creates its ``wandb-media`` and
    ``wandb-artifacts`` directories when it is imported and keeps them for the life of the
    process, which for a test worker is the whole session."""
    # pytest's own tmp_path directories stay where they always are (kept for failed tests)
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    root = tempfile.mkdtemp(prefix="mtneuro-tests-")
    _SAVED_TMP.update(root=root, env=os.environ.get("TMPDIR"), tempdir=tempfile.tempdir)
    os.environ["TMPDIR"], tempfile.tempdir = root, root


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (it renames the items)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests sharing a module-scoped fixture (a trained run, generated cubes) run on one worker.

    Under ``--dist loadgroup`` a module's tests are spread over the workers, and each worker
    builds the module's fixtures itself: a fixture that trains a run would train it twice.
    A test that already names its ``xdist_group`` keeps it.
    """
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None or item.get_closest_marker("xdist_group") is not None:
            continue
        shared = [n for n in info.names_closure if (d := info.name2fixturedefs.get(n)) and d[-1].scope == "module"]
        if shared:
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}.{shared[0]}"))


def pytest_unconfigure(config: pytest.Config) -> None:
    if "root" not in _SAVED_TMP:
        return
    _finish_wandb()
    tempfile.tempdir = _SAVED_TMP["tempdir"]
    if _SAVED_TMP["env"] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = _SAVED_TMP["env"]
    shutil.rmtree(_SAVED_TMP.pop("root"), ignore_errors=True)


def read_metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA
