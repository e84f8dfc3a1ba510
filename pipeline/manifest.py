"""The output's bookkeeping: each shard's commit record, and their compaction into the manifest.

A shard is committed when its ``NAME_stats.json`` exists: the write task writes it last (after
``NAME.tar`` and ``NAME.parquet``, each atomically), and it names those files with their sha256
and the input they came from. That record is written once per shard, by the task, and never
rewritten, so a commit costs the same whether the run has 10 shards or 100,000.

The manifest is a compaction of the records, in two kinds of file:

- ``_manifest.json``, the head: the run's config and config hash, its inputs, the totals, the
  merged statistics and the names of the segments, oldest first;
- ``_manifest.NNNNNN.json``, the segments: each holds the records of the shards committed since
  the compaction before it, and is written once.

The driver holds only the records committed since the last compaction. A compaction writes them
as the next segment, then rewrites the head; it happens when a run starts (so the config hash is
there before any shard), every ``output.compact_every_s`` seconds, after
``output.compact_every_shards`` new records and at the end, never per shard. Its cost is that of
the new records and the head, not of every shard committed so far, and the driver's memory stays
flat however long the run.

A run killed between a record and the next compaction loses nothing: on resume the records newer
than the manifest are found by listing the output once and read (in parallel), and only those. A
segment written by a run killed before the head that names it is ignored and overwritten.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable

from pipeline.storage import OutputDir, StorageError

MANIFEST = "_manifest.json"
VERSION = 3
STATS_SUFFIX = "_stats.json"
_READ_THREADS = 16
_SEGMENT = re.compile(r"_manifest\.(\d{6,})\.json")
_FIX = "delete the output folder (or choose a new output.path) and rerun"


def stats_name(shard: str) -> str:
    return shard + STATS_SUFFIX


def segment_name(index: int) -> str:
    return f"_manifest.{index:06d}.json"


def is_segment(name: str) -> bool:
    return _SEGMENT.fullmatch(name) is not None


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


def _zero_totals() -> dict[str, int]:
    return {"shards": 0, "read": 0, "kept": 0, "dropped": 0}


def _compact(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


@dataclass
class Manifest:
    config_sha256: str
    config: dict[str, Any]
    inputs: list[str]
    stats: RunningStats = field(default_factory=RunningStats)
    extra: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=_zero_totals)   # every committed shard's
    segments: list[str] = field(default_factory=list)              # compacted records, oldest first
    next_segment: int = 0
    # name -> record as compact JSON, for the shards committed since the last compaction: all
    # the driver holds of the records
    fresh: dict[str, str] = field(default_factory=dict)
    # version 2 kept every record in _manifest.json itself: they count as compacted until
    # ``open_output`` rewrites them as a segment
    inline: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, out: OutputDir) -> "Manifest | None":
        """The head (one read); the records stay in their segments (``compacted``)."""
        data = out.read_json(MANIFEST, fix=_FIX)
        if data is None:
            return None
        if data.get("version") not in (2, VERSION):
            raise StorageError(f"{out.url}/{MANIFEST} is version {data.get('version')} of the manifest; "
                               f"this version of the pipeline resumes versions 2 and {VERSION}: choose a "
                               "new output.path (or delete the old output) and rerun")
        manifest = cls(config_sha256=data.get("config_sha256", ""), config=data.get("config", {}),
                       inputs=list(data.get("inputs", [])), stats=RunningStats(data.get("stats")),
                       extra=dict(data.get("extra", {})), totals={**_zero_totals(), **data.get("totals", {})},
                       segments=list(data.get("segments", [])), next_segment=int(data.get("next_segment", 0)),
                       inline=dict(data.get("shards", {})))
        return manifest

    def compacted(self, out: OutputDir) -> dict[str, dict[str, Any]]:
        """name -> record of every compacted shard: the segments, read in parallel."""
        def one(name: str) -> dict[str, Any]:
            data = out.read_json(name, fix=_FIX)
            if data is None:
                raise StorageError(f"{out.url}/{name} is missing but {MANIFEST} names it: the output was "
                                   f"changed by hand; {_FIX}")
            return data["shards"]

        records: dict[str, dict[str, Any]] = dict(self.inline)
        if self.segments:
            with ThreadPoolExecutor(max_workers=min(_READ_THREADS, len(self.segments))) as pool:
                for part in pool.map(one, self.segments):
                    records.update(part)
        return records

    @property
    def uncompacted(self) -> int:
        """Records added since the last compaction."""
        return len(self.fresh)

    def add(self, record: ShardRecord, stats: dict[str, Any]) -> None:
        """One committed shard: O(1) (no file is written here)."""
        if record.name in self.fresh:
            raise ValueError(f"shard {record.name!r} committed twice")
        self.fresh[record.name] = _compact(record.to_json())
        self.totals["shards"] += 1
        for key in ("read", "kept", "dropped"):
            self.totals[key] += int(getattr(record, key))
        self.stats.add(stats)
        if stats.get("labeler"):
            self.extra["labeler"] = stats["labeler"]

    def save(self, out: OutputDir) -> None:
        """Compaction: the records added since the last one as the next segment, then the head
        (two atomic writes; the cost of the new records and the head, not of every shard)."""
        if self.fresh:
            name = segment_name(self.next_segment)
            _write_records(out, name, self.fresh)
            self.segments.append(name)
            self.next_segment += 1
            self.fresh = {}
        self._write_head(out)

    def rewrite(self, out: OutputDir, records: dict[str, dict[str, Any]], stats: RunningStats) -> None:
        """Replace the compaction with ``records`` (and the uncompacted ones) in one new segment:
        after compacted shards were dropped. The old segments are removed once the head no
        longer names them."""
        merged = {name: _compact(record) for name, record in records.items()}
        merged.update(self.fresh)
        self.totals = _zero_totals()
        for text in merged.values():
            record = json.loads(text)
            self.totals["shards"] += 1
            for key in ("read", "kept", "dropped"):
                self.totals[key] += int(record[key])
        old, self.segments, self.stats = self.segments, [], stats
        self.fresh, self.inline = merged, {}
        self.save(out)
        for name in old:
            out.remove(name)

    def _write_head(self, out: OutputDir) -> None:
        head = {
            "version": VERSION,
            "config_sha256": self.config_sha256,
            "config": self.config,
            "inputs": self.inputs,
            "totals": self.totals,
            "stats": self.stats.state(),
            "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "extra": self.extra,
            "segments": self.segments,
            "next_segment": self.next_segment,
        }
        out.write_bytes(MANIFEST, (json.dumps(head, sort_keys=True, separators=(",", ":"), default=str)
                                   + "\n").encode())


def _write_records(out: OutputDir, name: str, records: dict[str, str]) -> None:
    body = ",".join(f"{json.dumps(n)}:{records[n]}" for n in sorted(records))
    out.write_bytes(name, ('{"shards":{' + body + "}}\n").encode())


def read_manifest(out: OutputDir) -> dict[str, Any] | None:
    """The whole manifest as one dict: the head with ``shards`` (name -> record) gathered from
    its segments; None when the output has none. For readers and tests; the runner keeps only
    the head."""
    manifest = Manifest.load(out)
    if manifest is None:
        return None
    data = out.read_json(MANIFEST, fix=_FIX)
    data["shards"] = dict(sorted(manifest.compacted(out).items()))
    return data


def read_records(out: OutputDir, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The stats files of ``names`` read in parallel (object stores answer one GET at a time);
    a file that vanished since the listing is left out."""
    names = list(names)

    def one(name: str):
        return name, out.read_json(stats_name(name), fix="delete it and rerun (the shard is redone)")

    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=min(_READ_THREADS, len(names))) as pool:
        return {name: stats for name, stats in pool.map(one, names) if stats is not None}
