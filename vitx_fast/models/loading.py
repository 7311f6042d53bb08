"""Load a model by name for the command line and batch jobs: the bundled demo ViT or a timm model, optionally with
local weights."""
from __future__ import annotations

from pathlib import Path


class ModelLoadError(ValueError):
    """The model or its checkpoint cannot be loaded; the message is one line naming the problem."""


def load_model(name: str, checkpoint: str | None = None, pretrained: bool | None = None):
    """Return (model in eval mode, data_config) for 'demo' or a timm model name, optionally with a local checkpoint.

    pretrained: None (timm's pretrained weights unless a checkpoint is given), True or False (random weights).
    """
    import timm

    if name == "demo":
        from vitx_fast.models.demo import demo_data_config, load_demo_model

        model = load_demo_model()
        if checkpoint:
            load_checkpoint(model, checkpoint)
        return model, demo_data_config()
    if not timm.is_model(name):
        raise ModelLoadError(f"unknown timm model {name!r} (see timm.list_models('vit*'))")
    use_pretrained = (checkpoint is None) if pretrained is None else pretrained
    try:
        if checkpoint:
            state = read_state_dict(checkpoint)
            kwargs = {}
            head = state.get("head.weight")
            if head is not None:
                kwargs["num_classes"] = head.shape[0]
            elif not any(k.startswith("head.") for k in state):
                kwargs["num_classes"] = 0
            model = timm.create_model(name, pretrained=False, **kwargs)
            load_checkpoint(model, checkpoint, state)
        else:
            model = timm.create_model(name, pretrained=use_pretrained)
    except ModelLoadError:
        raise
    except Exception as exc:
        hint = " (no network? pass --checkpoint FILE)" if use_pretrained and not checkpoint else ""
        raise ModelLoadError(f"cannot create {name!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}{hint}") \
            from None
    model.eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    return model, cfg


def read_state_dict(path: str) -> dict:
    """A state dict from a .safetensors or torch file (weights_only), unwrapped from common container keys."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"checkpoint not found: {path}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") \
            from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ModelLoadError(f"checkpoint {path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_checkpoint(model, path: str, state: dict | None = None) -> None:
    """Load a checkpoint into `model` strictly; a mismatch is one line naming the first problem."""
    state = state if state is not None else read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][1:2]
        raise ModelLoadError(f"checkpoint {path} does not fit the architecture: {first[0] if first else exc}") \
            from None
