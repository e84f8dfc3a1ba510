"""What an output already holds, found at start-up with one listing.

``open_output`` lists the output folder once (one LIST per prefix on an object store), loads the
manifest's head (one read) and its segments (in parallel), and then reads only the commit records
the manifest does not hold yet: those of shards committed after its last compaction, in parallel.
Beyond the segments, its cost grows with the shards committed since the last compaction, not
with the shards committed in all.

A shard counts as committed when its record (``NAME_stats.json``) and every file the record
names are in the listing. A compacted shard whose files have gone (deleted by hand, a lifecycle
rule) is dropped and redone; the merged statistics are then rebuilt from the remaining records
(read in parallel), the one case that reads every record.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from core.config import to_dict
from pipeline.config import RunConfig, semantic_hash
from pipeline.manifest import (MANIFEST, STATS_SUFFIX, Manifest, RunningStats, ShardRecord,
                               is_segment, read_records)
from pipeline.storage import OutputDir, StorageError

log = logging.getLogger("pipeline")


@dataclass
class OutputState:
    manifest: Manifest
    listed: int                       # names in the output listing
    committed: set[str] = field(default_factory=set)     # every shard committed in the output
    recovered: list[str] = field(default_factory=list)   # committed after the last compaction
    redo: list[str] = field(default_factory=list)        # compacted, but files missing
    seconds: float = 0.0


def list_output(out: OutputDir) -> set[str]:
    """The names in the output folder, from one listing (fresh, not a cached one)."""
    try:
        out.fs.invalidate_cache(out.root)
    except Exception:  # noqa: BLE001 - a filesystem without a listing cache
        pass
    return set(out.names())


def remove_temporaries(out: OutputDir, names: set[str], manifest: Manifest | None = None) -> int:
    """Delete what a killed run left (found in the listing): ``.*.tmp`` files of local outputs,
    and manifest segments the head does not name (written just before a kill, or replaced by a
    ``Manifest.rewrite``)."""
    stale = [n for n in names if out.local and n.startswith(".") and n.endswith(".tmp")]
    stale += [n for n in names if is_segment(n) and (manifest is None or n not in manifest.segments)]
    for name in stale:
        out.remove(name)
        names.discard(name)
    return len(stale)


def _complete(files, names: set[str]) -> bool:
    return all(f in names for f in files)


def open_output(out: OutputDir, cfg: RunConfig, inputs: list[str]) -> OutputState:
    """Load or start the output's manifest and bring it up to date with the committed records.

    Raises StorageError when the output was made with another stage config.
    """
    t0 = time.perf_counter()
    out.ensure()
    config_hash = semantic_hash(cfg)
    manifest = Manifest.load(out)
    if manifest is None:
        # A new output: stats files without a manifest (it was deleted) are not trusted, the
        # shards are redone. The manifest is written before any shard so that its config hash
        # guards every record that follows.
        manifest = Manifest(config_sha256=config_hash, config=to_dict(cfg), inputs=list(inputs))
        names = list_output(out)
        remove_temporaries(out, names)
        manifest.save(out)
        return OutputState(manifest=manifest, listed=len(names), seconds=time.perf_counter() - t0)
    if manifest.config_sha256 != config_hash and manifest.config_sha256 == semantic_hash(cfg, by_content=False):
        # begun before checkpoints counted by content: the same config, from now on by content
        log.info("output %s: its config hash now names the checkpoint by content", cfg.output.path)
        manifest.config_sha256 = config_hash
        manifest.save(out)
    if manifest.config_sha256 != config_hash:
        raise StorageError(
            f"{cfg.output.path} holds shards made with a different stage config "
            f"(config sha256 {manifest.config_sha256[:12]}… vs {config_hash[:12]}…); resuming "
            "would mix two configs: choose a new output.path or delete the old output")
    names = list_output(out)
    remove_temporaries(out, names, manifest)
    state = OutputState(manifest=manifest, listed=len(names))
    compacted = manifest.compacted(out)

    state.redo = sorted(n for n, record in compacted.items() if not _complete(record["files"], names))
    newer = sorted(n[: -len(STATS_SUFFIX)] for n in names
                   if n.endswith(STATS_SUFFIX) and n[: -len(STATS_SUFFIX)] not in compacted)
    for name, stats in read_records(out, newer).items():
        record = ShardRecord.from_stats(stats)
        if record.name == name and _complete(record.files, names):
            manifest.add(record, stats)
            state.recovered.append(name)
    manifest.inputs = sorted(set(manifest.inputs) | set(inputs))
    manifest.config = to_dict(cfg)
    if state.redo:
        log.warning("%d committed shards lost files and are redone (first: %s)", len(state.redo),
                    state.redo[0])
        for name in state.redo:
            del compacted[name]
        stats = RunningStats()
        for one in read_records(out, sorted([*compacted, *state.recovered])).values():
            stats.add(one)
        manifest.rewrite(out, compacted, stats)
    elif manifest.inline:
        manifest.rewrite(out, compacted, manifest.stats)     # a version-2 manifest, now segmented
    elif state.recovered:
        manifest.save(out)
    state.committed = set(compacted) | set(state.recovered)
    state.seconds = time.perf_counter() - t0
    return state


__all__ = ["OutputState", "open_output", "list_output", "MANIFEST"]
