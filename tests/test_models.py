"""Tests for d2c.models.dit and d2c.models.convert (tiny, offline, CPU)."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn as nn

from d2c.models.convert import (
    convert_diffusers_dit,
    load_diffusers_dit,
    load_official_dit_checkpoint,
)
from d2c.models.dit import (
    DIT_CONFIGS,
    DCEmbedding,
    DiT,
    DiTOutput,
    build_dit,
    get_2d_sincos_pos_embed,
    timestep_embedding,
)

# A tiny model: 8x8 input, patch 2 -> 16 tokens, D = 32, 2 blocks of 2 heads.
TINY = dict(
    input_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=32,
    depth=2,
    num_heads=2,
    num_classes=10,
    learn_sigma=True,
    class_dropout_prob=0.1,
)
TEXT_DIM, TEXT_LEN, PROJ_DIM, PROJ_HIDDEN = 12, 5, 24, 40


def _randomize(model: nn.Module, seed: int, std: float = 0.1) -> None:
    """Overwrite every trainable parameter (including the zero-init ones) with N(0, std)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _inputs(n: int = 4, seed: int = 0, size: int = 8, channels: int = 4, num_classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    t = torch.tensor([0.0, 17.0, 500.0, 999.0])[:n]
    y = torch.tensor([3, 0, num_classes, 9])[:n]  # includes the null class
    return x, t, y


def _d2c_model(**kw) -> DiT:
    cfg = dict(TINY, text_dim=TEXT_DIM, text_len=TEXT_LEN, proj_dim=PROJ_DIM, proj_hidden_dim=PROJ_HIDDEN, encoder_depth=1)
    cfg.update(kw)
    return DiT(**cfg)


def _text(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, TEXT_LEN, TEXT_DIM, generator=g)
    mask = torch.ones(n, TEXT_LEN)
    mask[:, 3:] = 0  # the last two tokens are padding
    return emb, mask


# ----------------------------------------------------------------------------- diffusers


def _tiny_diffusers(seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    ref = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_eps=1e-6,  # the official DiT's eps; diffusers' default is 1e-5
    ).eval()
    _randomize(ref, seed + 1)
    # diffusers keeps one embedder copy per block; the official network shares one.
    with torch.no_grad():
        emb0 = ref.transformer_blocks[0].norm1.emb
        for block in ref.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(emb0.state_dict())
    return ref


def test_diffusers_equivalence():
    ref = _tiny_diffusers()
    ours = DiT(**TINY, timestep_freq_shift=1).eval()  # diffusers' timestep convention
    load_diffusers_dit(ours, ref)
    x, t, y = _inputs()
    with torch.no_grad():
        expected = ref(x, timestep=t, class_labels=y).sample
        got = ours(x, t, y)
    assert got.shape == expected.shape == (4, 8, 8, 8)
    assert expected.abs().mean() > 0.1  # random (non-zero) weights give a non-trivial output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_diffusers_timestep_convention_differs_only_in_frequencies():
    """With the official convention (shift 0) outputs agree at t = 0, where cos/sin features
    do not depend on the frequencies, and differ at t > 0."""
    ref = _tiny_diffusers(seed=3)
    official = DiT(**TINY).eval()
    load_diffusers_dit(official, ref)
    x, t, y = _inputs()
    with torch.no_grad():
        expected = ref(x, timestep=t, class_labels=y).sample
        got = official(x, t, y)
    torch.testing.assert_close(got[:1], expected[:1], atol=1e-5, rtol=0)
    assert (got[1:] - expected[1:]).abs().amax() > 1e-3


def test_convert_bare_state_dict_and_untied_embedders():
    ref = _tiny_diffusers(seed=5)
    from_model = convert_diffusers_dit(ref)
    from_sd = convert_diffusers_dit(ref.state_dict(), grid_size=4)
    assert set(from_model) == set(from_sd) == set(DiT(**TINY).state_dict())
    for k in from_model:
        atol = 1e-6 if k == "pos_embed" else 0.0  # ours is float64-then-cast; diffusers float32
        torch.testing.assert_close(from_sd[k], from_model[k], atol=atol, rtol=0)
    assert "pos_embed" not in convert_diffusers_dit(ref.state_dict())
    q = ref.transformer_blocks[1].attn1.to_q.weight
    assert torch.equal(from_model["blocks.1.attn.qkv.weight"][: q.shape[0]], q)

    with torch.no_grad():
        ref.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight.add_(1.0)
    with pytest.raises(ValueError, match="differs from block 0"):
        convert_diffusers_dit(ref)
    loose = convert_diffusers_dit(ref, check_shared_embedder=False)
    assert torch.equal(
        loose["y_embedder.embedding_table.weight"],
        ref.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight,
    )


def test_modules_match_timm_reference():
    """The official DiT builds its blocks from timm's Attention and Mlp."""
    from timm.models.vision_transformer import Attention as TimmAttention
    from timm.models.vision_transformer import Mlp as TimmMlp

    model = DiT(**TINY)
    _randomize(model, 7)
    block = model.blocks[0]
    timm_attn = TimmAttention(32, num_heads=2, qkv_bias=True)
    timm_attn.load_state_dict(block.attn.state_dict())
    timm_mlp = TimmMlp(32, hidden_features=128, act_layer=lambda: nn.GELU(approximate="tanh"))
    timm_mlp.load_state_dict(block.mlp.state_dict())
    h = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(block.attn(h), timm_attn(h), atol=1e-6, rtol=0)
        torch.testing.assert_close(block.mlp(h), timm_mlp(h), atol=1e-6, rtol=0)


def test_timestep_embedding_matches_official_formula():
    t = torch.tensor([0.0, 1.0, 37.5, 999.0])
    dim, half = 256, 128
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = t.numpy()[:, None].astype(np.float64) * freqs[None]
    expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    got = timestep_embedding(t, dim)
    np.testing.assert_allclose(got.numpy(), expected, atol=2e-4)  # float32 args at t ~ 1000
    odd = timestep_embedding(t, dim + 1)
    assert odd.shape == (4, dim + 1) and torch.all(odd[:, -1] == 0)


def test_pos_embed_matches_official_layout():
    """Token (row r, col c) -> [sincos(c), sincos(r)], each [sin(p*w), cos(p*w)], w_k = 1e4^(-k/(D/4))."""
    dim, grid = 16, 3
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    expected = np.zeros((grid * grid, dim))
    for r in range(grid):
        for c in range(grid):
            expected[r * grid + c] = np.concatenate(
                [np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)]
            )
    np.testing.assert_allclose(get_2d_sincos_pos_embed(dim, grid).numpy(), expected, atol=1e-12)
    model = DiT(**dict(TINY, input_size=6))
    assert not model.pos_embed.requires_grad
    np.testing.assert_allclose(model.pos_embed[0].numpy(), get_2d_sincos_pos_embed(32, 3).numpy(), atol=1e-7)


