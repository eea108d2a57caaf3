"""Serial EM on real volumes (docs/em.md): learned models vs non-learned floors, search cost, volume scale.

Stages (each resumable: a run whose directory holds ``metrics.json`` is not run again):

* ``pretrain``: the phantom MAE encoder (``model=mae_pretrain`` with bench_mae's recipe, at
  ``PRETRAIN_STEPS`` steps) that ``mae`` fine-tunes from.
* ``train``: for every task (``gala_fibsem``, ``isbi2012_em``), model (``rsunet``, ``unetr``
  = UNETR from scratch, ``mae`` = UNETR from the phantom encoder) and seed: one CLI training
  run at the CPU budget below; checkpoints and the waterz threshold chosen on validation by
  ``val/arand``, test touched once. Each run records its inference CPU time and voxels.
* ``floors``: the same scoring code on the same test volumes for two non-learned floors: one
  segment for everything, and a Gaussian-smoothed intensity watershed whose smoothing and
  seed level are chosen on the validation volume.
* ``search``: what the validation search costs relative to one post-processing of the
  validation volume (both measured here, interleaved, on one trained model's prediction).
* ``volume``: chunked sliding-window prediction of a phantom volume stored as zarr, peak RSS
  against the output's bytes, voxels per second.
* ``doc``: writes the ``bench:em_real``, ``bench:em_search`` and ``bench:em_volume`` blocks of
  docs/em.md from the results (``results.json`` in the work directory).

Usage::

    python benchmarks/bench_em.py pretrain train floors search volume doc --workdir outputs/bench_em

Two invocations may share a work directory, one per core (say ``train --models unetr`` beside
``pretrain train --models mae``): ``results.json`` is re-read and merged under a lock when each
one ends, and the docs' provenance line counts the runs that overlapped from their start times.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python benchmarks/bench_em.py` from anywhere

from benchmarks import bench_mae  # noqa: E402
from benchmarks.cli_runs import run_cli  # noqa: E402
from mtneuro_lab.data.em import TTA_MODES  # noqa: E402
from mtneuro_lab.io import atomic_write_bytes  # noqa: E402

DOC = ROOT / "docs" / "em.md"

# -- the CPU budget --------------------------------------------------------------------------------
PRETRAIN_STEPS = 8000  # bench_mae's recipe (16000 there) at half the steps
TASKS = ("gala_fibsem", "isbi2012_em")
MODELS = ("rsunet", "unetr", "mae")
SEEDS = (1, 2)
# 1024 steps of batch 2 (crop 8x64x64, one thread), chosen on validation curves, never on test:
# session 6's x-split runs of 512 steps still lowered val/loss at their last validation, and a
# 1024-step run (z split) lowered val/loss to its 7th validation (896 steps), val/arand to its 6th
STEPS = 1024
BATCH = 2
COMMON = (
    "logger=csv",
    "trainer=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.max_epochs=-1",
    f"data.batch_size={BATCH}",
    "data.augment.intensity_jitter=0.1",
)
UNETR = (
    "model=mae_finetune",
    "model.preset=tiny",
    "model.patch_size=[1,16,16]",
    "model.feature_size=8",
    "model.rebalance=true",
    "model.optimizer.lr=1e-3",
    "model.optimizer.lr_scaling=none",
    "model.scheduler.warmup_epochs=0.1",
)
MODEL_OVERRIDES: dict[str, tuple[str, ...]] = {
    "rsunet": ("model=rsunet", "model.net.widths=[8,16,32,64]", "model.optimizer.lr=1e-3"),
    "unetr": (*UNETR, "model.pretrained=null", "model.layer_decay=1.0"),
    "mae": (*UNETR, "model.layer_decay=0.75"),  # + model.pretrained=<encoder.pt>
}
TASK_OVERRIDES: dict[str, tuple[str, ...]] = {
    "gala_fibsem": ("task=gala_fibsem", "task.crop=[8,64,64]"),
    "isbi2012_em": ("task=isbi2012_em", "task.crop=[4,96,96]"),
}
#: how train/validation divide a task's training volume: ``z`` the task config's z ranges;
#: ``x`` validation beside training in x with a gap, so it holds few training neurons
#: (gala_fibsem's neurons run along z and y; docs/em.md "Validation is optimistic"). The
#: default is ``x``: checkpoints and thresholds are then chosen on neurons training never saw,
#: as the test volume's are (a choice of principle, not of test scores)
DEFAULT_SPLIT = "x"
SPLIT_OVERRIDES: dict[str, dict[str, tuple[str, ...]]] = {
    "z": {},
    "x": {
        "gala_fibsem": (
            "task.splits.train.z=null",
            "+task.splits.train.x=[0,120]",
            "task.splits.val.z=null",
            "+task.splits.val.x=[150,200]",
        )
    },
}
#: ``--tta``: the task's ``tta`` of every learned run (validation and test inference alike); a
#: recipe of its own (another work directory and docs block), compared on validation scores
DEFAULT_TTA = "none"
METRIC_KEYS = ("test/arand", "test/voi_split", "test/voi_merge")


def task_overrides(task: str, split: str = DEFAULT_SPLIT) -> tuple[str, ...]:
    """The task's overrides with the train/validation division ``split``."""
    return (*TASK_OVERRIDES[task], *SPLIT_OVERRIDES[split].get(task, ()))


