"""Matching a vision encoder's patch tokens to the diffusion transformer's tokens (Eq. 10).

docs/method.md: "keep the first h tokens, h = the diffusion transformer's token count". That
literal rule (:func:`select_tokens`) is only spatially meaningful when the two token grids
are the same — as in the paper (DINOv2-B/14 at 224 px: 16×16 = 256 tokens; DiT-XL/2 at
256 px: 16×16 = 256) and in the embedded default (EfficientNet-Lite0 at 256 px: 8×8 = 64;
DiT patch 4 on 32 px: 8×8 = 64). When the grids differ (e.g. an 8×8 encoder grid for a
16×16 model grid, or the reverse), truncating would keep only the top rows of the image;
:func:`resize_token_grid` resamples the 2D grid instead so that token i of the model and
target i cover the same image region. :func:`fit_tokens` picks one by name.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

#: Names accepted by :func:`fit_tokens`.
TOKEN_FIT_MODES = ("first", "resize")


def select_tokens(tokens: torch.Tensor, h: int) -> torch.Tensor:
    """Keep the first ``h`` tokens (docs/method.md Eq. 10, literal): [N, T, d] → [N, h, d], T ≥ h."""
    if tokens.ndim != 3:
        raise ValueError(f"expected tokens [N, T, d], got shape {tuple(tokens.shape)}")
    if not 1 <= h <= tokens.shape[1]:
        raise ValueError(
            f"cannot keep the first {h} of {tokens.shape[1]} tokens; the vision encoder gives fewer "
            "tokens than the model has: raise attach.vision.image_size or resize the token grid"
        )
    return tokens[:, :h]


def grid_side(num_tokens: int) -> int:
    """Side g of a square token grid with g·g = ``num_tokens`` (ValueError if not square)."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a square grid")
    return side


def resize_token_grid(tokens: torch.Tensor, target_grid: int) -> torch.Tensor:
    """Resample a square, row-major token grid: [N, g·g, d] → [N, target_grid², d].

    Bilinear on the 2D grid with cell-centred coordinates (``align_corners=False``) and no
    antialiasing: a linear ramp over the grid stays exactly linear wherever the target
    cell centre lies between source centres (everywhere for downsampling; all but the
    border row/column for upsampling, where values clamp to the edge). Halving the grid
    (16×16 → 8×8) therefore equals the mean of each 2×2 block. Returns the input itself
    when the grid already has the target size.
    """
    if tokens.ndim != 3:
        raise ValueError(f"expected tokens [N, T, d], got shape {tuple(tokens.shape)}")
    if target_grid < 1:
        raise ValueError(f"target_grid must be >= 1, got {target_grid}")
    batch, num_tokens, dim = tokens.shape
    side = grid_side(num_tokens)
    if side == target_grid:
        return tokens
    grid = tokens.reshape(batch, side, side, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(grid.float(), size=(target_grid, target_grid), mode="bilinear", align_corners=False)
    return resized.to(tokens.dtype).permute(0, 2, 3, 1).reshape(batch, target_grid * target_grid, dim)


def fit_tokens(tokens: torch.Tensor, h: int, mode: Literal["first", "resize"] = "resize") -> torch.Tensor:
    """[N, T, d] → [N, h, d]: unchanged if T == h, else by ``mode``.

    "first": :func:`select_tokens` (the paper's literal rule; needs T ≥ h).
    "resize": :func:`resize_token_grid` to a √h × √h grid (needs T and h square).
    """
    if mode not in TOKEN_FIT_MODES:
        raise ValueError(f"unknown token fit mode {mode!r}; use one of {TOKEN_FIT_MODES}")
    if tokens.ndim != 3:
        raise ValueError(f"expected tokens [N, T, d], got shape {tuple(tokens.shape)}")
    if tokens.shape[1] == h:
        return tokens
    if mode == "first":
        return select_tokens(tokens, h)
    return resize_token_grid(tokens, grid_side(h))
