"""The same DAG against an S3-compatible server on loopback (moto's server mode, real HTTP)."""
from __future__ import annotations

import json
import socket

import pytest

from pipeline import api
from pipeline.config import load_run_config
from pipeline.manifest import read_manifest
from pipeline.storage import OutputDir
from synth.web import write_web_shards

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer
    import s3fs

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}}
    fs = s3fs.S3FileSystem(**options)
    fs.call_s3("create_bucket", Bucket="web")
    fs.call_s3("create_bucket", Bucket="out")
    yield fs, options
    server.stop()


def test_dag_reads_and_writes_s3_like_local(s3, ray_session, tmp_path):
    fs, options = s3
    local_in = tmp_path / "in"
    write_web_shards(local_in, n_shards=2, samples_per_shard=16, seed=3, bad_samples=True)
    for shard in sorted(local_in.glob("*.tar")):
        fs.put(str(shard), f"web/cc/{shard.name}")
    opts = json.dumps(options)
    common = ["progress=false", "input.source=test", f"input.storage_options={opts}",
              f"output.storage_options={opts}"]
    summary = api.run(load_run_config(None, ["input.shards=[s3://web/cc/{00000..00001}.tar]",
                                             "output.path=s3://out/np", *common]))
    assert summary.ok and summary.shards_done == 2

    local = api.run(load_run_config(None, [f"input.shards=[{local_in}/*.tar]", f"output.path={tmp_path}/local",
                                           "progress=false", "input.source=test"]))
    assert local.totals["read"] == summary.totals["read"] and local.totals["kept"] == summary.totals["kept"]
    for name in ("00000.tar", "00001.tar", "00000.parquet", "00001.parquet"):
        assert fs.cat(f"out/np/{name}") == (tmp_path / "local" / name).read_bytes(), name
    manifest = read_manifest(OutputDir("s3://out/np", options))
    assert sorted(manifest["shards"]) == ["00000", "00001"]

    again = api.run(load_run_config(None, ["input.shards=[s3://web/cc/*.tar]", "output.path=s3://out/np", *common]))
    assert again.shards_skipped == 2 and again.shards_done == 0

    report = api.stats("s3://out/np", plot_dir=str(tmp_path / "plots"), storage_options=options)
    assert report.totals["read"] == summary.totals["read"] and report.table.num_rows == summary.totals["read"]
