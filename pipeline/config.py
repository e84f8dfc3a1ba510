"""The run config of ``pipeline run``: every key of the data DAG, read in one place.

YAML files live in ``configs/pipeline/``; any key can be overridden on the command line with a
dotted ``key=value`` (``ray.num_cpus=2``, ``stages.noun_phrases.batch_size=512``). Problems (unknown key,
wrong type, missing file) raise :class:`ConfigError` before any work starts.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import ConfigError, from_dict, merge_overrides, read_yaml, to_dict
from stages.registry import DEFAULT_STAGES, stage_spec

__all__ = ["ConfigError", "RunConfig", "load_run_config", "semantic_hash"]


@dataclass
class InputConfig:
    # Shard locations: globs ("data/*.tar"), brace patterns ("data/{00000..00099}.tar"), local
    # paths or any fsspec URL (s3://bucket/cc3m/{00000..00099}.tar).
    shards: list[str] = field(default_factory=list)
    source: str = "web"                     # written into every record's "source"
    storage_options: dict[str, Any] = field(default_factory=dict)   # fsspec options (endpoint, keys)


@dataclass
class OutputConfig:
    path: str = ""
    storage_options: dict[str, Any] = field(default_factory=dict)
    # The shards' commit records are compacted into the manifest (a new _manifest.NNNNNN.json
    # segment, then the _manifest.json head) this often, after this many new records, and at the
    # end; never per shard. 0 = after every commit (tests)
    compact_every_s: float = 300.0
    compact_every_shards: int = 10_000


@dataclass
class RayConfig:
    # null: start a local Ray in-process (or join RAY_ADDRESS if that is set); else a cluster address.
    address: str | None = None
    num_cpus: int | None = None             # local Ray only; null = all cores
    # The read and write tasks of a shard (stages with resources.actors 0 run in the read task).
    # Fractional CPUs keep them schedulable next to the stage actors on small machines.
    task_num_cpus: float = 0.5
    max_shards_in_flight: int = 4           # back-pressure: shards read but not yet committed
    # A shard whose task, actor or objects were lost (a node died) is resubmitted whole this
    # many times before it is reported failed (and left for the next run).
    shard_retries: int = 2


def _default_stages() -> dict[str, Any]:
    return {name: stage_spec(name).config_class() for name in DEFAULT_STAGES}


@dataclass
class RunConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # The DAG, in order: stage name (stages/registry.py) -> its typed config, which carries its
    # ``resources``. A null entry leaves that stage out (``stages.pseudo_label=null``).
    stages: dict[str, Any] = field(default_factory=_default_stages)
    ray: RayConfig = field(default_factory=RayConfig)
    batch_size: int = 256                   # samples per stage call (the unit sent to an actor)
    seed: int = 0
    progress: bool = True                   # progress bars on stderr

    def __post_init__(self) -> None:
        self.stages = _typed_stages(self.stages, source=None)

    def validate(self) -> None:
        if not self.input.shards:
            raise ValueError("input.shards is empty: give at least one shard path or pattern, "
                             "e.g. input.shards=[data/{00000..00009}.tar]")
        if not self.output.path:
            raise ValueError("output.path is empty: give a local folder or an fsspec URL, "
                             "e.g. output.path=out/run1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.ray.max_shards_in_flight < 1:
            raise ValueError("ray.max_shards_in_flight must be >= 1")
        if self.ray.shard_retries < 0 or self.output.compact_every_s < 0 or self.output.compact_every_shards < 0:
            raise ValueError("ray.shard_retries, output.compact_every_s and output.compact_every_shards must be >= 0")


def _typed_stages(raw: Any, source: str | None) -> dict[str, Any]:
    """``stages:`` as read (name -> mapping or null) -> name -> typed config, order kept."""
    where = f" in {source}" if source else ""
    if not isinstance(raw, dict):
        raise ConfigError(f"stages{where}: expected a mapping of stage name -> settings, in DAG "
                          f"order (e.g. stages: {{ingest: {{}}, noun_phrases: {{}}}}), got {raw!r}")
    typed: dict[str, Any] = {}
    for name, value in raw.items():
        if value is None:
            continue
        try:
            spec = stage_spec(str(name))
        except ValueError as exc:
            raise ConfigError(f"stages.{name}{where}: {exc}") from None
        if isinstance(value, spec.config_class):
            typed[name] = value
        else:
            typed[name] = from_dict(spec.config_class, value, source=source, prefix=f"stages.{name}.")
    return typed


# Keys of the earlier layout -> where they live now (a clear error instead of "unknown key").
_MOVED = {
    "ingest": "stages.ingest", "noun_phrases": "stages.noun_phrases", "pseudo_label": "stages.pseudo_label",
    "ray.noun_phrase_actors": "stages.noun_phrases.resources.actors",
    "ray.teacher_actors": "stages.pseudo_label.resources.actors",
    "ray.teacher_num_gpus": "stages.pseudo_label.resources.num_gpus",
    "ray.actor_num_cpus": "stages.<stage>.resources.num_cpus",
}


def _check_moved(data: dict, source: str) -> None:
    for old, new in _MOVED.items():
        head, _, tail = old.partition(".")
        node = data.get(head)
        if (tail and isinstance(node, dict) and tail in node) or (not tail and head in data):
            raise ConfigError(f"{old} in {source}: stage settings moved under stages:, in DAG order; "
                              f"write {new}{'.…' if not tail else ''} instead")


def load_run_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """YAML file (optional) + overrides -> a validated RunConfig.

    A file without ``stages:`` runs the default DAG (ingest, noun_phrases); an override such as
    ``stages.pseudo_label.checkpoint=...`` adds the teacher after them. Relative local paths (in
    the file or on the command line) are relative to the current directory, like any path a
    shell user types.
    """
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "command line"
    if "stages" not in data:
        data["stages"] = {name: {} for name in DEFAULT_STAGES}
    if overrides:
        data = merge_overrides(data, overrides)
        if path is not None:
            source += " (with overrides)"
    _check_moved(data, source)
    data["stages"] = _typed_stages(data["stages"], source)
    return from_dict(RunConfig, data, source=source)


def semantic_hash(cfg: RunConfig, by_content: bool = True) -> str:
    """sha256 of what determines the output bytes (the stages in order, their settings, the
    source and seed), not of how it runs.

    Ray sizing, each stage's ``resources`` (and any field its config class names in
    ``runtime_fields``), progress bars and paths may change between a crashed run and its
    resume; the stage settings may not (the output would mix two configs). A field the config
    class names in ``content_fields`` (a checkpoint) counts by the sha256 of the local file or
    folder it names, so moving it changes nothing; a URL or a missing path counts as written.
    ``by_content=False``: every field as written (the hash of outputs begun before content
    fields existed; ``pipeline.resume`` still accepts it).
    """
    stages = []
    for name, stage_cfg in cfg.stages.items():
        skip = {"resources", *getattr(type(stage_cfg), "runtime_fields", ())}
        fields = {k: v for k, v in to_dict(stage_cfg).items() if k not in skip}
        for key in getattr(type(stage_cfg), "content_fields", ()) if by_content else ():
            if isinstance(fields.get(key), str) and fields[key] and os.path.exists(fields[key]):
                fields[key] = "sha256:" + _content_sha256(os.path.abspath(fields[key]))
        stages.append([name, fields])
    payload = {"source": cfg.input.source, "stages": stages, "seed": cfg.seed}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _content_sha256(path: str) -> str:
    """sha256 of a local file or folder's bytes, computed once per (path, size, mtime)."""
    files = sorted(Path(path).rglob("*")) if os.path.isdir(path) else [Path(path)]
    key = (path, *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()))
    if key not in _CONTENT_HASHES:
        from model.load import sha256_path
        _CONTENT_HASHES[key] = sha256_path(path)
    return _CONTENT_HASHES[key]


_CONTENT_HASHES: dict[tuple, str] = {}


def config_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "configs"
