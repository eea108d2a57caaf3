"""mtneuro-lab."""
