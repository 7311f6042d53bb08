"""The generated benchmark's default normalisation is the bundled demo model's (without data importing models)."""
import numpy as np

from vitx_fast.data import make_benchmark
from vitx_fast.data.generate import DEFAULT_MEAN, DEFAULT_STD
from vitx_fast.models.demo import demo_data_config


def test_default_normalisation_is_the_demo_models():
    cfg = demo_data_config()
    assert tuple(cfg["mean"]) == DEFAULT_MEAN and tuple(cfg["std"]) == DEFAULT_STD
    b = make_benchmark("test", 2, 1, seed=0)
    assert b.mean == DEFAULT_MEAN and b.std == DEFAULT_STD
    x = b.raw[0].astype(np.float64) / 255.0
    expect = (x - np.array(DEFAULT_MEAN)) / np.array(DEFAULT_STD)
    np.testing.assert_allclose(b.images[0].permute(1, 2, 0).numpy(), expect, atol=1e-5)
