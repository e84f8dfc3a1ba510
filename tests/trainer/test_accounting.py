"""Every training sample accounted for: a mixture with known bad items (missing images, a box
wholly outside its image, one partly outside, pseudo boxes below the bar), and the trainer's
counts checked against an independent walk over the same data order."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from core import config as typed_config
from synth.training import write_training_mixture
from trainer.config import TrainConfig
from trainer.data.accounting import MissingImagesError, format_accounting, summarize
from trainer.data.sources import TrainStream
from trainer.loop import WorkerContext, fit
from trainer.state import read_metrics

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "train" / "tiny_mixture.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


def corrupt(root: Path) -> dict:
    """Write a mixture, then break it in known ways; returns what was broken (by image id)."""
    mix = write_training_mixture(root, n_coco=16, n_mdetr=8, n_pseudo=8)
    data = json.loads(mix.coco_annotations.read_text())
    images = {im["id"]: im for im in data["images"]}
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    multi = [i for i, anns in sorted(by_image.items()) if len(anns) >= 2]
    outside_id, clipped_id = multi[0], multi[1]
    single = [i for i, anns in sorted(by_image.items()) if len(anns) == 1]
    left_out_id = single[0]                                                   # its only box outside:
    im = images[left_out_id]                                                  # not in the stream at all
    by_image[left_out_id][0]["bbox"] = [5, im["height"] + 3, 10, 10]
    im = images[outside_id]
    by_image[outside_id][0]["bbox"] = [im["width"] + 10, 5, 20, 20]            # wholly outside: dropped
    im = images[clipped_id]
    by_image[clipped_id][0]["bbox"] = [im["width"] - 10, 2, 30, 10]            # partly outside: clipped
    mix.coco_annotations.write_text(json.dumps(data))
    missing = [i for i in sorted(images) if i not in (outside_id, clipped_id, left_out_id)][:2]
    for i in missing:
        (mix.coco_images / images[i]["file_name"]).unlink()
    return {"mix": mix, "missing": set(missing), "outside": {outside_id}, "clipped": {clipped_id}}


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return corrupt(tmp_path_factory.mktemp("broken"))


def config(mix, output, *overrides: str) -> TrainConfig:
    data = typed_config.read_yaml(CONFIG)
    data.pop("ray")
    data = typed_config.merge_overrides(data, [
        f"data.sources.o365.annotations={mix.coco_annotations}", f"data.sources.o365.image_root={mix.coco_images}",
        f"data.sources.goldg.annotations={mix.mdetr_annotations}", f"data.sources.goldg.image_root={mix.mdetr_images}",
        f"data.sources.cc.shards=[{mix.root}/pseudo/*.tar]", f"output={output}", *overrides])
    return typed_config.from_dict(TrainConfig, data, source=str(CONFIG))


def expected_counts(stream: TrainStream, broken: dict, reads: int) -> dict:
    """The walk over the o365 source's order (epoch 0, 1, ...) for ``reads`` samples, counted from
    what was broken, not from the trainer's counters."""
    source = stream.sources["o365"]
    order: list[int] = []
    epoch = 0
    while len(order) < reads:
        order += list(source.factory(epoch))
        epoch += 1
    out = {"read": reads, "used": 0, "skipped": {}, "boxes": {},
           "file": {"images_left_out": 1, "boxes_outside": 2, "boxes_clipped": 1}}
    for index in order[:reads]:
        image_id = source.reader[index].image_id
        if image_id in broken["outside"]:
            out["boxes"]["outside"] = out["boxes"].get("outside", 0) + 1
        if image_id in broken["clipped"]:
            out["boxes"]["clipped"] = out["boxes"].get("clipped", 0) + 1
        if image_id in broken["missing"]:
            out["skipped"]["no_image"] = out["skipped"].get("no_image", 0) + 1
        else:
            out["used"] += 1
    return out


