"""``python -m mtneuro_lab.train [overrides]``: ``train.py`` of an installed package (also ``mtneuro-train``)."""

from mtneuro_lab.cli import train

if __name__ == "__main__":
    train()
