"""Diffusion Transformer (DiT / SiT backbone) with D2C's DC-embedding and REPA projector.

One file for the whole network, laid out like the official DiT ``models.py``:
embedding layers, the core model, positional-embedding helpers, model configs.

* With ``text_dim=None`` and ``proj_dim=None`` the parameter names and shapes are exactly
  those of the official DiT checkpoints (facebookresearch/DiT), so ``DiT-XL-2-256x256.pt``
  loads with ``load_state_dict(strict=True)``, and ``model(x, t, y)`` returns a plain tensor
  as the official model does.
* SiT uses the same network; only the diffusion wrapper (interpolant, time range) differs.
  The timestep embedder accepts fractional ``t`` (SiT feeds ``t`` in [0, 1] directly).
* ``text_dim`` switches the label embedder to :class:`DCEmbedding` (docs/method.md Eq. 9);
  ``proj_dim`` adds the REPA projector applied after block ``encoder_depth`` (Eq. 11-12).

Shapes use N = batch, C = input channels, H = W = input_size, p = patch_size,
T = (H / p) ** 2 tokens, D = hidden_size, L = text_len, d_text = text_dim.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# Size of the sinusoidal timestep features fed to the timestep MLP (official DiT: 256).
FREQUENCY_EMBEDDING_SIZE = 256
# Longest period of the sinusoidal timestep and position features (official DiT: 10000).
MAX_PERIOD = 10000
# Epsilon of every affine-free LayerNorm in the blocks and the final layer (official: 1e-6).
NORM_EPS = 1e-6
# Std of the normal init of the class table and of the timestep MLP weights (official: 0.02).
EMBED_INIT_STD = 0.02
# Timestep-frequency shift of the official DiT (exponent divided by half_dim - shift).
# diffusers' DiTTransformer2DModel uses 1 instead; see ``timestep_embedding``.
OFFICIAL_TIMESTEP_FREQ_SHIFT = 0.0


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``.

    Args:
        x: ``[N, T, D]``.
        shift, scale: ``[N, D]`` (broadcast over tokens).
    Returns:
        ``[N, T, D]``.
    """
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    max_period: float = MAX_PERIOD,
    freq_shift: float = OFFICIAL_TIMESTEP_FREQ_SHIFT,
) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps, ``[cos, sin]`` order.

    ``freqs_k = exp(-ln(max_period) * k / (half - freq_shift))`` for ``k = 0 .. half-1``,
    ``half = dim // 2``; the output is ``cat(cos(t * freqs), sin(t * freqs))`` (zero-padded by
    one column when ``dim`` is odd). The official DiT uses ``freq_shift = 0``; diffusers'
    ``DiTTransformer2DModel`` uses ``Timesteps(flip_sin_to_cos=True, downscale_freq_shift=1)``,
    i.e. the same ``[cos, sin]`` order but ``freq_shift = 1``. Both agree exactly at ``t = 0``.

    Args:
        t: ``[N]`` timesteps (any float/int dtype).
        dim: feature size.
        max_period: longest period.
        freq_shift: denominator shift (see above).
    Returns:
        ``[N, dim]`` float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Timestep -> ``[N, D]``: sinusoidal features then Linear-SiLU-Linear (``mlp.0``, ``mlp.2``)."""

    def __init__(
        self,
        hidden_size: int,
        frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE,
        freq_shift: float = OFFICIAL_TIMESTEP_FREQ_SHIFT,
    ):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` ``[N]`` -> ``[N, D]``."""
        t_freq = timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> ``[N, D]`` through ``embedding_table``.

    The table has ``num_classes + 1`` rows when ``dropout_prob > 0``; the last row (index
    ``num_classes``) is the null class used for classifier-free guidance. Which labels are
    dropped is decided once by :meth:`DiT.drop_mask` so that every conditioning path sees the
    same mask; this module only embeds.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.has_null_class = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(self.has_null_class), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` ``[N]`` long (null class = ``num_classes``) -> ``[N, D]``."""
        return self.embedding_table(labels)


class DCEmbedding(LabelEmbedder):
    """D2C's DC-embedding (docs/method.md Eq. 9): class embedding plus a per-class text embedding.

    For token states ``t`` ``[N, L, d_text]`` and mask ``m`` ``[N, L]``::

        e = Conv1d(d_text -> D, kernel=L, stride=L)((t * m) as [N, d_text, L])   # [N, D]
        y = text_mlp(text_norm(e)) + e + embedding_table[c]                      # [N, D]

    ``text_mlp`` is Linear(D, D)-SiLU-Linear(D, D); ``text_norm`` a LayerNorm with affine
    parameters. Masked-out tokens (m = 0) are replaced by zeros, so their values never matter.

    Null (dropped) labels use class row ``num_classes`` AND an all-zero text input. The
    convolution is linear, so a zero input gives ``e = text_proj.bias``: the null text
    embedding is the learned, sample-independent vector ``text_mlp(text_norm(b)) + b``. The
    bias is kept (not forced to zero) because it is shared by all classes; it is initialised
    to zero, so at initialisation the null label embeds exactly to ``embedding_table[C]``.

    Parameter names (``embedding_table``, ``text_proj``, ``text_norm``, ``text_mlp``) live under
    the model's ``y_embedder`` so an official DiT checkpoint loads with ``strict=False`` and
    only the ``y_embedder.text_*`` keys missing.
    """

    def __init__(
        self,
        num_classes: int,
        hidden_size: int,
        dropout_prob: float,
        text_dim: int,
        text_len: int,
    ):
        super().__init__(num_classes, hidden_size, dropout_prob)
        self.text_dim = text_dim
        self.text_len = text_len
        self.text_proj = nn.Conv1d(text_dim, hidden_size, kernel_size=text_len, stride=text_len)
        self.text_norm = nn.LayerNorm(hidden_size, eps=NORM_EPS)
        self.text_mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(  # type: ignore[override]
        self,
        labels: torch.Tensor,
        text_emb: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        null: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed labels and their text.

        Args:
            labels: ``[N]`` long, already replaced by ``num_classes`` where dropped.
            text_emb: ``[N, L, d_text]`` per-sample token states (the caller gathers the
                class's stored embedding for each sample).
            text_mask: ``[N, L]`` (bool or 0/1 float); ``None`` means every token is valid.
            null: ``[N]`` bool, True where the label is the null class (text zeroed); ``None``
                means "where ``labels == num_classes``".
        Returns:
            ``[N, D]``.
        """
        n, length, dim = text_emb.shape
        if length != self.text_len or dim != self.text_dim:
            raise ValueError(
                f"text_emb must be [N, {self.text_len}, {self.text_dim}], got {tuple(text_emb.shape)}"
            )
        if labels.shape != (n,):
            raise ValueError(f"labels must be [{n}], got {tuple(labels.shape)}")
        if null is None:
            null = labels == self.num_classes
        keep = (~null)[:, None].expand(n, length)  # [N, L] bool
        if text_mask is not None:
            if text_mask.shape != (n, length):
                raise ValueError(f"text_mask must be [{n}, {length}], got {tuple(text_mask.shape)}")
            keep = keep & (text_mask != 0)
        # t ⊙ m, written as a select so masked values (even inf/nan padding) cannot leak in.
        tokens = torch.where(keep.unsqueeze(-1), text_emb, torch.zeros_like(text_emb))  # [N, L, d_text]
        e = self.text_proj(tokens.transpose(1, 2)).squeeze(-1)  # [N, D]
        return self.text_mlp(self.text_norm(e)) + e + self.embedding_table(labels)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


class PatchEmbed(nn.Module):
    """Image ``[N, C, H, W]`` -> tokens ``[N, T, D]`` with a stride-p Conv2d (``proj``).

    Tokens are in row-major (h, w) order, as in the official DiT (timm's PatchEmbed).
    """

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N, T, D]``."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"expected {self.input_size}x{self.input_size} inputs, got {tuple(x.shape[-2:])}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` Linear and an output ``proj``.

    ``qkv`` output rows are ordered [q | k | v], each split into heads of ``D / num_heads``
    contiguous rows (the timm/official layout). Uses ``F.scaled_dot_product_attention``.
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, T, D]`` -> ``[N, T, D]``."""
        n, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(n, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N, heads, T, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, T, head_dim]
        return self.proj(out.transpose(1, 2).reshape(n, tokens, dim))


class Mlp(nn.Module):
    """Token MLP ``fc1`` -> GELU (tanh approximation) -> ``fc2``."""

    def __init__(self, hidden_size: int, mlp_hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden_dim, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, T, D]`` -> ``[N, T, D]``."""
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning on ``c`` ``[N, D]``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, T, D]``, ``c`` ``[N, D]`` -> ``[N, T, D]``."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + Linear to ``p * p * C_out`` values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, T, D]``, ``c`` ``[N, D]`` -> ``[N, T, p * p * C_out]``."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def build_projector(hidden_size: int, proj_hidden_dim: int, proj_dim: int) -> nn.Sequential:
    """REPA projector φ: Linear(D, h)-SiLU-Linear(h, h)-SiLU-Linear(h, proj_dim).

    Maps ``[..., D]`` -> ``[..., proj_dim]``; its Linears are ``projector.0/.2/.4``.
    """
    return nn.Sequential(
        nn.Linear(hidden_size, proj_hidden_dim),
        nn.SiLU(),
        nn.Linear(proj_hidden_dim, proj_hidden_dim),
        nn.SiLU(),
        nn.Linear(proj_hidden_dim, proj_dim),
    )


