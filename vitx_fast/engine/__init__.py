"""Method-agnostic pieces every method builds on; nothing here imports `vitx_fast.methods`.

- `adapter`: the timm ViT adapter (token layout, input checks, instrumented forward with the engine's own attention
  capture) and its records.
- `blocks`: the pre-norm block tail, written once. `chains`: rollout-style matrix and row-vector chains.
- `vjp`: explicit VJPs of timm ViT pieces. `gradients`: one forward, many backward seeds (explicit VJPs or autograd).
- `targets`: the user's `target` -> class indices. `dispatch`: the capability vocabulary and the priority walk.
  `backends`: which implementation and kernel family run a method.
"""
from vitx_fast.engine.adapter import (
    AttentionRecord,
    BlockRecord,
    ForwardRecord,
    TokenLayout,
    UnsupportedModelError,
    ViTAdapter,
)

__all__ = ["AttentionRecord", "BlockRecord", "ForwardRecord", "TokenLayout", "UnsupportedModelError", "ViTAdapter"]
