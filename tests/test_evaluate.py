"""`d2c evaluate`: class-balanced sampling (no Ray), grids, and the Ray pipeline end to end."""

import json

import numpy as np
import pytest
import torch

from app.cli import main
from conftest import FMNIST, ROOT, TINY_MODEL
from d2c.config import ConfigError, load_config
from d2c.data.preprocess import to_uint8
from d2c.diffusion import ddim_sample, ddpm_sample, ode_heun_sample, sde_euler_maruyama_sample
from d2c.diffusion.ddpm import DDPMSchedule
from d2c.eval.grid import class_grid, overview_grid, write_grids
from d2c.eval.sampling import (
    ClassBalancedSampler,
    SampleNoise,
    SamplingError,
    SamplingPlan,
    class_counts,
    num_chunks,
    sample_class_balanced,
    sample_indices,
    sample_labels,
    sample_seed,
)
from d2c.models.build import build_model
from d2c.train.objective import D2CObjective

NUM_CLASSES = TINY_MODEL["num_classes"]
#: Text embedding size of the tiny D2C model (tokens x dim).
TEXT_LEN, TEXT_DIM = 4, 8
STEPS = 5


def _tiny(text: bool = False, seed: int = 0, **overrides):
    """A tiny DiT with perturbed weights (adaLN-Zero would give a constant output) in eval mode."""
    kwargs = dict(TINY_MODEL, **overrides)
    if text:
        kwargs.update(text_dim=TEXT_DIM, text_len=TEXT_LEN)
    torch.manual_seed(seed)
    model = build_model(kwargs)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval(), kwargs


def _meta(arch: str, kwargs: dict) -> dict:
    schedule = DDPMSchedule() if arch == "dit" else None
    return dict(arch=arch, dit_kwargs=kwargs, diffusion=D2CObjective(arch, schedule).describe())


def _text(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(NUM_CLASSES, TEXT_LEN, TEXT_DIM, generator=g), torch.ones(NUM_CLASSES, TEXT_LEN)


@pytest.fixture(scope="module")
def dit():
    model, kwargs = _tiny()
    return model, _meta("dit", kwargs)


@pytest.fixture(scope="module")
def sit():
    model, kwargs = _tiny()
    return model, _meta("sit", kwargs)


# ------------------------------------------------------------------------------------
# Labels, seeds, chunks
# ------------------------------------------------------------------------------------


def test_labels_are_balanced_with_the_remainder_to_the_first_classes():
    assert class_counts(23, 10) == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    labels = sample_labels(np.arange(23), 10)
    assert np.bincount(labels, minlength=10).tolist() == class_counts(23, 10)
    assert labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert num_chunks(23, 8) == 3
    assert np.concatenate([sample_indices(23, 8, c) for c in range(3)]).tolist() == list(range(23))
    assert sample_indices(23, 8, 2).tolist() == list(range(16, 23))
    with pytest.raises(ValueError, match="chunk 3"):
        sample_indices(23, 8, 3)
    assert sample_seed(0, 5) == sample_seed(0, 5) != sample_seed(1, 5) != sample_seed(0, 6)


def test_noise_of_a_sample_does_not_depend_on_its_batch():
    a = SampleNoise(7, [3, 4, 5], (1, 4, 4), rows=4, device="cpu")
    b = SampleNoise(7, [5], (1, 4, 4), rows=1, device="cpu")
    first_a, first_b = a.draw(), b.draw()
    assert torch.equal(first_a[2], first_b[0]) and torch.equal(first_a[3], torch.zeros(1, 4, 4))  # row 3 is padding
    assert torch.equal(a.draw()[2], b.draw()[0])  # the second draw (a step's noise) too


# ------------------------------------------------------------------------------------
# Sampling without Ray
# ------------------------------------------------------------------------------------


def test_ddim_sampling_is_deterministic_balanced_and_split_independent(dit):
    model, meta = dit
    n = 23
    images, labels = sample_class_balanced(model, meta, n, NUM_CLASSES, "ddim", STEPS, seed=3, batch_size=8)
    assert images.shape == (n, 32, 32, 1) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=NUM_CLASSES).tolist() == class_counts(n, NUM_CLASSES)
    again, _ = sample_class_balanced(model, meta, n, NUM_CLASSES, "ddim", STEPS, seed=3, batch_size=8)
    assert np.array_equal(images, again)
    other, _ = sample_class_balanced(model, meta, n, NUM_CLASSES, "ddim", STEPS, seed=4, batch_size=8)
    assert (other != images).mean() > 0.1
    # Any split at the same batch size (chunks on different actors, reversed order) is bitwise identical.
    runner = ClassBalancedSampler(model, meta, sampler="ddim", steps=STEPS, seed=3, batch_size=8)
    parts = [runner.sample(sample_indices(n, 8, c))[0] for c in reversed(range(num_chunks(n, 8)))]
    assert np.array_equal(np.concatenate(parts[::-1]), images)
    rev, rev_labels = runner.sample(np.arange(n)[::-1])
    assert np.array_equal(rev[::-1], images) and np.array_equal(rev_labels[::-1], labels)
    # Another batch size changes only float rounding in the matrix kernels.
    other_bs, _ = sample_class_balanced(model, meta, n, NUM_CLASSES, "ddim", STEPS, seed=3, batch_size=5)
    assert np.abs(other_bs.astype(int) - images).max() <= 1


