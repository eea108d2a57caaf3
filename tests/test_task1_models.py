"""Task 1 models through the CLI on the ROI tasks, checkpoint reproduction, and PCA/NMF fits."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import compose, read_metrics, run_inproc
from sklearn.decomposition import NMF, PCA

from mtneuro_lab.config.schema import validate_config
from mtneuro_lab.errors import ConfigError
from mtneuro_lab.methods import decomposition
from mtneuro_lab.methods.decomposition import DecompositionClassifier, nmf_transform

CLASSES = ["cortex", "striatum", "vp", "zi"]
REGIONS = ("cortex", "striatum", "vp", "zi")
SSL_MODELS = {"byol", "myow", "myow_m"}
#: decompositions small enough for a CPU test (the SSL models run with +debug=fast_ssl)
DECOMPOSITION_SIZES = {"pca": ("model.n_components=32",), "nmf": ("model.n_components=16", "model.max_iter=10")}
#: default suite: every ROI task once, the SSL base and MYOW mining, a decomposition with evaluate.py;
#: MYOW, NMF and mixup also run in-process (test_ssl.py, the spy test) and in the slow full grid
DEFAULT_GRID = [("byol", "roi_c1"), ("myow_m", "roi_c3"), ("pca", "roi_c2")]
FULL_GRID = [(m, t) for m in ("byol", "myow", "myow_m", "mixup", "pca", "nmf") for t in ("roi_c1", "roi_c2", "roi_c3")]


def _train(model: str, task: str, run_dir: Path) -> subprocess.CompletedProcess:
    overrides = (f"model={model}", f"task={task}", *DECOMPOSITION_SIZES.get(model, ()))
    return run_inproc("train.py", *overrides, run_dir=run_dir, fast="fast_ssl" if model in SSL_MODELS else True)


def _check_metrics(model: str, metrics: dict[str, float]) -> None:
    assert 0 <= metrics["test/acc"] <= 1
    for region in REGIONS:
        assert f"test/acc_{region}" in metrics
    if model in SSL_MODELS:
        assert 0 <= metrics["test/acc_corners"] <= 1


@pytest.mark.parametrize("model, task", DEFAULT_GRID)
def test_model_trains_through_the_cli(tmp_path, model: str, task: str) -> None:
    run_dir = tmp_path / "run"
    proc = _train(model, task, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(run_dir)
    _check_metrics(model, metrics)
    if model in ("byol", "pca"):  # the checkpoint alone reproduces the final metric
        ckpts = sorted((run_dir / "checkpoints").glob("epoch*.ckpt"))
        assert ckpts
        eval_dir = tmp_path / "eval"
        proc = run_inproc("evaluate.py", f"ckpt_path={ckpts[-1]}", run_dir=eval_dir, fast=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        again = read_metrics(eval_dir)
        assert again["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("model, task", [c for c in FULL_GRID if c not in DEFAULT_GRID])
def test_model_trains_through_the_cli_full_grid(tmp_path, model: str, task: str) -> None:
    run_dir = tmp_path / "run"
    proc = _train(model, task, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_metrics(model, read_metrics(run_dir))


@pytest.mark.parametrize("model", ["mixup", "byol", "myow", "myow_m", "pca", "nmf"])
def test_model_configs_compose_and_validate(model: str) -> None:
    cfg = compose([f"model={model}"])
    validate_config(cfg)
    if model == "mixup":
        assert cfg.model._target_.endswith("SupervisedClassifier") and 0 < cfg.model.mixup_prob <= 1
    if model in SSL_MODELS:  # paper defaults
        assert cfg.model.optimizer.lr == 0.03 and cfg.model.views.crop_fraction == 0.5
        assert (cfg.model.hidden_dim, cfg.model.proj_dim) == (4096, 256)
        assert (cfg.model.ema_start, cfg.model.ema_end) == (0.996, 1.0)
    if model in ("myow", "myow_m"):
        assert (cfg.model.k, cfg.model.mined_weight, cfg.model.ramp_epochs) == (1, 0.1, 10)
    if model in ("pca", "nmf"):
        assert cfg.model.kind == model and cfg.model.n_components == 256


def test_bad_model_value_fails_in_one_line_before_training(tmp_path) -> None:
    proc = run_inproc("train.py", "model=myow", "model.pool=everywhere", run_dir=tmp_path / "run")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "model.pool" in lines[0] and "batch, queue" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "model, override, key",
    [
        ("byol", "model.views.crop_fraction=1.5", "model.views.crop_fraction"),
        ("myow_m", "model.views.hflip=sometimes", "model.views.hflip"),
        ("byol", "model.linear_eval.lr=0", "model.linear_eval.lr"),
        ("pca", "model.kind=ica", "model.kind"),
        ("nmf", "model.n_components=0", "model.n_components"),
        ("mixup", "model.mixup_prob=1.5", "model.mixup_prob"),
    ],
)
def test_bad_model_values_raise_config_errors_naming_the_key(model: str, override: str, key: str) -> None:
    from mtneuro_lab.run import build_components

    cfg = compose([f"model={model}", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        validate_config(cfg)
        build_components(cfg)
    assert "\n" not in str(info.value)


# -- PCA / NMF -----------------------------------------------------------------------------------
def _images(n: int, seed: int = 0, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)


def test_pca_embedding_reproduces_sklearn_from_buffers() -> None:
    images = _images(60)
    model = DecompositionClassifier(4, CLASSES, (16, 16), kind="pca", n_components=8, max_fit_samples=60)
    model.fit_decomposition(images, mean=0.5, std=0.25)
    rows = images.reshape(60, -1).astype(np.float32) / 255
    expected = PCA(8, random_state=0).fit(rows).transform(rows)
    x = (torch.from_numpy(rows).view(60, 1, 16, 16) - 0.5) / 0.25  # what the datamodule hands out
    code = model.embed(x) * model.feat_std + model.feat_mean
    # components are defined up to sign
    signs = np.sign((code.numpy() * expected).sum(0))
    np.testing.assert_allclose(code.numpy() * signs, expected, atol=2e-3)
    torch.testing.assert_close(model.embed(x).mean(0), torch.zeros(8), atol=1e-4, rtol=0)


def test_nmf_transform_matches_sklearn() -> None:
    rows = np.random.default_rng(1).random((30, 20)).astype(np.float64)
    nmf = NMF(5, init="nndsvda", solver="mu", max_iter=50, tol=0, random_state=0).fit(rows)
    for i in range(3):  # one tile at a time: sklearn starts W from the mean of what it transforms
        expected = nmf.transform(rows[i : i + 1])
        got = nmf_transform(torch.from_numpy(rows[i : i + 1]), torch.from_numpy(nmf.components_), 50)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["pca", "nmf"])
def test_decomposition_never_sees_test_data(monkeypatch, kind: str) -> None:
    """Through the real flow (phantom ROI-C1): everything sklearn fits on is a training tile."""
    from mtneuro_lab.run import build_components

    seen: list[np.ndarray] = []
    base = PCA if kind == "pca" else NMF

    class Spy(base):  # type: ignore[misc, valid-type]
        def fit(self, X, y=None, **kw):
            seen.append(np.array(X, copy=True))
            return super().fit(X, y, **kw)

    monkeypatch.setattr(decomposition, kind.upper(), Spy)
    cfg = compose(
        [
            f"model={kind}",
            "+debug=fast",
            "model.n_components=16",
            "model.max_iter=5",
            "model.max_fit_samples=300",
        ]
    )
    comps = build_components(cfg)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        limit_test_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    trainer.fit(comps.method, datamodule=comps.datamodule)
    assert "test" not in comps.datamodule.arrays, "the test split was built during fit"
    trainer.test(comps.method, datamodule=comps.datamodule)
    (fitted,) = seen
    assert len(fitted) == 300

    def to_rows(a: np.ndarray) -> set[bytes]:
        return {r.tobytes() for r in (a.reshape(len(a), -1).astype(np.float32) / 255)}

    train_rows = to_rows(comps.datamodule.arrays["train"].images)
    test_rows = to_rows(comps.datamodule.arrays["test"].images)
    fitted_rows = {r.astype(np.float32).tobytes() for r in fitted}
    assert fitted_rows <= train_rows
    assert not fitted_rows & test_rows
    assert bool(comps.method.fitted)


def test_decomposition_rejects_bad_sizes() -> None:
    with pytest.raises(ConfigError, match="model.pool"):
        DecompositionClassifier(4, CLASSES, (64, 64), pool=3)
    with pytest.raises(ConfigError, match="model.n_components"):
        DecompositionClassifier(4, CLASSES, (16, 16), n_components=300)