def test_the_stream_counts_every_read_used_and_skipped_sample(broken, tiny_random_model):
    cfg = config(broken["mix"], "/unused", "data.sources.goldg=null", "data.sources.cc=null",
                 "data.max_missing_image_fraction=1.0")
    assert list(cfg.data.sources) == ["o365"]                     # null removed the two sources
    stream = TrainStream(cfg.data, tiny_random_model.cfg, tiny_random_model.tokenizer, batch_size=1, seed=0)
    for _ in range(40):                                           # more than two epochs of 16
        stream.next_batch()
    counts = summarize([stream.state_dict()["counts"]])["o365"]
    assert counts == expected_counts(stream, broken, counts["read"])
    assert counts["skipped"]["no_image"] >= 4 and counts["boxes"]["outside"] >= 2 and counts["boxes"]["clipped"] >= 2
    assert counts["read"] == counts["used"] + sum(counts["skipped"].values())
    line = format_accounting({"o365": counts})[0]
    assert line.startswith(f"o365: read {counts['read']} = used {counts['used']} + skipped")


def test_pseudo_boxes_below_the_bar_and_images_left_without_one_are_counted(broken, tiny_random_model):
    cfg = config(broken["mix"], "/unused", "data.sources.goldg=null", "data.sources.o365=null",
                 "data.sources.cc.shuffle=false")
    stream = TrainStream(cfg.data, tiny_random_model.cfg, tiny_random_model.tokenizer, batch_size=1, seed=0)
    for _ in range(7):                                            # one pass: 8 records, one without a box
        stream.next_batch()
    counts = summarize([stream.state_dict()["counts"]])["cc"]
    scores = [json.loads(m.extractfile(m.getmember(n)).read())["scores"]
              for m in map(tarfile.open, broken["mix"].pseudo_shards) for n in m.getnames() if n.endswith(".json")]
    assert len(scores) == 8
    min_score = cfg.data.sources["cc"].min_score
    below = sum(sum(s <= min_score for s in r) for r in scores)
    no_boxes = sum(all(s <= min_score for s in r) for r in scores)
    assert counts == {"read": 8, "used": 8 - no_boxes, "skipped": {"no_boxes": no_boxes},
                      "boxes": {"below_score": below}, "file": {}}


def test_a_source_losing_too_many_images_stops_the_run(broken, tiny_random_model):
    cfg = config(broken["mix"], "/unused", "data.sources.goldg=null", "data.sources.cc=null",
                 "data.missing_image_min_read=16")
    stream = TrainStream(cfg.data, tiny_random_model.cfg, tiny_random_model.tokenizer, batch_size=1, seed=0)
    with pytest.raises(MissingImagesError, match=r"data\.sources\.o365: \d+ of the \d+ samples read so far have "
                                                 r"no image file .*image_root"):
        for _ in range(40):
            stream.next_batch()


def test_fit_reports_the_counts_in_metrics_and_summary(broken, tiny_random_model, tmp_path):
    out = tmp_path / "run"
    cfg = config(broken["mix"], out, "data.sources.goldg=null", "data.sources.cc=null", "init=scratch",
                 "max_iter=3", "batch_size=2", "log_every=1", "checkpoint_every=100", "ema_decay=0",
                 "data.max_missing_image_fraction=1.0")
    summary = fit(cfg, WorkerContext())
    records = [r for r in read_metrics(str(out)) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    used = sum(len(k) for r in records for k in r["keys"])          # every batch's keys were logged
    final = records[-1]["data"]["o365"]
    assert summary["data"] == records[-1]["data"] == json.loads((out / "train_summary.json").read_text())["data"]
    # the counts travel with each batch, so they cover exactly the batches trained on, not the
    # ones the prefetch thread built ahead
    assert final["used"] == used == 6
    stream = TrainStream(cfg.data, tiny_random_model.cfg, tiny_random_model.tokenizer, batch_size=2, seed=0)
    assert final == expected_counts(stream, broken, final["read"])
    # TensorBoard gets them as scalars, the end-of-run summary as one line per source
    from pipeline.train import format_train_summary
    from trainer.state import _scalars
    scalars = _scalars(records[-1])
    assert scalars["data/o365/read"] == final["read"] and scalars["data/o365/used"] == final["used"]
    assert all(scalars[f"data/o365/skipped/{k}"] == v for k, v in final["skipped"].items())
    text = format_train_summary(dict(summary, start_step=0, launcher="in_process", workers=1, seconds=1.0))
    assert f"o365: read {final['read']} = used {final['used']} + skipped" in text


@pytest.fixture(scope="module")
def tiny_random_model(broken):
    torch.manual_seed(0)
    from model.glip import build_glip
    from trainer.config import model_config
    return build_glip(model_config(config(broken["mix"], "/unused")), load_weights=False)
