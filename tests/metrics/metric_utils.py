"""Helpers shared by the metric tests: tiny models, maps with and without ties, batched-vs-per-image comparison."""
from __future__ import annotations

import torch
import torch.nn as nn
from utils import make_images, make_vit


class TinyCNN(nn.Module):
    """A non-ViT classifier: the metrics only need images -> logits."""

    def __init__(self, classes=5, channels=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.6 if p.dim() > 1 else 0.2))

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = nn.functional.adaptive_avg_pool2d(h, 4)
        return self.fc(h.flatten(1))


def vit_and_images(dtype=torch.float64, batch=3, layout="plain", seed=0):
    model = make_vit(layout, dtype=dtype, seed=seed)
    return model, make_images(model, batch, seed=seed)


def cnn_and_images(dtype=torch.float64, batch=3, size=(32, 32), seed=0):
    model = TinyCNN(seed=seed).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 7)
    return model, torch.randn(batch, 3, *size, generator=g).to(dtype)


def token_maps(batch, h, w, seed=0, dtype=torch.float64, ties=False):
    """Raw (B, h, w) maps; with ties=True the values are rounded to a few levels."""
    g = torch.Generator().manual_seed(seed + 11)
    m = torch.rand(batch, h, w, generator=g, dtype=torch.float64) * 3 - 1
    if ties:
        m = (m * 2).round() / 2
    return m.to(dtype)


def per_image(fn, images, maps, targets=None, **kw):
    """Run a metric one image at a time and concatenate the per-image outputs along dim 0."""
    outs = []
    for i in range(images.shape[0]):
        t = None if targets is None else targets[i:i + 1]
        outs.append(fn(images[i:i + 1], maps[i:i + 1], t, **kw))
    return outs


def assert_batched_equals_per_image(batched, singles, atol, skip=("percentages", "fractions", "counts", "keep")):
    for k, v in batched.items():
        if k in skip or not torch.is_tensor(v):
            continue
        ref = torch.cat([s[k] for s in singles])
        assert v.shape == ref.shape, (k, v.shape, ref.shape)
        if v.dtype == torch.bool or not v.is_floating_point():
            assert torch.equal(v, ref), k
        else:
            assert torch.allclose(v.double(), ref.double(), atol=atol, rtol=0, equal_nan=True), \
                (k, (v.double() - ref.double()).abs().max().item())
