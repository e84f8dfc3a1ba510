"""Metrics: COCO/LVIS box AP, phrase-grounding Recall@K, results files and tables."""
from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest

from evaluation.detection import (DetectionEvalConfig, EvaluationInputError, GroundingEvalConfig, box_iou, coco_detection_metrics, format_metrics_table, grounding_metrics, lvis_available, merge_boxes, phrase_grounding_recall, write_results)
from stages.readers import BoxConvention, CocoDetectionReader, CocoReaderConfig, xyxy_to_xywh


def small_gt() -> dict:
    # one category, one image, two small boxes (area < 32^2)
    return {"images": [{"id": 1, "width": 100, "height": 100}],
            "categories": [{"id": 1, "name": "dog"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "area": 100}]}


def det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def test_ground_truth_as_detections_gives_ap_one():
    gt = small_gt()
    gt["images"].append({"id": 2, "width": 200, "height": 200})
    gt["categories"].append({"id": 3, "name": "cat"})
    gt["annotations"] += [{"id": 3, "image_id": 2, "category_id": 3, "bbox": [10, 10, 100, 100], "area": 10000},
                          {"id": 4, "image_id": 2, "category_id": 1, "bbox": [20, 120, 40, 40], "area": 1600}]
    dets = [det(a["image_id"], a["category_id"], a["bbox"], 0.9 - 0.1 * i) for i, a in enumerate(gt["annotations"])]
    m = coco_detection_metrics(gt, dets, DetectionEvalConfig(per_category=True))
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@100"):
        assert m[key] == pytest.approx(1.0), key
    assert m["protocol"] == "coco" and m["n_detections"] == 4
    assert [(c["name"], c["AP"]) for c in m["per_category"]] == [("dog", pytest.approx(1.0)),
                                                                 ("cat", pytest.approx(1.0))]


def test_hand_computed_ap():
    # Detections, best first: A = GT1 exactly (TP), B = nowhere (FP), C = inside GT2 with IoU 62.5/100 = 0.625.
    # IoU thresholds 0.50, 0.55, 0.60: A TP, B FP, C TP -> recall [.5, .5, 1], precision [1, .5, 2/3],
    #   interpolated [1, 2/3, 2/3]; of the 101 recall points 0..0.50 (51) get 1 and 0.51..1 (50) get 2/3:
    #   AP = (51 + 50 * 2/3) / 101 = 253/303.
    # Thresholds 0.65 .. 0.95 (7): only A is a TP -> recall reaches 0.5: AP = 51/101.
    # AP = (3 * 253/303 + 7 * 51/101) / 10;  AR@100 = (3 * 1 + 7 * 0.5) / 10 = 0.65.
    dets = [det(1, 1, [0, 0, 10, 10], 0.9), det(1, 1, [80, 0, 10, 10], 0.8), det(1, 1, [50, 50, 10, 6.25], 0.7)]
    m = coco_detection_metrics(small_gt(), dets)
    assert m["AP50"] == pytest.approx(253 / 303)
    assert m["AP75"] == pytest.approx(51 / 101)
    assert m["AP"] == pytest.approx((3 * 253 / 303 + 7 * 51 / 101) / 10)
    assert m["APs"] == pytest.approx(m["AP"])
    assert m["APm"] is None and m["APl"] is None          # no medium/large ground truth
    assert m["AR@100"] == pytest.approx(0.65)
    assert m["AR@1"] == pytest.approx(0.5)                # one detection per image: A only
    table = format_metrics_table(m, title="hand case")
    assert "AP50" in table and "83.5" in table and "60.4" in table
    assert "APm" in table and " -" in table


def test_empty_detections_and_input_errors(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(small_gt()))
    m = coco_detection_metrics(str(path), [])
    assert m["AP"] == 0.0 and m["AP50"] == 0.0 and m["n_detections"] == 0
    assert any("no detections" in n for n in m["notes"])
    with pytest.raises(EvaluationInputError, match=r"detections\[0\]\.image_id: 9 is not an image"):
        coco_detection_metrics(small_gt(), [det(9, 1, [0, 0, 1, 1], 0.5)])
    with pytest.raises(EvaluationInputError, match=r"detections\[0\]\.category_id: 4 is not a category"):
        coco_detection_metrics(small_gt(), [det(1, 4, [0, 0, 1, 1], 0.5)])
    with pytest.raises(EvaluationInputError, match=r"detections\[0\]\.bbox: expected 4 numbers"):
        coco_detection_metrics(small_gt(), [det(1, 1, [0, 0, 1], 0.5)])
    with pytest.raises(EvaluationInputError, match=r"detections\[0\]\.score: expected a finite number"):
        coco_detection_metrics(small_gt(), [det(1, 1, [0, 0, 1, 1], float("nan"))])
    bad = small_gt()
    bad["annotations"][1]["image_id"] = 999
    with pytest.raises(EvaluationInputError, match=r"annotations\[1\]\.image_id: annotation 1 refers to image_id 999"):
        coco_detection_metrics(bad, [])
    with pytest.raises(ValueError, match="max_dets = 0"):
        coco_detection_metrics(small_gt(), [], DetectionEvalConfig(max_dets=0))


