"""W&B logger: project/entity/mode from config or environment, one group per experiment
(all but the seed), and the API key never lands in a file the project writes."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose, run_inproc
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf


def _wandb(overrides: list[str]) -> dict:
    cfg = compose(["logger=wandb", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return OmegaConf.to_container(cfg.logger.wandb, resolve=True)


def test_group_is_the_experiment_without_its_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_PROJECT", "proj-from-env")
    monkeypatch.setenv("WANDB_MODE", "offline")
    a = _wandb(["seed=1", "model.optimizer.lr=0.1", "tags=[paper]"])
    b = _wandb(["seed=100", "model.optimizer.lr=0.1", "tags=[paper]"])
    c = _wandb(["seed=1", "model.optimizer.lr=0.2"])
    assert a["group"] == b["group"] != c["group"]
    assert "seed" not in a["group"] and "model.optimizer.lr=0.1" in a["group"]
    assert a["name"] != b["name"]
    assert a["project"] == "proj-from-env" and a["mode"] == "offline" and a["tags"] == ["paper"]
    d = _wandb(["logger.wandb.project=mine", "logger.wandb.entity=lab", "logger.wandb.mode=disabled"])
    assert (d["project"], d["entity"], d["mode"]) == ("mine", "lab", "disabled")


@pytest.mark.parametrize("mode", ["offline"])
def test_api_key_is_never_written(tmp_path: Path, mode: str) -> None:
    secret = "0123456789abcdef0123456789abcdef" + "sentinel"
    run_dir = tmp_path / "run"
    env = {
        "WANDB_API_KEY": secret,
        "WANDB_MODE": mode,
        "WANDB_DIR": str(tmp_path / "wandb_dir"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_cfg"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
    }
    proc = run_inproc("train.py", "logger=wandb", run_dir=run_dir, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files), "no offline W&B run was written"
    leaked = [p for p in files if secret.encode() in p.read_bytes()]
    assert not leaked, f"API key written to {leaked}"
    debug_logs = [p for p in files if p.name == "debug.log" and "offline-run" in str(p)]
    assert debug_logs and all("finishing run" in p.read_text() for p in debug_logs)  # wandb.finish()
