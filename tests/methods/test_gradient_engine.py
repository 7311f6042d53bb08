"""The gradient engine of the fast paths (vitx_fast/engine/backward.py, gradients.py, memory.py; docs/methods/gae.md
§5): its gradients against autograd on every layout and mode, K classes per image in one backward against K single
runs, chunked runs against one pass, the recompute mode against the save mode, the autograd fallback's batched
backward, gradient rollout's fast path against its reference, and the memory_budget option."""
import itertools

import pytest
import torch
import torch.nn as nn
from utils import (
    EXTRA_LAYOUTS,
    LAYOUTS,
    assert_maps_close,
    assert_structured,
    extra_model_and_images,
    make_images,
    make_vit,
)

import vitx_fast as vx
from vitx_fast.engine import ViTAdapter, memory
from vitx_fast.engine.backward import backward_blocks, forward_saved
from vitx_fast.engine.gradients import graph_forward

GRADIENT_METHODS = ("gae", "lrp", "daam", "grad_rollout")
ALL_LAYOUTS = [(n, n, {}, None) for n in sorted(LAYOUTS)] + EXTRA_LAYOUTS


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _autograd_grads(adapter, x, seeds):
    """Per seed column: d<seed, logits>/d(probs, scores, context) of every block, by autograd on the adapter's
    unfused capture."""
    rec = graph_forward(adapter, x)
    out = []
    for j in range(seeds.shape[1]):
        ts = [getattr(b.attn, n) for n in ("probs", "logits", "context") for b in rec.blocks]
        g = torch.autograd.grad(rec.output, ts, grad_outputs=seeds[:, j], retain_graph=True)
        L = adapter.depth
        out.append((g[:L], g[L:2 * L], g[2 * L:]))
    return rec, out


@pytest.mark.parametrize("mode,fused", [("save", False), ("recompute", False), ("save", True)],
                         ids=["save", "recompute", "fused-attention-backward"])
@pytest.mark.parametrize("name,base,kw,size", ALL_LAYOUTS, ids=[x[0] for x in ALL_LAYOUTS])
def test_engine_gradients_equal_autograd(name, base, kw, size, mode, fused):
    """Every block's gradients at the probabilities, the scores and the proj input, for K = 2 seeds per image in one
    backward, equal autograd's (float64); rows the top block does not compute are exactly zero in autograd's."""
    model, x = extra_model_and_images(base, kw, size, batch=2)
    a = ViTAdapter(model)
    seeds = torch.nn.functional.one_hot(torch.tensor([[1, 2], [6, 1]]), model.num_classes).double()
    with a.session():
        rec, ref = _autograd_grads(a, x, seeds)
        sf = forward_saved(a, x, mode=mode, fused_backward=fused)
        torch.testing.assert_close(sf.logits, rec.output.detach(), rtol=1e-12, atol=1e-12)
        seen = []
        for bg in backward_blocks(sf, seeds, probs=not fused, scores=not fused):
            i, R = bg.index, bg.rows or bg.saved.x.shape[1]
            seen.append(i)
            for j in range(2):
                g_p, g_s, g_c = (t[i] for t in ref[j])
                torch.testing.assert_close(bg.g_context[:, j], g_c[:, :R], rtol=1e-9, atol=1e-12)
                if not fused:
                    torch.testing.assert_close(bg.g_probs[:, j], g_p[:, :, :R], rtol=1e-9, atol=1e-12)
                    torch.testing.assert_close(bg.g_scores[:, j], g_s[:, :, :R], rtol=1e-9, atol=1e-12)
                    assert bg.rows is None or g_p[:, :, R:].abs().max() == 0
        assert seen == list(range(a.depth - 1, -1, -1))


