"""LightningModules, one file per method; shared parts live in base/optim/heads modules."""