@contextlib.contextmanager
def seeded_init(seed: int, part: str):
    """Draw a part's initial weights from the global RNG seeded by ``(seed, part)``, restoring
    the global RNG afterwards (the caller's random stream is left as it was)."""
    digest = hashlib.sha256(f"{seed}\x1f{part}".encode()).digest()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        yield


class DiTOutput(NamedTuple):
    """Structured output of :meth:`DiT.forward`; unpacks as ``out, proj = model(...)``.

    out: ``[N, C_out, H, W]`` model prediction.
    proj: ``[N, T, P]`` = φ(h), h the hidden states after block ``encoder_depth``; P is
        ``proj_dim`` when the model has a projector, else φ is the identity and P = D.
    """

    out: torch.Tensor
    proj: torch.Tensor


class DiT(nn.Module):
    """Diffusion transformer (DiT; SiT uses the same network).

    Args:
        input_size: spatial size H = W of the input.
        patch_size: p; T = (input_size / p) ** 2 tokens.
        in_channels: C.
        hidden_size: D.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden size / D.
        class_dropout_prob: label-dropout probability for CFG during training; > 0 adds the
            null-class row ``num_classes`` to the class table.
        num_classes: number of classes.
        learn_sigma: output 2C channels (ε and the variance interpolation) instead of C.
        text_dim: d_text of the class text embeddings; enables :class:`DCEmbedding`.
        text_len: L, the number of text tokens per class.
        proj_dim: output size of the REPA projector (e.g. the vision feature size); enables it.
        proj_hidden_dim: hidden size of the projector.
        encoder_depth: the projector reads the hidden states after this many blocks.
        timestep_freq_shift: 0 (official DiT, default) or 1 (diffusers' DiT convention); see
            :func:`timestep_embedding`. Only for reproducing diffusers outputs exactly.
        init_seed: the seed of :meth:`initialize_weights` (None: from the global torch RNG).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        text_dim: int | None = None,
        text_len: int = 16,
        proj_dim: int | None = None,
        proj_hidden_dim: int = 2048,
        encoder_depth: int = 8,
        timestep_freq_shift: float = OFFICIAL_TIMESTEP_FREQ_SHIFT,
        init_seed: int | None = None,
    ):
        super().__init__()
        if proj_dim is not None and not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in [1, {depth}] when proj_dim is set, got {encoder_depth}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.text_dim = text_dim
        self.text_len = text_len
        self.proj_dim = proj_dim
        self.encoder_depth = encoder_depth

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift)
        if text_dim is None:
            self.y_embedder: LabelEmbedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        else:
            self.y_embedder = DCEmbedding(num_classes, hidden_size, class_dropout_prob, text_dim, text_len)
        num_patches = self.x_embedder.num_patches
        # Fixed 2D sin-cos embedding, a frozen parameter (saved in checkpoints) as in the official code.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)

        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.projector = build_projector(hidden_size, proj_hidden_dim, proj_dim) if proj_dim is not None else None
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights(init_seed)

    def initialize_weights(self, seed: int | None = None) -> None:
        """DiT init: Xavier-uniform Linears with zero bias, patch/text convs as Linears,
        class table and timestep MLP N(0, 0.02), adaLN-Zero (modulation and output zeroed).

        Every part draws from its own generator, seeded by ``(seed, part name)``, so the parts
        two variants share (patch and timestep embedders, class table, blocks, final layer)
        start identical for one seed whether or not the text embedding and projector exist.
        ``seed=None`` takes the seed from the global torch RNG (``torch.manual_seed`` still fixes it).
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu"))

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        def _as_linear(conv: nn.Module) -> None:
            w = conv.weight.data
            nn.init.xavier_uniform_(w.view([w.shape[0], -1]))

        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        self.pos_embed.data.copy_(pos.to(self.pos_embed.dtype).unsqueeze(0))

        with seeded_init(seed, "x_embedder"):
            self.x_embedder.proj.reset_parameters()  # the bias keeps the Conv2d default, as official
            _as_linear(self.x_embedder.proj)
        with seeded_init(seed, "t_embedder"):
            self.t_embedder.apply(_basic_init)
            nn.init.normal_(self.t_embedder.mlp[0].weight, std=EMBED_INIT_STD)
            nn.init.normal_(self.t_embedder.mlp[2].weight, std=EMBED_INIT_STD)
        with seeded_init(seed, "y_embedder.embedding_table"):
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=EMBED_INIT_STD)
        if isinstance(self.y_embedder, DCEmbedding):
            with seeded_init(seed, "y_embedder.text"):
                _as_linear(self.y_embedder.text_proj)
                nn.init.zeros_(self.y_embedder.text_proj.bias)
                self.y_embedder.text_norm.reset_parameters()
                self.y_embedder.text_mlp.apply(_basic_init)
        for i, block in enumerate(self.blocks):
            with seeded_init(seed, f"blocks.{i}"):
                block.apply(_basic_init)
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
        if self.projector is not None:
            with seeded_init(seed, "projector"):
                self.projector.apply(_basic_init)
        with seeded_init(seed, "final_layer"):
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
            nn.init.zeros_(self.final_layer.linear.weight)
            nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Token outputs ``[N, T, p * p * C_out]`` -> image ``[N, C_out, H, W]`` (square grid)."""
        c = self.out_channels
        p = self.patch_size
        h = w = math.isqrt(x.shape[1])
        if h * w != x.shape[1]:
            raise ValueError(f"token count {x.shape[1]} is not a square")
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def drop_mask(
        self,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor | None:
        """Which labels become the null class (CFG label dropout).

        Official DiT semantics: if ``force_drop_ids`` is given, drop exactly where it equals 1
        (train or eval); otherwise, in training mode with ``class_dropout_prob > 0``, drop each
        label independently with that probability, drawing from ``generator`` (any device;
        global RNG when ``None``). Otherwise nothing is dropped.

        Args:
            y: ``[N]`` labels.
            force_drop_ids: ``[N]`` (bool or 0/1 ints) or ``None``.
        Returns:
            ``[N]`` bool on ``y.device``, or ``None`` when nothing can be dropped.
        """
        if force_drop_ids is not None:
            if not self.y_embedder.has_null_class:
                raise ValueError("force_drop_ids needs a null class: build the model with class_dropout_prob > 0")
            return (force_drop_ids == 1).to(y.device)
        if self.training and self.class_dropout_prob > 0:
            device = generator.device if generator is not None else y.device
            u = torch.rand(y.shape[0], generator=generator, device=device)
            return (u < self.class_dropout_prob).to(y.device)
        return None

    def embed_inputs(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        text_emb: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' inputs: tokens ``patchify(x) + pos_embed`` ``[N, T, D]`` and the condition
        ``c = t_emb(t) + y_emb(y')`` ``[N, D]``, where ``y'`` is ``y`` with the dropped labels
        (:meth:`drop_mask`) set to the null class (arguments as :meth:`forward`)."""
        if (text_emb is None) != (self.text_dim is None):
            raise ValueError(
                "text_emb is required when the model has text_dim and forbidden otherwise "
                f"(text_dim={self.text_dim}, text_emb given: {text_emb is not None})"
            )
        drop = self.drop_mask(y, force_drop_ids, generator)
        if drop is not None:
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        tokens = self.x_embedder(x) + self.pos_embed  # [N, T, D]
        t_emb = self.t_embedder(t)  # [N, D]
        if isinstance(self.y_embedder, DCEmbedding):
            y_emb = self.y_embedder(y, text_emb, text_mask, null=y == self.num_classes)  # [N, D]
        else:
            y_emb = self.y_embedder(y)  # [N, D]
        return tokens, t_emb + y_emb

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        text_emb: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
        return_hidden: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor | DiTOutput:
        """Forward pass.

        Args:
            x: ``[N, C, H, W]`` noisy inputs (latents or pixels).
            t: ``[N]`` timesteps (DiT: 0..999; SiT: fractional in [0, 1]).
            y: ``[N]`` long class labels; ``num_classes`` selects the null class directly.
            text_emb: ``[N, L, d_text]`` per-sample class text states; required iff the model
                was built with ``text_dim``.
            text_mask: ``[N, L]`` token mask for ``text_emb`` (``None``: all valid).
            force_drop_ids: ``[N]``; entries equal to 1 are dropped to the null class.
            return_hidden: return :class:`DiTOutput` even without a projector (then ``proj``
                is the raw ``[N, T, D]`` hidden states after block ``encoder_depth``).
            generator: RNG for training-time label dropout (see :meth:`drop_mask`).
        Returns:
            ``[N, C_out, H, W]`` tensor when the model has no projector and ``return_hidden``
            is False (official behaviour); otherwise ``DiTOutput(out, proj)`` with ``proj``
            ``[N, T, proj_dim]`` (or ``[N, T, D]`` without a projector).
        """
        want_proj = self.projector is not None or return_hidden
        if want_proj and not 1 <= self.encoder_depth <= len(self.blocks):
            raise ValueError(f"encoder_depth {self.encoder_depth} is outside [1, {len(self.blocks)}]")
        x, c = self.embed_inputs(x, t, y, text_emb, text_mask, force_drop_ids, generator)

        hidden = None
        for i, block in enumerate(self.blocks):
            x = block(x, c)  # [N, T, D]
            if want_proj and i + 1 == self.encoder_depth:
                hidden = x
        out = self.unpatchify(self.final_layer(x, c))  # [N, C_out, H, W]
        if not want_proj:
            return out
        proj = self.projector(hidden) if self.projector is not None else hidden
        return DiTOutput(out, proj)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################


