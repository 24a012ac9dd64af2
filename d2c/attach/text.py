"""Class text embeddings (DC-Embedding inputs, docs/method.md Eq. 8).

One prompt per class (``attach.text.template``), encoded once by a frozen text encoder
into token states ``[C, L, d]`` and a mask ``[C, L]``, stored beside the condensed set
as ``text_embeddings.safetensors`` with the class names and settings in its metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from d2c.config import TextConfig
from d2c.models.encoders import class_prompts, load_text_encoder

TEXT_FILE = "text_embeddings.safetensors"
EMB_KEY = "embeddings"
MASK_KEY = "mask"


def compute_text_embeddings(cfg: TextConfig, class_names: Sequence[str], device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Encode one prompt per class.

    Returns:
        (embeddings float32 [C, L, d] with padded positions zero, mask float32 [C, L]).
    """
    encoder = load_text_encoder(cfg.encoder, cfg.path, cfg.max_length, device=device)
    tokens, mask = encoder.encode(class_prompts(class_names, cfg.template))
    return tokens.float().cpu(), mask.float().cpu()


def save_text_embeddings(path: str | Path, emb: torch.Tensor, mask: torch.Tensor, class_names: Sequence[str], cfg: TextConfig) -> None:
    """Write ``text_embeddings.safetensors`` (atomically: temp file, then rename)."""
    path = Path(path)
    meta = {
        "class_names": json.dumps(list(class_names)),
        "template": cfg.template,
        "encoder": cfg.encoder,
        "path": str(cfg.path),
        "max_length": str(cfg.max_length),
    }
    tmp = path.with_suffix(".tmp")
    save_file({EMB_KEY: emb.contiguous(), MASK_KEY: mask.contiguous()}, str(tmp), metadata=meta)
    tmp.replace(path)


def load_text_embeddings(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str], dict[str, str]]:
    """Read ``text_embeddings.safetensors``.

    Returns:
        (embeddings [C, L, d], mask [C, L], class names, metadata).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text embeddings {str(path)!r} not found; run `d2c condense` first")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        emb, mask = f.get_tensor(EMB_KEY), f.get_tensor(MASK_KEY)
    return emb, mask, json.loads(meta.get("class_names", "[]")), meta
