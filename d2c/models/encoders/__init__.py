"""Frozen encoders behind small interfaces (docs/method.md: Select's autoencoder; Attach's text
and vision encoders). Each wraps one frozen ``nn.Module`` (eval mode, no gradients) and
encodes under ``torch.no_grad``. Loading failures raise :class:`ModelLoadError`.
"""

from .autoencoder import (
    SD_VAE_SCALING_FACTOR,
    SDVAE,
    Autoencoder,
    IdentityAutoencoder,
    load_autoencoder,
)
from .common import ModelLoadError
from .text import DEFAULT_MAX_LENGTH, DEFAULT_TEMPLATE, TextEncoder, class_prompts, load_text_encoder
from .tokens import fit_tokens, resize_token_grid, select_tokens
from .vision import (
    Dinov2Encoder,
    EfficientNetLite0Encoder,
    VisionEncoder,
    load_vision_encoder,
    to_unit_rgb,
)

__all__ = [
    "Autoencoder",
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_TEMPLATE",
    "Dinov2Encoder",
    "EfficientNetLite0Encoder",
    "IdentityAutoencoder",
    "ModelLoadError",
    "SDVAE",
    "SD_VAE_SCALING_FACTOR",
    "TextEncoder",
    "VisionEncoder",
    "class_prompts",
    "fit_tokens",
    "load_autoencoder",
    "load_text_encoder",
    "load_vision_encoder",
    "resize_token_grid",
    "select_tokens",
    "to_unit_rgb",
]
