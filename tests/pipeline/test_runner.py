"""The noun-phrase DAG on Ray: accounting, exactly-once resume, determinism, atomic commits."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import api
from pipeline.config import load_run_config
from pipeline.manifest import read_manifest
from pipeline.storage import OutputDir
from synth.web import write_web_shards

pytestmark = pytest.mark.slow


def _cfg(shards_glob, out, *extra):
    return load_run_config(None, [f"input.shards=[{shards_glob}]", f"output.path={out}", "progress=false",
                                  "input.source=test", *extra])


def _tar_members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _output_files(out: Path):
    """Every committed data file (tar + parquet) with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".tar", ".parquet")}


@pytest.fixture(scope="module")
def web_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    expected = write_web_shards(root, n_shards=3, samples_per_shard=24, seed=7, bad_samples=True)
    return root, expected


@pytest.fixture(scope="module")
def first_run(web_shards, ray_session, tmp_path_factory):
    root, _ = web_shards
    out = tmp_path_factory.mktemp("run") / "out"
    summary = api.run(_cfg(f"{root}/*.tar", out))
    return out, summary


def test_every_sample_is_accounted_for_with_its_reason(web_shards, first_run):
    root, expected = web_shards
    out, summary = first_run
    assert summary.ok and summary.shards_done == 3
    rows = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    by_key = {(r["input_shard"], r["key"]): r for r in rows}
    assert len(rows) == len(by_key) == len(expected)
    totals = json.loads((out / "stats.json").read_text())
    assert totals["read"] == totals["kept"] + totals["dropped"] == len(expected)
    for (shard, key), exp in expected.items():
        row = by_key[(shard, key)]
        want = exp.reason.value if exp.reason else None
        assert row["drop_reason"] == want, (shard, key, row)
        if exp.reason is None:
            assert row["status"] == "kept"
            assert (row["width"], row["height"]) == exp.size, key


def test_kept_samples_carry_original_bytes_and_exact_spans(web_shards, first_run):
    root, expected = web_shards
    out, _ = first_run
    inputs = {}
    for shard in sorted(root.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.isfile():
                    inputs[(shard.stem, m.name)] = tar.extractfile(m).read()
    n_kept = 0
    for tar_path in sorted(out.glob("*.tar")):
        members = _tar_members(tar_path)
        for name, data in members.items():
            if not name.endswith(".json"):
                continue
            record = json.loads(data)
            key = record["key"]
            n_kept += 1
            assert "." not in key and "/" not in key
            image_name = next(n for n in members if n.startswith(key + ".") and not n.endswith(".json"))
            ext = image_name.split(".", 1)[1]
            assert members[image_name] == inputs[(tar_path.stem, f"{key}.{ext}")]
            assert record["phrases"], key
            for phrase in record["phrases"]:
                s, e = phrase["span"]
                assert record["caption"][s:e] == phrase["text"]
            assert record["source"] == "test"
    assert n_kept == sum(1 for e in expected.values() if e.reason is None)


def test_manifest_records_committed_shards_with_checksums(first_run):
    import hashlib

    out, _ = first_run
    manifest = read_manifest(OutputDir(str(out)))
    assert sorted(manifest["shards"]) == ["00000", "00001", "00002"]
    for name, record in manifest["shards"].items():
        assert record["read"] == record["kept"] + record["dropped"]
        for fname, digest in record["files"].items():
            if digest:
                assert hashlib.sha256((out / fname).read_bytes()).hexdigest() == digest


def test_rerun_skips_committed_shards_and_changes_nothing(web_shards, first_run):
    root, _ = web_shards
    out, _ = first_run
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.suffix in (".tar", ".parquet")}
    summary = api.run(_cfg(f"{root}/*.tar", out))
    assert summary.shards_skipped == 3 and summary.shards_done == 0
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.suffix in (".tar", ".parquet")}
    assert after == before


