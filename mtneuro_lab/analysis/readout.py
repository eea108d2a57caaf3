"""Task 3 read-out: linear regression of semantic features on frozen embeddings.

``python evaluate.py task=semantic ckpt_path=<Task 1 checkpoint>`` (any Task 1 method with an
``encoder``: supervised, mixup, BYOL, MYOW, MYOW-m) or ``model=pca|nmf`` without a checkpoint
(the decomposition is fitted on ``task.fit_samples`` first) ends in :func:`run_semantic`:

1. embed every sample of ``task.samples`` (each quadrant crop, or each tile) at the encoder's
   Task 1 resolution, with the normalisation it was trained with;
2. per feature, standardise the embeddings and fit ``LinearRegression``: pooled, region-only
   and within-region R^2 (see :func:`linear_readout`), in-sample (the paper's protocol: fit and
   score on the same samples) and k-fold cross-validated (blocked z folds by default: the
   honest number); samples whose feature is NaN (no cells, or < 2 cells for nn_distance) are
   left out of that feature's fit and counted;
3. write ``metrics.json`` (keys in :data:`METRIC_KEYS`; the CV headline ``r2_cv/<f>``,
   ``test/r2_region_only/<f>``, ``test/r2_within/<f>``), ``semantic_r2.md``/``.csv`` (the table), ``features.csv``,
   ``embeddings.npy`` and ``umap_<feature>.png``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from mtneuro_lab.analysis.embeddings import (
    embed_images,
    embedding_fn,
    split_tiles,
    umap_coordinates,
    umap_images,
)
from mtneuro_lab.build import (
    build_loggers,
    build_method,
    build_source,
    build_task,
    data_config,
    group_choice,
    load_method_checkpoint,
    method_class,
    task_facts,
)
from mtneuro_lab.config.schema import DataConfig, import_target, validate_config
from mtneuro_lab.data.contract import Task
from mtneuro_lab.data.cubes import catalog_from_config
from mtneuro_lab.data.datamodules import VolumeDataModule
from mtneuro_lab.data.features import FeatureTable
from mtneuro_lab.data.semantic_task import SemanticFeatureTask, blocked_folds
from mtneuro_lab.data.tasks import CubeTask
from mtneuro_lab.errors import CheckpointError, ConfigError, existing_checkpoint
from mtneuro_lab.io import atomic_write_bytes
from mtneuro_lab.media import MediaItem, deliver, save_pngs, write_pngs
from mtneuro_lab.methods.decomposition import DecompositionClassifier
from mtneuro_lab.metrics import figures
from mtneuro_lab.rundir import evaluation_config, save_config, saved_config, write_metrics
from mtneuro_lab.tracking import finish_loggers, set_job_type, wandb_runs

log = logging.getLogger(__name__)


# -- the regression -----------------------------------------------------------------------------
#: per-feature results: in-sample and CV (mean, std over folds) of the three R^2 kinds
R2_KINDS: tuple[str, ...] = ("r2", "r2_region_only", "r2_within")
RESULT_KEYS: tuple[str, ...] = (
    "r2",
    "r2_cv",
    "r2_cv_std",
    "r2_region_only",
    "r2_region_only_cv",
    "r2_region_only_cv_std",
    "r2_within",
    "r2_within_cv",
    "r2_within_cv_std",
    "n",
    "n_nan",
)


def cv_splits(z: np.ndarray, folds: int, cv: str, seed: int, gap: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(fit, held_out)`` row indices: contiguous z blocks (``blocked``) or seeded ``shuffled`` KFold."""
    from sklearn.model_selection import KFold

    if cv == "shuffled":
        return list(KFold(n_splits=folds, shuffle=True, random_state=seed).split(z))
    return blocked_folds(z, folds, gap)


def region_means(values: np.ndarray, region: np.ndarray, fit: np.ndarray) -> dict[int, np.ndarray]:
    """Mean of ``values`` per region over the ``fit`` rows only; key -1 holds their overall mean.

    The overall mean stands in for a region that has no fitting rows (cannot happen with whole
    z-block folds of cubes that share z, but a shuffled fold of a tiny region could miss it).
    """
    means = {-1: values[fit].mean(axis=0)}
    for r in np.unique(region[fit]):
        means[int(r)] = values[fit][region[fit] == r].mean(axis=0)
    return means


