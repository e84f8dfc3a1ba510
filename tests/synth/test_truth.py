"""Pseudo labels scored against the world's truth: hand-counted cases and a real world."""
from __future__ import annotations

import numpy as np
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


def _teacher_shards(world_root, out, skip=()):
    """Stand-ins for the teacher's pseudo shards of a world's web images (``stages.write`` format):
    each image's caption with its mentioned objects as phrases, one wrong box per phrase; the keys
    of ``skip`` left out, as the teacher's ``no_boxes`` drops are."""
    from stages.schema import Phrase
    from stages.shards import read_shard
    from stages.write import encode_shard

    truth, _ = load_truth(world_root / "web_truth.json")
    out.mkdir()
    for tar in sorted((world_root / "web").glob("*.tar")):
        samples = []
        with open(tar, "rb") as fh:
            for web in read_shard(fh, tar.stem):
                if web.key in skip:
                    continue
                said = truth[(tar.stem, web.key)]
                spans = [o["span"] for o in said["objects"] if o["span"]]
                samples.append(Sample(
                    key=web.key, input_shard=tar.stem, source="web", image=web.image, image_ext=web.image_ext,
                    caption=said["caption"], width=said["width"], height=said["height"],
                    phrases=[Phrase(said["caption"][s:e], (s, e)) for s, e in spans],
                    boxes=[[0.0, 0.0, 9.0, 9.0]] * len(spans), tokens_positive=[[list(sp)] for sp in spans],
                    scores=[0.5] * len(spans), labeler={"model": "tiny", "checkpoint_sha256": "ab"}))
        (out / tar.name).write_bytes(encode_shard(samples))


def test_oracle_shards_carry_the_true_boxes_of_the_mentioned_objects(tmp_path):
    from core.config import load
    from pipeline.storage import iter_output_samples
    from synth.config import WorldConfig
    from synth.truth import write_oracle_shards
    from synth.world import build_world
    from trainer.data.config import SourceKind, TrainSourceConfig
    from trainer.data.sources import _ShardSource

    build_world(tmp_path / "w", load(WorldConfig, "configs/world/test.yaml"))
    truth, rare = load_truth(tmp_path / "w" / "web_truth.json")
    _teacher_shards(tmp_path / "w", tmp_path / "pseudo", skip={"000000000"})
    counts = write_oracle_shards(tmp_path / "pseudo", tmp_path / "w" / "web_truth.json", tmp_path / "oracle")

    def read(folder):
        return list(iter_output_samples(sorted(str(p) for p in folder.glob("*.tar"))))

    teacher, oracle = read(tmp_path / "pseudo"), read(tmp_path / "oracle")
    assert sorted(p.name for p in (tmp_path / "oracle").iterdir()) == sorted(p.name for p in (tmp_path / "pseudo").iterdir())
    assert [(s.input_shard, s.key) for s in oracle] == [(s.input_shard, s.key) for s in teacher]
    assert len(oracle) == len(truth) - 1 and counts["samples"] == len(oracle) and counts["shards"] == 2
    n_boxes = 0
    for before, after in zip(teacher, oracle):
        assert after.image == before.image and after.caption == before.caption and after.phrases == before.phrases
        said = [o for o in truth[(after.input_shard, after.key)]["objects"] if o["mentioned"]]
        assert said and after.boxes == [[x, y, x + w - 1, y + h - 1] for x, y, w, h in (o["bbox"] for o in said)]
        assert after.tokens_positive == [[o["span"]] for o in said]
        for obj, (spans,) in zip(said, after.tokens_positive):
            assert obj["name"] in after.caption[spans[0]:spans[1]]
        assert after.scores == [1.0] * len(said)
        assert after.labeler["model"] == "oracle" and after.labeler["teacher"] == before.labeler
        n_boxes += len(said)
    assert counts["boxes"] == n_boxes and counts["teacher_boxes"] == sum(len(s.boxes) for s in teacher)
    # scored as the report scores pseudo labels: every oracle box is right
    q = pseudo_label_quality(oracle, truth, rare)
    assert q["rare"]["precision"] == q["common"]["precision"] == 1.0 and q["unmatched"] == 0
    # the trainer's pseudo source reads them as they are, above any bar
    source = _ShardSource("pseudo", 0, TrainSourceConfig(kind=SourceKind.PSEUDO, min_score=0.95, shuffle=False,
                                                         shards=[str(tmp_path / "oracle" / "*.tar")]),
                          0, 0, 1, None, 256)
    read_back = [source.materialize(ref, np.random.default_rng(0)) for ref in source.factory(0)]
    assert [s.boxes for s in read_back] == [s.boxes for s in oracle]


def test_oracle_shards_refuse_a_caption_the_truth_does_not_have(tmp_path):
    from core.config import load
    from stages.write import encode_shard
    from synth.config import WorldConfig
    from synth.truth import write_oracle_shards
    from synth.world import build_world

    build_world(tmp_path / "w", load(WorldConfig, "configs/world/test.yaml"))
    (tmp_path / "pseudo").mkdir()
    wrong = Sample(key="000000000", input_shard="00000", image=b"x", image_ext="jpg", caption="a red circle",
                   width=10, height=10)
    (tmp_path / "pseudo" / "00000.tar").write_bytes(encode_shard([wrong]))
    with pytest.raises(ValueError, match="differs from the truth's"):
        write_oracle_shards(tmp_path / "pseudo", tmp_path / "w" / "web_truth.json", tmp_path / "oracle")
