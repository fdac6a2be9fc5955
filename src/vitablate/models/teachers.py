"""Teachers for attention transfer: a pretext checkpoint, a saved timm state dict, or a timm model.

spec: `file:<path>` for a vitablate encoder.pt / model.pt (shape stored with it) or a plain
timm-compatible ViT state dict (shape read from the tensors), or `timm:<name>` for timm's
pretrained loading (needs internet or a local timm cache; never used by the tests).
Every teacher comes back hookable, in eval mode, with its classifier head removed.
"""

from __future__ import annotations

import math
import os
import re

import torch
from torch import nn

from .factory import create_model, make_hookable


def shape_from_state_dict(sd: dict, num_heads: int) -> dict:
    """create_model kwargs of a timm ViT state dict; heads cannot be read from weights, so they are given."""
    try:
        proj = sd["patch_embed.proj.weight"]  # (embed_dim, in_chans, p, p)
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        pos = sd["pos_embed"]  # (1, tokens, embed_dim)
    except (KeyError, ValueError) as e:
        raise ValueError(f"not a timm VisionTransformer state dict (missing {e}); expected keys such as "
                         "patch_embed.proj.weight, pos_embed, blocks.0.attn.qkv.weight") from None
    embed_dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    prefix = int("cls_token" in sd) + (sd["reg_token"].shape[1] if "reg_token" in sd else 0)
    grid = math.isqrt(pos.shape[1] - prefix)
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim if "blocks.0.mlp.fc1.weight" in sd else 4.0
    # timm ends a token-pooled ViT (MAE's and MoCo v3's released encoders) in `norm`, an avg-pooled one in `fc_norm`
    global_pool = "token" if "norm.weight" in sd and "fc_norm.weight" not in sd else "avg"
    # LayerScale (timm's ls1/ls2.gamma; SimMIM's ViT) is in the weights or not: its value comes from them
    init_values = 1.0 if "blocks.0.ls1.gamma" in sd else None
    return dict(img_size=grid * patch, patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                in_chans=in_chans, mlp_ratio=mlp_ratio, class_token="cls_token" in sd, global_pool=global_pool,
                init_values=init_values)


def load_teacher(spec: str, student_kwargs: dict) -> nn.Module:
    """The teacher named by `spec`, frozen in eval mode, as a headless hookable ViT."""
    if spec.startswith("timm:"):
        import timm

        try:
            model = timm.create_model(spec[5:], pretrained=True, num_classes=0)
        except Exception as e:
            raise RuntimeError(f"timm teacher {spec[5:]!r} could not be loaded ({type(e).__name__}: {e}); it needs "
                               "internet or a local HF cache; or save its state dict and use file:<path>") from e
        model = make_hookable(model)
    elif spec.startswith("file:"):
        path = spec[5:]
        if not os.path.exists(path):
            raise FileNotFoundError(f"teacher checkpoint {path} does not exist; build it first (a pretext run) "
                                    "or fix the path in transfer.teachers")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise RuntimeError(f"teacher checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                               "it is truncated or not a torch file: rebuild or replace it") from e
        if isinstance(state, dict) and "model_kwargs" in state:  # vitablate encoder.pt / model.pt
            kw, sd = dict(state["model_kwargs"]), state["model"]
        elif isinstance(state, dict):
            sd = state.get("state_dict", state.get("model", state))
            kw = shape_from_state_dict(sd, student_kwargs.get("num_heads", 12))
            kw = dict(student_kwargs, **kw)
        else:
            raise ValueError(f"teacher checkpoint {path} holds a {type(state).__name__}, not a state dict")
        kw.update(num_classes=0, mixer="attention")
        model = create_model(**kw)
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"teacher checkpoint {path} does not fit a ViT of shape {kw}: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
    else:
        raise ValueError(f"teacher {spec!r}: use file:<checkpoint> or timm:<model name>")
    model.eval().requires_grad_(False)
    return model
