"""DDP equals one process: 2 gloo processes x batch b/2 vs 1 process x batch b, same seed.

Writes the ``bench:ddp`` block of ``docs/gpu.md``: how far the 2-process weights are from the
1-process ones after N steps (relative to how far training moved them), the same for a control
without batch-norm synchronisation, ``val/loss`` of both, ``test/*`` of the 1-process
checkpoint scored by 1 and by 2 processes, and the wall-time ratio 2 processes / 1 process
(one process with 2 torch threads vs two with 1 each, the same 2 cores, in this one run).

Setting (shared with tests/test_ddp.py): supervised ResNet-18, augmentation and dropout off,
64x64 tiles (``task.downsample=4``), small splits, SGD lr 0.003. A well-conditioned setting
on purpose: two processes sum in another order than one, and with the default lr 0.03 and
batch 8 the first steps amplify those float32 rounding differences far beyond rounding size
(BN layers on tiny late-stage maps), which would hide what the comparison is about.

    python benchmarks/bench_ddp.py [--steps 4] [--out /tmp/bench_ddp]
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
#: the 2-vs-1 setting; the test split (18 tiles) does not divide by 2 x eval batch 4
EQUIVALENCE = (
    "task.downsample=4",
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
    """max over parameters of |other - one| / |one - start| (L2 norms): how much of what training
    changed differs (batch-norm running statistics included; step counters left out)."""
    gaps = []
    for key, w0 in start.items():
        if not w0.is_floating_point():
            continue
        moved = (one[key].float() - w0.float()).norm()
        if moved > 0:
            gaps.append(float((other[key].float() - one[key].float()).norm() / moved))
    return max(gaps)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_ddp"))
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "gpu.md")
    args = parser.parse_args(argv)
    started, load = time.perf_counter(), os.getloadavg()
    base = [*EQUIVALENCE, f"trainer.limit_train_batches={args.steps}"]
    one = run_cli(args.out / "one", base, threads=2)
    two = run_cli(args.out / "two", [*base, "trainer=ddp_cpu"], threads=1)
    run_cli(args.out / "two_nosync", [*base, "trainer=ddp_cpu", "trainer.sync_batchnorm=false"], threads=1)
    best = args.out / "one" / "checkpoints" / "epoch000.ckpt"
    scored = run_cli(args.out / "eval_two", [*base, "trainer=ddp_cpu", f"ckpt_path={best}"], 1, "evaluate.py")
    start, w1 = initial_weights(base), weights(args.out / "one")
    test_keys = sorted(k for k in one if k.startswith("test/"))
    result = {
        "steps": args.steps,
        "update_gap_sync": update_gap(start, w1, weights(args.out / "two")),
        "update_gap_nosync": update_gap(start, w1, weights(args.out / "two_nosync")),
        "test_equal": all(scored[k] == one[k] for k in test_keys),
        "test_max_gap": max(abs(scored[k] - one[k]) for k in test_keys),
        "wall_ratio": two["wall_s"] / one["wall_s"],
    }
    print(json.dumps(result, indent=2))
    table = "\n".join(
        [
            "| 2 processes x batch 4 vs 1 process x batch 8 | batch norm synchronised | control: not synchronised |",
            "|---|---|---|",
            f"| weights after {args.steps} steps, max relative gap of the update "
            f"| {result['update_gap_sync']:.1e} | {result['update_gap_nosync']:.1e} |",
            "",
            f"`test/*` of the 1-process checkpoint scored by 2 processes: "
            f"{'identical to' if result['test_equal'] else 'different from'} the 1-process scores "
            f"(max gap {result['test_max_gap']:.1e}, {len(test_keys)} metrics; eval batch 4).  ",
            f"Wall time, 2 processes (1 thread each) / 1 process (2 threads): {result['wall_ratio']:.2f}.",
        ]
    )
    write_block(
        args.doc,
        "ddp",
        table,
        time.perf_counter() - started,
        {
            "model": "supervised ResNet-18, 64x64 tiles, lr 0.003, no augmentation/dropout",
            "seed": "1",
            "load average (1/5/15 min) at start": " / ".join(f"{x:.1f}" for x in load),
        },
    )
    return result


if __name__ == "__main__":
    main()
