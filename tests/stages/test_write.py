"""Write: deterministic shards readable by webdataset, typed Parquet rows, stats that add up."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from stages.schema import DropReason, Sample, Status
from synth.web import write_web_shards
from stages.write import (QUANTILES, STATS_SCHEMA, encode_parquet, encode_shard, merge_stats,
                          shard_stats, stats_table)


@pytest.fixture(scope="module")
def processed(synthetic_shards, run_shard):
    root, expected = synthetic_shards
    return {name: run_shard(root / f"{name}.tar") for name in ("00000", "00001")}, expected


def test_every_sample_is_accounted_for_with_its_reason(processed):
    shards, expected = processed
    seen = set()
    for name, contents in shards.items():
        table = stats_table(contents.samples)
        stats = shard_stats(contents.samples, shard=name, duration_s=0.5)
        assert stats["read"] == stats["kept"] + stats["dropped"] == table.num_rows
        assert sum(stats["drops"].values()) == stats["dropped"]
        for row in table.to_pylist():
            want = expected[(name, row["key"])]
            assert row["drop_reason"] == (want.reason.value if want.reason else None), want.case
            assert row["status"] == ("kept" if want.reason is None else "dropped")
            if want.reason is None:
                assert (row["width"], row["height"]) == want.size
            seen.add((name, row["key"]))
    assert seen == set(expected)


def test_shard_bytes_are_deterministic(synthetic_shards, processed, run_shard):
    shards, _ = processed
    samples = shards["00000"].samples
    first = encode_shard(samples)
    assert encode_shard(samples) == first
    rerun = run_shard(synthetic_shards[0] / "00000.tar")       # read and process again
    assert encode_shard(rerun.samples) == first
    assert encode_parquet(stats_table(rerun.samples)) == encode_parquet(stats_table(samples))
    # ... and from shards written again with the same seed.
    _, expected = synthetic_shards
    assert write_web_shards(synthetic_shards[0].parent / "again", 2, 12, seed=0) == expected
    assert ((synthetic_shards[0].parent / "again" / "00000.tar").read_bytes()
            == (synthetic_shards[0] / "00000.tar").read_bytes())


def test_tar_members_have_fixed_metadata_and_webdataset_layout(processed):
    samples = processed[0]["00000"].samples
    with tarfile.open(fileobj=io.BytesIO(encode_shard(samples))) as tar:
        members = tar.getmembers()
    kept = [s for s in samples if s.kept]
    assert [m.name for m in members] == [n for s in kept
                                         for n in (f"{s.key}.{s.image_ext}", f"{s.key}.json")]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
        assert m.isfile() and "/" not in m.name


def test_webdataset_reads_back_the_same_records(processed, tmp_path):
    import webdataset as wds          # imports torch (~5 s): only here

    samples = processed[0]["00000"].samples
    path = tmp_path / "00000.tar"
    path.write_bytes(encode_shard(samples))
    read = list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))
    kept = [s for s in samples if s.kept]
    assert [r["__key__"] for r in read] == [s.key for s in kept]
    for record, sample in zip(read, kept):
        assert record[sample.image_ext] == sample.image
        assert json.loads(record["json"].decode("utf-8")) == json.loads(
            json.dumps(sample.to_record()))
    exts = {s.image_ext for s in kept}
    assert {"jpg", "png", "webp"} <= exts


def test_record_json_is_compact_utf8_and_keeps_unicode():
    sample = Sample(key="k1", input_shard="s", image=b"img", image_ext="jpg",
                    caption="un café à Zürich", width=10, height=20)
    with tarfile.open(fileobj=io.BytesIO(encode_shard([sample]))) as tar:
        data = tar.extractfile("k1.json").read()
    assert "café à Zürich".encode() in data and b", " not in data and b": " not in data


@pytest.mark.parametrize("problem", ["no_image", "bad_key", "duplicate", "nan_score"])
def test_unwritable_kept_samples_raise_naming_the_sample(problem):
    a = Sample(key="a1", input_shard="s7", image=b"img", image_ext="jpg", caption="a dog",
               width=1, height=1)
    b = Sample(key="b2", input_shard="s7", image=b"img", image_ext="png", caption="a cat",
               width=1, height=1)
    if problem == "no_image":
        b.image = None
    elif problem == "bad_key":
        b.key = "b.2"
    elif problem == "duplicate":
        b.key = "a1"
    else:
        b.scores = [float("nan")]
    with pytest.raises(ValueError, match=f"sample '{b.key}' of shard 's7'"):
        encode_shard([a, b])


def test_empty_and_all_dropped_shards_have_typed_columns():
    dropped = Sample(key="x", input_shard="s")
    dropped.drop(DropReason.DECODE_ERROR, "cannot identify image")
    for samples in ([], [dropped]):
        table = stats_table(samples)
        assert table.schema == STATS_SCHEMA and table.num_rows == len(samples)
        back = pq.read_table(io.BytesIO(encode_parquet(table)))
        assert back.schema.equals(STATS_SCHEMA, check_metadata=False)
        assert back.to_pylist() == table.to_pylist()
        stats = shard_stats(samples, shard="s", duration_s=0.1)
        assert stats["kept"] == 0 and stats["phrases_per_caption"]["count"] == 0
        json.dumps(stats)
    assert stats_table([dropped]).to_pylist()[0]["drop_detail"] == "cannot identify image"
    tar = encode_shard([dropped])
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        assert t.getmembers() == []


def _scored(samples: list[Sample], seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    for s in samples:
        if s.kept:
            n = int(rng.integers(0, 4))
            s.boxes = [[0.0, 0.0, 5.0, 5.0]] * n
            s.tokens_positive = [[list(s.phrases[0].span)]] * n
            s.scores = [float(x) for x in rng.uniform(0.3, 1.0, n)]
    return samples


def test_shard_stats_counts_and_distributions(processed):
    shards, _ = processed
    samples = _scored([Sample(**{**s.__dict__}) for s in shards["00000"].samples], seed=1)
    stats = shard_stats(samples, shard="00000", duration_s=2.0, labeler={"model": "glip_t"})
    kept = [s for s in samples if s.kept]
    assert set(stats["drops"]) == {r.value for r in DropReason}
    assert stats["drops"]["decode_error"] == 3 and stats["drops"]["no_boxes"] == 0
    assert stats["phrases"] == sum(len(s.phrases) for s in kept)
    assert stats["boxes"] == sum(len(s.boxes) for s in kept)
    lengths = [len(s.caption) for s in kept]
    scores = [x for s in kept for x in s.scores]
    for name, values in (("caption_chars", lengths), ("scores", scores),
                         ("phrases_per_caption", [len(s.phrases) for s in kept])):
        summary = stats[name]
        assert summary["count"] == len(values)
        assert summary["mean"] == pytest.approx(np.mean(values), abs=1e-6)
        for q in QUANTILES:
            assert summary[f"p{round(q * 100):02d}"] == pytest.approx(np.quantile(values, q),
                                                                     abs=1e-6)
    assert stats["labeler"] == {"model": "glip_t"} and stats["samples_per_s"] == len(samples) / 2
    assert shard_stats(kept, shard="k", duration_s=1)["scores"]["count"] == len(scores)
    assert shard_stats([s for s in kept if not s.scores], shard="k", duration_s=1)["scores"] is None
    json.dumps(stats, allow_nan=False)


def test_merge_equals_stats_of_all_samples_and_survives_json(processed):
    shards, _ = processed
    parts = {name: _scored([Sample(**{**s.__dict__}) for s in c.samples], seed=i)
             for i, (name, c) in enumerate(shards.items())}
    per_shard = [json.loads(json.dumps(shard_stats(samples, shard=name, duration_s=1.5,
                                                   read_error="boom" if name == "00001" else None)))
                 for name, samples in parts.items()]
    merged = merge_stats(per_shard)
    everything = shard_stats([s for samples in parts.values() for s in samples], shard="all",
                             duration_s=3.0)
    assert merged["shards"] == 2 and merged["duration_s"] == 3.0
    for key in ("read", "kept", "dropped", "drops", "phrases", "boxes", "phrases_per_caption",
                "boxes_per_image", "caption_chars"):
        assert merged[key] == everything[key], key
    for name, value in everything["scores"].items():
        if name != "hist":
            assert merged["scores"][name] == pytest.approx(value, abs=0.005 + 1e-9), name
    assert merged["read_errors"] == {"00001": "boom"}
    assert merged["read"] == merged["kept"] + merged["dropped"]


def test_merge_refuses_stats_that_do_not_add_up(processed):
    shards, _ = processed
    good = shard_stats(shards["00001"].samples, shard="00001", duration_s=1.0)
    broken = {**good, "read": good["read"] + 1}
    with pytest.raises(ValueError, match="shard '00001': read"):
        merge_stats([broken])
    with pytest.raises(ValueError, match="appears twice"):
        merge_stats([good, good])
    empty = merge_stats([])
    assert empty["read"] == 0 and set(empty["drops"]) == {r.value for r in DropReason}
    assert empty["scores"] is None and empty["phrases_per_caption"]["count"] == 0


def test_stats_rows_match_samples(processed):
    samples = processed[0]["00000"].samples
    rows = stats_table(samples).to_pylist()
    assert [r["key"] for r in rows] == [s.key for s in samples]
    for row, sample in zip(rows, samples):
        assert row["status"] == sample.status.value
        assert row["n_phrases"] == len(sample.phrases)
        if sample.status is Status.KEPT:
            assert row["caption_chars"] == len(sample.caption) and row["drop_detail"] is None
