"""Benchmark: a training step fed by the real streaming mixture vs the same batches held in memory.

    .venv/bin/python benchmarks/trainer.py [--steps 12] [--batch 4]

Both loops run the same `tiny` model, optimizer and `train_step` on the same batches (the
in-memory loop replays the batches the streaming loop produced, in the same order), from the
same initial weights. The ratio streaming / in-memory step time says what reading, decoding,
prompt sampling and collation cost on the critical path (goal <= 1.1). The data is
synth/training.py's three-source mixture (COCO detection, MDETR grounding, pseudo shards).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()

    from model.criterion import GLIPCriterion
    from pipeline.train import load_train_job
    from synth.training import write_training_mixture
    from trainer.loop import build_model
    from trainer.solver import make_optimizer, param_groups
    from trainer.step import train_step
    from trainer.data.sources import TrainStream

    with tempfile.TemporaryDirectory() as tmp:
        write_training_mixture(Path(tmp) / "data", n_coco=32, n_mdetr=32, n_pseudo=32)
        cfg = load_train_job("configs/train/tiny_mixture.yaml", [
            f"output={tmp}/run", f"batch_size={args.batch}", "ema_decay=0",
            f"data.sources.o365.annotations={tmp}/data/coco/instances.json",
            f"data.sources.o365.image_root={tmp}/data/coco/images",
            f"data.sources.goldg.annotations={tmp}/data/mdetr/final_mixed_train.json",
            f"data.sources.goldg.image_root={tmp}/data/mdetr/images",
            f"data.sources.cc.shards=[{tmp}/data/pseudo/*.tar]"])
        torch.manual_seed(0)
        model = build_model(cfg)
        initial = copy.deepcopy(model.state_dict())
        device = torch.device("cpu")
        criterion = GLIPCriterion(model.cfg.loss)

        def fresh():
            model.load_state_dict(initial)
            model.train()
            return make_optimizer(param_groups(model, cfg))

        stream = TrainStream(cfg.data, model.cfg, model.tokenizer, args.batch, seed=cfg.seed)
        stream.next_batch()                                     # warm-up: open files, caches
        optimizer = fresh()
        batches, streaming = [], []
        for step in range(args.steps):
            t = time.perf_counter()
            batch = stream.next_batch()
            train_step(model, criterion, optimizer, batch, step=step, cfg=cfg, device=device)
            streaming.append(time.perf_counter() - t)
            batches.append(batch)
        optimizer = fresh()
        in_memory = []
        for step, batch in enumerate(batches):
            t = time.perf_counter()
            train_step(model, criterion, optimizer, batch, step=step, cfg=cfg, device=device)
            in_memory.append(time.perf_counter() - t)

    s, m = statistics.median(streaming[1:]), statistics.median(in_memory[1:])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; tiny, batch {args.batch}, {args.steps} steps (first excluded)")
    print(f"streaming mixture   {s:6.2f} s/step  ({args.batch / s:5.2f} img/s)")
    print(f"batches in memory   {m:6.2f} s/step  ({args.batch / m:5.2f} img/s)")
    print(f"ratio               {s / m:6.3f}   (goal <= 1.1)")


if __name__ == "__main__":
    main()
