"""Per-image attach: latents and visual patch tokens, flip-consistent (docs/method.md, Visual).

For every selected image this computes ``latent = E(x)`` and the vision encoder's tokens
fitted to the diffusion transformer's token count h, and — when flips are on — the same
for the horizontally flipped image, so that flip augmentation during training always
sees the features of the image it trains on.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from d2c.config import D2CConfig
from d2c.data.preprocess import host_tensor, to_model_tensor
from d2c.models.encoders import Autoencoder, VisionEncoder, fit_tokens, load_autoencoder, load_vision_encoder
from d2c.models.encoders.autoencoder import IdentityAutoencoder
from d2c.select.score import image_seed

#: How encoder tokens are fitted to the model's token count (see d2c.models.encoders.tokens).
TOKEN_FIT_MODE = "resize"


def build_autoencoder(cfg: D2CConfig, device: str = "cpu") -> Autoencoder:
    """The configured autoencoder (``autoencoder.*``)."""
    return load_autoencoder(
        cfg.autoencoder.kind,
        cfg.autoencoder.path,
        channels=cfg.data.channels,
        scaling_factor=cfg.autoencoder.scaling_factor,
        sample_posterior=cfg.autoencoder.sample_posterior,
        device=device,
    )


def encode_latents(autoencoder: Autoencoder, images: np.ndarray, image_ids: Sequence[str], seed: int,
                   encode_rows: int) -> torch.Tensor:
    """uint8 [B, H, W, C] → latents float32 [B, c, h, w].

    A real encoder runs in passes of exactly ``encode_rows`` images (the last padded with zero
    images whose latents are dropped), so a latent never depends on its batch (kernels pick
    their blocking by row count). A sampled VAE posterior draws each image's noise from its own
    generator seeded by (seed, image_id), one generator per row of the pass.
    """
    x = to_model_tensor(images)
    if isinstance(autoencoder, IdentityAutoencoder):
        return autoencoder.encode(x)
    if encode_rows < 1:
        raise ValueError(f"encode_rows must be >= 1, got {encode_rows}")
    sample = getattr(autoencoder, "sample_posterior", False)
    out = []
    for start in range(0, len(x), encode_rows):
        chunk = x[start : start + encode_rows]
        rows = len(chunk)
        gens = [torch.Generator().manual_seed(image_seed(seed, i)) for i in image_ids[start : start + rows]] if sample else None
        if rows < encode_rows:
            chunk = torch.cat([chunk, chunk.new_zeros((encode_rows - rows, *chunk.shape[1:]))])
            if gens is not None:
                gens += [torch.Generator().manual_seed(0) for _ in range(encode_rows - rows)]
        out.append(autoencoder.encode(chunk, generator=gens)[:rows])
    if not out:
        return torch.empty((0, *autoencoder.latent_shape(tuple(x.shape[1:]))), dtype=torch.float32)
    return torch.cat(out)


class AttachEncoder:
    """Latents + visual tokens (and their flipped versions) for a batch of images.

    Args:
        cfg: the run's config (autoencoder, attach.vision, model token count).
        device: where the encoders run.
    """

    def __init__(self, cfg: D2CConfig, device: str = "cpu"):
        self.cfg = cfg
        self.flip = cfg.attach.flip
        self.seed = cfg.score.seed
        self.autoencoder = build_autoencoder(cfg, device)
        self.vision: Optional[VisionEncoder] = None
        if cfg.attach.vision.encoder != "none" and cfg.model.use_visual:
            v = cfg.attach.vision
            # the REPA target's layer / normalisation (attach.vision.layer, .normalize: EfficientNet-Lite0 only)
            target = dict(layer=v.layer, normalize=v.normalize) if v.encoder == "efficientnet_lite0" else {}
            self.vision = load_vision_encoder(v.encoder, v.path, v.image_size, device=device, **target)
        self.num_tokens = cfg.num_tokens

    def __call__(self, images: np.ndarray, image_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """uint8 [B, H, W, C] → {latent [B,c,h,w] f32, visual [B,h,d] f16, and *_flip}."""
        out: dict[str, np.ndarray] = {}
        variants = [("", images)]
        if self.flip:
            variants.append(("_flip", np.ascontiguousarray(images[:, :, ::-1])))
        for suffix, imgs in variants:
            latent = encode_latents(self.autoencoder, imgs, image_ids, self.seed, self.cfg.autoencoder.encode_rows)
            out["latent" + suffix] = latent.cpu().numpy()
            if self.vision is not None:
                chw = host_tensor(imgs.transpose(0, 3, 1, 2))
                tokens = fit_tokens(self.vision.encode(chw), self.num_tokens, TOKEN_FIT_MODE)
                out["visual" + suffix] = tokens.cpu().numpy().astype(np.float16)
        return out
