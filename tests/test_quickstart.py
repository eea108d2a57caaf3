"""``make run``'s experiment (``experiment=quickstart``): the first run a new user waits for.

Its wall time is a benchmark (``benchmarks/bench_quickstart.py``, README); what a test can hold
without timing is the budget itself: the training compute of the quickstart, counted in FLOPs
of the network it trains, is at most two epochs of the default ResNet-18 on 128x128 ROI-C1 tiles.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from mtneuro_lab.nets.resnet import ResNet18Encoder
from tests.conftest import compose

TILE = 256  # ROI-C1 tiles before task.downsample


def train_flops(cfg: DictConfig) -> float:
    """Forward FLOPs of one fit (backward costs the same multiple of it for both sides)."""
    tile = TILE // int(cfg.task.downsample)
    net = ResNet18Encoder(stem=cfg.model.stem, tile_size=tile, width=int(cfg.model.width)).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 1, tile, tile))
    regions = 4  # a cube-set entry covers the four regions
    samples = sum((e.z[1] - e.z[0]) * regions for e in cfg.task.splits.train)
    fraction = cfg.trainer.get("limit_train_batches") or 1.0
    assert isinstance(fraction, float) and fraction <= 1.0, "count an integer limit as batches here"
    return counter.get_total_flops() * samples * fraction * int(cfg.trainer.max_epochs)


def test_quickstart_is_roi_c1_supervised_within_two_128px_epochs() -> None:
    quick = compose(["experiment=quickstart"])
    assert quick.task.name == "roi_c1" and quick.model._target_.endswith("SupervisedClassifier")
    reference = compose(["task=roi_c1", "model=supervised", "task.downsample=2", "trainer.max_epochs=1"])
    ratio = train_flops(quick) / train_flops(reference)
    assert ratio <= 2.0, f"the quickstart trains {ratio:.2f} epochs' worth of 128x128 ResNet-18"
    assert ratio >= 0.25, f"{ratio:.2f}: too little training to reach test/acc 0.90 (README's figure)"


def test_quickstart_keeps_a_test_split_and_a_validation_choice() -> None:
    quick = compose(["experiment=quickstart"])
    assert quick.test_after_fit and quick.task.splits.val and quick.task.splits.test
    assert quick.callbacks.model_checkpoint.save_top_k == 1  # the checkpoint tested is chosen on val


def test_untimed_seeds_table_has_one_row_per_seed_with_its_validation_choice() -> None:
    from benchmarks.bench_quickstart import seeds_markdown

    rows = seeds_markdown({"test/acc": {1: 0.97, 3: 0.8849}, "val/acc": {1: 1.0, 3: 0.9417}}).splitlines()
    assert "0.90" in rows[0] and len(rows) == 4
    assert rows[2:] == ["| `seed=1` | 0.970 | 1.000 |", "| `seed=3` | 0.885 | 0.942 |"]
