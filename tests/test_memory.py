"""Memory: the fast ReciproCAM path is O(B*N*D) (docs/methods/reciprocam.md §6), and repeated calls do not leak."""
import json
import subprocess
import sys
import textwrap

import pytest
from utils import AUTO_FAST_BACKEND

PRELUDE = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from timm.models.vision_transformer import VisionTransformer
    import vitx_fast as vx

    def status_mb(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024

    def reset_peak():
        # Linux: "5" resets the peak RSS (VmHWM) to the current RSS, so an earlier spike cannot hide a later peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def rss_mb():
        return status_mb("VmHWM")
""")

SCRIPT = PRELUDE + textwrap.dedent("""

    # 512 px, patch 16: N = 1024 patches, T = 1025 tokens; tiny width so that only the token-count terms matter
    model = VisionTransformer(img_size=512, patch_size=16, embed_dim=16, depth=2, num_heads=2, num_classes=5).eval()
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        model(x)  # warm-up: one plain forward sets the baseline
    reset_peak()
    base = rss_mb()
    exp = vx.explain(model, x, method="reciprocam", target="all")
    assert exp.maps.shape == (1, 5, 32, 32)
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
    print(json.dumps({"backend": exp.backend, "fast_mb": fast, "leak_mb": rss_mb() - before}))
""")


def test_reciprocam_fast_path_memory_and_release():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["backend"] == AUTO_FAST_BACKEND, res  # cpp where the native module loaded, else fused
    # one B x N x T x D mosaic in float32 would be 1024 * 1025 * 16 * 4 B = 64 MB, and its attention scores
    # N x H x T x T = 8 GB; the collapsed form needs ~B x N x 11 x D
    mosaic_mb = 1024 * 1025 * 16 * 4 / 2**20
    assert res["fast_mb"] < mosaic_mb / 4, res
    assert res["leak_mb"] < 8, res


# ------------------------------------------------------------------------------ memory budget, per method
# One fresh process per method; the peak RSS (VmHWM) is reset before each measured call. A tiny width with many
# tokens (T = 401) so that the (T, T) and per-token terms dominate; 32 images.
BUDGET_SCRIPT = PRELUDE + textwrap.dedent("""

    method, budgets = sys.argv[1], sys.argv[2:]
    torch.manual_seed(0)
    model = VisionTransformer(img_size=160, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10).eval()
    x = torch.randn(32, 3, 160, 160)
    with torch.no_grad():
        model(x[:1])
    reset_peak()
    base = status_mb("VmRSS")  # the process with the model loaded
    with torch.inference_mode():
        model(x)
    forward = rss_mb()  # the peak of a plain forward of the batch
    runs = []
    for budget in budgets:
        reset_peak()
        kw = {} if budget == "default" else {"memory_budget": budget}
        if method == "tame":
            from vitx_fast.methods.tame.module import TAMEExplainer
            kw["explainer"] = TAMEExplainer.for_model(model)
        exp = vx.explain(model, x, method=method, **kw)
        runs.append({"peak": rss_mb(), "memory": exp.extras["memory"]})
    print(json.dumps({"base": base, "forward": forward, "runs": runs}))
""")
BUDGET_MB = 48
GRADIENT_METHODS = ("daam", "gae", "grad_rollout", "lrp")


def _budget_runs(method: str, *budgets: str) -> dict:
    out = subprocess.run([sys.executable, "-c", BUDGET_SCRIPT, method, *budgets], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _methods():
    import vitx_fast as vx

    return vx.list_methods()


@pytest.mark.parametrize("method", _methods())
def test_memory_budget_bounds_each_method(method):
    """With memory_budget=48MB every method's working memory (peak RSS over the loaded process) stays within the
    budget up to the estimates' and the allocator's slack, the gradient methods by running the batch in chunks;
    with the default budget the peak is at most twice a plain forward's peak plus the 512 MiB margin."""
    res = _budget_runs(method, f"{BUDGET_MB}MB", "default")
    small, default = res["runs"]
    assert small["memory"]["budget"] == BUDGET_MB * 10**6 and small["memory"]["fits"], res
    assert small["peak"] - res["base"] <= 1.5 * BUDGET_MB + 16, res
    if method in GRADIENT_METHODS:
        assert small["memory"]["chunks"] > 1, res
    assert default["peak"] <= 2 * res["forward"] + 512, res


def test_memory_budget_is_what_bounds_gae():
    """The check above can fail: without a budget, GAE on the same batch needs several times the 48 MB."""
    res = _budget_runs("gae", "unlimited")
    assert res["runs"][0]["memory"]["chunks"] == 1
    assert res["runs"][0]["peak"] - res["base"] > 3 * (1.5 * BUDGET_MB + 16), res