def pretrain_overrides(steps: int = PRETRAIN_STEPS) -> list[str]:
    """bench_mae's pretraining recipe with ``steps`` steps."""
    recipe = [o for o in (*bench_mae.COMMON, *bench_mae.PRETRAIN) if not o.startswith("trainer.max_steps=")]
    return [*recipe, f"trainer.max_steps={steps}"]


def pretrain(workdir: Path, steps: int = PRETRAIN_STEPS) -> dict[str, Any]:
    return run_cli(workdir / "pretrain", pretrain_overrides(steps), threads=1, log=print)


def train_overrides(
    task: str,
    model: str,
    seed: int,
    workdir: Path,
    steps: int = STEPS,
    split: str = DEFAULT_SPLIT,
    tta: str = DEFAULT_TTA,
) -> list[str]:
    extra = [f"model.pretrained={workdir / 'pretrain' / 'encoder.pt'}"] if model == "mae" else []
    return [
        *task_overrides(task, split),
        *MODEL_OVERRIDES[model],
        *extra,
        *COMMON,
        f"trainer.max_steps={steps}",
        f"seed={seed}",
        *([] if tta == DEFAULT_TTA else [f"task.tta={tta}"]),
    ]


def train(
    workdir: Path,
    tasks: Sequence[str],
    models: Sequence[str],
    seeds: Sequence[int],
    steps: int = STEPS,
    split: str = DEFAULT_SPLIT,
    tta: str = DEFAULT_TTA,
) -> dict[str, Any]:
    """Every (task, model, seed) run, one at a time on one thread; failures are recorded, not fatal."""
    out: dict[str, Any] = {}
    for task in tasks:
        for model in models:
            for seed in seeds:
                name = f"{task}/{model}/s{seed}"
                try:
                    out[name] = run_cli(
                        workdir / "runs" / task / model / f"s{seed}",
                        train_overrides(task, model, seed, workdir, steps, split, tta),
                        threads=1,
                        log=print,
                    )
                except RuntimeError as err:
                    out[name] = {"failed": str(err).splitlines()[0]}
                    print(f"failed: {name}: {out[name]['failed']}", flush=True)
    return out


def validation_curve(run_dir: Path) -> list[list[float]]:
    """``[step, val/loss, val/arand]`` at every validation of a run (its csv log): what the
    recipe's budget is read from, never the test numbers."""
    import csv

    logs = sorted((run_dir / "csv").glob("**/metrics.csv"))
    if not logs:
        return []
    with logs[-1].open() as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("val/loss") and r.get("val/arand")]
    curve = [[int(r["step"]) + 1, float(r["val/loss"]), float(r["val/arand"])] for r in rows]
    if len(curve) > 1 and curve[-1][1:] in [c[1:] for c in curve[:-1]]:  # the chosen checkpoint validated again
        curve.pop()
    return curve


