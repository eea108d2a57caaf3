#!/usr/bin/env python
"""Train and test one model: ``python train.py task=roi_c1 model=supervised [key=value ...]``.

Multirun sweeps: ``python train.py -m +sweep=seeds``. See README.md for every option.
"""

from mtneuro_lab.cli import main

if __name__ == "__main__":
    main("train")
