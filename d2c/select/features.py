"""Per-image visual features for the feature baselines (docs/method.md, Baselines: K-Center
greedy and Herding "on visual features").

One vector per image: the mean over the vision encoder's patch tokens of the *unflipped*
image, float32 [d]. Why the mean of the patch tokens:

- it is the vector the encoder's own head reads for EfficientNet-Lite0 (global average
  pooling of the final 1280-channel conv map), and the usual "penultimate features" that
  K-Center (core-set) and Herding (iCaRL) were run on;
- it uses the encoder's own output: DINOv2 gives the mean of its patch tokens (the ones Attach
  stores), not its CLS token; EfficientNet-Lite0 gives its head map without the
  ``attach.vision.layer`` / ``normalize`` of the REPA target (no better for pooled features:
  benchmarks/results/repa_target);
- it is invariant to the grid size, so a small input (few tokens) still gives a d-vector.

Every encoder forward pass has exactly ``forward_rows`` images (the last chunk is padded
with black images and their outputs dropped), so a feature never depends on how the rows
were batched: bitwise equal across batch sizes, actor counts and resumes.
"""

from __future__ import annotations

import numpy as np
import torch

from d2c.data.preprocess import host_tensor
from d2c.models.encoders import VisionEncoder

#: How the patch tokens [T, d] of one image become its feature [d] (recorded in the features' settings).
FEATURE_POOLING = "mean_over_patch_tokens"


def pooled_features(encoder: VisionEncoder, images: np.ndarray, forward_rows: int) -> np.ndarray:
    """Images → one pooled feature per image.

    Args:
        encoder: a frozen vision encoder (its ``image_size`` sets the input resolution).
        images: uint8 [B, H, W, C], C ∈ {1, 3} (grey is repeated to RGB by the encoder).
        forward_rows: images per encoder forward pass; chunks are zero-padded to it.
    Returns:
        float32 [B, d]: the mean over the encoder's T patch tokens of each image.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [B, H, W, C], got {images.dtype} {images.shape}")
    if forward_rows < 1:
        raise ValueError(f"forward_rows must be >= 1 (select.feature_batch_size), got {forward_rows}")
    chw = host_tensor(images.transpose(0, 3, 1, 2))  # [B, C, H, W]
    out = np.empty((len(chw), encoder.dim), np.float32)
    for start in range(0, len(chw), forward_rows):
        chunk = chw[start : start + forward_rows]
        m = len(chunk)
        if m < forward_rows:
            pad = torch.zeros((forward_rows - m, *chunk.shape[1:]), dtype=chunk.dtype)
            chunk = torch.cat([chunk, pad])
        tokens = encoder.encode(chunk)  # [forward_rows, T, d]
        out[start : start + m] = tokens[:m].mean(1).cpu().numpy()
    return out
