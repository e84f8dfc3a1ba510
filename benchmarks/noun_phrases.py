"""Benchmark: the noun-phrase stage vs bare ``nlp.pipe``, and end-to-end ``pipeline run``.

Prints, measured side by side in one run on the same captions, model and components:
  stage captions/s, bare nlp.pipe captions/s, and their ratio (goal >= 0.9);
then the end-to-end captions/s of `pipeline run` on generated shards (local Ray).

    .venv/bin/python benchmarks/noun_phrases.py [--captions 5000] [--repeats 3] [--shards 4]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages.noun_phrases import NounPhraseConfig, NounPhrases  # noqa: E402
from stages.schema import Sample  # noqa: E402
from synth.web import make_captions, write_web_shards  # noqa: E402


def bare_pipe(nlp, captions, batch_size):
    n = 0
    for doc in nlp.pipe(captions, batch_size=batch_size):
        n += sum(1 for _ in doc.noun_chunks)
    return n


def stage_call(stage, captions):
    batch = [Sample(key=str(i), input_shard="bench", caption=c) for i, c in enumerate(captions)]
    stage(batch)
    return sum(len(s.phrases) for s in batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=500)
    args = ap.parse_args()

    cfg = NounPhraseConfig()
    stage = NounPhrases(cfg)
    stage.setup()
    nlp = stage.nlp
    captions = make_captions(args.captions, seed=0)
    bare_pipe(nlp, captions[:500], cfg.batch_size)          # warm up both paths
    stage_call(stage, captions[:500])

    t_stage, t_bare = [], []
    for _ in range(args.repeats):                            # interleaved: same machine state
        t = time.perf_counter(); bare_pipe(nlp, captions, cfg.batch_size); t_bare.append(time.perf_counter() - t)
        t = time.perf_counter(); stage_call(stage, captions); t_stage.append(time.perf_counter() - t)
    bare = args.captions / statistics.median(t_bare)
    ours = args.captions / statistics.median(t_stage)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"captions: {args.captions}, batch_size: {cfg.batch_size}, components: {nlp.pipe_names}")
    print(f"bare nlp.pipe      {bare:8.1f} captions/s")
    print(f"noun_phrases stage {ours:8.1f} captions/s")
    print(f"ratio stage/bare   {ours / bare:8.3f}   (goal >= 0.9)")

    from pipeline import api
    with tempfile.TemporaryDirectory() as tmp:
        write_web_shards(Path(tmp) / "in", n_shards=args.shards, samples_per_shard=args.per_shard,
                         seed=0, bad_samples=False)
        t = time.perf_counter()
        summary = api.run(None, [f"input.shards=[{tmp}/in/*.tar]", f"output.path={tmp}/out",
                                 "progress=false", "stages.noun_phrases.resources.actors=2"])
        dt = time.perf_counter() - t
    n = summary.totals["read"]
    print(f"pipeline run end-to-end: {n} samples in {dt:.1f} s = {n / dt:.1f} captions/s "
          f"(includes Ray start-up, image validation and writing)")


if __name__ == "__main__":
    main()