def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``pos`` ``[M]`` -> ``[M, embed_dim]`` = ``[sin(pos * ω), cos(pos * ω)]``,
    ``ω_k = MAX_PERIOD ** (-k / (embed_dim / 2))``, computed in float64."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / MAX_PERIOD**omega  # [embed_dim / 2]
    out = pos.to(torch.float64).reshape(-1)[:, None] * omega[None]  # [M, embed_dim / 2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sin-cos embedding of a ``grid_size x grid_size`` token grid.

    Token ``r * grid_size + col`` (row-major) gets ``[emb_1d(col), emb_1d(row)]``: the first
    half of the channels encodes the column (w) and the second half the row (h) — the
    official DiT/MAE layout (their meshgrid puts w first).

    Returns:
        ``[grid_size ** 2, embed_dim]`` float64 (on CPU).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # [g, g] each
    emb_w = get_1d_sincos_pos_embed(embed_dim // 2, cols)
    emb_h = get_1d_sincos_pos_embed(embed_dim // 2, rows)
    return torch.cat([emb_w, emb_h], dim=1)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################

# name -> (depth, hidden_size, num_heads, patch_size), DiT paper Table 1 (SiT uses the same).
DIT_CONFIGS: dict[str, tuple[int, int, int, int]] = {
    "XL/2": (28, 1152, 16, 2),
    "XL/4": (28, 1152, 16, 4),
    "XL/8": (28, 1152, 16, 8),
    "L/2": (24, 1024, 16, 2),
    "L/4": (24, 1024, 16, 4),
    "L/8": (24, 1024, 16, 8),
    "B/2": (12, 768, 12, 2),
    "B/4": (12, 768, 12, 4),
    "B/8": (12, 768, 12, 8),
    "S/2": (12, 384, 6, 2),
    "S/4": (12, 384, 6, 4),
    "S/8": (12, 384, 6, 8),
}

_MODEL_FAMILY_PREFIXES = ("DiT-", "SiT-")


def build_dit(name: str, **overrides) -> DiT:
    """Build a named size, e.g. ``build_dit("XL/2", input_size=32, text_dim=2048)``.

    ``name`` is a key of :data:`DIT_CONFIGS`, optionally prefixed ``DiT-`` or ``SiT-``.
    ``overrides`` are any other :class:`DiT` keyword arguments; overriding the size fields
    (depth, hidden_size, num_heads, patch_size) is an error — pick another name instead.
    """
    key = name
    for prefix in _MODEL_FAMILY_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    if key not in DIT_CONFIGS:
        raise ValueError(f"unknown DiT size {name!r}; known: {sorted(DIT_CONFIGS)}")
    depth, hidden_size, num_heads, patch_size = DIT_CONFIGS[key]
    size = dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size)
    clash = sorted(set(size) & set(overrides))
    if clash:
        raise ValueError(f"{clash} are fixed by the size name {name!r}")
    return DiT(**size, **overrides)
