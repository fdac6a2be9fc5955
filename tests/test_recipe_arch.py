"""The pre-training papers' architecture details (issue 12): fixed sin-cos position embeddings, MoCo v3's
frozen patch projection and initialisation, SimMIM's LayerScale, MAE's decoder heads. Each is checked
against an independent computation; with the defaults the model is exactly the one built before them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vitablate.config import ModelConfig, PretextConfig
from vitablate.models import create_model
from vitablate.objectives import build_pretext
from vitablate.objectives.pretext import sincos_pos_embed_2d

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=5)


def numpy_sincos(dim: int, grid: int, row_first: bool) -> np.ndarray:
    """The references' formula written out with numpy, one token at a time: (1 + grid*grid, dim), CLS row zero.

    MAE (util/pos_embed.py): np.meshgrid(grid_w, grid_h) -> grid[0] is the column index and fills the first
    half; MoCo v3 (vits.py): torch.meshgrid(grid_w, grid_h) ('ij') -> grid_w.flatten() is the row index of a
    row-major token, and fills the first half. Each half: [sin(pos * omega), cos(pos * omega)],
    omega_k = 1 / 10000 ** (k / (dim / 4))."""
    quarter = dim // 4
    omega = np.array([1.0 / 10000 ** (k / quarter) for k in range(quarter)])
    rows = [np.zeros(dim)]
    for token in range(grid * grid):
        r, c = divmod(token, grid)
        first, second = (r, c) if row_first else (c, r)
        rows.append(np.concatenate([np.sin(first * omega), np.cos(first * omega),
                                    np.sin(second * omega), np.cos(second * omega)]))
    return np.stack(rows)


@pytest.mark.parametrize("name,row_first", [("sincos", False), ("sincos_moco_v3", True)])
def test_sincos_position_embedding_is_the_reference_formula_and_fixed(name, row_first):
    model = create_model(pos_embed=name, **SMALL)
    expected = numpy_sincos(32, 4, row_first)
    np.testing.assert_allclose(model.pos_embed[0].detach().numpy(), expected, atol=1e-6)
    assert not model.pos_embed.requires_grad
    # the two layouts are the same codes, transposed: they differ
    other = numpy_sincos(32, 4, not row_first)
    assert np.abs(model.pos_embed[0].detach().numpy() - other).max() > 0.1
    # MAE's decoder uses the same function (MAE layout)
    np.testing.assert_allclose(sincos_pos_embed_2d(32, 4, 1).numpy(), numpy_sincos(32, 4, False), atol=1e-6)


def test_fixed_position_embedding_gets_no_update():
    model = create_model(pos_embed="sincos", **SMALL)
    before = model.pos_embed.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.5)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    assert model.pos_embed.grad is None
    assert torch.equal(model.pos_embed, before)


def test_frozen_patch_projection_receives_no_gradient_and_stays_equal_after_a_step():
    from vitablate.engine import param_groups

    model = create_model(freeze_patch_embed=True, **SMALL)
    proj = model.patch_embed.proj
    w, b = proj.weight.detach().clone(), proj.bias.detach().clone()
    for decay_all in (False, True):  # MoCo v3 decays every parameter: the frozen ones must still stay out
        groups = param_groups(model, 0.1, decay_all=decay_all)
        ids = {id(p) for g in groups for p in g["params"]}
        assert id(proj.weight) not in ids and id(proj.bias) not in ids
    opt = torch.optim.AdamW(param_groups(model, 0.1, decay_all=True), lr=0.1)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert proj.weight.grad is None and proj.bias.grad is None
    assert model.blocks[0].attn.qkv.weight.grad is not None  # the rest trains
    opt.step()
    assert torch.equal(proj.weight, w) and torch.equal(proj.bias, b)


def test_frozen_patch_projection_stays_frozen_through_moco_and_its_momentum_encoder():
    enc = create_model(freeze_patch_embed=True, pos_embed="sincos_moco_v3", weight_init="moco_v3",
                       **dict(SMALL, num_classes=0))
    moco = build_pretext("moco", enc, (0.5,) * 3, (0.25,) * 3, dim=8, mlp_dim=16)
    trainable = {id(p) for p in moco.trainable_parameters()}
    assert id(enc.patch_embed.proj.weight) not in trainable and id(enc.pos_embed) not in trainable
    w = enc.patch_embed.proj.weight.detach().clone()
    opt = torch.optim.AdamW(moco.trainable_parameters(), lr=0.1)
    loss, _ = moco(torch.rand(4, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    loss.backward()
    opt.step()
    moco.after_step(0, 10)
    assert torch.equal(enc.patch_embed.proj.weight, w)
    # the EMA (as MoCo v3's builder.py, on every parameter) mixes two equal tensors: equal up to rounding
    torch.testing.assert_close(moco.momentum_encoder.patch_embed.proj.weight, w, rtol=0, atol=1e-6)


def test_moco_v3_initialisation_bounds():
    """vits.py: uniform(+-sqrt(6 / (rows/3 + cols))) for qkv, xavier-uniform for other Linears, zero biases,
    CLS N(0, 1e-6), patch projection uniform(+-sqrt(6 / (3 p p + D)))."""
    torch.manual_seed(0)
    model = create_model(weight_init="moco_v3", **dict(SMALL, embed_dim=64, num_heads=4, depth=4))
    D, p = 64, 4
    qkv = model.blocks[0].attn.qkv.weight
    qkv_bound = math.sqrt(6.0 / (D + D))  # rows 3D: a third is D; cols D
    assert qkv.abs().max() <= qkv_bound and qkv.abs().max() > 0.9 * qkv_bound
    fc1 = model.blocks[0].mlp.fc1.weight  # (4D, D): xavier bound sqrt(6 / (D + 4D))
    fc1_bound = math.sqrt(6.0 / (D + 4 * D))
    assert fc1.abs().max() <= fc1_bound and fc1.abs().max() > 0.9 * fc1_bound
    # a uniform(-a, a) has std a / sqrt(3); timm's trunc-normal 0.02 would give 0.02
    assert abs(fc1.std().item() - fc1_bound / math.sqrt(3)) < 0.05 * fc1_bound
    proj_bound = math.sqrt(6.0 / (3 * p * p + D))
    w = model.patch_embed.proj.weight
    assert w.abs().max() <= proj_bound and w.abs().max() > 0.9 * proj_bound
    for m in (model.blocks[0].attn.qkv, model.blocks[0].mlp.fc2, model.patch_embed.proj, model.head):
        assert torch.count_nonzero(m.bias) == 0
    assert model.cls_token.abs().max() < 1e-5 and model.cls_token.abs().max() > 0


def test_mae_initialisation():
    """models_mae.py initialize_weights: patch projection xavier-uniform as a (D, C p p) Linear, CLS N(0, 0.02),
    every Linear xavier-uniform with zero bias."""
    torch.manual_seed(0)
    model = create_model(weight_init="mae", **dict(SMALL, embed_dim=64, depth=4))
    w = model.patch_embed.proj.weight
    bound = math.sqrt(6.0 / (64 + 3 * 16))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    qkv = model.blocks[0].attn.qkv.weight  # (3D, D): plain xavier, sqrt(6 / (3D + D))
    qkv_bound = math.sqrt(6.0 / (4 * 64))
    assert qkv.abs().max() <= qkv_bound and qkv.abs().max() > 0.9 * qkv_bound
    assert 0.01 < model.cls_token.std().item() < 0.03
    assert torch.count_nonzero(model.blocks[1].mlp.fc1.bias) == 0


def test_layerscale_parameters_exist_with_their_initial_value_and_train():
    model = create_model(init_values=0.1, **SMALL)
    for blk in model.blocks:
        for ls in (blk.ls1, blk.ls2):
            assert ls.gamma.shape == (32,)
            assert torch.equal(ls.gamma.detach(), torch.full((32,), 0.1))
            assert ls.gamma.requires_grad
    names = set(model.state_dict())
    assert {f"blocks.{i}.ls{j}.gamma" for i in range(2) for j in (1, 2)} <= names
    # the residual branch is scaled: with gamma 0 a block is the identity
    with torch.no_grad():
        for blk in model.blocks:
            blk.ls1.gamma.zero_()
            blk.ls2.gamma.zero_()
    x = torch.randn(2, 5, 32)
    assert torch.equal(model.blocks[0](x), x)
    with pytest.raises(ValueError, match="init_values"):
        create_model(mixer="feedforward", init_values=0.1, **SMALL)


@pytest.mark.parametrize("heads", [4, 8, 16])
def test_mae_decoder_heads(heads):
    enc = create_model(**dict(SMALL, num_classes=0))
    kw = PretextConfig(name="mae", mae_decoder_dim=64, mae_decoder_heads=heads).objective_kwargs()
    mae = build_pretext("mae", enc, (0.5,) * 3, (0.25,) * 3, **kw)
    assert all(blk.attn.num_heads == heads for blk in mae.decoder_blocks)
    assert mae.decoder_blocks[0].attn.head_dim == 64 // heads
    with pytest.raises(ValueError, match="mae_decoder_heads"):
        build_pretext("mae", create_model(**dict(SMALL, num_classes=0)), (0.5,) * 3, (0.25,) * 3,
                      **PretextConfig(name="mae", mae_decoder_dim=64, mae_decoder_heads=6).objective_kwargs())


def test_mae_decoder_heads_default_is_todays():
    assert PretextConfig().mae_decoder_heads == 4
    import inspect

    from vitablate.objectives.pretext import MAE
    assert inspect.signature(MAE).parameters["decoder_heads"].default == 4


def test_defaults_build_exactly_todays_model():
    """Defaults: the same state_dict keys and values for the same seed as timm's VisionTransformer built
    directly (what create_model built before these keys), and the same random stream afterwards."""
    from vitablate.models.factory import MIXERS, Geometry

    for mixer in ("attention", "feedforward"):
        torch.manual_seed(3)
        ours = create_model(mixer=mixer, **SMALL)
        after_ours = torch.rand(3)
        torch.manual_seed(3)
        g = Geometry((4, 4), 1)
        ref = VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=5, global_pool="avg", embed_dim=32,
                                depth=2, num_heads=4, mlp_ratio=4.0, class_token=True, drop_path_rate=0.0,
                                **MIXERS[mixer](g))
        after_ref = torch.rand(3)
        a, b = ours.state_dict(), ref.state_dict()
        assert list(a) == list(b)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert torch.equal(after_ours, after_ref)
        assert all(p.requires_grad for p in ours.parameters())
        # and through the job's kwargs: ModelConfig's defaults are create_model's
        from vitablate.jobs import model_kwargs

        class Data:
            img_size, in_chans, num_classes = 16, 3, 5

        kw = model_kwargs(ModelConfig(patch_size=4, embed_dim=32, depth=2, num_heads=4), Data, mixer)
        torch.manual_seed(3)
        via_job = create_model(**kw).state_dict()
        assert all(torch.equal(via_job[k], b[k]) for k in b) and list(via_job) == list(b)


def test_encoder_with_every_detail_saves_loads_and_fine_tunes(tmp_path):
    """A checkpoint of an encoder with a fixed position embedding, a frozen patch projection and LayerScale loads
    back (evaluations, teachers) and into a fine-tuning model with a learnt embedding (MAE main_finetune.py's
    models_vit: pos_embed trained from the checkpoint's values)."""
    from vitablate.jobs import load_encoder, load_pretrained
    from vitablate.models.teachers import load_teacher

    kw = dict(SMALL, num_classes=0, mixer="attention", pos_embed="sincos", freeze_patch_embed=True,
              weight_init="moco_v3", init_values=0.1)
    enc = create_model(**kw)
    path = tmp_path / "encoder.pt"
    torch.save({"model": enc.state_dict(), "model_kwargs": kw, "config": {}}, path)
    back, _, _ = load_encoder(str(path))
    assert all(torch.equal(back.state_dict()[k], v) for k, v in enc.state_dict().items())
    teacher = load_teacher(f"file:{path}", dict(SMALL))
    assert torch.equal(teacher.pos_embed, enc.pos_embed)
    # fine-tuning: learnt embedding, trainable projection, LayerScale kept
    ft = create_model(**dict(SMALL, init_values=0.1))
    load_pretrained(ft, enc.state_dict(), "encoder")
    assert torch.equal(ft.pos_embed, enc.pos_embed) and ft.pos_embed.requires_grad
    assert ft.patch_embed.proj.weight.requires_grad
    # a fine-tuning model without the encoder's LayerScale is refused with the key to set
    with pytest.raises(ValueError, match="init_values"):
        load_pretrained(create_model(**SMALL), enc.state_dict(), "encoder")
    # a plain timm state dict with LayerScale is read as such by the teacher loader
    sd_path = tmp_path / "plain.pt"
    torch.save({k: v for k, v in enc.state_dict().items()}, sd_path)
    plain = load_teacher(f"file:{sd_path}", dict(SMALL, mixer="attention"))
    assert torch.equal(plain.blocks[0].ls1.gamma, enc.blocks[0].ls1.gamma)
