"""Memory budgets: how many images one pass of a method may hold, and whether a gradient pass saves the forward's
activations or recomputes them (docs/methods/gae.md §5).

Every method takes the shared option `memory_budget` (bytes of working memory on top of the model and the inputs):

- `None` (default): the model's weights, twice a plain forward's activation peak of the same batch, and DEFAULT_MARGIN.
  A process that ran a plain forward already holds the weights and one activation peak, so a method then peaks at
  most at about twice that forward's peak plus the margin;
- an int > 0, or a string with a unit ("512MB", "2GiB");
- "unlimited": one pass over the whole batch in the fastest mode.

An implementation states its memory per image for each way it can run (`Implementation.memory_modes`), e.g.
{"save": ..., "recompute": ...} in order of preference (fastest first). `choose` then picks the first mode in which
at least one image fits and the largest chunk of images that fits it; the batch runs in chunks of that size (the
maths of every method is per image, so the maps equal those of one pass over the batch).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

DEFAULT_MARGIN = 512 * 2**20
UNLIMITED = "unlimited"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_budget(value, name: str = "memory_budget") -> int | float | None:
    """None (auto), an int > 0 / a "512MB"-style string (bytes) or "unlimited" (math.inf). ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        s = value.strip().lower()
        if s == UNLIMITED:
            return math.inf
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?", s)
        if m and float(m.group(1)) > 0:
            return int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    elif not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0:
        return math.inf if value == math.inf else int(value)
    raise ValueError(f"{name} must be None (the default: about one plain forward's peak plus "
                     f"{DEFAULT_MARGIN // 2**20} MiB), a number "
                     f"of bytes > 0, a size such as '2GB' or '512MiB', or 'unlimited'; got {value!r}")


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def forward_peak_bytes(adapter, batch: int, tokens: int) -> int:
    """Estimated activation peak of one plain forward of `batch` images with `tokens` tokens each (bytes): the
    residual stream, the qkv and MLP activations of one block (10 D per token) and, for an unfused attention, its
    (H, T, T) scores and probabilities."""
    D, H = adapter.embed_dim, adapter.num_heads
    fused = all(getattr(b.attn, "fused_attn", False) for b in adapter.model.blocks)
    per_token = 10 * D + (0 if fused else 2 * H * tokens)
    return batch * tokens * per_token * element_size(adapter.dtype)


def weights_bytes(model) -> int:
    """Bytes of the model's parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def default_budget(adapter, batch: int, tokens: int) -> int:
    """The budget of `memory_budget=None` (bytes): the weights, twice a plain forward's activation peak of the batch,
    and DEFAULT_MARGIN. Peak resident memory = the process's baseline (at least the weights) + the method's working
    memory <= 2 x (baseline + one forward's activations) + DEFAULT_MARGIN = 2 x a plain forward's peak + the margin."""
    return weights_bytes(adapter.model) + 2 * forward_peak_bytes(adapter, batch, tokens) + DEFAULT_MARGIN


@dataclass
class MemoryPlan:
    """The outcome of `choose`: `mode` (a key of the implementation's memory_modes), `chunk` images per pass,
    `budget` bytes (math.inf: unlimited), `per_image` bytes estimated in that mode, `fits` False when not even one
    image fits the budget in any mode (it then runs one image at a time in the leanest mode)."""

    mode: str
    chunk: int
    budget: float
    per_image: int
    fits: bool = True

    def report(self, batch: int) -> dict:
        """What Explanation.extras["memory"] says about the run."""
        return {"mode": self.mode, "chunk": min(self.chunk, batch), "chunks": -(-batch // self.chunk),
                "budget": self.budget, "estimate_per_image": self.per_image, "fits": self.fits}


def choose(modes: dict[str, int], batch: int, budget: float) -> MemoryPlan:
    """modes: bytes per image by mode, fastest first. The first mode in which one image fits, with the largest chunk
    that fits (at most the batch); the last (leanest) mode, one image at a time, when nothing fits."""
    if not modes:
        raise ValueError("choose: an implementation must state at least one memory mode")
    for mode, per in modes.items():
        if per <= budget:
            chunk = batch if per <= 0 or budget == math.inf else max(1, min(batch, int(budget // per)))
            chunk = -(-batch // -(-batch // chunk))  # equal chunks (8 at most 7 -> 4 + 4, not 7 + 1)
            return MemoryPlan(mode, chunk, budget, per)
    mode, per = list(modes.items())[-1]
    return MemoryPlan(mode, 1, budget, per, fits=False)


def resolve_budget(value, adapter, batch: int, tokens: int) -> float:
    """The budget in bytes for a batch: the parsed option, or the default for None."""
    b = parse_budget(value)
    return default_budget(adapter, batch, tokens) if b is None else b