def test_bf16_sampling_stays_close_to_fp32_and_is_recorded(dit):
    model, meta = dit
    n = 20
    fp32, labels = sample_class_balanced(model, meta, n, NUM_CLASSES, "ddim", STEPS, seed=3, batch_size=10)
    bf16, labels_b = sample_class_balanced(model, meta, n, NUM_CLASSES, "ddim", STEPS, seed=3, batch_size=10,
                                           precision="bf16")
    assert np.array_equal(labels, labels_b) and bf16.shape == fp32.shape and bf16.dtype == np.uint8
    diff = np.abs(bf16.astype(int) - fp32)
    assert diff.max() > 0 and diff.mean() < 2.0, (diff.max(), diff.mean())  # rounded, same images
    runner = ClassBalancedSampler(model, meta, sampler="ddim", steps=STEPS, seed=3, batch_size=10, precision="bf16")
    assert runner.describe()["precision"] == "bf16" and np.array_equal(runner.sample(np.arange(n))[0], bf16)
    with pytest.raises(SamplingError, match="eval.precision='fp8'"):
        ClassBalancedSampler(model, meta, sampler="ddim", steps=STEPS, precision="fp8")


def test_cfg_scale_one_equals_plain_sampling_through_the_library(dit):
    """Our sampler at CFG 1 (through the CFG wrapper) == d2c.diffusion.ddim_sample on the bare model."""
    model, meta = dit
    n = 6
    images, labels = sample_class_balanced(model, meta, n, NUM_CLASSES, "ddim", STEPS, seed=0, batch_size=n)
    x_init = SampleNoise(0, range(n), (1, 32, 32), rows=n, device="cpu").draw()
    schedule = DDPMSchedule().respace(STEPS)
    z = ddim_sample(lambda x, t, y: model(x, t, y), schedule, x_init, torch.as_tensor(labels), clip_x0=1.0)
    assert np.array_equal(to_uint8(z.clamp(-1, 1)), images)
    guided, _ = sample_class_balanced(model, meta, n, NUM_CLASSES, "ddim", STEPS, seed=0, batch_size=n, cfg_scale=4.0)
    assert not np.array_equal(guided, images)


def test_guidance_interval_outside_every_visited_step_is_no_guidance(dit):
    model, meta = dit
    # Respaced to 5 steps the model sees timesteps 0, 250, 500, 749, 999: (0.3, 0.4) x 999 holds none.
    plan = SamplingPlan(meta, sampler="ddim", steps=STEPS, cfg_scale=4.0, guidance_interval=(0.3, 0.4))
    assert plan.schedule.timestep_map.tolist() == [0, 250, 500, 749, 999]
    assert plan.interval == pytest.approx((0.3 * 999, 0.4 * 999))
    plain, _ = sample_class_balanced(model, meta, 4, NUM_CLASSES, "ddim", STEPS, batch_size=4)
    outside, _ = sample_class_balanced(model, meta, 4, NUM_CLASSES, "ddim", STEPS, batch_size=4, cfg_scale=4.0,
                                       guidance_interval=(0.3, 0.4))
    inside, _ = sample_class_balanced(model, meta, 4, NUM_CLASSES, "ddim", STEPS, batch_size=4, cfg_scale=4.0,
                                      guidance_interval=(0.9, 1.0))
    assert np.array_equal(outside, plain) and not np.array_equal(inside, plain)


