"""Task 3 read-out: linear regression of semantic features on frozen embeddings.

``python evaluate.py task=semantic ckpt_path=<Task 1 checkpoint>`` (any Task 1 method with an
``encoder``: supervised, mixup, BYOL, MYOW, MYOW-m) or ``model=pca|nmf`` without a checkpoint
(the decomposition is fitted on ``task.fit_samples`` first) ends in :func:`run_semantic`:

1. embed every sample of ``task.samples`` (each quadrant crop, or each tile) at the encoder's
   Task 1 resolution, with the normalisation it was trained with;
2. per feature, standardise the embeddings and fit ``LinearRegression``: R^2 in-sample (the
   paper's protocol: fit and score on the same samples) and k-fold cross-validated R^2 (the
   honest number); samples whose feature is NaN (no cells, or < 2 cells for nn_distance) are
   left out of that feature's fit and counted;
3. write ``metrics.json`` (``r2/<f>``, ``r2_cv/<f>``, ``r2_cv_std/<f>``, ``n/<f>``,
   ``n_nan/<f>``), ``semantic_r2.md``/``.csv`` (the table), ``features.csv``,
   ``embeddings.npy`` and ``umap_<feature>.png``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mtneuro_lab.analysis.embeddings import (
    embed_images,
    embedding_fn,
    plot_umaps,
    split_tiles,
    umap_coordinates,
)
from mtneuro_lab.analysis.features import FeatureTable
from mtneuro_lab.config.schema import DataConfig, _merge_dataclass, import_target, validate_config
from mtneuro_lab.data.cache import atomic_write_bytes
from mtneuro_lab.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


# -- the regression -----------------------------------------------------------------------------
def _cv_splitter(folds: int, cv: str, seed: int, z: np.ndarray) -> Any:
    from sklearn.model_selection import KFold, PredefinedSplit

    if cv == "shuffled":
        return KFold(n_splits=folds, shuffle=True, random_state=seed)
    # contiguous z blocks: every slice (and all its quadrants, in every region) in one fold
    lo, hi = int(z.min()), int(z.max()) + 1
    return PredefinedSplit(((z - lo) * folds) // (hi - lo))


def linear_readout(embeddings: np.ndarray, table: FeatureTable, folds: int = 5, cv: str = "shuffled",
                   seed: int = 0, alpha: float = 0.0) -> dict[str, dict[str, float]]:
    """Per feature: ``r2`` (in-sample), ``r2_cv`` (mean over folds), ``r2_cv_std``, ``n``, ``n_nan``.

    A feature that is constant over its valid samples, or has fewer valid samples than
    ``2 * folds``, has no R^2 (NaN) rather than a misleading one. ``alpha > 0`` fits ridge
    regression instead of ordinary least squares.
    """
    from sklearn.linear_model import LinearRegression, Ridge
    from sklearn.metrics import r2_score
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(embeddings) != len(table):
        raise ValueError(f"{len(embeddings)} embeddings for {len(table)} feature rows")
    out: dict[str, dict[str, float]] = {}
    for name in table.names:
        y = table.column(name)
        ok = ~np.isnan(y)
        res = {"n": float(ok.sum()), "n_nan": float((~ok).sum()), "r2": math.nan, "r2_cv": math.nan,
               "r2_cv_std": math.nan}
        x, y_ok, z_ok = embeddings[ok], y[ok], table.z[ok]
        splitter = _cv_splitter(folds, cv, seed, z_ok) if ok.sum() >= 2 * folds else None
        if splitter is None or np.ptp(y_ok) == 0:
            log.warning("semantic: no R^2 for %s (%d valid samples, constant=%s)", name, int(ok.sum()),
                        bool(ok.any() and np.ptp(y_ok) == 0))
            out[name] = res
            continue
        def model() -> Any:
            return make_pipeline(StandardScaler(), Ridge(alpha=alpha) if alpha > 0 else LinearRegression())

        res["r2"] = float(r2_score(y_ok, model().fit(x, y_ok).predict(x)))
        scores = cross_val_score(model(), x, y_ok, cv=splitter, scoring="r2")
        res["r2_cv"], res["r2_cv_std"] = float(scores.mean()), float(scores.std())
        out[name] = res
    return out


def metrics_of(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Flat ``metrics.json`` entries; features without an R^2 keep only their counts."""
    flat: dict[str, float] = {}
    for name, res in results.items():
        for key in ("r2", "r2_cv", "r2_cv_std", "n", "n_nan"):
            if not math.isnan(res[key]):
                flat[f"{key}/{name}"] = res[key]
    return flat


