"""The bundled demo model and model loading by name."""
from vitx_fast.models.loading import ModelLoadError, load_model


def load_demo_model(*args, **kwargs):
    """The bundled demo ViT in eval mode (see vitx_fast.models.demo)."""
    from vitx_fast.models.demo import load_demo_model as _load

    return _load(*args, **kwargs)


__all__ = ["ModelLoadError", "load_demo_model", "load_model"]
