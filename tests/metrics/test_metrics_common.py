"""Shared metric plumbing: map preparation orders, chunking under a memory budget, eval mode, normalisation lookup,
input validation."""
import pytest
import torch
import torch.nn.functional as F
from metric_utils import token_maps, vit_and_images

from vitx_fast import metrics
from vitx_fast.metrics._common import chunk_size, per_image_bytes, prepare_maps, resolve_norm


def test_prepare_maps_orders():
    maps = token_maps(2, 4, 4)
    up = F.interpolate(maps[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    lo, hi = up.flatten(1).amin(1), up.flatten(1).amax(1)
    expected = (up - lo[:, None, None]) / (hi - lo + 1e-12)[:, None, None]
    assert torch.allclose(prepare_maps(maps, 32), expected, atol=0, rtol=0)
    first = prepare_maps(maps, (32, 32), order="minmax_first")
    mm = (maps - maps.flatten(1).amin(1)[:, None, None]) / (maps.flatten(1).amax(1) - maps.flatten(1).amin(1)
                                                              + 1e-12)[:, None, None]
    assert torch.allclose(first, F.interpolate(mm[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0])
    assert first.max() < 1  # bilinear after min-max does not reach the extremes: the orders differ
    assert torch.equal(prepare_maps(torch.full((1, 3, 3), 2.0), 6), torch.zeros(1, 6, 6))  # constant -> 0
    same = torch.rand(2, 8, 8, dtype=torch.float64)
    assert torch.allclose(prepare_maps(same, 8), metrics.prepare_maps(same, (8, 8)))


def test_chunking_respects_batch_size_and_budget():
    model, x = vit_and_images(torch.float32, 2)
    per = per_image_bytes(model, x)
    assert per > x[0].numel() * 4
    assert chunk_size(model, x, batch_size=3) == 3
    assert chunk_size(model, x, memory_budget=per * 5) == 5
    assert chunk_size(model, x, memory_budget=1) == 1
    with pytest.raises(ValueError):
        chunk_size(model, x, batch_size=0)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    metrics.abpc(model, x, token_maps(2, 4, 4, dtype=torch.float32), None, memory_budget=per * 4)
    hook.remove()
    assert max(seen) <= 4 and sum(seen) == 2 + 2 * 9 * 2 + 2  # clean, inner steps of both curves, fully removed


def test_eval_mode_restored_and_used():
    model, x = vit_and_images(torch.float64, 2)
    model.pos_drop.p = 0.5  # dropout would make train-mode scores random
    model.train()
    out = metrics.abpc(model, x, token_maps(2, 4, 4), None, steps=3)
    assert model.training
    model.eval()
    assert torch.equal(out["abpc"], metrics.abpc(model, x, token_maps(2, 4, 4), None, steps=3)["abpc"])


def test_resolve_norm_reads_pretrained_cfg():
    model, x = vit_and_images(torch.float32, 2)
    with pytest.raises(ValueError, match="mean"):
        resolve_norm(model, x)
    model.pretrained_cfg = {"mean": (0.1, 0.2, 0.3), "std": (0.5, 0.5, 0.5)}
    mean, std = resolve_norm(model, x)
    assert mean.shape == (1, 3, 1, 1) and torch.allclose(mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    m2, s2 = resolve_norm(model, x, mean=0.5, std=(0.2, 0.3, 0.4))
    assert torch.equal(m2.flatten(), torch.full((3,), 0.5)) and torch.allclose(s2.flatten(), torch.tensor([.2, .3, .4]))


def test_input_validation():
    model, x = vit_and_images(torch.float32, 2)
    maps = token_maps(2, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError):
        metrics.abpc(model, x[0], maps, None)
    with pytest.raises(ValueError):
        metrics.insertion_deletion(model, x, maps[:1], None, baseline="mean")
    with pytest.raises(ValueError):
        metrics.abpc(model, x, maps, [0, 1, 2])
    with pytest.raises(ValueError):
        metrics.abpc(model, x, maps, [0, 99])
    out = metrics.abpc(model, x, maps[:, None], 3, steps=3)  # (B, 1, h, w) maps and an int target are accepted
    assert out["targets"].tolist() == [3, 3]