# ----------------------------------------------------------------------------- official names


def _official_keys(depth: int) -> set[str]:
    keys = {
        "pos_embed",
        "x_embedder.proj.weight",
        "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight",
        "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.bias",
    }
    for i in range(depth):
        for mod in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys |= {f"blocks.{i}.{mod}.weight", f"blocks.{i}.{mod}.bias"}
    return keys


def test_official_state_dict_keys_and_shapes():
    sd = DiT(**TINY).state_dict()
    assert set(sd) == _official_keys(TINY["depth"])
    D, p, C = 32, 2, 4
    assert sd["pos_embed"].shape == (1, 16, D)
    assert sd["x_embedder.proj.weight"].shape == (D, C, p, p)
    assert sd["t_embedder.mlp.0.weight"].shape == (D, 256)
    assert sd["y_embedder.embedding_table.weight"].shape == (11, D)  # + null class
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * D, D)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (4 * D, D)
    assert sd["blocks.0.adaLN_modulation.1.weight"].shape == (6 * D, D)
    assert sd["final_layer.adaLN_modulation.1.weight"].shape == (2 * D, D)
    assert sd["final_layer.linear.weight"].shape == (p * p * 2 * C, D)
    no_null = DiT(**dict(TINY, class_dropout_prob=0.0)).state_dict()
    assert no_null["y_embedder.embedding_table.weight"].shape == (10, D)


