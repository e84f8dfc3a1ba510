"""Pseudo labels scored against the world's truth: hand-counted cases and a real world."""
from __future__ import annotations

import pytest

from stages.schema import Sample
from synth.truth import load_truth, pseudo_label_quality


def _pseudo(shard: str, key: str, boxes=(), tokens_positive=()) -> Sample:
    return Sample(key=key, input_shard=shard, boxes=list(boxes), tokens_positive=list(tokens_positive))

TRUTH = {
    ("00000", "a"): {"objects": [
        {"name": "moon", "bbox": [10, 10, 20, 20], "mentioned": True, "span": [0, 6]},
        {"name": "circle", "bbox": [50, 50, 10, 10], "mentioned": True, "span": [11, 19]},
        {"name": "star", "bbox": [0, 60, 10, 10], "mentioned": False, "span": None}]},
    ("00001", "b"): {"objects": [
        {"name": "circle", "bbox": [0, 0, 40, 40], "mentioned": True, "span": [0, 8]}]},
}


def test_counts_follow_the_definition():
    records = [
        _pseudo("00000", "a", [[10, 10, 29, 29], [50, 50, 70, 70], [0, 0, 5, 5]],
                [[[0, 6]], [[11, 19]], [[30, 37]]]),
        _pseudo("00001", "b", [[20, 20, 60, 60]], [[[0, 8]]]),
    ]
    q = pseudo_label_quality(records, TRUTH, rare={"moon"})
    assert q["rare"] == {"boxes": 1, "correct": 1, "mentioned": 1, "precision": 1.0, "recall": 1.0}
    # the circle of "a": 11x11 true box vs 20x20 pseudo box, IoU 0.3; "b": IoU 20*20/(1600+1600-400) < 0.5
    assert q["common"] == {"boxes": 2, "correct": 0, "mentioned": 2, "precision": 0.0, "recall": 0.0}
    assert q["unmatched"] == 1


def test_no_labels_and_unknown_images():
    q = pseudo_label_quality([], TRUTH, rare={"moon"})
    assert q["rare"]["precision"] is None and q["rare"]["recall"] == 0.0 and q["common"]["mentioned"] == 2
    with pytest.raises(KeyError, match="00009/zz is not a web image"):
        pseudo_label_quality([_pseudo("00009", "zz")], TRUTH, rare=set())


def test_the_truths_own_boxes_are_all_correct(tmp_path):
    from synth.config import WorldConfig
    from synth.world import build_world
    from core.config import load
    cfg = load(WorldConfig, "configs/world/test.yaml")
    build_world(tmp_path / "w", cfg)
    truth, rare = load_truth(tmp_path / "w" / "web_truth.json")
    assert rare == set(cfg.rare_classes)
    records = []
    for (shard, key), sample in truth.items():
        said = [o for o in sample["objects"] if o["span"]]
        records.append(_pseudo(shard, key, [[o["bbox"][0], o["bbox"][1], o["bbox"][0] + o["bbox"][2] - 1,
                                             o["bbox"][1] + o["bbox"][3] - 1] for o in said],
                               [[o["span"]] for o in said]))
    q = pseudo_label_quality(records, truth, rare)
    for group in ("rare", "common"):
        assert q[group]["precision"] == 1.0 and q[group]["recall"] == 1.0, q


def test_precision_by_score_and_the_bar_read_from_it():
    from synth.truth import score_bar_for_precision
    right, wrong = [[10, 10, 29, 29]], [[60, 60, 70, 70]]
    records = [Sample(key="a", input_shard="00000", boxes=(right if s > 0.5 else wrong) * 1,
                      tokens_positive=[[[0, 6]]], scores=[s]) for s in (0.32, 0.42, 0.62, 0.72)]
    q = pseudo_label_quality(records, TRUTH, rare={"moon"}, bars=(0.3, 0.4, 0.5, 0.6, 0.7))
    above = {row["bar"]: row["above"]["rare"] for row in q["by_score"]}
    assert [above[b]["boxes"] for b in (0.3, 0.4, 0.5, 0.6, 0.7)] == [4, 3, 2, 2, 1]
    assert above[0.3]["precision"] == 0.5 and above[0.4]["precision"] == 2 / 3 and above[0.5]["precision"] == 1.0
    assert above[0.5]["recall"] == 2.0          # four boxes for the one mentioned moon: the definition's count
    inside = {row["bar"]: row["bin"]["rare"]["boxes"] for row in q["by_score"]}
    assert inside == {0.3: 1, 0.4: 1, 0.5: 0, 0.6: 1, 0.7: 1}
    assert score_bar_for_precision(q, 0.6, min_boxes=1)[0] == 0.4
    assert score_bar_for_precision(q, 0.9, min_boxes=1)[0] == 0.5
    assert score_bar_for_precision(q, 0.9, min_boxes=1, floor=0.55)[0] == 0.6
    bar, why = score_bar_for_precision(q, 0.9, min_boxes=3)
    assert bar is None and "66.7 % above 0.4" in why
