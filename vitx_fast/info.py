"""`python -m vitx_fast.info` / `vitx info`: versions, devices, native module, and the method x backend matrix."""
from __future__ import annotations

import platform

import torch


def collect(model=None) -> dict:
    import timm

    from vitx_fast import __version__, _ext
    from vitx_fast.engine.adapter import ViTAdapter
    from vitx_fast.engine.backends import list_backends, support_matrix
    from vitx_fast.methods.registry import get_method, list_methods

    return {
        "vitx_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda_available": torch.cuda.is_available(),
        "devices": ["cpu"] + [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())],
        "threads": torch.get_num_threads(),
        "native": {"available": _ext.is_available(), "error": _ext.import_error(),
                   "build": dict(_ext._C.build_info()) if _ext.is_available() else None},
        "backends": list_backends(),
        "methods": {m: get_method(m).summary for m in list_methods()},
        "matrix": support_matrix([get_method(m) for m in list_methods()],
                                 None if model is None else ViTAdapter(model)),
        "ops": _ops_info(),
    }


def _ops_info() -> dict:
    from vitx_fast import ops

    return {"availability": ops.availability(), "cpp_default": ops.cpp_defaults()}


def render(info: dict) -> str:
    lines = [
        f"vitx-fast {info['vitx_fast']}  python {info['python']}  torch {info['torch']}  timm {info['timm']}",
        f"devices: {', '.join(info['devices'])}  (CUDA available: {info['cuda_available']}; "
        f"CPU threads: {info['threads']})",
    ]
    nat = info["native"]
    lines.append("native module: " + (f"loaded {nat['build']}" if nat["available"] else f"not loaded ({nat['error']})"))
    lines.append("")
    lines.append("methods:")
    for m, s in info["methods"].items():
        lines.append(f"  {m:<13} {s}")
    lines.append("")
    backends = info["backends"]
    lines.append("method x backend (ok, or why not):")
    width = max(len(b) for b in backends) + 2
    lines.append("  " + " " * 13 + "".join(f"{b:<{width}}" for b in backends))
    notes = []
    for m, row in info["matrix"].items():
        cells = []
        for b in backends:
            reasons = row.get(b, [])
            if reasons:
                notes.append(f"  {m} / {b}: {'; '.join(reasons)}")
            cells.append("ok" if not reasons else "-")
        lines.append(f"  {m:<13}" + "".join(f"{c:<{width}}" for c in cells))
    if notes:
        lines.append("")
        lines.append("not available:")
        lines.extend(notes)
    ops = info["ops"]
    lines.append("")
    lines.append("fused ops, kernel families (auto: triton on CUDA, cpp on CPU where it beats torch, else reference):")
    for impl, why in ops["availability"].items():
        lines.append(f"  {impl:<10} {'available' if why is None else 'not available: ' + why}")
    for op, cpp in ops["cpp_default"].items():
        lines.append(f"  {op:<26} CPU default: {'cpp' if cpp else 'reference (the C++ kernel does not beat torch)'}")
    return "\n".join(lines)


def main() -> None:
    print(render(collect()))


if __name__ == "__main__":
    main()
