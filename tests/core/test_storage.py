"""The atomic-write folder shared by the trainer's checkpoints and the pipeline's outputs."""
from __future__ import annotations

import pytest

from pipeline.storage import OutputDir, StorageError
from core.storage import Folder
from trainer.state import LATEST, CheckpointStore


def test_json_round_trip_missing_and_stale_temporaries(tmp_path):
    folder = Folder(str(tmp_path / "out"))
    assert folder.read_json("a.json") is None and folder.names() == []
    folder.write_json("a.json", {"b": 1, "a": [1, 2]})
    assert folder.read_json("a.json") == {"a": [1, 2], "b": 1}
    (tmp_path / "out" / ".a.json.123.tmp").write_bytes(b"half")
    assert folder.remove_stale_temporaries() == 1 and folder.names() == ["a.json"]


def test_a_damaged_file_names_itself_and_the_fix(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"x\.json is not valid JSON .*: move it away and rerun"):
        Folder(str(tmp_path)).read_json("x.json")
    with pytest.raises(StorageError, match=r"x\.json is not valid JSON"):
        OutputDir(str(tmp_path)).read_json("x.json")
    store = CheckpointStore(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / LATEST).write_text("garbage")
    with pytest.raises(ValueError, match=rf"{LATEST} is not valid JSON .*move it away and resume again"):
        store.pointer()
