"""Pre-flight: every input a command's config names is checked before any work starts.

``pipeline run``, ``train``, ``eval``, ``predict`` and ``selftrain`` call one function here each
(``check_run``, ``check_train``, ``check_eval``, ``check_predict``, ``check_selftrain``) before
Ray starts and before any output folder is created. A failure is a ``ConfigError`` whose one-line
message names the key, the file and the fix; the CLI prints it and exits 2.

What is checked:

- checkpoints (``check_checkpoint``): the path exists and is readable; a folder holds
  ``model.safetensors`` (its header parses) and a ``config.json`` that loads as a model config;
  a file is a torch checkpoint that loads with ``weights_only=True`` (memory-mapped: only its
  pickle is read) as a state dict. A file holding Python objects beyond tensors is refused with
  the way to convert a trusted one (``model.checkpoint.untrusted_checkpoint_error``).
- annotation files (``check_annotations``): they exist, and the dataset readers
  (``stages.readers``) parse and validate them whole, so a span past its caption or an unknown
  category id is reported here with the file and field, not by a training worker.
- image roots: they are folders, and a sample of the images the annotations name
  (``IMAGE_SAMPLE`` spread over the file) exists. More than half of them missing means a wrong
  root (e.g. one folder too high; a sub-folder that holds them is suggested). The run itself
  counts every missing image (``trainer.data.sources``) and stops past
  ``data.max_missing_image_fraction``.
- shard lists expand to at least one file; model configs load.

Remote paths (``s3://``...) are checked for existence only; their contents are read by the run.
"""
from __future__ import annotations

import json
import os
from typing import Any

from core.config import ConfigError
from core.storage import ListingError, expand_shards

__all__ = ["IMAGE_SAMPLE", "check_checkpoint", "check_annotations", "check_run", "check_train",
           "check_eval", "check_predict", "check_selftrain"]

IMAGE_SAMPLE = 32          # images checked per annotation file


def _fs(url: str, storage_options: dict | None):
    from fsspec.core import url_to_fs
    return url_to_fs(url, **(storage_options or {}))


def _local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


# ------------------------------------------------------------------------------------ checkpoints
def check_checkpoint(url: str, key: str, fmt: Any = "auto", model: str = "glip_t",
                     overrides: list[str] | None = None, storage_options: dict | None = None) -> None:
    """Raise ConfigError naming ``key`` unless ``url`` is a checkpoint this project loads."""
    from model.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, read_official
    from model.config import CheckpointFormat, load_model_config

    fmt = CheckpointFormat(fmt)
    fix = (f"give {key} a folder written by save_pretrained ({WEIGHTS_NAME} + {CONFIG_NAME}) or an "
           "official GLIP .pth")
    if not url:
        raise ConfigError(f"{key} is empty; {fix}")
    fs, path = _fs(url, storage_options)
    if not fs.exists(path):
        raise ConfigError(f"{key}: {url} does not exist; {fix}")
    is_dir = fs.isdir(path)
    if fmt is CheckpointFormat.AUTO:
        fmt = CheckpointFormat.OURS if is_dir else CheckpointFormat.OFFICIAL
    if fmt is CheckpointFormat.OURS:
        if not is_dir:
            raise ConfigError(f"{key}: {url} is a file, but checkpoint_format=ours is a folder; {fix}")
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            if not fs.isfile(f"{path.rstrip('/')}/{name}"):
                raise ConfigError(f"{key}: {url} has no {name}, so it was not written by save_pretrained; {fix}")
        if _local(url):
            _check_ours(path, key, overrides)
        return
    if is_dir:
        raise ConfigError(f"{key}: {url} is a folder, but checkpoint_format=official is a .pth file; {fix}")
    load_model_config(model, overrides)          # an official checkpoint needs its model config
    if not _local(url):
        return
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise ConfigError(f"{key}: {url} cannot be read ({exc.strerror}); check its permissions") from None
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":
        raise ConfigError(f"{key}: {url} is not a torch checkpoint (neither a zip nor a pickle); {fix}")
    try:
        read_official(path)
    except CheckpointError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    except Exception as exc:                     # noqa: BLE001 - truncated zip, bad pickle, ...
        raise ConfigError(f"{key}: {url} cannot be loaded ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); is it truncated? {fix}") from None