def _lookup(means: Mapping[int, np.ndarray], region: np.ndarray) -> np.ndarray:
    return np.stack([means.get(int(r), means[-1]) for r in region])


def fold_predictions(
    x: np.ndarray, y: np.ndarray, region: np.ndarray, fit: np.ndarray, held: np.ndarray, model: Any
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per R^2 kind, ``(target, prediction)`` on the ``held`` rows, learnt from the ``fit`` rows only.

    ``r2``: the embedding regressed on the feature. ``r2_region_only``: the feature's mean over
    the fitting rows of the sample's region (a four-value lookup, no embedding). ``r2_within``:
    the feature and the embedding both minus their region means OVER THE FITTING ROWS, then the
    regression of one on the other; the held-out target is the feature minus the fitting rows'
    region mean, so a held-out block whose region level drifts is not explained away by its own
    mean (that would use the held-out answers).
    """
    from sklearn.base import clone

    y_means, x_means = region_means(y, region, fit), region_means(x, region, fit)
    y_res, x_res = y - _lookup(y_means, region), x - _lookup(x_means, region)
    pooled = clone(model).fit(x[fit], y[fit]).predict(x[held])
    within = clone(model).fit(x_res[fit], y_res[fit]).predict(x_res[held])
    return {
        "r2": (y[held], pooled),
        "r2_region_only": (y[held], _lookup(y_means, region[held])),
        "r2_within": (y_res[held], within),
    }


def _score(target: np.ndarray, prediction: np.ndarray) -> float:
    """R^2 against the scored rows' own mean; NaN when those rows are constant (no variance to explain)."""
    from sklearn.metrics import r2_score

    return math.nan if np.ptp(target) == 0 else float(r2_score(target, prediction))


def _no_r2(name: str, n: int, constant: bool) -> None:
    log.warning("semantic: no R^2 for %s (%d valid samples, constant=%s)", name, n, constant)


def linear_readout(
    embeddings: np.ndarray,
    table: FeatureTable,
    folds: int = 5,
    cv: str = "blocked",
    seed: int = 0,
    alpha: float = 0.0,
    gap: int = 0,
    predictions: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, dict[str, float]]:
    """Per feature, pooled, region-only and within-region R^2, in-sample and k-fold CV.

    Why three numbers: the four regions differ so much in vessel, axon and cell content that a
    pooled R^2 mostly measures which region a sample comes from. ``r2_region_only`` is what the
    region alone gives (the feature predicted by its region's mean); ``r2_within`` is what the
    embedding explains INSIDE a region (the region is given for free by centring both sides per
    region; R^2 over the residual variance). An embedding adds something beyond the region when
    ``r2_within`` is clearly above 0; a pooled ``r2`` close to ``r2_region_only`` says it does not.

    Honesty: every mean (region means of feature and embedding, the scaler, the regression) is
    computed on the fitting rows only; CV scores the held-out fold against its own mean (like
    ``cross_val_score``), so a constant prediction scores <= 0. In-sample figures (the paper's
    protocol) fit and score on all rows: with ``d`` predictors they gain about ``d/N`` on noise,
    for the pooled and the within-region regression alike (the region-only lookup has 4
    parameters). ``blocked`` folds (default) keep whole z slabs together with ``gap`` slices
    dropped from training around each held-out block; ``shuffled`` folds put quadrants of the same
    and neighbouring slices on both sides and overstate every CV figure.

    Keys: ``r2``, ``r2_region_only``, ``r2_within`` (in-sample), each with ``_cv`` (mean over
    folds) and ``_cv_std``; ``n``/``n_nan`` (samples used/excluded: NaN features, e.g. no cells).
    A feature that is constant over its valid samples, or has fewer valid samples than
    ``2 * folds``, has no R^2 (NaN). ``alpha > 0`` fits ridge regression instead of least squares.
    ``predictions``, if given, receives per feature the held-out ``(truth, prediction)`` of the
    pooled regression over all folds (the predicted-vs-true figures).
    """
    from sklearn.linear_model import LinearRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(embeddings) != len(table):
        raise ValueError(f"{len(embeddings)} embeddings for {len(table)} feature rows")
    if len(table.region) != len(table):
        raise ValueError(f"features: {len(table.region)} region indices for {len(table)} samples")
    model = make_pipeline(StandardScaler(), Ridge(alpha=alpha) if alpha > 0 else LinearRegression())
    out: dict[str, dict[str, float]] = {}
    for name in table.names:
        y = table.column(name)
        ok = ~np.isnan(y)
        res = dict.fromkeys(RESULT_KEYS, math.nan) | {"n": float(ok.sum()), "n_nan": float((~ok).sum())}
        out[name] = res
        x, y_ok, region = embeddings[ok], y[ok], table.region[ok]
        if ok.sum() < 2 * folds or np.ptp(y_ok) == 0:
            _no_r2(name, int(ok.sum()), bool(ok.any() and np.ptp(y_ok) == 0))
            continue
        every = np.arange(len(y_ok))
        for kind, (target, pred) in fold_predictions(x, y_ok, region, every, every, model).items():
            res[kind] = _score(target, pred)
        scores: dict[str, list[float]] = {kind: [] for kind in R2_KINDS}
        held_out: list[tuple[np.ndarray, np.ndarray]] = []
        for fit, held in cv_splits(table.z[ok], folds, cv, seed, gap):
            for kind, (target, pred) in fold_predictions(x, y_ok, region, fit, held, model).items():
                scores[kind].append(_score(target, pred))
                if kind == "r2":
                    held_out.append((target, pred))
        if predictions is not None and held_out:
            predictions[name] = (np.concatenate([t for t, _ in held_out]), np.concatenate([p for _, p in held_out]))
        for kind, values in scores.items():
            if not np.isnan(values).all():
                res[f"{kind}_cv"], res[f"{kind}_cv_std"] = float(np.nanmean(values)), float(np.nanstd(values))
    return out


#: metrics.json key of each result: in-sample under today's names, the CV headline under test/
METRIC_KEYS: dict[str, str] = {
    "r2": "r2",
    "r2_cv": "r2_cv",
    "r2_cv_std": "r2_cv_std",
    "n": "n",
    "n_nan": "n_nan",
    "r2_region_only": "r2_region_only",
    "r2_within": "r2_within",
    "r2_region_only_cv": "test/r2_region_only",
    "r2_region_only_cv_std": "test/r2_region_only_std",
    "r2_within_cv": "test/r2_within",
    "r2_within_cv_std": "test/r2_within_std",
}


def metrics_of(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Flat ``metrics.json`` entries (see :data:`METRIC_KEYS`); missing R^2 values are left out."""
    flat: dict[str, float] = {}
    for name, res in results.items():
        for key, metric in METRIC_KEYS.items():
            if not math.isnan(res[key]):
                flat[f"{metric}/{name}"] = res[key]
    return flat


def table_text(results: Mapping[str, Mapping[str, float]], folds: int, cv: str, title: str) -> tuple[str, str]:
    """The R^2 table as Markdown and CSV: pooled, region-only and within-region, in-sample and CV."""

    def fmt(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v:.3f}"

    def cv_fmt(r: Mapping[str, float], kind: str) -> str:
        mean, std = r[f"{kind}_cv"], r[f"{kind}_cv_std"]
        return "n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"

    head = f"{folds}-fold CV ({cv})"
    md = [
        f"### {title}",
        "",
        f"| feature | R² in-sample | R² {head} | region-only R² in-sample | region-only R² {head} "
        f"| within-region R² in-sample | within-region R² {head} | samples | NaN excluded |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    csv = ["feature," + ",".join(RESULT_KEYS)]
    for name, r in results.items():
        cells = [f"{fmt(r[k])} | {cv_fmt(r, k)}" for k in R2_KINDS]
        md.append(f"| {name} | {' | '.join(cells)} | {int(r['n'])} | {int(r['n_nan'])} |")
        csv.append(",".join([name] + [("" if math.isnan(r[k]) else f"{r[k]:.6g}") for k in RESULT_KEYS]))
    return "\n".join(md) + "\n", "\n".join(csv) + "\n"


# -- the evaluate.py flow -----------------------------------------------------------------------
def is_semantic(cfg: DictConfig) -> bool:
    """Whether ``cfg.task`` is a Task 3 (semantic) task; False for anything unreadable."""
    try:
        target = cfg.task._target_
    except Exception:  # noqa: BLE001 - no task section: not ours, let the normal flow report it
        return False
    try:
        task_cls = import_target(str(target), "task")
    except ConfigError:
        return False
    return isinstance(task_cls, type) and issubclass(task_cls, Task) and task_cls.kind == "semantic"


def _model_name(cfg: DictConfig) -> str:
    return group_choice(cfg, "model")


def _fits_itself(method_cls: type) -> bool:
    """Decompositions (PCA/NMF) are fitted here (``fit_decomposition``) without a checkpoint."""
    return issubclass(method_cls, DecompositionClassifier)


def preflight(cfg: DictConfig) -> None:
    """evaluate.py's checks before a run directory exists (no data read)."""
    ckpt = cfg.get("ckpt_path")
    if ckpt:
        existing_checkpoint(str(ckpt))
        return
    validate_config(cfg)
    method_cls = method_class(cfg)
    if not _fits_itself(method_cls):
        raise ConfigError(
            f"ckpt_path: task=semantic with model={_model_name(cfg)} needs ckpt_path=<Task 1 "
            f"checkpoint>; only decompositions (model=pca, model=nmf) run without one"
        )


def _normalisation(state: Mapping[str, Any] | None, data: DataConfig, task: Any, source: Any) -> tuple[float, float]:
    """The mean/std the encoder was trained with: from the checkpoint, else recomputed."""
    saved = (state or {}).get(VolumeDataModule.__qualname__)
    if isinstance(saved, Mapping) and "mean" in saved and "std" in saved:
        return float(saved["mean"]), float(saved["std"])
    if data.normalize == "fixed":
        return 0.5, 0.25
    return VolumeDataModule.train_stats(task.build("train", source).images)


def run_semantic(cfg: DictConfig) -> dict[str, float]:
    """Embed all Task 3 samples with a frozen method, regress features, write metrics and plots."""
    ckpt = cfg.get("ckpt_path")
    ecfg = evaluation_config(cfg) if ckpt else cfg
    validate_config(ecfg)
    model_name = _model_name(ecfg)
    catalog = catalog_from_config(ecfg.cubes)
    task = build_task(ecfg, catalog)
    if not isinstance(task, SemanticFeatureTask):  # is_semantic() routed here by kind alone
        raise ConfigError(f"task._target_: task=semantic needs a SemanticFeatureTask, got {type(task).__name__}")
    method_cls = method_class(ecfg)
    state = None
    if ckpt:
        saved = saved_config(Path(str(ckpt)))
        task1 = build_task(saved, catalog_from_config(saved.cubes))
        if not isinstance(task1, CubeTask):
            raise CheckpointError(f"ckpt_path: {ckpt} was not trained on a Task 1 cube task (got {task1.name})")
        task.use_downsample(int(task1.downsample))
        ecfg.task.downsample = task.downsample  # recorded in config.yaml: the resolution read out
        facts = task_facts(task1)
    else:
        if not _fits_itself(method_cls):
            raise ConfigError(
                f"ckpt_path: task=semantic with model={model_name} needs ckpt_path=<Task 1 "
                f"checkpoint>; only decompositions (model=pca, model=nmf) run without one"
            )
        shape = task.sample_shape()  # a decomposition fitted here embeds exactly the read-out crops
        facts = {
            "num_classes": len(catalog.regions),
            "class_names": list(catalog.regions),
            "input_shape": (shape[0] // task.grid, shape[1] // task.grid),
        }
    method = build_method(ecfg, facts)
    embedding_fn(method, model_name)  # fail before reading data if there is nothing to embed with
    _check_fixed_size(method, task, model_name)
    source = build_source(ecfg, task, catalog)
    task.check_source(source)
    data = data_config(ecfg)
    run_dir = Path(ecfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(ecfg, run_dir)

    if ckpt:
        state = load_method_checkpoint(method, ecfg.ckpt_path, ecfg.model._target_)
    mean, std = _normalisation(state, data, task, source)
    if isinstance(method, DecompositionClassifier) and not ckpt:  # _fits_itself() checked the class above
        fit_crops = split_tiles(task.build("train", source).images, task.grid)
        log.info("semantic: fitting %s on %d crops of the fit_samples slices", model_name, len(fit_crops))
        method.fit_decomposition(fit_crops, mean, std)

    table = task.features(source)
    images = task.build("test", source).images
    crops = split_tiles(images, task.grid)
    log.info(
        "semantic: embedding %d samples (%s of %d slices, %dx%d px) with %s",
        len(crops),
        task.sample_unit,
        len(images),
        crops.shape[1],
        crops.shape[2],
        model_name,
    )
    embeddings = embed_images(method, crops, mean, std, task.embed_batch_size, model_name)
    held_out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    results = linear_readout(
        embeddings, table, task.folds, task.cv, int(ecfg.seed), task.alpha, task.cv_gap, predictions=held_out
    )

    fit = "least squares" if task.alpha == 0 else f"ridge alpha={task.alpha:g}"
    title = (
        f"Task 3 read-out: {model_name} ({Path(str(ckpt)).name if ckpt else 'fitted here'}), "
        f"{len(crops)} {task.sample_unit} samples, {fit}"
    )
    cv = f"{task.cv}, gap {task.cv_gap}" if task.cv == "blocked" else task.cv
    md, csv = table_text(results, task.folds, cv, title)
    atomic_write_bytes(run_dir / "semantic_r2.md", md.encode())
    atomic_write_bytes(run_dir / "semantic_r2.csv", csv.encode())
    table.to_csv(str(run_dir / "features.csv"))
    np.save(run_dir / "embeddings.npy", embeddings.astype(np.float32))
    items = prediction_items(held_out, model_name)
    write_pngs(items, run_dir, "readout", None)
    if task.umap:
        coords = umap_coordinates(embeddings, int(ecfg.seed), task.umap_neighbors)
        umaps = umap_images(coords, table.values, table.names, model_name)
        save_pngs(umaps, run_dir)  # umap_<feature>.png beside semantic_r2.md, as before
        items += umaps
    log.info("semantic read-out:\n%s", md)
    metrics = write_metrics(run_dir, metrics_of(results))
    _to_loggers(ecfg, items, metrics)
    return metrics


def prediction_items(held_out: Mapping[str, tuple[np.ndarray, np.ndarray]], model_name: str) -> list[MediaItem]:
    """Per feature, held-out (cross-validated) prediction against truth, with the line y = x."""
    return [
        MediaItem(
            f"pred_vs_true_{name}",
            figures.scatter_image(
                truth,
                pred,
                f"{name} (true)",
                f"{name} (predicted, held-out folds)",
                f"{model_name}: {name}",
                diagonal=True,
            ),
        )
        for name, (truth, pred) in held_out.items()
    ]


def _to_loggers(cfg: DictConfig, items: list[MediaItem], metrics: Mapping[str, Any]) -> None:
    """The read-out's figures and metrics to the configured loggers (W&B job_type ``readout``)."""
    set_job_type(cfg, "readout")
    loggers = build_loggers(cfg)
    try:
        for run in wandb_runs(loggers):
            run.log_config(cfg)
        deliver(items, loggers, "readout", 0)
    finally:
        finish_loggers(loggers, metrics)


def _check_fixed_size(method: Any, task: Any, model_name: str) -> None:
    """Flattening embeddings (PCA/NMF) only take the crop size they were fitted on."""
    if isinstance(getattr(method, "encoder", None), __import__("torch").nn.Module):
        return  # convolutional encoders pool over any size
    shape = task.sample_shape()
    crop = (shape[0] // task.grid, shape[1] // task.grid)
    fitted = tuple(getattr(method, "input_shape", crop))[-2:]
    if fitted != crop:
        raise ConfigError(
            f"task.sample_unit: model={model_name} embeds {fitted[0]}x{fitted[1]} tiles but "
            f"sample_unit={task.sample_unit} gives {crop[0]}x{crop[1]} crops; use "
            f"task.sample_unit=tile with this checkpoint, or no ckpt_path to fit on quadrants"
        )