@pytest.mark.parametrize("sampler", ["ddpm", "sde"])
def test_per_sample_stochastic_steps_equal_the_library_sampler(dit, sit, sampler):
    """With one sample, our per-sample noise streams are exactly the library's single generator."""
    model, meta = dit if sampler == "ddpm" else sit
    index, seed = 7, 2
    ours, labels = ClassBalancedSampler(model, meta, sampler=sampler, steps=STEPS, seed=seed, batch_size=1).sample([index])
    g = torch.Generator().manual_seed(sample_seed(seed, index))
    x_init = torch.randn((1, 1, 32, 32), generator=g)
    y = torch.as_tensor(labels)
    if sampler == "ddpm":
        z = ddpm_sample(model, DDPMSchedule().respace(STEPS), x_init, y, clip_x0=1.0, generator=g)
    else:
        z = sde_euler_maruyama_sample(model, x_init, y, num_steps=STEPS, generator=g)
    assert np.array_equal(to_uint8(z.clamp(-1, 1)), ours)
    # ... and a batch of samples gives each one the same result as drawing it alone.
    batch, _ = ClassBalancedSampler(model, meta, sampler=sampler, steps=STEPS, seed=seed, batch_size=4).sample([5, 6, 7])
    assert np.abs(batch[2].astype(int) - ours[0]).max() <= 1


def test_sit_ode_equals_the_library_heun_sampler(sit):
    model, meta = sit
    images, labels = sample_class_balanced(model, meta, 4, NUM_CLASSES, "ode", STEPS, seed=1, batch_size=4)
    x_init = SampleNoise(1, range(4), (1, 32, 32), rows=4, device="cpu").draw()
    z = ode_heun_sample(model, x_init, torch.as_tensor(labels), num_steps=STEPS)
    assert np.array_equal(to_uint8(z.clamp(-1, 1)), images)
    sde, _ = sample_class_balanced(model, meta, 4, NUM_CLASSES, "sde", STEPS, seed=1, batch_size=4, cfg_scale=2.0)
    assert sde.shape == images.shape and not np.array_equal(sde, images)


def test_text_model_uses_its_class_embeddings():
    model, kwargs = _tiny(text=True)
    meta = _meta("dit", kwargs)
    emb, mask = _text()
    a, _ = sample_class_balanced(model, meta, 4, NUM_CLASSES, "ddim", STEPS, batch_size=4, text=(emb, mask), cfg_scale=2.0)
    b, _ = sample_class_balanced(model, meta, 4, NUM_CLASSES, "ddim", STEPS, batch_size=4, text=(emb * 3, mask), cfg_scale=2.0)
    assert a.shape == (4, 32, 32, 1) and not np.array_equal(a, b)
    with pytest.raises(SamplingError, match="text embedding"):
        sample_class_balanced(model, meta, 4, NUM_CLASSES, "ddim", STEPS)
    with pytest.raises(SamplingError, match="do not fit"):
        sample_class_balanced(model, meta, 4, NUM_CLASSES, "ddim", STEPS, text=(emb[:, :2], mask[:, :2]))


def test_settings_that_do_not_fit_the_model_are_refused(dit, sit):
    _, meta = dit
    with pytest.raises(SamplingError, match="eval.sampler='ode' does not fit a DIT"):
        SamplingPlan(meta, sampler="ode", steps=STEPS)
    with pytest.raises(SamplingError, match="eval.sampler='ddim' does not fit a SIT"):
        SamplingPlan(sit[1], sampler="ddim", steps=STEPS)
    with pytest.raises(SamplingError, match="too few"):
        SamplingPlan(meta, sampler="ddpm", steps=1)
    _, no_null = _tiny(class_dropout_prob=0.0)
    with pytest.raises(SamplingError, match="null class"):
        SamplingPlan(_meta("dit", no_null), sampler="ddim", steps=STEPS, cfg_scale=1.5)
    described = SamplingPlan(sit[1], sampler="ode", steps=STEPS, cfg_scale=1.5, guidance_interval=(0.0, 0.5)).describe()
    assert described["model_evaluations_per_sample"] == 2 * STEPS - 1
    assert described["guidance_interval_model_units"] == [0.0, 0.5]


