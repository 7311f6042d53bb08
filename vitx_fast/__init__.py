"""vitx-fast: exact, fast explanations for timm Vision Transformers."""
from vitx_fast.api import explain, not_supported_reasons
from vitx_fast.engine.adapter import UnsupportedModelError, ViTAdapter
from vitx_fast.engine.backends import get_backend, list_backends, set_backend
from vitx_fast.explanation import Explanation
from vitx_fast.imaging import overlay, preprocess
from vitx_fast.jobs.read import read_errors, read_results
from vitx_fast.methods import get_method, list_methods
from vitx_fast.methods.daam.memory_bank import MemoryBank
from vitx_fast.methods.tame import load_tame, train_tame
from vitx_fast.onnx_export import export_onnx
from vitx_fast.postprocess import normalize, upsample

__version__ = "0.1.0"

__all__ = [
    "Explanation", "MemoryBank", "UnsupportedModelError", "ViTAdapter", "__version__", "explain", "export_onnx",
    "get_backend", "get_method", "list_backends", "list_methods", "load_tame", "normalize", "not_supported_reasons",
    "overlay", "preprocess", "read_errors", "read_results", "set_backend", "train_tame", "upsample",
]
