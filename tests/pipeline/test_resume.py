"""Bookkeeping that stays flat as shards grow: commit records, compaction, resume by listing.

No Ray here: shards are committed with ``write_shard`` directly, as the write task does.
"""
from __future__ import annotations

import json
import time

import pytest

from pipeline.config import load_run_config
from pipeline.manifest import MANIFEST, Manifest, RunningStats, is_segment, read_manifest, segment_name
from pipeline.resume import open_output
from pipeline.runner import ShardWork, write_shard
from pipeline.storage import OutputDir
from stages.schema import DropReason, Sample
from stages.write import merge_stats


def _cfg(out, *extra):
    return load_run_config(None, ["input.shards=[unused.tar]", f"output.path={out}", *extra])


def _work(name: str, n: int = 3) -> ShardWork:
    samples = []
    for i in range(n):
        s = Sample(key=f"{name}_{i}", input_shard=name, caption="a red ball")
        s.drop(DropReason.NO_IMAGE if i % 2 else DropReason.TOO_SMALL, "test")
        samples.append(s)
    return ShardWork(name=name, input=f"in/{name}.tar", samples=samples, started=time.time())


def _commit(cfg, manifest, name):
    record, stats = write_shard(_work(name), cfg)
    manifest.add(record, stats)
    return record, stats


def _compacted_then(cfg, compacted: int, newer: int):
    """An output with ``compacted`` shards in one compaction and ``newer`` records after it."""
    out = OutputDir(cfg.output.path)
    manifest = open_output(out, cfg, []).manifest
    for i in range(compacted):
        _commit(cfg, manifest, f"{i:05d}")
    manifest.save(out)
    for i in range(compacted, compacted + newer):
        _commit(cfg, manifest, f"{i:05d}")
    return out, manifest


class CountingOutput(OutputDir):
    """Counts what start-up asks the store for."""
    calls: dict = {}

    def _count(self, what):
        CountingOutput.calls[what] = CountingOutput.calls.get(what, 0) + 1

    def read_bytes(self, name):
        kind = "manifest" if name == MANIFEST else "segment" if is_segment(name) else "record"
        self._count("read:" + kind)
        return super().read_bytes(name)

    def exists(self, name):
        self._count("exists")
        return super().exists(name)

    def names(self):
        self._count("list")
        return super().names()


def test_the_record_is_written_last_and_a_commit_writes_nothing_else(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path / "out")
    written = []
    original = OutputDir.write_bytes
    monkeypatch.setattr(OutputDir, "write_bytes", lambda self, n, d: (written.append(n), original(self, n, d)))
    state = open_output(OutputDir(cfg.output.path), cfg, [])
    assert written == [MANIFEST]                      # the run-start manifest, with the config hash
    written.clear()
    for name in ("00000", "00001"):
        _commit(cfg, state.manifest, name)
    assert written == ["00000.tar", "00000.parquet", "00000_stats.json",
                       "00001.tar", "00001.parquet", "00001_stats.json"]


def test_resume_lists_once_and_reads_only_records_newer_than_the_manifest(tmp_path):
    cfg = _cfg(tmp_path / "out")
    _compacted_then(cfg, 40, 3)                         # a compaction, 3 records, then a SIGKILL
    CountingOutput.calls = {}
    state = open_output(CountingOutput(cfg.output.path), cfg, [])
    assert CountingOutput.calls == {"read:manifest": 1, "list": 1, "read:segment": 1, "read:record": 3}
    assert state.recovered == ["00040", "00041", "00042"] and not state.redo
    assert len(state.committed) == 43 and state.manifest.totals == {"shards": 43, "read": 43 * 3, "kept": 0,
                                                                    "dropped": 43 * 3}
    # the recovered records are compacted at start-up (a second segment): the next start reads
    # no record at all
    CountingOutput.calls = {}
    again = open_output(CountingOutput(cfg.output.path), cfg, [])
    assert CountingOutput.calls == {"read:manifest": 1, "list": 1, "read:segment": 2}
    assert len(again.committed) == 43 and again.manifest.stats.result()["read"] == 43 * 3


