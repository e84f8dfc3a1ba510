"""The paired bootstrap behind the report's evaluation noise, on a hand-made held-out set."""
from __future__ import annotations

import json

import pytest

from pipeline.selftrain.noise import paired_bootstrap


def _files(tmp_path, models: dict[str, list[int]]):
    """Ten images, one object each (class 1 = rare, 2 = frequent); a model finds the images listed."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in range(1, 11)]
    anns = [{"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0}
            for i in range(1, 11)]
    cats = [{"id": 1, "name": "moon", "frequency": "r"}, {"id": 2, "name": "star", "frequency": "f"}]
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    preds = {}
    for name, found in models.items():
        preds[name] = tmp_path / f"{name}.json"
        preds[name].write_text(json.dumps([{"image_id": i, "category_id": 1 + i % 2, "bbox": [10, 10, 30, 30],
                                            "score": 0.9} for i in found]))
    return gt, preds


def test_identical_models_have_no_noise_and_a_better_one_wins_every_draw(tmp_path):
    gt, preds = _files(tmp_path, {"a": list(range(1, 11)), "b": list(range(1, 11)), "c": [1, 2, 3, 4, 5]})
    out = paired_bootstrap(gt, preds, [("a", "b"), ("a", "c")], resamples=20, seed=0)
    assert out["resamples"] == 20 and out["images"] == 10
    same = out["pairs"]["a - b"]["AP"]
    assert same["sd"] == 0.0 and same["mean"] == 0.0 and same["p_positive"] == 0.0
    better = out["pairs"]["a - c"]
    assert better["AP"]["p_positive"] == pytest.approx(1.0) and better["AP"]["sd"] > 0
    assert 0.2 < better["AP"]["mean"] < 0.8 and better["APr"]["mean"] > 0
    # the draw is seeded: the same seed gives the same noise
    again = paired_bootstrap(gt, preds, [("a", "c")], resamples=20, seed=0)
    assert again["pairs"]["a - c"] == better
