"""Adapter for timm VisionTransformer models: token layout, input checks and an instrumented forward.

The engine never patches or hooks the user's model. It re-runs the model's own forward block by block, calling the
model's modules (patch_embed, _pos_embed, norms, qkv, proj, mlp, head) and computing only the attention core itself, so
that every method sees the attention logits, probabilities, values and per-block states it needs. Fused (SDPA) and
unfused timm models therefore give the same captures. The only state touched is `model.training`, restored on exit;
one lock per model serialises the sessions on it.
"""
from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitx_fast.engine.blocks import attention_output, block_tail


class UnsupportedModelError(ValueError):
    """The model (or its layout) cannot be served; the message names the reason."""


@dataclass(frozen=True)
class TokenLayout:
    """What the engine reads from the model.

    Token rows: `num_prefix_tokens` prefix rows (class token first when present, then distillation / register
    tokens), then `grid[0] * grid[1]` patch rows in row-major order.
    """

    num_prefix_tokens: int
    has_class_token: bool
    grid: tuple[int, int]
    embed_dim: int
    num_heads: int
    head_dim: int
    depth: int
    num_classes: int
    global_pool: str
    distilled: bool

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches


@dataclass
class AttentionRecord:
    """Tensors of one attention call, shapes with B batch, H heads, T tokens, d head dim, D = H*d.

    q, k, v: (B, H, T, d), q and k after q_norm / k_norm, q *not* scaled.
    logits: (B, H, T, T) pre-softmax scaled scores, or (B, H, 1, T) when only the CLS row was asked for.
    probs: (B, H, T, T) post-softmax attention (None when not kept).
    context: (B, T, D) heads merged, before `attn.norm` / gate / proj ("O" of the method docs).
    out: (B, T, D) output of attn.proj.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    logits: torch.Tensor | None
    probs: torch.Tensor | None
    context: torch.Tensor
    out: torch.Tensor


@dataclass
class BlockRecord:
    """States of one pre-norm block `y = x + ls1(attn(norm1(x)))`, `z = y + ls2(mlp(norm2(y)))`, all (B, T, D)."""

    x: torch.Tensor
    u: torch.Tensor
    attn: AttentionRecord
    y: torch.Tensor
    z: torch.Tensor
    extras: dict = field(default_factory=dict)


@dataclass
class ForwardRecord:
    tokens: torch.Tensor  # (B, T, D) input of block 0
    blocks: list[BlockRecord]
    final: torch.Tensor  # (B, T, D) after model.norm
    output: torch.Tensor  # (B, C) logits, or (B, D') pooled features of a headless model

    def detached(self) -> ForwardRecord:
        """A copy whose tensors are detached from the autograd graph (this record keeps its graph)."""
        blocks = []
        for b in self.blocks:
            a = copy.copy(b.attn)
            for n in ("q", "k", "v", "logits", "probs", "context", "out"):
                t = getattr(a, n)
                setattr(a, n, None if t is None else t.detach())
            blk = copy.copy(b)
            blk.attn = a
            for n in ("x", "u", "y", "z"):
                setattr(blk, n, getattr(b, n).detach())
            blocks.append(blk)
        return ForwardRecord(tokens=self.tokens.detach(), blocks=blocks, final=self.final.detach(),
                             output=self.output.detach())


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> RLock
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock that serialises explanations (`ViTAdapter.session`) on one model; re-entrant for nested sessions."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def _timm_types():
    from timm.layers import Attention, LayerScale
    from timm.models.vision_transformer import Block, VisionTransformer

    return VisionTransformer, Block, Attention, LayerScale


def _is_identity(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, nn.Identity)


class ViTAdapter:
    """Reads the layout of a timm VisionTransformer and runs its forward with the captures methods need.

    Supported: `timm.models.vision_transformer.VisionTransformer` and subclasses (DeiT distilled, register models,
    `no_embed_class`, `dynamic_img_size`) built from pre-norm `Block`s with the standard `Attention`; LayerScale,
    qk_norm, scale_norm, gated attention, fused or unfused attention; token, avg, max, map pooling; headless models.
    """

    def __init__(self, model: nn.Module):
        from vitx_fast.engine.architectures import resolve

        # Hugging Face ViT / DeiT / DINOv2 -> their timm twin; known unsupported architectures refused by name
        model = resolve(model)
        VisionTransformer, Block, Attention, _ = _timm_types()
        if not isinstance(model, nn.Module):
            raise UnsupportedModelError(f"expected a torch.nn.Module (a timm VisionTransformer), got "
                                        f"{type(model).__name__}")
        if not isinstance(model, VisionTransformer):
            raise UnsupportedModelError(
                f"unsupported model {type(model).__name__}: vitx_fast explains timm VisionTransformer models "
                "(timm.models.vision_transformer.VisionTransformer and its subclasses such as DeiT)"
            )
        for i, blk in enumerate(model.blocks):
            if type(blk) is not Block:
                raise UnsupportedModelError(
                    f"unsupported block type {type(blk).__name__} at blocks[{i}]: only timm's pre-norm "
                    "vision_transformer.Block is supported (not post-norm or parallel blocks)"
                )
            if type(blk.attn) is not Attention:
                raise UnsupportedModelError(
                    f"unsupported attention {type(blk.attn).__name__} at blocks[{i}].attn: only timm.layers.Attention "
                    "is supported (no RoPE / grouped-query attention)"
                )
        if len(model.blocks) == 0:
            raise UnsupportedModelError("the model has no transformer blocks")
        self.model = model
        attn0 = model.blocks[0].attn
        self.num_heads = attn0.num_heads
        self.head_dim = attn0.head_dim
        self.embed_dim = model.embed_dim
        self.depth = len(model.blocks)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.has_class_token = getattr(model, "cls_token", None) is not None
        self.distilled = hasattr(model, "head_dist")
        self.global_pool = "map" if getattr(model, "attn_pool", None) is not None else str(model.global_pool)
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)
        pe = model.patch_embed
        self.patch_size = tuple(pe.patch_size)
        self.in_chans = pe.proj.in_channels
        self.img_size = tuple(pe.img_size) if pe.img_size is not None else None
        self.default_grid = tuple(pe.grid_size) if pe.grid_size is not None else None

    # ------------------------------------------------------------------ layout and checks
    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_head(self) -> bool:
        return self.num_classes > 0

    @property
    def attention_is_plain(self) -> bool:
        """True when every attention is proj(softmax(qk)v) with no output norm and no gate."""
        return all(_is_identity(b.attn.norm) and getattr(b.attn, "gate", None) is None for b in self.model.blocks)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        pe = self.model.patch_embed
        ph, pw = self.patch_size
        if getattr(pe, "dynamic_img_pad", False):
            return (-(-height // ph), -(-width // pw))
        return (height // ph, width // pw)

    def layout(self, images: torch.Tensor | None = None) -> TokenLayout:
        grid = self.default_grid
        if images is not None:
            grid = self.grid_for(images.shape[-2], images.shape[-1])
        return TokenLayout(
            num_prefix_tokens=self.num_prefix_tokens,
            has_class_token=self.has_class_token,
            grid=tuple(grid),
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            depth=self.depth,
            num_classes=self.num_classes,
            global_pool=self.global_pool,
            distilled=self.distilled,
        )

    def check_parameters(self) -> None:
        """Refuse a model whose parameters and floating buffers are not on one device with one dtype, or hold no
        data (meta device). Nothing is computed."""
        tensors = [*self.model.named_parameters(), *((n, b) for n, b in self.model.named_buffers()
                                                     if b.is_floating_point())]
        devices = {t.device for _, t in tensors}
        if any(d.type == "meta" for d in devices):
            name = next(n for n, t in tensors if t.is_meta)
            raise ValueError(f"the model's parameters are on the meta device (shapes only, no data; e.g. {name}): "
                             "load its weights (e.g. model.to_empty(device='cpu') then load_state_dict) first")
        if len(devices) > 1:
            name, t = next((n, t) for n, t in tensors if t.device != self.device)
            raise ValueError(f"the model is on several devices ({', '.join(sorted(map(str, devices)))}; {name} is on "
                             f"{t.device}): move the whole model with model.to(device)")
        dtypes = {t.dtype for _, t in tensors}
        if len(dtypes) > 1:
            name, t = next((n, t) for n, t in tensors if t.dtype != self.dtype)
            raise ValueError(f"the model has parameters of several dtypes ({', '.join(sorted(map(str, dtypes)))}; "
                             f"{name} is {t.dtype}): convert the whole model with model.to(dtype)")

    def check_images(self, images) -> torch.Tensor:
        """Validate a (B, 3, H, W) batch on the model's device; return it in the model's dtype."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}")
        if images.device.type == "meta":
            raise ValueError("images are on the meta device (shapes only, no data); pass a tensor holding pixels")
        if images.device != self.device:
            raise ValueError(f"images are on device {images.device} but the model is on {self.device}; move them "
                             f"first: images.to({str(self.device)!r})")
        if images.dim() == 3:
            raise ValueError(
                f"images must have shape (B, C, H, W); got {tuple(images.shape)} (add a batch dimension: images[None])"
            )
        if images.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W); got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor normalised as the model expects, got dtype {images.dtype}")
        b, c, h, w = images.shape
        if b == 0:
            raise ValueError("images is an empty batch (B = 0)")
        if c != self.in_chans:
            raise ValueError(f"images have {c} channels but the model expects {self.in_chans} "
                             f"(shape {tuple(images.shape)})")
        pe = self.model.patch_embed
        ph, pw = self.patch_size
        dynamic = bool(getattr(self.model, "dynamic_img_size", False))
        if self.img_size is not None and getattr(pe, "strict_img_size", False) and not dynamic:
            if (h, w) != self.img_size:
                raise ValueError(
                    f"image size {h}x{w} does not match the model's input size {self.img_size[0]}x{self.img_size[1]} "
                    "(resize the images, or build the model with dynamic_img_size=True)"
                )
        elif not getattr(pe, "dynamic_img_pad", False) and (h % ph or w % pw):
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}")
        if not dynamic and self.img_size is not None and (h, w) != self.img_size:
            raise ValueError(
                f"image size {h}x{w} does not match the model's position embedding grid "
                f"({self.img_size[0]}x{self.img_size[1]} pixels); build the model with dynamic_img_size=True"
            )
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or inf values")
        return images.to(dtype=self.dtype)

    # ------------------------------------------------------------------ forward pieces
    @contextlib.contextmanager
    def session(self) -> Iterator[ViTAdapter]:
        """Eval mode for the duration of a call; the model's training flags are restored afterwards, also on error.
        Holds the model's lock (`model_lock`): concurrent sessions on one model run one after the other."""
        with model_lock(self.model):
            modes = [(m, m.training) for m in self.model.modules()]
            try:
                self.model.eval()
                yield self
            finally:
                for m, mode in modes:
                    m.training = mode

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, T, D): patch embedding, prefix tokens, position embedding, norm_pre."""
        m = self.model
        x = m.patch_embed(images)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        x = m.norm_pre(x)
        return x

    def attention(
        self,
        blk: nn.Module,
        u: torch.Tensor,
        *,
        keep_probs: bool = True,
        probs_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        context_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        index: int = 0,
        capture: str = "full",
    ) -> AttentionRecord:
        """timm Attention on u: (B, T, D), with the attention core computed explicitly (unfused).

        probs_hook / context_hook may replace the probabilities (B, H, T, T) or the merged context (B, T, D), e.g. by
        a tensor that requires grad, so that gradient methods can differentiate with respect to them.
        capture="cls" computes the output with fused SDPA and records only the CLS query's row: logits and probs are
        then (B, H, 1, T) (probs_hook does not apply).
        """
        attn = blk.attn
        B, T, _ = u.shape
        qkv = attn.qkv(u).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if capture == "cls":
            # fused SDPA for the output; only the CLS query's row of the scores is formed (exact, O(T*D))
            logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
            probs = logits.softmax(dim=-1)
            ctx = F.scaled_dot_product_attention(q, k, v, scale=attn.scale).transpose(1, 2).reshape(B, T, attn.attn_dim)
        else:
            logits = (q * attn.scale) @ k.transpose(-2, -1)
            probs = logits.softmax(dim=-1)
            probs = attn.attn_drop(probs)
            if probs_hook is not None:
                probs = probs_hook(index, probs)
            ctx = (probs @ v).transpose(1, 2).reshape(B, T, attn.attn_dim)
        if context_hook is not None:
            ctx = context_hook(index, ctx)
        out = attention_output(attn, ctx, u)
        return AttentionRecord(q=q, k=k, v=v, logits=logits, probs=probs if keep_probs else None, context=ctx, out=out)

    def block(
        self,
        index: int,
        x: torch.Tensor,
        *,
        detach_attn_input: bool = False,
        probs_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        context_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        capture: str = "full",
    ) -> BlockRecord:
        """One pre-norm block on x: (B, T, D)."""
        blk = self.model.blocks[index]
        u = blk.norm1(x)
        a_in = u.detach() if detach_attn_input else u
        rec = self.attention(blk, a_in, probs_hook=probs_hook, context_hook=context_hook, index=index,
                             capture=capture)
        y, z = block_tail(blk, x, rec.out)
        return BlockRecord(x=x, u=u, attn=rec, y=y, z=z)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """(B, T, D) output of the last block -> logits (B, C), or pooled features for a headless model."""
        return self.model.forward_head(self.model.norm(z))

    def forward(
        self,
        images: torch.Tensor,
        *,
        detach_attn_input: bool = False,
        probs_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        context_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        tokens_hook: Callable[[torch.Tensor], torch.Tensor] | None = None,
        capture: str = "full",
    ) -> ForwardRecord:
        """Full forward with per-block records. Hooks let a method swap in tensors that it differentiates."""
        x = self.embed(images)
        if tokens_hook is not None:
            x = tokens_hook(x)
        tokens = x
        blocks = []
        for i in range(self.depth):
            rec = self.block(i, x, detach_attn_input=detach_attn_input, probs_hook=probs_hook,
                             context_hook=context_hook, capture=capture)
            blocks.append(rec)
            x = rec.z
        final = self.model.norm(x)
        output = self.model.forward_head(final)
        return ForwardRecord(tokens=tokens, blocks=blocks, final=final, output=output)

    def run_from(self, start: int, x: torch.Tensor) -> torch.Tensor:
        """Blocks start..L-1 then the head, on x: (B, T, D); returns the head output."""
        for i in range(start, self.depth):
            x = self.block(i, x).z
        return self.head(x)

    def run_until(self, stop: int, images: torch.Tensor, native: bool = False) -> torch.Tensor:
        """Embedding and blocks 0..stop-1; returns the input of block `stop`, (B, T, D).

        native=True calls the blocks' own forward (fused SDPA where timm enables it): nothing is captured, and no
        T x T attention is materialised.
        """
        x = self.embed(images)
        for i in range(stop):
            x = self.model.blocks[i](x) if native else self.block(i, x).z
        return x

    def logits(self, images: torch.Tensor) -> torch.Tensor | None:
        """Logits of the unmodified model, (B, C); None for a headless model."""
        if not self.has_head:
            return None
        with torch.no_grad():
            return self.model(images)
