"""Train a T-TAME attention mechanism on a frozen timm ViT (docs/methods/tame.md §1.4).

Per batch: one no-grad backbone pass gives the norm1 features and the logits; y = argmax(logits) (dataset labels are
ignored); the AM (BN in training mode) gives a = sigmoid(c); the masked image up(a[i, y_i]) * x_i goes through the
frozen backbone a second time with gradients flowing to the map only; Loss = 1.5 CE + 2 Area + 0.01 TV on the B x B
map set a[:, y]. SGD Nesterov (weight decay on non-bias parameters) with OneCycleLR stepped per batch.

Determinism: the AM is initialised from `seed`, each epoch's shuffle and the global torch RNG are seeded from
(seed, epoch) inside `torch.random.fork_rng` (the caller's RNG is untouched), and every epoch ends with an atomic
checkpoint of the AM, optimizer, scheduler and RNG states, so `resume=True` reproduces an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from vitx_fast.data.images import image_files
from vitx_fast.engine.adapter import ViTAdapter
from vitx_fast.methods.tame import checkpoint as ckpt
from vitx_fast.methods.tame.losses import MASKINGS, mask_images, select_maps, tame_loss
from vitx_fast.methods.tame.module import TAMEExplainer, capture_features, resolve_layers

FINAL_NAME = "tame.safetensors"
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ optimiser, schedule
def make_optimizer(am: torch.nn.Module, lr: float = 1e-3, momentum: float = 0.9,
                   weight_decay: float = 5e-4) -> torch.optim.SGD:
    """SGD Nesterov; group 0: parameters named `bias` (no decay), group 1: the rest incl. BN gamma (decay)."""
    no_decay, decay = [], []
    for mod in am.modules():
        for name, p in mod.named_parameters(recurse=False):
            (no_decay if name == "bias" else decay).append(p)
    opt = torch.optim.SGD(no_decay, lr=lr, momentum=momentum, nesterov=True)
    opt.add_param_group({"params": decay, "weight_decay": weight_decay})
    return opt


def make_scheduler(opt: torch.optim.Optimizer, max_lr: float, total_steps: int):
    """OneCycleLR with PyTorch defaults (pct_start 0.3, cos, div 25, final div 1e4, momentum 0.95 -> 0.85 -> 0.95)."""
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr, total_steps=total_steps)


# ------------------------------------------------------------------------------------------ data
class ImageFolderData(torch.utils.data.Dataset):
    """Every image under `root` (recursive), labels ignored; the authors' train transform at the model's size:
    Resize(S / crop_pct), RandomCrop(S), RandomHorizontalFlip, ToTensor, Normalize(mean, std)."""

    def __init__(self, root, size: tuple[int, int], mean, std, crop_pct: float = 0.875, augment: bool = True):
        import torchvision.transforms as T

        root = Path(root)
        self.files = image_files(root)
        if not self.files:
            raise ValueError(f"no images found under {root}")
        scale = int(math.floor(min(size) / crop_pct))
        crop = [T.RandomCrop(size), T.RandomHorizontalFlip()] if augment else [T.CenterCrop(size)]
        self.transform = T.Compose([T.Resize(scale), *crop, T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB"))


def _first(batch):
    """A collated batch -> the image tensor (labels and other fields ignored)."""
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    elif isinstance(batch, dict):
        batch = batch.get("image", batch.get("images"))
    if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
        raise TypeError("training data must yield image tensors (B, 3, H, W), or (images, labels) pairs")
    return batch


class _Batches:
    """One epoch's batches for an image tensor, a Dataset or a user DataLoader; len() = steps per epoch."""

    def __init__(self, data, batch_size: int, num_workers: int):
        self.data, self.batch_size, self.num_workers = data, batch_size, num_workers

    def __len__(self):
        if isinstance(self.data, torch.utils.data.DataLoader):
            return len(self.data)
        return math.ceil(len(self.data) / self.batch_size)

    def epoch(self, seed: int):
        if isinstance(self.data, torch.utils.data.DataLoader):
            yield from (_first(b) for b in self.data)  # its own order (seeded through the global RNG)
            return
        g = torch.Generator().manual_seed(seed)
        if isinstance(self.data, torch.Tensor):
            perm = torch.randperm(len(self.data), generator=g)
            for i in range(0, len(perm), self.batch_size):
                yield self.data[perm[i:i + self.batch_size]]
            return
        loader = torch.utils.data.DataLoader(self.data, batch_size=self.batch_size, shuffle=True, generator=g,
                                             num_workers=self.num_workers)
        yield from (_first(b) for b in loader)


