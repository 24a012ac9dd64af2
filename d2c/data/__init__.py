"""d2c/data."""
