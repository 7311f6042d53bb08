"""Hugging Face `transformers` ViT, DeiT and DINOv2 models as timm VisionTransformer twins (docs/models.md).

The engine explains a timm VisionTransformer by re-running its modules block by block (engine/adapter.py). An HF
model of a served class is converted into a *twin*: a timm VisionTransformer with the same maths, which the adapter
then adapts like any timm model, so every method and every backend serves it with the same definitions.

- Layout from the config (image_size, patch_size, heads, layers, num_register_tokens), numbers from the modules
  (LayerNorm eps, exact or tanh GELU, layer scale): q/k/v are concatenated into timm's qkv; every other weight is a
  view of the HF parameter (no copy; the twin never writes it).
- Token rows as HF orders them: [CLS, distillation token (DeiT) | registers (DINOv2), patches]. The embedding is
  HF's own: ViT / DeiT add their position embeddings at the config's image_size only (HF's forward refuses other
  sizes unless called with interpolate_pos_encoding=True, which is not the forward the engine explains); DINOv2
  resamples them with HF's own `interpolate_pos_encoding` of the installed version (called on the twin's tensors),
  then inserts the registers, which carry no position embedding.
- Heads: ViT/DeiT classifier on CLS; DeiT with teacher = timm's distilled head, (cls + distillation logits) / 2;
  DeiTForImageClassification's distillation token is a prefix token no head reads (a register, for the engine);
  headless models output HF's pooler_output (dense + tanh for ViT/DeiT poolers, the final-normed CLS for DINOv2).
- The user's model is never modified, hooked or switched to eval. The twin is cached per model object and rebuilt
  when the model's parameters change (identity, in-place updates via `_version`, storage, dtype, device).
"""
from __future__ import annotations

import copy
import threading
import types
import weakref
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitx_fast.engine.adapter import UnsupportedModelError

# served class -> family; the classes must match exactly (a subclass may change the forward)
SERVED = {
    "ViTModel": "vit",
    "ViTForImageClassification": "vit",
    "DeiTModel": "deit",
    "DeiTForImageClassification": "deit",
    "DeiTForImageClassificationWithTeacher": "deit",
    "Dinov2Model": "dinov2",
    "Dinov2WithRegistersModel": "dinov2",
}
SERVED_NAMES = ", ".join(SERVED)

# HF classes / model types that are refused, with the reason
_REFUSED_CLASSES = {
    "Dinov2ForImageClassification":
        "its classifier reads concat(CLS, mean of the patch tokens) (2 x hidden_size inputs); the methods are "
        "defined for heads that read the class token (timm global_pool='token'), which cannot express that head. "
        "Explain the backbone `model.dinov2` (rollout, DAAM's SSL mode)",
    "Dinov2WithRegistersForImageClassification":
        "its classifier reads concat(CLS, mean of the patch tokens) (2 x hidden_size inputs); the methods are "
        "defined for heads that read the class token (timm global_pool='token'), which cannot express that head. "
        "Explain the backbone `model.dinov2_with_registers` (rollout, DAAM's SSL mode)",
    "ViTForMaskedImageModeling": "it outputs reconstructed pixels (a convolutional decoder), not class logits; "
                                 "explain `model.vit`",
    "DeiTForMaskedImageModeling": "it outputs reconstructed pixels (a convolutional decoder), not class logits; "
                                  "explain `model.deit`",
    "Dinov2Backbone": "a multi-stage feature-map backbone; explain Dinov2Model with the same weights",
    "Dinov2WithRegistersBackbone": "a multi-stage feature-map backbone; explain Dinov2WithRegistersModel",
}
_REFUSED_TYPES = {
    "swin": "Swin Transformer: attention inside shifted local windows with a relative position bias, and "
            "patch-merging stages; there is no global token-to-token attention over one patch grid, nor a class token",
    "swinv2": "Swin Transformer V2: windowed cosine attention with a continuous relative position bias and "
              "patch-merging stages; no global token-to-token attention over one patch grid",
    "beit": "BEiT: every attention adds a relative position bias to its logits, which the engine's attention core "
            "(softmax(q k^T * scale)) does not compute",
    "data2vec-vision": "Data2Vec vision (BEiT architecture): a relative position bias is added to every attention's "
                       "logits",
    "vit_mae": "ViT-MAE: its forward randomly masks (drops) patches; the encoder sees a random subset of tokens",
    "vit_hybrid": "hybrid ViT: the tokens come from a convolutional (BiT) backbone, not a linear patch projection",
    "dpt": "DPT: a dense-prediction model (a ViT or hybrid encoder with a convolutional decoder), not a classifier",
    "levit": "LeViT: a convolution-attention hybrid with shrinking stages and attention biases",
    "pvt": "PVT: spatial-reduction attention over downsampled keys, in shrinking stages",
    "pvt_v2": "PVT v2: spatial-reduction attention over downsampled keys, in shrinking stages",
    "hiera": "Hiera: mask-unit attention in shrinking stages",
}