# ------------------------------------------------------------------------------------
# Grids
# ------------------------------------------------------------------------------------


def test_grids(tmp_path):
    images = np.arange(20 * 8 * 8, dtype=np.int64).reshape(20, 8, 8, 1).astype(np.uint8)
    labels = sample_labels(np.arange(20), 4)
    pad = 2
    assert class_grid(images[:5]).size == (3 * (8 + pad) + pad, 2 * (8 + pad) + pad)
    assert class_grid(images[:5]).mode == "L"
    over = overview_grid(np.repeat(images, 3, axis=-1), labels, 4, per_class=3)
    assert over.mode == "RGB" and over.size == (3 * (8 + pad) + pad, 4 * (8 + pad) + pad)
    # The overview's row 1, column 0 is the first sample of class 1 (index 1).
    assert np.array_equal(np.asarray(over)[pad + 8 + pad : pad + 8 + pad + 8, pad : pad + 8, 0], images[1, :, :, 0])
    assert overview_grid(images, labels, 4, per_class=16).size == (5 * (8 + pad) + pad, 4 * (8 + pad) + pad)  # 5 per class
    paths = write_grids(tmp_path, images, labels, 4, per_class=3, class_names=["a", "b", "c", "d"])
    from PIL import Image

    assert Image.open(paths[2]).text == {"label": "1", "class_name": "b"}
    assert [p.name for p in paths] == ["overview.png"] + [f"class-{c:04d}.png" for c in range(4)]
    with pytest.raises(TypeError, match="uint8"):
        class_grid(images.astype(np.float32))


# ------------------------------------------------------------------------------------
# `d2c evaluate` end to end (Ray Data actor pools)
# ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory):
    """A tiny D2C model (DC text embedding) saved as a d2c checkpoint whose config records RUN/condensed."""
    from d2c.attach.text import TEXT_FILE, save_text_embeddings
    from d2c.train.checkpoint import checkpoint_meta, save_checkpoint

    run = tmp_path_factory.mktemp("evalrun")
    cfg = load_config(ROOT / "configs" / "embedded.yaml", [f"run_dir={run}", f"condensed={run / 'condensed'}"])
    model, kwargs = _tiny(text=True)
    emb, mask = _text()
    save_text_embeddings(run / TEXT_FILE, emb, mask, [str(c) for c in range(NUM_CLASSES)], cfg.attach.text)
    meta = checkpoint_meta("dit", kwargs, D2CObjective.from_config(cfg).describe(), cfg.to_dict())
    save_checkpoint(run / "train" / "checkpoints", 3, model, model, {"step": 3}, meta)
    return run


def _eval_args(train, eval_dir, *extra):
    return ["evaluate", "--config", str(ROOT / "configs" / "embedded.yaml"), f"checkpoint={train}", f"eval_dir={eval_dir}",
            "eval.num_samples=20", "eval.reference_size=20", f"eval.steps={STEPS}", "eval.batch_size=8",
            "eval.inception_batch_size=10", "eval.fid_method=eigh", "eval.grid_per_class=2", *extra]


