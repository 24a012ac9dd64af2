"""d2c/select."""
