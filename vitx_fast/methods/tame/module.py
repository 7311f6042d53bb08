"""T-TAME attention mechanism for timm ViTs (docs/methods/tame.md §1).

Features: the norm1 outputs of chosen blocks (default: the last three), prefix rows dropped, patch rows reshaped
row-major to the model's (h, w) grid. Per branch l: H_l = ReLU(BN_l(Conv1x1_l(F_l)) + F_l); bilinear resize to
(min(h, 56), min(w, 56)); c = Conv1x1_fuse(concat_l H_l); a = sigmoid(c) (training only).

Two evaluation paths that agree: `TAMEExplainer.forward` (the reference, NCHW modules as the authors' AttentionTAME)
and `fast_scores` (eval BN folded into the branch weights, GEMMs on the token matrix, split-K fuser restricted to the
requested class rows, no concat, no NCHW copy of the features).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitx_fast.engine.blocks import block_tail

MAX_SIDE = 56  # the reference caps the AM resolution at 56 (a CNN's conv2 stage); identity for ViT grids <= 56


class AttentionTAME(nn.Module):
    """The authors' AM: `convs.i`, `bns.i`, `fuser` (state-dict keys as `generic.attn_mech.1.*` of the reference).

    dims: channels of each feature branch (D_l); num_classes: rows of the fuser.
    """

    def __init__(self, dims: list[int], num_classes: int):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(d, d, kernel_size=1, padding=0, bias=True) for d in dims])
        self.bns = nn.ModuleList([nn.BatchNorm2d(d) for d in dims])
        self.relu = nn.ReLU()
        self.fuser = nn.Conv2d(sum(dims), num_classes, kernel_size=1, padding=0, bias=True)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """features: L x (B, D_l, h, w) -> a, c: (B, C, h', w') with (h', w') = (min(h, 56), min(w, 56))."""
        h, w = features[0].shape[-2:]
        size = (min(h, MAX_SIDE), min(w, MAX_SIDE))
        maps = [bn(conv(f)) for conv, bn, f in zip(self.convs, self.bns, features, strict=True)]
        maps = [self.relu(m + f) for m, f in zip(maps, features, strict=True)]  # skip connection, then ReLU
        maps = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
        c = self.fuser(torch.cat(maps, 1))
        return torch.sigmoid(c), c


def tokens_to_grid(tokens: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, P + h*w, D) token rows -> (B, D, h, w): prefix rows dropped, patch rows row-major (the reference adapter)."""
    B, T, D = tokens.shape
    h, w = grid
    if num_prefix + h * w != T:
        raise ValueError(f"token count {T} != {num_prefix} prefix + {h}x{w} patches")
    return tokens[:, num_prefix:].reshape(B, h, w, D).permute(0, 3, 1, 2)


