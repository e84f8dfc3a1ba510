"""Clean errors everywhere: one line ``pipeline <command>: error: ...`` for data, checkpoint and
storage errors (a traceback only with --debug), and failed shards / workers named by their root
cause without ANSI codes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import ConfigError
from pipeline.cli import main
from synth.training import write_training_mixture

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "configs" / "train" / "tiny_mixture.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


def actor_died_in_a_write_task():
    """What ``ray.get`` raised in the issue: a write task whose stage actor died in its creation
    task, with Ray's ANSI-coloured process titles."""
    from ray.exceptions import ActorDiedError, RayTaskError
    creation = RayTaskError("StageWorker.__init__", 'Traceback (most recent call last):\n  File "x.py", line 1\n'
                            "FileNotFoundError: checkpoint /nonexistent does not exist",
                            FileNotFoundError("checkpoint /nonexistent does not exist"),
                            proctitle="ray::StageWorker.__init__()", pid=5, ip="10.0.0.1")
    died = ActorDiedError(creation)
    return RayTaskError("write_shard", "\x1b[36mray::write_shard()\x1b[39m (pid=1, ip=10.0.0.1)\n  " + str(died),
                        died).as_instanceof_cause()


def test_root_cause_of_a_failed_shard():
    from pipeline.errors import root_cause
    exc = actor_died_in_a_write_task()
    assert "\x1b" in str(exc)
    assert root_cause(exc) == "FileNotFoundError: checkpoint /nonexistent does not exist"
    assert root_cause(ValueError("plain")) == "ValueError: plain"


def test_a_failed_shard_line_has_no_ansi_codes():
    from pipeline.api import format_summary
    from pipeline.runner import RunSummary
    summary = RunSummary(output="out", shards_total=1, shards_skipped=0, shards_done=0,
                         shards_failed={"00000": "RayTaskError: \x1b[36mray::write_shard()\x1b[39m died"})
    line = [l for l in format_summary(summary).splitlines() if l.startswith("FAILED")][0]
    assert "\x1b" not in line and "ray::write_shard() died" in line


def test_a_worker_failure_names_its_root_cause():
    from ray.train.v2.api.exceptions import WorkerGroupError

    from pipeline.errors import root_cause
    from trainer.data.accounting import MissingImagesError
    exc = WorkerGroupError("worker 0 failed: a long traceback ...",
                           {0: MissingImagesError("data.sources.o365: 5 of the 10 samples read so far have no image")})
    assert root_cause(exc) == "MissingImagesError: data.sources.o365: 5 of the 10 samples read so far have no image"


def test_missing_images_during_training_stop_with_one_line(tmp_path, capsys):
    mix = write_training_mixture(tmp_path / "mix", n_coco=12, n_mdetr=4, n_pseudo=2)
    data = json.loads(mix.coco_annotations.read_text())
    for image in data["images"][1::4]:                 # 3 of 12 missing: passes the sample, not the run
        (mix.coco_images / image["file_name"]).unlink()
    out = tmp_path / "run"
    rc = main(["train", str(TRAIN), f"output={out}", f"data.sources.o365.annotations={mix.coco_annotations}",
               f"data.sources.o365.image_root={mix.coco_images}", "data.sources.goldg=null", "data.sources.cc=null",
               "data.missing_image_min_read=8", "init=scratch", "max_iter=20", "batch_size=2", "progress=false",
               "ema_decay=0", "ray.num_workers=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("pipeline train: error: data.sources.o365: ") and "no image file" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_debug_shows_the_traceback(tmp_path, capsys):
    argv = ["run", str(REPO / "configs" / "pipeline" / "noun_phrases.yaml"), f"input.shards=[{tmp_path}/x.tar]",
            f"output.path={tmp_path}/o"]
    assert main(argv) == 2
    assert "pipeline run: error: input.shards" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        main(argv + ["--debug"])