def is_hf_model(model) -> bool:
    """True for a `transformers` model (checked without importing transformers)."""
    return isinstance(model, nn.Module) and any(c.__module__.startswith("transformers.")
                                                for c in type(model).__mro__)


def _hf_class(model) -> type | None:
    """The first transformers class in the model's MRO (the model's own class unless it is a user subclass)."""
    return next((c for c in type(model).__mro__ if c.__module__.startswith("transformers.")), None)


def refusal(model) -> str | None:
    """Why an HF model cannot be served (None when its class is served)."""
    cls = type(model)
    base = _hf_class(model)
    mtype = getattr(getattr(model, "config", None), "model_type", "?")
    what = f"Hugging Face {cls.__name__} (model_type {mtype!r})"
    if cls.__module__.startswith("transformers.") and cls.__name__ in SERVED:
        return None
    if base is not None and base.__name__ in SERVED:
        return (f"{what} subclasses {base.__name__}, and a subclass may change the forward the engine reproduces: "
                f"pass a {base.__name__} itself")
    if cls.__name__ in _REFUSED_CLASSES:
        return f"{what} is not supported: {_REFUSED_CLASSES[cls.__name__]}"
    if mtype in _REFUSED_TYPES:
        return f"{what} is not supported: {_REFUSED_TYPES[mtype]}"
    return (f"{what} is not supported: vitx_fast serves the Hugging Face classes {SERVED_NAMES} (and timm "
            "VisionTransformer models); others are not adapted")