def lvis_gt() -> dict:
    box_a, box_b, box_c = [10, 10, 20, 20], [50, 50, 30, 30], [5, 60, 20, 20]
    return {
        "images": [{"id": 1, "width": 100, "height": 100, "neg_category_ids": [2], "not_exhaustive_category_ids": []},
                   {"id": 2, "width": 100, "height": 100, "neg_category_ids": [1], "not_exhaustive_category_ids": [3]}],
        "categories": [{"id": 1, "name": "aardvark", "frequency": "r"}, {"id": 2, "name": "bus", "frequency": "c"},
                       {"id": 3, "name": "cat", "frequency": "f"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": box_a, "area": 400},   # no iscrowd (LVIS)
                        {"id": 2, "image_id": 2, "category_id": 3, "bbox": box_b, "area": 900},
                        {"id": 3, "image_id": 2, "category_id": 2, "bbox": box_c, "area": 400}],
    }


LVIS_DETS = [
    det(1, 1, [10, 10, 20, 20], 0.9),    # TP aardvark
    det(1, 3, [70, 5, 10, 10], 0.8),     # cat on image 1: neither annotated nor negative -> discarded (federated)
    det(2, 3, [0, 0, 10, 10], 0.95),     # unmatched cat on image 2, cat not exhaustive there -> ignored
    det(2, 3, [50, 50, 30, 30], 0.9),    # TP cat
    det(2, 2, [5, 60, 20, 20], 0.7),     # TP bus
]


def test_lvis_federated_and_frequency_split():
    m = coco_detection_metrics(lvis_gt(), LVIS_DETS, DetectionEvalConfig(max_dets=300))
    assert m["protocol"] == "lvis_federated" and m["n_detections_evaluated"] == 4
    for key in ("AP", "APr", "APc", "APf"):
        assert m[key] == pytest.approx(1.0), key
    assert any("APr/APc/APf computed here" in n for n in m["notes"])
    # Plain COCO rules on the same input: cat's ranking is FP (0.95), TP (0.9), FP (0.8), one GT:
    # precision [0, 1/2, 1/3] -> interpolated [1/2, 1/2, 1/3], recall reaches 1 at the 2nd -> AP(cat) = 1/2.
    c = coco_detection_metrics(lvis_gt(), LVIS_DETS, DetectionEvalConfig(max_dets=300, federated=False))
    assert c["protocol"] == "coco"
    assert c["APr"] == pytest.approx(1.0) and c["APc"] == pytest.approx(1.0) and c["APf"] == pytest.approx(0.5)
    assert c["AP"] == pytest.approx(2.5 / 3)
    # max_dets counts per image over all categories: image 2 keeps only the unmatched 0.95 cat,
    # so cat and bus have no true positive: AP = (1 + 0 + 0) / 3.
    one = coco_detection_metrics(lvis_gt(), LVIS_DETS, DetectionEvalConfig(max_dets=1))
    assert one["APr"] == pytest.approx(1.0) and one["APc"] == 0.0 and one["APf"] == 0.0
    assert one["AP"] == pytest.approx(1 / 3)
    gt = lvis_gt()
    del gt["images"][1]["not_exhaustive_category_ids"]
    with pytest.raises(EvaluationInputError, match=r"images\[1\]\.not_exhaustive_category_ids: missing"):
        coco_detection_metrics(gt, LVIS_DETS, DetectionEvalConfig(federated=True))


def test_lvis_available_is_false_under_numpy2():
    if not hasattr(np, "float"):
        assert lvis_available() is False


def test_reader_boxes_round_trip_to_ap_one(tmp_path):
    # reader (legacy xyxy) -> xyxy_to_xywh(legacy) -> COCO xywh gives back the file's boxes exactly
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "width": 640, "height": 480}],
          "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "person"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [12.5, 40, 100.25, 80], "area": 8020},
                          {"id": 2, "image_id": 1, "category_id": 2, "bbox": [300, 200, 64, 128], "area": 8192}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    reader = CocoDetectionReader(CocoReaderConfig(annotations=str(path), image_root=str(tmp_path)))
    image = reader[0]
    dets = [det(image.image_id, c, xyxy_to_xywh(b, BoxConvention.LEGACY), 0.9)
            for b, c in zip(image.boxes, image.category_ids)]
    assert [d["bbox"] for d in dets] == [a["bbox"] for a in gt["annotations"]]
    assert coco_detection_metrics(str(path), dets)["AP"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# phrase grounding

def test_box_iou_is_continuous_and_merge_is_the_union():
    assert box_iou([[0, 0, 10, 10]], [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]]).tolist() == \
        [[1.0, pytest.approx(50 / 150), 0.0]]
    assert merge_boxes([[0, 0, 10, 10], [12, 5, 22, 30]]).tolist() == [[0, 0, 22, 30]]


