"""The bundled demo model: a small timm VisionTransformer trained on the generated digit scenes
(``vitx_fast.data.make_benchmark``), shipped as ``weights/demo_vit.safetensors`` + ``weights/demo_vit.json``.
Retrain with ``python -m vitx_fast.models.train_demo``."""
from __future__ import annotations

import functools
import json
import os

import torch

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
CONFIG_FILE = os.path.join(WEIGHTS_DIR, "demo_vit.json")
WEIGHTS_FILE = os.path.join(WEIGHTS_DIR, "demo_vit.safetensors")


@functools.cache
def _config():
    if not os.path.isfile(CONFIG_FILE):
        raise FileNotFoundError(f"demo model config not found at {CONFIG_FILE}")
    with open(CONFIG_FILE) as f:
        return json.load(f)


def demo_data_config():
    """{"input_size": [3, S, S], "img_size": S, "mean": [3], "std": [3], "classes": ["0".."9"]} of the demo
    model; inputs are RGB in [0, 1] normalised as (x - mean) / std."""
    cfg = _config()
    # the whole 64 px scene, resized bilinearly: no centre crop (timm's transform would crop 87.5 % without this)
    return {"input_size": list(cfg["input_size"]), "img_size": cfg["arch"]["img_size"], "mean": list(cfg["mean"]),
            "std": list(cfg["std"]), "classes": list(cfg["classes"]), "crop_pct": 1.0, "interpolation": "bilinear",
            "crop_mode": "center"}


def load_demo_model(dtype=torch.float32, device="cpu"):
    """The trained demo ``timm`` VisionTransformer (class token, token head, 10 digit classes) in eval mode."""
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**_config()["arch"])
    model.load_state_dict(load_file(WEIGHTS_FILE), strict=True)
    # timm-style pretrained_cfg, so that timm.data.resolve_data_config and the pixel-space metrics find the
    # normalisation as they do for any pretrained timm model
    data = demo_data_config()
    model.pretrained_cfg = {"input_size": tuple(data["input_size"]), "mean": tuple(data["mean"]),
                            "std": tuple(data["std"]), "interpolation": "bilinear", "crop_pct": 1.0,
                            "crop_mode": "center", "num_classes": len(data["classes"]), "label_names": data["classes"]}
    return model.to(device=device, dtype=dtype).eval()