def resolve_data(model, data, *, seed: int = 0, bench_n: int = 5000, mean=None, std=None, crop_pct=0.875):
    """-> (tensor | Dataset | DataLoader, description). data: "bench" (the bundled benchmark's train split, n=bench_n),
    an image folder path, an image tensor (N, 3, H, W), a torch Dataset or a DataLoader."""
    if isinstance(data, (str, os.PathLike)):
        if str(data) in ("bench", "benchmark"):
            from vitx_fast.data import make_benchmark

            size = ViTAdapter(model).img_size
            b = make_benchmark(split="train", n=bench_n, objects=1, seed=seed, size=size[0] if size else None,
                               mean=mean, std=std)
            return b.images, f"bench(split=train, n={bench_n}, objects=1, seed={seed})"
        root = Path(data)
        if not root.is_dir():
            raise ValueError(f"training data {data!r} is neither 'bench' nor an image folder")
        if mean is None or std is None:
            import timm.data

            cfg = timm.data.resolve_data_config({}, model=model)
            mean, std = mean or cfg["mean"], std or cfg["std"]
        size = ViTAdapter(model).img_size
        ds = ImageFolderData(root, size, mean, std, crop_pct)
        return ds, f"folder({root.resolve()}, {len(ds)} images)"
    if isinstance(data, torch.Tensor):
        if data.dim() != 4:
            raise ValueError(f"an image tensor must be (N, 3, H, W), got {tuple(data.shape)}")
        return data, f"tensor{tuple(data.shape)}"
    if isinstance(data, (torch.utils.data.Dataset, torch.utils.data.DataLoader)):
        return data, f"{type(data).__name__}(n={len(data)})"
    raise TypeError(f"unsupported training data {type(data).__name__}: pass 'bench', a folder, an image tensor, "
                    "a torch Dataset or a DataLoader")


