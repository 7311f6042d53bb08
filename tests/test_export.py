"""The fused paths are single tensor programs (gradients as explicit VJPs, no autograd at run time): torch.export
traces them with a dynamic batch and the exported program reproduces `vx.explain`."""
import pytest
import torch
from utils import make_images, make_vit

import vitx_fast as vx
from vitx_fast.export import ExplainerModule


@pytest.mark.parametrize("layout,method,target,kw", [
    ("registers", "reciprocam", "all", {}),
    ("distilled", "reciprocam", None, dict(mask="onehot", cls_token=False, residual="masked")),
    ("nonsquare", "rollout", None, dict(head_fusion="max")),
    ("distilled", "agcam", None, {}),
    ("registers", "gae", None, {}),
    ("layerscale", "lrp", None, dict(start_layer=1)),
    ("qknorm", "daam", None, {}),
])
def test_torch_export_dynamic_batch(layout, method, target, kw):
    model = make_vit(layout)  # float64: the traced program (torch reference ops) vs eager (C++ ops) to rounding
    x = make_images(model, 2)
    mod = ExplainerModule(model, method, target=target, **kw)
    ep = torch.export.export(mod, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    x3 = make_images(model, 3, seed=5)
    logits, maps = ep.module()(x3)
    ref = vx.explain(model, x3, method=method, target=target, **kw)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(maps, ref.maps, rtol=1e-8, atol=1e-9)


def test_explainer_module_rejects_bad_target():
    with pytest.raises(ValueError, match="target must be None"):
        ExplainerModule(make_vit("plain"), "rollout", target=3)
