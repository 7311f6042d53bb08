"""Fixtures of the batch-job tests."""
from __future__ import annotations

import pytest
from jobutils import write_scenes


@pytest.fixture(scope="session")
def scenes(tmp_path_factory):
    """A folder of 3 x 8 scenes: a/000.png, b/000.png and b/000.jpg are three images."""
    root = tmp_path_factory.mktemp("scenes")
    return root, write_scenes(root, 8)
