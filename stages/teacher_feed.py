"""The teacher's feed: CPU threads prepare batches while the device runs the previous ones.

A shard's samples stream through three places at once:

* a pool of ``workers`` threads decodes each image (PIL releases the GIL), EXIF-transposes it and
  keeps it as uint8 (``model.transforms.decode_for_device``);
* the feed thread takes the decoded images a window at a time (``window`` batches), groups them
  by size and aspect ratio so that a batch pads little, tokenises the batch's prompts (padded to
  its longest prompt unless told otherwise), packs the pixels into one flat pinned buffer and
  starts its copy to the device on a side stream (``non_blocking``); up to ``prefetch`` batches
  wait ready in a queue;
* the caller's thread (the device's) takes batches in turn: resize, normalise and pad on the
  device (``model.transforms.device_batch``), forward, post-process.

Memory stays bounded by the window and the queue, whatever the shard's length. On a CPU device
the same code runs without pinned memory or streams. Plain threads: nothing here knows Ray.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from model.prompts import Prompt, prompt_positive_maps
from model.transforms import DecodedImage, ResizeAt, decode_for_device

_END = object()


@dataclass
class FeedItem:
    index: int                # the caller's index (results go back by it)
    image: Any                # encoded bytes (or anything ``decode_for_device`` reads)
    prompt: Prompt


@dataclass
class FeedBatch:
    """One batch on its way to (or on) the device."""
    indices: list[int]
    pixels: torch.Tensor                  # [sum(h*w*3)] uint8, flat (on the device once ``ready``)
    shapes: list[tuple[int, int]]         # (h, w) of the pixels that crossed
    resized: list[tuple[int, int]]        # (h, w) the network sees
    original: list[tuple[int, int]]       # (h, w) boxes go back to
    input_ids: torch.Tensor               # [B, T]
    attention_mask: torch.Tensor          # [B, T]
    positive_maps: list[torch.Tensor]     # B x [C_i, T]
    event: Any = None                     # CUDA event recorded after the copy (None on CPU)

    def ready(self) -> "FeedBatch":
        """Make the current stream wait for this batch's copy (no host sync)."""
        if self.event is not None:
            stream = torch.cuda.current_stream(self.pixels.device)
            stream.wait_event(self.event)
            self.pixels.record_stream(stream)
            for t in (self.input_ids, self.attention_mask, *self.positive_maps):
                t.record_stream(stream)
        return self


@dataclass
class FeedStats:
    """What the feed did: counts, padding and the CPU time its threads spent."""
    images: int = 0
    batches: int = 0
    real_pixels: int = 0                  # sum of h*w the network sees
    padded_pixels: int = 0                # sum of H*W of the padded batches
    decode_errors: int = 0
    cpu_s: float = 0.0                    # thread CPU time of the workers and the feed thread

    @property
    def padded_fraction(self) -> float:
        """Share of the network's input pixels that are zero padding."""
        return 1.0 - self.real_pixels / self.padded_pixels if self.padded_pixels else 0.0

    def as_dict(self) -> dict:
        return {"images": self.images, "batches": self.batches, "decode_errors": self.decode_errors,
                "padded_fraction": round(self.padded_fraction, 4), "cpu_s": round(self.cpu_s, 4)}


