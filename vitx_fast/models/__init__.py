"""Model adapters (timm ViT) and, later, the bundled demo model."""
from vitx_fast.models.timm_adapter import (
    AttentionRecord,
    BlockRecord,
    ForwardRecord,
    TokenLayout,
    UnsupportedModelError,
    ViTAdapter,
)

__all__ = ["AttentionRecord", "BlockRecord", "ForwardRecord", "TokenLayout", "UnsupportedModelError", "ViTAdapter"]


def load_demo_model(*args, **kwargs):
    """The bundled demo ViT in eval mode (see vitx_fast.models.demo)."""
    from vitx_fast.models.demo import load_demo_model as _load

    return _load(*args, **kwargs)
