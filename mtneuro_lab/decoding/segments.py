"""Segment-level post-processing: small-segment merging and size filtering without touching voxels.

A segmentation here is a *base* volume of consecutive ids (0 = background) plus a ``mapping``
from base id to final id. Merging and removing segments only rewrites the mapping (arrays as
long as the number of base segments, not the volume), so the candidates of a post-processing
search share one base volume and cost almost nothing each; the final volume is
``mapping[base]`` (:meth:`Segmentation.labels`).

* :class:`RegionGraph`: which base segments touch (6-neighbourhood), with the mean affinity
  across each contact (affinity predictions) or the contact area alone (BC/BCD).
* :func:`merge_small`: every segment under ``merge_size`` voxels joins the neighbour it is most
  strongly connected to (highest mean affinity, else largest contact), one round, resolved as a
  forest (mutual choices join the larger segment).
* :func:`drop_small`: segments under ``min_size`` voxels become background.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Segmentation:
    """``mapping[base]``: a base volume shared by candidates, and this candidate's id per base id."""

    base: np.ndarray
    mapping: np.ndarray
    params: dict[str, float] = field(default_factory=dict)
    #: flat indices of every non-zero base voxel when its producer knows them and they are few
    #: (a BC/BCD flood): scoring then counts those voxels alone
    where: np.ndarray | None = None

    def labels(self) -> np.ndarray:
        """The final ``(Z, Y, X)`` int64 segmentation (consecutive ids, 0 = background)."""
        return self.mapping[self.base]

    @property
    def num_segments(self) -> int:
        return int(self.mapping.max()) if self.mapping.size else 0


