"""What the parts of ``benchmarks/gpu.py`` share: the prompt, the asset folder, the time budget,
timing with device syncs, building models at benchmark sizes and the in-memory JPEGs.

Like ``gpu.py``, it imports only what the GPU machine has (torch, transformers, timm, numpy,
pillow) at module level.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

CAPTION = "a man in a red jacket riding a brown horse along the beach at sunset with two dogs"
SPANS = [(0, 5), (9, 21), (29, 42), (49, 58), (69, 77)]
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def prepare_assets(folder: Path) -> None:
    """Copy the bert-base-uncased WordPiece files the project uses offline into ``folder``."""
    from model.language import packaged_minilm_path

    src = packaged_minilm_path()
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(src / name, folder / name)
    print(f"wrote {', '.join(TOKENIZER_FILES)} to {folder}")


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def ok(self) -> bool:
        return time.perf_counter() < self.end


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, iters: int, warmup: int = 1) -> float:
    """Seconds per call (CUDA events on a GPU, wall time on a CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / iters
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


# ------------------------------------------------------------------------------------ models
def model_config(name: str, args, tmp: Path):
    """The official config (or, with --smoke, a toy of the same architecture) with the local vocab."""
    from model.config import load_model_config

    overrides = [f"language.tokenizer={args.vocab_dir}"]
    if args.smoke:
        from transformers import BertConfig, BertModel

        bert = tmp / "toy_bert"
        if not bert.is_dir():
            BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
                      add_pooling_layer=False).save_pretrained(bert)
        overrides += [f"language.model={bert}", "backbone.swin.embed_dim=16", "backbone.swin.depths=[1,1,1,1]",
                      "backbone.swin.num_heads=[1,1,1,1]", "fpn.out_channels=32", "head.channels=32",
                      "head.token_dim=32", "head.num_blocks=1", "head.fusion_embed_dim=32", "head.fusion_heads=2",
                      "head.group_norm_groups=8", "input.min_size_test=64", "input.max_size_test=96"]
    return load_model_config(name, overrides)


def build(cfg, device):
    from model.glip import build_glip

    torch.manual_seed(0)
    return build_glip(cfg, load_weights=False).to(device).eval()


def prompts(model, batch: int, pad_to_max: bool, device):
    enc = model.tokenizer([CAPTION] * batch, padding="max_length" if pad_to_max else "longest", max_length=256,
                          truncation=True, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def image_size(args) -> tuple[int, int, tuple[int, int]]:
    return (64, 96, (64, 96)) if args.smoke else (800, 1344, (800, 1333))


def jpeg_samples(n: int, size: tuple[int, int]):
    import io

    import numpy as np
    from PIL import Image

    from stages.schema import Phrase, Sample

    rng = np.random.default_rng(0)
    images = []
    for i in range(8):
        arr = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).resize(size, Image.BILINEAR).save(buf, "JPEG", quality=90)
        images.append(buf.getvalue())
    out = []
    for i in range(n):
        s = Sample(key=f"{i:06d}", input_shard="0", image=images[i % 8], caption=CAPTION)
        s.width, s.height = size
        s.phrases = [Phrase(CAPTION[b:e], (b, e)) for b, e in SPANS]
        out.append(s)
    return out
