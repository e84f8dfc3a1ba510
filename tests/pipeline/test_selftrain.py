"""A smaller version of README's main command, end to end: world -> teacher -> pseudo labels ->
student -> evaluation of both -> REPORT.md (a few steps each: this checks the loop, not accuracy)."""
from __future__ import annotations

import json

import pytest

from pipeline.selftrain import load_selftrain_config, selftrain

pytestmark = pytest.mark.slow


def test_the_whole_loop_runs_and_reports_real_numbers(ray_session, tmp_path):
    cfg = load_selftrain_config("configs/demo.yaml", [
        f"workdir={tmp_path}", "world=configs/world/test.yaml", "progress=false",
        "teacher_overrides=[max_iter=3, log_every=1]", "student_overrides=[max_iter=3, log_every=1]",
        # an untrained teacher scores ~0.01 everywhere: let its boxes through so the student
        # really reads pseudo labels in this short test
        "teacher_min_score=0.0", "student_min_score=0.0",
        "label_overrides=[\"pseudo_label.model_overrides=[inference.score_threshold=0.0]\"]"])
    selftrain(cfg)
    report = (tmp_path / "REPORT.md").read_text()
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    for model in ("teacher", "student"):
        ap = results[model]["detection"]["AP"]
        assert ap is not None and 0.0 <= ap <= 1.0
        assert f"{100 * ap:.1f}" in report
    label = json.loads((tmp_path / "pseudo" / "stats.json").read_text())
    assert label["read"] == label["kept"] + label["dropped"] and label["boxes"] > 0
    student_summary = json.loads((tmp_path / "student" / "train_summary.json").read_text())
    assert student_summary["step"] == 3
    # the student's mixture really drew pseudo-labelled samples
    keys = [k for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()
            for batch in json.loads(line).get("keys", []) for k in batch]
    assert any(k.startswith("pseudo/") for k in keys), keys
    assert (tmp_path / "loss.png").exists() and (tmp_path / "gallery" / "index.html").exists()
    # rerunning skips every finished step
    again = selftrain(cfg)
    assert again["timings"]["train teacher"] < 5 and again["timings"]["train student"] < 5
