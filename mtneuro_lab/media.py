"""Pictures of predictions on the dashboard and in the run directory (``callbacks.media``).

At validation (every ``every_n_epochs`` epochs of the fit) and at test, :class:`MediaLog`
collects small arrays on the training thread and renders them with matplotlib on a background
thread (:mod:`mtneuro_lab.metrics.figures`), so the next training steps do not wait for drawing:

* classification and segmentation: the stage's pooled confusion matrix (from the method's
  ``metrics.last_confusion``; W&B also gets it as a table);
* segmentation: a fixed set of ``samples`` tiles of the split, image | truth | prediction;
* EM and MAE methods: what they offer through :meth:`BaseMethod.offer_media` from a step
  (``em``: a few z slices of image, truth, probability and segmentation; ``mae``: masked input,
  reconstruction, target).

Every figure goes to each logger that shows images (W&B ``media/<stage>/<name>`` images and
tables, TensorBoard images) and, with ``png: true``, to ``<run>/media/<stage>/<name>[_e<epoch>].png``
(the only place it goes with ``logger=csv``). With ``png: false`` and no such logger nothing is
collected or drawn (``+debug=fast``). Task 3 read-outs (not a Lightning run) send their
UMAPs and predicted-vs-true plots through :func:`deliver` too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from mtneuro_lab.errors import ConfigError
from mtneuro_lab.io import atomic_write_bytes
from mtneuro_lab.methods.base import BaseMethod
from mtneuro_lab.metrics import figures
from mtneuro_lab.metrics.figures import Panel
from mtneuro_lab.metrics.overlays import middle_slice, overlay_image

log = logging.getLogger(__name__)


@dataclass
class MediaItem:
    """One rendered figure: ``media/<stage>/<name>`` on dashboards; ``table`` = (columns, rows) for W&B."""

    name: str
    image: np.ndarray
    table: tuple[list[str], list[list[Any]]] | None = None


@dataclass
class Batch:
    """What one stage of one epoch produced, to render off the training thread."""

    stage: str
    epoch: int | None  # None at test
    step: int
    arrays: dict[str, Mapping[str, Any]] = field(default_factory=dict)  # kind -> arrays
    class_names: list[str] = field(default_factory=list)


# -- rendering (background thread) ---------------------------------------------------------------
def _np(value: Any) -> np.ndarray:
    return value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def confusion_items(counts: np.ndarray, class_names: Sequence[str], stage: str) -> list[MediaItem]:
    counts = np.asarray(counts, dtype=np.int64)
    rows = [[name, *map(int, row)] for name, row in zip(class_names, counts)]
    image = figures.confusion_image(counts, class_names, f"{stage} confusion (row-normalised)")
    return [MediaItem("confusion", image, (["truth \\ prediction", *class_names], rows))]


def em_slices(arrays: Mapping[str, Any], slices: int) -> np.ndarray:
    """Rows: ``slices`` z planes; columns: image, truth, probability, segmentation (those given)."""
    image = _np(arrays["image"])
    depth = image.shape[0]
    picks = np.linspace(0, depth - 1, slices + 2)[1:-1].round().astype(int) if depth > 1 else np.array([0])
    columns = [
        ("truth", "labels", arrays.get("truth")),
        ("probability", "heat", arrays.get("prob")),
        ("segmentation", "labels", arrays.get("seg")),
    ]
    rows = []
    for z in picks:
        row = [Panel(image=image[z], title=f"image z={z}")]
        for title, how, value in columns:
            if value is not None:
                plane = _np(value)[z]
                row.append(Panel(image=image[z], title=f"{title} z={z}", **{how: plane}))
        rows.append(row)
    return figures.panel_grid(rows)


def reconstruction_grid(arrays: Mapping[str, Any]) -> np.ndarray:
    """MAE: per sample, the middle slice of masked input | reconstruction | target."""
    masked, pred, target = (_np(arrays[k]) for k in ("masked", "prediction", "target"))
    rows = []
    for i in range(len(target)):
        rows.append(
            [
                Panel(image=middle_slice(masked[i]), title="masked input"),
                Panel(image=middle_slice(pred[i]), title="reconstruction"),
                Panel(image=middle_slice(target[i]), title="target"),
            ]
        )
    return figures.panel_grid(rows)


def render(batch: Batch, slices: int = 3) -> list[MediaItem]:
    """The figures of one stage's arrays (pure: no trainer, no logger)."""
    items: list[MediaItem] = []
    for kind, arrays in batch.arrays.items():
        if kind == "confusion":
            items += confusion_items(arrays["counts"], batch.class_names, batch.stage)
        elif kind == "overlays":
            tiles = (arrays["images"], arrays["truths"], arrays["preds"], arrays["z"])
            image = overlay_image(*tiles, batch.class_names, f"{batch.stage} tiles")
            items.append(MediaItem("overlays", image))
        elif kind == "em":
            items.append(MediaItem("em_slices", em_slices(arrays, slices)))
        elif kind == "mae":
            items.append(MediaItem("reconstruction", reconstruction_grid(arrays)))
    return items


