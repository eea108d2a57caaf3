"""The layers of the package, lowest first: the rule ``tests/test_layers.py`` enforces.

A module may import modules of its own wing and of any wing in a LOWER layer, never one of a
higher layer, and never one of another wing of the same layer (wings of one layer are
independent: ``nets`` knows nothing of ``data``, ``metrics`` nothing of ``decoding``). This holds
for imports inside functions too; a function-local ``mtneuro_lab`` import is allowed only where
it keeps a heavy third-party dependency out of start-up (``tests/test_layers.py::LAZY``, each
with its reason). There are no import cycles between modules.

A wing is a module or package name; a module belongs to the longest wing that prefixes it (the
bare package ``mtneuro_lab`` is a wing of its own: a new top-level module must be added here).
"""

from __future__ import annotations

LAYERS: tuple[tuple[str, ...], ...] = (
    # no project imports at all: error types, atomic writes and checksums (standard library
    # only), this table, the package itself
    ("mtneuro_lab", "mtneuro_lab.errors", "mtneuro_lab.io", "mtneuro_lab.layers"),
    # config schemas; checkpoint files and the RNG state every checkpoint carries (Lightning
    # plugin and callback); progress lines for log files (callback); where a process runs
    # (torchrun, SLURM) and preemption checkpoints
    (
        "mtneuro_lab.config",
        "mtneuro_lab.checkpoints",
        "mtneuro_lab.callbacks",
        "mtneuro_lab.progress",
        "mtneuro_lab.cluster",
    ),
    # data (sources -> cache -> tasks/splits -> datamodules -> augment) and, independent of it,
    # networks, scores and post-processing
    ("mtneuro_lab.data", "mtneuro_lab.nets", "mtneuro_lab.metrics", "mtneuro_lab.decoding"),
    # LightningModules: use data contracts, nets, metrics, decoding
    ("mtneuro_lab.methods",),
    # one place that builds source, task, datamodule, method and trainer from a config; run
    # directories (config.yaml, metrics.json, a checkpoint's saved config); perf.* applied to
    # built components (config.schema validates perf.* without importing perf); figures of
    # predictions for dashboards and the run directory (media callback); W&B conventions
    # (tracking); the memory estimate of a training step (memcheck)
    (
        "mtneuro_lab.build",
        "mtneuro_lab.rundir",
        "mtneuro_lab.perf",
        "mtneuro_lab.media",
        "mtneuro_lab.tracking",
        "mtneuro_lab.memcheck",
    ),
    # Task 3 read-outs, embeddings
    ("mtneuro_lab.analysis",),
    # flows and tables
    ("mtneuro_lab.run", "mtneuro_lab.report"),
    # entry points: train.py/evaluate.py (cli); the BossDB pre-download command and
    # ``python -m mtneuro_lab.train|evaluate`` (console scripts of an installed package)
    ("mtneuro_lab.cli",),
    ("mtneuro_lab.download", "mtneuro_lab.train", "mtneuro_lab.evaluate"),
)


def wing_of(module: str) -> str | None:
    """The wing ``module`` belongs to (longest matching prefix), None outside the table."""
    best = None
    for layer in LAYERS:
        for wing in layer:
            inside = module == wing or (module.startswith(wing + ".") and wing != "mtneuro_lab")
            if inside and (best is None or len(wing) > len(best)):
                best = wing
    return best


def layer_of(module: str) -> int | None:
    wing = wing_of(module)
    if wing is None:
        return None
    return next(i for i, layer in enumerate(LAYERS) if wing in layer)
