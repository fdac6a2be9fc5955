"""Pre-training objectives: each learns; MoCo's EMA is exact; masks are exact; MAE's encoder sees visible patches."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from vitablate.models import create_model
from vitablate.objectives.pretext import (
    MAE,
    PRETEXTS,
    Hybrid,
    MoCo,
    SimMIM,
    build_pretext,
    block_masking,
    moco_momentum,
    random_masking,
)
from vitablate.config import PretextConfig

IMG, PATCH, DIM = 16, 4, 32
L = (IMG // PATCH) ** 2  # 16 patches
MEAN3, STD3 = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
NUM_CLASSES = 4


def encoder(in_chans: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(mixer="attention", img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=2, num_heads=4,
                        num_classes=0, in_chans=in_chans, global_pool="avg")


def images(n: int = 16, c: int = 3, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0, 1]: 4x4 noise upsampled, so patches have learnable structure."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, c, 4, 4, generator=g)
    return torch.nn.functional.interpolate(low, size=(IMG, IMG), mode="bilinear", align_corners=False).clamp(0, 1)


def labels(n: int = 16) -> torch.Tensor:
    return torch.arange(n) % NUM_CLASSES


def kwargs_for(name: str) -> dict:
    small_moco = dict(dim=16, mlp_dim=64)
    return {
        "supervised": dict(num_classes=NUM_CLASSES),
        "moco": small_moco,
        "simmim": {},
        "mae": dict(decoder_dim=32, decoder_depth=1, decoder_heads=4),
        "hybrid": dict(lam=0.5, moco_kwargs=small_moco),
    }[name]


def build(name: str, in_chans: int = 3, seed: int = 0):
    mean, std = (MEAN3, STD3) if in_chans == 3 else ((0.5,), (0.25,))
    enc = encoder(in_chans, seed)
    torch.manual_seed(seed + 1)
    return build_pretext(name, enc, mean, std, **kwargs_for(name))


def unique(params) -> bool:
    return len({id(p) for p in params}) == len(params)


@pytest.mark.parametrize("name", sorted(PRETEXTS))
def test_each_pretext_lowers_its_own_loss(name):
    obj = build(name)
    x, y = images(), labels()
    params = obj.trainable_parameters()
    assert unique(params)
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    steps, losses = 20, []
    obj.train()
    for step in range(steps):
        gen = torch.Generator().manual_seed(123)  # same views and masks every step: a pure fitting problem
        loss, logs = obj(x, y, generator=gen)
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert logs and all(torch.isfinite(torch.as_tensor(v)) and torch.as_tensor(v).dim() == 0 for v in logs.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        obj.after_step(step, steps)
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.9 * first, f"{name}: {losses}"


@pytest.mark.parametrize("name", sorted(PRETEXTS))
def test_one_channel_images(name):
    obj = build(name, in_chans=1)
    x = images(8, c=1)
    loss, _ = obj(x, labels(8), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert obj.encoder.patch_embed.proj.weight.grad is not None


def test_same_generator_repeats_the_loss():
    obj = build("hybrid")
    x = images()
    a, _ = obj(x, generator=torch.Generator().manual_seed(5))
    b, _ = obj(x, generator=torch.Generator().manual_seed(5))
    c, _ = obj(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --- MoCo ------------------------------------------------------------------------------


def test_moco_momentum_branch_is_frozen_and_follows_the_ema():
    obj = build("moco")
    momentum_params = list(obj.momentum_encoder.parameters()) + list(obj.momentum_projector.parameters())
    trainable = obj.trainable_parameters()
    assert unique(trainable)
    ids = {id(p) for p in trainable}
    assert not any(id(p) in ids for p in momentum_params)
    assert all(id(p) in ids for p in obj.encoder.parameters())
    assert all(id(p) in ids for p in obj.predictor.parameters())

    loss, logs = obj(images(), generator=torch.Generator().manual_seed(0))
    assert set(logs) >= {"loss_moco", "momentum"}
    loss.backward()
    assert all(p.grad is None for p in momentum_params)
    assert obj.encoder.blocks[0].attn.qkv.weight.grad is not None

    torch.optim.SGD(trainable, lr=0.5).step()  # online and momentum branches now differ
    old = obj.momentum_encoder.blocks[0].attn.qkv.weight.detach().clone()
    online = obj.encoder.blocks[0].attn.qkv.weight.detach().clone()
    old_proj = obj.momentum_projector[0].weight.detach().clone()
    online_proj = obj.projector[0].weight.detach().clone()
    assert not torch.allclose(old, online)
    step, total = 3, 10
    obj.after_step(step, total)
    m = moco_momentum(step, total, 0.99)
    assert obj.momentum == pytest.approx(m)
    torch.testing.assert_close(obj.momentum_encoder.blocks[0].attn.qkv.weight, m * old + (1 - m) * online)
    torch.testing.assert_close(obj.momentum_projector[0].weight, m * old_proj + (1 - m) * online_proj)
    # the online branch is untouched by the EMA
    torch.testing.assert_close(obj.encoder.blocks[0].attn.qkv.weight, online)


def test_moco_momentum_schedule():
    assert moco_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert moco_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert moco_momentum(100, 100, 0.99) == pytest.approx(1.0)
    ms = [moco_momentum(s, 100, 0.99) for s in range(101)]
    assert all(a <= b for a, b in zip(ms, ms[1:]))


def test_moco_contrastive_loss_matches_formula():
    obj = build("moco")
    q, k = torch.randn(6, 16), torch.randn(6, 16)
    T = obj.temperature
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    logits = qn @ kn.T / T
    expected = -(logits.diag() - logits.logsumexp(dim=1)).mean() * 2 * T
    torch.testing.assert_close(obj.contrastive_loss(q, k), expected)


# --- masking ---------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.4, 0.6, 0.75, 0.9])
@pytest.mark.parametrize("num_patches", [16, 49, 196])
def test_random_masking_is_exact_per_image(ratio, num_patches):
    mask, ids_keep, ids_restore = random_masking(32, num_patches, ratio, torch.device("cpu"),
                                                 torch.Generator().manual_seed(0))
    n_masked = round(ratio * num_patches)
    assert mask.shape == (32, num_patches)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.sum(1) == n_masked).all()
    assert ids_keep.shape == (32, num_patches - n_masked)
    assert (mask.gather(1, ids_keep) == 0).all()  # kept ids are the visible ones
    # masks differ between images (per-image randomness)
    assert len({tuple(r) for r in mask.int().tolist()}) > 1
    # ids_restore inverts the shuffle
    assert (ids_restore.sort(1).values == torch.arange(num_patches)).all()


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.6, 0.75])
def test_simmim_masks_exactly_and_puts_mask_tokens_before_position_embeddings(ratio):
    obj: SimMIM = PRETEXTS["simmim"](encoder(), MEAN3, STD3, mask_ratio=ratio)
    x = obj.normalize(images(8))
    mask = obj.random_masking(8, ratio, x.device, torch.Generator().manual_seed(1))
    assert mask.shape == (8, L)
    assert (mask.sum(1) == math.ceil(ratio * L)).all()  # SimMIM: ceil(blocks * ratio), one patch per block
    seen = {}
    hook = obj.encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    try:
        out = obj.forward_encoder(x, mask)
    finally:
        hook.remove()
    assert out.shape == (8, L, DIM)
    tokens = seen["x"]  # (N, 1 + L, D): the full sequence, CLS kept
    assert tokens.shape == (8, 1 + L, DIM)
    no_pos = tokens - obj.encoder.pos_embed.detach()  # what there was before position embeddings
    m = mask.bool()
    token = obj.mask_token.detach().reshape(1, -1)
    torch.testing.assert_close(no_pos[:, 1:][m], token.expand(int(m.sum()), -1))
    patch = obj.encoder.patch_embed(x).detach()
    torch.testing.assert_close(no_pos[:, 1:][~m], patch[~m])
    torch.testing.assert_close(no_pos[:, 0], obj.encoder.cls_token.detach().reshape(1, -1).expand(8, -1))


def test_simmim_loss_only_counts_masked_patches():
    obj: SimMIM = PRETEXTS["simmim"](encoder(), MEAN3, STD3)
    imgs = torch.randn(2, 3, IMG, IMG)
    mask = torch.zeros(2, L)
    mask[:, :3] = 1
    from vitablate.objectives.pretext import patchify

    target = patchify(imgs, PATCH)
    pred = target.clone()
    pred[:, 3:] += 100.0  # errors on visible patches must not count
    pred[:, :3] += 0.5
    assert obj.forward_loss(imgs, pred, mask).item() == pytest.approx(0.5)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_mae_masks_exactly_and_encoder_sees_only_visible_patches(ratio):
    obj: MAE = PRETEXTS["mae"](encoder(), MEAN3, STD3, mask_ratio=ratio, decoder_dim=32, decoder_depth=1)
    x = obj.normalize(images(8))
    n_keep = L - round(ratio * L)
    seen = {}
    hook = obj.encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    try:
        latent, mask, ids_restore = obj.forward_encoder(x, ratio, torch.Generator().manual_seed(2))
    finally:
        hook.remove()
    assert latent.shape == (8, 1 + n_keep, DIM)
    assert seen["x"].shape == (8, 1 + n_keep, DIM)
    assert (mask.sum(1) == round(ratio * L)).all()
    # the tokens the blocks saw are exactly the visible patches (+ CLS), with their position embeddings
    full = obj.encoder._pos_embed(obj.encoder.patch_embed(x)).detach()  # (N, 1 + L, D)
    ids_keep = ids_restore.argsort(1)[:, :n_keep]
    assert (mask.gather(1, ids_keep) == 0).all()
    expected = full[:, 1:].gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, DIM))
    torch.testing.assert_close(seen["x"][:, 1:], expected)
    torch.testing.assert_close(seen["x"][:, 0], full[:, 0])
    pred = obj.forward_decoder(latent, ids_restore)
    assert pred.shape == (8, L, PATCH * PATCH * 3)


def test_mae_default_ratio_visible_tokens():
    obj = build("mae")
    latent, _, _ = obj.forward_encoder(obj.normalize(images(4)), obj.mask_ratio)
    assert obj.mask_ratio == 0.75
    assert latent.shape[1] == 1 + int(L * (1 - 0.75))


# --- hybrid ----------------------------------------------------------------------------


def _fresh(cls, **kw):
    enc = encoder(seed=0)
    torch.manual_seed(1)
    return cls(enc, MEAN3, STD3, **kw)


def test_hybrid_endpoints_equal_moco_and_simmim():
    x = images()
    small = dict(dim=16, mlp_dim=64)
    moco = _fresh(MoCo, **small)
    hyb1 = _fresh(Hybrid, lam=1.0, moco_kwargs=small)
    a, _ = moco(x, generator=torch.Generator().manual_seed(7))
    b, logs_b = hyb1(x, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)
    assert "loss_simmim" not in logs_b

    simmim = _fresh(SimMIM)
    hyb0 = _fresh(Hybrid, lam=0.0, moco_kwargs=small)
    hyb0.simmim.load_state_dict(simmim.state_dict())  # its head was initialised after MoCo's
    a, _ = simmim(x, generator=torch.Generator().manual_seed(7))
    b, logs_b = hyb0(x, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)
    assert "loss_moco" not in logs_b


def test_hybrid_is_the_weighted_sum_and_shares_one_encoder():
    obj = _fresh(Hybrid, lam=0.3, moco_kwargs=dict(dim=16, mlp_dim=64))
    assert obj.moco.encoder is obj.encoder and obj.simmim.encoder is obj.encoder
    loss, logs = obj(images(), generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(0.3 * float(logs["loss_moco"]) + 0.7 * float(logs["loss_simmim"]), rel=1e-5)

    params = obj.trainable_parameters()
    assert unique(params)
    ids = {id(p) for p in params}
    assert id(obj.simmim.mask_token) in ids and id(obj.simmim.head.weight) in ids
    assert id(obj.moco.predictor[0].weight) in ids and id(obj.moco.projector[0].weight) in ids
    assert all(id(p) in ids for p in obj.encoder.parameters())
    assert not any(id(p) in ids for p in obj.moco.momentum_encoder.parameters())

    loss.backward()
    torch.optim.SGD(params, lr=0.5).step()
    before = obj.moco.momentum_encoder.patch_embed.proj.weight.detach().clone()
    obj.after_step(0, 10)
    after = obj.moco.momentum_encoder.patch_embed.proj.weight
    online = obj.encoder.patch_embed.proj.weight.detach()
    torch.testing.assert_close(after, 0.99 * before + 0.01 * online)


# --- registry --------------------------------------------------------------------------


def test_registry_and_unknown_name():
    assert set(PRETEXTS) == {"supervised", "moco", "simmim", "mae", "hybrid"}
    with pytest.raises(ValueError) as err:
        build_pretext("byol", encoder(), MEAN3, STD3)
    for name in PRETEXTS:
        assert name in str(err.value)


def test_mean_std_must_match_channels():
    with pytest.raises(ValueError, match="3"):
        SimMIM(encoder(), (0.5,), (0.25,))


def test_patchify_round_trip_and_order():
    from vitablate.objectives.pretext import patchify, unpatchify

    x = torch.randn(2, 3, IMG, IMG)
    p = patchify(x, PATCH)
    assert p.shape == (2, L, PATCH * PATCH * 3)
    assert torch.equal(unpatchify(p, PATCH, 3, IMG // PATCH), x)
    # patch 1 is the second patch of the first row; its first value is pixel (0, PATCH), channel 0
    assert p[0, 1, 0] == x[0, 0, 0, PATCH]


# --- SimMIM block masks and MoCo v3 views -----------------------------------------------


@pytest.mark.parametrize("grid,block,ratio", [((14, 14), 2, 0.6), ((8, 8), 2, 0.6), ((8, 8), 4, 0.5),
                                              ((6, 9), 3, 0.4), ((4, 4), 1, 0.6)])
def test_block_masking_masks_whole_blocks_at_simmims_count(grid, block, ratio):
    gh, gw = grid
    n = 400
    mask = block_masking(n, grid, block, ratio, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert mask.shape == (n, gh * gw) and set(mask.unique().tolist()) <= {0.0, 1.0}
    blocks = mask.view(n, gh // block, block, gw // block, block)
    # every block is all-masked or all-visible
    per_block = blocks.amax(dim=(2, 4))
    assert torch.equal(per_block, blocks.amin(dim=(2, 4)))
    n_blocks = (gh // block) * (gw // block)
    n_masked = int(np.ceil(n_blocks * ratio))  # MaskGenerator's mask_count
    assert (per_block.flatten(1).sum(1) == n_masked).all()
    assert (mask.sum(1) == n_masked * block * block).all()
    # a uniform choice of blocks: each block masked in about n_masked / n_blocks of the images
    freq = per_block.flatten(1).mean(0)
    assert (freq - n_masked / n_blocks).abs().max() < 0.12
    distinct = len({tuple(r) for r in mask.int().tolist()})  # per-image masks
    assert distinct > min(n // 2, math.comb(n_blocks, n_masked) // 2)


def test_block_masking_at_imagenet_scale():
    """224 px, 16 px patches, 32 px mask blocks: 30 of 49 2x2 blocks, i.e. 120 of 196 patches."""
    mask = block_masking(8, (14, 14), 2, 0.6, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert (mask.sum(1) == 120).all()


def test_simmim_masks_blocks_of_mask_patch_size():
    torch.manual_seed(0)
    enc = create_model(mixer="attention", img_size=32, patch_size=4, embed_dim=DIM, depth=1, num_heads=4,
                       num_classes=0, global_pool="avg")
    obj = SimMIM(enc, MEAN3, STD3, mask_ratio=0.6, mask_patch_size=8)  # 2x2 patches, 16 blocks
    mask = obj.random_masking(64, 0.6, torch.device("cpu"), torch.Generator().manual_seed(3))
    blocks = mask.view(64, 4, 2, 4, 2)
    assert torch.equal(blocks.amax(dim=(2, 4)), blocks.amin(dim=(2, 4)))
    assert (mask.sum(1) == 10 * 4).all()  # ceil(16 * 0.6) = 10 blocks
    loss, _ = obj(torch.rand(4, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    for bad in (6, 12, 3):  # not a multiple of the patch, or does not divide 32 px
        with pytest.raises(ValueError, match="simmim_mask_patch_size"):
            SimMIM(enc, MEAN3, STD3, mask_patch_size=bad)
    # the config key reaches the objective (and the hybrid's SimMIM part)
    kw = PretextConfig(name="hybrid", simmim_mask_patch_size=16).objective_kwargs()
    hybrid = Hybrid(enc, MEAN3, STD3, lam=0.5, moco_kwargs=dict(dim=8, mlp_dim=16), simmim_kwargs=kw["simmim_kwargs"])
    assert hybrid.simmim.mask_block == 4


def _fired(aug, keep: str, x: torch.Tensor) -> float:
    """Share of images that `aug` changes when every operation but `keep` is switched off."""
    aug = copy.deepcopy(aug)
    aug.crop_scale, aug.flip, aug.pad_crop = None, False, 0
    if keep == "blur_p":  # a sigma near 0.1 px changes nothing visible: mark where the blur is applied
        aug._blur = lambda x, generator: torch.zeros_like(x)
    if keep != "jitter":
        aug.jitter = (0.0, 0.0, 0.0, 0.0)
    for name in ("grayscale_p", "blur_p", "solarize_p"):
        if name != keep:
            setattr(aug, name, 0.0)
    out = aug(x, generator=torch.Generator().manual_seed(0))
    return float(((out - x).abs().flatten(1).amax(1) > 1e-4).float().mean())


def test_moco_views_fire_with_the_reference_probabilities():
    """facebookresearch/moco-v3 main_moco.py: jitter p 0.8, grayscale 0.2, blur 1.0 / 0.1, solarize 0 / 0.2."""
    kw = PretextConfig(name="moco", moco_dim=8, moco_mlp_dim=16).objective_kwargs()
    obj = MoCo(encoder(), MEAN3, STD3, **kw)  # the config's defaults are the reference values
    g = torch.Generator().manual_seed(0)
    n = 4000
    colour = 0.2 + 0.6 * torch.rand(n, 3, 1, 1, generator=g) + 0.05 * torch.rand(n, 3, 8, 8, generator=g)
    bright = 0.6 + 0.4 * torch.rand(n, 3, 8, 8, generator=g)  # every pixel >= 0.5: solarize changes it
    expected = {"jitter": (0.8, 0.8), "grayscale_p": (0.2, 0.2), "blur_p": (1.0, 0.1), "solarize_p": (0.0, 0.2)}
    for op, (p1, p2) in expected.items():
        x = bright if op == "solarize_p" else colour
        assert abs(_fired(obj.augment1, op, x) - p1) < 0.03, (op, "view 1")
        assert abs(_fired(obj.augment2, op, x) - p2) < 0.03, (op, "view 2")
    for aug in (obj.augment1, obj.augment2):
        assert aug.crop_scale == (0.08, 1.0) and aug.flip
        assert aug.jitter == (0.4, 0.4, 0.2, 0.1)
    with pytest.raises(ValueError, match="moco_crop_scale"):
        MoCo(encoder(), MEAN3, STD3, crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="moco_blur_p"):
        MoCo(encoder(), MEAN3, STD3, blur_p=(1.0,))
