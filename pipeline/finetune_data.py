"""The data of ``pipeline finetune``: the label map checked at the door, few-shot sampling.

The categories' names become the prompt (``"a. b. c"``), so a label-map mistake silently
teaches the wrong words or nothing at all. ``prepare`` reads the training and validation COCO
files before any model is built and refuses, naming the file, the field and the fix:

- a category whose name tokenises to nothing (``""``, ``"_"``, ``"(unused)"``: the official
  ``clean_name`` drops ``(...)`` and ``_``): it could never be grounded;
- two categories with one name (after ``clean_name``, case-insensitive): the model could not tell
  them apart;
- an annotation whose ``category_id`` is not a category;
- a validation file whose categories (id and name) are not the training file's.

Ids that are not ``1..K`` (COCO's own 1..90 for 80 classes, a 0-based export) are remapped to
``1..K`` in the order of the original ids, with a printed note (the official code remaps to
contiguous ids too, and its few-shot sampler indexes ``id - 1``); ``OUTPUT/data/label_map.json``
keeps the mapping. ``shots=N`` keeps N images per category with the official few-shot protocol:
the images (sorted by id) are shuffled with ``random.Random(seed)`` and an image is kept when one
of its categories still has fewer than N kept images (all its categories are then counted), so
the same seed picks the same images on every run and machine.

The prepared files are ``OUTPUT/data/train.json`` and ``OUTPUT/data/val.json`` (image roots
unchanged); the trainer and the evaluations read those.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import ConfigError
from model.prompts import clean_name

__all__ = ["PreparedData", "check_categories", "few_shot", "prepare"]


@dataclass
class PreparedData:
    train: str                                   # the prepared training JSON
    val: str                                     # the prepared validation JSON
    names: list[str]                             # category names in id order (the prompt's order)
    id_map: dict[Any, int] = field(default_factory=dict)   # original id -> 1..K (identity when none needed)
    notes: list[str] = field(default_factory=list)
    train_images: int = 0
    val_images: int = 0


def _fail(path: str, key: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{path}: {key}: {problem}. Fix: {fix}")


def _read(path: str, which: str) -> dict:
    from stages.readers.common import load_json

    try:
        data = load_json(path)
    except FileNotFoundError:
        raise ConfigError(f"data.{which}.annotations: {path} does not exist; give the COCO JSON with "
                          f"data.{which}.annotations=...") from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise _fail(path, "(file)", "not a COCO detection file (lists 'images', 'annotations', 'categories')",
                    "give the instances JSON of the split")
    return data


def check_categories(path: str, data: dict, tokenizer) -> list[tuple[Any, str]]:
    """The file's ``(id, name)`` pairs in id order, after the checks of the module doc."""
    cats, seen_ids, seen_names = [], set(), {}
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or not isinstance(cat.get("name"), str):
            raise _fail(path, f"categories[{i}]", f"expected {{'id': ..., 'name': '...'}}, got {cat!r:.80}",
                        "give every category an id and a name")
        cid, name = cat["id"], cat["name"]
        if cid in seen_ids:
            raise _fail(path, f"categories[{i}].id", f"id {cid!r} is used twice", "give each category its own id")
        seen_ids.add(cid)
        cleaned = clean_name(name).strip()
        if not cleaned or not tokenizer.tokenize(cleaned):
            raise _fail(path, f"categories[{i}].name", f"{name!r} (id {cid!r}) gives no token once cleaned "
                        f"({cleaned!r}); the names are the prompt, so this class could never be detected",
                        "give it a name in words, e.g. 'traffic cone'")
        key = cleaned.lower()
        if key in seen_names:
            first_id, first_name = seen_names[key]
            raise _fail(path, f"categories[{i}].name", f"{name!r} (id {cid!r}) repeats {first_name!r} (id "
                        f"{first_id!r}); one name for two classes makes them indistinguishable in the prompt",
                        "rename one of them (e.g. 'dog (small)' is cleaned to 'dog': use 'small dog') or "
                        "merge the two classes")
        seen_names[key] = (cid, name)
        cats.append((cid, name))
    if not cats:
        raise _fail(path, "categories", "empty", "list the classes to detect")
    for k, ann in enumerate(data.get("annotations") or []):
        if ann.get("category_id") not in seen_ids:
            raise _fail(path, f"annotations[{k}].category_id", f"{ann.get('category_id')!r} is not an id of "
                        "categories", "add the category or fix the annotation's id")
    return sorted(cats, key=lambda c: (str(type(c[0])), c[0]))


