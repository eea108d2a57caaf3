"""``python -m mtneuro_lab.evaluate ckpt_path=...``: ``evaluate.py`` of an installed package (also ``mtneuro-eval``)."""

from mtneuro_lab.cli import evaluate

if __name__ == "__main__":
    evaluate()