def padded_area(resized: list[tuple[int, int]], divisibility: int) -> int:
    h, w = max(s[0] for s in resized), max(s[1] for s in resized)
    if divisibility > 0:
        h, w = -(-h // divisibility) * divisibility, -(-w // divisibility) * divisibility
    return h * w * len(resized)


def group_by_shape(decoded: list[tuple[int, DecodedImage]], batch_size: int) -> list[list[int]]:
    """Positions (into ``decoded``) cut into batches of images of similar size: sorted by
    orientation, aspect ratio and size, so equal sizes sit together and padding stays small."""
    def key(p: int):
        h, w = decoded[p][1].resized
        return (h > w, round(w / h, 2), h, w, p)
    order = sorted(range(len(decoded)), key=key)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class TeacherFeed:
    def __init__(self, tokenizer, *, device: torch.device, min_size: int, max_size: int | None,
                 divisibility: int, max_query_len: int, pad_to_max: bool, batch_size: int,
                 workers: int, prefetch: int = 2, window: int = 4,
                 resize_at: ResizeAt = ResizeAt.DEVICE,
                 decode: Callable[..., DecodedImage] = decode_for_device):
        if batch_size < 1 or workers < 1 or prefetch < 1 or window < 1:
            raise ValueError("TeacherFeed: batch_size, workers, prefetch and window must be >= 1")
        self.tokenizer = tokenizer
        self.device = device
        self.min_size, self.max_size, self.divisibility = min_size, max_size, divisibility
        self.max_query_len, self.pad_to_max = max_query_len, pad_to_max
        self.batch_size, self.workers, self.prefetch, self.window = batch_size, workers, prefetch, window
        self.resize_at = resize_at
        self.decode = decode
        self.stats = FeedStats()
        self.errors: dict[int, Exception] = {}
        self._lock = threading.Lock()
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None

    # ---------------------------------------------------------------------------- CPU side
    def _decode(self, item: FeedItem) -> tuple[int, DecodedImage | Exception]:
        start = time.thread_time()
        try:
            out: DecodedImage | Exception = self.decode(item.image, self.min_size, self.max_size, self.resize_at)
        except Exception as exc:  # noqa: BLE001 - a bad image is that sample's error, not the shard's
            out = exc
        with self._lock:
            self.stats.cpu_s += time.thread_time() - start
        return item.index, out

    def _collate(self, items: dict[int, FeedItem], decoded: list[tuple[int, DecodedImage]]) -> FeedBatch:
        indices = [i for i, _ in decoded]
        images = [d for _, d in decoded]
        enc, maps = prompt_positive_maps(self.tokenizer, [items[i].prompt for i in indices],
                                         self.max_query_len, self.pad_to_max)
        total = sum(d.pixels.size for d in images)
        flat = torch.empty(total, dtype=torch.uint8, pin_memory=self._cuda)
        view, offset = flat.numpy(), 0
        for d in images:
            n = d.pixels.size
            view[offset:offset + n] = d.pixels.reshape(-1)
            offset += n
        batch = FeedBatch(indices, flat, [d.pixels.shape[:2] for d in images], [d.resized for d in images],
                          [d.original for d in images], enc["input_ids"], enc["attention_mask"], list(maps))
        if self._cuda:
            with torch.cuda.stream(self._stream):
                batch.pixels = flat.to(self.device, non_blocking=True)
                batch.input_ids = batch.input_ids.pin_memory().to(self.device, non_blocking=True)
                batch.attention_mask = batch.attention_mask.pin_memory().to(self.device, non_blocking=True)
                batch.positive_maps = [m.pin_memory().to(self.device, non_blocking=True) for m in maps]
                batch.event = torch.cuda.Event()
                batch.event.record(self._stream)
        self.stats.batches += 1
        self.stats.images += len(images)
        self.stats.real_pixels += sum(h * w for h, w in batch.resized)
        self.stats.padded_pixels += padded_area(batch.resized, self.divisibility)
        return batch

    def _produce(self, items: Iterable[FeedItem], out: queue.Queue, stop: threading.Event) -> None:
        """The feed thread: decode ahead on the pool, group a window, collate, queue."""
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="teacher-decode") as pool:
                pending: deque[tuple[FeedItem, Future]] = deque()
                span = self.window * self.batch_size
                source = iter(items)
                exhausted = False
                while not stop.is_set():
                    while not exhausted and len(pending) < 2 * span:     # keep the pool busy
                        item = next(source, None)
                        if item is None:
                            exhausted = True
                            break
                        pending.append((item, pool.submit(self._decode, item)))
                    if not pending:
                        break
                    # the first window is one batch, so the device starts as soon as it can
                    take = self.batch_size if self.stats.batches == 0 else span
                    window = [pending.popleft() for _ in range(min(take, len(pending)))]
                    start = time.thread_time()
                    items_by_index, decoded = {}, []
                    for item, future in window:
                        index, result = future.result()
                        items_by_index[index] = item
                        if isinstance(result, Exception):
                            self.errors[index] = result
                            self.stats.decode_errors += 1
                        else:
                            decoded.append((index, result))
                    groups = group_by_shape(decoded, self.batch_size)
                    self.stats.cpu_s += time.thread_time() - start
                    for group in groups:
                        start = time.thread_time()
                        batch = self._collate(items_by_index, [decoded[p] for p in group])
                        self.stats.cpu_s += time.thread_time() - start
                        while not stop.is_set():
                            try:
                                out.put(batch, timeout=0.1)
                                break
                            except queue.Full:
                                continue
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            out.put(exc)
            return
        out.put(_END)

    # ------------------------------------------------------------------------ device side
    def batches(self, items: Iterable[FeedItem]) -> Iterator[FeedBatch]:
        """Batches in the order they are ready; each is already on (its way to) the device."""
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(items, out, stop), name="teacher-feed",
                                  daemon=True)
        thread.start()
        try:
            while True:
                batch = out.get()
                if batch is _END:
                    return
                if isinstance(batch, BaseException):
                    raise batch
                yield batch.ready()
        finally:
            stop.set()
            while thread.is_alive():           # unblock a producer waiting on a full queue
                try:
                    out.get(timeout=0.05)
                except queue.Empty:
                    pass
            thread.join()


def as_feed_items(images: list, prompts: list[Prompt]) -> Iterator[FeedItem]:
    return (FeedItem(i, image, prompt) for i, (image, prompt) in enumerate(zip(images, prompts)))


__all__ = ["FeedBatch", "FeedItem", "FeedStats", "TeacherFeed", "as_feed_items", "group_by_shape",
           "padded_area"]
