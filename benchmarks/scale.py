"""The data DAG's bookkeeping at scale: many tiny shards through a trivial stage.

    .venv/bin/python benchmarks/scale.py [--shards 100000] [--work /tmp/scale] [--in-flight 16]
    .venv/bin/python benchmarks/scale.py --s3 --shards 2000      # against a loopback S3 (moto)
    .venv/bin/python benchmarks/scale.py --resume-only --shards 100000

Each input shard holds one 32x32 JPEG with a caption; the DAG is ``stages: {ingest: {}}`` (ingest
runs inside the read task), so a shard costs a read task and a write task and the run measures
the orchestration and the commit bookkeeping, not a model. Printed:

- per-commit driver overhead over the first and the last 1,000 commits and their ratio (flat:
  <= 1.2), mean and median: the bookkeeping (result in hand -> recorded: manifest, compaction,
  progress; the project's code), Ray's fetch of the result (``ray.get``), and the two together;
- each compaction: the shards committed so far, the records it wrote, its milliseconds (its
  cost is that of the new records, not of every shard);
- the old way, side by side: rewriting the whole manifest per commit (json of every record, as
  the driver did before records and compaction) at the size of the first and of the last commit;
- peak driver RSS (this process; Ray's workers are other processes) and RSS after the first and
  the last 1,000 commits;
- resume start-up with every shard committed (listing the inputs, listing the output, reading
  the manifest), and with the records of the last 1,000 shards newer than the manifest.

``--resume-only`` skips the run: one shard is committed for real (``write_shard``) and its three
files are copied under every other shard's name (its record rewritten with that name), the
manifest compacted from those records, so that resume start-up can be timed at a count whose
full run would take too long here. Start-up only reads names, the manifest and records, so how
the files were made does not change what it does.
"""
from __future__ import annotations

import argparse
import atexit
import io
import json
import os
import resource
import shutil
import statistics
import sys
import tarfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _shard_bytes() -> bytes:
    from PIL import Image

    image = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(image, format="JPEG", quality=80)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("000000000.jpg", image.getvalue()), ("000000000.txt", b"a red square")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class RssAtCommits(threading.Thread):
    """Samples the driver's RSS with the number of commit records written so far."""

    def __init__(self, count) -> None:
        super().__init__(daemon=True)
        self.count, self.samples, self.stop = count, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((self.count(), _rss_mb()))
            self.stop.wait(2.0)


