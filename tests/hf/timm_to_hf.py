"""Hugging Face twins of the tiny timm test ViTs, written timm -> HF and independently of vitx_fast.engine.hf.

Each family is one timm layout (tests/utils.make_vit, float64, re-drawn weights) and the HF class with the same maths;
`hf_from_timm` builds the HF model from its config and fills every HF state-dict entry from the timm weights (q, k, v
are slices of timm's fused qkv). Keys are written in transformers 5 names and renamed for transformers 4.
"""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn as nn
from timm.layers import SwiGLUPacked
from utils import make_vit

transformers = pytest.importorskip("transformers")

D, L, H = 32, 3, 4  # tests/utils.BASE: hidden 32, 3 blocks, 4 heads, 32 px images, patch 8

# family -> (HF class, timm layout, make_vit overrides)
FAMILIES = {
    "vit": ("ViTForImageClassification", "plain", dict(norm_layer=partial(nn.LayerNorm, eps=1e-12))),
    "deit_distilled": ("DeiTForImageClassificationWithTeacher", "distilled", {}),
    "deit": ("DeiTForImageClassification", "plain", dict(reg_tokens=1)),  # the distillation token no head reads
    "dinov2_registers": ("Dinov2WithRegistersModel", "plain",
                         dict(reg_tokens=4, no_embed_class=True, init_values=0.5, num_classes=0)),
    "dinov2": ("Dinov2Model", "plain", dict(init_values=0.5, num_classes=0)),
    "dinov2_swiglu": ("Dinov2Model", "plain", dict(init_values=0.5, num_classes=0, mlp_ratio=5.5,
                                                   mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)),
}


def timm_model(family: str, dtype=torch.float64, seed: int = 0, fused: bool = False) -> nn.Module:
    """fused: timm's SDPA attention in the model's own forward, as HF's default (sdpa) attention."""
    _, layout, kw = FAMILIES[family]
    return make_vit(layout, dtype=dtype, seed=seed, fused=fused, **kw)


def hf_class(name: str) -> type:
    """A transformers class; a visible skip on a transformers version that predates it (DINOv2 with registers)."""
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls


def _config(family: str, tm: nn.Module, **overrides):
    eps = tm.norm.eps
    common = dict(hidden_size=D, num_hidden_layers=len(tm.blocks), num_attention_heads=H, image_size=32, patch_size=8,
                  num_channels=3, qkv_bias=True, layer_norm_eps=eps, hidden_act="gelu", hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    common.update(overrides)
    if family.startswith("dinov2"):
        swiglu = family == "dinov2_swiglu"
        common.update(mlp_ratio=4 if swiglu else 2, layerscale_value=1.0, use_swiglu_ffn=swiglu,
                      drop_path_rate=0.0)
        if family == "dinov2_registers":
            return hf_class("Dinov2WithRegistersConfig")(num_register_tokens=tm.num_reg_tokens, **common)
        return transformers.Dinov2Config(**common)
    common.update(intermediate_size=tm.blocks[0].mlp.fc1.out_features, num_labels=tm.num_classes)
    return (transformers.DeiTConfig if family.startswith("deit") else transformers.ViTConfig)(**common)


def _hf_state(family: str, tm: nn.Module, g: torch.Generator) -> dict[str, torch.Tensor]:
    """HF state-dict entries (transformers 5 names) from the timm weights."""
    t = tm.state_dict()
    dino = family.startswith("dinov2")
    p = {"vit": "vit.", "deit": "deit.", "deit_distilled": "deit."}.get(family, "")
    out = {f"{p}embeddings.cls_token": t["cls_token"],
           f"{p}embeddings.patch_embeddings.projection.weight": t["patch_embed.proj.weight"],
           f"{p}embeddings.patch_embeddings.projection.bias": t["patch_embed.proj.bias"],
           f"{p}layernorm.weight": t["norm.weight"], f"{p}layernorm.bias": t["norm.bias"]}
    if family == "dinov2_registers":
        # timm (no_embed_class) gives the class token no position embedding; HF adds position_embeddings[:, 0] to
        # it. Split the timm class token into HF's cls_token + a random class position (equal up to rounding).
        r = 0.3 * torch.randn(t["cls_token"].shape, generator=g, dtype=t["cls_token"].dtype)
        out[f"{p}embeddings.cls_token"] = t["cls_token"] - r
        out[f"{p}embeddings.position_embeddings"] = torch.cat([r, t["pos_embed"]], dim=1)
        out[f"{p}embeddings.register_tokens"] = t["reg_token"]
    else:
        out[f"{p}embeddings.position_embeddings"] = t["pos_embed"]
    if family == "deit_distilled":
        out[f"{p}embeddings.distillation_token"] = t["dist_token"]
    if family == "deit":
        out[f"{p}embeddings.distillation_token"] = t["reg_token"]
    layers = "encoder.layer" if dino else "layers"
    for i in range(len(tm.blocks)):
        b, h = f"blocks.{i}.", f"{p}{layers}.{i}."
        for j, n in enumerate("qkv"):
            out[f"{h}attention.{n}_proj.weight"] = t[b + "attn.qkv.weight"][j * D:(j + 1) * D]
            out[f"{h}attention.{n}_proj.bias"] = t[b + "attn.qkv.bias"][j * D:(j + 1) * D]
        out[f"{h}attention.o_proj.weight"] = t[b + "attn.proj.weight"]
        out[f"{h}attention.o_proj.bias"] = t[b + "attn.proj.bias"]
        n1, n2 = ("norm1", "norm2") if dino else ("layernorm_before", "layernorm_after")
        for src, dst in (("norm1", n1), ("norm2", n2)):
            out[f"{h}{dst}.weight"], out[f"{h}{dst}.bias"] = t[b + src + ".weight"], t[b + src + ".bias"]
        if family == "dinov2_swiglu":  # timm SwiGLUPacked: silu(fc1[:half]) * fc1[half:]
            w, bias = t[b + "mlp.fc1.weight"], t[b + "mlp.fc1.bias"]
            half = w.shape[0] // 2
            out[f"{h}mlp.gate_proj.weight"], out[f"{h}mlp.up_proj.weight"] = w[:half], w[half:]
            out[f"{h}mlp.gate_proj.bias"], out[f"{h}mlp.up_proj.bias"] = bias[:half], bias[half:]
            out[f"{h}mlp.down_proj.weight"], out[f"{h}mlp.down_proj.bias"] = t[b + "mlp.fc2.weight"], \
                t[b + "mlp.fc2.bias"]
        else:
            for n in ("fc1", "fc2"):
                out[f"{h}mlp.{n}.weight"], out[f"{h}mlp.{n}.bias"] = t[b + f"mlp.{n}.weight"], t[b + f"mlp.{n}.bias"]
        if dino:
            out[f"{h}layer_scale1.lambda1"] = t[b + "ls1.gamma"]
            out[f"{h}layer_scale2.lambda1"] = t[b + "ls2.gamma"]
    if family == "deit_distilled":
        for src, dst in (("head", "cls_classifier"), ("head_dist", "distillation_classifier")):
            out[f"{dst}.weight"], out[f"{dst}.bias"] = t[src + ".weight"], t[src + ".bias"]
    elif not dino:
        out["classifier.weight"], out["classifier.bias"] = t["head.weight"], t["head.bias"]
    return out


_V4 = [(".layers.", ".encoder.layer."), ("attention.q_proj", "attention.attention.query"),
       ("attention.k_proj", "attention.attention.key"), ("attention.v_proj", "attention.attention.value"),
       ("attention.o_proj", "attention.output.dense"), ("mlp.gate_proj", "mlp.weights_in"),
       ("mlp.down_proj", "mlp.weights_out")]


def _rename_v4(state: dict, keys: set[str]) -> dict:
    """transformers 4 names (encoder.layer, attention.attention.query, intermediate.dense, ...) where the model
    uses them."""
    out = {}
    for k, v in state.items():
        if k not in keys:
            k = "." + k
            for a, b in _V4:
                k = k.replace(a, b)
            k = k[1:]
            if k not in keys and ".mlp.fc1." in k:
                k = k.replace(".mlp.fc1.", ".intermediate.dense.")
            if k not in keys and ".mlp.fc2." in k:
                k = k.replace(".mlp.fc2.", ".output.dense.")
        out[k] = v
    return out


def hf_from_timm(family: str, tm: nn.Module, seed: int = 0, **config) -> nn.Module:
    """The HF model of `family` with the weights of the timm model `tm` (its dtype), in eval mode; config: HF config
    overrides (hidden_act, ...)."""
    cls = hf_class(FAMILIES[family][0])
    dtype = next(tm.parameters()).dtype
    model = cls(_config(family, tm, **config)).to(dtype)
    state = _hf_state(family, tm, torch.Generator().manual_seed(seed + 7))
    keys = set(model.state_dict())
    state = _rename_v4(state, keys)
    if family == "dinov2_swiglu" and not any("gate_proj" in k for k in keys):  # transformers 4: packed weights_in
        state = _pack_weights_in(state)
    model.load_state_dict(state, strict=False)
    missing = keys - set(state) - {k for k in keys if k.endswith("mask_token")}
    assert not missing and not set(state) - keys, (sorted(missing), sorted(set(state) - keys))
    return model.eval()


def _pack_weights_in(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        if ".mlp.weights_in." in k or ".mlp.up_proj." in k:
            continue
        out[k] = v
    for k in [k for k in state if ".mlp.weights_in." in k]:
        out[k] = torch.cat([state[k], state[k.replace("weights_in", "up_proj")]], dim=0)
    return out


def images(batch: int, size=(32, 32), seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randn(batch, 3, *size, generator=g).to(dtype)

