"""The device side of the teacher: a fed batch -> the network's outputs, with OOM back-off.

``DeviceRunner.infer`` resizes, normalises and pads the batch's uint8 pixels on the device
(``model.transforms.device_batch``), runs the network in the configured precision and returns
its outputs per row range with a CUDA event that marks them done. A CUDA out-of-memory error
halves the rows and retries them (and later batches run at that size): the padded input does
not change, so every image's outputs are those of an unfailed run up to the kernels' rounding.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from core.device import Precision, autocast
from model.config import InputConfig
from model.transforms import device_batch


class DeviceRunner:
    def __init__(self, forward: Callable, device: torch.device, precision: Precision, input_cfg: InputConfig,
                 batch_size: int, channels_last: bool = False):
        self.forward = forward
        self.device, self.precision, self.input_cfg = device, precision, input_cfg
        self.batch_size, self.channels_last = batch_size, channels_last
        self.oom_rows: int | None = None      # rows per forward after a CUDA out-of-memory error
        self.oom_retries = 0
        # on the device once: a per-batch host-to-device copy of them would wait for the GPU
        self.mean = torch.tensor(input_cfg.pixel_mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(input_cfg.pixel_std, dtype=torch.float32, device=device)

    def forward_rows(self, images: torch.Tensor, batch, rows: range) -> list[tuple[range, dict]]:
        """The network over ``rows`` of a batch, at most ``oom_rows`` at a time."""
        limit = self.batch_size if self.oom_rows is None else self.oom_rows
        if len(rows) > limit:
            cut = rows.start + limit
            return (self.forward_rows(images, batch, range(rows.start, cut))
                    + self.forward_rows(images, batch, range(cut, rows.stop)))
        sl = slice(rows.start, rows.stop)
        try:
            with autocast(self.device, self.precision):
                out = self.forward(images[sl], batch.resized[sl], batch.input_ids[sl], batch.attention_mask[sl])
            return [(rows, out)]
        except torch.cuda.OutOfMemoryError:
            if len(rows) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.oom_rows = max(1, len(rows) // 2)
            self.oom_retries += 1
            return self.forward_rows(images, batch, rows)

    def infer(self, batch) -> tuple[list[tuple[range, dict]], Any]:
        """A ``FeedBatch`` on the device -> (outputs per row range, CUDA event or None on CPU)."""
        cfg = self.input_cfg
        images = device_batch(batch.pixels, batch.shapes, batch.resized, self.mean, self.std, cfg.size_divisibility)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        parts = self.forward_rows(images, batch, range(len(batch.indices)))
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return parts, event