def _check_ours(path: str, key: str, overrides: list[str] | None) -> None:
    from safetensors import safe_open

    from core import config as typed_config
    from model.checkpoint import CONFIG_NAME, WEIGHTS_NAME
    from model.config import ModelConfig

    weights = os.path.join(path, WEIGHTS_NAME)
    try:
        with safe_open(weights, framework="pt") as fh:
            fh.keys()
    except Exception as exc:                     # noqa: BLE001 - safetensors raises its own types
        raise ConfigError(f"{key}: {weights} is not a readable safetensors file ({exc}); write the folder "
                          "again with save_pretrained") from None
    config = os.path.join(path, CONFIG_NAME)
    try:
        data = json.loads(open(config, encoding="utf-8").read())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: {config} is not readable JSON ({exc}); write the folder again with "
                          "save_pretrained") from None
    if overrides:
        data = typed_config.merge_overrides(data, overrides)
    typed_config.from_dict(ModelConfig, data, source=config)


# ------------------------------------------------------------------------------------ annotations
def _reader(kind: str, annotations: str, image_root: str, image_roots: dict | None,
            storage_options: dict | None):
    if kind == "coco":
        from stages.readers.coco import CocoDetectionReader, CocoReaderConfig
        return CocoDetectionReader(CocoReaderConfig(annotations=annotations, image_root=image_root,
                                                    check_image_root=False, storage_options=storage_options or {}))
    from stages.readers.mdetr import MdetrGroundingReader, MdetrReaderConfig
    return MdetrGroundingReader(MdetrReaderConfig(annotations=annotations, image_root=image_root,
                                                  image_roots=dict(image_roots or {}), check_image_root=False,
                                                  storage_options=storage_options or {}))


def check_annotations(kind: str, annotations: str, image_root: str, where: str,
                      image_roots: dict | None = None, storage_options: dict | None = None):
    """Parse and validate ``annotations`` (``kind`` coco | mdetr) and check its image roots on a
    sample; ``where`` is the config prefix of the keys (``data.sources.o365.``). Returns the reader."""
    from stages.readers.common import DatasetFormatError

    fs, path = _fs(annotations, storage_options)
    if not fs.exists(path):
        raise ConfigError(f"{where}annotations: {annotations} does not exist; give the JSON's path or URL "
                          f"with {where}annotations=...")
    roots = [("image_root", image_root)] + [(f"image_roots.{k}", v) for k, v in (image_roots or {}).items()]
    for name, root in roots:
        if root and not _fs(root, storage_options)[0].isdir(_fs(root, storage_options)[1]):
            raise ConfigError(f"{where}{name}: {root} is not an existing folder; give the folder the images' "
                              f"file_name paths are relative to with {where}{name}=...")
    try:
        reader = _reader(kind, annotations, image_root, image_roots, storage_options)
    except DatasetFormatError as exc:
        raise ConfigError(f"{where}annotations: {exc}") from None
    _check_images(reader, where, image_root, storage_options)
    return reader


def _check_images(reader, where: str, image_root: str, storage_options: dict | None) -> None:
    import numpy as np

    n = len(reader)
    if n == 0:
        return
    picks = sorted({int(i) for i in np.linspace(0, n - 1, num=min(n, IMAGE_SAMPLE))})
    missing = []
    for i in picks:
        image = reader[i]
        url = reader.image_url(image)
        fs, path = _fs(url, storage_options)
        if not fs.exists(path):
            missing.append((image, url))
    if len(missing) * 2 <= len(picks):
        return
    image, url = missing[0]
    hint = ""
    if image_root and _local(image_root) and os.path.isdir(image_root):
        for sub in sorted(os.listdir(image_root)):
            if os.path.isfile(os.path.join(image_root, sub, image.file_name)):
                hint = f" (they are under {os.path.join(image_root, sub)}: set {where}image_root to it)"
                break
    raise ConfigError(f"{where}image_root: {len(missing)} of {len(picks)} sampled images of {reader.path} are "
                      f"missing, e.g. {url}{hint}; set {where}image_root to the folder the images' "
                      "file_name paths are relative to")


