"""MYOW-merged (``model=myow_m``): MYOW whose augmented and mined views share one projector and
predictor (no second head pair), the variant the MTNeuro paper reports as MYOW-m."""

from __future__ import annotations

from mtneuro_lab.methods.myow import MYOW


class MYOWMerged(MYOW):
    shares_heads = True
