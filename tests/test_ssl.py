"""SSL machinery (in-process, no data read): mining, EMA targets, linear evaluation, mixup."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.neighbors import NearestNeighbors

from mtneuro_lab.data import augment
from mtneuro_lab.errors import ConfigError
from mtneuro_lab.methods.byol import BYOL
from mtneuro_lab.methods.myow import MYOW, RepresentationQueue, mine_neighbours
from mtneuro_lab.methods.myow_m import MYOWMerged
from mtneuro_lab.methods.supervised import SupervisedClassifier

CLASSES = ["cortex", "striatum", "vp", "zi"]
SMALL = dict(stem="tiny", hidden_dim=32, proj_dim=16)


class _Loader:
    """A re-iterable sequence of ready batches (a plain list would count as several loaders)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _loader(n: int, size: int = 8, tile: int = 16, seed: int = 0) -> _Loader:
    return _Loader(_batches(n, size, tile, seed))


def _batches(n: int, size: int = 8, tile: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randn(size, 1, tile, tile, generator=g),
            "target": torch.arange(size) % len(CLASSES),
            "index": torch.arange(i * size, (i + 1) * size),
        }
        for i in range(n)
    ]


def _trainer(callbacks: list[pl.Callback], epochs: int = 1, batches: int = 2) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=callbacks,
        num_sanity_val_steps=0,
    )


# -- mining --------------------------------------------------------------------------------------
def test_mining_returns_true_cosine_neighbours_and_never_the_sample_itself() -> None:
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(40, 12, generator=g) * torch.rand(40, 1, generator=g) * 5  # norms vary: cosine, not L2
    key_ids = torch.arange(40)
    query_ids = torch.tensor([0, 5, 17, 33, 100])
    query = keys[query_ids.clamp(max=39)] + 0.01 * torch.randn(5, 12, generator=g)
    query[-1] = torch.randn(12, generator=g)  # id 100 is not in the pool: nothing excluded
    got = mine_neighbours(query, keys, k=1, query_ids=query_ids, key_ids=key_ids)
    for row, qid in enumerate(query_ids.tolist()):
        allowed = np.array([i for i in range(40) if i != qid])
        nn_ = NearestNeighbors(n_neighbors=1, metric="cosine", algorithm="brute").fit(keys[allowed].numpy())
        expected = allowed[nn_.kneighbors(query[row : row + 1].numpy(), return_distance=False)[0, 0]]
        assert got[row].item() == expected
        assert got[row].item() != qid


def test_mining_with_k_picks_among_the_k_nearest() -> None:
    keys = torch.eye(6)
    query = torch.tensor([[1.0, 0.9, 0.8, 0.0, 0.0, 0.0]]).repeat(200, 1)
    got = mine_neighbours(query, keys, k=3, generator=torch.Generator().manual_seed(0))
    assert set(got.tolist()) == {0, 1, 2}


def test_queue_is_fifo_and_wraps() -> None:
    q = RepresentationQueue(size=5, dim=2)
    assert len(q.filled()[1]) == 0
    q.push(torch.ones(3, 2), torch.tensor([0, 1, 2]))
    q.push(2 * torch.ones(3, 2), torch.tensor([3, 4, 5]))
    keys, ids = q.filled()
    assert sorted(ids.tolist()) == [1, 2, 3, 4, 5]  # id 0 overwritten first
    assert keys[ids == 5].eq(2).all()


# -- EMA target and linear evaluation, through a real Trainer --------------------------------------
class _Recorder(pl.Callback):
    """Snapshots around the first SSL step and around the linear phase."""

    def __init__(self) -> None:
        self.before: dict[str, dict[str, torch.Tensor]] = {}
        self.after: dict[str, dict[str, torch.Tensor]] = {}
        self.linear_start: dict[str, torch.Tensor] | None = None
        self.linear_modes: list[bool] = []

    @staticmethod
    def _copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            self.before = {"online": self._copy(pl_module.encoder), "target": self._copy(pl_module.target_encoder)}
        if pl_module.in_linear_phase:
            self.linear_modes.append(pl_module.encoder.training)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            self.after = {"online": self._copy(pl_module.encoder), "target": self._copy(pl_module.target_encoder)}
            self.target_grads = [p.grad for p in pl_module.target_encoder.parameters()]

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if pl_module.in_linear_phase and self.linear_start is None:
            self.linear_start = {
                **{f"enc.{k}": v for k, v in self._copy(pl_module.encoder).items()},
                **{f"tgt.{k}": v for k, v in self._copy(pl_module.target_encoder).items()},
                **{f"lin.{k}": v for k, v in self._copy(pl_module.linear).items()},
            }


@pytest.fixture(scope="module")
def trained_byol() -> tuple[BYOL, _Recorder]:
    torch.manual_seed(0)
    model = BYOL(len(CLASSES), CLASSES, (16, 16), linear_eval={"epochs": 1}, **SMALL)
    rec = _Recorder()
    _trainer([rec], epochs=1, batches=2).fit(model, train_dataloaders=_loader(2))
    return model, rec


def test_target_gets_no_gradient_and_moves_only_by_ema(trained_byol) -> None:
    model, rec = trained_byol
    assert all(not p.requires_grad for p in model.target_encoder.parameters())
    assert all(g is None for g in rec.target_grads)
    optimised = {id(p) for group in model.trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in model.target_encoder.parameters()}
    assert not optimised & {id(p) for p in model.target_projector.parameters()}
    m = model.ema_momentum(0)
    assert 0.996 <= m < 1
    moved = 0
    for name, _ in model.target_encoder.named_parameters():
        expected = m * rec.before["target"][name] + (1 - m) * rec.after["online"][name]
        torch.testing.assert_close(rec.after["target"][name], expected)
        moved += int(not torch.equal(rec.after["target"][name], rec.before["target"][name]))
    assert moved > 0


