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


def test_training_spread_is_the_sample_sd_of_the_controls_metrics():
    from pipeline.selftrain.noise import training_spread

    metrics = {"control": {"detection": {"AP": 0.30, "APr": 0.05, "APf": None}},
               "control_seed1": {"detection": {"AP": 0.28, "APr": 0.07, "APf": None}},
               "control_seed2": {"detection": {"AP": 0.26, "APr": None, "APf": None}}}
    spread = training_spread(metrics, {"control": 0, "control_seed1": 1000, "control_seed2": 2000})
    assert spread["seeds"] == {"control": 0, "control_seed1": 1000, "control_seed2": 2000}
    assert spread["AP"]["values"] == [0.30, 0.28, 0.26] and spread["AP"]["sd"] == pytest.approx(0.02)
    assert spread["APr"]["values"] == [0.05, 0.07, None] and spread["APr"]["sd"] == pytest.approx(0.02 ** 0.5 * 0.1)
    assert spread["APf"]["sd"] is None
    one = training_spread({"control": metrics["control"]}, {"control": 0})
    assert one["AP"]["sd"] is None


def test_control_repeats_needs_the_control(tmp_path):
    from core.config import ConfigError
    from pipeline.selftrain import load_selftrain_config

    cfg = load_selftrain_config("configs/demo.yaml", [f"workdir={tmp_path}", "control_repeats=2"])
    assert cfg.control_repeats == 2
    for bad in (["control_repeats=-1"], ["control_repeats=1", "control=false"]):
        with pytest.raises(ConfigError, match="control_repeats"):
            load_selftrain_config("configs/demo.yaml", [f"workdir={tmp_path}", *bad])