# ------------------------------------------------------------------------------------ commands
def check_run(cfg) -> None:
    """``pipeline run``: input shards, and the checkpoint and model config of every stage that
    names one (the teacher)."""
    try:
        expand_shards(cfg.input.shards, cfg.input.storage_options, where="input.shards", fix="check input.shards")
    except ListingError as exc:
        raise ConfigError(str(exc)) from None
    for name, stage in cfg.stages.items():
        if getattr(stage, "checkpoint", None) is not None:
            check_checkpoint(stage.checkpoint, f"stages.{name}.checkpoint", getattr(stage, "checkpoint_format", "auto"),
                             getattr(stage, "model", "glip_t"), getattr(stage, "model_overrides", None))


def check_train(cfg, resume: bool) -> dict | None:
    """``pipeline train``: the config, the model config, every source's files (annotations parsed,
    images sampled, shards listed), the init checkpoint, and the output against ``--resume``.
    Returns the newest checkpoint's pointer (or None)."""
    from model.config import load_model_config
    from trainer.config import InitKind, check_resumable
    from trainer.data.config import SourceKind
    from trainer.data.sources import expand_shards as expand_source_shards
    from trainer.state import CheckpointStore

    try:
        cfg.validate()
        load_model_config(cfg.model, cfg.model_overrides)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.init is InitKind.CHECKPOINT:
        check_checkpoint(cfg.init_checkpoint, "init_checkpoint", cfg.init_checkpoint_format, cfg.model,
                         cfg.model_overrides, cfg.storage_options)
    for name, src in cfg.data.sources.items():
        where = f"data.sources.{name}."
        if src.kind is SourceKind.PSEUDO:
            try:
                expand_source_shards(src.shards, src.storage_options, where=f"{where}shards")
            except FileNotFoundError as exc:
                raise ConfigError(str(exc)) from None
            continue
        check_annotations(src.kind.value, src.annotations, src.image_root, where, src.image_roots,
                          src.storage_options)
    store = CheckpointStore(cfg.output, cfg.storage_options, keep=cfg.keep_checkpoints)
    found = store.checkpoints()
    if found and not resume:
        raise ConfigError(f"{cfg.output} already holds checkpoints (newest: {found[-1][1]}); pass --resume to "
                          "continue that run, or choose a new output")
    pointer = store.pointer() if found else None
    if pointer is not None:
        try:
            check_resumable(pointer.get("resume_config", {}), pointer.get("world_size"), cfg, cfg.ray.num_workers)
        except ValueError as exc:
            raise ConfigError(f"{cfg.output}: {exc}") from None
    return pointer


def check_eval(cfg) -> None:
    """``pipeline eval``: the checkpoint, the ground truth (parsed, images sampled) and, for
    grounding, that the file has evaluation phrases (``tokens_positive_eval``)."""
    try:
        cfg.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    check_checkpoint(cfg.checkpoint, "checkpoint", cfg.checkpoint_format, cfg.model, cfg.model_overrides,
                     cfg.storage_options)
    grounding = cfg.kind.value == "grounding"
    reader = check_annotations("mdetr" if grounding else "coco", cfg.annotations, cfg.image_root, "",
                               storage_options=cfg.storage_options)
    if grounding and not any("tokens_positive_eval" in reader[i].meta for i in range(len(reader))):
        raise ConfigError(f"annotations: {cfg.annotations} has no images[*].tokens_positive_eval, the "
                          "phrases a grounding evaluation scores (it looks like a training file such as "
                          "GoldG); evaluate on a file that has them, e.g. MDETR's "
                          "final_flickr_separateGT_val.json, or use kind=detection on a COCO-format file")


def check_predict(image: str, checkpoint: str, model: str, overrides: list[str] | None) -> None:
    """``pipeline predict``: the image decodes, the checkpoint loads."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(image):
        raise ConfigError(f"image: {image} does not exist; give an image file (jpg, png, webp)")
    try:
        with Image.open(image) as im:
            im.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise ConfigError(f"image: {image} is not a readable image ({exc}); give a jpg, png or webp file") from None
    check_checkpoint(checkpoint, "--checkpoint", "auto", model, overrides)


def check_selftrain(cfg) -> None:
    """``pipeline selftrain``: the world and trainer configs it names load (the loop makes its
    data itself; each step's own checks run as it starts)."""
    from core.config import load, read_yaml
    from synth.config import WorldConfig

    load(WorldConfig, cfg.world, list(cfg.world_overrides))
    read_yaml(cfg.train)
