"""The student's training stream: a seeded, streaming, weighted mixture of three kinds of source.

Sources (``data.sources``: a mapping name -> ``TrainSourceConfig``, so one source's paths can be
overridden as ``data.sources.NAME.annotations=...``):

- ``coco``: COCO-format detection (Objects365, COCO, ...). Each image becomes a grounding
  sample with a class-name prompt: positives shuffled, negatives drawn from the vocabulary
  (``trainer.data.prompts.detection_to_grounding``, official ``od_to_grounding``).
- ``mdetr``: MDETR-format grounding (GoldG). The caption as it is; with ``pack_captions`` other
  captions of the file (drawn at random) are packed around it as negatives.
- ``pseudo``: output shards of the teacher DAG (``stages.write`` format). Boxes scoring
  ``<= min_score`` are dropped (official FURTHER_SCREEN); an image left without a box is skipped
  (CAPTION_MIN_BOX = 1). With ``pack_captions`` the negatives are the captions of the previous
  ``pool_size`` records of the same stream (shards are read as streams, without random access).
  ``unlabelled_phrases: ignore`` takes the tokens of the caption's noun phrases left without a
  box out of the token loss (``trainer.data.prompts.unlabelled_phrase_spans``); the official
  default, ``negative``, teaches that such a phrase is nowhere in the image. ``known_phrases:
  ignore`` drops the boxes whose phrase names a class of ``known_names`` (the gold sets' classes)
  and takes those phrases' tokens out of the token loss; an image left without a box is skipped
  (``known_only``).

Nothing is materialised. A source is a factory ``epoch -> iterable of references``: for the
JSON readers an index into the reader's compact in-memory index (the annotation file is read
once; images are read one at a time), reshuffled per epoch with ``(seed, source, epoch)``; for
shards a stream of (record, image bytes), shard order reshuffled per epoch. ``trainer.data.mixture``
interleaves the sources by weight, and ``worker_shard`` gives each worker a disjoint part:
every ``world_size``-th reference of a JSON source; for shards whole shards when there are at
least ``world_size`` of them, else every ``world_size``-th sample.

A reference becomes a sample (image bytes read, prompt built, boxes screened) only when the
mixture hands it out; the random choices of that sample (negatives, packing, resize, flip) come
from ``default_rng([seed, rank, mixture step])``. So the data position is just the mixture's
state (``TrainStream.state_dict``): a fresh stream that loads it yields exactly the batches an
uninterrupted one would have. Samples that cannot be used (missing or undecodable image,
pseudo labels all screened out) are skipped and counted (``trainer.data.accounting``: per source,
read = used + skipped by reason, and the boxes left out, clipped or screened).

A source with ``extra_per_batch: n`` stays out of that mixture: its own stream adds n samples
(n / world_size per worker) to every batch, their random choices drawn from
``default_rng([seed, rank, its step, 1 + source number])``; the other sources' samples are then
exactly those of a run without it (the student's gold samples are the control's).

``TrainStream.next_batch()`` returns ``collate``'s batch plus ``keys`` (``source/key``),
``sources`` and ``data_state`` (the position after this batch, what a checkpoint stores).
``BatchPrefetcher`` builds the next batches in a background thread.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
from typing import Iterable, Iterator

import numpy as np

from core.storage import expand_shards as _expand
from core.storage import open_input
from model.config import ModelConfig
from stages.readers.output import read_output_samples
from stages.schema import Sample, UnlabelledPhrases
from trainer.data.accounting import DataAccounting
from trainer.data.config import KnownPhrases, SourceKind, TrainDataConfig, TrainSourceConfig
from trainer.data.mixture import Mixture, MixtureConfig, MixtureSource, worker_shard
from trainer.data.known_phrases import drop_boxes, known_label_indices, known_phrase_spans, novel_phrase_boxes
from trainer.data.prompts import (detection_to_grounding, pack_negative_captions, screen_pseudo_labels,
                                  unlabelled_phrase_spans)
from trainer.data.transforms import TrainTransform, TrainTransformConfig, collate

__all__ = ["TrainStream", "BatchPrefetcher", "expand_shards"]

log = logging.getLogger(__name__)

STATE_VERSION = 1


def expand_shards(patterns: Iterable[str], storage_options: dict | None = None, where: str = "shards"
                  ) -> list[str]:
    """``core.storage.expand_shards`` for a training source's ``shards``."""
    return _expand(patterns, storage_options, where=where,
                   fix="list the OUTPUT/*.tar shards of a finished teacher run")