def table_text(results: Mapping[str, Mapping[str, float]], folds: int, cv: str, title: str) -> tuple[str, str]:
    """The R^2 table as Markdown and CSV."""
    def fmt(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v:.3f}"

    md = [f"### {title}", "", f"| feature | R² in-sample | R² {folds}-fold CV ({cv}) | samples | NaN excluded |",
          "|---|---|---|---|---|"]
    csv = ["feature,r2,r2_cv,r2_cv_std,n,n_nan"]
    for name, r in results.items():
        cv_text = "n/a" if math.isnan(r["r2_cv"]) else f"{r['r2_cv']:.3f} ± {r['r2_cv_std']:.3f}"
        md.append(f"| {name} | {fmt(r['r2'])} | {cv_text} | {int(r['n'])} | {int(r['n_nan'])} |")
        csv.append(",".join([name] + [("" if math.isnan(r[k]) else f"{r[k]:.6g}")
                                      for k in ("r2", "r2_cv", "r2_cv_std", "n", "n_nan")]))
    return "\n".join(md) + "\n", "\n".join(csv) + "\n"


# -- the evaluate.py flow -----------------------------------------------------------------------
def is_semantic(cfg: DictConfig) -> bool:
    """Whether ``cfg.task`` is a Task 3 (semantic) task; False for anything unreadable."""
    try:
        target = cfg.task._target_
    except Exception:  # noqa: BLE001 - no task section: not ours, let the normal flow report it
        return False
    try:
        return getattr(import_target(str(target), "task"), "kind", "") == "semantic"
    except ConfigError:
        return False


def _model_name(cfg: DictConfig) -> str:
    from mtneuro_lab.run import _choice

    return _choice(cfg, "model")


def _fits_itself(method_cls: type) -> bool:
    """Decompositions (PCA/NMF) expose ``fit_decomposition()`` and are fitted here without a checkpoint."""
    return callable(getattr(method_cls, "fit_decomposition", None))


def preflight(cfg: DictConfig) -> None:
    """evaluate.py's checks before a run directory exists (no data read)."""
    ckpt = cfg.get("ckpt_path")
    if ckpt:
        if not Path(str(ckpt)).is_file():
            raise CheckpointError(f"ckpt_path: no checkpoint file at {ckpt}")
        return
    validate_config(cfg)
    method_cls = import_target(cfg.model._target_, "model")
    if not _fits_itself(method_cls):
        raise ConfigError(f"ckpt_path: task=semantic with model={_model_name(cfg)} needs ckpt_path=<Task 1 "
                          f"checkpoint>; only decompositions (model=pca, model=nmf) run without one")


def _saved_config(ckpt: Path) -> DictConfig:
    from mtneuro_lab.checkpoints import run_dir_of

    path = run_dir_of(ckpt) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"ckpt_path: no config.yaml beside the checkpoint (looked for {path})")
    return OmegaConf.load(path)


def _normalisation(state: Mapping[str, Any] | None, data: DataConfig, task: Any, source: Any) -> tuple[float, float]:
    """The mean/std the encoder was trained with: from the checkpoint, else recomputed."""
    from mtneuro_lab.data.datamodules import VolumeDataModule

    saved = (state or {}).get(VolumeDataModule.__qualname__)
    if isinstance(saved, Mapping) and "mean" in saved and "std" in saved:
        return float(saved["mean"]), float(saved["std"])
    if data.normalize == "fixed":
        return 0.5, 0.25
    return VolumeDataModule._train_stats(task.build("train", source).images)


