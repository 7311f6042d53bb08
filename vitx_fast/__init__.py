"""vitx-fast: exact, fast explanations for timm Vision Transformers."""
from vitx_fast.api import explain
from vitx_fast.backends import get_backend, list_backends, set_backend
from vitx_fast.explanation import Explanation
from vitx_fast.methods.daam_memory import MemoryBank
from vitx_fast.methods.registry import get_method, list_methods
from vitx_fast.models.timm_adapter import UnsupportedModelError, ViTAdapter
from vitx_fast.onnx_export import export_onnx
from vitx_fast.postprocess import normalize, upsample
from vitx_fast.tame import load_tame, train_tame

__version__ = "0.1.0"

__all__ = [
    "Explanation", "MemoryBank", "get_backend", "UnsupportedModelError", "ViTAdapter", "explain", "get_method", "list_backends",
    "list_methods", "load_tame", "normalize", "set_backend", "train_tame", "upsample", "__version__",
]