def test_a_compacted_shard_that_lost_a_file_is_redone_and_totals_rebuilt(tmp_path):
    cfg = _cfg(tmp_path / "out")
    out, _ = _compacted_then(cfg, 5, 1)               # 00005: a record newer than the compaction
    (tmp_path / "out" / "00003.parquet").unlink()
    state = open_output(out, cfg, [])
    assert state.redo == ["00003"] and state.recovered == ["00005"] and "00003" not in state.committed
    assert state.manifest.totals["read"] == 5 * 3
    assert state.manifest.stats.result()["shards"] == 5 and state.manifest.stats.result()["read"] == 15
    # the compaction is rewritten without the lost shard; the old segment is gone
    assert sorted(read_manifest(out)["shards"]) == ["00000", "00001", "00002", "00004", "00005"]
    assert sorted(p.name for p in (tmp_path / "out").glob("_manifest.*.json")) == [segment_name(1)]


def test_stats_files_without_a_manifest_are_not_trusted(tmp_path):
    cfg = _cfg(tmp_path / "out")
    out = OutputDir(cfg.output.path)
    manifest = open_output(out, cfg, []).manifest
    _commit(cfg, manifest, "00000")
    (tmp_path / "out" / MANIFEST).unlink()
    state = open_output(out, cfg, [])
    assert state.committed == set() and state.manifest.totals["shards"] == 0


def test_resume_with_another_config_is_refused_even_before_any_compaction(tmp_path):
    from pipeline.storage import StorageError

    cfg = _cfg(tmp_path / "out")
    open_output(OutputDir(cfg.output.path), cfg, [])
    other = _cfg(tmp_path / "out", "stages.ingest.min_size=100")
    with pytest.raises(StorageError, match="different stage config"):
        open_output(OutputDir(other.output.path), other, [])


def test_a_shard_is_committed_once(tmp_path):
    cfg = _cfg(tmp_path / "out")
    manifest = open_output(OutputDir(cfg.output.path), cfg, []).manifest
    record, stats = _commit(cfg, manifest, "00000")
    with pytest.raises(ValueError, match="committed twice"):
        manifest.add(record, stats)


def test_running_stats_equal_one_merge_of_all_shards():
    from stages.write import shard_stats as make

    shard_stats = []
    for i in range(23):
        work = _work(f"{i:05d}", n=1 + i % 4)
        stats = make(work.samples, shard=work.name, duration_s=0.5, read_error="truncated" if i == 7 else None)
        shard_stats.append(json.loads(json.dumps(stats)))
    running = RunningStats(chunk=4)
    for stats in shard_stats:
        running.add(stats)
    restored = RunningStats(json.loads(json.dumps(running.state())), chunk=4)
    assert restored.result() == running.result() == merge_stats(shard_stats)


def test_manifest_round_trip_keeps_records_and_totals(tmp_path):
    cfg = _cfg(tmp_path / "out")
    out = OutputDir(cfg.output.path)
    manifest = open_output(out, cfg, ["in/00000.tar"]).manifest
    for i in range(3):
        _commit(cfg, manifest, f"{i:05d}")
    records = {name: json.loads(text) for name, text in manifest.fresh.items()}
    manifest.save(out)
    data = read_manifest(out)
    assert data["shards"] == records
    assert data["totals"] == {"shards": 3, "read": 9, "kept": 0, "dropped": 9}
    loaded = Manifest.load(out)
    assert loaded.compacted(out) == records and loaded.totals == manifest.totals
    assert loaded.stats.result() == manifest.stats.result() and loaded.segments == [segment_name(0)]


def test_a_compaction_writes_the_new_records_and_a_head_that_does_not_grow(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path / "out")
    out = OutputDir(cfg.output.path)
    manifest = open_output(out, cfg, [f"in/{i:05d}.tar" for i in range(60)]).manifest
    written = {}
    original = OutputDir.write_bytes
    monkeypatch.setattr(OutputDir, "write_bytes", lambda self, n, d: (written.__setitem__(n, d), original(self, n, d)))
    sizes = []
    for start in (0, 10, 50):
        for i in range(start, start + 10):
            _commit(cfg, manifest, f"{i:05d}")
        written.clear()
        manifest.save(out)
        segment = segment_name(len(manifest.segments) - 1)
        assert sorted(written) == sorted([MANIFEST, segment])          # nothing older is rewritten
        assert sorted(json.loads(written[segment])["shards"]) == [f"{i:05d}" for i in range(start, start + 10)]
        sizes.append(len(written[MANIFEST]))
    # 10, 20, 30 shards: the head grows by one segment's name per compaction (its merged stats
    # may gain a digit), not by the 20 records (> 4 kB) compacted in between
    growth = sizes[2] - sizes[0] - 2 * (len(json.dumps(segment_name(0))) + 1)
    assert abs(growth) < 200 and len(written[segment]) > 4000 / 2
    assert manifest.fresh == {}