def run_semantic(cfg: DictConfig) -> dict[str, float]:
    """Embed all Task 3 samples with a frozen method, regress features, write metrics and plots."""
    from mtneuro_lab.checkpoints import load_checkpoint
    from mtneuro_lab.data.cubes import catalog_from_config
    from mtneuro_lab.run import (
        evaluation_config,
        instantiate_cfg,
        instantiate_filtered,
        save_config,
        write_metrics,
    )

    ckpt = cfg.get("ckpt_path")
    ecfg = evaluation_config(cfg) if ckpt else cfg
    validate_config(ecfg)
    model_name = _model_name(ecfg)
    catalog = catalog_from_config(ecfg.cubes)
    task = instantiate_cfg(ecfg.task, _convert_="all").bind(catalog)
    method_cls = import_target(ecfg.model._target_, "model")
    state = None
    if ckpt:
        saved = _saved_config(Path(str(ckpt)))
        task1 = instantiate_cfg(saved.task, _convert_="all").bind(catalog_from_config(saved.cubes))
        task.use_downsample(int(task1.downsample))
        ecfg.task.downsample = task.downsample  # recorded in config.yaml: the resolution read out
        facts = {"num_classes": task1.num_classes, "class_names": task1.class_names,
                     "input_shape": task1.sample_shape()}
    else:
        if not _fits_itself(method_cls):
            raise ConfigError(f"ckpt_path: task=semantic with model={model_name} needs ckpt_path=<Task 1 "
                              f"checkpoint>; only decompositions (model=pca, model=nmf) run without one")
        shape = task.sample_shape()  # a decomposition fitted here embeds exactly the read-out crops
        facts = {"num_classes": len(catalog.regions), "class_names": list(catalog.regions),
                     "input_shape": (shape[0] // task.grid, shape[1] // task.grid)}
    method = instantiate_cfg(ecfg.model, **facts, _convert_="all")
    embedding_fn(method, model_name)  # fail before reading data if there is nothing to embed with
    _check_fixed_size(method, task, model_name)
    source = instantiate_filtered(
        ecfg.source, modality=getattr(task, "modality", "xray"),
        cubes=OmegaConf.to_container(ecfg.cubes.sets, resolve=True), regions=list(catalog.regions),
        roi_ids=dict(catalog.roi_ids), cache_dir=str(ecfg.paths.cache_dir),
    )
    check = getattr(task, "check_source", None)
    check(source) if check is not None else task.check_extent(getattr(source, "z_extent", None))
    data: DataConfig = _merge_dataclass(DataConfig, ecfg.data, "data")
    run_dir = Path(ecfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(ecfg, run_dir)

    if ckpt:
        state = load_checkpoint(ecfg.ckpt_path)
        if "state_dict" not in state:
            raise CheckpointError(f"ckpt_path: {ecfg.ckpt_path} has no state_dict")
        try:
            method.load_state_dict(state["state_dict"], strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"ckpt_path: {ecfg.ckpt_path} does not fit model {ecfg.model._target_} "
                                  f"({str(err).splitlines()[0]})") from None
    mean, std = _normalisation(state, data, task, source)
    if not ckpt:
        fit_crops = split_tiles(task.build("train", source).images, task.grid)
        log.info("semantic: fitting %s on %d crops of the fit_samples slices", model_name, len(fit_crops))
        method.fit_decomposition(fit_crops, mean, std)

    table = task.features(source)
    images = task.build("test", source).images
    crops = split_tiles(images, task.grid)
    log.info("semantic: embedding %d samples (%s of %d slices, %dx%d px) with %s", len(crops),
             task.sample_unit, len(images), crops.shape[1], crops.shape[2], model_name)
    embeddings = embed_images(method, crops, mean, std, task.embed_batch_size, model_name)
    results = linear_readout(embeddings, table, task.folds, task.cv, int(ecfg.seed), task.alpha)

    fit = "least squares" if task.alpha == 0 else f"ridge alpha={task.alpha:g}"
    title = (f"Task 3 read-out: {model_name} ({Path(str(ckpt)).name if ckpt else 'fitted here'}), "
             f"{len(crops)} {task.sample_unit} samples, {fit}")
    md, csv = table_text(results, task.folds, task.cv, title)
    atomic_write_bytes(run_dir / "semantic_r2.md", md.encode())
    atomic_write_bytes(run_dir / "semantic_r2.csv", csv.encode())
    table.to_csv(str(run_dir / "features.csv"))
    np.save(run_dir / "embeddings.npy", embeddings.astype(np.float32))
    if task.umap:
        coords = umap_coordinates(embeddings, int(ecfg.seed), task.umap_neighbors)
        plot_umaps(coords, table.values, table.names, run_dir, model_name)
    log.info("semantic read-out:\n%s", md)
    return write_metrics(run_dir, metrics_of(results))


def _check_fixed_size(method: Any, task: Any, model_name: str) -> None:
    """Flattening embeddings (PCA/NMF) only take the crop size they were fitted on."""
    if isinstance(getattr(method, "encoder", None), __import__("torch").nn.Module):
        return  # convolutional encoders pool over any size
    shape = task.sample_shape()
    crop = (shape[0] // task.grid, shape[1] // task.grid)
    fitted = tuple(getattr(method, "input_shape", crop))[-2:]
    if fitted != crop:
        raise ConfigError(f"task.sample_unit: model={model_name} embeds {fitted[0]}x{fitted[1]} tiles but "
                          f"sample_unit={task.sample_unit} gives {crop[0]}x{crop[1]} crops; use "
                          f"task.sample_unit=tile with this checkpoint, or no ckpt_path to fit on quadrants")
