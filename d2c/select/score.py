"""The diffusion difficulty score (docs/method.md Eq. 7).

    s(x, c) = 1/|T| · Σ_{t∈T} mean ‖ε_t − ε_θ(√ᾱ_t z + √(1−ᾱ_t) ε_t, t, c)‖²

* ``T``: ``num_timesteps`` stratified timesteps over ``[0, total)`` — the midpoint of each
  of ``num_timesteps`` equal strata — the same for every image.
* ``ε_t``: drawn from a generator seeded by ``(seed, image_id)``; the t-index is the
  draw's position. A score therefore never depends on batch size, order, worker count
  or restarts.
* Every per-timestep loss is returned as well as the mean.
* The ``B·|T|`` noisy inputs of a batch go through the scorer in as few forward passes
  as ``max_forward_batch`` allows.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch

#: Bytes of the sha256 digest used as a 63-bit generator seed.
_SEED_BYTES = 8
_SEED_MASK = (1 << 63) - 1


def stratified_timesteps(num_timesteps: int, total: int = 1000) -> torch.Tensor:
    """Midpoints of ``num_timesteps`` equal strata of ``[0, total)``.

    Returns:
        int64 [num_timesteps], strictly increasing, in [0, total).
    """
    if not 1 <= num_timesteps <= total:
        raise ValueError(f"score.num_timesteps must be in [1, {total}], got {num_timesteps}")
    i = torch.arange(num_timesteps, dtype=torch.float64)
    return torch.floor((i + 0.5) * total / num_timesteps).to(torch.int64)


def image_seed(seed: int, image_id: str) -> int:
    """A 63-bit generator seed from (seed, image_id), stable across processes and runs."""
    digest = hashlib.sha256(f"{seed}\x1f{image_id}".encode()).digest()
    return int.from_bytes(digest[:_SEED_BYTES], "little") & _SEED_MASK


def image_noise(seed: int, image_ids: Sequence[str], num_timesteps: int, shape: Sequence[int]) -> torch.Tensor:
    """The noise ε_t of every image: draw i of image j's generator is its t-index i.

    Returns:
        float32 [B, num_timesteps, *shape].
    """
    out = torch.empty((len(image_ids), num_timesteps, *shape), dtype=torch.float32)
    gen = torch.Generator(device="cpu")
    for j, image_id in enumerate(image_ids):
        gen.manual_seed(image_seed(seed, image_id))
        out[j] = torch.randn((num_timesteps, *shape), generator=gen)
    return out


ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def difficulty_scores(
    model_fn: ModelFn,
    latents: torch.Tensor,
    labels: torch.Tensor,
    image_ids: Sequence[str],
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    seed: int,
    max_forward_batch: int = 4096,
    pad_rows: bool = False,
) -> torch.Tensor:
    """Per-timestep ε-prediction losses of each image.

    Args:
        model_fn: ε_θ(x_t [M,C,H,W], t [M] float, y [M] long) → [M, C' ≥ C, H, W];
            the first C output channels are ε (learned-σ scorers output 2C).
        latents: z = E(x), float [B, C, H, W].
        labels: int64 [B].
        image_ids: B stable ids (seed the noise).
        alphas_cumprod: ᾱ, [total] (float64 or float32).
        timesteps: int64 [T] from :func:`stratified_timesteps`.
        seed: ``score.seed``.
        max_forward_batch: most rows per scorer forward pass.
        pad_rows: pad every forward pass to exactly ``max_forward_batch`` rows. Matrix kernels
            pick their blocking by row count, so only a fixed row count makes a score bitwise
            independent of how images were batched (measured: a 7-row pass differs from the same
            rows inside a 64-row pass by 2e-7; any permutation within a fixed size is exact).
    Returns:
        float32 [B, T]: mean over (C, H, W) of ‖ε_t − ε̂‖² per image and timestep;
        the score is its mean over T.
    """
    noise = image_noise(seed, image_ids, len(timesteps), latents.shape[1:]).to(latents.device)
    return scores_from_noise(
        model_fn, latents, labels, noise, alphas_cumprod, timesteps, max_forward_batch, pad_rows
    ).cpu()


@torch.no_grad()
def scores_from_noise(
    model_fn: ModelFn,
    latents: torch.Tensor,
    labels: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    max_forward_batch: int = 4096,
    pad_rows: bool = False,
) -> torch.Tensor:
    """The device half of :func:`difficulty_scores`, given the noise already drawn.

    Args:
        noise: float32 [B, T, C, H, W] from :func:`image_noise`, on ``latents.device``.
        (the rest as in :func:`difficulty_scores`).
    Returns:
        float32 [B, T] on ``latents.device``; nothing here waits for the device.
    """
    b, c = latents.shape[:2]
    t_count = len(timesteps)
    device = latents.device
    ab = alphas_cumprod.to(device=device, dtype=torch.float64)[timesteps.to(device)]
    sqrt_ab = ab.sqrt().to(latents.dtype).view(1, t_count, 1, 1, 1)
    sqrt_1m = (1.0 - ab).sqrt().to(latents.dtype).view(1, t_count, 1, 1, 1)
    x_t = (sqrt_ab * latents.unsqueeze(1) + sqrt_1m * noise).flatten(0, 1)  # [B*T, C, H, W]
    t_rows = timesteps.to(device).repeat(b).to(latents.dtype)  # image-major: row j*T+i
    y_rows = labels.to(device).repeat_interleave(t_count)
    eps = noise.flatten(0, 1)
    losses = torch.empty(b * t_count, dtype=torch.float32, device=device)
    for start in range(0, b * t_count, max_forward_batch):
        sl = slice(start, start + max_forward_batch)
        xs, ts, ys = x_t[sl], t_rows[sl], y_rows[sl]
        rows = len(xs)
        if pad_rows and rows < max_forward_batch:
            extra = max_forward_batch - rows
            xs = torch.cat([xs, xs.new_zeros((extra, *xs.shape[1:]))])
            ts = torch.cat([ts, ts.new_zeros(extra)])
            ys = torch.cat([ys, ys.new_zeros(extra)])
        pred = model_fn(xs, ts, ys)[:rows, :c]
        losses[sl] = ((eps[sl] - pred.float()) ** 2).flatten(1).mean(1)
    return losses.view(b, t_count)
