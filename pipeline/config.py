"""The run config of ``pipeline run``: every key of the data DAG, read in one place.

YAML files live in ``configs/pipeline/``; any key can be overridden on the command line with a
dotted ``key=value`` (``ray.num_cpus=2``, ``noun_phrases.batch_size=512``). Problems (unknown key,
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
from stages.ingest import IngestConfig
from stages.noun_phrases import NounPhraseConfig
from stages.pseudo_label import PseudoLabelConfig

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


@dataclass
class RayConfig:
    # null: start a local Ray in-process (or join RAY_ADDRESS if that is set); else a cluster address.
    address: str | None = None
    num_cpus: int | None = None             # local Ray only; null = all cores
    # CPU actors running the noun-phrase stage (spaCy loaded once per actor). Fractional CPUs keep
    # read/write tasks schedulable on small machines (see shared/ENV.md: 2 cores deadlock easily).
    noun_phrase_actors: int = 1
    actor_num_cpus: float = 0.5
    task_num_cpus: float = 0.5              # read/ingest and write tasks
    max_shards_in_flight: int = 4           # back-pressure: shards read but not yet committed
    # Teacher actors (pseudo_label stage): each takes teacher_num_gpus GPUs when the cluster has
    # GPUs, else it runs on CPU with actor_num_cpus.
    teacher_actors: int = 1
    teacher_num_gpus: float = 1.0


@dataclass
class RunConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    noun_phrases: NounPhraseConfig = field(default_factory=NounPhraseConfig)
    # The GLIP teacher; null = the DAG stops after noun phrases (ingest -> noun_phrases -> write).
    pseudo_label: PseudoLabelConfig | None = None
    ray: RayConfig = field(default_factory=RayConfig)
    batch_size: int = 256                   # samples per stage call (the unit sent to an actor)
    seed: int = 0
    progress: bool = True                   # progress bars on stderr

    def validate(self) -> None:
        if not self.input.shards:
            raise ValueError("input.shards is empty: give at least one shard path or pattern, "
                             "e.g. input.shards=[data/{00000..00009}.tar]")
        if not self.output.path:
            raise ValueError("output.path is empty: give a local folder or an fsspec URL, "
                             "e.g. output.path=out/run1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.ray.noun_phrase_actors < 1:
            raise ValueError("ray.noun_phrase_actors must be >= 1")
        if self.ray.teacher_actors < 1:
            raise ValueError("ray.teacher_actors must be >= 1")
        if self.ray.max_shards_in_flight < 1:
            raise ValueError("ray.max_shards_in_flight must be >= 1")


def load_run_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """YAML file (optional) + overrides -> a validated RunConfig.

    Relative local paths (in the file or on the command line) are relative to the current
    directory, like any path a shell user types.
    """
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "command line"
    if overrides:
        data = merge_overrides(data, overrides)
        if path is not None:
            source += " (with overrides)"
    return from_dict(RunConfig, data, source=source)


def semantic_hash(cfg: RunConfig) -> str:
    """sha256 of what determines the output bytes (stages and source), not of how it runs.

    Ray sizing, progress bars and paths may change between a crashed run and its resume; the
    stage settings may not (the output would mix two configs).
    """
    payload = {
        "source": cfg.input.source,
        "ingest": to_dict(cfg.ingest),
        "noun_phrases": to_dict(cfg.noun_phrases),
        "pseudo_label": to_dict(cfg.pseudo_label),
        "seed": cfg.seed,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def config_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "configs"