# -- delivery ------------------------------------------------------------------------------------
def save_pngs(items: Iterable[MediaItem], directory: Path, suffix: str = "") -> list[Path]:
    """``<directory>/<name><suffix>.png`` for each item, written atomically."""
    paths = []
    for item in items:
        path = Path(directory) / f"{item.name}{suffix}.png"
        atomic_write_bytes(path, figures.png_bytes(item.image))
        paths.append(path)
    return paths


def write_pngs(items: Iterable[MediaItem], run_dir: Path, stage: str, epoch: int | None) -> list[Path]:
    """``<run>/media/<stage>/<name>[_e<epoch>].png``."""
    return save_pngs(items, Path(run_dir) / "media" / stage, f"_e{epoch:03d}" if epoch is not None else "")


def shows_images(logger: Any) -> bool:
    """W&B and TensorBoard show figures; CSV (and no logger) do not."""
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

    return isinstance(logger, WandbLogger | TensorBoardLogger)


def deliver(items: Sequence[MediaItem], loggers: Iterable[Any], stage: str, step: int) -> None:
    """Send figures to every logger that shows images: W&B (images, tables) and TensorBoard."""
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

    for lg in loggers:
        for item in items:
            key = f"media/{stage}/{item.name}"
            if isinstance(lg, WandbLogger):
                lg.log_image(key=key, images=[item.image], step=step)
                if item.table is not None:
                    lg.log_table(key=f"{key}_table", columns=item.table[0], data=item.table[1], step=step)
            elif isinstance(lg, TensorBoardLogger):
                lg.experiment.add_image(key, item.image, global_step=step, dataformats="HWC")


