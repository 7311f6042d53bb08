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
