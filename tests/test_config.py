"""The config schema: YAML + overrides, validation messages that name the key and the fix."""

from pathlib import Path

import pytest

from app.cli import main
from d2c.config import ConfigError, check_paths, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["embedded.yaml", "imagenet256.yaml", "imagenet512.yaml"])
def test_shipped_configs_validate(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.select.method == "d2c"


def test_embedded_derived_sizes():
    cfg = load_config(ROOT / "configs" / "embedded.yaml")
    assert (cfg.latent_channels, cfg.latent_size, cfg.num_tokens) == (1, 32, 64)
    cfg = load_config(ROOT / "configs" / "imagenet256.yaml")
    assert (cfg.latent_channels, cfg.latent_size, cfg.patch_size, cfg.num_tokens) == (4, 32, 2, 256)


def test_imagenet512_builds_its_model_at_1024_tokens():
    """The paper's 512 px setting: 64 × 64 SD-VAE latents, DiT-L/2 at 1,024 tokens, and DINOv2-B/14
    at 448 px giving exactly those 1,024 tokens; the model is built at real shape on the meta device."""
    import torch

    from d2c.models.build import build_model, dit_kwargs

    cfg = load_config(ROOT / "configs" / "imagenet512.yaml")
    assert (cfg.latent_channels, cfg.latent_size, cfg.patch_size, cfg.num_tokens) == (4, 64, 2, 1024)
    assert (cfg.attach.vision.image_size // 14) ** 2 == cfg.num_tokens  # DINOv2 patch 14: no token dropped
    kw = dit_kwargs(cfg, 1000, text_dim=2048, proj_dim=768)
    with torch.device("meta"):
        net = build_model(kw)
    assert tuple(net.pos_embed.shape) == (1, 1024, 1024)  # L/2: hidden 1024
    assert len(net.blocks) == 24 and net.x_embedder.num_patches == 1024
    params = sum(p.numel() for p in net.parameters())
    assert 450e6 < params < 520e6, params  # DiT-L/2's 458M plus the DC-embedding and REPA projector


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["select.k=16", "train.lr=3e-4", "data.max_per_class=200", "run_dir=/tmp/x", "score.scorer=null"])
    assert cfg.select.k == 16 and isinstance(cfg.select.k, int)
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.max_per_class == 200 and cfg.run_dir == "/tmp/x" and cfg.score.scorer is None


@pytest.mark.parametrize(
    "override, expect",
    [
        ("select.kk=3", "unknown config key 'select.kk'. Did you mean select.k"),
        ("select.k=0", "select.k: Input should be greater than or equal to 1 (got 0)"),
        ("train.precision=fp8", "train.precision"),
        ("score.num_timesteps=abc", "score.num_timesteps"),
        ("attach.text.template=photo", "no '{}' placeholder"),
        ("score.min_actors=3", "score.max_actors (1) is below score.min_actors (3)"),
        ("model.encoder_depth=9", "model.encoder_depth (9) exceeds model.depth (4)"),
        ("selectk", "not of the form key=value"),
        ("autoencoder.kind=sd_vae", "autoencoder.path is required"),
    ],
)
def test_bad_values_name_the_key(override, expect):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expect in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("select: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(lst)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(unsafe)


def test_missing_paths_name_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="data.path"):
        check_paths(load_config(None, [f"data.path={tmp_path}/none"]))
    with pytest.raises(ConfigError, match="score.scorer: '/no/such.pt' does not exist"):
        check_paths(load_config(None, ["score.scorer=/no/such.pt"]))
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        check_paths(load_config(None, ["attach.text.path=google/flan-t5-xl"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    check_paths(load_config(None, ["attach.text.path=google/flan-t5-xl"]))  # a hub id, allowed online


def test_cli_config_and_errors(capsys):
    assert main(["config", "select.k=7"]) == 0
    assert "k: 7" in capsys.readouterr().out
    assert main(["config", "select.k=-1"]) == 2
    assert "select.k" in capsys.readouterr().err


def test_cli_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ["condense", "train", "evaluate", "sweep", "demo", "report"]:
        assert name in out


def test_flip_defaults_follow_the_data():
    """Fashion-MNIST trains without flips (its shoes point one way); ImageNet keeps DiT's flips."""
    emb = load_config(ROOT / "configs" / "embedded.yaml", [])
    assert emb.train.hflip is False and emb.attach.flip is False
    inet = load_config(ROOT / "configs" / "imagenet256.yaml", [])
    assert inet.train.hflip is True and inet.attach.flip is True


def test_flip_asymmetry_measure_on_planted_classes():
    import sys

    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from flip_asymmetry import oriented_fraction

    rng = np.random.default_rng(0)
    wedge = np.tile(np.linspace(0, 255, 8), (8, 1))  # bright on the right: a direction
    sym = np.tile(np.r_[np.linspace(0, 255, 4), np.linspace(255, 0, 4)], (8, 1))  # mirror-symmetric
    directed = wedge + rng.normal(0, 20, (400, 8, 8))
    symmetric = sym + rng.normal(0, 20, (400, 8, 8))
    # class means from one half, fractions on the other (as the benchmark's test column does)
    means = np.stack([directed[:200].mean(0), symmetric[:200].mean(0)])
    images = np.concatenate([directed[200:], symmetric[200:]])
    labels = np.r_[np.zeros(200, int), np.ones(200, int)]
    frac = oriented_fraction(images, labels, means)
    assert frac[0] == 1.0 and 0.35 < frac[1] < 0.65
