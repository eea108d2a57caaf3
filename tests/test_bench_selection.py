"""benchmarks/bench_selection.py: the table names the trial Optuna chose, ties included, and says
whether a choice by test accuracy would have differed."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_selection import table  # noqa: E402


def _row(lr: float, val: float, test: float, chosen: bool) -> dict:
    return {"params": {"lr": lr}, "selection/value": val, "test/acc": test, "chosen": chosen}


def test_a_tie_on_validation_is_reported_against_the_trial_optuna_chose() -> None:
    rows = [_row(0.1, 0.458, 0.420, False), _row(0.2, 0.458, 0.390, True), _row(0.3, 0.450, 0.405, False)]
    text = table(rows)
    lines = text.splitlines()
    assert lines[2] == "| 1 | 0.2 | 0.458 | 0.390 | **yes** |"  # the chosen one ranks first among the tied
    assert "a different trial (test/acc 0.420 instead of 0.390)" in text
    assert "2 trials tie on val/acc" in text


def test_agreement_without_ties() -> None:
    text = table([_row(0.1, 0.5, 0.8, True), _row(0.2, 0.4, 0.7, False)])
    assert "would have picked the same trial." in text
    assert "tie" not in text
