"""A smaller version of README's main command, end to end: world -> teacher -> pseudo labels ->
student -> evaluation of both -> REPORT.md (a few steps each: this checks the loop, not accuracy)."""
from __future__ import annotations

import json
import re

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
        "label_overrides=[\"stages.pseudo_label.model_overrides=[inference.score_threshold=0.0]\"]"])
    selftrain(cfg)
    report = (tmp_path / "REPORT.md").read_text()
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert list(results) == ["teacher", "control", "student"]
    for model in ("teacher", "control", "student"):
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
    assert (tmp_path / "loss.png").exists() and (tmp_path / "gallery" / "index.html").exists()
    # the pseudo labels are scored against the world's truth, and the report says so
    quality = json.loads((tmp_path / "results.json").read_text())["pseudo_quality"]
    stored = sum(quality[g]["boxes"] for g in ("rare", "common")) + quality["unmatched"]
    assert stored == label["boxes"]
    assert quality["rare"]["mentioned"] > 0 and "| rare |" in report
    # rerunning skips every finished step
    again = selftrain(cfg)
    assert all(again["timings"][f"train {name}"] < 5 for name in ("teacher", "control", "student"))
    assert "student − control" in report
    rerun_report = (tmp_path / "REPORT.md").read_text()
    for step in ("world", "train teacher", "pseudo-label web shards", "train control", "train student",
                 "evaluate teacher", "evaluate control", "evaluate student"):
        assert re.search(rf"- {step}: \d+ s \(output of an earlier run, reused\)", rerun_report), step
