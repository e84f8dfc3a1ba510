"""Small things a user of the outputs relies on: the merged stats name the labeler, a no_boxes
drop says why, and the model weights are written with the same mode as every other file."""
from __future__ import annotations

import io
import os
import stat

import torch
from PIL import Image

from stages.ingest import Ingest, IngestConfig
from stages.pseudo_label import PseudoLabel, PseudoLabelConfig
from stages.schema import DropReason, Phrase, Sample
from stages.write import merge_stats, shard_stats


def test_merged_stats_carry_the_labeler():
    labeler = {"model": "tiny", "checkpoint_sha256": "a" * 64, "min_score": 0.3}
    shards = []
    for shard in ("00000", "00001"):
        s = Sample(key=f"k{shard}", input_shard=shard, caption="a dog")
        s.drop(DropReason.NO_PHRASES, "none")
        shards.append(shard_stats([s], shard=shard, duration_s=1.0, labeler=labeler))
    merged = merge_stats(shards)
    assert merged["labeler"] == labeler
    assert merge_stats([shard_stats([], shard="00002", duration_s=0.0, labeler=None)])["labeler"] is None


def test_a_no_boxes_drop_says_why(tiny_teacher, teacher_overrides):
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 40, 40)).save(buf, "JPEG")
    sample = Sample(key="k", input_shard="00000", image=buf.getvalue(), image_ext="jpg", raw_caption=b"a red ball")
    Ingest(IngestConfig(min_size=16))([sample])
    sample.phrases = [Phrase("a red ball", (0, 10))]
    PseudoLabel(PseudoLabelConfig(checkpoint=str(tiny_teacher), model_overrides=teacher_overrides,
                                  min_score=1.0))([sample])
    assert sample.drop_reason is DropReason.NO_BOXES
    assert sample.drop_detail.startswith("no box of its 1 phrases kept at min_score 1.0 (best score 0.")


def test_save_pretrained_writes_weights_with_the_usual_mode(tiny_teacher):
    weights = os.stat(tiny_teacher / "model.safetensors").st_mode
    config = os.stat(tiny_teacher / "config.json").st_mode
    assert stat.S_IMODE(weights) == stat.S_IMODE(config)


def test_the_runs_stats_json_names_the_labeler_after_folding():
    from pipeline.manifest import RunningStats
    labeler = {"model": "tiny", "checkpoint_sha256": "b" * 64}
    running = RunningStats(chunk=2)
    for shard in ("00000", "00001", "00002", "00003"):       # two folds, nothing left in the buffer
        s = Sample(key=f"k{shard}", input_shard=shard, caption="a dog")
        s.drop(DropReason.NO_PHRASES, "none")
        running.add(shard_stats([s], shard=shard, duration_s=1.0, labeler=labeler))
    assert running.result()["labeler"] == labeler
    assert RunningStats(running.state()).result()["labeler"] == labeler     # after a resume too