# ---------------------------------------------------------------------------------------------- the twin
class _HFEmbedding:
    """The embedding of the HF model, in place of timm's `_pos_embed` (patch_embed outputs NHWC (B, h, w, D))."""

    hf_class: str = ""
    hf_family: str = ""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        B, gh, gw, D = x.shape
        x = x.reshape(B, gh * gw, D)
        ph, pw = self.patch_embed.patch_size
        if self.hf_family == "dinov2":
            e = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
            e = e + self._hf_position_embeddings(e, gh * ph, gw * pw)
            if self.reg_token is not None:  # registers after the position embedding: they carry none
                e = torch.cat([e[:, :1], self.reg_token.expand(B, -1, -1), e[:, 1:]], dim=1)
            return self.pos_drop(e)
        if (gh, gw) != tuple(self.patch_embed.grid_size):
            h, w = self.patch_embed.img_size
            raise ValueError(
                f"{self.hf_class} runs at its config image_size {h}x{w} only: Hugging Face adds ViT / DeiT position "
                f"embeddings unchanged (it resamples them only when forward is called with "
                f"interpolate_pos_encoding=True, which is not the forward vitx_fast explains); got an image of "
                f"{gh * ph}x{gw * pw} pixels: resize it to {h}x{w}")
        prefix = [self.cls_token.expand(B, -1, -1)]
        if getattr(self, "dist_token", None) is not None:
            prefix.append(self.dist_token.expand(B, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(B, -1, -1))
        return self.pos_drop(torch.cat(prefix + [x], dim=1) + self.pos_embed)

    def _hf_position_embeddings(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """HF's `interpolate_pos_encoding(embeddings, height, width)` of the installed transformers version, run on
        a stand-in for the HF embeddings module that holds the twin's position embeddings (1, 1 + N, D)."""
        proxy = types.SimpleNamespace(**self._hf_embedding_attrs)
        proxy.position_embeddings = torch.cat([self.cls_pos_embed, self.pos_embed], dim=1)
        try:
            return self._hf_interpolate(proxy, embeddings, height, width)
        except AttributeError as exc:  # a transformers version whose rule reads more of the module
            raise UnsupportedModelError(
                f"{self.hf_class}: this transformers version's interpolate_pos_encoding reads {exc}, which vitx_fast "
                "does not provide; run at the config image_size") from exc


def _twin_classes():
    from timm.models.deit import VisionTransformerDistilled as TimmDistilled
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    # named as timm's classes: the twin is that architecture (T-TAME's backbone identity records the class name, so
    # an explainer trained on the timm model serves the HF model with the same weights, and vice versa)
    class VisionTransformer(_HFEmbedding, TimmViT):
        """timm twin of a Hugging Face ViT / DeiT / DINOv2 model (vitx_fast.engine.hf)."""

    class VisionTransformerDistilled(_HFEmbedding, TimmDistilled):
        """timm twin of a Hugging Face DeiTForImageClassificationWithTeacher (vitx_fast.engine.hf)."""

    return VisionTransformer, VisionTransformerDistilled


_CLASSES: tuple | None = None


def _classes():
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _twin_classes()
    return _CLASSES


def _get(module: nn.Module, *paths: str):
    """The first attribute path that exists (names differ between transformers 4.x and 5.x)."""
    for path in paths:
        m = module
        for name in path.split("."):
            m = getattr(m, name, None)
            if m is None:
                break
        else:
            return m
    return None


def _require(cond: bool, what: str, reason: str) -> None:
    if not cond:
        raise UnsupportedModelError(f"{what} cannot be converted to a timm twin: {reason}")


def _activation(act: nn.Module) -> nn.Module:
    """The torch module with HF's activation maths (exact or tanh GELU get torch's GELU, which the explicit VJPs
    cover); any other activation is a copy of HF's own module (exact, explained through autograd)."""
    name = type(act).__name__
    fn = getattr(act, "act", None)
    if name == "GELUActivation" and fn is F.gelu:
        return nn.GELU()
    if name in ("GELUTanh", "PytorchGELUTanh") and isinstance(fn, partial) and fn.func is F.gelu:
        return nn.GELU(approximate="tanh")
    if name == "NewGELUActivation":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): torch's tanh GELU
        return nn.GELU(approximate="tanh")
    if name == "SiLUActivation":
        return nn.SiLU()
    return copy.deepcopy(act)


def _parameter(t: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    return nn.Parameter(t.detach(), requires_grad=requires_grad)


def _assign(module: nn.Module, name: str, t: torch.Tensor, what: str, requires_grad: bool | None = None) -> None:
    """module.name := a parameter viewing t (shapes checked against the twin's)."""
    old = getattr(module, name)
    _require(old is not None and tuple(old.shape) == tuple(t.shape), what,
             f"{name} has shape {tuple(t.shape)}, the twin expects {None if old is None else tuple(old.shape)}")
    setattr(module, name, _parameter(t, t.requires_grad if requires_grad is None else requires_grad))


def _copy_linear(dst: nn.Module, src: nn.Module, what: str) -> None:
    _require(type(src) is nn.Linear, what, f"{type(src).__name__} is not torch.nn.Linear (merge adapters first)")
    _assign(dst, "weight", src.weight, what)
    _require((dst.bias is None) == (src.bias is None), what, "bias presence differs")
    if src.bias is not None:
        _assign(dst, "bias", src.bias, what)


def _copy_layernorm(dst: nn.Module, src: nn.Module, what: str) -> None:
    _require(type(src) is nn.LayerNorm and src.elementwise_affine, what,
             f"{type(src).__name__} is not an affine torch.nn.LayerNorm")
    _assign(dst, "weight", src.weight, what)
    _assign(dst, "bias", src.bias, what)
    dst.eps = src.eps


def _fused(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    if all(p is None for p in parts):
        return None
    return torch.cat([p.detach() for p in parts], dim=0)


def build_twin(model: nn.Module) -> nn.Module:
    """A timm VisionTransformer with the maths of the HF model (see the module docstring). Raises
    UnsupportedModelError for what cannot be converted."""
    reason = refusal(model)
    if reason:
        raise UnsupportedModelError(reason)
    cls_name = type(model).__name__
    family = SERVED[cls_name]
    cfg = model.config
    backbone = getattr(model, family, None) if family in ("vit", "deit") else None
    backbone = model if backbone is None else backbone
    emb = backbone.embeddings
    layers = _get(backbone, "layers", "encoder.layer")
    final_norm = backbone.layernorm
    what = f"Hugging Face {cls_name}"

    params = [p for p in model.parameters() if p.is_floating_point()]
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    _require(len(dtypes) == 1 and len(devices) == 1, what,
             f"its parameters mix dtypes {sorted(map(str, dtypes))} or devices {sorted(map(str, devices))}")
    dtype, device = dtypes.pop(), devices.pop()
    _require(device.type != "meta", what, "its parameters are on the meta device (load the weights first)")

    pe = emb.patch_embeddings
    proj = pe.projection
    _require(type(proj) is nn.Conv2d, what, "the patch projection is not a Conv2d")
    patch = tuple(proj.kernel_size)
    _require(tuple(proj.stride) == patch and tuple(proj.padding) == (0, 0), what,
             "the patch projection is not a stride = kernel, unpadded convolution")
    img = tuple(pe.image_size)
    D = proj.out_channels
    H = int(cfg.num_attention_heads)
    L = len(layers)
    _require(L > 0, what, "it has no layers")
    layer0 = layers[0]
    q0 = _get(layer0, "attention.q_proj", "attention.attention.query")
    _require(q0 is not None and q0.out_features == D and D % H == 0, what,
             f"attention width {getattr(q0, 'out_features', None)} must equal hidden_size {D}, divisible by "
             f"num_attention_heads {H}")
    swiglu = _get(layer0, "mlp.gate_proj", "mlp.weights_in") is not None
    if swiglu:
        gate = _get(layer0, "mlp.gate_proj")
        hidden = 2 * gate.out_features if gate is not None else _get(layer0, "mlp.weights_in").out_features
    else:
        hidden = _get(layer0, "mlp.fc1", "intermediate.dense").out_features
    layer_scale = _get(layer0, "layer_scale1.lambda1") is not None
    registers = int(getattr(cfg, "num_register_tokens", 0) or 0) if family == "dinov2" else 0
    if family == "deit" and cls_name != "DeiTForImageClassificationWithTeacher":
        registers = 1  # the distillation token: a prefix token that no head of this class reads

    distilled = cls_name == "DeiTForImageClassificationWithTeacher"
    head = None
    if family == "vit" or family == "deit":
        head = _get(model, "classifier", "cls_classifier")
    num_classes = head.out_features if isinstance(head, nn.Linear) else 0
    _require(head is None or isinstance(head, (nn.Linear, nn.Identity)), what,
             f"the classifier is {type(head).__name__}, not a Linear layer")
    if distilled:
        dist_head = model.distillation_classifier
        _require(type(dist_head) is type(head), what, "the class and distillation classifiers differ in type")
    if family == "dinov2":
        grid = (img[0] // patch[0], img[1] // patch[1])
        _require(grid[0] == grid[1], what, f"its config image_size {img[0]}x{img[1]} is not square: HF's DINOv2 "
                                           "position-embedding interpolation assumes a square grid")
        _require(callable(getattr(type(emb), "interpolate_pos_encoding", None)), what,
                 "its embeddings have no interpolate_pos_encoding")

    Twin, TwinDistilled = _classes()
    kwargs = dict(
        img_size=img, patch_size=patch, in_chans=proj.in_channels, num_classes=num_classes, global_pool="token",
        embed_dim=D, depth=L, num_heads=H, mlp_ratio=(hidden + 0.5) / D,
        qkv_bias=q0.bias is not None, init_values=1.0 if layer_scale else None, class_token=True,
        no_embed_class=family == "dinov2", reg_tokens=registers, dynamic_img_size=True, weight_init="skip",
        device="meta", dtype=dtype,
    )
    if swiglu:
        from timm.layers import SwiGLUPacked

        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    twin = (TwinDistilled if distilled else Twin)(**kwargs)
    twin.hf_class, twin.hf_family = cls_name, family
    if getattr(cfg, "_attn_implementation", None) == "eager":  # the model's own forward (logits) unfused, as HF's
        for blk in twin.blocks:
            blk.attn.fused_attn = False

    # embeddings
    _assign(twin.patch_embed.proj, "weight", proj.weight, what)
    _require(proj.bias is not None, what, "the patch projection has no bias")
    _assign(twin.patch_embed.proj, "bias", proj.bias, what)
    _assign(twin, "cls_token", emb.cls_token, what)
    pos = emb.position_embeddings
    if family == "dinov2":
        _assign(twin, "pos_embed", pos[:, 1:], what, pos.requires_grad)
        twin.cls_pos_embed = _parameter(pos[:, :1], pos.requires_grad)
        if registers:
            _assign(twin, "reg_token", emb.register_tokens, what)
        twin._hf_interpolate = type(emb).interpolate_pos_encoding
        attrs = {k: v for k, v in vars(emb).items()
                 if not k.startswith("_") and not isinstance(v, (nn.Module, torch.Tensor))}
        attrs["patch_embeddings"] = types.SimpleNamespace(
            **{k: v for k, v in vars(pe).items() if not k.startswith("_") and not isinstance(v, (nn.Module,
                                                                                                 torch.Tensor))})
        attrs["training"] = False
        twin._hf_embedding_attrs = attrs
    else:
        _assign(twin, "pos_embed", pos, what)
        if distilled:
            _assign(twin, "dist_token", emb.distillation_token, what)
        elif registers:
            _assign(twin, "reg_token", emb.distillation_token, what)

    # blocks
    for i, (layer, blk) in enumerate(zip(layers, twin.blocks, strict=True)):
        w = f"{what} layer {i}"
        _copy_layernorm(blk.norm1, _get(layer, "layernorm_before", "norm1"), w)
        _copy_layernorm(blk.norm2, _get(layer, "layernorm_after", "norm2"), w)
        qkv = [_get(layer, f"attention.{a}_proj", f"attention.attention.{b}")
               for a, b in (("q", "query"), ("k", "key"), ("v", "value"))]
        for m in qkv:
            _require(type(m) is nn.Linear, w, f"the attention projection {type(m).__name__} is not torch.nn.Linear")
        _require(len({m.bias is None for m in qkv}) == 1, w, "q, k and v differ in having a bias")
        rg = any(m.weight.requires_grad for m in qkv)
        blk.attn.qkv.weight = _parameter(_fused([m.weight for m in qkv]), rg)
        if qkv[0].bias is not None:
            blk.attn.qkv.bias = _parameter(_fused([m.bias for m in qkv]), rg)
        scaling = _get(layer, "attention.scaling", "attention.attention.scaling")
        _require(scaling is None or abs(float(scaling) - blk.attn.scale) <= 1e-12 * blk.attn.scale, w,
                 f"attention scaling {scaling} is not head_dim ** -0.5")
        _copy_linear(blk.attn.proj, _get(layer, "attention.o_proj", "attention.output.dense"), w)
        if layer_scale:
            _assign(blk.ls1, "gamma", layer.layer_scale1.lambda1, w)
            _assign(blk.ls2, "gamma", layer.layer_scale2.lambda1, w)
        if swiglu:
            gate, up = _get(layer, "mlp.gate_proj"), _get(layer, "mlp.up_proj")
            if gate is not None:  # transformers 5: silu(gate(x)) * up(x) = timm's packed fc1 [gate; up]
                rg = gate.weight.requires_grad or up.weight.requires_grad
                blk.mlp.fc1.weight = _parameter(_fused([gate.weight, up.weight]), rg)
                blk.mlp.fc1.bias = _parameter(_fused([gate.bias, up.bias]), rg)
            else:  # transformers 4: weights_in -> chunk(2) -> silu(x1) * x2
                _copy_linear(blk.mlp.fc1, layer.mlp.weights_in, w)
            _copy_linear(blk.mlp.fc2, _get(layer, "mlp.down_proj", "mlp.weights_out"), w)
        else:
            _copy_linear(blk.mlp.fc1, _get(layer, "mlp.fc1", "intermediate.dense"), w)
            _copy_linear(blk.mlp.fc2, _get(layer, "mlp.fc2", "output.dense"), w)
            act = _get(layer, "mlp.activation_fn", "mlp.activation", "intermediate.intermediate_act_fn")
            _require(isinstance(act, nn.Module), w, "its MLP activation is not a module")
            blk.mlp.act = _activation(act)
    _copy_layernorm(twin.norm, final_norm, what)

    # heads
    if isinstance(head, nn.Linear):
        _copy_linear(twin.head, head, what)
        if distilled:
            _copy_linear(twin.head_dist, model.distillation_classifier, what)
    elif family in ("vit", "deit") and getattr(backbone, "pooler", None) is not None:
        pooler = backbone.pooler  # headless: the output is HF's pooler_output, act(dense(CLS))
        dense = nn.Linear(pooler.dense.in_features, pooler.dense.out_features, device="meta", dtype=dtype)
        _copy_linear(dense, pooler.dense, what)
        twin.head = nn.Sequential(dense, _activation(pooler.activation))

    left = [n for n, t in list(twin.named_parameters()) + list(twin.named_buffers()) if t.device.type == "meta"]
    _require(not left, what, f"internal: the twin has unconverted tensors {left}")
    return twin.eval()


# ---------------------------------------------------------------------------------------------- cache
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # HF model -> (state, twin)
_LOCK = threading.Lock()


def _state(model: nn.Module) -> list[tuple]:
    """What the twin depends on: each parameter's identity (a weak reference: a replaced module is noticed even when
    a new tensor reuses an id), in-place version, storage, dtype, device, shape and requires_grad."""
    return [(weakref.ref(p), p._version, p.data_ptr(), p.dtype, p.device, tuple(p.shape), p.requires_grad)
            for p in model.parameters()]


def _same(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(x[0]() is not None and x[0]() is y[0]() and x[1:] == y[1:]
                                    for x, y in zip(a, b, strict=True))


def timm_twin(model: nn.Module) -> nn.Module:
    """The cached timm twin of an HF model, rebuilt when the model's parameters changed."""
    state = _state(model)
    with _LOCK:
        hit = _CACHE.get(model)
        if hit is not None and _same(hit[0], state):
            return hit[1]
        twin = build_twin(model)
        _CACHE[model] = (state, twin)
        return twin
