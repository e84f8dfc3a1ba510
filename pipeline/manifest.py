"""The output's bookkeeping: each shard's commit record, and ``_manifest.json``, their compaction.

A shard is committed when its ``NAME_stats.json`` exists: the write task writes it last (after
``NAME.tar`` and ``NAME.parquet``, each atomically), and it names those files with their sha256
and the input they came from. That record is written once per shard, by the task, and never
rewritten, so a commit costs the same whether the run has 10 shards or 100,000.

``_manifest.json`` is a compaction of the records: the run's config and config hash, its inputs,
every compacted shard's record and the merged statistics of those shards. The driver writes it
when a run starts (so the config hash is there before any shard), every ``output.compact_every_s``
seconds and at the end, never per shard. A run killed between a record and the next compaction
loses nothing: on resume the records that are newer than the manifest are found by listing the
output once and read (in parallel), and only those.
"""
from __future__ import annotations

import datetime as _dt
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable

from pipeline.storage import OutputDir, StorageError

MANIFEST = "_manifest.json"
VERSION = 2
STATS_SUFFIX = "_stats.json"
_READ_THREADS = 16


def stats_name(shard: str) -> str:
    return shard + STATS_SUFFIX


@dataclass
class ShardRecord:
    name: str
    input: str
    read: int
    kept: int
    dropped: int
    files: dict[str, str]          # file name -> sha256 ("" for the record itself)
    read_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"input": self.input, "read": self.read, "kept": self.kept, "dropped": self.dropped,
               "files": self.files}
        if self.read_error:
            out["read_error"] = self.read_error
        return out

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> "ShardRecord":
        """The record a shard's stats file holds (``pipeline.runner.write_shard`` writes it)."""
        name = stats["shard"]
        return cls(name=name, input=stats.get("input", ""), read=stats["read"], kept=stats["kept"],
                   dropped=stats["dropped"], files={**stats.get("files", {}), stats_name(name): ""},
                   read_error=stats.get("read_error"))


class RunningStats:
    """``stages.write.merge_stats`` over every committed shard, folded every ``chunk`` shards so
    that the driver holds one merged summary, not one per shard (hist-based summaries merge
    exactly; float sums are rounded to 6 decimals at each fold)."""

    def __init__(self, state: dict[str, Any] | None = None, chunk: int = 256) -> None:
        state = state or {}
        self.part: dict[str, Any] | None = state.get("part")
        self.shards: int = int(state.get("shards", 0))
        self.labelers: list[Any] = list(state.get("labelers", []))
        self.read_errors: dict[str, str] = dict(state.get("read_errors", {}))
        self.buffer: list[dict[str, Any]] = []
        self.chunk = chunk

    def add(self, stats: dict[str, Any]) -> None:
        self.buffer.append(stats)
        self.shards += 1
        if stats.get("labeler") is not None and stats["labeler"] not in self.labelers:
            self.labelers.append(stats["labeler"])
        if stats.get("read_error"):
            self.read_errors[stats["shard"]] = stats["read_error"]
        if len(self.buffer) >= self.chunk:
            self._fold()

    def _fold(self) -> None:
        from stages.write import merge_stats

        if not self.buffer:
            return
        merged = merge_stats(([self.part] if self.part else []) + self.buffer)
        self.part = {k: v for k, v in merged.items() if k not in ("shards", "labelers", "read_errors")}
        self.part.update(shard="(merged)", labeler=None, read_error=None)
        self.buffer = []

    def result(self) -> dict[str, Any]:
        """The run's ``stats.json``."""
        from stages.write import merge_stats

        merged = merge_stats(([self.part] if self.part else []) + self.buffer)
        merged.update(shards=self.shards, labelers=self.labelers, read_errors=self.read_errors,
                      labeler=self.labelers[0] if len(self.labelers) == 1 else None)
        return merged

    def state(self) -> dict[str, Any]:
        self._fold()
        return {"part": self.part, "shards": self.shards, "labelers": self.labelers,
                "read_errors": self.read_errors}


@dataclass
class Manifest:
    config_sha256: str
    config: dict[str, Any]
    inputs: list[str]
    # name -> the record as compact JSON (what the manifest holds; a string is ~4x smaller
    # than the dict it came from, and compaction only joins them)
    shards: dict[str, str] = field(default_factory=dict)
    stats: RunningStats = field(default_factory=RunningStats)
    extra: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=lambda: {"read": 0, "kept": 0, "dropped": 0})

    @classmethod
    def load(cls, out: OutputDir) -> "Manifest | None":
        data = out.read_json(MANIFEST, fix="delete the output folder (or choose a new output.path) and rerun")
        if data is None:
            return None
        if data.get("version") != VERSION:
            raise StorageError(f"{out.url}/{MANIFEST} is version {data.get('version')} of the manifest; "
                               f"this version of the pipeline resumes version {VERSION} only: choose a "
                               "new output.path (or delete the old output) and rerun")
        manifest = cls(config_sha256=data.get("config_sha256", ""), config=data.get("config", {}),
                       inputs=list(data.get("inputs", [])), stats=RunningStats(data.get("stats")),
                       extra=dict(data.get("extra", {})))
        for name, record in data.get("shards", {}).items():
            manifest._put(name, record)
        return manifest

    def _put(self, name: str, record: dict[str, Any]) -> None:
        self.shards[name] = json.dumps(record, sort_keys=True, separators=(",", ":"))
        for key in self.totals:
            self.totals[key] += int(record[key])

    def record(self, name: str) -> dict[str, Any]:
        return json.loads(self.shards[name])

    def add(self, record: ShardRecord, stats: dict[str, Any]) -> None:
        """One committed shard: O(1) (no file is written here)."""
        if record.name in self.shards:
            raise ValueError(f"shard {record.name!r} committed twice")
        self._put(record.name, record.to_json())
        self.stats.add(stats)
        if stats.get("labeler"):
            self.extra["labeler"] = stats["labeler"]

    def forget(self, names: Iterable[str]) -> None:
        """Drop shards whose files are gone (they are redone); the merged stats are rebuilt by
        the caller from the remaining records."""
        for name in names:
            record = json.loads(self.shards.pop(name))
            for key in self.totals:
                self.totals[key] -= int(record[key])

    def save(self, out: OutputDir) -> None:
        """Compaction: the whole manifest in one atomic write (O(shards); not per commit)."""
        head = {
            "version": VERSION,
            "config_sha256": self.config_sha256,
            "config": self.config,
            "inputs": self.inputs,
            "totals": {"shards": len(self.shards), **self.totals},
            "stats": self.stats.state(),
            "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "extra": self.extra,
        }
        text = json.dumps(head, sort_keys=True, separators=(",", ":"), default=str)
        shards = ",".join(f"{json.dumps(n)}:{self.shards[n]}" for n in sorted(self.shards))
        out.write_bytes(MANIFEST, (text[:-1] + ',"shards":{' + shards + "}}\n").encode())


def read_records(out: OutputDir, names: list[str]) -> dict[str, dict[str, Any]]:
    """The stats files of ``names`` read in parallel (object stores answer one GET at a time);
    a file that vanished since the listing is left out."""
    def one(name: str):
        return name, out.read_json(stats_name(name), fix="delete it and rerun (the shard is redone)")

    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=min(_READ_THREADS, len(names))) as pool:
        return {name: stats for name, stats in pool.map(one, names) if stats is not None}
