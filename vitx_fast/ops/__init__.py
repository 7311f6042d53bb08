"""Fused ops: public functionals that pick the reference, C++ or Triton kernel by device and availability.

    from vitx_fast import ops
    ctx = ops.masked_variant_attention(q, pk, pv, idx, m, valid, log_nz, bk, bv)   # ReciproCAM fast path
    cam = ops.agcam_epilogue(delta, v, s)                                            # AGCAM
    maps = ops.daam_block_maps(a, v, g)                                              # DAAM
    S = ops.safe_divide(R, Z)                                                        # LRP: R / (Z + 1e-9), Z over K
    ops.last_kernels("agcam_epilogue")   # -> "cpp" | "reference" | "triton"

Each takes `kernels=` ("reference" | "cpp" | "triton") to force one family; see `vitx_fast.ops._kernels`.
"""
import importlib

from vitx_fast.engine.dispatch import KERNEL_FAMILIES
from vitx_fast.ops._kernels import availability, last_kernels, not_supported_reasons, reset_record
from vitx_fast.ops.agcam_epilogue import agcam_epilogue
from vitx_fast.ops.daam_block_maps import daam_block_maps
from vitx_fast.ops.masked_variant_attention import masked_variant_attention
from vitx_fast.ops.safe_divide import safe_divide

OPS = ("masked_variant_attention", "agcam_epilogue", "daam_block_maps", "safe_divide")
FAMILIES = tuple(KERNEL_FAMILIES)


def cpp_defaults() -> dict[str, bool]:
    """op -> whether auto dispatch uses the C++ kernel on CPU (it beat torch in benchmarks/results/ops.md)."""
    return {op: importlib.import_module(f"vitx_fast.ops.{op}").CPP_DEFAULT for op in OPS}


__all__ = [
    "FAMILIES", "OPS", "agcam_epilogue", "availability", "cpp_defaults", "daam_block_maps", "last_kernels",
    "masked_variant_attention", "not_supported_reasons", "reset_record", "safe_divide",
]