@pytest.mark.parametrize("method", GRADIENT_METHODS)
@pytest.mark.parametrize("layout", ["plain", "distilled", "qknorm", "layerscale"])
def test_classes_in_one_pass_equal_single_runs(layout, method):
    """(B, K) targets are one batched backward; each column equals a (B,) run, and 'top3' equals its tensor form."""
    model = make_vit(layout)
    x = make_images(model, 2)
    t = torch.tensor([[1, 4, 6], [0, 1, 5]])
    multi = vx.explain(model, x, method=method, target=t)
    assert multi.maps.shape == (2, 3, *multi.maps.shape[-2:]) and multi.backend != "reference"
    for j in range(3):
        single = vx.explain(model, x, method=method, target=t[:, j])
        assert_maps_close(multi.maps[:, j], single.maps, atol=1e-10)
        if method == "daam":
            assert_maps_close(multi.flow[:, j], single.flow, atol=1e-10)
        if method == "lrp":
            torch.testing.assert_close(multi.extras["relevance_sums"][:, j], single.extras["relevance_sums"])
    top = vx.explain(model, x, method=method, target="top3")
    order = multi.logits.topk(3, dim=-1).indices
    assert torch.equal(top.targets, order)
    assert_maps_close(top.maps, vx.explain(model, x, method=method, target=order).maps, atol=1e-12)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_autograd_fallback_batches_the_classes(method):
    """A SiLU MLP has no explicit VJP: the K classes are one vmapped autograd backward, equal to the reference."""
    model = make_vit("registers", act_layer=nn.SiLU)
    x = make_images(model, 2)
    t = torch.tensor([[1, 2, 5], [3, 4, 0]])
    fast = vx.explain(model, x, method=method, target=t)
    ref = vx.explain(model, x, method=method, target=t, backend="reference")
    assert fast.backend != "reference" and fast.extras["gradients"] == "autograd"
    assert_maps_close(fast.maps, ref.maps, 1e-9)


GR_OPTIONS = [dict(pairing=p, renorm=r, grad_wrt=g, discard_ratio=d)
              for p, r, g, d in itertools.product(("correct", "jacobgil"), ("jacobgil", "row"), ("probs", "logits"),
                                                  (0.0, 0.9))]


