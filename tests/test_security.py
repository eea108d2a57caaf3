"""Security policy (docs/reliability.md): no secret in any file a run writes, no arbitrary pickle
from checkpoints, no unverified cached cutout.

The secret scan runs real ``train.py`` jobs with fake W&B / Boss secrets in the environment and
reads every file the run wrote (run directory, new cache entries, W&B's offline directory)
byte by byte, also inside zip containers (torch checkpoints), plus the process output.
"""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_inproc

from mtneuro_lab.checkpoints import load_checkpoint
from mtneuro_lab.data.cache import load_array, save_array
from mtneuro_lab.errors import CheckpointError, DataError

SECRETS = {
    "WANDB_API_KEY": "f4k3" + "0123456789abcdef" * 2 + "c0ff",  # 40 characters, like a real key
    "BOSSDB_TOKEN": "boss-f4k3-7c1e0d9a5b3f4e21",
    "INTERN_TOKEN": "intern-f4k3-9e8d7c6b5a4f3e2d",
}
assert len(SECRETS["WANDB_API_KEY"]) == 40


def _blobs(path: Path) -> list[tuple[str, bytes]]:
    """The file's bytes, and those of every member when it is a zip (checkpoints)."""
    data = path.read_bytes()
    out = [(str(path), data)]
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            out += [(f"{path}!{name}", zf.read(name)) for name in zf.namelist()]
    return out


def leaks(roots: list[Path], since: float = 0.0) -> list[str]:
    """``file: SECRET_NAME`` for every file under ``roots`` (modified after ``since``) holding a secret."""
    found = []
    for root in roots:
        for path in (p for p in root.rglob("*") if p.is_file() and p.stat().st_mtime >= since):
            for where, blob in _blobs(path):
                found += [f"{where}: {name}" for name, value in SECRETS.items() if value.encode() in blob]
    return found


def _train_and_scan(tmp_path: Path, *overrides: str, env: dict[str, str] | None = None) -> Path:
    run_dir = tmp_path / "run"
    cache = Path(ROOT / ".cache")
    start = time.time() - 1
    proc = run_inproc("train.py", *overrides, run_dir=run_dir, env={**SECRETS, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in written) and (run_dir / "metrics.json").is_file()
    roots = (
        [run_dir] + ([cache] if cache.is_dir() else []) + [Path(v) for k, v in (env or {}).items() if k == "WANDB_DIR"]
    )
    assert leaks(roots, since=start) == []
    assert not [name for name, value in SECRETS.items() if value in proc.stdout + proc.stderr]
    return run_dir


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train_and_scan(tmp_path_factory.mktemp("secrets"), "logger=csv")


def test_csv_run_writes_no_secret(csv_run: Path) -> None:
    assert (csv_run / "config.yaml").is_file() and list(csv_run.rglob("metrics.csv"))


def test_scanner_finds_a_planted_secret(tmp_path: Path) -> None:
    """The scan itself works: a secret inside a zipped checkpoint member is found."""
    torch.save({"note": SECRETS["BOSSDB_TOKEN"]}, tmp_path / "x.ckpt")
    assert any("BOSSDB_TOKEN" in hit for hit in leaks([tmp_path]))


def test_wandb_offline_run_writes_no_secret(tmp_path: Path) -> None:
    wandb_dir = tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    run_dir = _train_and_scan(
        tmp_path,
        "logger=wandb",
        "logger.wandb.mode=offline",
        env={
            "WANDB_MODE": "offline",
            "WANDB_DIR": str(wandb_dir),
            "WANDB_CACHE_DIR": str(wandb_dir / "cache"),
            "WANDB_CONFIG_DIR": str(wandb_dir / "config"),
        },
    )
    assert list(run_dir.rglob("*.wandb")) or list(wandb_dir.rglob("*.wandb")), "no W&B offline run was written"


class _Payload:
    """Unpickling this would create ``marker``: what an attacker's checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_checkpoint_with_an_arbitrary_object_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(evil)
    message = str(exc.value)
    assert "\n" not in message and message.startswith("ckpt_path:") and str(evil) in message
    assert not marker.exists(), "the pickle's code ran"


def test_evaluate_refuses_an_unsafe_checkpoint_in_a_run_dir(csv_run: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = csv_run / "checkpoints" / "evil.ckpt"
    torch.save({"state_dict": {}, "x": _Payload(marker)}, evil)
    try:
        proc = run_inproc("evaluate.py", f"ckpt_path={evil}", run_dir=tmp_path / "eval", fast=False)
    finally:
        evil.unlink()
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "safely" in lines[0], proc.stderr[-2000:]
    assert not marker.exists() and not (tmp_path / "eval").exists()


def test_evaluate_with_another_models_checkpoint_is_one_line(csv_run: Path, tmp_path: Path) -> None:
    ckpt = csv_run / "checkpoints" / "last.ckpt"
    proc = run_inproc("evaluate.py", f"ckpt_path={ckpt}", "model=myow", run_dir=tmp_path / "eval", fast=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "ckpt_path" in lines[0] and "not a checkpoint of model" in lines[0] and "MYOW" in lines[0]
    assert not (tmp_path / "eval").exists()


def test_tampered_cache_entry_is_never_served(tmp_path: Path) -> None:
    """Downloaded cutouts live in the checksummed cache: a changed byte is caught before use."""
    path = tmp_path / "cutout.npy"
    save_array(path, np.arange(64, dtype=np.uint8).reshape(4, 4, 4), {"channel": "image"})
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="cutout.npy"):
        load_array(path)
