"""Half precision (docs/methods/gae.md §6): GAE, DAAM and gradient rollout run float16 / bfloat16 models and autocast
on their fast paths with flash attention's tolerance rule (over a set of models and images, the fast path's largest
error against the float32 reference is at most twice the largest error of the reference path run in the same
precision); LRP refuses half precision with a reason (safe_divide's 1e-9 stabiliser); CPU runs never import the
CUDA-only Triton kernels."""
import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from utils import make_images, make_vit, minmax

import vitx_fast as vx

HALF = [pytest.param(torch.float16, id="float16"), pytest.param(torch.bfloat16, id="bfloat16")]
CASES = [(layout, seed) for layout in ("plain", "distilled", "qknorm", "layerscale") for seed in (0, 1)]


def _error(maps: torch.Tensor, ref: torch.Tensor) -> float:
    return (minmax(maps.double()) - minmax(ref.double())).abs().max().item()


@pytest.mark.parametrize("how", ["model", "autocast"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", ["gae", "daam", "grad_rollout"])
def test_half_precision_within_twice_the_reference_error(method, dtype, how):
    worst_fast = worst_ref = 0.0
    for layout, seed in CASES:
        model = make_vit(layout, seed=seed)
        x = make_images(model, 2, seed=seed)
        t = torch.tensor([1, 3])
        m32 = copy.deepcopy(model).float()
        truth = vx.explain(m32, x.float(), method=method, target=t, backend="reference").maps
        if how == "model":
            mh, xh = copy.deepcopy(model).to(dtype), x.to(dtype)
            ref = vx.explain(mh, xh, method=method, target=t, backend="reference")
            fast = vx.explain(mh, xh, method=method, target=t)
        else:
            with torch.autocast("cpu", dtype=dtype):
                ref = vx.explain(m32, x.float(), method=method, target=t, backend="reference")
                fast = vx.explain(m32, x.float(), method=method, target=t)
        assert fast.backend != "reference" and torch.isfinite(fast.maps.double()).all()
        worst_fast = max(worst_fast, _error(fast.maps, truth))
        worst_ref = max(worst_ref, _error(ref.maps, truth))
    assert 0 < worst_fast <= 2 * worst_ref, (worst_fast, worst_ref)


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("dtype", HALF)
def test_lrp_refuses_half_precision(dtype, backend):
    model = make_vit("plain")
    x = make_images(model, 1)
    with pytest.raises(vx.UnsupportedModelError, match=f"the model is {dtype}.*safe_divide.*float32 or float64"):
        vx.explain(copy.deepcopy(model).to(dtype), x.to(dtype), method="lrp", backend=backend)
    assert any("safe_divide" in r for r in vx.not_supported_reasons(copy.deepcopy(model).to(dtype), "lrp"))
    m32 = copy.deepcopy(model).float()
    with torch.autocast("cpu", dtype=dtype), pytest.raises(vx.UnsupportedModelError,
                                                           match=f"torch.autocast runs the model in {dtype}"):
        vx.explain(m32, x.float(), method="lrp", backend=backend)
    assert torch.isfinite(vx.explain(m32, x.float(), method="lrp", backend=backend).maps).all()  # float32 runs


def test_daam_under_autocast_on_the_cpp_backend():
    """A float32 model picks the C++ maps kernel; under autocast the maps step still gets float32 inputs."""
    model = make_vit("plain", dtype=torch.float32)
    x = make_images(model, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exp = vx.explain(model, x, method="daam")
    assert torch.isfinite(exp.maps).all() and exp.maps.dtype == torch.float32


NO_TRITON = textwrap.dedent("""
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from utils import make_images, make_vit
    import vitx_fast as vx
    from vitx_fast.methods.tame.module import TAMEExplainer

    model = make_vit("registers", dtype=torch.float32)
    x = make_images(model, 2)
    ran = {}
    for method in vx.list_methods():
        kw = {"explainer": TAMEExplainer.for_model(model)} if method == "tame" else {}
        ran[method] = vx.explain(model, x, method=method, **kw).backend
    print(json.dumps({"ran": ran, "kernels": sorted(k for k in sys.modules if k.startswith("vitx_fast.kernels"))}))
""")


def test_cpu_runs_never_import_triton_kernels():
    """Every method on CPU (the default backend) in a fresh process without TRITON_INTERPRET: none of the CUDA-only
    Triton kernel modules is imported."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", NO_TRITON, os.path.dirname(__file__)], capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(res["ran"]) == set(vx.list_methods()) and "triton" not in res["ran"].values()
    assert "vitx_fast.kernels.reference" in res["kernels"]
    assert not [k for k in res["kernels"] if k.startswith("vitx_fast.kernels.triton")], res


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["daam", "reciprocam"])
def test_cuda_selects_triton_kernels(method):
    model = make_vit("plain", dtype=torch.float32).cuda()
    x = make_images(model, 2).cuda()
    assert vx.explain(model, x, method=method).backend == "triton"