# ------------------------------------------------------------------------------------ sources
class _Skip(Exception):
    """A sample that cannot be used; ``args[0]`` is the reason."""


def _rank_seed(seed: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


class _IndexedSource:
    """A COCO or MDETR reader: references are indices into its index."""

    def __init__(self, name: str, number: int, cfg: TrainSourceConfig, seed: int, rank: int,
                 world_size: int, tokenizer, max_tokens: int):
        from stages.readers.coco import CocoDetectionReader, CocoReaderConfig
        from stages.readers.mdetr import MdetrGroundingReader, MdetrReaderConfig

        self.name, self.cfg, self.tokenizer = name, cfg, tokenizer
        self.seed, self.number, self.rank, self.world_size = seed, number, rank, world_size
        if cfg.kind is SourceKind.COCO:
            self.reader = CocoDetectionReader(CocoReaderConfig(
                annotations=cfg.annotations, image_root=cfg.image_root, source=name,
                box_convention=cfg.box_convention, keep_images_without_boxes=False,
                storage_options=cfg.storage_options))
            self.prompt = dataclasses.replace(cfg.prompt, max_tokens=min(cfg.prompt.max_tokens, max_tokens))
        else:
            self.reader = MdetrGroundingReader(MdetrReaderConfig(
                annotations=cfg.annotations, image_root=cfg.image_root, image_roots=dict(cfg.image_roots),
                source=name, box_convention=cfg.box_convention, keep_images_without_boxes=False,
                storage_options=cfg.storage_options))
        self.packing = None if cfg.pack_captions is None else dataclasses.replace(
            cfg.pack_captions, max_tokens=min(cfg.pack_captions.max_tokens, max_tokens))
        if len(self.reader) < world_size:
            raise ValueError(f"data.sources.{name}: {len(self.reader)} usable images for {world_size} "
                             "workers; every worker needs at least one")

    def __len__(self) -> int:
        return len(self.reader)

    def factory(self, epoch: int) -> Iterator[int]:
        n = len(self.reader)
        order = (np.random.default_rng([self.seed, self.number, epoch]).permutation(n) if self.cfg.shuffle
                 else np.arange(n))
        return (int(i) for i in worker_shard(order, self.rank, self.world_size))

    def materialize(self, index: int, rng: np.random.Generator, count=lambda field, n=1: None) -> Sample:
        image = self.reader[index]
        outside, clipped = self.reader.box_counts(index)
        count("boxes/outside", outside)
        count("boxes/clipped", clipped)
        try:
            data = self.reader.read_image(image)
        except FileNotFoundError:
            raise _Skip("no_image") from None
        sample = self.reader.to_sample(image, data)
        sample.source = self.name
        if self.cfg.kind is SourceKind.COCO:
            return detection_to_grounding(sample, self.reader.categories, self.tokenizer, rng, self.prompt)
        if self.packing is not None:
            n = len(self.reader)
            picks = rng.choice(n, size=min(n, 2 * max(self.packing.pack_random_caption_number, 1) + 1),
                               replace=False)
            pool = [self.reader[int(i)].caption for i in picks if int(i) != index]
            sample = pack_negative_captions(sample, pool, self.tokenizer, rng, self.packing)
        return sample


class _ShardSource:
    """Pseudo-labelled output shards: references are (record, image bytes, ext, pool)."""

    def __init__(self, name: str, number: int, cfg: TrainSourceConfig, seed: int, rank: int,
                 world_size: int, tokenizer, max_tokens: int):
        self.name, self.cfg, self.tokenizer = name, cfg, tokenizer
        self.seed, self.number, self.rank, self.world_size = seed, number, rank, world_size
        self.shards = expand_shards(cfg.shards, cfg.storage_options, where=f"data.sources.{name}.shards")
        self.packing = None if cfg.pack_captions is None else dataclasses.replace(
            cfg.pack_captions, max_tokens=min(cfg.pack_captions.max_tokens, max_tokens))

    def factory(self, epoch: int) -> Iterator[tuple]:
        shards = list(self.shards)
        if self.cfg.shuffle:
            order = np.random.default_rng([self.seed, self.number, epoch]).permutation(len(shards))
            shards = [shards[i] for i in order]
        by_shard = len(shards) >= self.world_size
        mine = shards[self.rank::self.world_size] if by_shard else shards

        def refs() -> Iterator[tuple]:
            pool: collections.deque[str] = collections.deque(maxlen=self.cfg.pool_size)
            for url in mine:
                with open_input(url, self.cfg.storage_options) as fh:
                    for sample in read_output_samples(fh, name=url):
                        yield sample, tuple(pool)
                        pool.append(sample.caption)

        return refs() if by_shard else worker_shard(refs(), self.rank, self.world_size)

    def materialize(self, ref: tuple, rng: np.random.Generator, count=lambda field, n=1: None) -> Sample:
        sample, pool = ref
        sample = dataclasses.replace(sample, source=self.name)
        if sample.scores:                       # human labels in a shard carry no scores: kept as they are
            before = len(sample.boxes)
            sample = screen_pseudo_labels(sample, self.cfg.min_score)
            count("boxes/below_score", before - len(sample.boxes))
        if not sample.boxes:
            raise _Skip("no_boxes")
        known = self.cfg.known_phrases is not KnownPhrases.TRAIN
        regions: list[list[float]] = []           # known_phrases: ignore_region: the dropped boxes
        if known:
            drop = known_label_indices(sample, self.cfg.known_names)
            regions += [list(sample.boxes[i]) for i in drop]
            sample = drop_boxes(sample, drop)
            count("boxes/known_class", len(drop))
            if not sample.boxes:
                raise _Skip("known_only")
        novel_spans: list[list[int]] = []
        if self.cfg.max_novel_phrases:
            novel = novel_phrase_boxes(sample, self.cfg.known_names)
            if len(novel) > self.cfg.max_novel_phrases:
                drop = [i for boxes in novel.values() for i in boxes]
                regions += [list(sample.boxes[i]) for i in drop]
                sample = drop_boxes(sample, drop)
                novel_spans = [list(span) for span in novel]
                count("boxes/novel_ambiguous", len(drop))
                if not sample.boxes:
                    raise _Skip("novel_ambiguous")
        if not self.cfg.box_loss:
            sample.meta["box_loss"] = False
        if regions and self.cfg.known_phrases is KnownPhrases.IGNORE_REGION:
            sample.meta["ignore_regions"] = regions
        if self.packing is not None:
            sample = pack_negative_captions(sample, [c for c in pool if c != sample.caption], self.tokenizer,
                                            rng, self.packing)
        ignore = known_phrase_spans(sample, self.cfg.known_names) if known else []
        start = sample.meta.get("positive_caption_span", [0])[0]        # where packing moved the caption
        for b, e in novel_spans:                                           # their objects are there, unlabelled
            if [b + start, e + start] not in ignore:
                ignore.append([b + start, e + start])
        if self.cfg.unlabelled_phrases is UnlabelledPhrases.IGNORE:
            ignore += [span for span in unlabelled_phrase_spans(sample) if span not in ignore]
        if ignore:
            sample.meta["ignore_spans"] = ignore
        return sample


# ------------------------------------------------------------------------------------ the stream
class TrainStream:
    """The batches of one worker (``rank`` of ``world_size``); ``batch_size`` images each."""

    def __init__(self, cfg: TrainDataConfig, model_cfg: ModelConfig, tokenizer, batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        cfg.validate()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 per worker, got {batch_size}")
        self.cfg, self.model_cfg, self.tokenizer = cfg, model_cfg, tokenizer
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        max_tokens = model_cfg.language.max_query_len
        self.sources: dict[str, _IndexedSource | _ShardSource] = {}
        for number, (name, scfg) in enumerate(cfg.sources.items()):
            kind = _ShardSource if scfg.kind is SourceKind.PSEUDO else _IndexedSource
            self.sources[name] = kind(name, number, scfg, seed, rank, world_size, tokenizer, max_tokens)
        shared = [n for n, s in cfg.sources.items() if not s.extra_per_batch]
        self.mixture = Mixture(
            MixtureConfig(sources=[MixtureSource(n, cfg.sources[n].weight) for n in shared],
                          seed=_rank_seed(seed, rank)),
            {name: self.sources[name].factory for name in shared})
        self.extra: dict[str, tuple[Mixture, int]] = {}      # name -> (its own stream, samples per batch)
        for name, scfg in cfg.sources.items():
            if scfg.extra_per_batch:
                if scfg.extra_per_batch % world_size:
                    raise ValueError(f"data.sources.{name}.extra_per_batch {scfg.extra_per_batch} is not "
                                     f"divisible by {world_size} workers")
                self.extra[name] = (Mixture(MixtureConfig(sources=[MixtureSource(name, 1.0)],
                                                          seed=_rank_seed(seed, rank)),
                                            {name: self.sources[name].factory}), scfg.extra_per_batch // world_size)
        self.transform = TrainTransform(model_cfg.input, TrainTransformConfig(flip_prob=cfg.flip_prob))
        self.counts = DataAccounting(cfg.max_missing_image_fraction, cfg.missing_image_min_read,
                                     roots={n: s.image_root for n, s in cfg.sources.items() if s.image_root})
        if rank == 0:                           # what the annotation files lost at load, counted once
            for name, src in self.sources.items():
                if isinstance(src, _IndexedSource):
                    self.counts.add_file_stats(name, src.reader.stats)

    def _example(self, mixture: Mixture | None = None, salt: tuple[int, ...] = ()):
        """The next usable example of ``mixture`` (default: the shared one), skipping and counting
        unusable samples; ``salt`` keeps an extra source's random choices apart from the shared ones."""
        mixture = self.mixture if mixture is None else mixture
        for _ in range(self.cfg.max_consecutive_skips):
            step = mixture.step
            name = mixture.source_at(step)
            ref = next(mixture)
            rng = np.random.default_rng([self.seed, self.rank, step, *salt])
            self.counts.add(name, "read")
            try:
                sample = self.sources[name].materialize(ref, rng, lambda field, n=1: self.counts.add(name, field, n))
            except _Skip as exc:
                self.counts.skip(name, exc.args[0])
                continue
            try:
                example = self.transform(sample, rng)
            except (OSError, ValueError, SyntaxError) as exc:     # PIL: undecodable or inconsistent image
                if self.counts.counts[f"{name}/skipped/bad_image"] < 5:
                    log.warning("source %s: sample %s skipped (%s: %s)", name, sample.key,
                                type(exc).__name__, exc)
                self.counts.skip(name, "bad_image")
                continue
            self.counts.add(name, "used")
            self.counts.check_missing(name)
            return example
        raise RuntimeError(f"worker {self.rank}: {self.cfg.max_consecutive_skips} samples in a row were "
                           f"unusable (so far: {self.counts.state_dict()}); check the sources' images, "
                           "min_score and box annotations")

    def next_batch(self) -> dict:
        examples = [self._example() for _ in range(self.batch_size)]
        for name, (mixture, n) in self.extra.items():
            salt = (1 + list(self.sources).index(name),)
            examples += [self._example(mixture, salt) for _ in range(n)]
        batch = collate(examples, self.tokenizer, self.model_cfg)
        batch["keys"] = [f"{ex.source}/{ex.key}" for ex in examples]
        batch["sources"] = [ex.source for ex in examples]
        batch["data_state"] = self.state_dict()
        return batch

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        state = {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                 "mixture": self.mixture.state_dict(), "counts": self.counts.state_dict()}
        if self.extra:
            state["extra"] = {name: mixture.state_dict() for name, (mixture, _) in self.extra.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r}, expected {STATE_VERSION}")
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(f"the data state belongs to worker {state['rank']} of {state['world_size']}, "
                             f"not {self.rank} of {self.world_size}")
        if set(state.get("extra", {})) != set(self.extra):
            raise ValueError(f"the data state has extra_per_batch sources {sorted(state.get('extra', {}))}, "
                             f"this stream {sorted(self.extra)}; resume with the same data.sources")
        self.mixture.load_state_dict(state["mixture"])
        for name, (mixture, _) in self.extra.items():
            mixture.load_state_dict(state["extra"][name])
        self.counts.load_state_dict(state.get("counts", {}))


class BatchPrefetcher:
    """``TrainStream.next_batch`` run ``depth`` batches ahead in a daemon thread (``depth`` 0:
    in the caller's thread). Iterate it; an error of the stream is raised in the caller."""

    _END = object()

    def __init__(self, stream: TrainStream, depth: int = 2):
        self.stream, self.depth = stream, depth
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._thread = threading.Thread(target=self._run, name="train-prefetch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self.stream.next_batch()
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:            # noqa: BLE001 - handed to the consumer
            self._queue.put(exc)

    def __iter__(self) -> "BatchPrefetcher":
        return self

    def __next__(self) -> dict:
        if self._thread is None:
            return self.stream.next_batch()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.1)
                except queue.Empty:
                    pass
            self._thread = None