@pytest.mark.parametrize("opts", GR_OPTIONS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
@pytest.mark.parametrize("name,base,kw,size", ALL_LAYOUTS, ids=[x[0] for x in ALL_LAYOUTS])
def test_grad_rollout_fast_equals_reference(name, base, kw, size, opts):
    """Gradient rollout's fast path (batched backward, top-k discard, row chain) equals its reference in float64
    on every layout and every combination of its options, with (B, 2) targets."""
    model, x = extra_model_and_images(base, kw, size, batch=2)
    t = torch.tensor([[1, 3], [5, 0]])
    ref = vx.explain(model, x, method="grad_rollout", target=t, backend="reference", **opts)
    fast = vx.explain(model, x, method="grad_rollout", target=t, **opts)
    assert fast.backend == "fused"
    assert_structured(ref.maps.reshape(-1, *ref.maps.shape[-2:]))
    assert_maps_close(fast.maps, ref.maps, 1e-9)


def test_grad_rollout_discard_keeps_the_largest():
    """The batched discard zeroes exactly the reference's k smallest entries (zeros tie harmlessly)."""
    from vitx_fast.methods.grad_rollout.fast import discard_smallest_batched
    from vitx_fast.methods.rollout.reference import discard_smallest

    F = (torch.rand(6, 17, 17, dtype=torch.float64) - 0.4).clamp(min=0)  # ~40% exact zeros
    for ratio in (0.1, 0.5, 0.9):
        assert torch.equal(discard_smallest_batched(F, ratio), discard_smallest(F, ratio, protect_first=False))


@pytest.mark.parametrize("method,kw", [("gae", {}), ("lrp", dict(start_layer=1)), ("daam", {}),
                                       ("daam", dict(display="linear", norm=True)),
                                       ("grad_rollout", dict(pairing="jacobgil")), ("rollout", {}),
                                       ("reciprocam", {}), ("agcam", {})])
def test_chunks_equal_one_pass(method, kw):
    """A budget that fits 2 of 5 images runs 3 chunks; maps, targets, logits and extras equal one pass (per-image
    (B, K) targets are sliced per chunk)."""
    model = make_vit("registers")
    x = make_images(model, 5)
    t = torch.tensor([[1, 2], [3, 4], [5, 6], [0, 1], [2, 3]])
    target = None if method == "daam" and kw else t
    one = vx.explain(model, x, method=method, target=target, memory_budget="unlimited", **kw)
    per_image = one.extras["memory"]["estimate_per_image"]
    chunked = vx.explain(model, x, method=method, target=target, memory_budget=int(2.5 * per_image), **kw)
    assert one.extras["memory"]["chunks"] == 1
    assert chunked.extras["memory"]["chunk"] == 2 and chunked.extras["memory"]["chunks"] == 3
    assert torch.equal(chunked.targets, one.targets)
    torch.testing.assert_close(chunked.logits, one.logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked.maps, one.maps, rtol=1e-10, atol=1e-13)
    if one.flow is not None:
        torch.testing.assert_close(chunked.flow, one.flow, rtol=1e-10, atol=1e-13)
    for key in ("relevance_sums", "accumulated", "block_maps"):
        if key in one.extras:
            torch.testing.assert_close(chunked.extras[key], one.extras[key], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_recompute_mode_equals_save_mode(method):
    """A budget between the two modes' estimates selects "recompute" (the block inputs only, each block re-run in
    the backward); the maps equal the "save" mode's."""
    model = make_vit("layerscale")
    x = make_images(model, 2)
    a = ViTAdapter(model)
    impl = vx.get_method(method).implementations["fast"]
    T = a.layout(x).num_tokens
    modes = impl.memory_modes(a, T, vx.get_method(method).resolve_options({}), 2)
    assert list(modes) == ["save", "recompute"] and modes["recompute"] < modes["save"]
    budget = (modes["save"] + modes["recompute"]) // 2
    t = torch.tensor([[1, 2], [3, 4]])
    save = vx.explain(model, x, method=method, target=t, memory_budget="unlimited")
    rec = vx.explain(model, x, method=method, target=t, memory_budget=budget)
    assert save.extras["gradients"] == "explicit/save" and rec.extras["gradients"] == "explicit/recompute"
    assert rec.extras["memory"]["mode"] == "recompute"
    torch.testing.assert_close(rec.maps, save.maps, rtol=1e-12, atol=1e-14)


def test_memory_budget_option():
    model = make_vit("plain")
    x = make_images(model, 1)
    exp = vx.explain(model, x, method="gae", memory_budget="2GB")
    assert exp.options["memory_budget"] == "2GB" and exp.extras["memory"]["budget"] == 2 * 10**9
    assert "memory_budget" not in vx.explain(model, x, method="gae").options  # defaults stay as they were
    assert memory.parse_budget("512MiB") == 512 * 2**20 and memory.parse_budget(1000) == 1000
    for bad in (0, -1, True, "lots", "2 TB", [1]):
        with pytest.raises(ValueError, match="memory_budget must be None"):
            vx.explain(model, x, method="rollout", memory_budget=bad)
    with pytest.raises(TypeError, match="memory_budget"):  # listed among the valid options
        vx.explain(model, x, method="gae", memory_budgt=1)
    # nothing fits: the leanest mode, one image at a time, and the report says so
    tiny = vx.explain(model, make_images(model, 2), method="gae", memory_budget=1)
    assert not tiny.extras["memory"]["fits"]
    assert tiny.extras["memory"]["mode"] == "recompute" and tiny.extras["memory"]["chunk"] == 1
    assert tiny.extras["gradients"] == "explicit/recompute"


def test_default_budget_is_twice_a_forward_plus_margin():
    """The default counts the weights, two plain-forward activation peaks and the fixed margin."""
    model = make_vit("plain")
    a = ViTAdapter(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    fwd = memory.forward_peak_bytes(a, 8, 17)
    assert memory.default_budget(a, 8, 17) == weights + 2 * fwd + memory.DEFAULT_MARGIN
    assert memory.forward_peak_bytes(a, 16, 17) == 2 * fwd


def test_not_traceable_is_refused_by_the_exporter(monkeypatch):
    """The exporter's refusal of a method without a single-program fast path (every method has one today)."""
    pytest.importorskip("onnx")
    from vitx_fast.onnx_export import check_method

    impl = vx.get_method("grad_rollout").implementations["fast"]
    monkeypatch.setattr(type(impl), "TRACEABLE", False)
    with pytest.raises(ValueError, match="grad_rollout has no single-program fast path"):
        check_method("grad_rollout")
