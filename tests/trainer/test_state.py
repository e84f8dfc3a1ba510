"""The trainer's state on storage (``trainer/state.py``): atomic checkpoints, the latest pointer
and pruning, a writer killed mid-write, checkpoints and metrics on an object-store path."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from trainer.state import CheckpointStore, read_metrics

REPO = Path(__file__).resolve().parents[2]


def test_checkpoint_store_pointer_pruning_and_failed_writes(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=2)
    assert store.latest() is None and store.load() is None
    for step in (5, 10, 15):
        store.save(step, {"step": step, "w": torch.full((4,), float(step))}, info={"world_size": 2})
    assert [n for _, n in store.checkpoints()] == ["step_00000010.pt", "step_00000015.pt"]
    assert store.pointer() == {"checkpoint": "step_00000015.pt", "step": 15, "world_size": 2}
    assert store.load()["w"][0].item() == 15.0

    def broken(obj, fh):                      # dies half-way through writing
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    original = torch.save
    torch.save = broken
    try:
        with pytest.raises(OSError, match="disk full"):
            store.save(20, {"step": 20})
    finally:
        torch.save = original
    assert store.latest() == "step_00000015.pt" and store.pointer()["step"] == 15
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint_latest", "step_00000010.pt",
                                                            "step_00000015.pt"]


def test_a_killed_writer_leaves_only_complete_checkpoints(tmp_path):
    """SIGKILL a process while it writes 128 MB checkpoints: every file under a final name is
    complete, and the half-written one lies under a temporary name."""
    script = textwrap.dedent(f"""
        import torch
        from trainer.state import CheckpointStore
        store = CheckpointStore({str(tmp_path)!r}, keep=2)
        for step in range(1, 1000):
            store.save(step, {{"step": step, "w": torch.full((32, 1024, 1024), float(step))}})
    """)
    folder = tmp_path / "checkpoints"
    for attempt in range(5):           # until the kill lands while a checkpoint is being written
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            names = os.listdir(folder) if folder.exists() else []
            if any(n.endswith(".tmp") for n in names) and sum(n.endswith(".pt") for n in names) >= 2:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        if any(n.endswith(".tmp") for n in os.listdir(folder)):
            break
    else:
        pytest.fail("the kill never landed during a write")
    store = CheckpointStore(str(tmp_path), keep=2)
    complete = store.checkpoints()
    assert len(complete) >= 2
    for step, name in complete:
        payload = torch.load(folder / name, weights_only=True)
        assert payload["step"] == step and payload["w"][-1, -1, -1].item() == float(step)
    assert store.load()["step"] == complete[-1][0]
    assert store.remove_stale_temporaries() >= 1
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]


def test_checkpoints_and_metrics_on_an_object_store_path():
    """A non-local fsspec output (``memory://``) takes the upload code paths."""
    import fsspec

    from trainer.state import MetricsLog, write_json

    fs = fsspec.filesystem("memory")
    root = "memory://train-test-run"
    store = CheckpointStore(root, keep=1)
    for step in (2, 4):
        store.save(step, {"step": step, "w": torch.ones(3) * step}, info={"world_size": 1})
    assert [n for _, n in store.checkpoints()] == ["step_00000004.pt"]
    assert store.load()["w"].tolist() == [4.0, 4.0, 4.0] and store.pointer()["step"] == 4
    assert not [p for p in fs.find("/train-test-run") if p.endswith(".tmp")]

    log = MetricsLog(root)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step, "keys": [["a"]]})
    log.sync()
    assert [r["step"] for r in read_metrics(root)] == [1, 2, 3]
    log.close()
    assert fs.find("/train-test-run/tensorboard"), "TensorBoard events were not uploaded"
    resumed = MetricsLog(root, resume_step=2)              # a resume from step 2 forgets step 3
    resumed.write({"step": 3, "loss": 0.25})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(root)] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    write_json(root, "train_summary.json", {"step": 3})
    assert json.loads(fs.cat("/train-test-run/train_summary.json")) == {"step": 3}
    fs.rm("/train-test-run", recursive=True)