def capture_features(adapter, images: torch.Tensor, layers: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One native backbone pass -> ([norm1 output (B, T, D) of each block in `layers`], logits (B, C)).

    The blocks run exactly as timm's `Block.forward` (fused attention where enabled); the norm1 output of a feature
    block is computed once and both kept and fed to its attention.
    """
    model = adapter.model
    wanted = set(layers)
    x = adapter.embed(images)
    feats = {}
    for i, blk in enumerate(model.blocks):
        if i in wanted:
            u = blk.norm1(x)
            feats[i] = u
            _, x = block_tail(blk, x, blk.attn(u))
        else:
            x = blk(x)
    return [feats[i] for i in layers], adapter.head(x)


def reference_features(adapter, images: torch.Tensor, layers: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The same through the adapter's instrumented forward: `adapter.block(i, x).u` is norm1's output."""
    rec = adapter.forward(images)
    return [rec.blocks[i].u for i in layers], rec.output


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval BN folded into the 1x1 conv: W' = diag(g / sqrt(var + eps)) W, b' = g (b - mu) / sqrt(var + eps) + beta.

    Returns W' (D_out, D_in), b' (D_out,) in `dtype` / on `device` (default: the conv's).
    """
    kw = dict(dtype=dtype or conv.weight.dtype, device=device or conv.weight.device)
    w = conv.weight.to(**kw).flatten(1)
    b = conv.bias.to(**kw) if conv.bias is not None else torch.zeros(w.shape[0], **kw)
    g = bn.weight.to(**kw) if bn.weight is not None else torch.ones_like(b)
    beta = bn.bias.to(**kw) if bn.bias is not None else torch.zeros_like(b)
    s = g / torch.sqrt(bn.running_var.to(**kw) + bn.eps)
    return w * s[:, None], s * (b - bn.running_mean.to(**kw)) + beta


@torch.no_grad()
def fast_scores(am: AttentionTAME, features: list[torch.Tensor], num_prefix: int, grid: tuple[int, int],
                rows: torch.Tensor | None = None) -> torch.Tensor:
    """Pre-sigmoid class maps from the token matrices, eval mode (running BN statistics).

    features: L x (B, T, D_l) norm1 outputs (prefix rows skipped by a view); rows: None (all classes) or (B, K) class
    indices. Returns (B, C, h', w') or (B, K, h', w'). The resize is applied to the fused scores: bilinear weights
    sum to 1 and act on space only, so they commute with the 1x1 fuser and its bias.
    """
    B, T, _ = features[0].shape
    h, w = grid
    n = h * w
    if num_prefix + n != T:
        raise ValueError(f"token count {T} != {num_prefix} prefix + {h}x{w} patches")
    dtype, device = features[0].dtype, features[0].device
    wf = am.fuser.weight.to(device=device, dtype=dtype).flatten(1)  # (C, sum D_l)
    bf = am.fuser.bias.to(device=device, dtype=dtype)
    num_classes = wf.shape[0]
    if rows is not None and 2 * rows.shape[1] >= num_classes:
        full = fast_scores(am, features, num_prefix, grid, None)  # most rows wanted ("all"): one GEMM, then gather
        return full.gather(1, rows[:, :, None, None].expand(-1, -1, *full.shape[-2:]))
    if rows is None:
        out = bf.expand(B, n, num_classes).clone()  # (B, N, C)
    else:
        w_sel = wf[rows]  # (B, K, sum D_l): only the requested fuser rows
        out = bf[rows][:, :, None].expand(-1, -1, n).clone()  # (B, K, N)
    col = 0
    for conv, bn, f in zip(am.convs, am.bns, features, strict=True):
        d = f.shape[-1]
        x = f[:, num_prefix:]  # (B, N, D): a view, the prefix rows are skipped by the offset
        wp, bp = fold_batchnorm(conv, bn, dtype, device)
        hl = torch.matmul(x, wp.t()).add_(bp).add_(x).relu_()  # ReLU(X W'^T + b' + X)
        if rows is None:
            out.add_(torch.matmul(hl, wf[:, col:col + d].t()))  # split-K: c = sum_l H_l W_f[:, l]^T + b_f
        else:
            out.baddbmm_(w_sel[:, :, col:col + d], hl.transpose(1, 2))
        col += d
    if rows is None:
        out = out.transpose(1, 2)
    maps = out.reshape(B, -1, h, w)
    size = (min(h, MAX_SIDE), min(w, MAX_SIDE))
    if size != (h, w):
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return maps


class TAMEExplainer(nn.Module):
    """A trained T-TAME attention mechanism and what it was trained on.

    layers: absolute indices of the feature blocks (norm1 outputs); grid: (h, w) of the training images;
    num_prefix_tokens, dims (D_l), num_classes; backbone: identity of the frozen backbone (see checkpoint.py).
    `forward(features)` is the reference path on token features L x (B, T, D); `scores` the fast path.
    """

    def __init__(self, dims: list[int], num_classes: int, layers: list[int], grid: tuple[int, int],
                 num_prefix_tokens: int, backbone: dict | None = None, info: dict | None = None):
        super().__init__()
        if len(dims) != len(layers):
            raise ValueError(f"{len(dims)} feature dims for {len(layers)} layers")
        self.attn_mech = AttentionTAME(list(dims), num_classes)
        self.dims = [int(d) for d in dims]
        self.num_classes = int(num_classes)
        self.layers = [int(i) for i in layers]
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.backbone = dict(backbone or {})
        self.info = dict(info or {})  # training configuration and history

    @classmethod
    def for_model(cls, model, layers: list[int] | None = None, seed: int | None = None) -> TAMEExplainer:
        """A fresh (untrained) AM sized for a timm ViT; layers default to the last three blocks (negative ok)."""
        from vitx_fast.engine.adapter import ViTAdapter
        from vitx_fast.methods.tame.checkpoint import backbone_identity

        adapter = model if isinstance(model, ViTAdapter) else ViTAdapter(model)
        layers = resolve_layers(layers, adapter.depth)
        if not adapter.has_head:
            raise ValueError("T-TAME needs a classification head (the CE target is the backbone's prediction)")
        if adapter.default_grid is None:
            raise ValueError("T-TAME needs a model with a fixed patch grid (patch_embed.grid_size)")
        if seed is not None:
            torch.manual_seed(seed)
        dims = [adapter.embed_dim] * len(layers)  # norm1 outputs have the residual width
        ex = cls(dims, adapter.num_classes, layers, adapter.default_grid, adapter.num_prefix_tokens,
                 backbone=backbone_identity(adapter.model))
        p = next(adapter.model.parameters())
        return ex.to(device=p.device, dtype=p.dtype)

    def forward(self, features: list[torch.Tensor], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference path. features: L x (B, T, D_l) token matrices -> (a, c), each (B, C, h', w')."""
        dtype = features[0].dtype
        if self.attn_mech.fuser.weight.dtype != dtype:
            raise TypeError(f"features are {dtype} but the explainer is {self.attn_mech.fuser.weight.dtype}")
        return self.attn_mech([tokens_to_grid(f, self.num_prefix_tokens, grid) for f in features])

    def scores(self, features: list[torch.Tensor], grid: tuple[int, int], rows: torch.Tensor | None = None):
        """Fast path (eval statistics): pre-sigmoid maps (B, C or K, h', w')."""
        return fast_scores(self.attn_mech, features, self.num_prefix_tokens, grid, rows)

    def extra_repr(self) -> str:
        return f"layers={self.layers}, grid={self.grid}, num_classes={self.num_classes}, dims={self.dims}"


def resolve_layers(layers, depth: int) -> list[int]:
    """None -> the last three blocks; negative indices count from the end; returns sorted-as-given absolute ints."""
    if layers is None:
        layers = [-3, -2, -1] if depth >= 3 else list(range(-depth, 0))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"feature layers must be block indices (ints), got {i!r}")
        if not -depth <= i < depth:
            raise ValueError(f"feature layer {i} is out of range for a model with {depth} blocks")
        out.append(i % depth)
    if len(set(out)) != len(out):
        raise ValueError(f"feature layers repeat a block: {out}")
    if not out:
        raise ValueError("at least one feature layer is needed")
    return out
