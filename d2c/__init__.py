"""d2c: Diffusion Dataset Condensation (select + attach) in plain PyTorch.

This package imports no Ray; the Ray application lives in ``app/``.
"""

__version__ = "0.1.0"
