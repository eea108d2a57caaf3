"""Command-line entry points shared by ``train.py`` and ``evaluate.py``.

Before Hydra creates a run directory, a *preflight* composes the config with the same
overrides, validates it and instantiates the components (no data is read), so that a bad
input fails with one line (``error: <key>: <why>``, exit status 2) and writes nothing. Inside a
multirun, a failing job is recorded as failed in its own directory (``failed.json``) and the
sweep goes on.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf, open_dict

from mtneuro_lab.errors import MtneuroError

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
log = logging.getLogger("mtneuro_lab")

_NO_PREFLIGHT_FLAGS = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "-m", "--multirun",
                       "--shell-completion", "-sc", "--version", "--resolve", "-p", "--package"}


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(ROOT))


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _hydra_error_line(err: BaseException) -> str:
    """Hydra's composition errors span several lines; keep what names the key or option."""
    text = str(err)
    if text.startswith("In '") and "Could not find '" in text or "Could not find '" in text:
        missing = text.split("Could not find '", 1)[1].split("'", 1)[0]
        group, _, option = missing.rpartition("/")
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")) if group else []
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
    plain = [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]
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
    payload = {"error": one_line(err), "type": type(err).__name__, "traceback": traceback.format_exc()}
    tmp = out / ".failed.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, out / "failed.json")


def run_job(flow: Callable[[DictConfig], object], cfg: DictConfig) -> object:
    """Run one job; turn user errors into one line, never let one sweep job stop the others."""
    try:
        return flow(cfg)
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


def main(flow_name: str) -> None:
    """Entry point: ``flow_name`` is ``train`` or ``evaluate`` (functions of mtneuro_lab.run)."""
    import hydra

    from mtneuro_lab import run

    register_resolvers()
    flow = getattr(run, flow_name)
    argv = sys.argv[1:]
    if needs_preflight(argv):
        preflight([a for a in argv if not a.startswith("-")], run.preflight_checks[flow_name])

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _app(cfg: DictConfig) -> object:
        return run_job(flow, cfg)

    _app()
