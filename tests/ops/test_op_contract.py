"""The contract every fused op (masked_variant_attention, agcam_epilogue, daam_block_maps, safe_divide) keeps in every
kernel family (reference, cpp, triton), written once and parametrised over (op, family) with the op specs of
tests/ops/op_specs.py:

- matches the float64 reference within the flash-attention rule (`assert_close_to_baseline`), on fixed and on seeded
  random shapes (the Triton interpreter gets fewer and smaller ones);
- deterministic (run twice), no out-of-bounds reads (inputs in NaN-padded buffers), strided inputs;
- readable shape errors from the public op, validation at the C++ binding, C++ results independent of the thread count;
- explicit kernel families refused with the dispatcher's reasons; auto dispatch recorded by `ops.last_kernels`;
- CUDA tensors dispatch to triton (gpu).

Each op's own maths (the reference against the published formula) is in tests/ops/test_<op>.py.
"""
import importlib
import re

import pytest
import torch
from op_specs import SPECS, cast
from ops_utils import DTYPES, FAMILIES, FAST_FAMILIES, assert_close_to_baseline, kernel, nan_padded, to64
from utils import NATIVE, NATIVE_MARKS, family_marks

import vitx_fast.ops as ops
from vitx_fast import _ext


def _shape_id(spec, shape):
    return "-".join(f"{k}{v}" for k, v in zip(spec.dims, shape, strict=True))


def _op_params(marks=()):
    """One param per op, id = the op's name."""
    return [pytest.param(spec, id=name, marks=marks) for name, spec in SPECS.items()]


def _family_params(families=FAMILIES):
    """(spec, family) for every op and family, id "<family>-<op>"."""
    return [pytest.param(spec, fam, id=f"{fam}-{name}", marks=family_marks(fam))
            for fam in families for name, spec in SPECS.items()]


def _parity_params():
    """(spec, family, shape, dtype), id like "cpp-agcam_epilogue-fp32-B3-L2-H3-T17-d7"."""
    return [pytest.param(spec, fam, shape, dt.values[0], id=f"{fam}-{name}-{dt.id}-{_shape_id(spec, shape)}",
                         marks=family_marks(fam))
            for fam in FAMILIES for name, spec in SPECS.items() for dt in DTYPES
            for shape in (spec.triton_shapes if fam == "triton" else spec.shapes)]


def _seed_params(n=8, n_triton=3):
    """(spec, family, seed): n seeded random shapes per family, n_triton under the Triton interpreter."""
    return [pytest.param(spec, fam, seed, id=f"{fam}-{name}-seed{seed}", marks=family_marks(fam))
            for fam in FAMILIES for name, spec in SPECS.items() for seed in range(n_triton if fam == "triton" else n)]


# ---------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("spec, family, shape, dtype", _parity_params())
def test_matches_reference(spec, family, shape, dtype):
    args = spec.make(shape, dtype=dtype)
    out = kernel(spec.name, family)(*args)
    assert_close_to_baseline(out, args, spec.name, f"{family} {shape}")
    if spec.check_output is not None:
        spec.check_output(out)


@pytest.mark.parametrize("spec, family, seed", _seed_params())
def test_random_shapes(spec, family, seed):
    shape, dtype = spec.random_shape(seed)
    args = spec.make(shape, dtype=dtype, seed=seed)
    assert_close_to_baseline(kernel(spec.name, family)(*args), args, spec.name, f"{family} {shape} {dtype}")


# ---------------------------------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("spec, family", _family_params())
def test_deterministic(spec, family):
    args = spec.make(spec.small, dtype=torch.float32, seed=1)
    fn = kernel(spec.name, family)
    assert torch.equal(fn(*args), fn(*args))


