"""Errors at the door: every command refuses bad inputs before any work, with one line naming the
key, the file and the fix, exit code 2, and nothing created."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from synth.training import write_training_mixture

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "configs" / "train" / "tiny_mixture.yaml"
RUN = REPO / "configs" / "pipeline" / "noun_phrases.yaml"


class Payload:
    """Something only full unpickling can rebuild (a class of this module)."""


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    return write_training_mixture(tmp_path_factory.mktemp("mix"), n_coco=8, n_mdetr=8, n_pseudo=4)


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    path = tmp_path_factory.mktemp("evil") / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": Payload()}, path)
    return path


def one_error(capsys, argv: list[str]) -> str:
    """Run the CLI; assert exit 2 and one stderr line; return that line."""
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith(f"pipeline {argv[0]}: error: "), err
    return err[0]


def train_argv(mix, out, *overrides) -> list[str]:
    return ["train", str(TRAIN), f"output={out}", f"data.sources.o365.annotations={mix.coco_annotations}",
            f"data.sources.o365.image_root={mix.coco_images}",
            f"data.sources.goldg.annotations={mix.mdetr_annotations}",
            f"data.sources.goldg.image_root={mix.mdetr_images}", f"data.sources.cc.shards=[{mix.root}/pseudo/*.tar]",
            "max_iter=1", *overrides]


def test_run_with_a_missing_teacher_checkpoint_stops_before_ray(tmp_path, capsys, monkeypatch):
    import ray
    started = []                      # Ray may be up already (an earlier test's session): watch init
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append(1))
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w"):
        pass
    out = tmp_path / "out"
    line = one_error(capsys, ["run", str(RUN), f"input.shards=[{shard}]", f"output.path={out}",
                              "stages.pseudo_label.checkpoint=/nonexistent"])
    assert "stages.pseudo_label.checkpoint: /nonexistent does not exist" in line and "save_pretrained" in line
    assert not out.exists() and not started


def test_run_min_score_alone_names_the_empty_checkpoint(tmp_path, capsys):
    line = one_error(capsys, ["run", str(RUN), f"input.shards=[{tmp_path}/x.tar]", f"output.path={tmp_path}/o",
                              "stages.pseudo_label.min_score=0.4"])
    assert "pseudo_label.checkpoint is empty" in line and "is not PseudoLabelConfig" not in line


def test_train_image_root_one_folder_too_high(mix, tmp_path, capsys):
    out = tmp_path / "run"
    line = one_error(capsys, train_argv(mix, out, f"data.sources.o365.image_root={mix.coco_images.parent}"))
    assert "data.sources.o365.image_root:" in line and "sampled images" in line
    assert f"they are under {mix.coco_images}" in line
    assert not out.exists()


def test_train_span_past_the_caption(mix, tmp_path, capsys):
    data = json.loads(mix.mdetr_annotations.read_text())
    caption = data["images"][data["annotations"][3]["image_id"]]["caption"]
    data["annotations"][3]["tokens_positive"] = [[0, len(caption) + 5]]
    bad = tmp_path / "bad_mdetr.json"
    bad.write_text(json.dumps(data))
    out = tmp_path / "run"
    line = one_error(capsys, train_argv(mix, out, f"data.sources.goldg.annotations={bad}"))
    assert f"data.sources.goldg.annotations: {bad}: annotations[3].tokens_positive[0]" in line and "Fix:" in line
    assert not out.exists()


def test_train_unknown_category_id(mix, tmp_path, capsys):
    data = json.loads(mix.coco_annotations.read_text())
    data["annotations"][2]["category_id"] = 999
    bad = tmp_path / "bad_coco.json"
    bad.write_text(json.dumps(data))
    out = tmp_path / "run"
    line = one_error(capsys, train_argv(mix, out, f"data.sources.o365.annotations={bad}"))
    assert "annotations[2].category_id" in line and "999" in line and not out.exists()


def test_train_can_leave_a_source_out(mix, tmp_path):
    from pipeline.train import load_train_job
    cfg = load_train_job(TRAIN, train_argv(mix, tmp_path / "run", "data.sources.cc=null")[2:])
    assert list(cfg.data.sources) == ["o365", "goldg"]


def test_a_pickle_with_code_is_refused_in_predict_eval_and_train(mix, evil, tmp_path, capsys):
    image = next(mix.coco_images.iterdir())
    lines = [
        one_error(capsys, ["predict", str(image), "--checkpoint", str(evil), "--classes", "circle"]),
        one_error(capsys, ["eval", "kind=detection", f"checkpoint={evil}", f"annotations={mix.coco_annotations}",
                           f"image_root={mix.coco_images}", f"output={tmp_path}/eval"]),
        one_error(capsys, train_argv(mix, tmp_path / "run", "init=checkpoint", f"init_checkpoint={evil}")),
    ]
    for line in lines:
        assert "holds Python objects beyond tensors" in line and "If you trust the file, convert it" in line
        assert "Re-running `torch.load`" not in line and "Traceback" not in line
    assert not (tmp_path / "eval").exists() and not (tmp_path / "run").exists()


def test_eval_grounding_on_a_training_file_is_refused(mix, tiny_teacher, tmp_path, capsys):
    line = one_error(capsys, ["eval", "kind=grounding", f"checkpoint={tiny_teacher}",
                              f"annotations={mix.mdetr_annotations}", f"image_root={mix.mdetr_images}",
                              f"output={tmp_path}/eval"])
    assert "tokens_positive_eval" in line and "final_flickr_separateGT_val.json" in line
    assert not (tmp_path / "eval").exists()


def test_checkpoint_checks(tmp_path, tiny_teacher):
    from core.config import ConfigError
    from pipeline.preflight import check_checkpoint

    check_checkpoint(str(tiny_teacher), "checkpoint")                     # ours: fine
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=r"checkpoint: .*notes\.pth is not a torch checkpoint"):
        check_checkpoint(str(text), "checkpoint")
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"has no model\.safetensors"):
        check_checkpoint(str(half), "stages.pseudo_label.checkpoint")


def test_selftrain_with_a_bad_world_override_creates_nothing(tmp_path, capsys):
    workdir = tmp_path / "selftrain"
    line = one_error(capsys, ["selftrain", str(REPO / "configs" / "demo.yaml"), f"workdir={workdir}",
                              "world_overrides=[bogus=1]"])
    assert "unknown key bogus" in line and not workdir.exists()
