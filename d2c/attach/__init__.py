"""d2c/attach."""
