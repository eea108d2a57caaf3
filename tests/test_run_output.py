"""What a run shows and leaves: progress lines in a piped log, figures under media/, the README's
run-directory table, and the next commands printed at the end."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, read_metrics, run_inproc

from mtneuro_lab import media, progress
from mtneuro_lab.errors import ConfigError

#: epoch 1/2 step 2/4 | train/loss 1.39 val/loss 1.41 val/acc 0.25 | 12.5 samples/s | elapsed 0:00:03 left 0:00:03
EPOCH_LINE = re.compile(
    r"epoch (\d+)/2 step (\d+)/4 \| train/loss [-\d.e+]+ val/loss [-\d.e+]+ val/acc [-\d.e+]+ \| "
    r"[\d.e+]+ samples/s \| elapsed \d+:\d\d:\d\d left \d+:\d\d:\d\d$"
)


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Two epochs of two batches with the CSV logger, stdout piped (not a terminal): in-process,
    stdout is a ``StringIO`` whose ``isatty()`` is false, as for a pipe; Hydra's console handler
    writes to it."""
    run_dir = tmp_path_factory.mktemp("piped") / "run"
    proc = run_inproc(
        "train.py",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=true",  # the progress log must switch the bar off itself
        "logger=csv",
        "callbacks.progress_log.every_n_steps=1",
        "callbacks.media.png=true",  # +debug=fast draws no figures for a CSV-logged run
        run_dir=run_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout + proc.stderr


def test_piped_output_has_one_progress_line_per_epoch_and_no_bar(piped_run: tuple[Path, str]) -> None:
    run_dir, output = piped_run
    lines = [ln.split(" - ", 1)[-1] for ln in output.splitlines() if "mtneuro_lab.progress" in ln]
    epochs = [EPOCH_LINE.search(ln) for ln in lines]
    assert [(int(m[1]), int(m[2])) for m in epochs if m] == [(1, 2), (2, 4)], lines
    assert sum("batch 1/2" in ln for ln in lines) == 2, lines  # every_n_steps=1: mid-epoch lines too
    bars = re.findall(r"(?:Epoch \d+/\d+|Validation|Testing) +━|\d it/s", output)  # Lightning's bars
    assert not bars, f"a progress bar was drawn into a pipe: {bars[:3]}"
    logged = (run_dir / "cli.log").read_text()
    assert all(line in logged for line in lines), "the progress lines must also be in cli.log"


def test_figures_are_written_per_validation_and_test(piped_run: tuple[Path, str]) -> None:
    run_dir, _ = piped_run
    pngs = sorted(str(p.relative_to(run_dir / "media")) for p in (run_dir / "media").rglob("*.png"))
    assert pngs == ["test/confusion.png", "val/confusion_e000.png", "val/confusion_e001.png"]
    assert all((run_dir / "media" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def _readme_run_table() -> list[tuple[list[str], str]]:
    """(entry names, written by) of each row of the README's run-directory table."""
    text = (ROOT / "README.md").read_text().split("## Run directories", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in text.splitlines() if ln.startswith("| `")]
    return [(re.findall(r"`([^`]+)`", row.split("|")[1]), row.split("|")[2].strip()) for row in rows]


def test_readme_run_directory_table_matches_a_real_run(piped_run: tuple[Path, str]) -> None:
    run_dir, _ = piped_run
    table = _readme_run_table()
    named = {name.rstrip("/") for names, _ in table for name in names}
    written = {p.name for p in run_dir.iterdir()}
    assert written <= named, f"in the run directory but not in README's table: {sorted(written - named)}"
    expected = {
        n.rstrip("/")
        for names, by in table
        if by.startswith(("every run", "every training run", "`logger=csv`"))
        for n in names
    }
    assert expected <= written, f"README says every run writes {sorted(expected - written)}"


def test_a_run_ends_with_its_directory_and_three_next_commands(piped_run: tuple[Path, str]) -> None:
    run_dir, output = piped_run
    tail = output[output.index(f"run directory: {run_dir}") :].splitlines()
    best = f"epoch{read_metrics(run_dir)['best_epoch']:03d}.ckpt"
    assert tail[1] == "next:"
    assert tail[2].startswith(f"  python evaluate.py ckpt_path={run_dir / 'checkpoints' / best}")
    assert tail[3].startswith(f"  python -m mtneuro_lab.report {run_dir}")
    assert (
        tail[4].startswith("  python train.py -m ")
        and "+sweep=seeds" in tail[4]
        and "seed=" not in tail[4].split("+sweep")[0]
    )


# -- units ---------------------------------------------------------------------------------------
def test_progress_bar_off_only_when_stdout_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    cb = progress.ProgressLog()
    monkeypatch.setattr(progress, "stdout_is_terminal", lambda: True)
    assert not cb.hides_progress_bar() and progress.ProgressLog(when="always").hides_progress_bar()
    monkeypatch.setattr(progress, "stdout_is_terminal", lambda: False)
    assert cb.hides_progress_bar() and not progress.ProgressLog(when="never").hides_progress_bar()
    assert progress.duration(3725) == "1:02:05" and progress.duration(90061) == "1 days, 1:01:01"


def test_a_fit_resumed_mid_epoch_reports_its_own_rate_and_position(monkeypatch: pytest.MonkeyPatch) -> None:
    """A requeued job resumes mid-epoch: Lightning calls no on_train_epoch_start for that epoch."""
    from types import SimpleNamespace

    import torch

    now = [1000.0]  # the resume's start; the epoch line comes 8 s later
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    restored = SimpleNamespace(current=SimpleNamespace(completed=4))  # 4 of the epoch's 8 batches done
    trainer = SimpleNamespace(
        current_epoch=0,
        max_epochs=2,
        max_steps=-1,
        accumulate_grad_batches=1,
        num_training_batches=8,
        estimated_stepping_batches=16,
        global_step=8,
        world_size=1,
        is_global_zero=True,
        callback_metrics={},
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=restored)),
    )
    module = SimpleNamespace(monitor=("val/loss", "min"))
    cb = progress.ProgressLog()
    cb.on_train_start(trainer, module)  # type: ignore[arg-type]
    for idx in range(4, 8):
        cb.on_train_batch_end(trainer, module, {"loss": torch.tensor(1.0)}, {"image": torch.zeros(8, 1)}, idx)  # type: ignore[arg-type]
    now[0] = 1008.0
    line = cb.line(trainer, module, None)  # type: ignore[arg-type]
    # 32 samples in the 8 s since the resume; 8 of 16 batches left at 2 s per batch
    assert line == "epoch 1/2 step 8/16 | train/loss 1 | 4 samples/s | elapsed 0:00:08 left 0:00:16", line


def test_sweep_jobs_prefix_their_overrides() -> None:
    from conftest import compose
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    cfg = compose(["seed=2"], return_hydra_config=True)
    with read_write(cfg.hydra), open_dict(cfg):  # compose() made hydra.* read-only
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.job.override_dirname = "model.optimizer.lr=0.1,seed=2"
    HydraConfig.instance().set_config(cfg)
    assert progress.sweep_job_label() == "[model.optimizer.lr=0.1,seed=2] "
    with read_write(cfg.hydra), open_dict(cfg):
        cfg.hydra.mode = RunMode.RUN
    HydraConfig.instance().set_config(cfg)
    assert progress.sweep_job_label() == ""


@pytest.mark.parametrize(
    "kwargs,key", [({"every_n_epochs": 0}, "callbacks.media.every_n_epochs"), ({"slices": 0}, "callbacks.media")]
)
def test_media_settings_are_checked(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        media.MediaLog(**kwargs)


def test_figures_are_drawn_only_for_a_png_or_an_image_logger(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    from mtneuro_lab.methods.base import BaseMethod

    csv, board = CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb")
    for png, loggers, draws in [(False, [], False), (False, [csv], False), (False, [board], True), (True, [], True)]:
        callback, method = media.MediaLog(png=png), BaseMethod(3, ["a", "b", "c"], (1, 8, 8))
        trainer = SimpleNamespace(default_root_dir=str(tmp_path), loggers=loggers, is_global_zero=True)
        callback.setup(trainer, method, "fit")  # type: ignore[arg-type]
        assert callback.receivers() is draws and (method.media_sink is callback) is draws, (png, loggers)
        callback.on_test_epoch_start(trainer, method)  # type: ignore[arg-type]
        assert callback.wants("test", "em") is draws


def test_every_figure_kind_renders() -> None:
    rng = np.random.default_rng(0)
    names = ["background", "vessel", "cell"]
    batch = media.Batch("val", 3, 12, class_names=names)
    batch.arrays = {
        "confusion": {"counts": np.array([[5, 1, 0], [2, 7, 1], [0, 0, 4]])},
        "overlays": {
            "images": rng.integers(0, 255, (2, 32, 32), dtype=np.uint8),
            "truths": rng.integers(0, 3, (2, 32, 32)),
            "preds": rng.integers(0, 3, (2, 32, 32)),
            "z": np.array([400, 410]),
        },
        "em": {
            "image": rng.normal(size=(8, 24, 24)),
            "truth": rng.integers(0, 5, (8, 24, 24)),
            "prob": rng.uniform(size=(8, 24, 24)),
            "seg": rng.integers(0, 5, (8, 24, 24)),
        },
        "mae": {k: rng.normal(size=(2, 4, 16, 16)) for k in ("masked", "prediction", "target")},
    }
    items = media.render(batch, slices=3)
    assert [i.name for i in items] == ["confusion", "overlays", "em_slices", "reconstruction"]
    assert all(i.image.ndim == 3 and i.image.shape[2] == 3 and i.image.dtype == np.uint8 for i in items)
    assert items[0].table == (
        ["truth \\ prediction", *names],
        [["background", 5, 1, 0], ["vessel", 2, 7, 1], ["cell", 0, 0, 4]],
    )
    # three z slices -> three rows of panels: taller than wide for the 4-column EM grid
    em = items[2].image
    assert em.shape[0] > 0.6 * em.shape[1]
