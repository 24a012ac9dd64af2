"""d2c/eval."""
