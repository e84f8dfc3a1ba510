"""Evaluation: zero-shot detection AP (COCO, LVIS APr/c/f) and phrase-grounding Recall@K.

Pure metrics over ground truth and detections (``detection``, ``grounding``); the command that
runs a model over a data set and calls them is ``pipeline eval`` (``pipeline/evaluation.py``).
"""
