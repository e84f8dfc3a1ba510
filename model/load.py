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


def load_ours(directory: str | Path, overrides: list[str] | None = None) -> GLIP:
    """A ``save_pretrained`` folder -> a GLIP in eval mode; a prompt-tuned one (its weights
    carry ``prompt_tuning.weight``) gets its ``PromptTuning`` attached before the strict load."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from core import config as typed_config
    from model.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_into
    from model.config import ModelConfig
    from model.prompt_tuning import attach, has_prompt, read_names

    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        return load_pretrained(directory, overrides)          # its error names the missing file
    with safe_open(str(weights), framework="pt") as fh:
        prompted = has_prompt(fh.keys())
    if not prompted:
        return load_pretrained(directory, overrides)
    data = json.loads((directory / CONFIG_NAME).read_text())
    if overrides:
        data = typed_config.merge_overrides(data, overrides)
    net = build_glip(typed_config.from_dict(ModelConfig, data, source=str(directory / CONFIG_NAME)),
                     load_weights=False)
    attach(net).names = read_names(directory)
    load_into(net, load_file(str(weights)), strict=True)
    return net.eval()


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
            net = load_ours(path, overrides)
        else:
            net = build_glip(load_model_config(model, overrides), load_weights=False)
            load_official_into(net, path)
        return net.eval(), sha256_path(path)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