@pytest.mark.parametrize("spec, family", _family_params(FAST_FAMILIES))
def test_no_out_of_bounds_reads(spec, family):
    """Inputs inside NaN-filled (or garbage-filled) buffers: any read past an edge would make the output NaN."""
    args = spec.make(spec.padded, seed=2)
    out = kernel(spec.name, family)(*[nan_padded(a) for a in args])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, kernel(spec.name, "reference")(*args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec, family", _family_params(FAST_FAMILIES))
def test_strided_inputs(spec, family):
    """The op's inputs as the strided views the fast paths produce (value slices of a qkv tensor whose other slices
    are NaN; a transposed attention row), against the reference on the contiguous ones."""
    args = spec.make(spec.strided_shape or spec.padded, seed=4)
    strided = spec.strided(args)
    assert any(not s.is_contiguous() for s in strided)
    out = kernel(spec.name, family)(*strided)
    torch.testing.assert_close(out, kernel(spec.name, "reference")(*args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec", _op_params())
def test_shape_errors_are_readable(spec):
    for bad, pattern in spec.shape_errors():
        with pytest.raises(ValueError, match=pattern):
            spec.op(*bad)


@pytest.mark.parametrize("spec", _op_params(marks=NATIVE_MARKS))
def test_binding_validates(spec):
    fn = getattr(_ext._C, spec.name)
    for arrays, pattern in spec.binding_errors():
        with pytest.raises(ValueError, match=pattern):
            fn(*arrays)


@pytest.mark.parametrize("spec", _op_params(marks=NATIVE_MARKS))
def test_cpp_result_does_not_depend_on_thread_count(spec):
    """The C++ kernel splits work by torch.get_num_threads(); every output entry keeps its summation order."""
    args = spec.make(spec.thread_shape or spec.small, dtype=torch.float32, seed=1)
    fn, before = kernel(spec.name, "cpp"), torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(fn(*args))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


# ---------------------------------------------------------------------------------------------------- dispatch
def _refused(op: str, family: str, reason: str) -> str:
    """The dispatcher's refusal of an explicit family (vitx_fast.engine.dispatch.run_priority_list): a header line,
    then the family's reasons joined by "; ". `reason` is a regex for one of them."""
    return rf"^kernel family '{family}' cannot run {op}:\n  {family}: (.*; )?{reason}(; .*)?$"


@pytest.mark.parametrize("name", ["cuda", "fast", "numba"])
@pytest.mark.parametrize("spec", _op_params())
def test_unknown_kernel_family_refused(spec, name):
    args = spec.make(spec.tiny, dtype=torch.float32)
    with pytest.raises(ValueError, match=f"^{re.escape(f'unknown kernel family {name!r}; choose one of: ')}"
                                         "triton, cpp, reference$"):
        spec.op(*args, kernels=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("spec", _op_params())
def test_cpp_refuses_low_precision(spec, dtype):
    args = cast(spec.make(spec.tiny, dtype=torch.float32), dtype)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=_refused(spec.name, "cpp", rf"cpp does not support {name} \(supports "
                                                                     r"float32, float64\)")):
        spec.op(*args, kernels="cpp")


@pytest.mark.parametrize("family", FAST_FAMILIES)
@pytest.mark.parametrize("spec", _op_params())
def test_fast_kernels_refuse_autograd(spec, family):
    args = spec.make(spec.tiny, dtype=torch.float32)
    args[spec.grad_arg] = args[spec.grad_arg].clone().requires_grad_(True)
    with pytest.raises(ValueError, match=_refused(spec.name, family, f"{family} kernels are not differentiable and "
                                                                     "an input requires grad")):
        spec.op(*args, kernels=family)


@pytest.mark.parametrize("spec", _op_params())
def test_triton_refuses_cpu_without_interpreter(spec, monkeypatch):
    args = spec.make(spec.tiny, dtype=torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=_refused(spec.name, "triton", r"triton does not run on 'cpu' \(supports "
                                                                       r"cuda\)")):
        spec.op(*args, kernels="triton")


@pytest.mark.parametrize("spec", _op_params())
def test_cpp_refused_without_native_module(spec, monkeypatch):
    args = spec.make(spec.tiny, dtype=torch.float32)
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_IMPORT_ERROR", "ImportError: simulated")
    with pytest.raises(ValueError, match=_refused(spec.name, "cpp", r"the native module vitx_fast\._C is not "
                                                                    r"available \(ImportError: simulated\)")):
        spec.op(*args, kernels="cpp")


@pytest.mark.parametrize("spec", _op_params())
def test_auto_dispatch_records_the_kernels(spec, monkeypatch):
    """On CPU, auto dispatch picks cpp only when the op is listed as beating torch (CPP_DEFAULT) and the native module
    loaded; float16 and autograd always get the reference."""
    args = spec.make(spec.auto_shape or spec.tiny, dtype=torch.float32)
    module = importlib.import_module(f"vitx_fast.ops.{spec.name}")
    assert ops.cpp_defaults()[spec.name] is module.CPP_DEFAULT
    outs = []
    for listed in (True, False):
        monkeypatch.setattr(module, "CPP_DEFAULT", listed)
        outs.append(spec.op(*args))
        assert ops.last_kernels(spec.name) == ("cpp" if listed and NATIVE else "reference")
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(module, "CPP_DEFAULT", True)
    spec.op(*cast(args, torch.float16))
    assert ops.last_kernels(spec.name) == "reference"  # no fast kernel for float16 on CPU
    grad_args = list(args)
    grad_args[spec.grad_arg] = args[spec.grad_arg].clone().requires_grad_(True)
    spec.op(*grad_args).sum().backward()
    assert ops.last_kernels(spec.name) == "reference"  # autograd needs the differentiable path


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=["fp16", "fp32", "fp64"])
@pytest.mark.parametrize("spec", _op_params())
def test_cuda_dispatches_to_triton(spec, dtype):
    pytest.importorskip("triton")
    args = [a.cuda() for a in spec.cuda_args(dtype)]
    out = spec.op(*args)
    assert ops.last_kernels(spec.name) == "triton"
    expected = kernel(spec.name, "reference")(*to64(args))
    tol = {torch.float16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))

