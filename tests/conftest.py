"""Shared pytest fixtures."""
import contextlib
import io
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.synthetic import generate  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_params() -> dict:
    """Arguments of ``generate`` for the tiny shared synthetic dataset."""
    return {"num_train": 24, "num_val": 12, "image_size": 96, "seed": 0}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory, synthetic_params) -> str:
    """Folder of a tiny synthetic COCO-layout dataset, generated once per session."""
    root = str(tmp_path_factory.mktemp("synthetic"))
    with contextlib.redirect_stdout(io.StringIO()):
        generate(root, **synthetic_params)
    return root
