"""Tests for d2c.train (objective, EMA, precision, checkpoint, trainer) and d2c.models.build.

Tiny DiTs (8x8 input, patch 2 -> 16 tokens, hidden 32, depth 2, 2 heads), CPU, seeded.
"""

import copy
import functools
import io
import json
import math
import random

import numpy as np
import pytest
import torch

from d2c.config import D2CConfig, TrainConfig
from d2c.diffusion.ddpm import DDPMSchedule, linear_betas
from d2c.models.build import build_model, dit_kwargs
from d2c.models.dit import DiT
from d2c.train.checkpoint import (
    CHECKPOINT_FORMAT,
    TRAINER_FILE,
    capture_rng_state,
    checkpoint_meta,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from d2c.train.ema import EMA
from d2c.train.loop import RowBatches, assemble_batch, batch_stream, checkpointing, restore_latest, row_shapes, save_state, train_loop
from d2c.train.objective import D2CObjective, projection_loss
from d2c.train.trainer import ShapeMismatchError, Trainer, check_shapes

NUM_CLASSES, TEXT_LEN, TEXT_DIM, VIS_DIM, PROJ_HIDDEN = 3, 4, 6, 5, 16
SIZE, PATCH, TOKENS = 8, 2, 16
ROWS, BATCH = 12, 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(**model) -> D2CConfig:
    """A config whose model is the tiny DiT (1 channel, 8 px, identity autoencoder)."""
    m = dict(hidden_size=32, depth=2, num_heads=2, patch_size=PATCH, encoder_depth=1, proj_hidden_dim=PROJ_HIDDEN,
             learn_sigma=True, class_dropout_prob=0.1)
    m.update(model)
    return D2CConfig.model_validate(dict(data=dict(image_size=SIZE, channels=1), model=m))


def _kwargs(cfg=None, text=True, visual=True) -> dict:
    cfg = cfg or _cfg()
    return dit_kwargs(cfg, NUM_CLASSES, TEXT_DIM if text else None, TEXT_LEN, VIS_DIM if visual else None)


def _model(kwargs: dict, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    return build_model(kwargs)


def _randomize(model: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """Overwrite every trainable parameter (the zero-initialised ones too) with N(0, std)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _data(seed: int = 0, channels: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return dict(
        image_id=np.array([f"img{i}" for i in range(ROWS)], dtype=object),
        label=np.arange(ROWS) % NUM_CLASSES,
        latent=rng.standard_normal((ROWS, channels, SIZE, SIZE)).astype(np.float32),
        latent_flip=rng.standard_normal((ROWS, channels, SIZE, SIZE)).astype(np.float32),
        visual=rng.standard_normal((ROWS, TOKENS, VIS_DIM)).astype(np.float16),
        visual_flip=rng.standard_normal((ROWS, TOKENS, VIS_DIM)).astype(np.float16),
    )


def _text(seed: int = 1):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((NUM_CLASSES, TEXT_LEN, TEXT_DIM)).astype(np.float32)
    mask = np.ones((NUM_CLASSES, TEXT_LEN), np.float32)
    mask[:, -1] = 0  # one padding token per class
    return emb, mask


def _assemble(generator, use_visual=True, text=True, hflip=True):
    """The product's batch assembly over ``_data()``'s columns."""
    emb, mask = _text()
    return functools.partial(assemble_batch, shapes=row_shapes(RowBatches(_data(), BATCH, 0).rows),
                             text=(torch.from_numpy(emb), torch.from_numpy(mask)) if text else None,
                             use_visual=use_visual, hflip=hflip, generator=generator)


class _Batches:
    """The product's batches (:class:`RowBatches` + :func:`assemble_batch`) one after another,
    flips drawn from a generator of their own (so several trainers can be fed the same batches)."""

    def __init__(self, use_visual=True, text=True, seed=0):
        self.rows = RowBatches(_data(), BATCH, seed=0)
        self.assemble = _assemble(torch.Generator().manual_seed(seed), use_visual, text)
        self._it = batch_stream(self.rows, self.assemble)

    def next_batch(self) -> dict:
        return next(self._it)


def _batches(use_visual=True, text=True) -> _Batches:
    return _Batches(use_visual, text)


def _train_cfg(**kw) -> TrainConfig:
    base = dict(lr=1e-3, ema_decay=0.9, clip_norm=1.0, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _dit_objective(proj_coeff=0.5, learn_sigma=True) -> D2CObjective:
    return D2CObjective("dit", DDPMSchedule(), proj_coeff=proj_coeff, learn_sigma=learn_sigma)


def _assert_states_equal(a: dict, b: dict, skip=()) -> None:
    assert set(a) - set(skip) == set(b) - set(skip)
    for k in a:
        if k not in skip:
            assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------------------


def test_dit_kwargs_custom_and_named():
    kw = _kwargs()
    assert kw == dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, mlp_ratio=4.0,
                      class_dropout_prob=0.1, num_classes=3, learn_sigma=True, text_dim=6, text_len=4, proj_dim=5,
                      proj_hidden_dim=16, encoder_depth=1)
    json.dumps(kw)  # plain JSON values
    off = dit_kwargs(_cfg(use_text=False, use_visual=False), NUM_CLASSES, TEXT_DIM, TEXT_LEN, VIS_DIM)
    assert off["text_dim"] is None and off["proj_dim"] is None
    cfg = D2CConfig.model_validate(dict(autoencoder=dict(kind="sd_vae", path="x"), data=dict(image_size=256, channels=3),
                                        model=dict(size="SiT-XL/2", encoder_depth=8)))
    named = dit_kwargs(cfg, 1000, 2048, 16, 768)
    assert (named["depth"], named["hidden_size"], named["num_heads"], named["patch_size"]) == (28, 1152, 16, 2)
    assert (named["input_size"], named["in_channels"]) == (32, 4)
    with pytest.raises(ValueError, match="model.size"):
        dit_kwargs(cfg.model_copy(update=dict(model=cfg.model.model_copy(update=dict(size="XXL/3")))), 10)


# ----------------------------------------------------------------------------------------------
# objective: hand computations
# ----------------------------------------------------------------------------------------------


def _fixed_batch(seed=3, n=4):
    g = torch.Generator().manual_seed(seed)
    emb, mask = _text()
    labels = torch.tensor([0, 2, 1, 2])[:n]
    return dict(
        latent=torch.randn(n, 1, SIZE, SIZE, generator=g),
        label=labels,
        visual=torch.randn(n, TOKENS, VIS_DIM, generator=g).half(),
        text_emb=torch.from_numpy(emb)[labels],
        text_mask=torch.from_numpy(mask)[labels],
    )


def test_dit_objective_matches_hand_computation():
    model = _model(_kwargs(_cfg(learn_sigma=False)))
    _randomize(model, 0)
    model.eval()  # no label dropout
    batch = _fixed_batch()
    t = torch.tensor([0, 10, 500, 999])
    noise = torch.randn(batch["latent"].shape, generator=torch.Generator().manual_seed(7))
    terms = _dit_objective(proj_coeff=0.5, learn_sigma=False).loss_at(model, batch, t, noise)

    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t].float().view(-1, 1, 1, 1)
    x0 = batch["latent"]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    out, proj = model(x_t, t.float(), batch["label"], text_emb=batch["text_emb"], text_mask=batch["text_mask"])
    mse = ((noise - out) ** 2).mean()
    vis = batch["visual"].float()
    cos = (proj * vis).sum(-1) / (proj.norm(dim=-1) * vis.norm(dim=-1))
    hand_proj = -cos.mean()
    torch.testing.assert_close(terms["loss_diff"], mse, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(terms["loss_proj"], hand_proj, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss"], mse + 0.5 * hand_proj, rtol=1e-5, atol=1e-6)
    assert "loss_vlb" not in terms
    assert -1.0 <= float(terms["loss_proj"].detach()) <= 1.0


def test_dit_hybrid_vlb_trains_only_the_variance_channels():
    model = _model(_kwargs(_cfg(learn_sigma=True), visual=False))
    _randomize(model, 1)
    model.eval()
    batch = _fixed_batch()
    del batch["visual"]
    t = torch.tensor([0, 3, 400, 999])
    noise = torch.randn(batch["latent"].shape, generator=torch.Generator().manual_seed(8))
    objective = _dit_objective(proj_coeff=0.5, learn_sigma=True)
    terms = objective.loss_at(model, batch, t, noise)
    torch.testing.assert_close(terms["loss"], terms["loss_diff"] + terms["loss_vlb"])
    assert float(terms["loss_vlb"].detach()) > 0
    assert float(terms["loss_proj"]) == 0.0  # no visual features: no projection term
    # The VLB gradient reaches the final layer only through the variance channels (ε̂ is detached).
    terms["loss_vlb"].backward()
    w = model.final_layer.linear.weight.grad  # rows ordered (p, q, c_out), c_out fastest
    c_out = model.out_channels
    eps_rows = torch.arange(w.shape[0]) % c_out < model.in_channels
    assert float(w[eps_rows].abs().sum()) == 0.0
    assert float(w[~eps_rows].abs().sum()) > 0.0


def test_sit_objective_matches_hand_computation():
    model = _model(_kwargs(_cfg(learn_sigma=False, arch="sit")))
    _randomize(model, 2)
    model.eval()
    batch = _fixed_batch()
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    noise = torch.randn(batch["latent"].shape, generator=torch.Generator().manual_seed(9))
    objective = D2CObjective("sit", None, proj_coeff=0.25)
    terms = objective.loss_at(model, batch, t, noise)
    x0 = batch["latent"]
    tb = t.view(-1, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * noise
    out, proj = model(x_t, t, batch["label"], text_emb=batch["text_emb"], text_mask=batch["text_mask"])
    hand = (((noise - x0) - out) ** 2).mean()
    torch.testing.assert_close(terms["loss_diff"], hand, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(terms["loss"], hand + 0.25 * projection_loss(proj, batch["visual"]), rtol=1e-6, atol=1e-7)
    # Drawing: t ~ U[0, 1], then noise, from the generator, in that order.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    drawn = objective(model, batch, g1)
    t2, noise2 = objective.sample_t_noise(batch["latent"], g2)
    assert t2.dtype == torch.float32 and bool(((t2 >= 0) & (t2 <= 1)).all())
    again = objective.loss_at(model, batch, t2, noise2)
    assert torch.equal(drawn["loss"], again["loss"])


def test_objective_description_roundtrip_and_errors():
    obj = _dit_objective()
    desc = obj.describe()
    assert desc["schedule"] == "linear" and desc["beta_start"] == 1e-4 and desc["beta_end"] == 0.02
    back = D2CObjective.from_description(json.loads(json.dumps(desc)))
    assert torch.equal(back.schedule.betas, linear_betas(1000, 1e-4, 0.02)) and back.learn_sigma
    spaced = D2CObjective("dit", DDPMSchedule().respace(10)).describe()
    rebuilt = D2CObjective.from_description(spaced).schedule
    assert spaced["schedule"] == "betas" and rebuilt.timestep_map.tolist() == DDPMSchedule().respace(10).timestep_map.tolist()
    assert D2CObjective.from_description(D2CObjective("sit").describe()).arch == "sit"
    with pytest.raises(ValueError, match="needs a DDPMSchedule"):
        D2CObjective("dit")
    with pytest.raises(ValueError, match="no projector"):
        model = _model(_kwargs(visual=False))
        _dit_objective().loss_at(model, _fixed_batch(), torch.zeros(4, dtype=torch.long), torch.zeros(4, 1, 8, 8))


# ----------------------------------------------------------------------------------------------
# gradients, λ = 0
# ----------------------------------------------------------------------------------------------


def test_projection_loss_and_dc_embedding_receive_gradients():
    model = _model(_kwargs())
    trainer = Trainer(model, _dit_objective(), _train_cfg())
    batches = _batches()
    for _ in range(2):  # adaLN-Zero starts at zero: a couple of steps open the path from y to the output
        trainer.train_step(batches.next_batch())
    terms = trainer.objective(model, batches.next_batch(), trainer.generator)
    terms["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith(("projector.", "y_embedder.text_"))}
    assert len(grads) == 3 * 2 + 2 + 2 + 2 * 2  # projector 3 Linears, text_proj, text_norm, text_mlp 2 Linears
    for name, g in grads.items():
        assert g is not None and float(g.abs().sum()) > 0, name
    # The projection term alone also trains the projector.
    model.zero_grad()
    trainer.objective(model, batches.next_batch(), trainer.generator)["loss_proj"].backward()
    assert float(model.projector[0].weight.grad.abs().sum()) > 0


def test_lambda_zero_equals_plain_diffusion_training():
    with_proj = _model(_kwargs())
    plain = build_model(_kwargs(visual=False))
    missing, unexpected = plain.load_state_dict(with_proj.state_dict(), strict=False)
    assert missing == [] and all(k.startswith("projector.") for k in unexpected) and unexpected
    runs = {}
    for name, model, use_visual in (("lambda0", with_proj, True), ("plain", plain, False)):
        trainer = Trainer(model, _dit_objective(proj_coeff=0.0), _train_cfg())
        batches = _batches(use_visual=use_visual)
        losses = []
        for _ in range(4):
            m = trainer.train_step(batches.next_batch())
            assert m["loss_proj"] == 0.0
            losses.append((m["loss"], m["loss_diff"], m["loss_vlb"], m["grad_norm"]))
        runs[name] = (losses, model.state_dict(), trainer.ema.state_dict())
    assert runs["lambda0"][0] == runs["plain"][0]
    skip = [k for k in runs["lambda0"][1] if k.startswith("projector.")]
    _assert_states_equal(runs["lambda0"][1], runs["plain"][1], skip=skip)
    _assert_states_equal(runs["lambda0"][2], runs["plain"][2], skip=skip)
    # With λ > 0 the same model's total includes the projection term.
    trainer = Trainer(_model(_kwargs()), _dit_objective(proj_coeff=0.5), _train_cfg())
    m = trainer.train_step(_batches().next_batch())
    assert m["loss_proj"] != 0.0
    assert math.isclose(m["loss"], m["loss_diff"] + m["loss_vlb"] + 0.5 * m["loss_proj"], rel_tol=1e-6)


# ----------------------------------------------------------------------------------------------
# resume: 2 x 10 steps == 20 steps
# ----------------------------------------------------------------------------------------------


def _run(trainer, steps, position=None, ckpt_dir=None, meta=None, ckpt_every=None):
    """:func:`train_loop` as the product runs it (flips from the trainer's generator)."""
    log = []
    report = checkpointing(trainer, ckpt_dir, meta, log_fn=log.append) if ckpt_dir is not None else \
        (lambda metrics, position: log.append(metrics))
    rows = RowBatches(_data(), BATCH, seed=0)
    train_loop(trainer, rows.epoch, _assemble(trainer.generator), steps, position=position, ckpt_every=ckpt_every,
               report=report)
    return [(m["step"], m["loss"], m["loss_diff"], m["loss_proj"], m["grad_norm"]) for m in log]


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    cfg = _cfg()
    kwargs = _kwargs(cfg)
    objective = D2CObjective.from_config(cfg)
    meta = checkpoint_meta("dit", kwargs, objective.describe(), cfg.to_dict())
    train = _train_cfg(proj_coeff=cfg.train.proj_coeff)

    straight = Trainer(_model(kwargs), objective, train)
    losses_straight = _run(straight, 20)

    first = Trainer(_model(kwargs), objective, train)
    losses_a = _run(first, 10, ckpt_dir=tmp_path, ckpt_every=10, meta=meta)
    del first
    ckpt = load_checkpoint(tmp_path)  # the newest in the directory
    assert ckpt["path"].name == "step-0000010" and ckpt["trainer"]["data"] == dict(epoch=3, index=1)
    model = build_model(ckpt["meta"]["dit_kwargs"])  # fresh, differently initialised
    second = Trainer(model, D2CObjective.from_description(ckpt["meta"]["diffusion"]), train)
    position = second.restore(ckpt)
    assert second.step == 10
    losses_b = _run(second, 20, position=position, ckpt_dir=tmp_path, ckpt_every=10, meta=meta)

    assert losses_a + losses_b == losses_straight
    assert len(losses_straight) == 20 and losses_straight[-1][0] == 20.0
    _assert_states_equal(straight.module.state_dict(), second.module.state_dict())
    _assert_states_equal(straight.ema.state_dict(), second.ema.state_dict())
    assert not torch.equal(straight.ema.model.final_layer.linear.weight, straight.module.final_layer.linear.weight)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 20]

    # restore_latest does the same in one call: the newest checkpoint is step 20.
    third = Trainer(build_model(kwargs), objective, train)
    position, found = restore_latest(third, tmp_path)
    assert found.local_path == tmp_path / "step-0000020"
    assert third.step == 20 and position == dict(epoch=6, index=2)
    _assert_states_equal(third.ema.state_dict(), straight.ema.state_dict())


def test_global_rng_state_roundtrip():
    state = capture_rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restore_rng_state(torch.load(_roundtrip(state), weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


def _roundtrip(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


# ----------------------------------------------------------------------------------------------
# precision
# ----------------------------------------------------------------------------------------------


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_fp16_gradscaler_skips_inf_steps_and_bf16_runs():
    model = _model(_kwargs())
    trainer = Trainer(model, _dit_objective(), _train_cfg(precision="fp16"))
    assert trainer.precision.scaler.is_enabled()
    batches = _batches()
    m = trainer.train_step(batches.next_batch())
    assert m["skipped"] == 0.0 and math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])

    before, ema_before, scale = _params(model), dict(trainer.ema.state_dict()), trainer.precision.scaler.get_scale()
    ema_before = {k: v.clone() for k, v in ema_before.items()}
    hook = model.final_layer.linear.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    m = trainer.train_step(batches.next_batch())
    hook.remove()
    assert m["skipped"] == 1.0 and trainer.skipped_steps == 1 and trainer.step == 2
    assert trainer.precision.scaler.get_scale() == scale * 0.5  # GradScaler's default backoff
    _assert_states_equal(before, _params(model))
    _assert_states_equal(ema_before, trainer.ema.state_dict())
    m = trainer.train_step(batches.next_batch())
    assert m["skipped"] == 0.0
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert not torch.equal(before["final_layer.linear.weight"], model.final_layer.linear.weight)

    bf16 = Trainer(_model(_kwargs()), _dit_objective(), _train_cfg(precision="bf16"))
    w0 = bf16.module.final_layer.linear.weight.detach().clone()
    m = bf16.train_step(_batches().next_batch())
    assert m["skipped"] == 0.0 and math.isfinite(m["loss"]) and m["loss_scale"] == 1.0
    assert not torch.equal(w0, bf16.module.final_layer.linear.weight)


def test_autocast_model_fn_runs_the_network_in_low_precision_and_returns_float32():
    from d2c.train.precision import autocast_model_fn

    model = _model(_kwargs(text=False, visual=False)).eval()
    _randomize(model, seed=1)  # adaLN-Zero would give a zero output
    g = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(6, model.in_channels, 8, 8, generator=g), torch.arange(6) * 100, torch.arange(6) % NUM_CLASSES
    assert autocast_model_fn(model, "fp32", "cpu") is model  # fp32: the network itself, untouched
    with torch.no_grad():
        ref = model(x, t, y)
        for mode, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            seen = []
            hook = model.final_layer.linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
            out = autocast_model_fn(model, mode, "cpu")(x, t, y)
            hook.remove()
            assert seen == [dtype] and out.dtype == torch.float32 and out.shape == ref.shape
            err = (out - ref).abs().max() / ref.abs().max()
            assert 0 < err < 0.05, (mode, float(err))  # rounded, not broken
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        autocast_model_fn(model, "fp8", "cpu")


def test_compiled_trainer_follows_eager_and_keeps_eager_checkpoint_keys():
    """train.compile compiles every block in place (aot_eager: Dynamo + AOTAutograd, no codegen)."""
    from d2c.config import ConfigError, load_config

    eager = Trainer(_model(_kwargs()), _dit_objective(), _train_cfg())
    comp = Trainer(_model(_kwargs()), _dit_objective(), _train_cfg(compile="aot_eager"))
    assert eager.compiled_blocks == 0 and comp.compiled_blocks == len(comp.module.blocks) == 2
    assert all(b._compiled_call_impl is not None for b in comp.module.blocks)
    assert all(b._compiled_call_impl is None for b in comp.ema.model.blocks)  # the EMA copy stays eager
    a, b = _batches(), _batches()
    for _ in range(3):
        m_eager, m_comp = eager.train_step(a.next_batch()), comp.train_step(b.next_batch())
        assert m_comp["loss"] == pytest.approx(m_eager["loss"], rel=1e-4)
    assert list(comp.module.state_dict()) == list(eager.module.state_dict())  # no _orig_mod. prefix
    for (name, p), q in zip(comp.module.named_parameters(), eager.module.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(None, ["train.compile=fast"])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_sync_free_step_makes_the_default_steps_updates_without_reading_the_device(precision):
    """train.sync_free: the same updates, skips and EMA as the default step (up to rounding:
    fused AdamW, an EMA lerp), with device tensors returned instead of floats."""
    ref = Trainer(_model(_kwargs()), _dit_objective(), _train_cfg(precision=precision, ema_decay=0.5))
    fast = Trainer(_model(_kwargs()), _dit_objective(), _train_cfg(precision=precision, ema_decay=0.5, sync_free=True))
    assert fast.optimizer.defaults["fused"] and not ref.optimizer.defaults.get("fused")
    a, b = _batches(), _batches()
    for i in range(4):
        batch_ref, batch_fast = a.next_batch(), b.next_batch()
        if i == 2:  # an inf input: non-finite gradients, the step is skipped by both
            for batch in (batch_ref, batch_fast):
                batch["latent"] = batch["latent"].clone()
                batch["latent"][0] = float("inf")
        m_ref, m = ref.train_step(batch_ref), fast.train_step(batch_fast)
        assert isinstance(m["loss"], torch.Tensor) and m["loss"].dim() == 0 and isinstance(m_ref["loss"], float)
        assert float(m["skipped"]) == m_ref["skipped"] == float(i == 2)
        assert float(m["loss_scale"]) == m_ref["loss_scale"]
        if i != 2:
            assert float(m["loss"]) == pytest.approx(m_ref["loss"], rel=1e-5)
            assert float(m["grad_norm"]) == pytest.approx(m_ref["grad_norm"], rel=1e-4)
    assert fast.skipped_steps == ref.skipped_steps == 1 and fast.step == ref.step == 4
    assert fast.state_dict()["skipped_steps"] == 1
    for (name, p), q in zip(ref.module.named_parameters(), fast.module.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    for (name, p), q in zip(ref.ema.model.named_parameters(), fast.ema.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    if precision == "fp16":  # the skip halved the scale in both
        assert fast.precision.scaler.get_scale() == ref.precision.scaler.get_scale()


def test_a_checkpoint_resumes_across_sync_free_modes():
    """Optimizer state written by the default step loads into a sync-free trainer (and back),
    which then continues as the default trainer does."""
    eager = Trainer(_model(_kwargs()), _dit_objective(), _train_cfg())
    batches = _batches()
    for _ in range(2):
        eager.train_step(batches.next_batch())
    state, weights, ema = eager.state_dict(), eager.module.state_dict(), eager.ema.state_dict()
    for sync_free in (True, False):
        other = Trainer(_model(_kwargs(), seed=5), _dit_objective(), _train_cfg(sync_free=sync_free))
        other.restore(copy.deepcopy(dict(model=weights, ema=ema, trainer=state)))  # as if read from disk
        assert other.optimizer.param_groups[0]["fused"] == (True if sync_free else None)
        assert other.step == state["step"] >= 2 and other.skipped_steps == 0
        batch = batches.next_batch()  # the same batch and generator state for both
        cont = Trainer(_model(_kwargs(), seed=5), _dit_objective(), _train_cfg())
        cont.restore(copy.deepcopy(dict(model=weights, ema=ema, trainer=state)))
        m_other, m_cont = other.train_step(batch), cont.train_step(batch)
        assert float(m_other["loss"]) == pytest.approx(m_cont["loss"], rel=1e-6)
        for (name, p), q in zip(cont.module.named_parameters(), other.module.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
        state = other.state_dict()  # the sync-free trainer's state goes back into a default one next
        weights, ema = other.module.state_dict(), other.ema.state_dict()


def test_fp32_nonfinite_gradient_is_skipped():
    model = _model(_kwargs())
    trainer = Trainer(model, _dit_objective(), _train_cfg())
    before = _params(model)
    hook = model.x_embedder.proj.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    m = trainer.train_step(_batches().next_batch())
    hook.remove()
    assert m["skipped"] == 1.0 and trainer.skipped_steps == 1 and math.isnan(m["grad_norm"])
    _assert_states_equal(before, _params(model))


def test_ema_update_rule():
    src = torch.nn.Linear(2, 2)
    ema = EMA(src, decay=0.75, warmup=False)
    old = ema.model.weight.detach().clone()
    with torch.no_grad():
        src.weight.add_(4.0)
    ema.update(src)
    torch.testing.assert_close(ema.model.weight, 0.75 * old + 0.25 * src.weight.detach())
    assert not ema.model.weight.requires_grad and not ema.model.training


def test_ema_warmup_matches_the_closed_form_schedule():
    """d_s = min(decay, (1+s)/(10+s)), checked against a float64 recurrence written out here."""
    torch.manual_seed(0)
    src = torch.nn.Linear(3, 3)
    ema = EMA(src, decay=0.99)
    ref = src.weight.detach().double().clone()
    for s in range(200):
        with torch.no_grad():
            src.weight.add_(torch.randn_like(src.weight) * 0.1)
        d = min(0.99, (1 + s) / (10 + s))
        ref = d * ref + (1 - d) * src.weight.detach().double()
        ema.update(src)
    assert ema.num_updates == 200
    torch.testing.assert_close(ema.model.weight.double(), ref, rtol=1e-5, atol=1e-6)
    # the first update is a 90 % move toward the live weights, not 1 %
    fresh = EMA(src, decay=0.99)
    start = fresh.model.weight.detach().clone()
    with torch.no_grad():
        src.weight.add_(1.0)
    fresh.update(src)
    torch.testing.assert_close(fresh.model.weight, 0.1 * start + 0.9 * src.weight.detach())


def test_short_run_ema_tracks_the_model_not_its_init():
    """300 steps at decay 0.999: without warm-up 74 % of the EMA would still be the initial
    weights (adaLN-Zero: an output near 0); with it the EMA sits near the trained weights."""
    model = _model(_kwargs())
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = Trainer(model, _dit_objective(), _train_cfg(ema_decay=0.999))
    batches = _batches()
    for _ in range(300):
        trainer.train_step(batches.next_batch())
    live = dict(trainer.module.named_parameters())
    num = sum(float((p - live[k].detach()).pow(2).sum()) for k, p in trainer.ema.model.named_parameters())
    den = sum(float((init[k] - live[k].detach()).pow(2).sum()) for k in init)
    assert trainer.ema.num_updates == 300
    assert num < 0.25 * den  # constant decay 0.999 would leave num/den ≈ 0.74² ≈ 0.55


# ----------------------------------------------------------------------------------------------
# checkpoint files
# ----------------------------------------------------------------------------------------------


def test_checkpoint_atomic_weights_only_load_model_prune(tmp_path, monkeypatch):
    cfg = _cfg()
    kwargs = _kwargs(cfg)
    objective = D2CObjective.from_config(cfg)
    meta = checkpoint_meta("dit", kwargs, objective.describe(), cfg.to_dict())
    trainer = Trainer(_model(kwargs), objective, _train_cfg(precision="fp16"))
    batches = _batches()
    paths = []
    for i in range(3):
        trainer.train_step(batches.next_batch())
        paths.append(save_state(trainer, {"epoch": (i + 1) // 3, "index": (i + 1) % 3}, tmp_path, meta)[1])
    assert [p.name for p in paths] == ["step-0000001", "step-0000002", "step-0000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]  # no temp dirs left

    info = json.loads((paths[-1] / "model.json").read_text())
    assert info["format"] == CHECKPOINT_FORMAT and info["arch"] == "dit" and info["step"] == 3
    assert info["dit_kwargs"] == kwargs and info["diffusion"]["num_timesteps"] == 1000
    assert info["config"]["model"]["hidden_size"] == 32
    state = torch.load(paths[-1] / TRAINER_FILE, weights_only=True)
    assert state["step"] == 3 and state["data"] == dict(epoch=1, index=0)
    assert state["scaler"]["scale"] == trainer.precision.scaler.get_scale()
    assert set(state["rng"]) >= {"torch", "numpy", "python"} and isinstance(state["optimizer"]["state"], dict)

    # A crash mid-write leaves nothing that looks like a checkpoint.
    def crash(*args, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr("d2c.train.checkpoint.torch.save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 9, trainer.module, trainer.ema.model, trainer.state_dict(), meta)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]
    # Leftovers of a killed writer (a temp dir, an incomplete step dir) are ignored.
    partial = tmp_path / ".tmp-step-0000099-123-abc"
    partial.mkdir()
    (partial / "model.json").write_text("{}")
    (tmp_path / "step-0000050").mkdir()
    (tmp_path / "step-0000050" / "model.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == paths[-1]

    # load_model rebuilds an equal network from model.json.
    ema_model, meta_back = load_model(tmp_path)
    assert meta_back["step"] == 3 and not ema_model.training
    _assert_states_equal(ema_model.state_dict(), trainer.ema.state_dict())
    raw_model, _ = load_model(paths[-1], use_ema=False)
    _assert_states_equal(raw_model.state_dict(), trainer.module.state_dict())

    # Re-saving a step replaces it; prune keeps the newest N and clears temp dirs.
    again = save_state(trainer, {"epoch": 1, "index": 0}, tmp_path, meta)[1]
    assert again == paths[-1] and latest_checkpoint(tmp_path) == again
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert paths[0] in deleted and partial in deleted
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert not partial.exists()
    with pytest.raises(ValueError, match="keep"):
        prune_checkpoints(tmp_path, keep=0)


# ----------------------------------------------------------------------------------------------
# data: shapes, determinism, sharding, flips
# ----------------------------------------------------------------------------------------------


def test_check_shapes_names_each_mismatch():
    kwargs = _kwargs()
    good = dict(latent=[1, 8, 8], latent_flip=[1, 8, 8], visual=[16, 5], visual_flip=[16, 5])
    check_shapes(kwargs, good, text_shape=[3, 4, 6], mask_shape=[3, 4], hflip=True, max_label=2)
    cases = {
        "latent shape": dict(good, latent=[4, 8, 8]),
        "visual token count": dict(good, visual=[64, 5]),
        "visual dim": dict(good, visual=[16, 1280]),
        "latent_flip: train.hflip": {k: v for k, v in good.items() if k != "latent_flip"},
    }
    for what, shapes in cases.items():
        with pytest.raises(ShapeMismatchError, match=what):
            check_shapes(kwargs, shapes, text_shape=[3, 4, 6], hflip=True)
    with pytest.raises(ShapeMismatchError, match="text dim: the text embeddings are 384-d but the model's text_dim is 6"):
        check_shapes(kwargs, good, text_shape=[3, 4, 384])
    with pytest.raises(ShapeMismatchError, match="text length"):
        check_shapes(kwargs, good, text_shape=[3, 16, 6])
    with pytest.raises(ShapeMismatchError, match="text classes"):
        check_shapes(kwargs, good, text_shape=[10, 4, 6])
    with pytest.raises(ShapeMismatchError, match="no text embeddings"):
        check_shapes(kwargs, good)
    with pytest.raises(ShapeMismatchError, match="labels: the data has label 7"):
        check_shapes(kwargs, good, text_shape=[3, 4, 6], max_label=7)


def test_row_batches_are_a_function_of_seed_epoch_rank_and_the_rows_keys():
    data = _data()
    a, b = RowBatches(data, BATCH, seed=0), RowBatches(data, BATCH, seed=0)
    assert a.batches_per_epoch == 3  # 12 rows, batch 4
    for x, y in zip(a.epoch(1), b.epoch(1)):
        assert x.keys() == {"label", "latent", "latent_flip", "visual", "visual_flip"}  # image_id (text) dropped
        assert all(torch.equal(x[k], y[k]) for k in x)
    # Each epoch visits every row once, in its own order; another rank or seed orders them otherwise.
    order = a.order(0)
    assert sorted(order.tolist()) == list(range(ROWS))
    assert not torch.equal(order, a.order(1))
    assert not torch.equal(order, RowBatches(data, BATCH, seed=0, rank=1).order(0))
    assert not torch.equal(order, RowBatches(data, BATCH, seed=1).order(0))
    shown = torch.cat([x["latent"] for x in a.epoch(0)])
    assert torch.equal(shown, torch.from_numpy(data["latent"])[order])
    # The canonical order is by key: the same rows handed over shuffled give the same batches.
    keyed = dict(data, key=np.arange(ROWS))
    perm = np.random.default_rng(3).permutation(ROWS)
    shuffled = RowBatches({k: v[perm] for k, v in keyed.items()}, BATCH, seed=0)
    for x, y in zip(RowBatches(keyed, BATCH, seed=0).epoch(2), shuffled.epoch(2)):
        assert torch.equal(x["latent"], y["latent"]) and torch.equal(x["label"], y["label"])
    # The last partial batch is dropped; too few or no rows are refused with the fix.
    assert [len(x["label"]) for x in RowBatches(data, 5, seed=0).epoch(0)] == [5, 5]
    with pytest.raises(RuntimeError, match="fewer than one batch of 64: lower train.batch_size"):
        RowBatches(data, 64, 0)
    with pytest.raises(RuntimeError, match="shard is empty"):
        RowBatches.from_parts([], 4, 0)


def test_assemble_batch_picks_flips_with_the_trainers_generator_on_its_device():
    """Flat rows → the Trainer's batch; the flip draw comes from the (device) generator."""
    n, shapes = 8, {"latent": [1, 4, 4], "visual": [2, 3]}
    g = torch.Generator().manual_seed(0)
    raw = {"label": torch.arange(n) % 3, "latent": torch.randn(n, 16, generator=g), "latent_flip": torch.randn(n, 16, generator=g),
           "visual": torch.randn(n, 6, generator=g).half(), "visual_flip": torch.randn(n, 6, generator=g).half()}
    text = (torch.randn(3, 2, 5, generator=g), torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]))
    gen = torch.Generator(device="cpu").manual_seed(7)
    got = assemble_batch(raw, shapes, text, True, True, gen)
    flip = torch.rand(n, generator=torch.Generator().manual_seed(7)) < 0.5
    assert 0 < int(flip.sum()) < n
    torch.testing.assert_close(got["latent"], torch.where(flip[:, None], raw["latent_flip"], raw["latent"]).view(n, 1, 4, 4),
                               rtol=0, atol=0)
    torch.testing.assert_close(got["visual"], torch.where(flip[:, None], raw["visual_flip"], raw["visual"]).float().view(n, 2, 3),
                               rtol=0, atol=0)
    assert got["latent"].dtype == got["visual"].dtype == torch.float32 and got["label"].dtype == torch.int64
    assert torch.equal(got["text_emb"], text[0][raw["label"]]) and torch.equal(got["text_mask"], text[1][raw["label"]])
    state = gen.get_state()
    plain = assemble_batch(raw, shapes, None, False, False, gen)  # no flips: no draw, no visual, no text
    assert torch.equal(gen.get_state(), state) and set(plain) == {"label", "latent"}
    assert torch.equal(plain["latent"], raw["latent"].view(n, 1, 4, 4))


def test_train_loop_reports_and_checkpoints_on_schedule_and_refuses_an_empty_epoch():
    trainer = Trainer(_model(_kwargs()), _dit_objective(), _train_cfg())
    rows, calls = RowBatches(_data(), BATCH, seed=0), []
    last = train_loop(trainer, rows.epoch, _assemble(trainer.generator), 7, log_every=2, ckpt_every=3,
                      report=lambda m, pos: calls.append((int(m["step"]), m["epoch"], pos)), images_per_step=BATCH)
    assert calls == [(2, 0, None), (3, 0, {"epoch": 0, "index": 3}), (4, 1, None), (6, 1, {"epoch": 1, "index": 3}),
                     (7, 2, {"epoch": 2, "index": 1})]
    assert last["step"] == 7 and last["images_per_s"] > 0 and last["skipped_steps"] == 0
    # A resume at an epoch's end goes on with the next epoch.
    resumed = []
    train_loop(trainer, rows.epoch, _assemble(trainer.generator), 8, position={"epoch": 2, "index": 3},
               report=lambda m, pos: resumed.append((int(m["step"]), m["epoch"])))
    assert resumed == [(8, 3)]
    with pytest.raises(RuntimeError, match="epoch 0 gave this worker no batch"):
        train_loop(trainer, lambda e: iter([]), _assemble(trainer.generator), 20)