def test_a_segment_written_just_before_a_kill_is_ignored_and_its_records_recovered(tmp_path):
    cfg = _cfg(tmp_path / "out")
    out, _ = _compacted_then(cfg, 3, 2)
    # the kill lands between the new segment and the head that would name it
    (tmp_path / "out" / segment_name(1)).write_text('{"shards": {"00003": {"files": {}, "read": 99}}}\n')
    stale = tmp_path / "out" / segment_name(7)          # as a rewrite killed before its clean-up leaves
    stale.write_text('{"shards": {}}\n')
    state = open_output(out, cfg, [])
    assert not stale.exists()
    assert state.recovered == ["00003", "00004"] and state.manifest.totals["read"] == 5 * 3
    data = read_manifest(out)
    assert sorted(data["shards"]) == [f"{i:05d}" for i in range(5)] and data["shards"]["00003"]["read"] == 3
    assert data["segments"] == [segment_name(0), segment_name(1)]


def test_commits_are_kept_in_bounded_memory():
    from pipeline.runner import Commits, Window

    commits = Commits()
    for i in range(10):
        commits.add(at_s=2.0 + i, read=5)
    assert commits.count == 10 and (commits.first_s, commits.last_s) == (2.0, 11.0)
    assert commits.steady_rate == 9 * 5 / 9.0 and Commits().steady_rate == 0.0
    window = Window(keep=3)
    for i in range(10):
        window.add(i / 1000)
    assert list(window.first) == [0.0, 0.001, 0.002] and list(window.last) == [0.007, 0.008, 0.009]


def test_a_version_2_manifest_with_its_records_inline_is_resumed_and_segmented(tmp_path):
    cfg = _cfg(tmp_path / "out")
    out, _ = _compacted_then(cfg, 3, 0)
    old = read_manifest(out)                    # version 2 held the records in _manifest.json
    for name in old.pop("segments"):
        (tmp_path / "out" / name).unlink()
    del old["next_segment"]
    (tmp_path / "out" / MANIFEST).write_text(json.dumps({**old, "version": 2}))
    state = open_output(out, cfg, [])
    assert state.committed == {"00000", "00001", "00002"} and state.recovered == [] and state.redo == []
    new = read_manifest(out)
    assert new["version"] == 3 and new["segments"] == [segment_name(0)]
    assert new["shards"] == old["shards"] and new["totals"] == old["totals"]


def test_an_output_begun_with_the_teacher_named_by_path_resumes_and_moves_to_its_bytes(tmp_path):
    """An output whose manifest holds the path-based hash (begun before checkpoints counted by
    content) resumes with the same config and is rewritten to the content hash, so the teacher
    may move afterwards; a different teacher is still refused."""
    from pipeline.config import semantic_hash
    from pipeline.storage import StorageError

    ckpt = tmp_path / "teacher.pth"
    ckpt.write_bytes(b"weights")
    cfg = _cfg(tmp_path / "out", f"stages.pseudo_label.checkpoint={ckpt}")
    out = OutputDir(cfg.output.path)
    old = Manifest(config_sha256=semantic_hash(cfg, by_content=False), config={}, inputs=[])
    out.ensure()
    old.save(out)
    _commit(cfg, old, "00000")
    state = open_output(OutputDir(cfg.output.path), cfg, [])
    assert state.manifest.config_sha256 == semantic_hash(cfg) != semantic_hash(cfg, by_content=False)
    assert "00000" in state.recovered
    moved = tmp_path / "elsewhere.pth"
    ckpt.rename(moved)
    assert open_output(OutputDir(cfg.output.path), _cfg(tmp_path / "out", f"stages.pseudo_label.checkpoint={moved}"),
                       []).manifest.config_sha256 == state.manifest.config_sha256
    moved.write_bytes(b"other weights")
    with pytest.raises(StorageError, match="different stage config"):
        open_output(OutputDir(cfg.output.path), _cfg(tmp_path / "out", f"stages.pseudo_label.checkpoint={moved}"), [])
