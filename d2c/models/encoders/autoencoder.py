"""The frozen autoencoder E of docs/method.md (Select): images in [-1, 1] <-> diffusion latents.

- :class:`IdentityAutoencoder` — pixel-space models (the embedded default: 1×32×32).
- :class:`SDVAE` — the Stable Diffusion VAE (``diffusers.AutoencoderKL``), 8× downsampling,
  latents multiplied by the scaling factor 0.18215 (4×32×32 at 256 px).

diffusers is imported only when an SD-VAE is built, so pixel-space runs (and machines
without diffusers) never need it.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Literal, Optional

import torch
from torch import nn

from .common import FrozenEncoder, load_guarded, resolve_pretrained

#: Latent scaling factor of the Stable Diffusion VAE (latents ≈ unit variance after it).
SD_VAE_SCALING_FACTOR = 0.18215
#: Hub id suggested in error messages (the VAE DiT was trained with).
SD_VAE_HUB_ID = "stabilityai/sd-vae-ft-ema"
#: Subfolder that holds the VAE inside a full Stable Diffusion pipeline directory.
_PIPELINE_VAE_SUBFOLDER = "vae"
#: Pixel range the autoencoders work in.
IMAGE_MIN, IMAGE_MAX = -1.0, 1.0
#: Default config key of the autoencoder path (d2c.config: ``autoencoder.path``).
AUTOENCODER_CONFIG_KEY = "autoencoder.path"


def _check_images(images: torch.Tensor, channels: int) -> None:
    if images.ndim != 4 or images.shape[1] != channels:
        raise ValueError(
            f"expected images of shape [N, {channels}, H, W], got {tuple(images.shape)}; "
            "check data.channels against the autoencoder"
        )


class Autoencoder(FrozenEncoder, ABC):
    """Interface: ``encode`` images [N, C, H, W] in [-1, 1] → latents [N, c, H/f, W/f].

    Attributes:
        image_channels: C, channels of the images it takes.
        latent_channels: c, channels of the latents it gives.
        downsample: f, the spatial downsampling factor (8 for SD-VAE, 1 for identity).
    """

    image_channels: int
    latent_channels: int
    downsample: int

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(C, H, W) of an image → (c, H/f, W/f) of its latent."""
        channels, height, width = image_shape
        if channels != self.image_channels or height % self.downsample or width % self.downsample:
            raise ValueError(
                f"image shape {image_shape} does not fit this autoencoder "
                f"({self.image_channels} channels, sides divisible by {self.downsample})"
            )
        return self.latent_channels, height // self.downsample, width // self.downsample

    @abstractmethod
    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator | list[torch.Generator]] = None) -> torch.Tensor:
        """images float [N, C, H, W] in [-1, 1] → latents float32 [N, c, H/f, W/f] on ``device``.

        ``generator``: the posterior sample's randomness, one generator for the batch or a list
        of N, one per image (row i drawn from generator i alone)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [N, c, h, w] → images float32 [N, C, h·f, w·f], clamped to [-1, 1]."""


