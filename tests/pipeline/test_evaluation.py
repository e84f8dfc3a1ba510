"""`pipeline eval` end to end on CPU: an official-format GLIP-T checkpoint on a generated COCO set,
and grounding recall of our tiny model on a generated MDETR set; `pipeline predict`."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

from pipeline import api
from pipeline.evaluation import load_eval_config, run_eval

pytestmark = pytest.mark.slow


def _image(path, color, box):
    im = Image.new("RGB", (128, 96), (235, 235, 235))
    ImageDraw.Draw(im).rectangle(box, fill=color)
    im.save(path)


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    images, anns = [], []
    for i, (color, box, cat) in enumerate([((200, 30, 30), (10, 10, 60, 50), 1),
                                           ((30, 30, 200), (50, 20, 120, 90), 2)]):
        _image(root / "images" / f"{i}.png", color, box)
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 128, "height": 96})
        x1, y1, x2, y2 = box
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1],
                     "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": 1, "name": "red box"}, {"id": 2, "name": "blue_box (toy)"}]}
    (root / "gt.json").write_text(json.dumps(gt))
    mdetr = {"images": [dict(images[0], caption="a red box on a grey wall", tokens_positive_eval=[[[0, 9]]])],
             "annotations": [dict(anns[0], tokens_positive=[[0, 9]])], "categories": [{"id": 1, "name": "object"}]}
    (root / "mdetr.json").write_text(json.dumps(mdetr))
    return root


@pytest.fixture(scope="module")
def official_glip_t(tmp_path_factory):
    """A random GLIP-T written in the official checkpoint format (module. names under "model")."""
    import torch

    from model.checkpoint import save_official
    from model.config import load_model_config
    from model.glip import build_glip

    torch.manual_seed(0)
    model = build_glip(load_model_config("glip_t"), load_weights=False)
    path = tmp_path_factory.mktemp("official") / "glip_tiny_random.pth"
    save_official(model, path)
    del model
    return path


def test_official_glip_t_through_pipeline_eval(coco_set, official_glip_t, tmp_path):
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "eval", "kind=detection", f"checkpoint={official_glip_t}",
         "model=glip_t", f"annotations={coco_set / 'gt.json'}", f"image_root={coco_set / 'images'}",
         f"output={out}", "name=tiny_coco", "progress=false", "batch_size=2",
         "model_overrides=[input.min_size_test=96, input.max_size_test=128, inference.score_threshold=0.0]"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "tiny_coco_metrics.json").read_text())
    predictions = json.loads((out / "tiny_coco_predictions.json").read_text())
    assert 0.0 <= metrics["AP"] <= 1.0 and len(metrics["checkpoint_sha256"]) == 64
    assert predictions and {p["category_id"] for p in predictions} <= {1, 2}
    assert {p["image_id"] for p in predictions} == {1, 2}
    assert "AP" in result.stdout


def test_grounding_recall_of_the_tiny_model(coco_set, tiny_teacher, tmp_path):
    cfg = load_eval_config(None, ["kind=grounding", f"checkpoint={tiny_teacher}",
                                  f"annotations={coco_set / 'mdetr.json'}", f"image_root={coco_set / 'images'}",
                                  f"output={tmp_path}", "progress=false",
                                  "model_overrides=[inference.score_threshold=0.0]"])
    metrics = run_eval(cfg)
    assert (tmp_path / "eval_metrics.json").exists() and (tmp_path / "eval_predictions.json").exists()
    recall = json.dumps(metrics)
    assert "R@1" in recall or "recall" in recall.lower()


def test_predict_draws_the_grounded_phrases(coco_set, tiny_teacher, tmp_path):
    out = tmp_path / "pred.png"
    result = api.predict(str(coco_set / "images" / "0.png"), checkpoint=str(tiny_teacher),
                         caption="a red box on a grey wall", out=str(out), min_score=0.0,
                         overrides=["inference.score_threshold=0.0"])
    assert result["boxes"] and set(result["phrases"]) <= {"a red box", "a grey wall"}
    assert Image.open(out).size == (128, 96)