GT = {
    ("img", 0): [[0, 0, 10, 10]],
    ("img", 1): [[0, 0, 10, 10]],
    ("img", 2): [[0, 0, 10, 10], [10, 0, 20, 10]],
    ("img", 3): [[0, 0, 10, 10], [12, 0, 22, 10]],
}
PRED = {
    ("img", 0): [[0, 0, 10, 10]],                      # hit at 1 (both protocols)
    ("img", 1): [[50, 50, 60, 60], [0, 0, 10, 10]],    # miss at 1, hit at 2
    ("img", 2): [[0, 0, 9, 10]],                       # any-box IoU 90/100 hit; merged 90/200 = 0.45 miss
    ("img", 3): [[0, 0, 22, 10]],                      # any-box IoU 100/220 = 0.45 miss; merged IoU 1 hit
    ("other", 0): [[1, 1, 2, 2]],                      # no ground truth: ignored and counted
}
TYPES = {("img", 0): ["people"], ("img", 1): ["people"], ("img", 2): ["clothing"], ("img", 3): ["bodyparts"]}


def test_hand_computed_recall_both_protocols():
    m = grounding_metrics(PRED, GT, GroundingEvalConfig(ks=[1, 5, 10, -1]), phrase_types=TYPES)
    # any_box: R@1 = {0, 2} / 4; R@5 = {0, 1, 2} / 4.   merged_box: R@1 = {0, 3} / 4; R@5 = {0, 1, 3} / 4.
    for protocol in ("any_box", "merged_box"):
        assert m[protocol]["R@1"] == 0.5 and m[protocol]["R@5"] == 0.75 and m[protocol]["R@10"] == 0.75
        assert m[protocol]["upper_bound"] == 0.75 and m[protocol]["n_ignored_predictions"] == 1
    assert m["any_box"]["by_type"] == {"bodyparts": {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "upper_bound": 0.0},
                                       "clothing": {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "upper_bound": 1.0},
                                       "people": {"R@1": 0.5, "R@5": 1.0, "R@10": 1.0, "upper_bound": 1.0}}
    assert m["merged_box"]["by_type"]["clothing"]["R@1"] == 0.0
    assert m["merged_box"]["by_type"]["bodyparts"]["R@1"] == 1.0
    table = format_metrics_table(m)
    assert "R@1" in table and "any_box" in table and "merged_box" in table and "75.0" in table


def test_ground_truth_fed_back_gives_recall_one():
    assert phrase_grounding_recall(GT, GT)["R@1"] == 1.0
    merged = {k: merge_boxes(v).tolist() for k, v in GT.items()}
    assert phrase_grounding_recall(merged, GT, protocol="merged_box")["R@1"] == 1.0


def test_empty_and_missing_predictions():
    empty = {k: [] for k in GT}
    m = phrase_grounding_recall(empty, GT, ks=[1, -1])
    assert m["R@1"] == 0.0 and m["upper_bound"] == 0.0
    with pytest.raises(EvaluationInputError, match=r"1 of 4 phrases have no entry, e.g. \[\('img', 3\)\]"):
        phrase_grounding_recall({k: v for k, v in PRED.items() if k != ("img", 3)}, GT)
    with pytest.raises(EvaluationInputError, match="no phrases to evaluate"):
        phrase_grounding_recall({}, {})
    with pytest.raises(EvaluationInputError, match=r"ground_truth\[\('img', 0\)\]: expected at least one"):
        phrase_grounding_recall(PRED, {("img", 0): []})
    with pytest.raises(EvaluationInputError, match=r"predictions\[\('img', 0\)\]: expected a ranked list"):
        phrase_grounding_recall({("img", 0): [[0, 0, 1]]}, {("img", 0): [[0, 0, 1, 1]]})
    with pytest.raises(ValueError, match="protocols"):
        phrase_grounding_recall(PRED, GT, protocol="best_box")


# ---------------------------------------------------------------------------------------------
# results files

def test_write_results_side_by_side(tmp_path):
    metrics = {"AP": np.float64(0.5), "notes": ["x"]}
    predictions = [{"image_id": 1, "bbox": np.array([1.0, 2.0, 3.0, 4.0]), "score": np.float32(0.5)}]
    m_path, p_path = write_results(tmp_path / "eval", "coco_val", metrics, predictions)
    assert m_path == str(tmp_path / "eval" / "coco_val_metrics.json")
    assert p_path == str(tmp_path / "eval" / "coco_val_predictions.json")
    assert json.loads(open(m_path).read()) == {"AP": 0.5, "notes": ["x"]}
    assert json.loads(open(p_path).read()) == [{"image_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["coco_val_metrics.json",
                                                                      "coco_val_predictions.json"]
    m_url, _ = write_results("memory://results/run1", "flickr", grounding_metrics(PRED, GT),
                             {str(k): v for k, v in PRED.items()})
    assert m_url == "memory://results/run1/flickr_metrics.json"
    assert json.loads(fsspec.open(m_url, "r").open().read())["any_box"]["R@5"] == 0.75
    with pytest.raises(EvaluationInputError, match="plain file-name prefix"):
        write_results(tmp_path, "a/b", {}, [])
