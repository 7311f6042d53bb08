"""Shape, dtype and device validation shared by every backend of the fused ops, with readable messages.

The messages match the C++ checks at the binding boundary (csrc/bindings.cpp): "op: name must have shape (...)".
Each `check_<op>` returns the sizes it read, so launchers do not re-derive them.
"""
from __future__ import annotations

import torch


def _shape_error(op: str, name: str, layout: str, expected: tuple, got: tuple) -> ValueError:
    want = ", ".join("?" if e is None else str(e) for e in expected)
    return ValueError(f"{op}: {name} must have shape {layout} = ({want}), got {tuple(got)}")


def _expect(op: str, name: str, t: torch.Tensor, layout: str, expected: tuple) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    ok = t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected, strict=True))
    if not ok:
        raise _shape_error(op, name, layout, expected, tuple(t.shape))


def _same_float(op: str, named: dict[str, torch.Tensor]) -> None:
    """All floating inputs share one floating dtype and one device."""
    (first, t0), *rest = named.items()
    if not t0.is_floating_point():
        raise ValueError(f"{op}: {first} must be a floating-point tensor, got {t0.dtype}")
    for name, t in rest:
        if t.dtype != t0.dtype:
            raise ValueError(f"{op}: {name} must have the dtype of {first} ({t0.dtype}), got {t.dtype}")
        if t.device != t0.device:
            raise ValueError(f"{op}: {name} must be on the device of {first} ({t0.device}), got {t.device}")


def check_masked_variant_attention(q, pk, pv, idx, m, valid, log_nz, bk, bv) -> tuple[int, int, int, int, int, int]:
    """Returns (B, N, H, d, T, A). Also checks that every valid index lies in [0, T)."""
    op = "masked_variant_attention"
    _expect(op, "q", q, "(B, N, H, d)", (None, None, None, None))
    B, N, H, d = q.shape
    _expect(op, "pk", pk, "(B, T, H, d)", (B, None, H, d))
    T = pk.shape[1]
    _expect(op, "pv", pv, "(B, T, H, d)", (B, T, H, d))
    _expect(op, "idx", idx, "(N, A)", (N, None))
    A = idx.shape[1]
    _expect(op, "m", m, "(N, A)", (N, A))
    _expect(op, "valid", valid, "(N, A)", (N, A))
    _expect(op, "log_nz", log_nz, "(N,)", (N,))
    _expect(op, "bk", bk, "(H, d)", (H, d))
    _expect(op, "bv", bv, "(H, d)", (H, d))
    _same_float(op, {"q": q, "pk": pk, "pv": pv, "m": m, "log_nz": log_nz, "bk": bk, "bv": bv})
    if idx.dtype != torch.int64:
        raise ValueError(f"{op}: idx must be int64, got {idx.dtype}")
    if valid.dtype != torch.bool:
        raise ValueError(f"{op}: valid must be bool, got {valid.dtype}")
    for name, t in (("idx", idx), ("valid", valid)):
        if t.device != q.device:
            raise ValueError(f"{op}: {name} must be on the device of q ({q.device}), got {t.device}")
    # padded slots are never read, so only valid ones must be in range (one small reduction; syncs on CUDA)
    from vitx_fast.engine.dispatch import tracing  # a value check cannot be traced: skip it there

    if N * A and not tracing([q, idx]) and bool((valid & ((idx < 0) | (idx >= T))).any()):
        raise ValueError(f"{op}: valid entries of idx must lie in [0, T) = [0, {T})")
    return B, N, H, d, T, A


def check_agcam_epilogue(delta, v, s) -> tuple[int, int, int, int, int]:
    """Returns (B, L, H, T, d)."""
    op = "agcam_epilogue"
    _expect(op, "delta", delta, "(B, L, H, d)", (None, None, None, None))
    B, L, H, d = delta.shape
    _expect(op, "v", v, "(B, L, H, T, d)", (B, L, H, None, d))
    T = v.shape[3]
    _expect(op, "s", s, "(B, L, H, T)", (B, L, H, T))
    _same_float(op, {"delta": delta, "v": v, "s": s})
    return B, L, H, T, d


def check_daam_block_maps(a, v, g) -> tuple[int, int, int, int, int]:
    """Returns (B, L, H, T, d)."""
    op = "daam_block_maps"
    _expect(op, "a", a, "(B, L, H, T)", (None, None, None, None))
    B, L, H, T = a.shape
    _expect(op, "v", v, "(B, L, H, T, d)", (B, L, H, T, None))
    d = v.shape[4]
    _expect(op, "g", g, "(B, L, H, d)", (B, L, H, d))
    _same_float(op, {"a": a, "v": v, "g": g})
    return B, L, H, T, d


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses a tensor's elements occupy (non-negative strides; numel > 0)."""
    first = t.data_ptr()
    last = first + (sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) + 1) * t.element_size()
    return first, last


def _overlap(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether the memory spans of x and y intersect (conservative for interleaved strided views)."""
    if x.numel() == 0 or y.numel() == 0 or x.device != y.device:
        return False
    (x0, x1), (y0, y1) = _byte_span(x), _byte_span(y)
    return x0 < y1 and y0 < x1


def check_safe_divide(a, b, out=None) -> tuple[int, int, int]:
    """Returns (P, K, Q). out, when given, is a contiguous (P, K, Q) tensor of a's dtype and device: a itself
    (in place) or memory that overlaps neither a nor b."""
    op = "safe_divide"
    _expect(op, "a", a, "(P, K, Q)", (None, None, None))
    P, K, Q = a.shape
    _expect(op, "b", b, "(P, Q)", (P, Q))
    _same_float(op, {"a": a, "b": b})
    if out is None:
        return P, K, Q
    _expect(op, "out", out, "(P, K, Q)", (P, K, Q))
    _same_float(op, {"a": a, "out": out})
    if not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous, got strides {out.stride()}")
    from vitx_fast.engine.dispatch import tracing  # fake tensors have no memory to compare

    if not tracing([a, b, out]):
        # each output element reads only a at its own index, so out may be a itself, but not a shifted alias of a,
        # and never b (b is read at every k)
        if _overlap(out, b):
            raise ValueError(f"{op}: out must not overlap b")
        same_as_a = out.data_ptr() == a.data_ptr() and a.is_contiguous()  # out is contiguous, of a's shape
        if not same_as_a and _overlap(out, a):
            raise ValueError(f"{op}: out must be a itself or not overlap it")
    return P, K, Q
