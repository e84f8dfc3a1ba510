"""Write: grounding-schema webdataset shards, per-sample Parquet rows, per-shard stats.

Pure functions from samples to bytes or dicts; the pipeline decides where they go (and makes
the shard, its Parquet and its stats visible together).

- ``encode_shard(samples) -> bytes``: a POSIX (ustar) tar in webdataset layout. For each KEPT
  sample, in batch order: ``KEY.<image_ext>`` (the original image bytes) then ``KEY.json``
  (``Sample.to_record()``, compact UTF-8 JSON in the record's own key order). Every member has
  mtime 0, uid/gid 0, empty uname/gname and mode 0o644, so equal samples give equal bytes.
- ``stats_table(samples) -> pyarrow.Table``: one row per attempted sample (kept or dropped):
  the ``Sample.stats_row()`` columns plus ``drop_detail`` (why, in words), with the explicit
  ``STATS_SCHEMA`` so an empty or all-dropped shard still has typed columns.
- ``encode_parquet(table) -> bytes``: Parquet (zstd); equal tables give equal bytes.
- ``shard_stats(samples, *, shard, duration_s, labeler=None, read_error=None) -> dict``: the
  ``NNNNN_stats.json`` content (see its docstring).
- ``merge_stats(list_of_shard_stats) -> dict``: the run's ``stats.json``; it works on the dicts
  as loaded back from JSON and checks ``read == kept + dropped`` for every shard.

Distributions (phrases per caption, boxes per image, caption length, box scores) are summaries
``{count, sum, mean, min, max, p05, p25, p50, p75, p95, hist}`` over the KEPT samples. ``hist``
makes merging exact: integer values are counted per value; scores in 0.01-wide bins (keys are
the bins' lower edges, ``"0.65"``). A shard's score quantiles are exact; merged score
quantiles are read from the bins (bin centres, so within 0.005).
"""
from __future__ import annotations

import io
import json
import math
import re
import tarfile
from collections import Counter
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from stages.schema import IMAGE_EXTENSIONS, DropReason, Sample, Status

__all__ = ["STATS_SCHEMA", "QUANTILES", "encode_shard", "record_bytes", "stats_table",
           "encode_parquet", "shard_stats", "merge_stats"]

STATS_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("input_shard", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("drop_reason", pa.string()),
    pa.field("caption_chars", pa.int32()),
    pa.field("n_phrases", pa.int32()),
    pa.field("n_boxes", pa.int32()),
    pa.field("max_score", pa.float64()),
    pa.field("mean_score", pa.float64()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("drop_detail", pa.string()),
])

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_MAX_KEY_CHARS = 90          # ustar names are at most 100 bytes; ".json"/".jpeg" need 5
_SCORE_BINS = 100


# ---------------------------------------------------------------------------- shard tar
def record_bytes(sample: Sample) -> bytes:
    """The ``KEY.json`` bytes of a sample: compact, UTF-8, no NaN/Infinity."""
    try:
        text = json.dumps(sample.to_record(), ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"sample {sample.key!r} of shard {sample.input_shard!r}: its record "
                         f"is not valid JSON ({exc}); a stage put a non-JSON value (NaN, "
                         "a numpy or custom object) into it") from None
    return text.encode("utf-8")


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    tar.addfile(info, io.BytesIO(data))


def encode_shard(samples: list[Sample]) -> bytes:
    """The output shard of the kept samples (webdataset layout); see the module docstring.

    Raises ValueError naming the sample if a kept sample cannot be written (no image bytes,
    a key that is not ``[A-Za-z0-9_-]+``, a duplicate key): those are bugs upstream, and a
    silently wrong shard would be worse.
    """
    buf = io.BytesIO()
    seen: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            if not sample.kept:
                continue
            where = f"sample {sample.key!r} of shard {sample.input_shard!r}"
            if not _KEY_RE.match(sample.key) or len(sample.key) > _MAX_KEY_CHARS:
                raise ValueError(f"{where}: an output key must match [A-Za-z0-9_-]+ and have "
                                 f"at most {_MAX_KEY_CHARS} characters (shards.output_key "
                                 "makes one)")
            if sample.key in seen:
                raise ValueError(f"{where}: duplicate key in one output shard")
            seen.add(sample.key)
            if sample.image is None or sample.image_ext not in IMAGE_EXTENSIONS:
                raise ValueError(f"{where}: a kept sample needs image bytes and an image_ext in "
                                 f"{IMAGE_EXTENSIONS}, got {type(sample.image).__name__} and "
                                 f"{sample.image_ext!r}")
            _tar_member(tar, f"{sample.key}.{sample.image_ext}", bytes(sample.image))
            _tar_member(tar, f"{sample.key}.json", record_bytes(sample))
    return buf.getvalue()


