"""Bundled localization benchmark (generated digit scenes) and an ImageNet/VOC-style folder reader."""
from vitx_fast.data.generate import (
    Benchmark,
    SceneConfig,
    generate_raw,
    make_benchmark,
    normalise,
    source_split,
)

__all__ = ["Benchmark", "SceneConfig", "generate_raw", "make_benchmark", "normalise", "source_split"]
