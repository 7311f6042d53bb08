"""ReciproCAM as a hooked re-run of the unmodified timm model: the independent reference of the engine's ReciproCAM
(not a port of one file; docs/methods/reciprocam.md §3).

- `residual="unmasked"`: openvinotoolkit/openvino_xai, `openvino_xai/methods/white_box/torch.py` (`TorchViTReciproCAM`):
  a forward hook on `blocks[b].norm1` replaces the (1, T, D) LN1 output by the (N, T, D) masked batch; the block's
  residual stays (1, T, D) and broadcasts.
- `residual="masked"` (openvino_xai `recipro_cam.py`, IR graph: the skip-Add input is masked too) and `"ln1"` (OTX
  `otx/algo/explain/explain_algo.py`: `x = x + attn(x)` on the masked LN1 output): the block's forward is swapped.
- `naive_mask` writes the (N, T) variant weights out with plain loops (Gaussian 3x3 kernel `G3` or one-hot).
"""
from __future__ import annotations

import copy

import torch

G3 = [[1 / 16, 1 / 8, 1 / 16], [1 / 8, 1 / 4, 1 / 8], [1 / 16, 1 / 8, 1 / 16]]

def naive_mask(h, w, P, mask, cls_token):
    """(N, T) variant weights written out with plain loops."""
    W = torch.zeros(h * w, P + h * w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            k = i * w + j
            if cls_token:
                W[k, :P] = 1.0
            for a in range(h):
                for b in range(w):
                    if mask == "onehot":
                        W[k, P + a * w + b] = float(a == i and b == j)
                    elif abs(a - i) <= 1 and abs(b - j) <= 1:
                        W[k, P + a * w + b] = G3[a - i + 1][b - j + 1]
    return W


def naive_scores(model, images, target_block=-1, mask="gaussian", cls_token=True, residual="unmasked",
                 score="softmax"):
    """Per image: one forward of a hooked deep copy on the N variants. images (B, 3, H, W) -> (B, N, C)."""
    m = copy.deepcopy(model).eval()
    (ph, pw), (H_in, W_in) = m.patch_embed.patch_size, images.shape[-2:]
    h, w = H_in // ph, W_in // pw  # the input's grid (grid_size unless dynamic_img_size runs another size)
    W = naive_mask(h, w, m.num_prefix_tokens, mask, cls_token).to(next(m.parameters()).dtype)[:, :, None]
    blk = m.blocks[target_block]
    if residual == "unmasked":
        # LN1 output (1, T, D) -> (N, T, D); the block's residual x stays (1, T, D) and broadcasts
        blk.norm1.register_forward_hook(lambda mod, inp, out: W * out)
    else:
        def forward(x, attn_mask=None, is_causal=False):
            u = W * blk.norm1(x)
            r = W * x if residual == "masked" else u
            y = r + blk.drop_path1(blk.ls1(blk.attn(u)))
            return y + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(y))))

        blk.forward = forward
    with torch.no_grad():
        out = torch.stack([m(img[None]) for img in images])
    return out.softmax(-1) if score == "softmax" else out


def naive_maps(scores, grid, eps=1e-12):
    """(B, N, C) -> min-max (B, C, h, w)."""
    B, _, C = scores.shape
    s = scores.transpose(1, 2).reshape(B, C, *grid)
    flat = s.flatten(2)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    return ((flat - lo) / (hi - lo + eps)).view_as(s)
