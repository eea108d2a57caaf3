"""DDP building blocks without a trainer: global batches split over ranks (equal steps, every
evaluation sample once), per-rank random streams, and, in real 2-process gloo groups, the CPU
synchronised batch norm, gathering with gradients and MYOW's pool over all ranks."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.bench_ddp import myow_pool_stats
from mtneuro_lab.data.datamodules import ArrayBatchLoader
from mtneuro_lab.data.distributed import rank_batch_count, stream_seed
from mtneuro_lab.data.em import EMCropLoader

#: a 2-process test that has not finished by then is a hang: it fails, it does not block CI
GROUP_TIMEOUT_S = 120
#: one pytest-xdist worker runs this module (`--dist loadgroup`), so one gloo group serves it
pytestmark = pytest.mark.xdist_group("gloo_ranks")


def _batches(n: int, batch: int, shuffle: bool, drop_last: bool, rank: int, world: int) -> list[list[int]]:
    loader = ArrayBatchLoader({"i": torch.arange(n)}, batch, shuffle, drop_last, seed=3, rank=rank, world_size=world)
    items = [b["i"].tolist() for b in loader]
    assert len(items) == len(loader)
    return items


@pytest.mark.parametrize("drop_last", [True, False])
def test_training_ranks_run_equal_steps_and_together_see_the_global_batch(drop_last: bool) -> None:
    one = _batches(21, 8, True, drop_last, 0, 1)
    ranks = [_batches(21, 8, True, drop_last, r, 2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == (2 if drop_last else 3)
    for step, batch in enumerate(one):
        joined = ranks[0][step] + ranks[1][step]
        if len(batch) == 8:
            assert joined == batch  # rank 0 the first half of the global batch, rank 1 the second
        else:  # the last 5 items, padded by wrapping to 6 so both ranks take 3
            assert joined == batch + one[0][:1]


def test_evaluation_scores_every_sample_once_whatever_the_world_size() -> None:
    for world in (1, 2, 3):
        parts = [_batches(21, 6, False, False, r, world) for r in range(world)]
        seen = sorted(i for part in parts for batch in part for i in batch)
        assert seen == list(range(21)), world
    # 21 = 3 full batches of 6 and a last one of 3: rank 0 gets 1 sample of it, rank 1 gets 2
    assert [len(b) for b in _batches(21, 6, False, False, 1, 2)] == [3, 3, 3, 2]
    assert rank_batch_count(3, 6, 2, 4, drop_last=False, pad=False) == 1  # 3 items, 4 ranks: one gets none


def test_em_crop_loader_gives_every_rank_the_same_number_of_steps() -> None:
    volume = {"image": torch.arange(8 * 16 * 16, dtype=torch.float32).view(8, 16, 16)}
    # 37 crops, global batch 4 over 2 ranks: 9 steps each (37 // 4), not 9 and 10 as per-rank counts gave
    loaders = [EMCropLoader(volume, (4, 8, 8), 37, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    runs = [[b["image"] for b in loader] for loader in loaders]
    assert [len(r) for r in runs] == [9, 9]
    one = [b["image"] for b in EMCropLoader(volume, (4, 8, 8), 37, 4, seed=0)]
    assert torch.equal(torch.cat([runs[0][3], runs[1][3]]), one[3])


def test_stream_seeds_differ_per_rank_and_batch_and_repeat() -> None:
    seeds = {stream_seed(1, rank, epoch, batch) for rank in range(2) for epoch in range(2) for batch in range(3)}
    assert len(seeds) == 12
    assert stream_seed(1, 1, 0, 2) == stream_seed(1, 1, 0, 2)
    assert stream_seed(1, 0, 0, 0) != stream_seed(2, 0, 0, 0)


# -- real 2-process groups -------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_loop(rank: int, world: int, port: int, tasks: Any, results: Any) -> None:
    """One rank of the group: join it once, then run every function the tests send."""
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        while (task := tasks.get()) is not None:
            fn, args = task
            try:
                results.put((rank, True, fn(rank, *args)))
            except Exception:  # noqa: BLE001 - the test process reports it
                results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class RankGroup:
    """A ``world``-process gloo group started once for this module's tests: the ranks are
    forked from the test process, with torch and this module already imported (spawned ranks
    paid about 6 s of imports each), and set up their process group once, not once per test.

    :meth:`run` sends ``fn(rank, *args)`` to every rank and returns their results in rank
    order; a rank that raises fails the test with its traceback, and a group that has not
    answered after :data:`GROUP_TIMEOUT_S` (a hang) fails the test and is replaced."""

    def __init__(self, world: int = 2) -> None:
        self.world = world
        self.procs: list[Any] = []

    def _start(self) -> None:
        ctx = mp.get_context("fork")
        self.tasks = [ctx.Queue() for _ in range(self.world)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [
            ctx.Process(target=_rank_loop, args=(r, self.world, port, self.tasks[r], self.results), daemon=True)
            for r in range(self.world)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        if not self.procs or not all(p.is_alive() for p in self.procs):
            self.close()
            self._start()
        for queue in self.tasks:
            queue.put((fn, args))
        out: dict[int, Any] = {}
        try:
            for _ in range(self.world):
                rank, ok, value = self.results.get(timeout=GROUP_TIMEOUT_S)
                if not ok:
                    self.close()  # the other rank may wait in a collective: start afresh next time
                    pytest.fail(f"rank {rank} raised:\n{value}")
                out[rank] = value
        except Exception as err:  # queue.Empty: a rank hung or died
            if isinstance(err, pytest.fail.Exception):
                raise
            self.close()
            pytest.fail(f"{self.world}-process group did not finish in {GROUP_TIMEOUT_S} s: {err!r}")
        return [out[r] for r in range(self.world)]

    def close(self) -> None:
        for p, queue in zip(self.procs, getattr(self, "tasks", []), strict=False):
            if p.is_alive():
                queue.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self.procs = []


@pytest.fixture(scope="module")
def ranks() -> Iterator[RankGroup]:
    group = RankGroup()
    yield group
    group.close()


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 8, 8, generator=g) * 3 + 1, torch.randint(0, 2, (8,), generator=g)


def _sync_bn_rank(rank: int) -> dict[str, np.ndarray]:
    from mtneuro_lab.nets.sync_bn import SyncBatchNormPlugin

    net = SyncBatchNormPlugin().apply(_small_net())
    ddp = nn.parallel.DistributedDataParallel(net)
    x, y = _data()
    nn.functional.cross_entropy(ddp(x.chunk(2)[rank]), y.chunk(2)[rank]).backward()
    out = {f"grad.{k}": p.grad.numpy().copy() for k, p in net.named_parameters()}
    out.update({f"state.{k}": v.numpy().copy() for k, v in net.state_dict().items()})
    return out


def test_sync_batchnorm_on_cpu_equals_one_process_on_the_whole_batch(ranks: RankGroup) -> None:
    results = ranks.run(_sync_bn_rank)
    ref = _small_net()
    x, y = _data()
    nn.functional.cross_entropy(ref(x), y).backward()
    expected = {f"grad.{k}": p.grad for k, p in ref.named_parameters()}
    expected.update({f"state.{k}": v for k, v in ref.state_dict().items()})
    assert set(results[0]) == set(expected), "checkpoint keys unchanged"
    for key, value in expected.items():
        for rank in results:
            # float32: only the summation order differs (two all-reduces vs one sum)
            torch.testing.assert_close(torch.from_numpy(rank[key]), value, rtol=1e-5, atol=1e-6, msg=key)
    plain = _small_net()  # the control: per-rank statistics are NOT the whole batch's
    nn.functional.cross_entropy(plain(x[:4]), y[:4]).backward()
    assert not torch.allclose(plain[0].weight.grad, ref[0].weight.grad, atol=1e-3)


def _gather_rank(rank: int) -> dict[str, Any]:
    from mtneuro_lab.data.distributed import gather_from_ranks

    x = torch.full((rank + 1, 2), float(rank + 1), requires_grad=True)  # ranks hold 1 and 2 rows
    rows, origin = gather_from_ranks(x)
    (rows * torch.arange(1.0, len(rows) + 1).unsqueeze(1)).sum().backward()
    return {"rows": rows.detach().tolist(), "origin": origin.tolist(), "grad": x.grad.tolist()}


def test_gather_from_ranks_keeps_rank_order_and_routes_gradients_back(ranks: RankGroup) -> None:
    r0, r1 = ranks.run(_gather_rank)
    assert r0["rows"] == r1["rows"] == [[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]
    assert r0["origin"] == [0, 1, 1]
    # each rank's loss weights row i by i+1; the gradient of both losses' sum reaches the owner
    assert r0["grad"] == [[2.0, 2.0]]
    assert r1["grad"] == [[4.0, 4.0], [6.0, 6.0]]


@pytest.mark.parametrize("pool", ["batch", pytest.param("queue", marks=pytest.mark.slow)])
def test_myow_mines_over_candidates_from_both_ranks(ranks: RankGroup, pool: str) -> None:
    r0, r1 = ranks.run(myow_pool_stats, 2, pool)  # each rank 4 of a global batch of 8
    if pool == "batch":  # the global batch of 8, 4 of them from the other rank, every step
        assert r0["stats"] == r1["stats"] == [(8, 4)] * 4
    else:  # batch pool until the queue holds more than k; then the queue of gathered keys
        assert [s for s, _ in r0["stats"]] == [8, 8, 16, 24]
        assert all(foreign == size // 2 for size, foreign in r0["stats"] + r1["stats"])
        assert r0["queue_ids"] == r1["queue_ids"] == list(range(8, 32))  # the same queue on every rank


def _ssl_val_loss_rank(rank: int) -> dict[str, Any]:
    from types import SimpleNamespace

    import torch.distributed as dist

    from mtneuro_lab.methods.byol import BYOL

    torch.manual_seed(0)  # same weights on both ranks
    model = BYOL(4, ["a", "b", "c", "d"], (16, 16), stem="tiny", hidden_dim=32, proj_dim=16).eval()

    def reduce(total: torch.Tensor, reduce_op: str) -> torch.Tensor:
        dist.all_reduce(total)
        return total

    model._trainer = SimpleNamespace(strategy=SimpleNamespace(reduce=reduce))  # what _log_loss uses of a trainer
    logged: dict[str, float] = {}
    model.log = lambda name, value, **_: logged.__setitem__(name, float(value))
    g = torch.Generator().manual_seed(rank)
    n = 3 if rank == 0 else 1  # the last evaluation batch split unevenly: 3 samples and 1
    batch = {"image": torch.randn(n, 1, 16, 16, generator=g), "target": torch.arange(n) % 4}
    with torch.no_grad():
        model._eval_step("val", batch)
        mean = float(model._loss_sum("val", torch.device("cpu"))[0]) / n  # this rank's batch mean
        model._log_loss("val")
    return {"mean": mean, "n": n, "logged": logged["val/loss"]}


def test_ssl_val_loss_is_the_mean_over_every_sample_of_every_rank(ranks: RankGroup) -> None:
    r0, r1 = ranks.run(_ssl_val_loss_rank)
    samples = (r0["mean"] * r0["n"] + r1["mean"] * r1["n"]) / (r0["n"] + r1["n"])
    assert r0["logged"] == r1["logged"] == pytest.approx(samples, rel=1e-6)
    assert r0["logged"] != pytest.approx((r0["mean"] + r1["mean"]) / 2, rel=1e-3)  # not the mean of rank means