def _numeric_paths(obj, prefix=""):
    """Dotted paths of every number in a JSON value (a list's numbers share the list's path)."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return set()
    if isinstance(obj, (int, float)):
        return {prefix}
    if isinstance(obj, list):
        return set().union(*(_numeric_paths(v, prefix) for v in obj)) if obj else set()
    return set().union(*(_numeric_paths(v, f"{prefix}.{k}" if prefix else k) for k, v in obj.items() if k != "how"))


def test_sampling_actor_compiles_its_blocks_and_draws_the_same_samples(tiny_train):
    """eval.compile compiles the EMA model's blocks in each sampling actor (aot_eager: capture only)."""
    from app.evaluate import SampleActor
    from d2c.attach.text import TEXT_FILE

    def actor(*extra):
        cfg = load_config(ROOT / "configs" / "embedded.yaml", [f"eval.steps={STEPS}", "eval.num_samples=12",
                                                               "eval.batch_size=6", *extra])
        return SampleActor(cfg.to_dict(), str(tiny_train / "train" / "checkpoints"), str(tiny_train / TEXT_FILE))

    eager, compiled = actor(), actor("eval.compile=aot_eager")
    assert all(b._compiled_call_impl is not None for b in compiled.sampler.model.blocks)
    assert all(b._compiled_call_impl is None for b in eager.sampler.model.blocks)
    chunks = {"id": np.array([1, 0])}
    want, got = eager(chunks), compiled(chunks)
    assert got["index"].tolist() == want["index"].tolist() == [6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 5]
    assert np.abs(got["image"].astype(int) - want["image"]).max() <= 1  # float rounding of captured graphs at most


