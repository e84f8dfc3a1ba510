"""Fixtures of the model tests: configs, a photo, and one tiny GLIP shared by a test session."""
from __future__ import annotations

import matplotlib
import pytest
import torch
from PIL import Image

from model.config import load_model_config
from model.glip import build_glip


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    """A real photo (Grace Hopper, 512x600) that ships with matplotlib."""
    return Image.open(f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg").convert("RGB")


@pytest.fixture(scope="session")
def tiny_model():
    """The ``tiny`` GLIP (pretrained EfficientNet-Lite0 and MiniLM, seeded head), eval mode.
    Scores threshold 0 so that its untrained head still yields detections. Do not modify it."""
    torch.manual_seed(0)
    cfg = load_model_config("tiny", ["inference.score_threshold=0.0"])
    return build_glip(cfg).eval()
