"""Benchmark: the teacher's CPU side per image, and a feed test of the labelling stage.

    .venv/bin/python benchmarks/preprocess.py [--images 48] [--rates 40 20 10 5] [--workers 0]

1. CPU cost of preprocessing one 640x480 JPEG for GLIP-T's test size (800x1333), in core-ms
   (thread CPU time, one thread), side by side in one run: the official ``Preprocessor``
   (decode, EXIF, PIL resize, float normalisation) vs the feed's CPU side
   (``decode_for_device``: decode, EXIF, uint8; the resize and normalisation run on the device)
   and its ``resize_at=cpu`` variant (PIL resize on the CPU, bit-identical input). The device
   side (``device_batch``) is timed too, on this machine's CPU, for reference only.
2. A FEED TEST, not a model figure: the labelling stage with a stand-in for the network (and
   its post-processing) that sleeps a fixed time per image, the way a GPU would be busy. For each
   stand-in rate it reports the fraction of the wall time the stand-in was busy and the img/s per
   CPU core the CPU side sustained (images / process CPU seconds).
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def photo_jpeg(seed: int, size=(640, 480)) -> bytes:
    """A 640x480 JPEG with photo-like content (gradients, shapes, sensor noise), quality 90."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([x / size[0] * 255, y / size[1] * 255, ((x * (seed + 1) + y) % 255)], -1)
    arr = (base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def core_ms(fn, data: list[bytes], repeats: int) -> float:
    """Median thread CPU time of ``fn(image)`` in ms."""
    times = []
    for _ in range(repeats):
        for d in data:
            t = time.thread_time()
            fn(d)
            times.append(time.thread_time() - t)
    return 1000 * float(np.median(times))


def preprocessing_cost(images: list[bytes], repeats: int) -> dict[str, float]:
    from model.config import InputConfig
    from model.transforms import Preprocessor, ResizeAt, decode_for_device, device_batch

    cfg = InputConfig()
    official = Preprocessor(cfg)
    torch.set_num_threads(1)

    def feed(resize_at):
        def run(d):
            out = decode_for_device(d, cfg.min_size_test, cfg.max_size_test, resize_at)
            torch.empty(out.pixels.size, dtype=torch.uint8).numpy()[:] = out.pixels.reshape(-1)  # the pack
        return run

    decoded = decode_for_device(images[0], cfg.min_size_test, cfg.max_size_test)
    flat = torch.from_numpy(decoded.pixels.reshape(-1).copy())

    def device_side(_):
        device_batch(flat, [decoded.pixels.shape[:2]], [decoded.resized], cfg.pixel_mean, cfg.pixel_std, 32)

    out = {}
    for _ in range(2):           # interleaved: both sides see the same machine load
        for name, fn in [("official Preprocessor.transform", official.transform),
                         ("feed CPU side, resize on the device", feed(ResizeAt.DEVICE)),
                         ("feed CPU side, resize_at=cpu (PIL)", feed(ResizeAt.CPU)),
                         ("device side on this CPU (reference)", device_side)]:
            out.setdefault(name, []).append(core_ms(fn, images, repeats))
    torch.set_num_threads(os.cpu_count() or 1)
    return {k: min(v) for k, v in out.items()}


class StandIn:
    """Takes the place of the device's work (normalise, forward, post-process): sleeps
    ``seconds_per_image`` per image and reports no boxes."""

    def __init__(self, seconds_per_image: float):
        self.seconds_per_image = seconds_per_image
        self.busy = 0.0

    def infer(self, batch):
        t = time.perf_counter()
        time.sleep(self.seconds_per_image * len(batch.indices))
        self.busy += time.perf_counter() - t
        return [(range(len(batch.indices)), None)], None

    @staticmethod
    def postprocess(outputs, maps, sizes):
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
                for _ in sizes]


def feed_test(stage, make_samples, rate: float) -> dict[str, float]:
    stand_in = StandIn(1.0 / rate)
    stage._infer, stage.postprocess = stand_in.infer, stand_in.postprocess
    samples = make_samples()
    cpu, wall = time.process_time(), time.perf_counter()
    stage(samples)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"rate": rate, "busy": stand_in.busy / wall, "img_s": len(samples) / wall,
            "img_s_per_core": len(samples) / cpu, "cpu_s": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rates", type=float, nargs="+", default=[160, 80, 40, 20])
    ap.add_argument("--workers", type=int, default=0, help="cpu_workers (0 = the CPUs this process may use)")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    from model.checkpoint import save_pretrained
    from model.config import load_model_config
    from model.glip import build_glip
    from stages.ingest import Ingest, IngestConfig
    from stages.pseudo_label import PseudoLabel, PseudoLabelConfig
    from stages.schema import Phrase, Sample

    images = [photo_jpeg(i) for i in range(8)]
    cost = preprocessing_cost(images, args.repeats)

    caption = "a man in a red jacket riding a brown horse along the beach with two dogs"
    phrases = [Phrase("a man", (0, 5)), Phrase("a red jacket", (9, 21)), Phrase("a brown horse", (29, 42)),
               Phrase("the beach", (49, 58)), Phrase("two dogs", (64, 72))]

    def make_samples():
        out = []
        for i in range(args.images):
            s = Sample(key=f"{i:06d}", input_shard="0", image=images[i % len(images)], image_ext="jpg",
                       raw_caption=caption.encode())
            Ingest(IngestConfig())([s])
            s.phrases = list(phrases)
            out.append(s)
        return out

    with tempfile.TemporaryDirectory() as tmp:
        model = build_glip(load_model_config("tiny"))     # only its tokenizer and config are used
        teacher = save_pretrained(model, Path(tmp) / "t")
        stage = PseudoLabel(PseudoLabelConfig(checkpoint=str(teacher), model="tiny", batch_size=args.batch,
                                              cpu_workers=args.workers, min_score=0.5,
                                              model_overrides=["input.min_size_test=800", "input.max_size_test=1333"]))
        stage.setup()
        feeds = [feed_test(stage, make_samples, r) for r in args.rates]

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores (may use {len(os.sched_getaffinity(0))}), "
          f"torch {torch.__version__}; 640x480 JPEG (quality 90) -> 800x1333")
    print("\nCPU cost per image (median thread CPU time, 1 thread):")
    base = cost["official Preprocessor.transform"]
    for name, ms in cost.items():
        print(f"  {name:40s} {ms:7.2f} core-ms  ({base / ms:5.2f}x less than official)")
    print(f"\nFEED TEST (stand-in network, not a model figure): {args.images} images, batch {args.batch}, "
          f"cpu_workers {stage.config.workers()}")
    print(f"  {'stand-in img/s':>15s} {'busy':>6s} {'img/s':>7s} {'img/s per CPU core':>19s}")
    for f in feeds:
        print(f"  {f['rate']:15.0f} {f['busy']:6.3f} {f['img_s']:7.1f} {f['img_s_per_core']:19.1f}")


if __name__ == "__main__":
    main()
