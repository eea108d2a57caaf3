"""The interface every volume source implements.

A source answers cutout requests in the BossDB coordinate frame of the dataset (x, y, z ranges
half-open, arrays returned in ``(z, y, x)`` order). Tasks never know which source they read, so a
task config works unchanged with ``source=phantom``, ``source=bossdb`` or ``source=local``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from mtneuro_lab.errors import DataError

Range = tuple[int, int]

#: Channel names understood by every X-ray source (BossDB encodings).
XRAY_CHANNELS = ("image", "pixel_labels", "roi_labels")


def as_range(value: Sequence[int], name: str) -> Range:
    """Validate a half-open ``[start, stop)`` range given as two ints."""
    if len(value) != 2:
        raise DataError(f"{name} must be [start, stop), got {list(value)}")
    start, stop = int(value[0]), int(value[1])
    if start < 0 or stop <= start:
        raise DataError(f"{name} must satisfy 0 <= start < stop, got [{start}, {stop})")
    return start, stop


class VolumeSource(ABC):
    """Reads cutouts of named channels.

    Subclasses implement :meth:`cutout`. Returned arrays may be read-only views (memory maps);
    callers copy when they need to modify.
    """

    #: channel names this source can serve
    channels: tuple[str, ...] = XRAY_CHANNELS

    @abstractmethod
    def cutout(self, channel: str, x: Range, y: Range, z: Range) -> np.ndarray:
        """Return ``channel`` over ``x``, ``y``, ``z`` (half-open) as a ``(z, y, x)`` array."""

    def check_channel(self, channel: str) -> None:
        if channel not in self.channels:
            raise DataError(
                f"{type(self).__name__}: unknown channel {channel!r}; available: {', '.join(self.channels)}"
            )