# ---------------------------------------------------------------------------- Parquet
def stats_table(samples: Iterable[Sample]) -> pa.Table:
    """One row per attempted sample with ``STATS_SCHEMA``'s typed columns."""
    rows = []
    for sample in samples:
        row = sample.stats_row()
        row["drop_detail"] = sample.drop_detail or None
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=STATS_SCHEMA)


def encode_parquet(table: pa.Table) -> bytes:
    """Parquet bytes of ``table``; the same table gives the same bytes."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


# ---------------------------------------------------------------------------- stats
def _num(value: float) -> float | int:
    """JSON-friendly number: ints stay ints, floats are rounded to 6 decimals."""
    if float(value).is_integer() and abs(value) < 2**53:
        return int(value)
    return round(float(value), 6)


def _quantiles(items: list[tuple[float, int]], total: int) -> dict[str, float | int]:
    """Linear-interpolation quantiles (numpy's default) of the multiset ``items``."""
    out: dict[str, float | int] = {}
    cumulative = []
    running = 0
    for _, count in items:
        running += count
        cumulative.append(running)

    def at(rank: int) -> float:
        lo, hi = 0, len(cumulative) - 1       # first index whose cumulative count > rank
        while lo < hi:
            mid = (lo + hi) // 2
            if cumulative[mid] > rank:
                hi = mid
            else:
                lo = mid + 1
        return items[lo][0]

    for q in QUANTILES:
        h = (total - 1) * q
        lower = math.floor(h)
        v_lo, v_hi = at(lower), at(min(lower + 1, total - 1))
        out[f"p{round(q * 100):02d}"] = _num(v_lo + (h - lower) * (v_hi - v_lo))
    return out


def _empty_summary() -> dict[str, Any]:
    summary: dict[str, Any] = {"count": 0, "sum": 0, "mean": None, "min": None, "max": None}
    summary.update({f"p{round(q * 100):02d}": None for q in QUANTILES})
    summary["hist"] = {}
    return summary


def _summary(values: Counter, hist: dict[str, int], total_sum: float | None = None,
             lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    """Summary of the multiset ``values`` (value -> count), with ``hist`` attached."""
    count = sum(values.values())
    if count == 0:
        return _empty_summary()
    items = sorted(values.items())
    total = sum(v * c for v, c in items) if total_sum is None else total_sum
    summary: dict[str, Any] = {
        "count": count, "sum": _num(total), "mean": _num(total / count),
        "min": _num(items[0][0] if lo is None else lo),
        "max": _num(items[-1][0] if hi is None else hi),
    }
    summary.update(_quantiles(items, count))
    summary["hist"] = hist
    return summary


def _int_summary(values: list[int]) -> dict[str, Any]:
    counts = Counter(int(v) for v in values)
    return _summary(counts, {str(v): c for v, c in sorted(counts.items())})


def _score_bin(score: float) -> int:
    return min(max(int(math.floor(score * _SCORE_BINS)), 0), _SCORE_BINS - 1)


def _score_summary(scores: list[float]) -> dict[str, Any] | None:
    if not scores:
        return None
    bad = [s for s in scores if not math.isfinite(s)]
    if bad:
        raise ValueError(f"box scores must be finite numbers, got {bad[0]!r}; the labeler "
                         "produced it")
    bins = Counter(_score_bin(s) for s in scores)
    hist = {f"{b / _SCORE_BINS:.2f}": c for b, c in sorted(bins.items())}
    return _summary(Counter(float(s) for s in scores), hist)


def shard_stats(samples: list[Sample], *, shard: str, duration_s: float,
                labeler: dict | None = None, read_error: str | None = None) -> dict[str, Any]:
    """The stats of one shard (``NNNNN_stats.json``).

    Keys: ``shard``, ``read``, ``kept``, ``dropped``, ``drops`` (every reason of
    ``DropReason``, 0 when absent), ``phrases`` and ``boxes`` (totals over kept samples),
    ``phrases_per_caption``, ``boxes_per_image``, ``caption_chars`` (summaries over kept
    samples), ``scores`` (summary over the kept boxes' scores, ``None`` without scores),
    ``duration_s``, ``samples_per_s``, ``labeler``, ``read_error`` (the reader's error for a
    truncated or corrupt shard, else ``None``).
    """
    drops = {reason.value: 0 for reason in DropReason}
    kept = [s for s in samples if s.status is Status.KEPT]
    dropped = [s for s in samples if s.status is not Status.KEPT]
    for sample in dropped:
        if sample.drop_reason is None:
            raise ValueError(f"sample {sample.key!r} of shard {shard!r} is dropped without a "
                             "reason; use Sample.drop(reason, detail)")
        drops[sample.drop_reason.value] += 1
    scores = [float(x) for s in kept for x in s.scores]
    return {
        "shard": shard,
        "read": len(samples),
        "kept": len(kept),
        "dropped": len(dropped),
        "drops": drops,
        "phrases": sum(len(s.phrases) for s in kept),
        "boxes": sum(len(s.boxes) for s in kept),
        "phrases_per_caption": _int_summary([len(s.phrases) for s in kept]),
        "boxes_per_image": _int_summary([len(s.boxes) for s in kept]),
        "caption_chars": _int_summary([len(s.caption) for s in kept if s.caption is not None]),
        "scores": _score_summary(scores),
        "duration_s": round(float(duration_s), 6),
        "samples_per_s": round(len(samples) / duration_s, 3) if duration_s > 0 else None,
        "labeler": labeler,
        "read_error": read_error,
    }


def _merge_summaries(parts: list[dict[str, Any] | None], *, scores: bool) -> dict[str, Any] | None:
    parts = [p for p in parts if p and p.get("count")]
    if not parts:
        return None if scores else _empty_summary()
    hist: Counter = Counter()
    for part in parts:
        for key, count in part["hist"].items():
            hist[key] += int(count)
    if scores:
        half = 0.5 / _SCORE_BINS
        values = Counter({float(k) + half: c for k, c in hist.items()})
        ordered = {k: hist[k] for k in sorted(hist, key=float)}
    else:
        values = Counter({int(k): c for k, c in hist.items()})
        ordered = {k: hist[k] for k in sorted(hist, key=int)}
    return _summary(values, ordered, total_sum=sum(p["sum"] for p in parts),
                    lo=min(p["min"] for p in parts), hi=max(p["max"] for p in parts))


def merge_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals across shards (the run's ``stats.json``).

    Raises ValueError naming the shard when a shard's counts do not add up
    (``read != kept + dropped`` or drops by reason not summing to ``dropped``) or when a shard
    appears twice (it would be counted twice).
    """
    seen: set[str] = set()
    drops = {reason.value: 0 for reason in DropReason}
    totals = {"read": 0, "kept": 0, "dropped": 0, "phrases": 0, "boxes": 0}
    labelers: list[Any] = []
    read_errors: dict[str, str] = {}
    duration = 0.0
    for item in stats:
        shard = item.get("shard")
        if shard in seen:
            raise ValueError(f"merge_stats: shard {shard!r} appears twice; each committed "
                             "shard must be merged once")
        seen.add(shard)
        read, kept, dropped = item["read"], item["kept"], item["dropped"]
        if read != kept + dropped:
            raise ValueError(f"stats of shard {shard!r}: read {read} != kept {kept} + "
                             f"dropped {dropped}; the shard's stats are corrupt, rerun it")
        if sum(item["drops"].values()) != dropped:
            raise ValueError(f"stats of shard {shard!r}: drops by reason sum to "
                             f"{sum(item['drops'].values())}, not dropped = {dropped}")
        for name in totals:
            totals[name] += int(item[name])
        for reason, count in item["drops"].items():
            drops[reason] = drops.get(reason, 0) + int(count)
        duration += float(item.get("duration_s") or 0.0)
        if item.get("labeler") is not None and item["labeler"] not in labelers:
            labelers.append(item["labeler"])
        if item.get("read_error"):
            read_errors[shard] = item["read_error"]
    return {
        "shards": len(stats),
        **totals,
        "drops": drops,
        "phrases_per_caption": _merge_summaries([s.get("phrases_per_caption") for s in stats],
                                                scores=False),
        "boxes_per_image": _merge_summaries([s.get("boxes_per_image") for s in stats],
                                            scores=False),
        "caption_chars": _merge_summaries([s.get("caption_chars") for s in stats], scores=False),
        "scores": _merge_summaries([s.get("scores") for s in stats], scores=True),
        "duration_s": round(duration, 6),       # the shards' work time summed, not wall time
        "labelers": labelers,
        # the one labeler of the run (as the manifest and each shard's stats name it); null when
        # there is none (no teacher) or shards of several labelers were merged (see labelers)
        "labeler": labelers[0] if len(labelers) == 1 else None,
        "read_errors": read_errors,
    }
