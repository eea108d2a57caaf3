#!/usr/bin/env python
"""Re-evaluate a checkpoint: ``python evaluate.py ckpt_path=<run>/checkpoints/<x>.ckpt [overrides]``.

The model is rebuilt from the checkpoint and the ``config.yaml`` saved beside it; test
metrics are recomputed and written to this command's own run directory.
"""

from mtneuro_lab.cli import main

if __name__ == "__main__":
    main("evaluate")
