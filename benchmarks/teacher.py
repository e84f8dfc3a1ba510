"""Benchmark: the teacher stage inside the DAG vs a bare batched forward loop of the same model.

    .venv/bin/python benchmarks/teacher.py [--shards 4] [--per-shard 24] [--batch 4]

Both sides use the same `tiny` teacher (pretrained backbone/text encoder, seeded head), the same
images, captions and noun phrases, the same batch size and test size. The bare loop is
`Predictor.ground` over the images (decode + resize + forward + post-processing; no Ray, no
reading, no writing). The DAG side is `pipeline run` with the teacher on CPU actors (GPU when
present); its steady-state images/s is measured between the first and the last shard commit, so
Ray and model start-up are excluded (they are printed separately). Goal: DAG / bare >= 0.9.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=24)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--min-size", type=int, default=320)
    ap.add_argument("--max-size", type=int, default=512)
    args = ap.parse_args()

    import ray

    from model.checkpoint import save_pretrained
    from model.config import load_model_config
    from model.glip import build_glip
    from model.predictor import Predictor
    from pipeline import api
    from stages.noun_phrases import NounPhrases, NounPhraseConfig
    from stages.schema import Sample
    from synth.web import write_web_shards

    overrides = [f"input.min_size_test={args.min_size}", f"input.max_size_test={args.max_size}"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = build_glip(load_model_config("tiny", overrides))
        teacher = save_pretrained(model, tmp / "teacher")
        write_web_shards(tmp / "in", n_shards=args.shards, samples_per_shard=args.per_shard, seed=0,
                         bad_samples=False)

        # the same inputs for the bare loop: images, captions, noun phrases
        samples = []
        for shard in sorted((tmp / "in").glob("*.tar")):
            with tarfile.open(shard) as tar:
                files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
            for name, data in files.items():
                if name.endswith(".txt"):
                    key = name[:-4]
                    image = next(v for k, v in files.items() if k.startswith(key + ".") and not k.endswith((".txt", ".json")))
                    samples.append(Sample(key=key, input_shard=shard.stem, caption=data.decode(), image=image))
        NounPhrases(NounPhraseConfig())(samples)
        samples = [s for s in samples if s.kept]
        predictor = Predictor(model.eval(), batch_size=args.batch)
        predictor.ground([s.image for s in samples[: args.batch]], [s.caption for s in samples[: args.batch]],
                         [[list(p.span) for p in s.phrases] for s in samples[: args.batch]])   # warm-up
        # Ray starts a worker with OMP_NUM_THREADS = its CPUs (1 for a 0.5-CPU actor): time the
        # bare loop with that many torch threads too, and with torch's default, and compare
        # against the faster one.
        rates = {}
        default_threads = torch.get_num_threads()
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            t = time.perf_counter()
            predictor.ground([s.image for s in samples], [s.caption for s in samples],
                             [[list(p.span) for p in s.phrases] for s in samples])
            rates[threads] = len(samples) / (time.perf_counter() - t)
        torch.set_num_threads(default_threads)
        bare = max(rates.values())

        ray.init(include_dashboard=False, log_to_driver=False)
        t = time.perf_counter()
        summary = api.run(None, [f"input.shards=[{tmp}/in/*.tar]", f"output.path={tmp}/out", "progress=false",
                                 f"stages.pseudo_label.checkpoint={teacher}", "stages.pseudo_label.min_score=0.0",
                                 f"stages.pseudo_label.batch_size={args.batch}", "ray.max_shards_in_flight=2"])
        wall = time.perf_counter() - t
        ray.shutdown()
        dag = summary.commits.steady_rate

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}; tiny teacher, batch {args.batch}, "
          f"test size {args.min_size}/{args.max_size}")
    print(f"images: {len(samples)} in {args.shards} shards")
    for threads, rate in sorted(rates.items()):
        print(f"bare Predictor.ground loop, {threads} torch thread(s)  {rate:7.2f} img/s")
    print(f"pipeline run, steady state                  {dag:7.2f} img/s  (first commit after {summary.commits.first_s:.1f} s: Ray, spaCy "
          f"and teacher start-up; whole run {wall:.1f} s)")
    print(f"ratio DAG / best bare loop                  {dag / bare:7.3f}   (goal >= 0.9)")


if __name__ == "__main__":
    main()