def test_official_checkpoint_round_trip(tmp_path):
    src = DiT(**TINY)
    _randomize(src, 11)
    raw = tmp_path / "raw.pt"
    torch.save(src.state_dict(), raw)
    dst = DiT(**TINY)
    load_official_dit_checkpoint(dst, raw)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k

    other = DiT(**TINY)
    _randomize(other, 12)
    train_ckpt = tmp_path / "train.pt"
    torch.save({"model": other.state_dict(), "ema": src.state_dict()}, train_ckpt)
    ema = DiT(**TINY)
    load_official_dit_checkpoint(ema, train_ckpt, use_ema=True)
    assert torch.equal(ema.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    live = DiT(**TINY)
    load_official_dit_checkpoint(live, train_ckpt, use_ema=False)
    assert torch.equal(live.blocks[1].mlp.fc2.weight, other.blocks[1].mlp.fc2.weight)

    # A D2C model loads an official checkpoint with only its additions missing.
    d2c = _d2c_model()
    missing, unexpected = load_official_dit_checkpoint(d2c, raw, strict=False)
    assert unexpected == []
    assert missing and all(k.startswith(("y_embedder.text_", "projector.")) for k in missing)
    assert torch.equal(d2c.y_embedder.embedding_table.weight, src.y_embedder.embedding_table.weight)

    missing_path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_official_dit_checkpoint(dst, missing_path)
    ema_only = tmp_path / "ema_only.pt"
    torch.save({"ema": src.state_dict()}, ema_only)
    with pytest.raises(KeyError, match="model"):
        load_official_dit_checkpoint(dst, ema_only, use_ema=False)


# ----------------------------------------------------------------------------- sizes


def _analytic_param_count(depth, D, p, C=4, input_size=32, num_classes=1000, learn_sigma=True):
    """Independent count from the architecture (biases included, pos_embed counted)."""
    T = (input_size // p) ** 2
    c_out = 2 * C if learn_sigma else C
    embed = (p * p * C * D + D) + T * D + (256 * D + D + D * D + D) + (num_classes + 1) * D
    block = (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D) + (6 * D * D + 6 * D)
    final = (2 * D * D + 2 * D) + (p * p * c_out * D + p * p * c_out)
    return embed + depth * block + final


@pytest.mark.parametrize("name,paper_millions", [("XL/2", 675.0), ("L/2", 458.0)])
def test_param_counts_on_meta(name, paper_millions):
    with torch.device("meta"):
        model = build_dit(name, input_size=32, in_channels=4, learn_sigma=True, num_classes=1000)
    n = sum(p.numel() for p in model.parameters())
    depth, D, _heads, p = DIT_CONFIGS[name]
    assert n == _analytic_param_count(depth, D, p)
    assert abs(n / 1e6 - paper_millions) / paper_millions < 0.005


def test_build_dit_names():
    with torch.device("meta"):
        a = build_dit("SiT-B/4", input_size=32)
        b = build_dit("S/8", input_size=32, num_classes=7)
    assert len(a.blocks) == 12 and a.patch_size == 4 and a.pos_embed.shape == (1, 64, 768)
    assert b.y_embedder.embedding_table.weight.shape == (8, 384)
    with pytest.raises(ValueError, match="fixed by the size"):
        build_dit("B/2", depth=3)
    with pytest.raises(ValueError, match="unknown DiT size"):
        build_dit("M/2")


def test_adaln_zero_init():
    model = DiT(**TINY)
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.all(model.eval()(x, t, y) == 0)
    assert torch.all(model.blocks[1].adaLN_modulation[1].weight == 0)
    table = model.y_embedder.embedding_table.weight
    assert 0.01 < table.std().item() < 0.04


# ----------------------------------------------------------------------------- D2C additions


def test_dc_embedding_matches_reference_and_masks():
    model = _d2c_model()
    _randomize(model, 21)
    emb_mod = model.y_embedder
    assert isinstance(emb_mod, DCEmbedding)
    labels = torch.tensor([3, 0, 10, 9])
    text, mask = _text(4)
    with torch.no_grad():
        got = emb_mod(labels, text, mask)
        # Independent reference: e[n, d] = b[d] + sum_{k, l} W[d, k, l] * t[n, l, k] * m[n, l]
        keep = mask.clone()
        keep[2] = 0  # label 2 is the null class: zero text
        e = torch.einsum("dkl,nlk->nd", emb_mod.text_proj.weight, text * keep[..., None]) + emb_mod.text_proj.bias
        ln = nn.functional.layer_norm(e, (32,), emb_mod.text_norm.weight, emb_mod.text_norm.bias, eps=1e-6)
        expected = emb_mod.text_mlp(ln) + e + emb_mod.embedding_table.weight[labels]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    # Values under mask = 0 (even non-finite padding) never reach the output.
    x, t, y = _inputs()
    scrambled = text.clone()
    scrambled[:, 3:] = torch.randn(4, 2, TEXT_DIM) * 100
    scrambled[0, 4] = float("nan")
    model.eval()
    with torch.no_grad():
        a = model(x, t, y, text_emb=text, text_mask=mask)
        b = model(x, t, y, text_emb=scrambled, text_mask=mask)
    torch.testing.assert_close(a.out, b.out, atol=0, rtol=0)
    torch.testing.assert_close(a.proj, b.proj, atol=0, rtol=0)


def test_null_label_uses_zero_text():
    model = _d2c_model().eval()
    # At init the conv bias and the MLP are zero-biased: the null label is exactly the null row.
    zero_text = torch.zeros(1, TEXT_LEN, TEXT_DIM)
    with torch.no_grad():
        null = model.y_embedder(torch.tensor([10]), torch.randn(1, TEXT_LEN, TEXT_DIM))
        assert torch.equal(null[0], model.y_embedder.embedding_table.weight[10])
    _randomize(model, 31)
    x, t, y = _inputs()
    text_a, mask = _text(4, seed=2)
    text_b, _ = _text(4, seed=3)
    y_null = torch.full_like(y, 10)
    with torch.no_grad():
        by_label_a = model(x, t, y_null, text_emb=text_a, text_mask=mask).out
        by_label_b = model(x, t, y_null, text_emb=text_b).out
        forced = model(x, t, y, text_emb=text_a, text_mask=mask, force_drop_ids=torch.ones(4)).out
        zero = model(x, t, y_null, text_emb=zero_text.expand(4, -1, -1)).out
        cond = model(x, t, y, text_emb=text_a, text_mask=mask).out
        # Reference for the null embedding: text_mlp(text_norm(b)) + b + table[C].
        b = model.y_embedder.text_proj.bias
        ref = model.y_embedder.text_mlp(model.y_embedder.text_norm(b)) + b + model.y_embedder.embedding_table.weight[10]
        got = model.y_embedder(torch.tensor([10]), text_a[:1], mask[:1])[0]
    torch.testing.assert_close(by_label_a, by_label_b, atol=0, rtol=0)
    torch.testing.assert_close(by_label_a, forced, atol=0, rtol=0)
    torch.testing.assert_close(by_label_a, zero, atol=0, rtol=0)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert (cond[:2] - forced[:2]).abs().amax() > 1e-3


def test_gradients_reach_text_path_and_projector():
    model = _d2c_model().train()
    _randomize(model, 41)  # adaLN-Zero would block gradients to the conditioning at init
    x, t, y = _inputs()
    y = torch.tensor([3, 0, 1, 9])
    text, mask = _text(4)
    out, proj = model(x, t, y, text_emb=text, text_mask=mask, force_drop_ids=torch.zeros(4))
    target = torch.randn(4, 16, PROJ_DIM, generator=torch.Generator().manual_seed(4))
    loss = out.square().mean() - nn.functional.cosine_similarity(proj, target, dim=-1).mean()
    loss.backward()
    names = [n for n, _ in model.named_parameters() if n.startswith(("y_embedder.text_", "projector."))]
    assert {n.split(".")[1] for n in names if n.startswith("y_embedder")} == {"text_proj", "text_norm", "text_mlp"}
    assert len([n for n in names if n.startswith("projector.")]) == 6
    for name, p in model.named_parameters():
        if name.startswith(("y_embedder.text_", "projector.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.pos_embed.grad is None


def test_projector_and_hidden_shapes():
    model = _d2c_model(encoder_depth=1).eval()
    _randomize(model, 51)
    x, t, y = _inputs()
    text, mask = _text(4)
    with torch.no_grad():
        res = model(x, t, y, text_emb=text, text_mask=mask)
        assert isinstance(res, DiTOutput)
        assert res.out.shape == (4, 8, 8, 8)
        assert res.proj.shape == (4, (8 // 2) ** 2, PROJ_DIM)
        # Reference: hidden states after the first block, through the projector.
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y, text, mask)
        h = model.blocks[0](h, c)
        torch.testing.assert_close(res.proj, model.projector(h), atol=1e-5, rtol=0)

    plain = DiT(**TINY).eval()
    _randomize(plain, 52)
    plain.encoder_depth = 2
    with torch.no_grad():
        tensor_out = plain(x, t, y)
        hidden = plain(x, t, y, return_hidden=True)
    assert isinstance(tensor_out, torch.Tensor) and tensor_out.shape == (4, 8, 8, 8)
    assert isinstance(hidden, DiTOutput) and hidden.proj.shape == (4, 16, 32)
    torch.testing.assert_close(hidden.out, tensor_out, atol=0, rtol=0)

    with pytest.raises(ValueError, match="encoder_depth"):
        _d2c_model(encoder_depth=3)
    with pytest.raises(ValueError, match="text_emb is required"):
        model(x, t, y)


def test_unpatchify_inverts_patch_order():
    model = DiT(**dict(TINY, learn_sigma=False))
    g, p, C = 4, 2, 4
    img = torch.randn(2, C, g * p, g * p, generator=torch.Generator().manual_seed(6))
    tokens = torch.empty(2, g * g, p * p * C)
    for r in range(g):
        for c in range(g):
            for i in range(p):
                for j in range(p):
                    tokens[:, r * g + c, (i * p + j) * C : (i * p + j + 1) * C] = img[:, :, r * p + i, c * p + j]
    assert torch.equal(model.unpatchify(tokens), img)


def test_determinism_and_label_dropout():
    model = _d2c_model()
    _randomize(model, 61)
    x, t, _ = _inputs()
    y = torch.tensor([3, 0, 1, 9])
    text, mask = _text(4)
    model.eval()
    with torch.no_grad():
        first = model(x, t, y, text_emb=text, text_mask=mask)
        second = model(x, t, y, text_emb=text, text_mask=mask)
    assert torch.equal(first.out, second.out) and torch.equal(first.proj, second.proj)

    model.train()
    n = 64
    yy = torch.arange(n) % 10
    drop_a = model.drop_mask(yy, generator=torch.Generator().manual_seed(9))
    drop_b = model.drop_mask(yy, generator=torch.Generator().manual_seed(9))
    expected = torch.rand(n, generator=torch.Generator().manual_seed(9)) < 0.1
    assert torch.equal(drop_a, drop_b) and torch.equal(drop_a, expected)
    forced = model.drop_mask(yy, force_drop_ids=torch.zeros(n))
    assert not forced.any()
    assert model.eval().drop_mask(yy) is None
    with torch.no_grad():
        a = model.train()(x, t, y, text_emb=text, text_mask=mask, generator=torch.Generator().manual_seed(2))
        b = model(x, t, y, text_emb=text, text_mask=mask, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.out, b.out)
    with pytest.raises(ValueError, match="null class"):
        DiT(**dict(TINY, class_dropout_prob=0.0))(x, t, y, force_drop_ids=torch.ones(4))


def _variant_kwargs(text: bool, visual: bool) -> dict:
    return dict(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=3, num_heads=2, num_classes=10,
                learn_sigma=False, text_dim=24 if text else None, text_len=4, proj_dim=40 if visual else None,
                proj_hidden_dim=48, encoder_depth=2)


def test_seeded_init_pairs_the_shared_modules_across_variants():
    """Random (plain), Random + Attach and D2C built with one seed share every common weight;
    another seed changes them; the global RNG neither matters nor is consumed."""
    from d2c.models.build import build_model

    torch.manual_seed(1)
    plain = build_model(_variant_kwargs(False, False), seed=7)
    state = torch.random.get_rng_state()
    torch.manual_seed(999)  # another global RNG state: the seeded init must not depend on it
    d2c = build_model(_variant_kwargs(True, True), seed=7)
    text_only = build_model(_variant_kwargs(True, False), seed=7)
    shared = dict(plain.named_parameters())
    for other in (d2c, text_only):
        own = dict(other.named_parameters())
        common = set(shared) & set(own)
        assert len(common) == len(shared)  # every plain parameter exists in the variant
        for name in common:
            assert torch.equal(shared[name], own[name]), name
    assert not torch.equal(plain.blocks[0].attn.qkv.weight, build_model(_variant_kwargs(False, False), seed=8).blocks[0].attn.qkv.weight)
    # variant-only modules are seeded too: the same seed gives the same projector and text embedding
    again = build_model(_variant_kwargs(True, True), seed=7)
    for (name, p), q in zip(d2c.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name
    torch.manual_seed(1)
    build_model(_variant_kwargs(False, False), seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global stream is left where it was


def test_seeded_init_keeps_dit_init_statistics():
    from d2c.models.build import build_model

    m = build_model(dict(_variant_kwargs(True, True), hidden_size=256, num_classes=1000), seed=0)
    assert abs(float(m.y_embedder.embedding_table.weight.std()) - 0.02) < 0.001
    assert float(m.final_layer.linear.weight.abs().max()) == 0.0
    assert float(m.blocks[1].adaLN_modulation[-1].weight.abs().max()) == 0.0
    w = m.blocks[0].mlp.fc1.weight
    bound = (6.0 / (w.shape[0] + w.shape[1])) ** 0.5  # Xavier-uniform
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
