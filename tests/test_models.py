"""Models: every mixer trains (forward, backward, no NaN, every parameter gets a gradient),
paper parameter counts, timm compatibility, attention capture and override."""

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from vitablate.models import (
    MIXERS, VARIANTS, MixingAttention, add_prefix_and_positions, attention_maps, capturing, count_params, create_model,
    embed, make_hookable,
)

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_every_mixer_trains(mixer):
    torch.manual_seed(0)
    model = create_model(mixer=mixer, **TINY)
    assert isinstance(model, VisionTransformer)
    x = torch.randn(3, 3, 16, 16)
    out = model(x)
    assert out.shape == (3, 5)
    assert torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"{mixer}: parameters without a finite gradient: {no_grad}"
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    if mixer in ("identity", "pooling"):  # these never mix the CLS token into the (avg-pooled)
        zero.remove("cls_token")  # patch tokens: its gradient is exactly zero by design
    assert not zero, f"{mixer}: parameters with an all-zero gradient: {zero}"


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_mixers_differ_in_token_mixing(mixer):
    """Every mixer but identity lets one patch change its neighbour's output token."""
    torch.manual_seed(0)
    model = create_model(mixer=mixer, global_pool="avg", **{k: v for k, v in TINY.items()}).eval()
    x = torch.randn(1, 3, 16, 16)
    x2 = x.clone()
    x2[..., :4, :4] += 3.0  # change only the first patch
    t1, t2 = model.forward_features(x), model.forward_features(x2)
    neighbour = 2  # CLS, patch 0, then patch 1: the next patch in the row
    neighbour_changed = not torch.allclose(t1[0, neighbour], t2[0, neighbour], atol=1e-6)
    assert neighbour_changed == (mixer != "identity")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_registry_variants_build(variant):
    with torch.device("meta"):  # sizes only: no memory for ViT-L
        model = create_model(mixer="attention", num_classes=10, **VARIANTS[variant])
    assert len(model.blocks) == VARIANTS[variant]["depth"]


def test_paper_parameter_counts():
    """At 224 px, patch 16, width 768, depth 12 (ImageNet head): FF-only 61.9M, ViT-B 86.6M (±1%)."""
    kw = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=1000)
    with torch.device("meta"):
        ff = count_params(create_model(mixer="feedforward", **kw)) / 1e6
        vit = count_params(create_model(mixer="attention", **kw)) / 1e6
    assert abs(ff - 61.9) / 61.9 < 0.01, ff
    assert abs(vit - 86.6) / 86.6 < 0.01, vit


def test_feedforward_parameter_counts():
    """The paper's feed-forward-only ViT: 61.9M at ViT-B/16, 7.7M at tiny (224 px, 1000 classes)."""
    kw = dict(img_size=224, patch_size=16, depth=12, num_classes=1000)
    with torch.device("meta"):
        base = count_params(create_model(mixer="feedforward", embed_dim=768, num_heads=12, **kw)) / 1e6
        tiny = count_params(create_model(mixer="feedforward", embed_dim=192, num_heads=3, **kw)) / 1e6
    assert round(base, 1) == 61.9, base
    assert round(tiny, 1) == 7.7, tiny


def _reference_linear_block(x, blk):
    """lukemelas/do-you-even-need-attention LinearBlock.forward, written again with functional ops
    on the block's weights: x + mlp1(norm1(x)) over channels, then on the transposed (B, C, N)
    features x + mlp2(norm2(x)) with norm2 over the N tokens."""
    import torch.nn.functional as F

    def mlp(t, m):
        return F.linear(F.gelu(F.linear(t, m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias)

    def ln(t, norm):
        return F.layer_norm(t, (t.shape[-1],), norm.weight, norm.bias, eps=1e-6)

    x = x + mlp(ln(x, blk.norm1), blk.mlp_channels)
    x = x.transpose(-2, -1)
    x = x + mlp(ln(x, blk.norm2), blk.mlp_tokens)
    return x.transpose(-2, -1)


def test_feedforward_block_is_the_reference_block():
    torch.manual_seed(0)
    model = create_model(mixer="feedforward", **TINY).eval()
    for p in model.parameters():  # move norms off their identity init so a wrong norm axis shows
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        t = model.norm_pre(model._pos_embed(model.patch_embed(x)))  # (2, 17, 32)
        for blk in model.blocks:
            assert blk.norm2.normalized_shape == (17,)  # CLS + 16 patches
            ours = blk(t)
            ref = _reference_linear_block(t, blk)
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
            t = ref
        # and the whole model: final norm, then the configured pooling and head
        torch.testing.assert_close(model.forward_features(x), model.norm(t), atol=1e-5, rtol=1e-5)


def test_feedforward_drops_paths_in_both_stages():
    model = create_model(mixer="feedforward", drop_path_rate=0.2, **dict(TINY, depth=3))
    rates = [r for b in model.blocks[1:] for r in (b.drop_path1.drop_prob, b.drop_path2.drop_prob)]
    assert rates == pytest.approx([0.1, 0.1, 0.2, 0.2])


def test_attention_model_matches_timm_and_loads_its_weights():
    """Same parameter names as timm's ViT, and the same function once weights are shared."""
    torch.manual_seed(0)
    ours = create_model(mixer="attention", **TINY).eval()
    theirs = VisionTransformer(global_pool="avg", **TINY).eval()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_attention_maps_are_softmax_rows_and_match_unfused_timm():
    torch.manual_seed(0)
    model = create_model(mixer="attention", **TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    maps = attention_maps(model, x)
    assert len(maps) == 2 and maps[0].shape == (2, 2, 17, 17)  # 16 patches + CLS
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 2, 17))
    # reference: timm's own unfused path, reading the map its dropout receives
    ref = VisionTransformer(global_pool="avg", **TINY).eval()
    ref.load_state_dict(model.state_dict())
    seen = []
    for blk in ref.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o))
    out = ref(x)
    for a, b in zip(maps, seen):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # the hooks left no trace: the fused path gives the same logits, and no map is kept
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)
    assert all(b.attn.last_map is None and not b.attn.capture for b in model.blocks)