# -- the callback --------------------------------------------------------------------------------
class MediaLog(pl.Callback):
    """Figures at validation (every ``every_n_epochs`` of the fit) and at test; see the module doc.

    ``samples``: segmentation tiles drawn (a fixed set, spread over the split); ``slices``: z
    planes of EM volumes; ``png``: also write PNGs under ``<run>/media/``; ``background``:
    render on a worker thread (false: on the training thread, e.g. to measure its cost).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        samples: int = 4,
        slices: int = 3,
        png: bool = True,
        background: bool = True,
    ) -> None:
        if every_n_epochs < 1:
            raise ConfigError(f"callbacks.media.every_n_epochs: must be >= 1, got {every_n_epochs}")
        if samples < 0 or slices < 1:
            raise ConfigError(
                f"callbacks.media.samples/slices: need samples >= 0 and slices >= 1, got {samples}/{slices}"
            )
        self.every_n_epochs = int(every_n_epochs)
        self.samples = int(samples)
        self.slices = int(slices)
        self.png = png
        self.background = background
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[tuple[Future, Batch]] = []
        self._open: set[str] = set()  # stages collecting offered arrays now
        self._offered: dict[str, dict[str, Mapping[str, Any]]] = {}
        self._tiles: dict[str, np.ndarray] = {}  # stage -> fixed sample indices
        self._run_dir = Path(".")
        self._loggers: list[Any] = []
        #: paths of the PNGs written so far (tests, the run summary)
        self.written: list[Path] = []

    # -- what methods call (BaseMethod.offer_media) ----------------------------------------------
    def wants(self, stage: str, kind: str) -> bool:
        return stage in self._open and kind not in self._offered.get(stage, {})

    def take(self, stage: str, kind: str, arrays: Mapping[str, Any]) -> None:
        self._offered.setdefault(stage, {})[kind] = {k: _detached(v) for k, v in arrays.items()}

    # -- Lightning hooks -------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._run_dir = Path(trainer.default_root_dir)
        self._loggers = list(trainer.loggers)
        # nothing is drawn (nor predicted, nor copied) that no PNG and no image logger would receive
        if trainer.is_global_zero and self.receivers() and isinstance(pl_module, BaseMethod):
            pl_module.media_sink = self

    def receivers(self) -> bool:
        """Whether a figure would go anywhere: ``png`` or a logger that shows images."""
        return self.png or any(shows_images(lg) for lg in self._loggers)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.flush()
        if isinstance(pl_module, BaseMethod) and pl_module.media_sink is self:
            pl_module.media_sink = None

    def _due(self, trainer: pl.Trainer) -> bool:
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        return trainer.is_global_zero and fitting and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer) and self.receivers():
            self._open.add("val")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.receivers():
            self._open.add("test")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "val" in self._open:
            self._collect(trainer, pl_module, "val", trainer.current_epoch)
        self._deliver_done()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" in self._open:
            self._collect(trainer, pl_module, "test", None)
        self.flush()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._pending:
            self._deliver_done()

    # -- collecting (training thread: small copies and a few predictions) ------------------------
    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, epoch: int | None) -> None:
        self._open.discard(stage)
        batch = Batch(stage, epoch, int(trainer.global_step), dict(self._offered.pop(stage, {})))
        batch.class_names = list(getattr(pl_module, "class_names", []))
        confusion = getattr(getattr(pl_module, "metrics", None), "last_confusion", {}).get(stage)
        if confusion is not None:
            batch.arrays["confusion"] = {"counts": confusion.numpy().copy()}
        tiles = self._segmentation_tiles(trainer, pl_module, stage)
        if tiles is not None:
            batch.arrays["overlays"] = tiles
        if not batch.arrays:
            return
        if self.background:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="media")
            self._pending.append((self._pool.submit(self._render_and_write, batch), batch))
        else:
            self._send(batch, self._render_and_write(batch))

    def _segmentation_tiles(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> dict | None:
        """Image, truth and prediction of a fixed set of the split's tiles (segmentation methods)."""
        predict: Callable | None = getattr(pl_module, "predict_arrays", None)
        dm: Any = getattr(trainer, "datamodule", None)
        arrays = getattr(dm, "arrays", {}).get(stage) if dm is not None else None
        if predict is None or dm is None or arrays is None or self.samples == 0 or arrays.targets.ndim < 2:
            return None
        if stage not in self._tiles:
            self._tiles[stage] = np.linspace(0, len(arrays) - 1, min(self.samples, len(arrays))).round().astype(int)
        pick = self._tiles[stage]
        preds = predict(arrays.images[pick], dm.mean, dm.std)
        return {"images": arrays.images[pick], "truths": arrays.targets[pick], "preds": preds, "z": arrays.z[pick]}

    # -- rendering and delivery --------------------------------------------------------------------
    def _render_and_write(self, batch: Batch) -> list[MediaItem]:
        items = render(batch, self.slices)
        if self.png:
            self.written.extend(write_pngs(items, self._run_dir, batch.stage, batch.epoch))
        return items

    def _send(self, batch: Batch, items: list[MediaItem]) -> None:
        try:
            deliver(items, self._loggers, batch.stage, batch.step)
        except Exception as err:  # noqa: BLE001 - a dashboard hiccup must not end a training run
            log.warning("media: could not send %s figures to the loggers: %s", batch.stage, err)

    def _finish(self, future: Future, batch: Batch) -> None:
        try:
            items = future.result()
        except Exception as err:  # noqa: BLE001 - a figure that fails to draw must not end the run
            log.warning("media: %s figures failed: %s: %s", batch.stage, type(err).__name__, err)
            return
        self._send(batch, items)

    def _deliver_done(self) -> None:
        done = [(f, b) for f, b in self._pending if f.done()]
        self._pending = [(f, b) for f, b in self._pending if not f.done()]
        for future, batch in done:
            self._finish(future, batch)

    def flush(self) -> None:
        """Wait for every figure still being rendered and deliver it (test end, teardown)."""
        pending, self._pending = self._pending, []
        for future, batch in pending:
            self._finish(future, batch)


def _detached(value: Any) -> Any:
    return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else np.array(value, copy=True)