def relabel_consecutive(seg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(labels, first_index, sizes)``: ids 0..n (0 stays 0), the flat index of each id's first
    voxel (-1 for an absent 0) and each id's voxel count, from one sort of the volume."""
    ids, first, inverse, counts = np.unique(seg.reshape(-1), return_index=True, return_inverse=True, return_counts=True)
    if ids.size == 0 or ids[0] != 0:  # keep id 0 for the background even where there is none
        first = np.concatenate([[-1], first])
        counts = np.concatenate([[0], counts])
        inverse = inverse + 1
    return inverse.reshape(seg.shape).astype(np.int64), first.astype(np.int64), counts.astype(np.int64)


def relabel_dense(seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, sizes)`` of :func:`relabel_consecutive` without the sort when the ids are
    non-negative and at most a few per voxel (watershed output: ids are its markers'); the
    voxels are touched by counting, not sorting, so every candidate of a search pays less."""
    flat = seg.reshape(-1)
    top = int(flat.max()) if flat.size else 0
    if flat.size == 0 or int(flat.min()) < 0 or top > 4 * flat.size:
        labels, _, sizes = relabel_consecutive(seg)
        return labels, sizes
    counts = np.bincount(flat, minlength=1)
    present = counts > 0
    present[0] = True
    new_id = np.cumsum(present) - 1
    return new_id[seg].astype(np.int64, copy=False), counts[present].astype(np.int64)


def compact(mapping: np.ndarray) -> np.ndarray:
    """Renumber a mapping's targets to 1..k in increasing order of their value (0 stays 0).

    A rank by counting (no sort): every candidate of a search compacts its mapping."""
    present = np.zeros(int(mapping.max()) + 1 if mapping.size else 1, dtype=bool)
    present[mapping] = True
    present[0] = True
    return (np.cumsum(present) - 1)[mapping].astype(np.int64)


@dataclass
class RegionGraph:
    """Undirected edges ``u < v`` between touching base segments, contact area and affinity sum."""

    u: np.ndarray
    v: np.ndarray
    area: np.ndarray
    affinity: np.ndarray | None = None  # summed affinity over the contact; None without affinities

    @classmethod
    def build(cls, base: np.ndarray, affs: np.ndarray | None = None) -> RegionGraph:
        """Face contacts along z, y, x of ``base`` (consecutive ids); ``affs`` ``(>=3, Z, Y, X)``
        nearest-neighbour affinities in waterz's convention (``affs[0][z]`` links z and z-1)."""
        us, vs, ws = [], [], []
        for axis in range(3):
            hi = [slice(None)] * 3
            lo = [slice(None)] * 3
            hi[axis], lo[axis] = slice(1, None), slice(None, -1)
            a, b = base[tuple(hi)], base[tuple(lo)]
            touch = (a != b) & (a != 0) & (b != 0)
            ua, ub = a[touch], b[touch]
            us.append(np.minimum(ua, ub))
            vs.append(np.maximum(ua, ub))
            if affs is not None:
                ws.append(np.asarray(affs[axis][tuple(hi)], dtype=np.float64)[touch])
        u, v = np.concatenate(us), np.concatenate(vs)
        w = np.concatenate(ws) if affs is not None else None
        return cls.aggregate(u, v, np.ones(u.size), w, int(base.max()) + 1)

    @classmethod
    def aggregate(
        cls, u: np.ndarray, v: np.ndarray, area: np.ndarray, affinity: np.ndarray | None, n: int
    ) -> RegionGraph:
        """Sum duplicate ``(u, v)`` pairs (u < v) into one edge each."""
        if u.size == 0:
            empty = np.zeros(0, dtype=np.int64)
            return cls(empty, empty, np.zeros(0), None if affinity is None else np.zeros(0))
        key = u.astype(np.int64) * n + v.astype(np.int64)
        keys, inverse = np.unique(key, return_inverse=True)
        summed_area = np.bincount(inverse, weights=area, minlength=keys.size)
        summed_aff = None if affinity is None else np.bincount(inverse, weights=affinity, minlength=keys.size)
        return cls(keys // n, keys % n, summed_area, summed_aff)

    def coarsen(self, mapping: np.ndarray, touching: np.ndarray | None = None) -> RegionGraph:
        """The graph between the segments of ``mapping`` (contacts inside one segment vanish);
        with ``touching`` (a mask over the segments) only the edges with an end in it."""
        a, b = mapping[self.u], mapping[self.v]
        keep = (a != b) & (a != 0) & (b != 0)
        if touching is not None:
            keep &= touching[a] | touching[b]
        u, v = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
        aff = None if self.affinity is None else self.affinity[keep]
        return self.aggregate(u, v, self.area[keep], aff, int(mapping.max()) + 1)

    def strength(self) -> np.ndarray:
        """How strongly each edge connects its ends: mean affinity, else contact area."""
        return self.area if self.affinity is None else self.affinity / self.area


def merge_small(mapping: np.ndarray, base_sizes: np.ndarray, graph: RegionGraph | None, merge_size: int) -> np.ndarray:
    """``mapping`` with every segment under ``merge_size`` voxels joined to its strongest neighbour.

    One round: each small segment points to the neighbour of highest :meth:`RegionGraph.strength`
    (ties: the larger contact, then the lower id); pointers form a forest plus mutual pairs,
    and a mutual pair joins the larger segment. Isolated small segments stay as they are.
    """
    if merge_size <= 0 or graph is None:
        return mapping
    n = int(mapping.max()) + 1
    sizes = np.bincount(mapping, weights=base_sizes, minlength=n)
    small = (sizes < merge_size) & (np.arange(n) > 0)
    if not small.any():
        return mapping
    coarse = graph.coarsen(mapping, touching=small)  # only the small segments' edges are read
    if coarse.u.size == 0:
        return mapping
    # both directions of every edge: (segment, neighbour, strength, area)
    seg = np.concatenate([coarse.u, coarse.v])
    other = np.concatenate([coarse.v, coarse.u])
    strength = np.tile(coarse.strength(), 2)
    area = np.tile(coarse.area, 2)
    wanted = small[seg]
    seg, other, strength, area = seg[wanted], other[wanted], strength[wanted], area[wanted]
    choice = strongest_neighbour(seg, other, strength, area, n)
    parent = np.where(choice >= 0, choice, np.arange(n))
    # mutual pairs (a -> b -> a): the smaller one keeps pointing, the larger becomes a root
    idx = np.arange(n)
    mutual = (parent[parent] == idx) & (parent != idx)
    bigger = (sizes > sizes[parent]) | ((sizes == sizes[parent]) & (idx < parent))
    parent[mutual & bigger] = idx[mutual & bigger]
    while True:  # pointer jumping to the roots
        nxt = parent[parent]
        if np.array_equal(nxt, parent):
            break
        parent = nxt
    return compact(parent[mapping])


def strongest_neighbour(
    seg: np.ndarray, other: np.ndarray, strength: np.ndarray, area: np.ndarray, n: int
) -> np.ndarray:
    """Per segment id (0..n-1), its neighbour ``other`` of highest strength, then largest
    contact, then lowest id (-1 without neighbours): running maxima per segment instead of a
    four-key sort, so merging costs every search candidate a few passes over its edges."""
    best = np.full(n, -np.inf)
    np.maximum.at(best, seg, strength)
    keep = strength == best[seg]
    seg, other, area = seg[keep], other[keep], area[keep]
    widest = np.full(n, -np.inf)
    np.maximum.at(widest, seg, area)
    keep = area == widest[seg]
    choice = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(choice, seg[keep], other[keep].astype(np.int64))
    choice[choice == np.iinfo(np.int64).max] = -1
    return choice


def drop_small(mapping: np.ndarray, base_sizes: np.ndarray, min_size: int) -> np.ndarray:
    """``mapping`` with segments under ``min_size`` voxels sent to background (0)."""
    if min_size <= 0:
        return mapping
    sizes = np.bincount(mapping, weights=base_sizes)
    out = mapping.copy()
    out[sizes[mapping] < min_size] = 0
    return compact(out)


def mean_per_segment(
    base: np.ndarray, values: np.ndarray, n: int, counts: np.ndarray | None = None, where: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(sum, count)`` of ``values`` over each base id 0..n-1: per-segment confidences for AP.
    ``counts`` (voxels per id, e.g. a contingency table's column sums) saves a pass; ``where``
    (flat indices of every non-zero voxel) skips the background, whose sum is then 0 (AP never
    ranks the background)."""
    flat = base.reshape(-1)
    weights = np.asarray(values, dtype=np.float64).reshape(-1)
    if where is not None:
        flat, weights = flat[where], weights[where]
    sums = np.bincount(flat, weights=weights, minlength=n)
    if counts is None:
        counts = np.bincount(flat, minlength=n)
    return sums, np.asarray(counts, dtype=np.float64)
