"""Benchmark: GLIP forward images/s (eval mode, batch of B), with and without deep fusion.

    .venv/bin/python benchmarks/model_forward.py [--models tiny glip_t] [--size 320 480] [--batch 2]
        [--iters 3] [--device cpu|cuda] [--precision fp32|bf16]

For each model it builds the config twice, as given and with ``head.fusion=none`` (GLIP-T(A)
style: no X-MHA, no BERT layers in the head), with random weights (speed does not depend on the
values), and prints images/s for both and their ratio. The prompt is a detection prompt of 80
COCO-like names (the official evaluation's shape, ~200 tokens) padded as the config says.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from model.config import load_model_config  # noqa: E402
from model.glip import build_glip  # noqa: E402
from model.prompts import build_prompt  # noqa: E402

NAMES = [f"object{i} thing" for i in range(80)]


def bench(model_name: str, overrides: list[str], size, batch, iters, device, precision) -> float:
    cfg = load_model_config(model_name, overrides)
    torch.manual_seed(0)
    model = build_glip(cfg, load_weights=False).to(device).eval()
    prompt = build_prompt(NAMES).caption
    enc = model.tokenize([prompt] * batch)
    images = torch.randn(batch, 3, *size, device=device)
    sizes = [tuple(size)] * batch
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")
    times = []
    with torch.inference_mode(), autocast:
        model(images, sizes, ids, mask)                      # warm-up
        for _ in range(iters):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(images, sizes, ids, mask)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "glip_t"])
    ap.add_argument("--size", nargs=2, type=int, default=[320, 480], metavar=("H", "W"))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args()
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    print(f"device: {dev}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"input {args.size[0]}x{args.size[1]}, batch {args.batch}, {args.precision}, 80-name prompt")
    for name in args.models:
        fused = bench(name, [], args.size, args.batch, args.iters, args.device, args.precision)
        plain = bench(name, ["head.fusion=none"], args.size, args.batch, args.iters, args.device, args.precision)
        print(f"{name:8s} with fusion {fused:8.2f} img/s   without fusion {plain:8.2f} img/s   "
              f"fusion costs x{plain / fused:.2f}")


if __name__ == "__main__":
    main()
