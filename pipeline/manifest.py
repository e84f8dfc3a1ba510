"""``OUTPUT/_manifest.json``: the run's record and the commit log of its shards.

A shard counts as committed only when the manifest lists it; its files are written (atomically,
each) before the manifest names them. A crash between the two leaves files that the next run
simply rewrites with identical bytes. Only the driver writes the manifest.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

from pipeline.storage import OutputDir

MANIFEST = "_manifest.json"
VERSION = 1


@dataclass
class ShardRecord:
    name: str
    input: str
    read: int
    kept: int
    dropped: int
    files: dict[str, str]          # file name -> sha256
    read_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"input": self.input, "read": self.read, "kept": self.kept, "dropped": self.dropped,
               "files": self.files}
        if self.read_error:
            out["read_error"] = self.read_error
        return out


@dataclass
class Manifest:
    config_sha256: str
    config: dict[str, Any]
    inputs: list[str]
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, out: OutputDir) -> "Manifest | None":
        data = out.read_json(MANIFEST)
        if data is None:
            return None
        return cls(config_sha256=data.get("config_sha256", ""), config=data.get("config", {}),
                   inputs=list(data.get("inputs", [])), shards=dict(data.get("shards", {})),
                   extra=dict(data.get("extra", {})))

    def committed(self, name: str, out: OutputDir) -> bool:
        """Listed in the manifest and its files still there."""
        record = self.shards.get(name)
        return bool(record) and all(out.exists(f) for f in record.get("files", {}))

    def add(self, record: ShardRecord) -> None:
        self.shards[record.name] = record.to_json()

    def save(self, out: OutputDir) -> None:
        out.write_json(MANIFEST, {
            "version": VERSION,
            "config_sha256": self.config_sha256,
            "config": self.config,
            "inputs": self.inputs,
            "shards": dict(sorted(self.shards.items())),
            "totals": {
                "shards": len(self.shards),
                "read": sum(r["read"] for r in self.shards.values()),
                "kept": sum(r["kept"] for r in self.shards.values()),
                "dropped": sum(r["dropped"] for r in self.shards.values()),
            },
            "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "extra": self.extra,
        })
