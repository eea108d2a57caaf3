"""Evaluation windows that touch training windows in the plane, over shared slices.

Two different cubes whose x/y windows share a boundary are not independent samples: fibre
bundles, vessels and cells continue across the boundary, so a test tile next to a training tile
shows much of the same tissue (spatial autocorrelation inflates test scores). The split check
(:meth:`mtneuro_lab.data.tasks.CubeTask._check_disjoint`) refuses windows that *overlap*;
this module names the ones that merely *touch*, so a run can report them and, with
``task.guard_px``, trim them.

Windows are half-open ``[start, stop)`` in full-resolution voxels, so ``x[0, 10)`` and
``x[10, 20)`` share a face, while ``x[0, 10)`` and ``x[11, 20)`` (a 1-voxel gap) do not touch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from mtneuro_lab.data.cubes import Cube

Window = tuple[Cube, tuple[int, int]]  # an in-plane window over a half-open z range

#: splits whose windows are checked against the training windows
EVAL_SPLITS = ("val", "test")


@dataclass(frozen=True)
class Contact:
    """One val/test window touching one training window over overlapping slices.

    ``side`` is the side of the *evaluation* window that touches: ``x-``/``x+``/``y-``/``y+``
    for a face (a shared boundary segment of ``length_px`` voxels), or a corner such as
    ``x+/y-`` for an edge contact (the windows meet at one point in the plane, a line along z;
    ``length_px`` is 0). ``z`` is the half-open range of slices both windows hold.
    """

    split: str
    eval_cube: Cube
    train_cube: Cube
    kind: Literal["face", "edge"]
    side: str
    length_px: int
    z: tuple[int, int]

    @property
    def sides(self) -> tuple[str, ...]:
        """The eval window's sides that touch (two for a corner)."""
        return tuple(self.side.split("/"))

    def describe(self, task_name: str) -> str:
        """One log line, e.g. ``roi_c2: test cube D/zi touches training cube A/zi along its x- face ...``."""
        where = (
            f"along its {self.side} face ({self.length_px} px"
            if self.kind == "face"
            else f"at its {self.side} corner (edge contact"
        )
        return (
            f"{task_name}: {self.split} cube {self.eval_cube.key} touches training cube "
            f"{self.train_cube.key} {where}, z[{self.z[0]}, {self.z[1]}))"
        )


def _axis_gap(a: tuple[int, int], b: tuple[int, int]) -> int:
    """Distance between two half-open ranges: < 0 overlap (minus its length), 0 touch, > 0 gap."""
    return max(b[0] - a[1], a[0] - b[1])


def _side(a: tuple[int, int], b: tuple[int, int], axis: str) -> str:
    """Which side of range ``a`` meets range ``b`` (they touch)."""
    return f"{axis}-" if a[0] == b[1] else f"{axis}+"


def contact_between(split: str, eval_window: Window, train_window: Window) -> Contact | None:
    """The contact of two windows, or None if they are apart, intersect in the plane, or share no slice."""
    (ev, ez), (tr, tz) = eval_window, train_window
    z = (max(ez[0], tz[0]), min(ez[1], tz[1]))
    if z[1] <= z[0]:
        return None
    gx, gy = _axis_gap(ev.x, tr.x), _axis_gap(ev.y, tr.y)
    if gx > 0 or gy > 0 or (gx < 0 and gy < 0):  # apart, or the same tissue (the overlap check's job)
        return None
    if gx == 0 and gy == 0:
        return Contact(split, ev, tr, "edge", f"{_side(ev.x, tr.x, 'x')}/{_side(ev.y, tr.y, 'y')}", 0, z)
    if gx == 0:
        return Contact(split, ev, tr, "face", _side(ev.x, tr.x, "x"), -gy, z)
    return Contact(split, ev, tr, "face", _side(ev.y, tr.y, "y"), -gx, z)


def find_contacts(windows: Mapping[str, Sequence[Window]]) -> tuple[Contact, ...]:
    """Every val/test window touching a training window (face or edge) over overlapping z."""
    out = []
    for split in EVAL_SPLITS:
        for eval_window in windows.get(split, ()):
            for train_window in windows.get("train", ()):
                contact = contact_between(split, eval_window, train_window)
                if contact is not None:
                    out.append(contact)
    return tuple(out)


def trim_window(cube: Cube, sides: Iterable[str], guard_px: int) -> Cube:
    """``cube`` with ``guard_px`` voxels cut off each of ``sides`` (``x-``, ``x+``, ``y-``, ``y+``)."""
    x, y = list(cube.x), list(cube.y)
    for side in set(sides):
        box = x if side[0] == "x" else y
        if side[1] == "-":
            box[0] += guard_px
        else:
            box[1] -= guard_px
    return Cube(cube.set_name, cube.region, (x[0], x[1]), (y[0], y[1]))
