"""One way to get a GLIP from a checkpoint of either format (ours or official), used by the
teacher stage, evaluation and prediction alike."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from model.checkpoint import load_official_into, load_pretrained
from model.config import CheckpointFormat, load_model_config
from model.glip import GLIP, build_glip


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (names and bytes, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _localise(url: str) -> tuple[Path, str | None]:
    """A local path for ``url``; fsspec URLs are copied to a temporary folder (returned too)."""
    from core.storage import localise

    try:
        path, tmp = localise(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {url} does not exist") from None
    return Path(path), tmp


def load_glip(checkpoint: str, fmt: CheckpointFormat = CheckpointFormat.AUTO, model: str = "glip_t",
              overrides: list[str] | None = None) -> tuple[GLIP, str]:
    """(model in eval mode, checkpoint sha256). ``model`` names the config of an official
    checkpoint (glip_t / glip_l / a YAML path); ours carry their own config.json."""
    path, tmp = _localise(checkpoint)
    try:
        fmt = CheckpointFormat(fmt)
        if fmt is CheckpointFormat.AUTO:
            fmt = CheckpointFormat.OURS if path.is_dir() else CheckpointFormat.OFFICIAL
        if fmt is CheckpointFormat.OURS:
            net = load_pretrained(path, overrides)
        else:
            net = build_glip(load_model_config(model, overrides), load_weights=False)
            load_official_into(net, path)
        return net.eval(), sha256_path(path)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
