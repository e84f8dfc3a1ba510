"""The tiny model (configs/model/tiny.yaml) + GLIPCriterion overfit one small synthetic batch on CPU."""
import time

import pytest
import torch
from PIL import Image, ImageDraw

from model.box_ops import box_iou
from model.config import load_model_config
from model.criterion import GLIPCriterion, targets_from_samples
from model.glip import build_glip
from model.postprocess import PostProcessor
from model.transforms import Preprocessor

STEPS = 150
LR = 1e-3


def draw(size, shapes):
    """size (w, h); shapes: (kind, colour, box) drawn on a grey background."""
    image = Image.new("RGB", size, (128, 128, 128))
    pen = ImageDraw.Draw(image)
    for kind, colour, (x1, y1, x2, y2) in shapes:
        if kind == "square":
            pen.rectangle([x1, y1, x2, y2], fill=colour)
        elif kind == "circle":
            pen.ellipse([x1, y1, x2, y2], fill=colour)
        else:
            pen.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=colour)
    return image


def synthetic_batch():
    """Two images with grounding records (the schema of shared/DESIGN.md)."""
    red, blue, green = (220, 30, 30), (30, 60, 220), (30, 180, 60)
    samples = [
        {"caption": "a red square. a blue circle",
         "boxes": [[16.0, 20.0, 71.0, 75.0], [84.0, 50.0, 147.0, 113.0]],
         "tokens_positive": [[[0, 12]], [[14, 27]]]},
        {"caption": "a green triangle. a yellow star",          # "a yellow star": a negative phrase
         "boxes": [[40.0, 30.0, 111.0, 101.0]],
         "tokens_positive": [[[0, 16]]]},
    ]
    images = [draw((160, 128), [("square", red, samples[0]["boxes"][0]), ("circle", blue, samples[0]["boxes"][1])]),
              draw((128, 128), [("triangle", green, samples[1]["boxes"][0])])]
    return images, samples


@pytest.mark.slow
def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # the CI box has 2 shared cores: one thread is much faster there
    try:
        cfg = load_model_config("tiny")
        model = build_glip(cfg)
        criterion = GLIPCriterion(cfg.loss)
        images, samples = synthetic_batch()
        batch = Preprocessor(cfg.input, min_size=128, max_size=1000)(images)
        assert batch.image_sizes == batch.original_sizes       # no resize: scale 1
        enc = model.tokenize([s["caption"] for s in samples])
        targets = targets_from_samples(samples, enc, scales=1.0)
        assert [t["positive_map"].sum().item() for t in targets] == [6.0, 3.0]   # 3 tokens per phrase

        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
        model.train()
        curve, start = [], time.time()
        for step in range(STEPS):
            out = model(batch.images, batch.image_sizes, enc["input_ids"], enc["attention_mask"])
            losses = criterion(out, targets, enc["attention_mask"])
            total = criterion.total(losses)
            optimizer.zero_grad()
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            curve.append({"total": total.item(), **{k: v.item() for k, v in losses.items()}})
        elapsed = time.time() - start
        for step in list(range(0, STEPS, max(STEPS // 10, 1))) + [STEPS - 1]:
            print(f"step {step:4d} " + " ".join(f"{k} {v:.4f}" for k, v in curve[step].items()))
        print(f"{STEPS} steps in {elapsed:.1f} s")

        first = curve[0]["total"]
        last = sum(c["total"] for c in curve[-5:]) / 5
        assert last <= 0.1 * first, (first, last)

        model.eval()
        with torch.no_grad():
            out = model(batch.images, batch.image_sizes, enc["input_ids"], enc["attention_mask"])
        detections = PostProcessor(cfg.inference)(out, [t["positive_map"] for t in targets])
        for det, target in zip(detections, targets):
            for entity, gt in enumerate(target["boxes"]):
                mine = det["labels"] == entity
                assert mine.any(), f"no detection for entity {entity}"
                best = det["boxes"][mine][det["scores"][mine].argmax()]
                iou = box_iou(best[None], gt[None]).item()
                print(f"entity {entity}: box {best.tolist()} score {det['scores'][mine].max():.3f} IoU {iou:.3f}")
                assert iou >= 0.7
    finally:
        torch.set_num_threads(threads)