def _old_style_save_ms(records: dict, n: int, folder: Path, repeats: int = 3) -> float:
    """What every commit cost before: the whole manifest (n records) as indented JSON, written."""
    from core.storage import Folder

    subset = dict(list(records.items())[:n])
    out = Folder(str(folder))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out.write_json("_old_manifest.json", {"shards": dict(sorted(subset.items())),
                                               "totals": {"read": sum(r["read"] for r in subset.values())}})
        times.append((time.perf_counter() - t) * 1000)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=100_000)
    ap.add_argument("--work", default="/tmp/scale")
    ap.add_argument("--in-flight", type=int, default=16)
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    ap.add_argument("--s3", action="store_true", help="input and output on a loopback S3 server (moto)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--resume-only", action="store_true", help="time resume start-up only (see above)")
    args = ap.parse_args()

    import ray

    from pipeline import runner
    from pipeline.config import load_run_config
    from pipeline.manifest import MANIFEST, Manifest, read_manifest
    from pipeline.storage import OutputDir

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "in").mkdir(parents=True)
    data, n = _shard_bytes(), args.shards
    options: dict = {}
    t = time.perf_counter()
    if args.s3:
        import socket
        import subprocess

        import s3fs

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        # moto in its own process: in the driver's it would share the driver's GIL and be timed
        # as driver overhead; its log (one line per request) counts what start-up asks for
        log_path = work / "moto.log"
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))
        atexit.register(server.kill)
        requests = lambda: sum(1 for line in open(log_path) if "HTTP/1.1" in line)  # noqa: E731
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        options = {"key": "testing", "secret": "testing",
                   "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}}
        fs = s3fs.S3FileSystem(**options)
        fs.call_s3("create_bucket", Bucket="web")
        fs.call_s3("create_bucket", Bucket="out")
        fs.pipe({f"web/in/{i:06d}.tar": data for i in range(n)})
        shards, output = f"s3://web/in/{{000000..{n - 1:06d}}}.tar", "s3://out/scale"
    else:
        for i in range(n):
            (work / "in" / f"{i:06d}.tar").write_bytes(data)
        shards, output = f"{work}/in/{{000000..{n - 1:06d}}}.tar", str(work / "out")
    print(f"{n} input shards written in {time.perf_counter() - t:.1f} s ({'s3' if args.s3 else 'local'})")
    opts = json.dumps(options)
    overrides = [f"input.shards=[{shards}]", f"output.path={output}", "progress=false", "input.source=bench",
                 "stages={ingest: {min_size: 1}}", f"ray.max_shards_in_flight={args.in_flight}",
                 f"input.storage_options={opts}", f"output.storage_options={opts}"]
    cfg = load_run_config(None, overrides)
    out = OutputDir(output, options)

    if args.resume_only:
        return _resume_only(cfg, out, n, work)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    committed = [0]
    sampler = RssAtCommits(lambda: committed[0])
    sampler.start()
    original_add, original_save = Manifest.add, Manifest.save
    compactions: list[tuple[int, int, float]] = []    # (shards committed, records compacted, ms)

    def counting_add(self, record, stats):
        original_add(self, record, stats)
        committed[0] += 1

    def timed_save(self, out):
        new, t = self.uncompacted, time.perf_counter()
        original_save(self, out)
        compactions.append((committed[0], new, (time.perf_counter() - t) * 1000))

    Manifest.add, Manifest.save = counting_add, timed_save
    t = time.perf_counter()
    summary = runner.run(cfg)
    run_s = time.perf_counter() - t
    Manifest.add, Manifest.save = original_add, original_save
    sampler.stop.set()
    sampler.join()
    assert summary.ok and summary.shards_done == n, summary.shards_failed
    k = min(1000, n // 2)
    per_commit = {}
    for label, window in (("bookkeeping", summary.commits.bookkeeping_s), ("ray.get", summary.commits.fetch_s)):
        per_commit[label] = (list(window.first)[:k], list(window.last)[-k:])
    both = summary.commits.bookkeeping_s, summary.commits.fetch_s
    per_commit["together"] = ([a + b for a, b in zip(both[0].first, both[1].first)][:k],
                              [a + b for a, b in zip(both[0].last, both[1].last)][-k:])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_first = next((mb for c, mb in sampler.samples if c >= k), float("nan"))
    rss_last = next((mb for c, mb in reversed(sampler.samples) if c <= n - k), float("nan"))

    head = Manifest.load(out)
    head_bytes = len(out.read_bytes(MANIFEST))
    segment_bytes = sum(len(out.read_bytes(name)) for name in head.segments)
    records = read_manifest(out)["shards"]
    old_first = _old_style_save_ms(records, k, work)
    old_last = _old_style_save_ms(records, n, work)

    # resume with every shard committed
    before = requests() if args.s3 else 0
    t = time.perf_counter()
    again = runner.run(cfg)
    resume_s = time.perf_counter() - t
    resume_requests = (requests() - before) if args.s3 else None
    assert again.shards_skipped == n and again.shards_done == 0

    # resume after a kill: the last k records are newer than the manifest
    _uncompact_newest(out, k)
    t = time.perf_counter()
    recovered = runner.run(cfg)
    recover_s = time.perf_counter() - t
    assert recovered.shards_skipped == n and recovered.shards_done == 0
    ray.shutdown()

    print(f"run: {n} shards in {run_s:.1f} s ({n / run_s:.1f} shards/s); manifest: head {head_bytes / 1e6:.2f} MB, "
          f"{len(head.segments)} segments {segment_bytes / 1e6:.2f} MB")
    for label, (first, last) in per_commit.items():
        for stat in (statistics.mean, statistics.median):
            a, b = stat(first) * 1000, stat(last) * 1000
            print(f"per-commit driver overhead, {label:11s} {stat.__name__:6s}: first {k} {a:.3f} ms, "
                  f"last {k} {b:.3f} ms, ratio last/first {b / a:.2f}")
    print("compactions during the run (shards committed: records compacted, ms): "
          + ", ".join(f"{c}: {r}, {ms:.0f}" for c, r, ms in compactions))
    print(f"old way (whole manifest per commit), same records: at commit {k} {old_first:.1f} ms, "
          f"at commit {n} {old_last:.1f} ms, ratio {old_last / old_first:.1f}")
    print(f"driver RSS: after {k} commits {rss_first:.0f} MB, at commit {n - k} {rss_last:.0f} MB, "
          f"peak {peak_mb:.0f} MB")
    print(f"resume, all {n} committed: {resume_s:.2f} s in all (start-up: inputs listed and output "
          f"opened {again.startup_s:.2f} s, of which output opened {again.resume_s:.2f} s)"
          + (f"; {resume_requests} S3 requests in all" if args.s3 else ""))
    print(f"resume, last {k} records newer than the manifest: {recover_s:.2f} s "
          f"(output opened {recovered.resume_s:.2f} s)")
    if args.s3:
        server.terminate()
        server.wait()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def _uncompact_newest(out, k: int) -> None:
    """The state a kill leaves: the newest ``k`` records committed but not yet compacted (the
    manifest's merged statistics are left as they are: start-up does not read them)."""
    from pipeline.manifest import Manifest

    manifest = Manifest.load(out)
    records = manifest.compacted(out)
    for name in sorted(records)[-k:]:
        del records[name]
    manifest.rewrite(out, records, manifest.stats)


def _resume_only(cfg, out, n: int, work: Path) -> None:
    from pipeline import runner
    from pipeline.manifest import Manifest, ShardRecord, stats_name
    from pipeline.resume import open_output
    from pipeline.storage import shard_name

    assert out.local, "--resume-only writes its output locally"
    t = time.perf_counter()
    manifest = open_output(out, cfg, []).manifest
    urls = sorted(str(p) for p in (work / "in").iterdir())
    first = runner.read_and_process(urls[0], shard_name(urls[0]), cfg, ("ingest",))
    _, stats0 = runner.write_shard(first, cfg)
    name0, stats = first.name, stats0
    blobs = {ext: Path(out.path(f"{name0}{ext}")).read_bytes() for ext in (".tar", ".parquet")}
    for url in urls:
        name = shard_name(url)
        if name != name0:
            for ext, data in blobs.items():
                Path(out.path(f"{name}{ext}")).write_bytes(data)
            files = {f"{name}.tar": stats0["files"][f"{name0}.tar"],
                     f"{name}.parquet": stats0["files"][f"{name0}.parquet"]}
            stats = {**stats0, "shard": name, "input": url, "files": files}
            Path(out.path(stats_name(name))).write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
        manifest.add(ShardRecord.from_stats(stats), stats)
    manifest.save(out)
    print(f"committed output of {n} shards made in {time.perf_counter() - t:.1f} s (one real, copies)")
    for label in ("all committed, fresh process cache", "all committed, again"):
        t = time.perf_counter()
        again = runner.run(cfg)
        print(f"resume, {label}: {time.perf_counter() - t:.2f} s in all (start-up {again.startup_s:.2f} s, "
              f"output opened {again.resume_s:.2f} s), {again.shards_skipped} skipped")
    _uncompact_newest(out, 1000)
    t = time.perf_counter()
    recovered = runner.run(cfg)
    print(f"resume, last 1000 records newer than the manifest: {time.perf_counter() - t:.2f} s "
          f"(output opened {recovered.resume_s:.2f} s), {recovered.shards_skipped} skipped")
    print(f"driver RSS peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
