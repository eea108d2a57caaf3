"""W&B logger: project/entity/mode from config or environment, one group per experiment
(all but the seed) or per sweep, the offline run read back (name, group, job type, tags, flat
config, metrics.json as summary, images), resume of the same run after ``ckpt_path=last``, and
the API key never lands in a file the project writes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import compose, read_metrics, run_inproc
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


def test_a_sweep_is_one_group() -> None:
    from mtneuro_lab.cli import wandb_group

    cfg = compose(["logger=wandb", "+sweep=seeds"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    assert OmegaConf.to_container(cfg.logger.wandb, resolve=True)["group"] == "seeds"
    assert wandb_group("table1") == "table1"


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline run file (``run-<id>.wandb``): W&B's transaction log is
    LevelDB's log format (32 KiB blocks, 7-byte record headers) after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, pending = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def _offline_run(run_dir: Path) -> dict:
    """What W&B recorded for the run(s) under ``run_dir``: run ids, header, config, summary, history keys."""
    out: dict = {"ids": [], "config": {}, "summary": {}, "history": set()}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for rec in wandb_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                out["ids"].append(rec.run.run_id)
                out["run"] = rec.run
            elif kind == "config":
                out["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update if u.key})
            elif kind == "summary":
                out["summary"].update({u.key: json.loads(u.value_json) for u in rec.summary.update if u.key})
            elif kind == "history":
                out["history"] |= {i.key or "/".join(i.nested_key) for i in rec.history.item}
    return out


def test_offline_run_reads_back_and_keeps_no_secret(tmp_path: Path) -> None:
    secret = "0123456789abcdef0123456789abcdef" + "sentinel"
    run_dir = tmp_path / "run"
    env = {
        "WANDB_API_KEY": secret,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb_dir"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_cfg"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
    }
    # png=true: the figures go to W&B and, as PNGs, to the run directory (+debug=fast writes none)
    proc = run_inproc("train.py", "logger=wandb", "tags=[demo]", "callbacks.media.png=true", run_dir=run_dir, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    leaked = [p for p in files if secret.encode() in p.read_bytes()]
    assert not leaked, f"API key written to {leaked}"
    debug_logs = [p for p in files if p.name == "debug.log" and "offline-run" in str(p)]
    assert debug_logs and all("finishing run" in p.read_text() for p in debug_logs)  # wandb.finish()

    first = _offline_run(run_dir)
    run = first["run"]
    assert run.display_name == "roi_c1-supervised-seed1" and run.job_type == "train"
    assert run.run_group.startswith("roi_c1-supervised,") and "seed" not in run.run_group
    assert {"demo", "roi_c1", "supervised", "phantom"} <= set(run.tags)
    assert first["config"]["model.optimizer.lr"] == 0.03 and first["config"]["data.batch_size"] == 4
    metrics = read_metrics(run_dir)
    assert first["summary"]["test/acc"] == pytest.approx(metrics["test/acc"])
    assert first["summary"]["selection/metric"] == "val/acc"
    assert {"media/val/confusion/_type", "media/test/confusion/_type"} <= first["history"]
    assert list(run_dir.glob("wandb/offline-run-*/files/media/images/media/test/confusion_*.png"))
    assert (run_dir / "media" / "test" / "confusion.png").is_file()  # the same figure in the run dir

    # ckpt_path=last in the same run directory continues the same W&B run
    proc = run_inproc(
        "train.py", "logger=wandb", "tags=[demo]", "ckpt_path=last", "trainer.max_epochs=2", run_dir=run_dir, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    both = _offline_run(run_dir)
    assert len(both["ids"]) == 2 and set(both["ids"]) == {run.run_id}
