"""Load a model by name for the command line and batch jobs: the bundled demo ViT or a timm model, optionally with
local weights."""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)
HUB_HOST = "huggingface.co"


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
        elif use_pretrained:
            with _hub_offline_unless_reachable() as offline:
                try:
                    model = timm.create_model(name, pretrained=True)
                except Exception:
                    if offline:
                        raise ModelLoadError(
                            f"cannot load pretrained weights for {name!r}: the Hugging Face hub is unreachable (no "
                            "network) and they are not in the local cache; pass --checkpoint FILE for local weights, "
                            "or --random-weights for an untrained model") from None
                    raise
        else:
            model = timm.create_model(name, pretrained=False)
            log.warning("%s has random weights: the model is untrained and its explanations mean nothing (use it to "
                        "test a pipeline; pass --checkpoint FILE for real weights)", name)
    except ModelLoadError:
        raise
    except Exception as exc:  # timm / hub errors become one line
        hint = " (pass --checkpoint FILE, or --random-weights)" if use_pretrained and not checkpoint else ""
        raise ModelLoadError(f"cannot create {name!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}{hint}") \
            from None
    model.eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    return model, cfg


@contextlib.contextmanager
def _hub_offline_unless_reachable(timeout: float = 3.0):
    """Yields True (and puts huggingface_hub in offline mode, so the local cache still serves) when the hub cannot be
    reached within `timeout` s: without it, an offline machine retries for about a minute before failing."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        yield True
        return
    endpoint = os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}").split("//")[-1].split("/")[0]
    host, _, port = endpoint.partition(":")
    try:
        socket.create_connection((host, int(port or 443)), timeout=timeout).close()
        reachable = True
    except OSError:
        reachable = False
    if reachable:
        yield False
        return
    import huggingface_hub.constants as hub

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub.HF_HUB_OFFLINE = "1", True
    try:
        yield True
    finally:
        hub.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


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
    check_state_dtypes(model, state, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][1:2]
        raise ModelLoadError(f"checkpoint {path} does not fit the architecture: {first[0] if first else exc}") \
            from None


def file_digest(path, length: int = 16) -> str:
    """The first `length` hex digits of a file's SHA-256 (read in 1 MiB blocks)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def model_identity(name: str, checkpoint: str | None = None, pretrained: bool | None = None) -> str:
    """What identifies the weights a job or a service explains: 'demo@<weights sha256>', '<timm name>@<checkpoint
    sha256>', '<timm name>@pretrained' or '<timm name>@random' (16 hex digits of SHA-256)."""
    if checkpoint:
        return f"{name}@{file_digest(checkpoint)}"
    if name == "demo":
        from vitx_fast.models.demo import WEIGHTS_FILE

        return f"demo@{file_digest(WEIGHTS_FILE)}"
    return f"{name}@{'random' if pretrained is False else 'pretrained'}"


def check_state_dtypes(model, state: dict, path) -> None:
    """Refuse weights whose dtype would be cast silently into a float parameter: integer (quantised) tensors, and
    lower precision than the model's (float16 / bfloat16 weights into a float32 model); NaN or inf weights too."""
    import torch

    params = dict(model.state_dict())
    for key, t in state.items():
        want = params.get(key)
        if want is None or not isinstance(t, torch.Tensor) or not want.is_floating_point():
            continue
        if not t.is_floating_point():
            raise ModelLoadError(f"checkpoint {path}: {key} is {str(t.dtype).removeprefix('torch.')}, but the model "
                                 f"expects {str(want.dtype).removeprefix('torch.')} weights (quantised checkpoints are "
                                 "not supported)")
        if torch.finfo(t.dtype).bits < torch.finfo(want.dtype).bits:
            raise ModelLoadError(f"checkpoint {path}: {key} is {str(t.dtype).removeprefix('torch.')}, lower precision "
                                 f"than the model's {str(want.dtype).removeprefix('torch.')}: convert the checkpoint "
                                 "to float32 explicitly if that is what you want")
        if not torch.isfinite(t).all():
            raise ModelLoadError(f"checkpoint {path}: {key} holds NaN or inf")