# -- helpers that build a task's data outside a run ------------------------------------------------
def compose(overrides: Sequence[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mtneuro_lab.cli import CONF_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.paths.output_dir = "unused"
    return cfg


def task_volumes(task: str, split: str = "z") -> tuple[Any, dict[str, Any]]:
    """``(task object, {split: EMVolume})`` of a task config, as a run builds them."""
    from mtneuro_lab.build import build_components

    comps = build_components(compose([*task_overrides(task, split), "model=rsunet"]))
    dm = comps.datamodule
    dm.setup("fit")
    dm.setup("test")
    return comps.task, dm.volumes


# -- floors ------------------------------------------------------------------------------------------
def shared_fraction(volume: Any, other: Any) -> float:
    """Fraction of ``volume``'s labelled voxels whose id also labels a voxel of ``other``."""
    import numpy as np

    labels = np.asarray(volume.labels).reshape(-1)
    labels = labels[labels > 0]
    return float(np.isin(labels, np.unique(np.asarray(other.labels))[1:]).mean()) if labels.size else 0.0


def split_overlap(task: Any, vols: dict[str, Any]) -> dict[str, Any]:
    """How much of validation and test is made of objects the training split already labels
    (same ids = same objects when the splits are z ranges of one volume; a separate test
    volume's ids are unrelated, so its figure is left out), and the splits' sizes: what makes a
    validation score optimistic next to the test score. Only for ``instances: ids`` (the ids of
    ``section_components`` tasks are not objects)."""
    import numpy as np

    out: dict[str, Any] = {f"{k}_shape": list(v.shape) for k, v in vols.items()}
    for name in ("val", "test"):
        out[f"{name}_ids"] = int(np.unique(np.asarray(vols[name].labels)).size - 1)
        if task.instances == "ids" and task.splits[name].labels == task.splits["train"].labels:
            out[f"{name}_voxels_in_train_objects"] = shared_fraction(vols[name], vols["train"])
    return out


def floors(tasks: Sequence[str], split: str = "z") -> dict[str, Any]:
    """One segment, and the intensity watershed with (sigma, seed level) chosen on validation."""
    from mtneuro_lab.decoding.floors import intensity_watershed_candidates, one_segment
    from mtneuro_lab.methods.em_eval import choose

    out: dict[str, Any] = {}
    for name in tasks:
        task, vols = task_volumes(name, split)
        sections = task.instances == "section_components"
        vz, vy, _ = task.effective_voxel_size()
        z_ratio = vy / vz
        test, val = vols["test"], vols["val"]
        one = choose([one_segment(test.shape)], test.labels, task.metric, task.ignore_zero)
        cpu = time.process_time()
        picked = choose(
            intensity_watershed_candidates(val.image, task.postprocess, z_ratio=z_ratio, sections=sections),
            val.labels,
            task.metric,
            task.ignore_zero,
        )
        search_cpu = time.process_time() - cpu
        cpu = time.process_time()
        applied = choose(
            intensity_watershed_candidates(
                test.image,
                task.postprocess,
                [picked.params["sigma"]],
                [picked.params["seed_level"]],
                z_ratio=z_ratio,
                sections=sections,
            ),
            test.labels,
            task.metric,
            task.ignore_zero,
        )
        out[name] = {
            "one_segment": one.metrics,
            "watershed": applied.metrics,
            "watershed_params": picked.params,
            "watershed_val": picked.metrics,
            "watershed_test_cpu_s": time.process_time() - cpu,
            "watershed_search_cpu_s": search_cpu,
            "test_voxels": int(test.labels.size),
            **split_overlap(task, vols),
        }
        print(
            f"{name}: one segment {one.metrics['arand']:.3f}, watershed {applied.metrics['arand']:.3f} "
            f"({picked.params})",
            flush=True,
        )
    return out


# -- the cost of the validation search -------------------------------------------------------------
def _median_cpu(fn: Any, repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        cpu = time.process_time()
        result = fn()
        times.append(time.process_time() - cpu)
    return statistics.median(times), result


def unshareable(arr: Any, task: Any) -> Any:
    """What an exact search cannot share, as a callable: the waterz pass over every threshold
    (affinities), or per seed setting its markers and its marker watershed, with the depth
    map and the flooded region ready (BC/BCD: the mask is applied after the flood)."""
    from mtneuro_lab.decoding import postprocess as pp
    from mtneuro_lab.methods.em_eval import in_plane_only, with_params

    cfg, kind = task.postprocess, task.target
    if task.instances == "section_components":
        arr = in_plane_only(arr, kind)
    settings = pp.search_settings(kind, cfg)
    if kind == "affinity":
        return lambda: [None for _ in pp.waterz_passes(arr, cfg, [s["threshold"] for s in settings])]
    depth, region = pp.flood_depth(arr), arr[0] > cfg.flood_foreground
    seeds = {s["seed_foreground"]: with_params(cfg, s) for s in settings}
    return lambda: [pp.flood(depth, pp.seed_markers(arr, values), region) for values in seeds.values()]


def mask_variants(prob: Any, gt: Any, task: Any) -> dict[str, Any]:
    """The validation search's chosen score (``task.metric``) under three BC/BCD post-processings:
    the mask inside the flood (one flood per setting, before session 7), the mask after the flood
    (the post-processing now), and the mask after the flood with every piece the mask cuts off
    given its own id (connected components per instance)."""
    import cc3d

    from mtneuro_lab.decoding import postprocess as pp
    from mtneuro_lab.methods.em_eval import choose, with_params

    arr, cfg = pp.as_prediction(prob), task.postprocess
    depth, settings = pp.flood_depth(arr), pp.search_settings(task.target, cfg)
    confidence = pp.confidence_map(arr, task.target)

    def within(values: Any) -> Any:
        return pp.flood(depth, pp.seed_markers(arr, values), arr[0] > values.mask_foreground)

    def after(values: Any) -> Any:
        return pp.seeded_watershed(arr, values)

    def pieces(values: Any) -> Any:
        return cc3d.connected_components(pp.seeded_watershed(arr, values), connectivity=6).astype("int64")

    out: dict[str, Any] = {}
    for name, segment in (
        ("mask inside the flood", within),
        ("mask after the flood", after),
        ("mask after the flood, pieces relabelled", pieces),
    ):
        cands = [pp.clean(segment(with_params(cfg, s)), cfg, s) for s in settings]
        chosen = choose(cands, gt, task.metric, task.ignore_zero, confidence)
        out[name] = {
            "params": chosen.params,
            "tried": chosen.tried,
            **{k: chosen.metrics[k] for k in (task.metric, "n_pred", "n_gt")},
        }
    return out


def search_ratio(prob: Any, gt: Any, task: Any, repeats: int = 3) -> dict[str, Any]:
    """CPU seconds of the search over ``task.postprocess.grid`` and of ONE post-processing with the
    chosen values (segmentation + merging + size filter, volume materialised), interleaved."""
    from mtneuro_lab.decoding import postprocess as pp
    from mtneuro_lab.methods.em_eval import search_postprocess, with_params

    sections = task.instances == "section_components"
    arr = pp.as_prediction(prob)

    def search() -> Any:
        return search_postprocess(arr, gt, task.target, task.postprocess, task.metric, task.ignore_zero, sections)

    chosen = search()
    single_cfg = with_params(task.postprocess, chosen.params)

    def single() -> Any:
        return pp.segment(arr, task.target, single_cfg)

    def scored() -> Any:  # what select=fixed does on validation: the one setting, segmented and scored
        args = (task.target, single_cfg, task.metric, task.ignore_zero, sections)
        return search_postprocess(arr, gt, *args, search=False)

    floor = unshareable(arr, task)
    search_s, single_s, floor_s, scored_s = [], [], [], []
    for _ in range(repeats):  # interleaved: load changes hit all alike
        search_s.append(_median_cpu(search, 1)[0])
        single_s.append(_median_cpu(single, 1)[0])
        floor_s.append(_median_cpu(floor, 1)[0])
        scored_s.append(_median_cpu(scored, 1)[0])
    return {
        "kind": task.target,
        "candidates": len(chosen.tried),
        "voxels": int(arr[0].size),
        "search_cpu_s": statistics.median(search_s),
        "one_postprocess_cpu_s": statistics.median(single_s),
        "ratio": statistics.median(search_s) / statistics.median(single_s),
        "unshareable_cpu_s": statistics.median(floor_s),
        "unshareable_ratio": statistics.median(floor_s) / statistics.median(single_s),
        "scored_cpu_s": statistics.median(scored_s),
        "ratio_to_scored": statistics.median(search_s) / statistics.median(scored_s),
        "chosen": chosen.params,
    }


def best_checkpoint(run_dir: Path) -> Path:
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")
    if not ckpts:
        raise FileNotFoundError(f"no selected checkpoint in {run_dir / 'checkpoints'}")
    return ckpts[-1]


def validation_prediction(run_dir: Path) -> tuple[Any, Any, Any]:
    """``(probabilities, ground truth, task)`` of a trained run's validation volume."""
    from mtneuro_lab.build import build_components, load_method_checkpoint
    from mtneuro_lab.data import augment
    from mtneuro_lab.rundir import saved_config

    ckpt = best_checkpoint(run_dir)
    cfg = saved_config(ckpt)
    comps = build_components(cfg)
    load_method_checkpoint(comps.method, ckpt, str(cfg.model._target_))
    dm = comps.datamodule
    dm.setup("fit")
    val = dm.volumes["val"]
    import torch

    image = augment.to_float(torch.from_numpy(val.image)[None], dm.mean, dm.std)
    comps.method.eval()
    prob = comps.method.predict_volume(image)
    return prob[0], val.labels, comps.task


def stand_in(
    task_name: str, shape: tuple[int, int, int] = (10, 256, 256), z0: int = 0, depth: int = 24
) -> tuple[Any, Any, Any]:
    """A degraded ground-truth prediction on sections ``z0 ..`` of the EM phantom (``depth``
    sections; bench_watershed's recipe); the task configs' phantom has 100 sections."""
    import numpy as np
    import torch

    from benchmarks.bench_watershed import _degrade
    from mtneuro_lab.build import build_task
    from mtneuro_lab.data import targets
    from mtneuro_lab.data.cubes import catalog_from_config
    from mtneuro_lab.data.sources.phantom_em import PhantomEMSource

    cfg = compose([f"task={task_name}"])
    task = build_task(cfg, catalog_from_config(cfg.cubes))
    source = PhantomEMSource(
        seed=0,
        cache_dir=os.environ.get("MTNEURO_CACHE", str(ROOT / ".cache")),
        shape=(max(depth, z0 + shape[0]), *shape[1:]),
    )
    box = [(0, shape[2]), (0, shape[1]), (z0, z0 + shape[0])]
    labels = np.array(source.cutout(task.label_channel, *box)).astype(np.int64)
    target, _ = targets.compute_targets(task.target, torch.from_numpy(labels)[None])
    return _degrade(target, np.random.default_rng(0)), labels, task


def search_cost(workdir: Path, repeats: int = 9) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    rows: dict[str, Any] = {}
    for task in TASKS:
        run = workdir / "runs" / task / "rsunet" / "s1"
        if (run / "metrics.json").is_file():
            rows[f"{task} (rsunet seed 1, validation volume)"] = search_ratio(*validation_prediction(run), repeats)
    rows["snemi3d phantom 10x256x256 (stand-in affinities)"] = search_ratio(*stand_in("snemi3d"), repeats)
    rows["mitoem phantom 10x256x256 (stand-in BC)"] = search_ratio(*stand_in("mitoem"), repeats)
    # 2.4x the voxels: does the BC ratio come from per-call overhead on a small volume? (it does not)
    rows["mitoem phantom 24x256x256 (stand-in BC)"] = search_ratio(*stand_in("mitoem", (24, 256, 256)), repeats)
    for name, row in rows.items():
        print(f"{name}: {row['candidates']} candidates, ratio {row['ratio']:.2f}", flush=True)
    # the task's validation sections (z 70-80 of the 100-section phantom): what masking after the flood changes
    variants = mask_variants(*stand_in("mitoem", (10, 256, 256), z0=70, depth=100))
    print(json.dumps(variants), flush=True)
    return {"rows": rows, "mask_variants": variants}


# -- volume-scale prediction -------------------------------------------------------------------------
VOLUME_SHAPE = (200, 512, 512)
_CHILD = """
import json, resource, sys
from mtneuro_lab.run import predict_volume
stats = predict_volume(sys.argv[1], sys.argv[2], sys.argv[3], key="image")
print(json.dumps({"windows": stats.windows, "voxels": stats.voxels, "wall_s": stats.wall_s, "cpu_s": stats.cpu_s,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def volume(workdir: Path, shape: tuple[int, int, int] = VOLUME_SHAPE, ckpt: Path | None = None) -> dict[str, Any]:
    """Chunked prediction of a ``shape`` phantom volume stored as zarr, in its own process.

    ``ckpt`` defaults to the gala_fibsem rsunet seed-1 run's selected checkpoint; memory and
    throughput do not depend on the weights, only on the network and the crop."""
    import subprocess
    import sys

    import numpy as np
    import zarr

    from mtneuro_lab.data.sources.phantom_em import PhantomEMSource

    ckpt = ckpt or best_checkpoint(workdir / "runs" / "gala_fibsem" / "rsunet" / "s1")
    tag = "x".join(map(str, shape))
    src = workdir / "volume" / f"input_{tag}.zarr"  # one input per shape: a rerun reuses it
    dst = workdir / "volume" / f"output_{tag}.zarr"
    if not src.exists():
        source = PhantomEMSource(seed=0, cache_dir=os.environ.get("MTNEURO_CACHE", str(ROOT / ".cache")), shape=shape)
        image = np.array(source.cutout("image", (0, shape[2]), (0, shape[1]), (0, shape[0])))
        src.parent.mkdir(parents=True, exist_ok=True)
        root = zarr.open_group(str(src), mode="w")
        root.create_array("image", shape=shape, chunks=(16, 256, 256), dtype="uint8")[:] = image
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ckpt), str(src), str(dst)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    out = zarr.open_array(str(dst), mode="r")
    res["output_bytes"] = int(np.prod(out.shape)) * out.dtype.itemsize
    res["output_disk_bytes"] = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    res["input_bytes"] = int(np.prod(shape))
    res["shape"] = list(shape)
    res["checkpoint"] = str(ckpt.relative_to(workdir)) if ckpt.is_relative_to(workdir) else str(ckpt)
    res["rss_over_output"] = res["peak_rss_bytes"] / res["output_bytes"]
    res["voxels_per_s"] = res["voxels"] / res["wall_s"]
    res["voxels_per_cpu_s"] = res["voxels"] / res["cpu_s"]
    print(json.dumps(res), flush=True)
    return res


# -- docs/em.md --------------------------------------------------------------------------------------
def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def real_table(res: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """Markdown of test/arand and VOI per task and arm, inference cost, and the target checks.

    Every arm lists the seeds of the recipe (``SEEDS``) it lacks: a missing run is named, never
    averaged over silently."""
    lines, checks = [], []
    runs, floor = res.get("train", {}), res.get("floors", {})
    seeds = sorted({*SEEDS, *res.get("budget", {}).get("seeds", [])})
    for task in TASKS:
        if task not in floor:
            continue
        f = floor[task]
        lines += [
            f"**{task}** (test volume {f['test_voxels']:,} voxels)",
            "",
            "| arm | test/arand per seed | mean test/arand | mean VOI split / merge | test segments per seed "
            f"({f['one_segment']['n_gt']:.0f} labelled) | inference CPU s | voxels per CPU s "
            "| mean val/arand (chosen setting) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, m in (("one segment (floor)", f["one_segment"]), ("intensity watershed (floor)", f["watershed"])):
            cpu = f["watershed_test_cpu_s"] if "watershed" in name else float("nan")
            per = f"{f['test_voxels'] / cpu:,.0f}" if cpu == cpu else ""
            shown = "" if cpu != cpu else f"{cpu:.1f}"
            val = f"{f['watershed_val']['arand']:.3f}" if "watershed" in name else ""
            lines.append(
                f"| {name} | | {m['arand']:.3f} | {m['voi_split']:.3f} / {m['voi_merge']:.3f} | {m['n_pred']:.0f} "
                f"| {shown} | {per} "
                f"| {val} |"
            )
        params = ", ".join(f"{k} {v:g}" for k, v in f["watershed_params"].items())
        ws = f["watershed"]["arand"]
        one = f["one_segment"]["arand"]
        for model in MODELS:
            done = [(s, runs[k]) for s in seeds if "failed" not in runs.get(k := f"{task}/{model}/s{s}", {"failed": 1})]
            missing = [str(s) for s in seeds if s not in {d for d, _ in done}]
            if not done:
                lines.append(f"| {model} | not run (seeds {', '.join(missing)}) | | | | | | |")
                continue
            arand = [m["test/arand"] for _, m in done]
            cpu = _mean([m["test/infer_cpu_s"] for _, m in done])
            vox = _mean([m["test/voxels"] / m["test/infer_cpu_s"] for _, m in done])
            segments = " / ".join(f"{m.get('test/n_pred', float('nan')):.0f}" for _, m in done)
            failed = [s for s in missing if "failed" in runs.get(f"{task}/{model}/s{s}", {})]
            absent = f"; seed {', '.join(missing)} NOT RUN" if missing else ""
            absent = absent.replace("NOT RUN", "FAILED") if failed == missing and missing else absent
            lines.append(
                f"| {model} | {' / '.join(f'{a:.3f}' for a in arand)} (seeds {', '.join(str(s) for s, _ in done)}"
                f"{absent}) | **{_mean(arand):.3f}** | {_mean([m['test/voi_split'] for _, m in done]):.3f} / "
                f"{_mean([m['test/voi_merge'] for _, m in done]):.3f} "
                f"| {segments} "
                f"| {cpu:.1f} | {vox:,.0f} "
                f"| {_mean([m.get('val/arand', float('nan')) for _, m in done]):.3f} |"
            )
            of = f" ({len(done)} of {len(seeds)} seeds)" if missing else ""
            checks.append(
                {
                    "name": f"{task} {model}: mean test/arand below both floors{of}",
                    "value": round(_mean(arand), 4),
                    "target": f"< {min(ws, one):.4f}",
                    "passed": _mean(arand) < min(ws, one),
                }
            )
            scratch = [runs.get(f"{task}/unetr/s{s}", {}).get("test/arand") for s, _ in done]
            if model == "mae" and None not in scratch:
                checks.append(  # the paper's claim, on the seeds both arms ran
                    {
                        "name": f"{task} mae: mean test/arand below unetr from scratch on the same seeds{of}",
                        "value": round(_mean(arand), 4),
                        "target": f"< {_mean(scratch):.4f}",
                        "passed": _mean(arand) < _mean(scratch),
                    }
                )
            if model == "rsunet":
                checks.append(
                    {
                        "name": f"{task} rsunet: mean test/arand at most half the watershed floor's{of}",
                        "value": round(_mean(arand), 4),
                        "target": f"<= {ws / 2:.4f}",
                        "passed": _mean(arand) <= ws / 2,
                    }
                )
        lines += ["", f"Watershed floor settings chosen on validation: {params}. {splits_line(f)}", ""]
    curves = [
        f"{name}: " + ", ".join(f"{step}: {loss:.3f} / {arand:.3f}" for step, loss, arand in run["val_curve"])
        for name, run in runs.items()
        if run.get("val_curve")
    ]
    if curves:
        lines += ["Validation curves (step: val/loss / val/arand; the checkpoint is the best val/arand):", ""]
        lines += [f"- {c}" for c in curves] + [""]
    lines += ["| check | value | target | passed |", "|---|---|---|---|"]
    lines += [f"| {c['name']} | {c['value']} | {c['target']} | {'yes' if c['passed'] else 'NO'} |" for c in checks]
    return "\n".join(lines), checks


def splits_line(f: dict[str, Any]) -> str:
    """The split sizes and how much of validation the training split already labels."""
    if "val_shape" not in f:  # floors measured before the split figures existed
        return ""
    shape = {k: "x".join(map(str, f[f"{k}_shape"])) for k in ("train", "val", "test")}
    shared = f.get("val_voxels_in_train_objects")
    of_train = f"; {shared:.1%} of its labelled voxels lie in objects the training split labels too" if shared else ""
    return (
        f"Splits: train {shape['train']}, validation {shape['val']} ({f['val_ids']} ids{of_train}), "
        f"test {shape['test']} ({f['test_ids']} ids)."
    )


def search_table(search: dict[str, Any]) -> str:
    """The cost table, and (where measured) the chosen validation score per BC mask variant."""
    rows = search.get("rows", search)  # results written before session 7 hold the rows alone
    lines = [
        "| prediction | target | voxels | candidates | search CPU s | one post-processing CPU s | ratio "
        "| unshareable part / one post-processing | search / (one post-processing + its scoring) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        floor = f"{r['unshareable_ratio']:.2f}" if "unshareable_ratio" in r else "not measured"
        scored = f"{r['ratio_to_scored']:.2f}" if "ratio_to_scored" in r else "not measured"
        lines.append(
            f"| {name} | {r['kind']} | {r['voxels']:,} | {r['candidates']} | {r['search_cpu_s']:.3f} | "
            f"{r['one_postprocess_cpu_s']:.3f} | **{r['ratio']:.2f}** | {floor} | {scored} |"
        )
    variants = search.get("mask_variants")
    if variants:
        lines += [
            "",
            "mitoem phantom, validation sections 70-80 (stand-in BC, 10x256x256): the setting and score the "
            "validation search chooses per BC post-processing",
            "",
            "| post-processing | AP-75 per seed / mask foreground setting | chosen setting | validation AP-75 "
            "| instances (ground truth) |",
            "|---|---|---|---|---|",
        ]
        for name, v in variants.items():
            each = ", ".join(
                f"{p['seed_foreground']:g}/{p['mask_foreground']:g}: {score:.3f}" for p, score in v["tried"]
            )
            lines.append(
                f"| {name} | {each} | {v['params']['seed_foreground']:g} / {v['params']['mask_foreground']:g} "
                f"| **{v['ap75']:.3f}** | {v['n_pred']:.0f} ({v['n_gt']:.0f}) |"
            )
    return "\n".join(lines)


def volume_table(r: dict[str, Any]) -> str:
    gib = 2**30
    return "\n".join(
        [
            "| volume | windows | wall s | CPU s | voxels / s (wall) | voxels / CPU s | peak RSS "
            "| output (float16) | RSS / output |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {'x'.join(map(str, r['shape']))} phantom, zarr in/out ({r['checkpoint']}) | {r['windows']} | "
            f"{r['wall_s']:.0f} | "
            f"{r['cpu_s']:.0f} | {r['voxels_per_s']:,.0f} | {r['voxels_per_cpu_s']:,.0f} | "
            f"{r['peak_rss_bytes'] / gib:.2f} GiB | {r['output_bytes'] / gib:.2f} GiB "
            f"({r['output_disk_bytes'] / gib:.2f} GiB on disk) | **{r['rss_over_output']:.2f}** |",
        ]
    )


def load_average() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def total_wall(res: dict[str, Any]) -> float:
    """Seconds behind the results: every training/pretraining run's own recorded wall time plus
    the invocations that trained nothing (floors, search, volume, doc)."""
    runs = [m for m in res.get("train", {}).values() if "failed" not in m]
    if "pretrain" in res:
        runs.append(res["pretrain"])
    trained = sum(m["wall_s"] for m in runs if m.get("wall_s") == m.get("wall_s"))  # NaN: not timed
    rest = sum(v for k, v in res.get("wall_s", {}).items() if not {"train", "pretrain"} & set(k.split("+")))
    return trained + rest


def real_block(split: str, steps: int, tta: str = DEFAULT_TTA) -> str:
    """The docs block of a recipe: ``em_real`` for the default one, else ``em_real_<split><steps>[_<tta>]``."""
    if (split, steps, tta) == (DEFAULT_SPLIT, STEPS, DEFAULT_TTA):
        return "em_real"
    return f"em_real_{split}{steps}" + ("" if tta == DEFAULT_TTA else f"_{tta}")


def write_docs(res: dict[str, Any], wall: float, workdir: Path, stages: Sequence[str] = ("doc",)) -> None:
    """The blocks whose results this invocation produced (all of them for ``doc`` alone), so a
    block's provenance line names the command that measured it."""
    from benchmarks.doc_blocks import write_block

    trained = bool(res.get("train"))
    used = {"steps": STEPS, "pretrain_steps": PRETRAIN_STEPS, "seeds": list(SEEDS), **res.get("budget", {})}
    reduced = (used["steps"], used["pretrain_steps"], tuple(used["seeds"])) != (STEPS, PRETRAIN_STEPS, SEEDS)
    budget = {
        "budget": f"{'REDUCED recipe (not the default of this script): ' if reduced else ''}"
        f"{used['steps']} steps of batch {BATCH} per run (default {STEPS}), one thread each, "
        f"{_runs_at_once(at_once(res, workdir))}; "
        + (
            f"MAE encoder: {used['pretrain_steps']} pretraining steps of bench_mae's recipe "
            f"(default {PRETRAIN_STEPS}), pretraining test/loss {res['pretrain'].get('test/loss', float('nan')):.3f}"
            if "pretrain" in res
            else "no MAE encoder pretrained (the mae arm not run)"
        )
        if trained
        else "floors only: no learned arm was trained (stage `train` not run)",
        "seeds": ", ".join(map(str, used["seeds"])) if trained else "none (floors are deterministic)",
        "load average (1/5/15 min) when written": load_average(),
    }
    fresh = set(stages) - {"doc"}
    ran = fresh or {"floors", "train", "pretrain", "search", "volume"}
    if "floors" in res and ran & {"floors", "train", "pretrain"}:  # untrained arms show as "not run"
        table, _ = real_table(res)
        split = res.get("split", "z")
        division = " ".join(SPLIT_OVERRIDES[split].get("gala_fibsem", ())) or "the task config"
        budget["train/validation division"] = f"{split} (gala_fibsem: {division})"
        tta = res.get("tta", DEFAULT_TTA)
        budget["test-time augmentation"] = f"task.tta={tta} (validation and test)"
        write_block(DOC, real_block(split, used["steps"], tta), table, wall, budget)
    if "search" in res and "search" in ran:
        write_block(DOC, "em_search", search_table(res["search"]), wall, {"load average": load_average()})
    if "volume" in res and "volume" in ran:
        write_block(DOC, "em_volume", volume_table(res["volume"]), wall, {"load average": load_average()})


def merge(res: dict[str, Any], new: dict[str, Any], stages: str, wall: float) -> dict[str, Any]:
    """``res`` (results.json as it is now) with one invocation's ``new`` results: runs and floors
    are added by name, seeds united, the invocation's wall time added to its stage combination."""
    for key in ("split", "tta"):
        res.setdefault(key, new[key])
    if "budget" in new:
        budget = res.setdefault("budget", {**new["budget"], "seeds": []})
        budget["seeds"] = sorted({*budget["seeds"], *new["budget"]["seeds"]})
    for key in ("train", "floors"):
        res.setdefault(key, {}).update(new.get(key, {}))
    res.update({k: new[k] for k in ("pretrain", "search", "volume") if k in new})
    walls = res.setdefault("wall_s", {})  # per stage combination, summed over invocations
    walls[stages] = walls.get(stages, 0.0) + wall
    return res


def record(results: Path, new: dict[str, Any], stages: str, wall: float) -> dict[str, Any]:
    """Merge ``new`` into ``results`` re-read under a lock, written atomically: two invocations on
    one work directory (``train --models unetr`` beside ``train --models mae``, one per core)
    each add their runs, and neither overwrites the other's."""
    with open(results.with_name(".results.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        res = merge(json.loads(results.read_text()) if results.is_file() else {}, new, stages, wall)
        for name, run in res.get("train", {}).items():  # the validation curves the recipe is read from
            if "failed" not in run:
                run["val_curve"] = validation_curve(results.parent / "runs" / name)
        atomic_write_bytes(results, (json.dumps(res, indent=2, default=str) + "\n").encode())
    return res


def _runs_at_once(n: int) -> str:
    return "one run at a time" if n <= 1 else f"up to {n} runs at a time (their recorded start and wall times)"


def at_once(res: dict[str, Any], workdir: Path) -> int:
    """The most training/pretraining runs of a work directory that overlapped in time, from each
    run's start and wall time (``metrics.json``'s modification time marks the end of a run
    recorded before the start was)."""
    spans = []
    for name, run in [*res.get("train", {}).items(), ("pretrain", res.get("pretrain"))]:
        if not run or "failed" in run or run.get("wall_s") != run.get("wall_s"):
            continue
        run_dir = workdir / ("pretrain" if name == "pretrain" else f"runs/{name}")
        if "started_unix" in run:
            end = run["started_unix"] + run["wall_s"]
        else:
            end = (run_dir / "metrics.json").stat().st_mtime
        spans.append((end - run["wall_s"], end))
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])  # an end sorts before a start
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def main(
    stages: Sequence[str] = ("floors", "search"),
    workdir: Path = ROOT / "outputs" / "bench_em",
    tasks: Sequence[str] = TASKS,
    models: Sequence[str] = MODELS,
    seeds: Sequence[int] = SEEDS,
    volume_ckpt: Path | None = None,
    volume_shape: Sequence[int] = VOLUME_SHAPE,
    steps: int = STEPS,
    pretrain_steps: int = PRETRAIN_STEPS,
    split: str = DEFAULT_SPLIT,
    tta: str = DEFAULT_TTA,
) -> dict[str, Any]:
    start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    results = workdir / "results.json"
    res = json.loads(results.read_text()) if results.is_file() else {}
    if res.setdefault("split", "z" if "train" in res or "floors" in res else split) != split:  # before session 7: z
        raise SystemExit(f"{results}: runs with --split {res['split']} already recorded; use another --workdir")
    if res.setdefault("tta", tta) != tta:  # no key before session 10: none
        raise SystemExit(f"{results}: runs with --tta {res['tta']} already recorded; use another --workdir")
    print(f"load average at start: {load_average()}", flush=True)
    if "pretrain" in stages or "train" in stages:  # the budget the docs block reports
        recorded = res.get("budget", {"steps": steps, "pretrain_steps": pretrain_steps})
        if (recorded["steps"], recorded["pretrain_steps"]) != (steps, pretrain_steps):
            raise SystemExit(f"{results}: runs of {recorded} already recorded; use another --workdir for a new budget")
    new: dict[str, Any] = {"split": split, "tta": tta}  # what this invocation adds to results.json
    if "pretrain" in stages or "train" in stages:
        new["budget"] = {"steps": steps, "pretrain_steps": pretrain_steps, "seeds": list(seeds)}
    if "pretrain" in stages:
        new["pretrain"] = pretrain(workdir, pretrain_steps)
    if "train" in stages:
        new["train"] = train(workdir, tasks, models, seeds, steps, split, tta)
    if "floors" in stages:
        new["floors"] = floors(tasks, split)
    if "search" in stages:
        new["search"] = search_cost(workdir)
    if "volume" in stages:
        vz, vy, vx = volume_shape
        new["volume"] = volume(workdir, (vz, vy, vx), ckpt=volume_ckpt)
    res = record(results, new, "+".join(stages), time.perf_counter() - start)
    if "doc" in stages:
        write_docs(res, total_wall(res), workdir, stages)
    if "train" in res and "floors" in res:
        res["checks"] = real_table(res)[1]
    return res


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("stages", nargs="+", choices=["pretrain", "train", "floors", "search", "volume", "doc"])
    parser.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "bench_em")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps per learned run (reduced recipe)")
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS, help="MAE pretraining steps")
    parser.add_argument("--volume-ckpt", type=Path, default=None, help="checkpoint for the volume stage")
    parser.add_argument(
        "--volume-shape", type=int, nargs=3, default=list(VOLUME_SHAPE), help="z y x of the volume stage"
    )
    parser.add_argument(
        "--split",
        default=DEFAULT_SPLIT,
        choices=list(SPLIT_OVERRIDES),
        help="train/validation division (SPLIT_OVERRIDES)",
    )
    parser.add_argument("--tta", default=DEFAULT_TTA, choices=list(TTA_MODES), help="task.tta of every learned run")
    args = parser.parse_args()
    main(
        args.stages,
        args.workdir,
        args.tasks,
        args.models,
        args.seeds,
        args.volume_ckpt,
        args.volume_shape,
        args.steps,
        args.pretrain_steps,
        args.split,
        args.tta,
    )
