"""Running a batch in chunks of images (the `memory_budget` option, vitx_fast.engine.memory): the pieces that do not
depend on a method. Every method's maths is per image, so a chunked run equals one pass over the batch."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from vitx_fast.engine.targets import top_k


def targets_per_image(target, num_classes: int, class_agnostic: bool = False) -> int:
    """K, the classes explained per image for a `target` argument (1 for None, an int, a (B,) form)."""
    if class_agnostic:
        return 1
    if isinstance(target, str):
        return num_classes if target == "all" else (top_k(target) or 1)
    shape = getattr(target, "shape", None)  # tensors, numpy arrays
    if shape is not None:
        return int(shape[1]) if len(shape) == 2 else 1
    if per_image_target(target) and len(target) and hasattr(target[0], "__len__") and not isinstance(target[0], str):
        return len(target[0])
    return 1


def per_image_target(target) -> bool:
    """True when `target` lists classes per image (a list, tuple, range, tensor or numpy array with a batch
    dimension): chunks slice it."""
    if isinstance(target, (str, bytes)):
        return False
    ndim = getattr(target, "ndim", None)  # tensors, numpy arrays and scalars
    return ndim >= 1 if isinstance(ndim, int) else isinstance(target, Sequence)


def spans(batch: int, chunk: int) -> list[tuple[int, int]]:
    """[(start, stop)] covering range(batch) in chunks of `chunk` images."""
    return [(s, min(s + chunk, batch)) for s in range(0, batch, chunk)]


def concat(parts: Sequence, sizes: Sequence[int]):
    """Join per-chunk values along the batch: tensors whose first dimension is the chunk's size are concatenated,
    dicts and lists recursively; anything else (a per-call constant) is taken from the first chunk."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        if first.dim() >= 1 and all(p.dim() >= 1 and p.shape[0] == n for p, n in zip(parts, sizes, strict=True)):
            return torch.cat(list(parts), dim=0)
        return first
    if isinstance(first, dict):
        return {k: concat([p[k] for p in parts], sizes) for k in first}
    if isinstance(first, list) and all(isinstance(p, list) and len(p) == len(first) for p in parts):
        return [concat([p[i] for p in parts], sizes) for i in range(len(first))]
    return first
