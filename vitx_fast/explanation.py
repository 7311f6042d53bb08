"""The result object of `vx.explain`."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Explanation:
    """Maps and what produced them.

    maps: (B, h, w) raw maps at the method's native scale, or (B, K, h, w) for several targets per image.
    targets: (B,) or (B, K) class indices used (long); -1 where a method had no class (headless model).
    logits: (B, C) logits of the unmodified forward; None for a headless model.
    flow: DAAM only, (B, L, h, w) (or (B, K, L, h, w)): the accumulated map after each block.
    method, backend: what ran. options: the resolved options. extras: method-specific tensors.
    """

    maps: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor | None
    method: str
    backend: str
    flow: torch.Tensor | None = None
    options: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.maps.shape[-2:])

    def normalized(self, eps: float = 1e-12) -> torch.Tensor:
        from vitx_fast.postprocess import normalize

        return normalize(self.maps, eps=eps)

    def __repr__(self) -> str:
        flow = f", flow={tuple(self.flow.shape)}" if self.flow is not None else ""
        return (
            f"Explanation(method={self.method!r}, backend={self.backend!r}, maps={tuple(self.maps.shape)}, "
            f"targets={tuple(self.targets.shape)}{flow})"
        )
