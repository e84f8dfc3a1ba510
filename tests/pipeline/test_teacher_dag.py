"""The full DAG with the GLIP teacher on CPU actors: ingest -> noun_phrases -> pseudo_label -> write."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest

from pipeline import api
from pipeline.config import load_run_config
from synth.web import write_web_shards

pytestmark = pytest.mark.slow


TEACHER_OVERRIDES = ["inference.score_threshold=0.0", "input.min_size_test=128", "input.max_size_test=192"]


def _args(root, out, teacher, *extra):
    return [f"input.shards=[{root}/*.tar]", f"output.path={out}", "progress=false", "input.source=test",
            f"stages.pseudo_label.checkpoint={teacher}", f"stages.pseudo_label.model_overrides={json.dumps(TEACHER_OVERRIDES)}",
            "stages.pseudo_label.min_score=0.06", "stages.pseudo_label.batch_size=4", *extra]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    expected = write_web_shards(root, n_shards=2, samples_per_shard=8, seed=11, bad_samples=True)
    return root, expected


@pytest.fixture(scope="module")
def labelled(shards, tiny_teacher, ray_session, tmp_path_factory):
    root, _ = shards
    out = tmp_path_factory.mktemp("pl") / "out"
    summary = api.run(load_run_config(None, _args(root, out, tiny_teacher)))
    return out, summary


def test_every_sample_accounted_and_boxes_valid(shards, labelled):
    root, expected = shards
    out, summary = labelled
    assert summary.ok
    rows = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(rows) == len(expected)
    totals = json.loads((out / "stats.json").read_text())
    assert totals["read"] == totals["kept"] + totals["dropped"] == len(expected)
    assert totals["kept"] > 0 and totals["boxes"] > 0 and totals["scores"]["count"] == totals["boxes"]
    n_records = 0
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if not m.name.endswith(".json"):
                    continue
                rec = json.loads(tar.extractfile(m).read())
                n_records += 1
                exp = expected[(tar_path.stem, rec["key"])]
                assert exp.reason is None and (rec["width"], rec["height"]) == exp.size
                assert rec["boxes"] and len(rec["boxes"]) == len(rec["scores"]) == len(rec["tokens_positive"])
                spans = {tuple(p["span"]) for p in rec["phrases"]}
                for (x1, y1, x2, y2), score, tp in zip(rec["boxes"], rec["scores"], rec["tokens_positive"]):
                    assert 0 <= x1 <= x2 <= rec["width"] and 0 <= y1 <= y2 <= rec["height"]
                    assert score >= 0.06 and tuple(tp[0]) in spans
                assert rec["labeler"]["model"] == "tiny"
    kept_rows = [r for r in rows if r["status"] == "kept"]
    assert n_records == len(kept_rows) and all(r["n_boxes"] > 0 and r["max_score"] >= 0.06 for r in kept_rows)


def test_manifest_carries_the_labeler(labelled, tiny_teacher):
    out, _ = labelled
    manifest = json.loads((out / "_manifest.json").read_text())
    labeler = manifest["extra"]["labeler"]
    assert labeler["min_score"] == 0.06 and len(labeler["checkpoint_sha256"]) == 64
    assert manifest["config"]["stages"]["pseudo_label"]["checkpoint"] == str(tiny_teacher)


def test_teacher_failure_is_retried_and_output_equals_clean_run(shards, labelled, tiny_teacher, tmp_path):
    root, _ = shards
    reference, _ = labelled
    out = tmp_path / "retry"
    marker = tmp_path / "failed-once"
    env = dict(os.environ, PIPELINE_FAIL_ONCE=f"pseudo_label:{marker}")
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", *_args(root, out, tiny_teacher),
                             "ray.num_cpus=2"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.exists(), "the injected failure never fired"
    assert "0 failed" in result.stdout
    for name in ("00000.tar", "00001.tar", "00000.parquet", "00001.parquet"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_show_and_export_read_the_output(labelled, tmp_path):
    from stages.readers.mdetr import MdetrGroundingReader, MdetrReaderConfig

    out, summary = labelled
    gallery = api.show(str(out), out=str(tmp_path / "gallery"), n=4)
    html = (tmp_path / "gallery" / "index.html").read_text()
    assert gallery["shown"] == min(4, summary.totals["kept"]) and all(k in html for k in gallery["keys"])
    exported = api.export(str(out), out=str(tmp_path / "mdetr"), fmt="mdetr")
    reader = MdetrGroundingReader(MdetrReaderConfig(annotations=exported["annotations"],
                                                    image_root=exported["image_root"]))
    assert len(reader) == summary.totals["kept"]
    assert sum(len(im.boxes) for im in reader) == summary.totals["boxes"]


def test_sigkill_during_the_teacher_stage_then_rerun_equals_clean_run(shards, labelled, tiny_teacher, tmp_path,
                                                                      run_until_committed):
    root, _ = shards
    reference, _ = labelled
    out = tmp_path / "killed"
    args = [*_args(root, out, tiny_teacher), "ray.max_shards_in_flight=1", "ray.num_cpus=2"]
    assert run_until_committed(args, out) == 1
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 done now, 1 already committed" in result.stdout
    for name in ("00000.tar", "00001.tar", "00000.parquet", "00001.parquet"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
