"""Metrics: classification, pooled segmentation, EM instance metrics."""