def test_override_map_replaces_queries_and_keys():
    """With an override, the layer output ignores Q/K: changing qkv's Q/K rows changes nothing."""
    torch.manual_seed(0)
    model = create_model(mixer="attention", **TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    maps = attention_maps(model, x)
    for blk, m in zip(model.blocks, maps):
        blk.attn.override_map = m
    base = model(x)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[: 2 * 32].normal_()  # scramble Q and K projections
    torch.testing.assert_close(model(x), base)
    for blk in model.blocks:
        blk.attn.override_map = None
    assert not torch.allclose(model(x), base)


def test_capturing_subset_of_layers():
    model = create_model(mixer="attention", **dict(TINY, depth=3)).eval()
    with capturing(model, layers=[-1]) as mods:
        model(torch.randn(1, 3, 16, 16))
        assert mods[0] is model.blocks[2].attn
        assert model.blocks[2].attn.last_map is not None and model.blocks[0].attn.last_map is None
    with pytest.raises(ValueError, match="out of range"):
        with capturing(model, layers=[5]):
            pass


def test_attention_maps_refuse_non_attention_mixers():
    model = create_model(mixer="feedforward", **TINY)
    with pytest.raises(ValueError, match="mixer='attention'"):
        attention_maps(model, torch.randn(1, 3, 16, 16))


def test_make_hookable_on_a_plain_timm_model():
    """A model built by timm itself (e.g. a pretrained teacher) gains the hooks, weights untouched."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16,
                              num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    before = model(x)
    make_hookable(model)
    assert all(isinstance(b.attn, MixingAttention) for b in model.blocks)
    maps = attention_maps(model, x)
    assert maps[0].shape == (1, 3, 5, 5)
    torch.testing.assert_close(model(x), before)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mixer="convolution"), "unknown mixer"),
        (dict(img_size=15, patch_size=4), "multiple of patch_size"),
        (dict(embed_dim=30, num_heads=4), "divisible"),
    ],
)
def test_bad_model_arguments_are_named(kwargs, match):
    args = dict(TINY) | kwargs
    with pytest.raises(ValueError, match=match):
        create_model(**args)


@pytest.mark.parametrize("kw", [dict(), dict(reg_tokens=2), dict(no_embed_class=True), dict(class_token=False),
                                dict(no_embed_class=True, reg_tokens=1), dict(pos_embed="none"),
                                dict(pos_drop_rate=0.5, patch_drop_rate=0.0)])
def test_embedding_helpers_are_timms_own_path(kw):
    """add_prefix_and_positions is timm's private _pos_embed from public attributes, and
    norm(blocks(embed(x))) is forward_features(x), bit for bit (dropout included, same seed)."""
    torch.manual_seed(0)
    kw = {"global_pool": "avg"} | kw
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3, **kw)
    x = torch.randn(2, 3, 16, 16)
    patches = model.patch_embed(x)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        torch.manual_seed(1)
        ref = model._pos_embed(patches)
        torch.manual_seed(1)
        assert torch.equal(add_prefix_and_positions(model, patches), ref)
        torch.manual_seed(1)
        ref = model.forward_features(x)
        torch.manual_seed(1)
        assert torch.equal(model.norm(model.blocks(embed(model, x))), ref)
    assert embed(model, x).shape == (2, model.num_prefix_tokens + 16, 32)


def test_observing_capture_keeps_timms_output_and_the_same_map():
    """capturing(observe=True): the forward equals an uncaptured one exactly; the map equals the
    one the capturing forward computes; plain timm Attention is hookable only for the duration."""
    torch.manual_seed(0)
    model = create_model(mixer="attention", **TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        plain = model(x)
        with capturing(model) as mods:
            model(x)
            manual = [m.last_map for m in mods]
        with capturing(model, observe=True) as mods:
            observed = model(x)
            maps = [m.last_map for m in mods]
    assert torch.equal(observed, plain)
    assert torch.equal(maps[0], manual[0])  # the same computation on the same input
    torch.testing.assert_close(maps[1], manual[1])  # its input came from the fused path here
    # a plain timm model (no make_hookable) and a mixer without attention, with strict=False
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16, num_classes=3)
    with pytest.raises(ValueError, match="mixer='attention'"):
        with capturing(vit):
            pass
    with torch.no_grad(), capturing(vit, observe=True, strict=False) as mods:
        vit(torch.randn(1, 3, 32, 32))
        assert all(m.last_map.shape == (1, 3, 5, 5) for m in mods)
    assert all(type(b.attn).__name__ == "Attention" and "last_map" not in vars(b.attn) for b in vit.blocks)
    pooling = create_model(mixer="pooling", **TINY)
    with capturing(pooling, strict=False) as mods:
        assert mods == [None, None]
