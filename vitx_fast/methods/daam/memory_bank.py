"""kNN memory bank for self-supervised DAAM (docs/methods/daam.md §1): DINO's `eval_knn.py` feature dump and the
dimension-wise weights of `contri_weight_generate` (ly9802/DynamicAccumulatedAttentionMap,
DINO_DAAM_Visualization_oneSample.py), batched over images.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

MAX_CLASSES = 100_000  # more than ImageNet-22k's classes; bounds the vote's (B, k, classes) buffer


class MemoryBank:
    """Training features and labels for the kNN vote.

    features: (Ntrain, D), each row L2-normalised; labels: (Ntrain,) int64 class indices >= 0.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, normalized: bool = True):
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
            raise ValueError("MemoryBank: features must be a float tensor of shape (Ntrain, D)")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"MemoryBank: labels must be a tensor of shape ({features.shape[0]},)")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"MemoryBank: labels must hold integer class indices, got dtype {labels.dtype}")
        if features.shape[0] == 0:
            raise ValueError("MemoryBank: the bank is empty")
        if (labels < 0).any():
            raise ValueError("MemoryBank: labels must be >= 0")
        if int(labels.max()) >= MAX_CLASSES:  # the vote holds one slot per class and neighbour
            raise ValueError(f"MemoryBank: labels must be < {MAX_CLASSES} (class indices), got {int(labels.max())}")
        if not torch.isfinite(features).all():
            raise ValueError("MemoryBank: features hold NaN or inf")
        self.features = features if normalized else F.normalize(features, dim=1, p=2, eps=1e-12)
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def __repr__(self) -> str:
        return f"MemoryBank(size={len(self)}, dim={self.dim}, classes={self.num_classes}, dtype={self.features.dtype})"

    # ------------------------------------------------------------------ building, saving, loading
    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, images_or_dataloader, labels=None, batch_size: int = 64) -> MemoryBank:
        """Features f = model(x) (eval mode, un-normalised), then L2-normalised per row.

        images_or_dataloader: a (N, C, H, W) tensor with `labels` (N,), or an iterable (e.g. a DataLoader) of
        (images (b, C, H, W), labels (b,)) batches.
        """
        param = next(model.parameters())
        if isinstance(images_or_dataloader, torch.Tensor):
            if labels is None:
                raise ValueError("MemoryBank.build: labels are required when images are given as a tensor")
            images = images_or_dataloader
            labels = torch.as_tensor(labels)
            if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
                raise ValueError(f"MemoryBank.build: labels must have shape ({images.shape[0]},), got "
                                 f"{tuple(labels.shape)}")
            if batch_size < 1:
                raise ValueError(f"MemoryBank.build: batch_size must be >= 1, got {batch_size}")
            batches: Iterable = ((images[i:i + batch_size], labels[i:i + batch_size])
                                 for i in range(0, images.shape[0], batch_size))
        else:
            if labels is not None:
                raise ValueError("MemoryBank.build: labels= is only for a tensor of images; a DataLoader yields "
                                 "(images, labels) batches")
            batches = images_or_dataloader
        modes = [(m, m.training) for m in model.modules()]
        feats, labs = [], []
        try:
            model.eval()
            for batch in batches:
                if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                    raise ValueError("MemoryBank.build: each batch must be an (images, labels) pair")
                x, y = batch[0], torch.as_tensor(batch[1])
                f = model(x.to(device=param.device, dtype=param.dtype))
                if f.dim() != 2:
                    raise ValueError(f"MemoryBank.build: model(x) must return (B, D) features, got {tuple(f.shape)}")
                feats.append(F.normalize(f, dim=1, p=2, eps=1e-12))
                labs.append(y.reshape(-1).long().to(f.device))
        finally:
            for m, mode in modes:
                m.training = mode
        if not feats:
            raise ValueError("MemoryBank.build: no images were given")
        return cls(torch.cat(feats), torch.cat(labs))

    def save(self, path) -> None:
        """Write `features` and `labels` to a safetensors file."""
        from safetensors.torch import save_file

        save_file({"features": self.features.detach().contiguous().cpu(),
                   "labels": self.labels.detach().contiguous().cpu()}, os.fspath(path))

    @classmethod
    def load(cls, path, device=None) -> MemoryBank:
        """Read a bank written by `save` (safetensors with tensors `features` (N, D) and `labels` (N,))."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"MemoryBank.load: no memory bank file at {path!r}")
        try:
            tensors = load_file(path, device="cpu" if device is None else str(device))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"MemoryBank.load: {path!r} is not a readable safetensors file ({exc})") from None
        missing = {"features", "labels"} - set(tensors)
        if missing:
            raise ValueError(f"MemoryBank.load: {path!r} lacks tensor(s) {sorted(missing)} "
                             f"(found {sorted(tensors)})")
        try:
            return cls(tensors["features"], tensors["labels"])
        except ValueError as exc:
            raise ValueError(f"MemoryBank.load: {path!r} holds a malformed bank: {exc}") from None

    # ------------------------------------------------------------------ the kNN weights
    @torch.no_grad()
    def weights(self, f: torch.Tensor, k: int = 20, temperature: float = 0.07) -> tuple[torch.Tensor, torch.Tensor]:
        """Dimension-wise weights of `contri_weight_generate`, per image.

        f: (B, D) un-normalised features model(x). Returns w (B, D) in [0, 1] and the voted class (B,) long.
        k larger than the bank is clamped to its size (the reference's topk would fail).
        """
        if f.dim() != 2 or f.shape[1] != self.dim:
            raise ValueError(f"MemoryBank.weights: features must be (B, {self.dim}), got {tuple(f.shape)}")
        k = min(int(k), len(self))
        bank = self.features.to(device=f.device, dtype=f.dtype)
        labels = self.labels.to(f.device)
        fn = F.normalize(f, dim=1, p=2, eps=1e-12)
        sims, idx = (fn @ bank.T).topk(k, dim=-1, largest=True, sorted=True)  # (B, k)
        nlab = labels[idx]  # (B, k)
        onehot = torch.zeros(f.shape[0], k, self.num_classes, dtype=f.dtype, device=f.device)
        onehot.scatter_(2, nlab.unsqueeze(-1), 1)
        votes = (onehot * (sims / temperature).exp().unsqueeze(-1)).sum(dim=1)  # (B, classes)
        pred = votes.sort(dim=1, descending=True)[1][:, 0]  # the reference's tie order
        w = torch.empty_like(f)
        for b in range(f.shape[0]):  # the voted class has >= 1 neighbour; mean over those, in rank order
            same = idx[b][nlab[b] == pred[b]]
            p = (fn[b].unsqueeze(1) * bank[same].T).mean(dim=-1)  # (D,), product then mean as the reference
            w[b] = contribution_minmax(p)
        return w, pred


def contribution_minmax(p: torch.Tensor) -> torch.Tensor:
    """p: (D,) -> minmax(p / |Σp|) (division skipped when Σp = 0; all ones when p is constant), as the reference's
    `contribution_weight` then `max_min_normal`."""
    s = p.sum()
    if s != 0:
        p = p / s.abs()
    if p.max() > p.min():
        return (p - p.min()) / (p.max() - p.min())
    return torch.ones_like(p)


def self_neighbour_weights(f: torch.Tensor) -> torch.Tensor:
    """Engine fallback without a bank (docs/methods/daam.md §1.2): the image is its own only neighbour.
    f: (B, D) -> w (B, D)."""
    fn = F.normalize(f, dim=1, p=2, eps=1e-12)
    return torch.stack([contribution_minmax(row * row) for row in fn])


def resolve_bank(option) -> MemoryBank | None:
    """The `memory_bank` option: None, a MemoryBank, or a path to a saved one (loaded)."""
    if option is None or isinstance(option, MemoryBank):
        return option
    return MemoryBank.load(option)
