"""Shared test set-up: offline model hubs, one Ray session for the whole test run."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray shared by every test that needs one (start-up costs ~5 s).

    Logical CPUs are set above the 2 physical cores so that read/write tasks and stage actors
    (fractional CPUs) can all be scheduled at once, as on a real cluster.
    """
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A `tiny` GLIP (pretrained backbone and text encoder, seeded random head) saved as ours."""
    import torch

    from model.checkpoint import save_pretrained
    from model.config import load_model_config
    from model.glip import build_glip

    torch.manual_seed(0)
    model = build_glip(load_model_config("tiny"))
    return save_pretrained(model, tmp_path_factory.mktemp("teacher") / "tiny")


# An untrained head scores every anchor ~prior_prob (0.01): let every anchor be a candidate so
# the teacher has boxes to keep, filter and check; small test sizes keep CPU time low.
TEACHER_OVERRIDES = ["inference.score_threshold=0.0", "input.min_size_test=128", "input.max_size_test=192"]


@pytest.fixture(scope="session")
def teacher_overrides():
    return list(TEACHER_OVERRIDES)