class IdentityAutoencoder(Autoencoder):
    """Pixel space: latents are the images themselves (``downsample`` 1).

    ``encode`` returns the input values unchanged (as float32 on ``device``; no copy is made
    when the input already is); ``decode`` clamps to [-1, 1] like any decoder output.
    """

    def __init__(self, channels: int, device: str | torch.device = "cpu") -> None:
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        super().__init__(nn.Identity(), device)
        self.image_channels = channels
        self.latent_channels = channels
        self.downsample = 1

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator | list[torch.Generator]] = None) -> torch.Tensor:
        """images [N, C, H, W] in [-1, 1] → the same values, float32 [N, C, H, W]; ``generator`` unused."""
        _check_images(images, self.image_channels)
        return images.to(device=self.device, dtype=torch.float32)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [N, C, H, W] → images float32 [N, C, H, W] clamped to [-1, 1]."""
        _check_images(latents, self.latent_channels)
        return latents.to(device=self.device, dtype=torch.float32).clamp(IMAGE_MIN, IMAGE_MAX)


class SDVAE(Autoencoder):
    """Stable Diffusion VAE via ``diffusers.AutoencoderKL.from_pretrained``.

    ``encode``: z = scaling_factor · (posterior sample if ``sample_posterior`` else posterior
    mean). DiT pre-computes its latents with a posterior *sample*; pass a ``torch.Generator``
    to make that sample reproducible (a CPU generator works with a GPU model: diffusers
    draws on the generator's device and moves the noise). ``decode`` divides by the
    scaling factor before the decoder.

    Args:
        path_or_id: a local model directory (a VAE directory, or a pipeline directory with a
            ``vae/`` subfolder) or an explicit hub id such as ``stabilityai/sd-vae-ft-ema``.
        scaling_factor: latent multiplier (0.18215 for SD-VAE; configured, not read from the model).
        sample_posterior: True = sample the posterior (DiT), False = its mean (deterministic).
        device: where the model runs.
        dtype: the model's compute dtype (outputs are float32).
        config_key: config key named in load errors.
    """

    def __init__(
        self,
        path_or_id: str | os.PathLike,
        scaling_factor: float = SD_VAE_SCALING_FACTOR,
        sample_posterior: bool = True,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        config_key: str = AUTOENCODER_CONFIG_KEY,
    ) -> None:
        if scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be > 0, got {scaling_factor}")
        what = "SD-VAE"
        source, local_only = resolve_pretrained(path_or_id, what=what, config_key=config_key, hub_hint=SD_VAE_HUB_ID)
        subfolder = None
        if local_only and not os.path.isfile(os.path.join(source, "config.json")):
            if os.path.isfile(os.path.join(source, _PIPELINE_VAE_SUBFOLDER, "config.json")):
                subfolder = _PIPELINE_VAE_SUBFOLDER

        def load() -> nn.Module:
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_pretrained(
                source, subfolder=subfolder, local_files_only=local_only, torch_dtype=dtype
            )

        model = load_guarded(load, what=what, path=path_or_id, config_key=config_key, hub_hint=SD_VAE_HUB_ID)
        super().__init__(model, device)
        config = model.config
        self.scaling_factor = float(scaling_factor)
        self.sample_posterior = bool(sample_posterior)
        self.image_channels = int(config.in_channels)
        self.latent_channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator | list[torch.Generator]] = None) -> torch.Tensor:
        """images float [N, 3, H, W] in [-1, 1] → latents float32 [N, 4, H/8, W/8] (× scaling factor).

        A list of N generators draws row i's posterior noise from generator i, as a batch of one
        with that generator would (diffusers' ``randn_tensor`` takes such a list)."""
        _check_images(images, self.image_channels)
        if isinstance(generator, list) and len(generator) != len(images):
            raise ValueError(f"{len(generator)} generators for {len(images)} images: give one per image")
        posterior = self.model.encode(images.to(device=self.device, dtype=self.dtype)).latent_dist
        latents = posterior.sample(generator=generator) if self.sample_posterior else posterior.mean
        return (latents * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [N, 4, h, w] (scaled) → images float32 [N, 3, 8h, 8w] clamped to [-1, 1]."""
        _check_images(latents, self.latent_channels)
        scaled = latents.to(device=self.device, dtype=self.dtype) / self.scaling_factor
        images = self.model.decode(scaled).sample
        return images.float().clamp(IMAGE_MIN, IMAGE_MAX)


def load_autoencoder(
    kind: Literal["identity", "sd_vae"],
    path: Optional[str | os.PathLike] = None,
    *,
    channels: int = 3,
    scaling_factor: float = SD_VAE_SCALING_FACTOR,
    sample_posterior: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config_key: str = AUTOENCODER_CONFIG_KEY,
) -> Autoencoder:
    """Build the configured autoencoder (``autoencoder.kind`` / ``autoencoder.path``).

    ``channels`` is used by the identity only (``data.channels``); the SD-VAE reads its own.
    """
    if kind == "identity":
        return IdentityAutoencoder(channels, device=device)
    if kind == "sd_vae":
        return SDVAE(
            path,
            scaling_factor=scaling_factor,
            sample_posterior=sample_posterior,
            device=device,
            dtype=dtype,
            config_key=config_key,
        )
    raise ValueError(f"unknown autoencoder kind {kind!r}; use 'identity' or 'sd_vae'")
