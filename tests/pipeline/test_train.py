"""``pipeline train`` on Ray Train: 2 CPU workers (DDP over gloo) on a generated mixture of COCO
detection, MDETR grounding and pseudo-labelled shards; SIGKILL after the first checkpoint, then
``--resume`` continues exactly (same step, lr, data position, losses); config errors before Ray."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core import config as typed_config
from model.language import build_tokenizer
from core.config import ConfigError
from pipeline import api
from pipeline.cli import main
from pipeline.train import Launcher, TrainJobConfig, _launcher, load_train_job
from synth.training import write_training_mixture
from trainer.solver import lr_factor
from trainer.config import model_config, resume_config
from trainer.data.sources import TrainStream
from trainer.state import CheckpointStore, read_metrics

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "train" / "tiny_mixture.yaml"
MAX_ITER, CHECKPOINT_EVERY = 12, 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    return write_training_mixture(tmp_path_factory.mktemp("mixture"), n_coco=16, n_mdetr=16, n_pseudo=16)


def overrides(mix, output) -> list[str]:
    return [f"data.sources.o365.annotations={mix.coco_annotations}",
            f"data.sources.o365.image_root={mix.coco_images}",
            f"data.sources.goldg.annotations={mix.mdetr_annotations}",
            f"data.sources.goldg.image_root={mix.mdetr_images}",
            f"data.sources.cc.shards=[{mix.root}/pseudo/*.tar]",
            f"output={output}", f"max_iter={MAX_ITER}", f"checkpoint_every={CHECKPOINT_EVERY}", "log_every=1",
            "warmup_iters=2", "lr=0.001", "batch_size=4", "ray.num_workers=2", "ray.launcher=ray",
            "data.prefetch_batches=1", "progress=false"]


def test_config_errors_stop_before_any_work(mixture, tmp_path, capsys):
    cfg = load_train_job(CONFIG, overrides(mixture, tmp_path / "a"))
    assert isinstance(cfg, TrainJobConfig) and cfg.ray.num_workers == 2 and cfg.batch_size == 4
    assert _launcher(cfg) is Launcher.RAY
    assert _launcher(load_train_job(CONFIG, overrides(mixture, tmp_path) + ["ray.num_workers=1",
                                                                          "ray.launcher=auto"])) \
        is Launcher.IN_PROCESS
    with pytest.raises(ConfigError, match="not divisible by ray.num_workers"):
        load_train_job(CONFIG, overrides(mixture, tmp_path) + ["batch_size=5"])
    with pytest.raises(ConfigError, match=r"data\.sources\.o365\.annotations: .*nope\.json does not exist"):
        api.train(CONFIG, overrides(mixture, tmp_path) + [f"data.sources.o365.annotations={tmp_path}/nope.json"])
    with pytest.raises(ConfigError, match=r"data\.sources\.cc\.shards: .*matches no file"):
        api.train(CONFIG, overrides(mixture, tmp_path) + [f"data.sources.cc.shards=[{tmp_path}/none/*.tar]"])
    # an output holding checkpoints is never trained over from scratch; a resume needs its worker count
    CheckpointStore(str(tmp_path / "old")).save(4, {"step": 4}, info={"world_size": 2})
    assert main(["train", str(CONFIG), *overrides(mixture, tmp_path / "old")]) == 2
    assert "already holds checkpoints (newest: step_00000004.pt); pass --resume" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="written by 2 workers; resume with ray.num_workers=2"):
        api.train(CONFIG, overrides(mixture, tmp_path / "old") + ["ray.num_workers=1", "batch_size=2"],
                  resume=True)
    CheckpointStore(str(tmp_path / "old")).save(
        8, {"step": 8}, info={"world_size": 2, "resume_config": resume_config(cfg)})
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's \(seed: 0 in the checkpoint, 3 now\)"):
        api.train(CONFIG, overrides(mixture, tmp_path / "old") + ["seed=3"], resume=True)


def test_one_worker_runs_in_process_through_the_cli_with_the_eval_hook(mixture, tmp_path, capsys):
    out = tmp_path / "single"
    eval_yaml = tmp_path / "coco_eval.yaml"
    eval_yaml.write_text(f"kind: detection\nannotations: {mixture.coco_annotations}\nimage_root: "
                         f"{mixture.coco_images}\nmax_images: 4\nbatch_size: 2\n"
                         "model_overrides: [input.min_size_test=128, input.max_size_test=192]\n")
    code = main(["train", str(CONFIG), *overrides(mixture, out), "ray.num_workers=1", "ray.launcher=auto",
                 "batch_size=2", "max_iter=2", "checkpoint_every=2", "ema_decay=0", "eval.every=2",
                 f"eval.configs=[{eval_yaml}]"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "steps       0 -> 2 (in_process, 1 worker(s)" in printed and f"model       {out}/model" in printed
    records = read_metrics(str(out))
    assert [r["step"] for r in records] == [1, 2, 2]
    assert 0.0 <= records[-1]["eval"]["coco_eval"]["AP"] <= 1.0
    assert (out / "eval" / "step_00000002" / "coco_eval_metrics.json").is_file()
    assert CheckpointStore(str(out)).pointer()["world_size"] == 1
    assert not (out / "model_ema").exists() and (out / "model" / "model.safetensors").is_file()


def _expected_keys(mix, output) -> list[list[list[str]]]:
    """The batches an uninterrupted 2-worker run draws: per step, per worker, its sample keys
    (the data stream alone decides them; no batch of this mixture is skipped)."""
    cfg = load_train_job(CONFIG, overrides(mix, output))
    mcfg = model_config(cfg)
    tok = build_tokenizer(mcfg.language.tokenizer)
    streams = [TrainStream(cfg.data, mcfg, tok, batch_size=2, seed=cfg.seed, rank=r, world_size=2) for r in range(2)]
    return [[s.next_batch()["keys"] for s in streams] for _ in range(MAX_ITER)]


@pytest.mark.slow
def test_two_ray_workers_train_and_resume_exactly_after_sigkill(mixture, tmp_path, kill_tree):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline.cli", "train", str(CONFIG), *overrides(mixture, out)]
    log_path = tmp_path / "first.log"
    t0 = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    store = CheckpointStore(str(out))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    before_kill: list[dict] = []
    pointer = None
    while time.time() < deadline and proc.poll() is None:
        pointer = store.pointer() if (out / "checkpoints" / "checkpoint_latest").exists() else None
        if pointer is not None and metrics.exists():
            lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.endswith("}")]
            if lines and lines[-1]["step"] > pointer["step"]:
                before_kill = lines                    # with the killed run's records past its checkpoint
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + log_path.read_text()[-3000:]
    kill_tree(proc)
    first_seconds = time.time() - t0
    killed_at = pointer["step"]
    assert pointer["world_size"] == 2 and killed_at < MAX_ITER and before_kill[-1]["step"] > killed_at

    # only complete checkpoints under final names (a write cut by the kill lies under a .tmp name)
    folder = out / "checkpoints"
    for step, name in store.checkpoints():
        payload = torch.load(folder / name, weights_only=True, mmap=True)
        assert payload["step"] == step and len(payload["data"]) == 2 and len(payload["rng"]) == 2
        assert payload["model"].keys() == payload["ema"]["state"].keys()
    assert all(n.startswith((".", "step_", "checkpoint_latest")) for n in os.listdir(folder))

    t1 = time.time()
    result = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    print(f"first run until the kill {first_seconds:.0f} s, resumed run {time.time() - t1:.0f} s")
    start = store.checkpoints()[-1][0]
    assert f"steps       {killed_at} -> {MAX_ITER} (ray, 2 worker(s)" in result.stdout

    records = read_metrics(str(out))
    assert [r["step"] for r in records] == list(range(1, MAX_ITER + 1))
    assert all(math.isfinite(r["loss"]) and r["img_per_s"] > 0 for r in records)
    for line in records:
        print(f"step {line['step']:3d} loss {line['loss']:.4f} lr {line['lr']:.2e} "
              f"img/s {line['img_per_s']:.2f} {line['keys']}")
    # the schedule, and the data an uninterrupted run reads, step by step, on both workers
    cfg = load_train_job(CONFIG, overrides(mixture, out))
    assert [r["lr"] for r in records] == pytest.approx([cfg.lr * lr_factor(s, cfg) for s in range(MAX_ITER)])
    assert [r["keys"] for r in records] == _expected_keys(mixture, out)
    assert not set(records[0]["keys"][0]) & set(records[0]["keys"][1])
    # the steps the killed run had done past its checkpoint were redone identically
    redone = [r for r in before_kill if r["step"] > killed_at]
    assert redone
    for old in redone:
        new = records[old["step"] - 1]
        assert (new["keys"], new["lr"]) == (old["keys"], old["lr"])
        for key in ("loss", "loss_token", "loss_reg", "loss_centerness", "grad_norm"):
            assert new[key] == pytest.approx(old[key], rel=1e-5, abs=1e-6), (old["step"], key)
    # the loss falls
    first, last = [r["loss"] for r in records[:3]], [r["loss"] for r in records[-3:]]
    assert sum(last) / 3 < 0.9 * sum(first) / 3, (first, last)

    assert start == MAX_ITER and not [n for n in os.listdir(folder) if n.endswith(".tmp")]
    for name in ("model", "model_ema"):
        assert (out / name / "model.safetensors").is_file()
    from model.checkpoint import load_pretrained
    trained = load_pretrained(out / "model")
    assert typed_config.to_dict(trained.cfg) == typed_config.to_dict(model_config(cfg))