def test_evaluate_end_to_end(ray_session, tiny_train, tmp_path, monkeypatch, capsys):
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    from d2c.train.checkpoint import load_model

    monkeypatch.setenv("D2C_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "eval"
    assert main(_eval_args(tiny_train / "train", out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("fid", "sfid", "kid_mean", "kid_std", "precision", "recall"):
        assert isinstance(metrics[key], float) and np.isfinite(metrics[key]), key
    assert metrics["fid"] > 0 and 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert (metrics["num_samples"], metrics["n_gen"], metrics["n_ref"]) == (20, 20, 20)
    assert (metrics["sampler"], metrics["steps"], metrics["cfg_scale"], metrics["seed"]) == ("ddim", STEPS, 1.0, 0)
    assert metrics["samples_per_class"] == [2] * NUM_CLASSES
    assert metrics["checkpoint"]["step"] == 3 and metrics["checkpoint"]["weights"] == "ema"
    assert metrics["checkpoint"]["text_embeddings"].endswith("text_embeddings.safetensors")
    ref = metrics["reference"]
    assert (ref["kind"], ref["split"], ref["size"], ref["per_class"], ref["rejected"]) == ("dataset_split", "test", 20, [2] * 10, 0)
    assert ref["cached_before"] is False and ref["cache_file"].startswith(str(tmp_path / "cache"))
    assert metrics["sampling"]["timesteps_used"] == [0, 250, 500, 749, 999]
    assert metrics["feature_extractor"]["id"].startswith("d2c-inception-ts:")
    assert set(metrics["not_computed"]) == {"is_mean", "is_std"}
    assert not _numeric_paths(metrics) - set(metrics["how"]), "every number in metrics.json says how it was made"

    with np.load(out / "samples.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images[..., 0], images[..., 2])  # grey repeated to 3 channels
    assert np.bincount(labels, minlength=NUM_CLASSES).tolist() == [2] * NUM_CLASSES
    assert sorted(p.name for p in (out / "grids").iterdir()) == [f"class-{c:04d}.png" for c in range(10)] + ["overview.png"]
    # The distributed samples are exactly what the sampler gives in one process.
    model, meta = load_model(tiny_train / "train" / "checkpoints")
    emb, mask = _text()
    local, local_labels = sample_class_balanced(model, meta, 20, NUM_CLASSES, "ddim", STEPS, batch_size=8, text=(emb, mask))
    assert np.array_equal(images[..., :1], local) and np.array_equal(labels, local_labels)

    # The samples' pool features are kept (d2c compare reads them), with the labels of samples.npz.
    with np.load(out / "features.npz") as z:
        pool, feat_labels = z["pool"], z["label"]
    assert pool.shape == (20, 2048) and pool.dtype == np.float32 and np.array_equal(feat_labels, labels)
    boot = metrics["fid_bootstrap"]
    assert boot["point"] == pytest.approx(metrics["fid"], rel=1e-6) and boot["rounds"] == 200 and boot["level"] == 0.95
    assert boot["resampled"] == "samples and reference" and boot["std"] > 0 and boot["low"] < boot["point"] < boot["high"]
    assert ref["statistics"] == "features"
    _check_compare(out, tmp_path, capsys)

    # Same settings again: nothing is recomputed.
    capsys.readouterr()
    assert main(_eval_args(tiny_train / "train", out)) == 0
    assert "complete for the same settings — reused" in capsys.readouterr().out
    # The reference statistics are cached: asking again reads the cache file (no Ray work).
    from app.evaluate import reference_statistics
    from d2c.eval.inception import extractor_id

    cfg = load_config(ROOT / "configs" / "embedded.yaml", ["eval.reference_size=20"])
    again = reference_statistics(cfg, NUM_CLASSES, extractor_id())
    assert "reference statistics cached" in capsys.readouterr().out
    assert again["info"]["cached_before"] is True and again["info"]["key"] == ref["key"]
    assert again["feats"].shape == (20, 2048) and again["spatial"].dim == 2023
    # Other settings into the same directory are refused.
    assert main(_eval_args(tiny_train / "train", out, "eval.seed=5")) == 2
    assert "eval_dir" in capsys.readouterr().err
    assert main(_eval_args(tiny_train / "train", out, "eval.precision=bf16", "eval.compile=aot_eager")) == 2
    assert "compile: None -> 'aot_eager'; precision: None -> 'bf16'" in capsys.readouterr().err


def _check_compare(out, tmp_path, capsys):
    """``d2c compare`` on a real EVAL directory, on itself and on a copy with shifted features."""
    import shutil

    from d2c.eval.artifacts import bootstrap_reference
    from d2c.eval.compare import compare_evals
    from d2c.eval.bootstrap import fid_value

    same = compare_evals(out, out, rounds=20)
    d = same["fid_difference"]
    assert d["paired"] is True and d["point"] == 0.0 and d["std"] == 0.0 and d["low"] == d["high"] == 0.0
    assert same["verdict"].startswith("not resolved")
    # B: the same samples with their features pulled towards the reference mean → a clearly lower FID.
    metrics = json.loads((out / "metrics.json").read_text())
    ref = bootstrap_reference(metrics["reference"])
    other = tmp_path / "eval-b"
    shutil.copytree(out, other)
    with np.load(out / "features.npz") as z:
        pool, labels = z["pool"], z["label"]
    closer = (0.2 * pool + 0.8 * ref.stats.mu).astype(np.float32)
    np.savez(other / "features.npz", pool=closer, label=labels)
    (other / "metrics.json").write_text(json.dumps({**metrics, "fid": fid_value(closer, ref)}))
    assert main(["compare", str(out), str(other), "--rounds", "30", "--out", str(tmp_path / "cmp.json")]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "cmp.json").read_text())
    d = result["fid_difference"]
    assert d["point"] == pytest.approx(metrics["fid"] - fid_value(closer, ref), rel=1e-6)
    assert d["low"] > 0 and result["verdict"].startswith(f"{other} has the lower FID") and result["verdict"] in printed
    assert d["share_a_better"] == 0.0 and d["rounds"] == 30
    # A features.npz that is not the one metrics.json was computed from is refused, naming the directory.
    np.savez(other / "features.npz", pool=pool[::-1] * 2, label=labels)
    assert main(["compare", str(out), str(other)]) == 2
    assert "mixes two evaluations" in capsys.readouterr().err
    # Scored against another reference: refused.
    (other / "metrics.json").write_text(json.dumps({**metrics, "reference": {**metrics["reference"], "key": "other"}}))
    assert main(["compare", str(out), str(other)]) == 2
    assert "different references" in capsys.readouterr().err
    (other / "features.npz").unlink()
    (other / "metrics.json").write_text(json.dumps(metrics))
    assert main(["compare", str(out), str(other)]) == 2
    assert "has no features.npz" in capsys.readouterr().err
    assert main(["compare", str(out), str(out), "--rounds", "3"]) == 2
    assert "--rounds 3 is too few" in capsys.readouterr().err


def test_adm_reference_npz(ray_session, tmp_path, monkeypatch):
    """An ADM .npz reference: arr_0 images featurised by the Ray Inception pool (cached); mu/sigma used as given."""
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    from app.evaluate import reference_statistics
    from d2c.eval.plan import check_reference
    from d2c.data.fashion_mnist import load_fashion_mnist
    from d2c.data.preprocess import pad_to
    from d2c.eval.inception import InceptionFeatures, extractor_id

    monkeypatch.setenv("D2C_CACHE_DIR", str(tmp_path / "cache"))
    grey, _ = load_fashion_mnist(None, "test")
    images = np.repeat(np.stack([pad_to(g[:, :, None], 32) for g in grey[:8]]), 3, axis=-1)  # [8, 32, 32, 3]
    np.savez(tmp_path / "ref.npz", arr_0=images)
    cfg = load_config(ROOT / "configs" / "embedded.yaml", [f"eval.reference={tmp_path / 'ref.npz'}", "eval.inception_batch_size=3"])
    check_reference(cfg)
    ref = reference_statistics(cfg, NUM_CLASSES, extractor_id())
    assert ref["info"]["kind"] == "adm_npz" and ref["info"]["cached_before"] is False and ref["info"]["size"] == 8
    plain = InceptionFeatures(device="cpu", progress=False).features(images)
    np.testing.assert_allclose(ref["feats"], plain, atol=1e-4)  # Ray pool, in image order
    assert ref["stats"].n == 8 and ref["spatial"].dim == 2023
    assert reference_statistics(cfg, NUM_CLASSES, extractor_id())["info"]["cached_before"] is True
    # Statistics only (ADM's mu/sigma): FID from them, no reference features.
    np.savez(tmp_path / "stats.npz", mu=ref["stats"].mu, sigma=ref["stats"].sigma)
    only = reference_statistics(load_config(None, [f"eval.reference={tmp_path / 'stats.npz'}"]), NUM_CLASSES, extractor_id())
    assert only["feats"] is None and np.array_equal(only["stats"].mu, ref["stats"].mu)
    # The bootstrap's reference: the cached arr_0 features (one stratum: no labels), or the file's fixed mu/sigma.
    from d2c.eval.artifacts import bootstrap_reference

    boot = bootstrap_reference(ref["info"])
    assert boot.features.shape == (8, 2048) and boot.labels is None
    np.testing.assert_allclose(boot.features, ref["feats"], rtol=0, atol=0)
    fixed = bootstrap_reference(only["info"])
    assert fixed.features is None and np.array_equal(fixed.stats.sigma, ref["stats"].sigma)
    with pytest.raises(ConfigError, match="not in the cache"):
        bootstrap_reference({**ref["info"], "cache_file": str(tmp_path / "gone.npz")})
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(ConfigError, match="eval.reference"):
        check_reference(load_config(None, [f"eval.reference={tmp_path / 'bad.npz'}"]))
    with pytest.raises(ConfigError, match="eval.reference='test' needs a data source with a test split"):
        check_reference(load_config(None, ["data.source=imagefolder", "data.path=/tmp"]))


def test_bad_checkpoints_are_refused_naming_the_key(tiny_train, tmp_path, capsys):
    assert main(_eval_args(tmp_path / "nowhere", tmp_path / "e")) == 2
    assert "checkpoint: " in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(_eval_args(tmp_path / "empty", tmp_path / "e")) == 2
    assert "checkpoint: " in capsys.readouterr().err and not (tmp_path / "e").exists()
    assert main(["evaluate", "--config", str(ROOT / "configs" / "embedded.yaml")]) == 2
    assert "checkpoint is required" in capsys.readouterr().err
    assert main(_eval_args(tiny_train / "train", tmp_path / "e", "eval.sampler=sde")) == 2  # a train dir resolves; SDE is SiT's
    assert "eval.sampler='sde' does not fit a DIT" in capsys.readouterr().err
    assert main(_eval_args(tiny_train / "train", tmp_path / "e", "eval.text_embeddings=/no/such.safetensors")) == 2
    assert "eval.text_embeddings" in capsys.readouterr().err


def test_eval_config_validation():
    with pytest.raises(ConfigError, match="eval.guidance_interval"):
        load_config(None, ["eval.guidance_interval=[0.5, 0.2]"])
    with pytest.raises(ConfigError, match="eval.inception_max_actors"):
        load_config(None, ["eval.inception_min_actors=2"])
