"""Every training sample accounted for: per source, samples read, used and skipped by reason, and
the boxes left out or changed on the way.

``DataAccounting`` is the counter of one worker's ``TrainStream``; its state travels in the data
state (``TrainStream.state_dict()["counts"]``), so a checkpoint carries it and a resumed run keeps
counting. Keys are ``SOURCE/FIELD``:

- ``read``: references the mixture handed out (a sample was attempted); ``used``: samples that
  became training examples; ``read = used + sum(skipped/*)`` always.
- ``skipped/REASON``: ``no_image`` (the image file is missing), ``bad_image`` (undecodable, or
  its size disagrees with the annotation), ``no_boxes`` (a pseudo-labelled image with no box
  above ``min_score``: the official CAPTION_MIN_BOX = 1).
- ``boxes/outside`` (wholly outside its image, or empty: not a target), ``boxes/clipped``
  (partly outside: clipped to the image), ``boxes/below_score`` (pseudo boxes at or below
  ``min_score``), counted over the samples read.
- ``file/images_left_out`` (images of a COCO/MDETR file none of whose boxes is usable: they are
  not in the stream at all), ``file/boxes_outside``, ``file/boxes_clipped``: the whole file's,
  counted once (by worker 0) when the source is loaded.

``summarize`` turns the workers' flat states into ``{source: {read, used, skipped: {...},
boxes: {...}, file: {...}}}``, what ``metrics.jsonl`` (key ``data``), TensorBoard (``data/SOURCE/...``) and the
end-of-run summary show. A source whose ``no_image`` share passes ``max_missing_fraction`` once
``min_read`` of its samples were read stops the run (``MissingImagesError``): a wrong
``image_root`` or a half-synced bucket must not silently turn into training on the other sources.
"""
from __future__ import annotations

import collections

__all__ = ["MissingImagesError", "DataAccounting", "summarize", "format_accounting"]


class MissingImagesError(RuntimeError):
    """A source lost more than the allowed share of its samples to missing image files."""


class DataAccounting:
    """The counts of one worker (``SOURCE/FIELD`` -> int)."""

    def __init__(self, max_missing_fraction: float = 0.01, min_read: int = 200,
                 roots: dict[str, str] | None = None):
        self.max_missing_fraction, self.min_read = max_missing_fraction, min_read
        self.roots = roots or {}
        self.counts: collections.Counter[str] = collections.Counter()

    def add(self, source: str, field: str, n: int = 1) -> None:
        if n:
            self.counts[f"{source}/{field}"] += n

    def add_file_stats(self, source: str, stats: dict[str, int]) -> None:
        """A COCO/MDETR reader's load-time ``stats``: images left out because none of their boxes
        is usable (never read, so never counted as read), and boxes left out or clipped in the file."""
        self.add(source, "file/images_left_out", stats.get("images_without_boxes", 0))
        self.add(source, "file/boxes_outside", stats.get("degenerate_boxes", 0))
        self.add(source, "file/boxes_clipped", stats.get("clipped_boxes", 0))

    def skip(self, source: str, reason: str) -> None:
        self.add(source, f"skipped/{reason}")
        if reason == "no_image":
            self.check_missing(source)

    def check_missing(self, source: str) -> None:
        read = self.counts[f"{source}/read"]
        missing = self.counts[f"{source}/skipped/no_image"]
        if read >= self.min_read and missing > self.max_missing_fraction * read:
            root = self.roots.get(source)
            raise MissingImagesError(
                f"data.sources.{source}: {missing} of the {read} samples read so far have no image file "
                f"({100 * missing / read:.1f} %, more than data.max_missing_image_fraction="
                f"{self.max_missing_fraction}){f' under {root}' if root else ''}; fix "
                f"data.sources.{source}.image_root (or restore the images), or raise "
                "data.max_missing_image_fraction to train on what is there")

    def state_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.counts = collections.Counter({str(k): int(v) for k, v in state.items()})


def summarize(states: list[dict[str, int]]) -> dict[str, dict]:
    """The workers' flat counts, summed, as ``{source: {read, used, skipped: {}, boxes: {}, file: {}}}``."""
    total: collections.Counter[str] = collections.Counter()
    for state in states:
        total.update(state or {})
    out: dict[str, dict] = {}
    for key, value in sorted(total.items()):
        source, _, field = key.partition("/")
        entry = out.setdefault(source, {"read": 0, "used": 0, "skipped": {}, "boxes": {}, "file": {}})
        group, _, name = field.partition("/")
        if name:
            entry.setdefault(group, {})[name] = value
        else:
            entry[group] = value
    return out


def format_accounting(data: dict[str, dict]) -> list[str]:
    """One line per source: ``NAME  read R = used U + skipped S (reason n, ...); boxes ...``."""
    lines = []
    for source, entry in sorted(data.items()):
        skipped = entry.get("skipped", {})
        text = f"{source}: read {entry.get('read', 0)} = used {entry.get('used', 0)} + skipped {sum(skipped.values())}"
        if skipped:
            text += " (" + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) + ")"
        for group in ("boxes", "file"):
            values = {k: v for k, v in entry.get(group, {}).items() if v}
            if values:
                text += f"; {group} " + ", ".join(f"{k} {v}" for k, v in sorted(values.items()))
        lines.append(text)
    return lines