def test_same_input_and_config_give_byte_identical_output(web_shards, first_run, tmp_path):
    """Also with a compaction every 2 records: how often the manifest is compacted changes the
    manifest's segments, never the data."""
    root, _ = web_shards
    out, _ = first_run
    other = tmp_path / "again"
    api.run(_cfg(f"{root}/*.tar", other, "stages.noun_phrases.resources.actors=2", "ray.max_shards_in_flight=1",
                 "output.compact_every_shards=2", "output.compact_every_s=3600"))
    assert _output_files(other) == _output_files(out)
    head = json.loads((other / "_manifest.json").read_text())
    sizes = [len(json.loads((other / name).read_text())["shards"]) for name in head["segments"]]
    assert sizes == [2, 1] and head["totals"] == read_manifest(OutputDir(str(out)))["totals"]


def test_how_a_stage_is_hosted_does_not_change_the_output(web_shards, first_run, tmp_path):
    """Ingest on its own actors and noun phrases inside a task: the same bytes."""
    root, _ = web_shards
    out, _ = first_run
    other = tmp_path / "hosted"
    api.run(_cfg(f"{root}/*.tar", other, "stages.ingest.resources.actors=1",
                 "stages.noun_phrases.resources.actors=0"))
    assert _output_files(other) == _output_files(out)


def test_resume_into_an_output_made_with_another_config_is_refused(web_shards, first_run):
    from pipeline.storage import StorageError

    root, _ = web_shards
    out, _ = first_run
    with pytest.raises(StorageError, match="different stage config"):
        api.run(_cfg(f"{root}/*.tar", out, "stages.ingest.min_size=100"))


def test_a_missing_shard_file_is_redone(web_shards, first_run, tmp_path):
    import shutil

    root, _ = web_shards
    out, _ = first_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "00001.tar").unlink()
    summary = api.run(_cfg(f"{root}/*.tar", copy))
    assert summary.shards_done == 1 and summary.shards_skipped == 2
    assert _output_files(copy) == _output_files(out)


def test_stats_command_prints_totals_and_writes_plots(first_run, tmp_path):
    out, _ = first_run
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "stats", str(out), "--plots", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    totals = json.loads((out / "stats.json").read_text())
    assert f"read     {totals['read']:>10}" in result.stdout
    assert "no_phrases" in result.stdout and "decode_error" in result.stdout
    for name in ("drop_reasons.png", "phrases_per_caption.png", "caption_length.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


@pytest.mark.parametrize("compact_every_s", [3600, 0])
def test_sigkill_while_writing_then_rerun_equals_uninterrupted_run(web_shards, first_run, tmp_path,
                                                                   run_until_committed, compact_every_s):
    """Kill the whole process tree (driver + Ray) once shards are committed, then rerun.

    With compaction every hour the kill lands between the shards' commit records and the next
    compaction (the manifest lists none of them); with compaction after every commit it lands
    at a random commit, maybe inside a compaction."""
    import random

    root, _ = web_shards
    reference, _ = first_run
    out = tmp_path / "killed"
    args = [f"input.shards=[{root}/*.tar]", f"output.path={out}", "progress=false", "input.source=test",
            "ray.max_shards_in_flight=1", "ray.num_cpus=2", f"output.compact_every_s={compact_every_s}"]
    count = 1 if compact_every_s else random.choice([1, 2])
    run_until_committed(args, out, count=count)
    committed = len(list(out.glob("*_stats.json")))     # a record may have landed during the kill
    assert count <= committed < 3
    if compact_every_s:
        manifest = read_manifest(OutputDir(str(out)))
        assert manifest["shards"] == {}, "the kill should land before any compaction"
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", *args], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{3 - committed} done now, {committed} already committed" in result.stdout
    assert _output_files(out) == _output_files(reference)
    assert not list(out.glob(".*.tmp"))
    totals = json.loads((out / "stats.json").read_text())
    ref_totals = json.loads((reference / "stats.json").read_text())
    assert (totals["read"], totals["kept"], totals["dropped"]) == (ref_totals["read"], ref_totals["kept"], ref_totals["dropped"])
    assert totals["drops"] == ref_totals["drops"] and totals["shards"] == 3
    manifest = read_manifest(OutputDir(str(out)))
    ref_manifest = read_manifest(OutputDir(str(reference)))
    assert manifest["shards"].keys() == ref_manifest["shards"].keys()
    for name, record in manifest["shards"].items():
        assert record["files"] == ref_manifest["shards"][name]["files"]
    assert manifest["totals"] == ref_manifest["totals"]
