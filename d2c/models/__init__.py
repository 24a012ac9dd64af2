"""d2c/models."""
