"""Memory: the fast ReciproCAM path is O(B*N*D) (specs/reciprocam.md §9.8), and repeated calls do not leak."""
import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch
    torch.set_num_threads(1)
    from timm.models.vision_transformer import VisionTransformer
    import vitx_fast as vx

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # 512 px, patch 16: N = 1024 patches, T = 1025 tokens; tiny width so that only the token-count terms matter
    model = VisionTransformer(img_size=512, patch_size=16, embed_dim=16, depth=2, num_heads=2, num_classes=5).eval()
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        model(x)  # warm-up: one plain forward sets the baseline
    base = rss_mb()
    exp = vx.explain(model, x, method="reciprocam", target="all")
    assert exp.backend in ("cpp", "fused") and exp.maps.shape == (1, 5, 32, 32)
    fast = rss_mb() - base
    # a context-release check: many calls, no growth
    small = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3).eval()
    xs = torch.randn(2, 3, 32, 32)
    for _ in range(5):
        vx.explain(small, xs, method="gae")
    before = rss_mb()
    for _ in range(100):
        vx.explain(small, xs, method="gae")
        vx.explain(small, xs, method="reciprocam")
    print(json.dumps({"fast_mb": fast, "leak_mb": rss_mb() - before}))
""")


def test_reciprocam_fast_path_memory_and_release():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    # one B x N x T x D mosaic in float32 would be 1024 * 1025 * 16 * 4 B = 64 MB, and its attention scores
    # N x H x T x T = 8 GB; the collapsed form needs ~B x N x 11 x D
    mosaic_mb = 1024 * 1025 * 16 * 4 / 2**20
    assert res["fast_mb"] < mosaic_mb / 4, res
    assert res["leak_mb"] < 8, res
