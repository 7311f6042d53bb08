"""The cpp and triton backends: each fused implementation that calls fused ops, run with the ops forced to one
kernel family. Registered for the methods whose fast path goes through `vitx_fast.ops`."""
from __future__ import annotations

import torch

from vitx_fast.ops._dispatch import forced

# method -> fused ops its fast path calls
OPS_BY_METHOD = {
    "reciprocam": ("masked_variant_attention",),
    "agcam": ("agcam_epilogue",),
    "daam": ("daam_block_maps",),
}


def _reciprocam_extra(adapter, opts) -> list[str]:
    attn = adapter.model.blocks[-1].attn
    if not (isinstance(attn.q_norm, torch.nn.Identity) and isinstance(attn.k_norm, torch.nn.Identity)):
        return ["qk_norm makes the masked keys non-affine in the mask weight: the fused op does not apply"]
    return []


EXTRA = {"reciprocam": _reciprocam_extra}


def _make(method, method_name: str, backend: str):
    fused = method.impls["fused"]

    def supports(adapter, opts):
        reasons = fused.supports(adapter, opts) if fused.supports else []
        extra = EXTRA.get(method_name)
        return reasons + (extra(adapter, opts) if extra else [])

    def impl(adapter, images, resolve, opts):
        with forced(backend):
            return fused(adapter, images, resolve, opts)

    impl.__name__ = f"{method_name}_{backend}"
    method.register(backend, resolves_targets=True, supports=supports)(impl)
    impl.ops = OPS_BY_METHOD[method_name]


def register_all(methods: dict) -> None:
    for name in OPS_BY_METHOD:
        for backend in ("cpp", "triton"):
            _make(methods[name], name, backend)
