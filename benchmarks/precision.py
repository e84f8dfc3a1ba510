"""Benchmark: which precision policy keeps the teacher's labels (bf16 autocast vs fp32, on CPU).

    .venv/bin/python benchmarks/precision.py [--shards 2] [--per-shard 16] [--model tiny]

The teacher is `tiny` with a seeded random head at temperature -2.5 (its scores spread from 0.1
to 0.3 instead of sitting at the prior), or `glip_t` with random weights (slow on CPU). Each
policy (``stages/teacher_precision.py``) labels the same generated web shards with bf16 autocast;
the agreement with the fp32 labels is the share of fp32 boxes (score >= min_score) matched by a
box of the same phrase with IoU >= 0.9 and |score difference| <= 0.02. It also prints, per FPN
level, the largest change of the dot-product logits relative to their fp32 range.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SIZES = ["input.min_size_test=128", "input.max_size_test=192"]


def logit_drift(model, seed=0) -> list[float]:
    """max |bf16 - fp32| / (max - min of fp32) per level for one random batch; ``model`` has its
    policy applied (the wrappers are a no-op without autocast)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 128, 192, generator=g)
    enc = model.tokenizer(["a red ball on a white table", "two dogs in a park"], padding="longest",
                          return_tensors="pt")
    with torch.inference_mode():
        ref = model(x, [(128, 192)] * 2, enc["input_ids"], enc["attention_mask"])["token_logits"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, [(128, 192)] * 2, enc["input_ids"], enc["attention_mask"])["token_logits"]
    return [float((a.float() - b).abs().max() / (b.max() - b.min())) for a, b in zip(low, ref)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--per-shard", type=int, default=16)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--min-score", type=float, default=0.1)
    ap.add_argument("--policies", nargs="+", default=None, help="default: every PrecisionPolicy")
    args = ap.parse_args()

    from core.device import Precision
    from model.checkpoint import save_pretrained
    from model.config import load_model_config
    from model.glip import build_glip
    from stages.ingest import Ingest
    from stages.label_agreement import compare_labels
    from stages.noun_phrases import NounPhrases
    from stages.pseudo_label import PseudoLabel, PseudoLabelConfig
    from stages.shards import read_shard
    from stages.teacher_precision import PrecisionPolicy
    from synth.web import write_web_shards

    overrides = ["head.log_scale=-2.5"] if args.model == "tiny" else []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = build_glip(load_model_config(args.model, overrides), load_weights=args.model == "tiny").eval()
        teacher = save_pretrained(model, tmp / "teacher")
        write_web_shards(tmp / "in", n_shards=args.shards, samples_per_shard=args.per_shard, seed=0, bad_samples=False)
        nlp = NounPhrases()
        nlp.setup()

        def samples():
            out = []
            for path in sorted((tmp / "in").glob("*.tar")):
                with open(path, "rb") as fh:
                    shard = read_shard(fh, path.stem, source="bench")
                Ingest()(shard.samples)
                nlp(shard.samples)
                out += shard.samples
            return out

        stage = PseudoLabel(PseudoLabelConfig(checkpoint=str(teacher), model=args.model, min_score=args.min_score,
                                              model_overrides=["inference.score_threshold=0.0", *SIZES],
                                              batch_size=4, precision=Precision.FP32))
        stage.setup()
        t = time.perf_counter()
        ref = stage(samples())
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; {args.model}, "
              f"{sum(s.kept for s in ref)} labelled images, min_score {args.min_score}; fp32 run {time.perf_counter() - t:.1f} s")
        print(f"{'policy':16s} {'agreement':>9s} {'boxes':>6s} {'drops≠':>6s}  logit drift per level (max / fp32 range)")
        for policy in [PrecisionPolicy(p) for p in args.policies] if args.policies else PrecisionPolicy:
            run = PseudoLabel(dataclasses.replace(stage.config, precision=Precision.BF16, precision_policy=policy))
            run.setup()
            a = compare_labels(ref, run(samples()))
            drift = logit_drift(run.model)
            print(f"{policy.value:16s} {a.fraction:9.4f} {a.boxes:6d} {len(a.drop_mismatches):6d}  "
                  + " ".join(f"P{3 + i}:{d:.4f}" for i, d in enumerate(drift)))


if __name__ == "__main__":
    main()
