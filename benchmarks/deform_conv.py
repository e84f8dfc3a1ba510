"""Benchmark: modulated deformable conv, torchvision's kernel vs the grid-sample formulation.

    .venv/bin/python benchmarks/deform_conv.py [--repeats 5] [--threads 2] [--device cpu|cuda]

``model.deform_conv`` runs DCNv2 as ``grid_sample`` + one matrix product on CPU because
torchvision's CPU backward is a scalar loop. For the shapes of the `tiny` head (64 channels,
a P3 level of a ~200 px image, batch 4) and of GLIP-T (256 channels, P3 of 800x1333, batch 1),
this prints forward and forward+backward milliseconds of both and their ratio, interleaved
(A B A B ...) so that a loaded machine slows both alike. Outputs are compared too.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torchvision.ops import deform_conv2d  # noqa: E402

from model.deform_conv import modulated_deform_conv2d_sampled  # noqa: E402

SHAPES = {"tiny P3 (B4, C64, 24x28)": (4, 64, 24, 28), "glip_t P3 (B1, C256, 100x167)": (1, 256, 100, 167)}


def _inputs(shape, device):
    b, c, h, w = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, h, w, generator=g)
    offset = torch.randn(b, 18, h, w, generator=g) * 2
    mask = torch.rand(b, 9, h, w, generator=g)
    weight = torch.randn(c, c, 3, 3, generator=g) * 0.02
    bias = torch.zeros(c)
    return [t.to(device).requires_grad_() for t in (x, offset, mask, weight, bias)]


def _run(fn, args, backward: bool, device) -> float:
    start = time.perf_counter()
    out = fn(*args)
    if backward:
        out.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}, "
          f"device {args.device}")
    tv = lambda x, o, m, w, b: deform_conv2d(x, o, w, b, padding=1, mask=m)  # noqa: E731
    gs = lambda x, o, m, w, b: modulated_deform_conv2d_sampled(x, o, m, w, b)  # noqa: E731
    print("| shape | pass | torchvision ms | grid-sample ms | ratio tv / gs | max abs diff |")
    print("|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        inputs = _inputs(shape, args.device)
        with torch.no_grad():
            diff = (tv(*inputs) - gs(*inputs)).abs().max().item()
        for backward in (False, True):
            times = {"tv": [], "gs": []}
            for fn in (tv, gs):                                   # warm-up
                _run(fn, inputs, backward, args.device)
            for _ in range(args.repeats):
                for key, fn in (("tv", tv), ("gs", gs)):
                    for t in inputs:
                        t.grad = None
                    times[key].append(_run(fn, inputs, backward, args.device))
            a, b = statistics.median(times["tv"]) * 1e3, statistics.median(times["gs"]) * 1e3
            print(f"| {name} | {'fwd+bwd' if backward else 'fwd'} | {a:.1f} | {b:.1f} | {a / b:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
