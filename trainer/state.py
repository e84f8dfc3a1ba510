"""What the student trainer keeps on storage: atomic checkpoints, metrics JSONL and TensorBoard.

Layout under the run's output (a local folder or an fsspec URL, e.g. ``s3://bucket/runs/t1``)::

    OUTPUT/checkpoints/step_00001000.pt    model, optimizer, step, scaler, EMA, data position, RNG
    OUTPUT/checkpoints/checkpoint_latest   JSON pointer: {"checkpoint", "step", "world_size", ...}
    OUTPUT/metrics.jsonl                   one JSON object per logged step (and per evaluation); each
                                           step's ``data`` holds the per-source sample accounting
                                           (``trainer.data.accounting``: read, used, skipped, boxes)
    OUTPUT/tensorboard/                    the same scalars as TensorBoard events
    OUTPUT/train_config.json               the run's config (storage_options redacted)
    OUTPUT/train_summary.json              written at the end: final step, loss, exported models
    OUTPUT/model/, OUTPUT/model_ema/       the trained weights (``model.checkpoint.save_pretrained``)

A checkpoint file is never visible half-written: locally it is written under a hidden temporary
name in the same folder, flushed to disk and renamed (atomic on POSIX); on an object store it is
written to a local temporary file and uploaded to its final name, and an object becomes visible
only when its upload completes. The pointer is written (the same way) after the file, and older
checkpoints are pruned after the pointer. Temporaries of a killed run are removed on the next
start. ``CheckpointStore.latest()`` takes the newest complete checkpoint: the pointer's, or a
newer file if a run died between writing a checkpoint and its pointer.

Checkpoints are loaded with ``torch.load(weights_only=True)``: everything in them is tensors and
plain Python values (RNG states included, see ``rng_state``).

Metrics: ``MetricsLog`` appends JSON lines and writes TensorBoard scalars with
``torch.utils.tensorboard`` when it imports (it needs the ``tensorboard`` package), else
``tensorboardX`` (a Ray dependency), else none. On resume it first drops the lines (and events)
after the checkpoint's step, so a killed-and-resumed run has the log of an uninterrupted one.
For object-store outputs both are staged in a local folder and uploaded by ``sync()``.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
from typing import Any

import fsspec
import numpy as np
import torch

from core.storage import Folder, join

__all__ = ["CheckpointStore", "MetricsLog", "read_metrics", "write_json", "rng_state", "set_rng_state", "LATEST"]

log = logging.getLogger(__name__)

LATEST = "checkpoint_latest"
_NAME = re.compile(r"^step_(\d{8,})\.pt$")


def write_json(output: str, name: str, obj: Any, storage_options: dict | None = None) -> None:
    """``OUTPUT/name`` = ``obj`` as indented JSON, written atomically."""
    Folder(output, storage_options).write_json(name, obj)


# ------------------------------------------------------------------------------------ checkpoints
class CheckpointStore:
    """``OUTPUT/checkpoints``: ``save(step, payload)``, ``latest()``, ``load(name)``."""

    def __init__(self, output: str, storage_options: dict | None = None, keep: int = 2):
        if keep < 0:
            raise ValueError(f"keep_checkpoints must be >= 0 (0 keeps all), got {keep}")
        self.folder = Folder(join(output, "checkpoints"), storage_options)
        self.keep = keep

    @staticmethod
    def name(step: int) -> str:
        return f"step_{step:08d}.pt"

    def checkpoints(self) -> list[tuple[int, str]]:
        """Complete checkpoints as (step, file name), oldest first."""
        found = [(int(m[1]), n) for n in self.folder.names() if (m := _NAME.match(n))]
        return sorted(found)

    def pointer(self) -> dict | None:
        return self.folder.read_json(LATEST, fix="move it away and resume again")

    def latest(self) -> str | None:
        """The file name of the newest complete checkpoint, or None."""
        found = self.checkpoints()
        pointer = self.pointer()
        if pointer is not None and (pointer.get("step"), pointer.get("checkpoint")) not in found:
            log.warning("%s/%s names %s, which is missing; using the newest file instead",
                        self.folder.url, LATEST, pointer.get("checkpoint"))
        return found[-1][1] if found else None

    def remove_stale_temporaries(self) -> int:
        """Delete the ``.*.tmp`` files a killed run left behind (local folders); returns how many."""
        if not self.folder.local:
            return 0
        stale = [n for n in self.folder.names() if n.startswith(".") and n.endswith(".tmp")]
        for n in stale:
            self.folder.remove(n)
        return len(stale)

    def save(self, step: int, payload: dict[str, Any], info: dict[str, Any] | None = None) -> str:
        """Write ``payload`` (``torch.save``-able, tensors and plain values) as step ``step``, then
        the pointer (with ``info``), then prune; returns the file name."""
        name = self.name(step)
        self.folder.write_with(name, lambda fh: torch.save(payload, fh))
        pointer = {"checkpoint": name, "step": int(step), **(info or {})}
        self.folder.write_bytes(LATEST, (json.dumps(pointer, indent=2, sort_keys=True) + "\n").encode())
        if self.keep:
            for _, old in self.checkpoints()[:-self.keep]:
                self.folder.remove(old)
        return name

    def load(self, name: str | None = None) -> dict[str, Any] | None:
        """The payload of ``name`` (default: ``latest()``), or None when there is no checkpoint."""
        name = name or self.latest()
        if name is None:
            return None
        import pickle

        from model.checkpoint import untrusted_checkpoint_error
        try:
            if self.folder.local:
                return torch.load(self.folder.path(name), map_location="cpu", weights_only=True)
            data = self.folder.read_bytes(name)
            if data is None:
                raise FileNotFoundError(f"checkpoint {self.folder.url}/{name} does not exist")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise untrusted_checkpoint_error(f"{self.folder.url}/{name}", exc) from None


# ------------------------------------------------------------------------------------ RNG states
def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) global RNG states, as plain values and tensors."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------ metrics
def _summary_writer(log_dir: str, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            return None
    return SummaryWriter(log_dir, purge_step=purge_step)


def _scalars(record: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update(_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = float(value)
    return out


class MetricsLog:
    """``OUTPUT/metrics.jsonl`` + ``OUTPUT/tensorboard``; ``resume_step`` truncates both to it."""

    def __init__(self, output: str, storage_options: dict | None = None, resume_step: int | None = None,
                 tensorboard: bool = True):
        self.out = Folder(output, storage_options)
        self.out.ensure()
        self._stage = None if self.out.local else tempfile.mkdtemp(prefix="glip-train-metrics-")
        base = self.out.root if self.out.local else self._stage
        self.path = os.path.join(base, "metrics.jsonl")
        self.tb_dir = os.path.join(base, "tensorboard")
        lines: list[str] = []
        if resume_step is not None:
            data = self.out.read_bytes("metrics.jsonl")
            for line in (data or b"").decode().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        lines.append(line)
                except json.JSONDecodeError:
                    continue                # a line cut by a kill
        elif not self.out.local:
            shutil.rmtree(self.tb_dir, ignore_errors=True)
        with open(self.path + ".tmp", "w") as fh:
            fh.writelines(line + "\n" for line in lines)
        os.replace(self.path + ".tmp", self.path)
        if resume_step is None and self.out.local:
            shutil.rmtree(self.tb_dir, ignore_errors=True)
        self._fh = open(self.path, "a", buffering=1)
        self.writer = _summary_writer(self.tb_dir, None if resume_step is None else resume_step + 1) \
            if tensorboard else None

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record, sort_keys=True, allow_nan=True) + "\n")
        if self.writer is not None:
            step = int(record.get("step", 0))
            for key, value in _scalars(record).items():
                self.writer.add_scalar(key, value, step)

    def sync(self) -> None:
        """Flush; for object-store outputs upload the JSONL and the TensorBoard folder."""
        self._fh.flush()
        if self.writer is not None:
            self.writer.flush()
        if self._stage is not None:
            self.out.fs.put_file(self.path, self.out.path("metrics.jsonl"))
            if os.path.isdir(self.tb_dir):
                self.out.fs.put(self.tb_dir, self.out.path("tensorboard"), recursive=True)

    def close(self) -> None:
        self.sync()
        self._fh.close()
        if self.writer is not None:
            self.writer.close()
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)


def read_metrics(output: str, storage_options: dict | None = None) -> list[dict]:
    """The records of ``OUTPUT/metrics.jsonl`` (for reports and tests)."""
    with fsspec.open(join(output, "metrics.jsonl"), "r", **(storage_options or {})) as fh:
        return [json.loads(line) for line in fh if line.strip()]
