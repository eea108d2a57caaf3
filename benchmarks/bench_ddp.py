"""DDP equals one process: 2 gloo processes x batch b/2 vs 1 process x batch b, same seed.

Writes the ``bench:ddp`` block of ``docs/gpu.md``: how far the 2-process weights are from the
1-process ones after 1 and N steps (relative to how far training moved them), in float32 and in
float64 (``trainer.precision=64-true``), the same for a float32 control without batch-norm
synchronisation, ``val/loss`` of both, ``test/*`` of the 1-process checkpoint scored by 1 and by
2 processes, and the wall-time ratio 2 processes / 1 process (one process with 2 torch threads
vs two with 1 each, the same 2 cores, float32, in this one run).

Why float64: two processes sum in another order than one (two all-reduces for batch-norm
statistics and gradients, convolutions split over other batch sizes and threads), so float32
weights differ by rounding after one step, and the following steps amplify that difference
(the gap grows by a few times per step, mostly in early batch-norm layers). The same runs in
float64 separate that amplified rounding from a real difference in the optimisation (a wrong
gradient average, learning rate, sample split or batch-norm statistic shows up in float64 at
the size of the float32 control, not at rounding size).

Setting (shared with tests/test_ddp.py): supervised ResNet-18, augmentation and dropout off,
64x64 tiles (``task.downsample=4``) through the ImageNet stem (``model.stem=imagenet``, 16x16
maps after it), small splits, SGD lr 0.003: not the default recipe (small, so that the test runs in seconds).

    python benchmarks/bench_ddp.py [--steps 4] [--out /tmp/bench_ddp] [--myow-only]

It also writes the ``bench:ddp_myow`` block: MYOW's mining pool per step with 1 and 2 processes
for both pools (``--myow-only`` writes just that block, in seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cli_runs import run_cli  # noqa: E402
from benchmarks.doc_blocks import write_block  # noqa: E402

REGIONS = "regions:[cortex,striatum,vp]"
#: the 2-vs-1 setting: 30 training tiles (global batches 8, 8, 8, 6), 9 val and 15 test tiles,
#: so neither the training split (by 2 x 4) nor the test split (by 2 x eval batch 4) divides evenly
EQUIVALENCE = (
    "task.downsample=4",
    "model.stem=imagenet",
    f"task.splits.train=[{{set:A,z:[110,120],{REGIONS}}}]",
    f"task.splits.val=[{{set:A,z:[380,383],{REGIONS}}}]",
    f"task.splits.test=[{{set:A,z:[420,425],{REGIONS}}}]",
    "data.batch_size=8",
    "data.eval_batch_size=4",
    "data.drop_last=false",
    "data.augment.hflip=false",
    "data.augment.vflip=false",
    "data.augment.rot90=false",
    "model.dropout=0",
    "model.optimizer.lr=0.003",
    "trainer.max_epochs=1",
    "trainer.deterministic=true",
    "trainer.enable_progress_bar=false",
    "logger=none",
)
PRECISIONS = {"float32": "trainer.precision=32-true", "float64": "trainer.precision=64-true"}


def initial_weights(overrides: list[str]) -> dict[str, torch.Tensor]:
    """The weights a run starts from: seeded, then built, as :func:`mtneuro_lab.run.train` does."""
    import pytorch_lightning as pl
    from hydra import compose, initialize_config_dir

    from mtneuro_lab.build import build_components
    from mtneuro_lab.cli import CONF_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[o for o in overrides if not o.startswith("hydra.")])
    pl.seed_everything(int(cfg.seed))
    return {k: v.detach().clone() for k, v in build_components(cfg).method.state_dict().items()}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return state["state_dict"]


def update_gap(start: dict[str, torch.Tensor], one: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    """max over parameters of |other - one| / |one - start| (L2 norms, in float64): how much of
    what training changed differs (batch-norm running statistics included; step counters left out)."""
    gaps = []
    for key, w0 in start.items():
        if not w0.is_floating_point():
            continue
        moved = (one[key].double() - w0.double()).norm()
        if moved > 0:
            gaps.append(float((other[key].double() - one[key].double()).norm() / moved))
    return max(gaps)


#: MYOW's mining pool: 4 steps of a global batch of 8, queue of 24 keys, k = 1 neighbour
MYOW_STEPS, MYOW_BATCH = 4, 8


def myow_pool_stats(rank: int, world: int, pool: str) -> dict[str, Any]:
    """One rank of MYOW mining over ``MYOW_STEPS`` steps of a global batch of ``MYOW_BATCH``
    (random representations, each rank its own samples): the pool size and how many candidates
    came from other ranks at every step, and the ids the queue holds at the end. Weights are the
    same on every rank (seeded); run it in each process of an initialised gloo group, or alone."""
    from mtneuro_lab.methods.byol import ViewOutputs
    from mtneuro_lab.methods.myow import MYOW

    torch.manual_seed(0)
    model = MYOW(4, ["a", "b", "c", "d"], (16, 16), stem="tiny", hidden_dim=32, proj_dim=16, pool=pool, queue_size=24)
    dim, per_rank = model.encoder.out_dim, MYOW_BATCH // world
    stats = []
    for step in range(MYOW_STEPS):
        g = torch.Generator().manual_seed(100 * step + rank)
        y1, y2, ty1, ty2 = (torch.randn(per_rank, dim, generator=g) for _ in range(4))
        p1, p2, tz1, tz2 = (torch.randn(per_rank, 16, generator=g) for _ in range(4))
        ids = torch.arange(per_rank) + per_rank * rank + MYOW_BATCH * step
        _, logged = model.mined_loss(ViewOutputs(y1, y2, p1, p2, ty1, ty2, tz1, tz2), ids)
        stats.append((int(logged["train/pool_size"]), int(logged["train/pool_foreign"])))
    queue_ids = model.queue.filled()[1].tolist() if model.queue is not None else []
    return {"stats": stats, "queue_ids": sorted(queue_ids)}


def _myow_rank(rank: int, world: int, port: int, pool: str, results: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results.put((rank, myow_pool_stats(rank, world, pool)))
    finally:
        dist.destroy_process_group()


def myow_pools() -> dict[str, dict[int, list[tuple[int, int]]]]:
    """Pool size and foreign candidates per step, 1 process vs a 2-process gloo group, per pool."""
    import multiprocessing as mp
    import socket

    out: dict[str, dict[int, list[tuple[int, int]]]] = {}
    for pool in ("batch", "queue"):
        out[pool] = {1: myow_pool_stats(0, 1, pool)["stats"]}
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        procs = [ctx.Process(target=_myow_rank, args=(r, 2, port, pool, results)) for r in range(2)]
        for proc in procs:
            proc.start()
        ranks = dict(results.get(timeout=300) for _ in procs)
        for proc in procs:
            proc.join(timeout=30)
        if ranks[0]["stats"] != ranks[1]["stats"]:
            raise RuntimeError(f"{pool}: the ranks mined different pools: {ranks}")
        out[pool][2] = ranks[0]["stats"]
    return out


def myow_table(pools: dict[str, dict[int, list[tuple[int, int]]]]) -> str:
    steps = range(1, MYOW_STEPS + 1)
    rows = [
        "| `model.pool` | processes | " + " | ".join(f"step {i}: pool (from other ranks)" for i in steps) + " |",
        "|---|---|" + "---|" * MYOW_STEPS,
    ]
    for pool, by_world in pools.items():
        for world, stats in by_world.items():
            cells = " | ".join(f"{size} ({foreign})" for size, foreign in stats)
            rows.append(f"| {pool} | {world} x batch {MYOW_BATCH // world} | {cells} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_ddp"))
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "gpu.md")
    parser.add_argument("--myow-only", action="store_true", help="only MYOW's pool sizes (bench:ddp_myow, seconds)")
    args = parser.parse_args(argv)
    started, load = time.perf_counter(), os.getloadavg()
    pools = myow_pools()
    print(json.dumps(pools))
    write_block(
        args.doc,
        "ddp_myow",
        myow_table(pools),
        time.perf_counter() - started,
        {
            "setting": f"MYOW, queue of 24 keys, k = 1, {MYOW_STEPS} steps of a global batch of "
            f"{MYOW_BATCH} (random views)"
        },
    )
    if args.myow_only:
        return {"myow_pools": pools}
    result: dict[str, Any] = {"steps": args.steps, "gap": {}, "val_loss": {}}
    for precision, flag in PRECISIONS.items():
        for steps in (1, args.steps):
            base = [*EQUIVALENCE, flag, f"trainer.limit_train_batches={steps}"]
            name = f"{precision}_{steps}"
            one = run_cli(args.out / f"one_{name}", base, threads=2)
            two = run_cli(args.out / f"two_{name}", [*base, "trainer=ddp_cpu"], threads=1)
            start = initial_weights(base)
            gap = update_gap(start, weights(args.out / f"one_{name}"), weights(args.out / f"two_{name}"))
            result["gap"][name] = gap
            result["val_loss"][name] = (one["val/loss"], two["val/loss"])
            if precision == "float32" and steps == args.steps:
                result["wall_ratio"] = two["wall_s"] / one["wall_s"]
                run_cli(args.out / "two_nosync", [*base, "trainer=ddp_cpu", "trainer.sync_batchnorm=false"], 1)
                result["gap"]["nosync"] = update_gap(
                    start, weights(args.out / f"one_{name}"), weights(args.out / "two_nosync")
                )
                best = args.out / f"one_{name}" / "checkpoints" / "epoch000.ckpt"
                scored = run_cli(
                    args.out / "eval_two", [*base, "trainer=ddp_cpu", f"ckpt_path={best}"], 1, "evaluate.py"
                )
                test_keys = sorted(k for k in one if k.startswith("test/"))
                result["test_keys"] = len(test_keys)
                result["test_equal"] = all(scored[k] == one[k] for k in test_keys)
                result["test_max_gap"] = max(abs(scored[k] - one[k]) for k in test_keys)
    print(json.dumps(result, indent=2))
    gap, loss, n = result["gap"], result["val_loss"], args.steps
    table = "\n".join(
        [
            "| 2 processes x batch 4 vs 1 process x batch 8 | float32 | float64 |",
            "|---|---|---|",
            *(
                f"| weights after {k} step{'s' * (k > 1)}, max relative gap of the update "
                f"| {gap[f'float32_{k}']:.1e} | {gap[f'float64_{k}']:.1e} |"
                for k in (1, n)
            ),
            f"| control, batch norm not synchronised: weights after {n} steps | {gap['nosync']:.1e} | not run |",
            f"| `val/loss` after {n} steps, 1 process / 2 processes "
            f"| {loss[f'float32_{n}'][0]:.9f} / {loss[f'float32_{n}'][1]:.9f} "
            f"| {loss[f'float64_{n}'][0]:.9f} / {loss[f'float64_{n}'][1]:.9f} |",
            "",
            f"`test/*` of the 1-process float32 checkpoint scored by 2 processes: "
            f"{'identical to' if result['test_equal'] else 'different from'} the 1-process scores "
            f"(max gap {result['test_max_gap']:.1e}, {result['test_keys']} metrics; eval batch 4).  ",
            f"Wall time, float32, {n} steps, 2 processes (1 thread each) / 1 process (2 threads): "
            f"{result['wall_ratio']:.2f}.",
        ]
    )
    write_block(
        args.doc,
        "ddp",
        table,
        time.perf_counter() - started,
        {
            "model": "supervised ResNet-18, 64x64 tiles, ImageNet stem, lr 0.003, no augmentation, no dropout",
            "seed": "1",
            "load average (1/5/15 min) at start": " / ".join(f"{x:.1f}" for x in load),
        },
    )
    return result


if __name__ == "__main__":
    main()
