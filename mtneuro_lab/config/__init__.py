"""Config schemas and validation: every key is checked before any work starts."""

from mtneuro_lab.config.schema import validate_config

__all__ = ["validate_config"]
