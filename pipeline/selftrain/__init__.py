"""``pipeline selftrain``: the whole teacher-student loop in a miniature world.

``config`` (the keys), ``loop`` (the steps, each skipped when its output is complete) and
``report`` (REPORT.md).
"""
from pipeline.selftrain.config import SelfTrainConfig, StudentInit, load_selftrain_config
from pipeline.selftrain.loop import selftrain

__all__ = ["SelfTrainConfig", "StudentInit", "load_selftrain_config", "selftrain"]