def test_ema_momentum_follows_cosine_from_start_to_one() -> None:
    model = BYOL(len(CLASSES), CLASSES, (16, 16), **SMALL)
    model.ssl_epochs, model._steps_per_epoch = 10, 10
    values = [model.ema_momentum(s) for s in range(100)]
    assert values[0] == pytest.approx(0.996)
    assert values[-1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_linear_evaluation_leaves_encoder_parameters_and_buffers_unchanged(trained_byol) -> None:
    model, rec = trained_byol
    assert rec.linear_start is not None, "the linear phase never started"
    assert rec.linear_modes and not any(rec.linear_modes), "encoder must be in eval mode during linear eval"
    end = {
        **{f"enc.{k}": v for k, v in model.encoder.state_dict().items()},
        **{f"tgt.{k}": v for k, v in model.target_encoder.state_dict().items()},
        **{f"lin.{k}": v for k, v in model.linear.state_dict().items()},
    }
    for key, value in rec.linear_start.items():
        if key.startswith("lin."):
            continue
        assert torch.equal(value, end[key]), f"{key} changed during linear evaluation"
    assert any(not torch.equal(v, end[k]) for k, v in rec.linear_start.items() if k.startswith("lin.")), (
        "the linear head did not train"
    )


@pytest.mark.parametrize("cls", [pytest.param(MYOW, marks=pytest.mark.slow), MYOWMerged])
def test_myow_variants_train_and_keep_targets_frozen(cls) -> None:
    torch.manual_seed(0)
    model = cls(len(CLASSES), CLASSES, (16, 16), linear_eval={"epochs": 1}, pool="queue", queue_size=12, **SMALL)
    _trainer([], epochs=1, batches=2).fit(model, train_dataloaders=_loader(2))
    assert hasattr(model, "projector_m") is (cls is MYOW)
    assert len(model.queue.filled()[1]) == 12
    targets = [p for online, target in model.ema_pairs() for p in target.parameters()]
    assert targets and all(not p.requires_grad and p.grad is None for p in targets)


def test_mined_weight_ramps_linearly() -> None:
    model = MYOW(len(CLASSES), CLASSES, (16, 16), mined_weight=0.1, ramp_epochs=10, **SMALL)
    model._steps_per_epoch = 4
    assert model.mined_weight_at(0) == 0
    assert model.mined_weight_at(20) == pytest.approx(0.05)
    assert model.mined_weight_at(400) == pytest.approx(0.1)


def test_views_are_half_size_crops_by_default() -> None:
    model = BYOL(len(CLASSES), CLASSES, (64, 64), **SMALL)
    x = torch.arange(64 * 64, dtype=torch.float32).view(1, 1, 64, 64).repeat(3, 1, 1, 1)
    view = model.make_view(x)
    assert view.shape == (3, 1, 32, 32)
    for v in view:  # a contiguous window of the tile
        top, left = divmod(int(v[0, 0, 0].item()), 64)
        torch.testing.assert_close(v[0], x[0, 0, top : top + 32, left : left + 32])


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"views": {"crop_fraction": 0}}, "model.views.crop_fraction"),
        ({"linear_eval": {"epochs": 0}}, "model.linear_eval.epochs"),
        ({"ema_start": 1.2}, "model.ema_start"),
        ({"k": 0}, "model.k"),
    ],
)
def test_constructor_rejects_bad_values(bad: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        MYOW(len(CLASSES), CLASSES, (64, 64), **bad)


# -- mixup -----------------------------------------------------------------------------------------
def test_mixup_mixes_images_and_labels_with_the_same_weight() -> None:
    torch.manual_seed(0)
    n = 6
    x = torch.randn(n, 1, 4, 4)
    onehot = torch.eye(n)  # one class per sample: lam and partner are readable from the labels
    mixed, soft = augment.mixup(x, onehot, alpha=1.0)
    torch.testing.assert_close(soft.sum(1), torch.ones(n))
    for i in range(n):
        lam = soft[i, i].item()
        others = [j for j in range(n) if j != i and soft[i, j] > 0]
        if not others:  # mixed with itself
            torch.testing.assert_close(mixed[i], x[i])
            continue
        (j,) = others
        torch.testing.assert_close(mixed[i], lam * x[i] + (1 - lam) * x[j])


@pytest.mark.parametrize("prob, expected_calls", [(0.0, 0), (1.0, 3)])
def test_supervised_mixup_prob_controls_mixing(monkeypatch, prob: float, expected_calls: int) -> None:
    calls = []
    real = augment.mixup
    monkeypatch.setattr(augment, "mixup", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = SupervisedClassifier(len(CLASSES), CLASSES, (16, 16), stem="tiny", mixup_prob=prob)
    model.log = lambda *a, **k: None
    for batch in _batches(3):
        loss = model.training_step(batch, 0)
        assert torch.isfinite(loss)
    assert len(calls) == expected_calls


def test_mixup_soft_loss_equals_cross_entropy_without_mixing() -> None:
    logits = torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 3, 0])
    soft = F.one_hot(y, 4).float()
    assert torch.allclose(torch.sum(-soft * F.log_softmax(logits, 1), 1).mean(), F.cross_entropy(logits, y))
