"""Analysis wing: Task 3 features and read-outs, overlays, post-processing, report tables."""
