"""A smaller version of README's main command, end to end: world -> teacher -> pseudo labels ->
student -> evaluation of both -> REPORT.md, for two rounds (the student of round 1 teaches round 2;
a few steps each: this checks the loop, not accuracy)."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest

from pipeline.selftrain import load_selftrain_config, selftrain

pytestmark = pytest.mark.slow


def test_the_whole_loop_runs_and_reports_real_numbers(ray_session, tmp_path):
    cfg = load_selftrain_config("configs/demo.yaml", [
        f"workdir={tmp_path}", "world=configs/world/test.yaml", "progress=false",
        "teacher_overrides=[max_iter=3, log_every=1]", "student_overrides=[max_iter=3, log_every=1]",
        # an untrained teacher scores ~0.01 everywhere: let its boxes through so the student
        # really reads pseudo labels in this short test
        "teacher_min_score=0.0", "student_min_score=0.0", "unlabelled_phrases=ignore", "pack_captions=2",
        "rounds=2", "noise_resamples=3",
        # the control again with another data-order seed: the spread of single trainings
        "control_repeats=1",
        # the oracle: the student's recipe on the web images' true boxes (synth.truth.write_oracle_shards)
        "oracle=true",
        # one pseudo sample added to every batch (demo.yaml's known_phrases: ignore skips the images
        # whose phrases all name detection classes: with a weight, 3 steps may draw none left)
        "pseudo_per_batch=1",
        # the bar read from the rare precision curve: no bar of a 3-step teacher reaches 100 %, so
        # the config's student_min_score (0.0) is used, and the report says why
        "score_bar=rare_precision", "rare_precision_target=1.0",
        "label_overrides=[\"stages.pseudo_label.model_overrides=[inference.score_threshold=0.0]\"]"])
    selftrain(cfg)
    report = (tmp_path / "REPORT.md").read_text()
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert list(results) == ["teacher", "control", "student", "oracle"]
    for model in ("teacher", "control", "student", "oracle"):
        ap = results[model]["detection"]["AP"]
        assert ap is not None and 0.0 <= ap <= 1.0
        assert f"{100 * ap:.1f}" in report
    label = json.loads((tmp_path / "pseudo" / "stats.json").read_text())
    assert label["read"] == label["kept"] + label["dropped"] and label["boxes"] > 0
    student_summary = json.loads((tmp_path / "student" / "train_summary.json").read_text())
    assert student_summary["step"] == 3
    sources = json.loads((tmp_path / "student" / "train_config.json").read_text())["data"]["sources"]
    assert sources["pseudo"]["unlabelled_phrases"] == "ignore" and sources["pseudo"]["min_score"] == 0.0
    assert sources["pseudo"]["weight"] == cfg.pseudo_weight and sources["detection"]["pack_captions"] is None
    assert sources["grounding"]["pack_captions"]["pack_random_caption_number"] == 2
    # student and control continue from the teacher's weights; the control never reads pseudo labels
    for name in ("student", "control"):
        config = json.loads((tmp_path / name / "train_config.json").read_text())
        assert config["init"] == "checkpoint" and config["init_checkpoint"].endswith("teacher/model")
    control_keys = [k for line in (tmp_path / "control" / "metrics.jsonl").read_text().splitlines()
                    for batch in json.loads(line).get("keys", []) for k in batch]
    assert control_keys and not any(k.startswith("pseudo/") for k in control_keys)
    # the student's mixture really drew pseudo-labelled samples
    keys = [k for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()
            for batch in json.loads(line).get("keys", []) for k in batch]
    assert any(k.startswith("pseudo/") for k in keys), keys
    # pseudo_per_batch: every student batch is the control's batch plus one pseudo sample, and the
    # pseudo boxes of the detection classes were left out (known_phrases: ignore)
    def batches(name):
        return [batch for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                for batch in json.loads(line).get("keys", [])]
    student_batches, control_batches = batches("student"), batches("control")
    assert len(student_batches) == len(control_batches) == 3
    for s, c in zip(student_batches, control_batches):
        assert s[:-1] == c and s[-1].startswith("pseudo/")
    assert sources["pseudo"]["known_phrases"] == "ignore" and "circle" in sources["pseudo"]["known_names"]
    assert student_summary["data"]["pseudo"]["boxes"]["known_class"] > 0
    # the oracle: the student's recipe (init, steps, mixture, bar) reading the true-box shards
    oracle = json.loads((tmp_path / "oracle" / "train_config.json").read_text())
    student = json.loads((tmp_path / "student" / "train_config.json").read_text())
    assert oracle["data"]["sources"]["pseudo"]["shards"] == [str(tmp_path / "oracle_pseudo" / "*.tar")]
    assert oracle["data"]["sources"]["pseudo"]["min_score"] == sources["pseudo"]["min_score"]
    assert oracle["init_checkpoint"] == student["init_checkpoint"] and oracle["max_iter"] == student["max_iter"] == 3
    oracle_batches = batches("oracle")
    assert len(oracle_batches) == 3 and all(batch[-1].startswith("pseudo/") for batch in oracle_batches)
    from pipeline.storage import iter_output_samples
    assert next(iter(iter_output_samples(str(next((tmp_path / "oracle_pseudo").glob("*.tar")))))).labeler["model"] == "oracle"
    assert re.search(r"\| metric \| teacher \| control \| student \| oracle \|.*\| oracle − control \|", report)
    assert "- oracle: the student trained on the world's true boxes" in report
    noise = json.loads((tmp_path / "results.json").read_text())["rounds"][0]["noise"]["pairs"]
    assert noise["oracle - control"]["AP"]["sd"] >= 0
    assert (tmp_path / "loss.png").exists() and (tmp_path / "gallery" / "index.html").exists()
    # the pseudo labels are scored against the world's truth, and the report says so
    quality = json.loads((tmp_path / "results.json").read_text())["pseudo_quality"]
    stored = sum(quality[g]["boxes"] for g in ("rare", "common")) + quality["unmatched"]
    assert stored == label["boxes"]
    assert quality["rare"]["mentioned"] > 0 and "| rare |" in report
    # round 2: its teacher is round 1's student (the same checkpoint bytes label the web again),
    # and its control and student continue from it
    rounds = json.loads((tmp_path / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[1]["label"]["read"] == rounds[0]["label"]["read"] == label["read"]   # every web shard, again
    one, two = rounds[0]["lineage"], rounds[1]["lineage"]
    assert two["teacher"]["sha256"] == one["student"]["sha256"] != one["teacher"]["sha256"]
    assert two["student"]["sha256"] not in (one["student"]["sha256"], two["teacher"]["sha256"])
    for name in ("student", "control"):
        config = json.loads((tmp_path / "round2" / name / "train_config.json").read_text())
        assert config["init_checkpoint"] == one["student"]["model"]
    labeler = next(iter(iter_output_samples(sorted(str(p) for p in (tmp_path / "round2" / "pseudo").glob("*.tar")))))
    assert labeler.labeler["checkpoint_sha256"] == one["student"]["sha256"]
    assert rounds[1]["results"]["teacher"]["detection"]["AP"] == rounds[0]["results"]["student"]["detection"]["AP"]
    assert "## Round 2" in report and one["student"]["sha256"][:16] in report
    # the summary of the rounds has the oracle's columns too
    assert "| round | teacher AP | control AP | student AP | oracle AP | teacher APr |" in report
    assert re.search(r"^\| 2 \|( [0-9.]+ \|){8}$", report, re.M)
    # the evaluation noise stands beside each difference, the score bar and the curve are reported
    assert rounds[0]["noise"]["resamples"] == 3 and rounds[0]["noise"]["pairs"]["student - control"]["AP"]["sd"] >= 0
    assert re.search(r"\| AP \|.*\(± \d+\.\d\)", report)
    assert "The student's score bar: 0**" in report and rounds[0]["score_bar"] == 0.0
    assert "the config's student_min_score" in rounds[0]["score_bar_why"]
    assert "Said plainly: this bar was chosen from the curve above" in report
    assert [row["bar"] for row in rounds[0]["quality"]["by_score"]][:2] == [0.0, 0.2]
    # the training spread: the control and one more with data-order seed 0 + 1000, both evaluated
    spread = rounds[0]["training_spread"]
    assert spread["seeds"] == {"control": 0, "control_seed1": 1000} and len(spread["AP"]["values"]) == 2
    repeat = json.loads((tmp_path / "control_seed1" / "train_config.json").read_text())
    control = json.loads((tmp_path / "control" / "train_config.json").read_text())
    assert repeat["seed"] == 1000 and control["seed"] == 0
    assert repeat["init_checkpoint"] == control["init_checkpoint"] and repeat["data"] == control["data"]
    assert batches("control_seed1") != control_batches
    assert "Training spread: the control trained 2 times, with data-order seeds 0, 1000" in report
    assert (tmp_path / "round2" / "control_seed1" / "model").exists()
    # rerunning skips every finished step, also from a workdir moved elsewhere (the old one gone:
    # the teachers are named by their bytes, the models found where they are now)
    moved = tmp_path.with_name(tmp_path.name + "_moved")
    shutil.move(str(tmp_path), str(moved))
    again = selftrain(dataclasses.replace(cfg, workdir=str(moved)))
    assert all(again["timings"][f"train {name}"] < 5 for name in ("teacher", "control", "student"))
    assert again["rounds"][1]["lineage"]["teacher"]["model"] == str(moved / "student" / "model")
    assert again["rounds"][1]["lineage"]["teacher"]["sha256"] == one["student"]["sha256"]
    assert "student − control" in report
    rerun_report = (moved / "REPORT.md").read_text()
    for step in ("world", "train teacher", "pseudo-label web shards", "train control", "train student",
                 "evaluate teacher", "evaluate control", "evaluate student",
                 "pseudo-label web shards (round 2)", "train student (round 2)", "evaluate student (round 2)",
                 "oracle shards", "train oracle", "evaluate oracle", "train oracle (round 2)",
                 "train control_seed1", "evaluate control_seed1"):
        assert re.search(rf"- {re.escape(step)}: \d+ s \(output of an earlier run, reused\)", rerun_report), step
