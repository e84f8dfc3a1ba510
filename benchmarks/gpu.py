"""The GPU suite: one command, about 8 minutes on one H200; prints a table last and writes JSON.

    python benchmarks/gpu.py --prepare-assets gpu_assets/        # here, once: the BERT vocabulary
    python benchmarks/gpu.py --vocab-dir gpu_assets/ --out gpu.json  # on the GPU machine
    python benchmarks/gpu.py --smoke --vocab-dir DIR              # every part at toy sizes, CPU, < 1 min

Needs only torch, torchvision, transformers, timm, numpy and pillow (no Ray, spaCy, webdataset,
pycocotools or network): the vocabulary travels in the git-ignored folder given by --vocab-dir.
Parts, each under its own time budget (rows past it are reported as skipped):

* ``peak``: the measured bf16 matmul peak (square matmuls), the yardstick for the FLOP share;
* ``forward``: GLIP-T (configs/model/glip_t.yaml, random weights) at 800x1333 with caption-length
  prompts: img/s at batch 1/8/16/32, bf16 (the stage's precision policy) vs fp32, prompts padded
  to the longest vs 256 tokens, torch.compile off/on; FLOPs per image (FlopCounterMode) and the
  share of the measured peak they reach;
* ``label``: the labelling stage (phrases given, no spaCy) over in-memory 640x480 JPEGs vs the
  bare forward over the same batches: img/s ratio and GPU busy fraction (CUDA events);
* ``train``: GLIP-T and GLIP-L training steps (bf16, random weights and boxes), batch 1/2/4,
  gradient checkpointing of the head's fusion off/on (the only checkpointing the model has):
  img/s and peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import (CAPTION, SPANS, Budget, build, image_size, jpeg_samples,  # noqa: E402,F401
                        model_config, prepare_assets, prompts, sync, timed)


# ------------------------------------------------------------------------------------- parts
def part_peak(args, device, budget) -> dict:
    n = 256 if args.smoke else 8192
    dtype = torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    s = timed(lambda: a @ b, device, iters=3 if args.smoke else 50, warmup=2)
    return {"matmul_n": n, "bf16_tflops": 2 * n ** 3 / s / 1e12}


def counted_flops(args) -> dict:
    """GLIP-T's forward FLOPs per image at 800x1333, prompts padded to the longest vs 256, counted
    on the CPU without computing: the text encoder runs for real (its mask checks read values),
    the image side on fake tensors (``--flops-only``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    model = build(model_config("glip_t", args, args.tmp), torch.device("cpu"))
    h, w, _ = image_size(args)
    out = {}
    for pad in (False, True):
        ids, mask = prompts(model, 1, pad, torch.device("cpu"))
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            text = model.language(ids, mask)
            with FakeTensorMode(allow_non_fake_inputs=True) as fake:
                feats = model.backbone(torch.empty(1, 3, h, w))
                model.head(feats, fake.from_tensor(text["hidden"]), fake.from_tensor(text["mask"]))
        out["256" if pad else f"longest ({ids.shape[1]} tokens)"] = counter.get_total_flops() / 1e9
    return out


def forward_flops(model, device, batch_hw, sizes, ids, mask) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(ids.shape[0], 3, *batch_hw, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x, [sizes] * ids.shape[0], ids, mask)
    return counter.get_total_flops() / ids.shape[0]


def part_forward(args, device, budget, peak) -> list[dict]:
    from core.device import Precision, autocast
    from stages.teacher_precision import apply_policy

    cfg = model_config("glip_t", args, args.tmp)
    model = build(cfg, device)
    from stages.pseudo_label import PseudoLabelConfig

    apply_policy(model, PseudoLabelConfig().precision_policy)    # the stage's default
    h, w, sizes = image_size(args)
    if args.smoke:     # one row of each kind
        grid = [("bf16", False, "none", 1), ("fp32", False, "none", 1), ("bf16", True, "none", 1),
                ("bf16", False, "default", 1)]
    else:
        batches = [1, 8, 16, 32]
        grid = ([("bf16", False, "none", b) for b in batches] + [("fp32", False, "none", b) for b in batches]
                + [("bf16", True, "none", b) for b in (8, 32)] + [("bf16", False, "default", 8)])
    rows, flops = [], {}
    for pad in (False, True):
        ids, mask = prompts(model, 1, pad, device)
        flops[pad] = forward_flops(model, device, (h, w), sizes, ids, mask)
    compiled = None
    for precision, pad, comp, b in grid:
        row = {"part": "forward", "model": "glip_t", "precision": precision, "text": "256" if pad else "longest",
               "compile": comp, "batch": b}
        if not budget.ok():
            rows.append({**row, "skipped": "time budget"})
            continue
        fn = model
        if comp != "none":
            if args.smoke and device.type == "cpu":
                rows.append({**row, "skipped": "torch.compile not timed on CPU (smoke)"})
                continue
            compiled = compiled or torch.compile(model, mode=comp)
            fn = compiled
        x = torch.randn(b, 3, h, w, device=device)
        ids, mask = prompts(model, b, pad, device)
        prec = Precision.BF16 if precision == "bf16" else Precision.FP32

        def run():
            with torch.inference_mode(), autocast(device, prec):
                fn(x, [sizes] * b, ids, mask)

        try:
            t0 = time.perf_counter()
            run()                                        # first call: compile / cudnn autotune
            first = time.perf_counter() - t0
            s = timed(run, device, iters=1 if args.smoke else 5, warmup=0 if args.smoke else 1)
        except torch.cuda.OutOfMemoryError:
            rows.append({**row, "skipped": "CUDA out of memory"})
            continue
        ips = b / s
        row.update(img_s=ips, first_call_s=first, gflop_per_img=flops[pad] / 1e9,
                   peak_fraction=flops[pad] * ips / (peak * 1e12) if peak else None)
        rows.append(row)
    del model, compiled
    return rows


def part_label(args, device, budget) -> dict:
    from core.device import Precision, autocast
    from model.transforms import device_batch, resized_size
    from stages.pseudo_label import PseudoLabel, PseudoLabelConfig

    cfg = model_config("glip_t", args, args.tmp)
    model = build(cfg, device)
    n, batch = (8, 4) if args.smoke else (256, 16)
    size = (96, 64) if args.smoke else (640, 480)
    stage = PseudoLabel(PseudoLabelConfig(checkpoint="(in memory)", batch_size=batch, min_score=0.0,
                                          device=device.type, precision=Precision.AUTO), model=model)
    stage.setup()
    busy = []

    def forward_with_events(*a):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = model(*a)
            end.record()
            busy.append((start, end))
            return out
        t = time.perf_counter()
        out = model(*a)
        busy.append(time.perf_counter() - t)
        return out

    stage.forward = forward_with_events
    stage(jpeg_samples(batch, size))                   # warm-up (cudnn autotune, allocator)
    busy.clear()
    samples = jpeg_samples(n, size)
    sync(device)
    t = time.perf_counter()
    stage(samples)
    sync(device)
    wall = time.perf_counter() - t
    gpu = sum(s.elapsed_time(e) / 1000 for s, e in busy) if device.type == "cuda" else sum(busy)
    # the bare forward over the same batches (already normalised on the device)
    icfg = model.cfg.input
    flat = torch.zeros(size[0] * size[1] * 3, dtype=torch.uint8, device=device)
    resized = [resized_size(size[1], size[0], stage.predictor.preprocess.min_size,
                            stage.predictor.preprocess.max_size)] * batch
    images = device_batch(flat.repeat(batch), [(size[1], size[0])] * batch, resized, icfg.pixel_mean,
                          icfg.pixel_std, icfg.size_divisibility)
    ids, mask = prompts(model, batch, False, device)

    def bare():
        with torch.inference_mode(), autocast(device, stage.precision):
            model(images, resized, ids, mask)

    bare_s = timed(bare, device, iters=max(1, n // batch))     # one warm-up call first
    stage_ips, bare_ips = n / wall, batch / bare_s
    return {"part": "label", "model": "glip_t", "precision": stage.precision.value, "images": n, "batch": batch,
            "stage_img_s": stage_ips,
            "bare_img_s": bare_ips, "ratio": stage_ips / bare_ips, "gpu_busy": gpu / wall,
            "padded_fraction": stage.stats["padded_fraction"], "within_budget": budget.ok()}


def part_train(args, device, budget) -> list[dict]:
    from core.device import Precision, autocast
    from model.criterion import GLIPCriterion
    from model.prompts import Prompt, prompt_positive_maps

    rows = []
    h, w, sizes = image_size(args)
    for name in ("glip_t", "glip_l"):
        for ckpt in (False, True):
            if not budget.ok():
                rows += [{"part": "train", "model": name, "checkpointing": ckpt, "skipped": "time budget"}]
                continue
            cfg = model_config(name, args, args.tmp)
            cfg.head.gradient_checkpointing = ckpt
            model = build(cfg, device).train()
            criterion = GLIPCriterion(cfg.loss)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
            for b in (1,) if args.smoke else (1, 2, 4):
                row = {"part": "train", "model": name, "checkpointing": ckpt, "batch": b, "precision": "bf16"}
                if not budget.ok():
                    rows.append({**row, "skipped": "time budget"})
                    continue
                x = torch.randn(b, 3, h, w, device=device)
                enc, maps = prompt_positive_maps(model.tokenizer, [Prompt(CAPTION, [[s] for s in SPANS[:3]], [0, 1, 2])] * b)
                ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
                box = torch.tensor([[10.0, 20.0, 200.0, 300.0], [300.0, 100.0, 700.0, 600.0], [50.0, 50.0, 90.0, 80.0]])
                scale = torch.tensor([sizes[1] / 1333, sizes[0] / 800] * 2)
                targets = [{"boxes": (box * scale).to(device), "positive_map": m.to(device)} for m in maps]

                def step():
                    with autocast(device, Precision.BF16):
                        out = model(x, [sizes] * b, ids, mask)
                    loss = criterion.total(criterion(out, targets, mask))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    s = timed(step, device, iters=1 if args.smoke else 3, warmup=0 if args.smoke else 1)
                except torch.cuda.OutOfMemoryError:
                    rows.append({**row, "skipped": "CUDA out of memory"})
                    continue
                mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
                rows.append({**row, "img_s": b / s, "peak_mem_gib": mem})
            model = opt = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# -------------------------------------------------------------------------------------- main
def table(results: dict) -> str:
    lines = [f"device: {results['device']}; bf16 matmul peak {results['peak']['bf16_tflops']:.1f} TFLOP/s"]
    for row in results["rows"]:
        keys = [k for k in row if k not in ("part",)]
        lines.append(f"{row['part']:8s} " + "  ".join(
            f"{k}={row[k]:.3g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys))
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-dir", type=Path, help="folder with the BERT vocabulary (see --prepare-assets)")
    ap.add_argument("--prepare-assets", type=Path, metavar="DIR", help="write the vocabulary folder and exit")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU, every part, < 1 minute")
    ap.add_argument("--out", type=Path, default=Path("gpu_results.json"))
    ap.add_argument("--budget-s", type=float, default=450.0, help="the whole suite's time budget")
    ap.add_argument("--flops-only", action="store_true", help="count GLIP-T's forward GFLOPs on the CPU and exit")
    args = ap.parse_args(argv)
    if args.prepare_assets:
        prepare_assets(args.prepare_assets)
        return {}
    if args.vocab_dir is None or not (args.vocab_dir / "vocab.txt").is_file():
        ap.error(f"--vocab-dir {args.vocab_dir}: no vocab.txt there; run --prepare-assets DIR first")
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    import tempfile

    if args.flops_only:
        with tempfile.TemporaryDirectory() as tmp:
            args.tmp = Path(tmp)
            flops = counted_flops(args)
        for name, g in flops.items():
            print(f"GLIP-T forward at {'toy size' if args.smoke else '800x1333'}, prompt {name}: {g:.1f} GFLOP/img")
        return {"flops_gflop": flops}

    start = time.perf_counter()
    shares = {"peak": 0.03, "forward": 0.37, "label": 0.2, "train": 0.4}
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = Path(tmp)
        peak = part_peak(args, device, Budget(shares["peak"] * args.budget_s))
        rows = part_forward(args, device, Budget(shares["forward"] * args.budget_s), peak["bf16_tflops"])
        rows.append(part_label(args, device, Budget(shares["label"] * args.budget_s)))
        rows += part_train(args, device, Budget(shares["train"] * args.budget_s))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = {"device": name, "smoke": args.smoke, "torch": torch.__version__, "peak": peak, "rows": rows,
               "wall_s": time.perf_counter() - start}
    args.out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"wall {results['wall_s']:.1f} s; JSON in {args.out}")
    return results


if __name__ == "__main__":
    main()