# ------------------------------------------------------------------------------------------ state
@contextlib.contextmanager
def _frozen(model):
    """Backbone parameters without grad (the masked pass needs input gradients only); flags restored."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _rng_state() -> tuple[dict, dict]:
    np_state = np.random.get_state()
    meta = {"numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    return {"rng.torch": torch.get_rng_state()}, meta


def _set_rng_state(tensors: dict, meta: dict) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    if meta.get("numpy"):
        n = meta["numpy"]
        np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if meta.get("python"):
        p = meta["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))


def save_training_state(path, ex, opt, sched, epoch: int, step: int, config: dict, history: list) -> Path:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.state.{i}.{k}"] = v
            else:
                scalars[f"{i}.{k}"] = v
    rng_t, rng_m = _rng_state()
    tensors.update(rng_t)
    ex.info = {"training": config, "history": history}
    state = {"epoch": epoch, "step": step, "optimizer": {"param_groups": sd["param_groups"], "scalars": scalars},
             "scheduler": sched.state_dict(), "rng": rng_m}
    return ckpt.save_explainer(path, ex, tensors, {"train_state": state})


def load_training_state(path, ex, opt, sched) -> tuple[int, int, dict, list]:
    tensors, meta = ckpt.read_checkpoint(path)
    st = meta.get("train_state")
    if not isinstance(st, dict):
        raise ckpt.TameCheckpointError(f"{path} holds no training state (an inference-only explainer?)")
    src = ckpt.explainer_from(tensors, meta, path)
    ex.attn_mech.load_state_dict(src.attn_mech.to(next(ex.parameters()).dtype).state_dict())
    ex.backbone = src.backbone  # the identity recorded at the start of the run
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim.state."):
            i, name = k[len("optim.state."):].split(".", 1)
            state.setdefault(int(i), {})[name] = v
    for k, v in st["optimizer"].get("scalars", {}).items():
        i, name = k.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": st["optimizer"]["param_groups"]})
    sched.load_state_dict(st["scheduler"])
    _set_rng_state(tensors, st.get("rng", {}))
    info = meta.get("info") or {}
    return int(st["epoch"]), int(st["step"]), info.get("training", {}), list(info.get("history", []))


def epoch_path(out: Path, epoch: int) -> Path:
    return Path(out) / f"epoch-{epoch:03d}.safetensors"


def latest_checkpoint(out) -> Path | None:
    found = sorted(Path(out).glob("epoch-*.safetensors")) if out is not None and Path(out).is_dir() else []
    return found[-1] if found else None


# ------------------------------------------------------------------------------------------ training
def train_step(adapter, ex, opt, sched, x, layers, grid, masking="random") -> dict:
    """One optimisation step on a batch x (B, 3, H, W); returns the loss terms and the masked accuracy."""
    with torch.no_grad():
        feats, logits = capture_features(adapter, x, layers)  # one backbone pass: features and logits
    y = logits.argmax(-1)
    a, _ = ex(feats, grid)
    masked_logits = adapter.model(mask_images(a, y, x))  # frozen backbone; gradients flow to the map only
    loss = tame_loss(masked_logits, y, select_maps(a, y, masking))
    opt.zero_grad(set_to_none=True)
    loss.total.backward()
    opt.step()
    sched.step()
    acc = (masked_logits.argmax(-1) == y).float().mean()
    return {"loss": loss.total.item(), "ce": loss.ce.item(), "area": loss.area.item(), "tv": loss.tv.item(),
            "acc": acc.item(), "n": x.shape[0]}


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63)


def train_tame(model, data="bench", *, epochs: int = 8, batch_size: int = 32, lr: float = 1e-3, layers=None,
               out=None, resume: bool = False, seed: int = 0, momentum: float = 0.9, weight_decay: float = 5e-4,
               masking: str = "random", num_workers: int = 0, bench_n: int = 5000, mean=None, std=None,
               progress: bool = True, on_epoch_end=None) -> TAMEExplainer:
    """Train a T-TAME explainer for a timm ViT; returns it in eval mode.

    data: "bench", an image folder, an image tensor (N, 3, H, W) normalised for the model, a Dataset (labels
    ignored) or a DataLoader. layers: feature blocks (default: the last three; negative indices allowed).
    out: folder for `epoch-NNN.safetensors` training checkpoints (every epoch) and the final `tame.safetensors`.
    resume: continue from the latest checkpoint in `out` (same configuration required).
    on_epoch_end(epoch, stats): called after each epoch's checkpoint is written.
    """
    if masking not in MASKINGS:
        raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}")
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if resume and out is None:
        raise ValueError("resume=True needs the checkpoint folder `out`")
    adapter = ViTAdapter(model)
    layers = resolve_layers(layers, adapter.depth)
    source, desc = resolve_data(model, data, seed=seed, bench_n=bench_n, mean=mean, std=std)
    batches = _Batches(source, batch_size, num_workers)
    steps = len(batches)
    if steps == 0:
        raise ValueError("the training data is empty")
    config = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "momentum": momentum,
              "weight_decay": weight_decay, "seed": seed, "masking": masking, "layers": layers, "data": desc,
              "steps_per_epoch": steps}
    out = Path(out) if out is not None else None
    last = latest_checkpoint(out)
    if last is not None and not resume:
        raise FileExistsError(f"{out} already holds training checkpoints ({last.name}); pass resume=True "
                              "(--resume) to continue, or choose another folder")
    device, dtype = adapter.device, adapter.dtype

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ex = TAMEExplainer.for_model(model, layers)
        opt = make_optimizer(ex.attn_mech, lr, momentum, weight_decay)
        sched = make_scheduler(opt, lr, epochs * steps)
        start, step, history = 0, 0, []
        if resume and last is not None:
            start, step, history = _resume(last, ex, opt, sched, config, model)
            if progress:
                log.info("resuming from %s (epoch %d/%d)", last.name, start, epochs)
        ex.info = {"training": config, "history": history}
        with adapter.session(), _frozen(model):
            for epoch in range(start, epochs):
                torch.manual_seed(_epoch_seed(seed, epoch))
                ex.train()
                stats = _run_epoch(adapter, ex, opt, sched, batches, _epoch_seed(seed, epoch), layers, masking,
                                   device, dtype, progress, f"epoch {epoch + 1}/{epochs}")
                step += steps
                stats.update(epoch=epoch + 1)
                history.append(stats)
                if out is not None:
                    save_training_state(epoch_path(out, epoch + 1), ex, opt, sched, epoch + 1, step, config, history)
                if progress:
                    log.info(_epoch_line(epoch + 1, epochs, stats))
                if on_epoch_end is not None:
                    on_epoch_end(epoch + 1, stats)
        ex.info = {"training": config, "history": history}
    ex.eval()
    if out is not None:
        ckpt.save_explainer(out / FINAL_NAME, ex)
    return ex


def _resume(last: Path, ex, opt, sched, config: dict, model) -> tuple[int, int, list]:
    """Load a training checkpoint into (ex, opt, sched); refuse a changed configuration or another backbone.
    Returns (epochs done, steps done, history)."""
    start, step, old, history = load_training_state(last, ex, opt, sched)
    diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
    if diff:
        raise ValueError(f"cannot resume from {last}: the configuration changed "
                         + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()))
    reasons = ckpt.not_supported_reasons(ex, model)
    if reasons:
        raise ckpt.BackboneMismatchError(f"cannot resume from {last}: " + "; ".join(reasons))
    return start, step, history


def _epoch_line(epoch: int, epochs: int, stats: dict) -> str:
    return (f"epoch {epoch}/{epochs}: loss {stats['loss']:.4f} (ce {stats['ce']:.4f}, area {stats['area']:.4f}, "
            f"tv {stats['tv']:.4f}), masked acc {stats['acc']:.3f}, {stats['seconds']:.0f}s")


def _run_epoch(adapter, ex, opt, sched, batches, epoch_seed, layers, masking, device, dtype, progress, desc) -> dict:
    from tqdm import tqdm

    t0 = time.time()
    sums = {"loss": 0.0, "ce": 0.0, "area": 0.0, "tv": 0.0, "acc": 0.0}
    n = 0
    bar = tqdm(batches.epoch(epoch_seed), total=len(batches), desc=desc, disable=not progress, leave=False)
    for x in bar:
        x = x.to(device=device, dtype=dtype)
        grid = adapter.grid_for(*x.shape[-2:])
        r = train_step(adapter, ex, opt, sched, x, layers, grid, masking)
        for k in sums:
            sums[k] += r[k] * r["n"]
        n += r["n"]
        bar.set_postfix(loss=f"{sums['loss'] / n:.4f}", ce=f"{sums['ce'] / n:.3f}", area=f"{sums['area'] / n:.3f}",
                        tv=f"{sums['tv'] / n:.3f}", acc=f"{sums['acc'] / n:.3f}")
    bar.close()
    stats = {k: v / max(n, 1) for k, v in sums.items()}
    stats.update(images=n, seconds=time.time() - t0)
    return stats
