"""Turn the user's `target` into class indices."""
from __future__ import annotations

import torch


def resolve_targets(target, logits: torch.Tensor | None, batch: int, *, method: str, multi_ok: bool,
                    class_agnostic: bool = False) -> torch.Tensor:
    """Return targets (B,) or (B, K), long, on the logits' device.

    target: None (top-1 of the logits), an int, a list of B ints, a list of B lists of K ints, a (B,) or (B, K)
    tensor, "topK" (the K highest logits per image, best first: (B, K); "top1" is the same as None), or "all"
    (every class; only for methods that compute all classes in one pass).
    """
    num_classes = None if logits is None else logits.shape[-1]
    device = logits.device if logits is not None else torch.device("cpu")
    if num_classes is None:
        if target is None:
            return torch.full((batch,), -1, dtype=torch.long, device=device)
        raise ValueError(f"{method}: target={target!r} was given but the model has no classification head")
    if target is None:
        return logits.argmax(-1)
    if isinstance(target, str) and target != "all":
        k = top_k(target)
        if k is None:
            raise ValueError(f"{method}: target must be None, an int, a list, a tensor, 'all' or 'topK' (e.g. "
                             f"'top5'); got {target!r}")
        if k > num_classes:
            raise ValueError(f"{method}: target={target!r} asks for {k} classes but the model has {num_classes}")
        return logits.argmax(-1) if k == 1 else logits.topk(k, dim=-1).indices
    if isinstance(target, str):
        if not (multi_ok or class_agnostic):
            raise ValueError(
                f"{method}: target='all' needs a method that yields every class in one pass (reciprocam, tame); "
                f"pass a (B, K) tensor of the classes you want instead"
            )
        return torch.arange(num_classes, device=device).expand(batch, num_classes).clone()
    if isinstance(target, bool):
        raise TypeError(f"{method}: target must be a class index, got a bool")
    if isinstance(target, int):
        if not 0 <= target < num_classes:  # before torch: 2**63 and beyond do not fit an int64
            raise ValueError(f"{method}: class index {target} out of range for a model with {num_classes} classes")
        t = torch.full((batch,), target, dtype=torch.long, device=device)
    else:
        try:
            t = torch.as_tensor(target, device=device)
        except (OverflowError, RuntimeError) as exc:  # ints beyond int64, or ragged lists
            raise ValueError(f"{method}: cannot read target {_short(target)} as class indices ({exc})") from None
        except Exception as exc:  # anything else that is not a number: a type problem
            raise TypeError(f"{method}: cannot read target {_short(target)} as class indices ({exc})") from None
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            if t.is_floating_point() and torch.equal(t, t.round()):
                t = t.long()
            else:
                raise TypeError(f"{method}: target must hold integer class indices, got dtype {t.dtype}")
        t = t.long()
        if t.dim() == 0:
            t = t.expand(batch).clone()
        elif t.dim() == 1:
            if t.shape[0] != batch:
                raise ValueError(f"{method}: target has {t.shape[0]} entries but the batch has {batch} images")
        elif t.dim() == 2:
            if t.shape[0] != batch:
                raise ValueError(f"{method}: target has shape {tuple(t.shape)} but the batch has {batch} images")
            if t.shape[1] == 0:
                raise ValueError(f"{method}: target has shape {tuple(t.shape)}: no classes requested")
        else:
            raise ValueError(f"{method}: target must be (B,) or (B, K), got shape {tuple(t.shape)}")
    bad = (t < 0) | (t >= num_classes)
    if bad.any():
        raise ValueError(
            f"{method}: class index {int(t[bad][0])} out of range for a model with {num_classes} classes"
        )
    return t


def _short(obj) -> str:
    text = repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."


def top_k(target) -> int | None:
    """'top5' -> 5 (K >= 1); anything else -> None."""
    if isinstance(target, str) and target.startswith("top") and target[3:].isdigit() and int(target[3:]) >= 1:
        return int(target[3:])
    return None


def target_columns(targets: torch.Tensor) -> list[torch.Tensor]:
    """(B,) -> [targets]; (B, K) -> K columns (B,)."""
    return [targets] if targets.dim() == 1 else list(targets.unbind(1))


def stack_columns(maps: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """The inverse of `target_columns` for per-column results: [(B, ...)] -> (B, ...) or (B, K, ...)."""
    return maps[0] if targets.dim() == 1 else torch.stack(maps, dim=1)


def onehot(targets: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """(B,) class indices -> (B, C) one-hot seeds of the backward."""
    return torch.nn.functional.one_hot(targets, num_classes).to(dtype)
