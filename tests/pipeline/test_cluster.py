"""Multi-node: a worker node dies mid-run; the run finishes with the one-node run's bytes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import api
from pipeline.config import load_run_config
from pipeline.manifest import read_manifest
from pipeline.storage import OutputDir
from synth.web import write_web_shards

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
N_SHARDS = 8


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".tar", ".parquet")}


def test_losing_a_worker_node_loses_and_duplicates_nothing(tmp_path, ray_session):
    shards = tmp_path / "in"
    expected = write_web_shards(shards, n_shards=N_SHARDS, samples_per_shard=6, seed=21, bad_samples=True)
    reference = tmp_path / "one_node"
    api.run(load_run_config(None, [f"input.shards=[{shards}/*.tar]", f"output.path={reference}",
                                   "progress=false", "input.source=test"]))

    out = tmp_path / "cluster"
    # A Ray temp dir of its own: the cluster's address file must not attract other Ray clients
    # on this machine (a short path: Ray's sockets live under it).
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_TMPDIR=ray_tmp)
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([sys.executable, str(REPO / "tests" / "pipeline" / "cluster_job.py"),
                               f"{shards}/*.tar", str(out)], env=env, capture_output=True, text=True,
                              timeout=600, cwd=REPO)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in report, report
    assert report["committed_before_removal"] < N_SHARDS, "the node was removed after the run"
    assert report["victim_had_actor"] and report["alive_nodes"] == 2      # head + 1 worker left
    assert report["ok"] and report["done"] == N_SHARDS and report["skipped"] == 0
    assert report["commits"] == N_SHARDS          # with the N distinct names below: each once

    assert _files(out) == _files(reference)
    rows = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted((r["input_shard"], r["key"]) for r in rows) == sorted(expected)
    manifest = read_manifest(OutputDir(str(out)))
    assert sorted(manifest["shards"]) == [f"{i:05d}" for i in range(N_SHARDS)]
    assert manifest["totals"]["read"] == len(expected) == report["totals_read"]
