"""d2c/train."""
