"""Which module the adapter adapts: a timm VisionTransformer as given, a Hugging Face ViT / DeiT / DINOv2 model as
its timm twin (engine/hf.py), and a refusal naming the architecture and the reason for models the engine cannot serve
(docs/models.md).

The engine re-runs one thing: pre-norm blocks of global multi-head self-attention, softmax(q k^T * scale) v, over one
token sequence [prefix tokens, a fixed grid of linearly projected image patches]. Architectures whose attention adds
terms to the logits (relative position bias, RoPE), attends inside windows or over downsampled keys, builds the tokens
with a CNN, or has no attention at all are refused before any tensor is touched.
"""
from __future__ import annotations

import torch.nn as nn

from vitx_fast.engine import hf
from vitx_fast.engine.adapter import UnsupportedModelError

_WINDOWED = ("attention inside (shifted) local windows with a relative position bias, and patch-merging stages: "
             "there is no global token-to-token attention over one patch grid, nor a class token")
_STAGES = "shrinking stages"
# timm module (timm.models.<name>) -> (architecture, why the engine cannot re-run it)
TIMM_FAMILIES = {
    "swin_transformer": ("Swin Transformer", _WINDOWED),
    "swin_transformer_v2": ("Swin Transformer V2", _WINDOWED),
    "swin_transformer_v2_cr": ("Swin Transformer V2 (CR)", _WINDOWED),
    "eva": ("EVA / RoPE ViT", "its EvaAttention is not timm's Attention the engine re-runs{rope}"),
    "beit": ("BEiT", "every attention adds a learned relative position bias to its logits, which the engine's "
                     "attention core softmax(q k^T * scale) does not compute"),
    "vision_transformer_relpos": ("ViT with relative position bias", "every attention adds a relative position "
                                  "bias to its logits (RelPosAttention)"),
    "vision_transformer_sam": ("SAM ViT", "windowed attention with decomposed relative positions, no class token "
                                          "and a convolutional neck"),
    "cait": ("CaiT", "talking-heads attention mixes heads before and after the softmax, and the class token only "
                     "enters in the last class-attention blocks"),
    "xcit": ("XCiT", "cross-covariance attention attends over channels, not tokens: there is no token-to-token "
                     "attention matrix"),
    "convit": ("ConViT", "gated positional self-attention mixes a positional attention map into the content "
                         "attention"),
    "crossvit": ("CrossViT", "two token branches at two patch sizes exchange information by cross-attention: there "
                             "is not one patch grid"),
    "levit": ("LeViT", f"a convolution-attention hybrid with attention biases and {_STAGES}"),
    "pvt_v2": ("PVT v2", f"spatial-reduction attention over downsampled keys, in {_STAGES}"),
    "twins": ("Twins", f"locally-grouped and sub-sampled attention, in {_STAGES}"),
    "mvitv2": ("MViTv2", f"pooling attention with relative positions, in {_STAGES}"),
    "hiera": ("Hiera", f"mask-unit attention in {_STAGES}"),
    "maxxvit": ("MaxViT / CoAtNet", "convolutional stages with block- and grid-windowed attention"),
    "tnt": ("TNT", "an inner (pixel) and an outer (patch) transformer"),
    "pit": ("PiT", f"pooling layers between {_STAGES}"),
    "volo": ("VOLO", "outlook attention over local windows"),
    "naflexvit": ("NaFlexViT", "variable-resolution patch sequences with padding masks: no fixed patch "
                               "embedding grid for the maps"),
    "davit": ("DaViT", f"window and channel attention in {_STAGES}"),
    "focalnet": ("FocalNet", "focal modulation instead of self-attention"),
    "gcvit": ("GC ViT", f"windowed global-context attention in {_STAGES}"),
    "mlp_mixer": ("MLP-Mixer", "token-mixing MLPs instead of self-attention"),
}


def _attention_modules(model: nn.Module) -> bool:
    return any(isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__ or "Attn" in type(m).__name__
               for m in model.modules())


def _named(model: nn.Module) -> str:
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    return f"{type(model).__name__}" + (f" ({arch})" if arch else "")


def timm_refusal(model: nn.Module) -> str | None:
    """Why a timm model (or any non-HF module) cannot be served; None to let the adapter's own checks run."""
    from timm.models.vision_transformer import VisionTransformer

    module = type(model).__module__
    if isinstance(model, VisionTransformer):
        pe = getattr(model, "patch_embed", None)
        backbone = getattr(pe, "backbone", None)
        if backbone is not None:
            proj = getattr(pe, "proj", None)
            tok = (f"; its proj ({type(proj).__name__} {proj.in_channels} -> {proj.out_channels} channels) "
                   "tokenises that feature map" if isinstance(proj, nn.Conv2d) else "")
            return (f"unsupported model {_named(model)}: a hybrid ViT. Its patch embedding is {type(pe).__name__}: a "
                    f"convolutional backbone ({type(backbone).__name__}) computes a feature map from the image{tok}. "
                    "A token is then not one image patch (its receptive field spans many), and the maps' grid, the "
                    "patch size and the input checks the methods rely on describe the CNN's feature map, not the "
                    "image: only ViTs whose tokens are linear projections of image patches are served")
        proj = getattr(pe, "proj", None)
        if pe is not None and not isinstance(proj, nn.Conv2d):
            return (f"unsupported model {_named(model)}: its patch embedding {type(pe).__name__} has no Conv2d "
                    f"projection of image patches (proj is {type(proj).__name__})")
        return None
    if not module.startswith("timm."):
        return None  # a user's module: the adapter's generic refusal names its class
    family = module.rsplit(".", 1)[-1]
    if family in TIMM_FAMILIES:
        arch, reason = TIMM_FAMILIES[family]
        rope = getattr(model, "rope", None) is not None
        reason = reason.format(rope=": it rotates q and k with rotary position embeddings (RoPE) in every block"
                                    if rope else ": separate q / v biases and optional sub-norms and SwiGLU MLPs")
        return f"unsupported model {_named(model)}: {arch}: {reason}"
    if not _attention_modules(model):
        return (f"unsupported model {_named(model)} (timm {family}): a network without self-attention "
                "(convolutional or MLP); the methods explain the attention of a Vision Transformer")
    return (f"unsupported model {_named(model)} (timm {family}): a transformer whose layers are not timm's "
            "VisionTransformer blocks (one global multi-head self-attention over [prefix tokens, a fixed patch grid]), "
            "which is what the engine re-runs")


def resolve(model):
    """The module ViTAdapter adapts: the HF model's timm twin, or the model itself. Raises UnsupportedModelError
    naming the architecture and the reason for a model the engine cannot serve."""
    if hf.is_hf_model(model):
        return hf.timm_twin(model)
    if isinstance(model, nn.Module):
        reason = timm_refusal(model)
        if reason:
            raise UnsupportedModelError(reason)
    return model