def _compare(train_path: str, train: list, val_path: str, val: list) -> None:
    if train == val:
        return
    t, v = dict(train), dict(val)
    problems = [f"id {c!r}: {t[c]!r} in train, {v[c]!r} in val" for c in t if c in v and t[c] != v[c]]
    problems += [f"id {c!r} ({t[c]!r}) only in train" for c in t if c not in v]
    problems += [f"id {c!r} ({v[c]!r}) only in val" for c in v if c not in t]
    raise ConfigError(f"{val_path}: categories: the validation categories differ from the training file "
                      f"{train_path}'s ({'; '.join(problems[:5])}{'; ...' if len(problems) > 5 else ''}). "
                      "Fix: export both splits with the same category list (same ids, same names)")


def few_shot(data: dict, shots: int, seed: int) -> tuple[dict, dict[Any, int]]:
    """The official few-shot subset of a COCO dict -> (subset, images kept per category id)."""
    per_image: dict[Any, set] = {}
    for ann in data.get("annotations") or []:
        per_image.setdefault(ann["image_id"], set()).add(ann["category_id"])
    ids = sorted(per_image, key=lambda i: (str(type(i)), i))
    random.Random(seed).shuffle(ids)
    need = {c["id"]: shots for c in data["categories"]}
    kept = []
    for image_id in ids:
        cats = per_image[image_id]
        if any(need[c] > 0 for c in cats):
            kept.append(image_id)
            for c in cats:
                need[c] -= 1
    keep = set(kept)
    counts = {c: shots - n for c, n in need.items()}
    subset = dict(data, images=[im for im in data["images"] if im["id"] in keep],
                  annotations=[a for a in data.get("annotations") or [] if a["image_id"] in keep])
    return subset, counts


def _remapped(data: dict, id_map: dict) -> dict:
    return dict(data, categories=sorted(({**c, "id": id_map[c["id"]]} for c in data["categories"]),
                                        key=lambda c: c["id"]),
                annotations=[{**a, "category_id": id_map[a["category_id"]]} for a in data.get("annotations") or []])


def prepare(train_path: str, val_path: str, out_dir: str | Path, tokenizer, shots: int = 0, seed: int = 0
            ) -> PreparedData:
    """Check both files, remap ids, sample shots; write OUTPUT/data/{train,val,label_map}.json."""
    train, val = _read(train_path, "train"), _read(val_path, "val")
    train_cats = check_categories(train_path, train, tokenizer)
    _compare(train_path, train_cats, val_path, check_categories(val_path, val, tokenizer))
    notes = []
    ids = [c for c, _ in train_cats]
    id_map = {c: i + 1 for i, c in enumerate(ids)}
    if ids != list(range(1, len(ids) + 1)):
        shown = ", ".join(f"{c!r}->{n}" for c, n in list(id_map.items())[:6]) + (", ..." if len(ids) > 6 else "")
        notes.append(f"note: {train_path}: category ids are not 1..{len(ids)}; remapped in id order ({shown}); "
                     f"predictions of the prepared files use the new ids (mapping in data/label_map.json)")
    train, val = _remapped(train, id_map), _remapped(val, id_map)     # also: categories in id order
    if shots:
        train, counts = few_shot(train, shots, seed)
        short = {train_cats[c - 1][1]: n for c, n in counts.items() if n < shots}
        notes.append(f"note: shots={shots}: {len(train['images'])} training images kept (seed {seed})"
                     + (f"; fewer than {shots} exist for {short}" if short else ""))
    if not train.get("annotations"):
        raise _fail(train_path, "annotations", "no box to train on", "give a training split with annotations")
    out = Path(out_dir) / "data"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, payload in (("train", train), ("val", val)):
        paths[name] = out / f"{name}.json"
        _write(paths[name], payload)
    _write(out / "label_map.json", {"train": train_path, "val": val_path, "shots": shots, "seed": seed,
                                    "categories": [{"id": id_map[c], "original_id": c, "name": n}
                                                   for c, n in train_cats],
                                    "train_image_ids": sorted(im["id"] for im in train["images"])})
    return PreparedData(train=str(paths["train"]), val=str(paths["val"]), names=[n for _, n in train_cats],
                        id_map=id_map, notes=notes, train_images=len(train["images"]),
                        val_images=len(val["images"]))


def _write(path: Path, payload: Any) -> None:
    from core.storage import Folder

    Folder(str(path.parent)).write_bytes(path.name, json.dumps(payload).encode())
