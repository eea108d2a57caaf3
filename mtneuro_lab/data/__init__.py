"""Data wing: sources -> cache -> cubes/splits -> datamodules (one-way flow)."""
