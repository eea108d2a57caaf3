"""``source=phantom`` for every task: the task's modality picks the generator.

X-ray tasks (MTNeuro) get :class:`PhantomXraySource`; EM tasks (SNEMI3D, MitoEM) get the
synthetic serial-EM volume. The run injects ``modality`` (from the task) and the cube catalog.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from mtneuro_lab.data.sources.base import VolumeSource
from mtneuro_lab.data.sources.phantom_em import PhantomEMSource
from mtneuro_lab.data.sources.phantom_source import PhantomXraySource
from mtneuro_lab.data.sources.phantom_tissue import TissueConfig


def make_phantom(
    modality: Literal["xray", "em"] = "xray",
    seed: int = 0,
    z_extent: Sequence[int] = (100, 480),
    cubes: Mapping[str, Any] | None = None,
    regions: Sequence[str] | None = None,
    roi_ids: Mapping[str, int] | None = None,
    cache_dir: str = "~/.cache/mtneuro_lab",
    em_shape: Sequence[int] = (100, 256, 256),
    generator: Literal["v1", "v2"] = "v2",
    tissue: TissueConfig | None = None,
) -> VolumeSource:
    """``em_shape`` is the EM phantom's ``[z, y, x]`` (EM tasks only; ``z_extent``, ``generator``
    and ``tissue`` are X-ray only: see :class:`PhantomXraySource` and :class:`TissueConfig`)."""
    if modality == "em":
        return PhantomEMSource(seed=seed, cache_dir=cache_dir, shape=em_shape)
    return PhantomXraySource(
        cubes=cubes or {},
        regions=tuple(regions or ("cortex", "striatum", "vp", "zi")),
        roi_ids=roi_ids,
        seed=seed,
        cache_dir=cache_dir,
        z_extent=z_extent,
        generator=generator,
        tissue=tissue,
    )
