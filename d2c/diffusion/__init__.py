"""d2c/diffusion."""
