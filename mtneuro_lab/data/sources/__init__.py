"""Volume sources: phantom (synthetic, default), bossdb (intern + cache), local files."""

from mtneuro_lab.data.sources.base import XRAY_CHANNELS, VolumeSource

__all__ = ["VolumeSource", "XRAY_CHANNELS"]
