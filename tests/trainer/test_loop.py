"""The student trainer's pieces without Ray: config, official param groups and lr schedule, EMA,
the training stream over all three source kinds, one step's guards, and an in-process run that
resumes exactly (checkpoints and metrics on storage: ``test_state.py``)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from core import config as typed_config
from model.criterion import GLIPCriterion
from core.config import ConfigError
from pipeline.storage import iter_output_samples
from synth.training import write_training_mixture
from trainer.config import EvalHookConfig, TrainConfig, load_train_config, model_config
from trainer.solver import ModelEma, lr_factor, make_optimizer, param_groups
from trainer.step import StepStatus, train_step
from trainer.loop import WorkerContext, fit
from trainer.data.sources import TrainStream
from trainer.state import read_metrics

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "train" / "tiny_mixture.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    return write_training_mixture(tmp_path_factory.mktemp("mixture"), n_coco=16, n_mdetr=16, n_pseudo=16)


def source_overrides(mix) -> list[str]:
    return [f"data.sources.o365.annotations={mix.coco_annotations}",
            f"data.sources.o365.image_root={mix.coco_images}",
            f"data.sources.goldg.annotations={mix.mdetr_annotations}",
            f"data.sources.goldg.image_root={mix.mdetr_images}",
            f"data.sources.cc.shards=[{mix.root}/pseudo/*.tar]"]


def train_config(mix, output, *overrides: str) -> TrainConfig:
    data = typed_config.read_yaml(CONFIG)
    data.pop("ray")                                  # the pipeline's section, not TrainConfig's
    data = typed_config.merge_overrides(data, source_overrides(mix) + [f"output={output}", *overrides])
    return typed_config.from_dict(TrainConfig, data, source=str(CONFIG))


@pytest.fixture(scope="module")
def tiny_random(mixture):
    """A `tiny` GLIP with random weights (fast to build) and its model config."""
    torch.manual_seed(0)
    from model.glip import build_glip
    cfg = train_config(mixture, "/unused")
    return build_glip(model_config(cfg), load_weights=False)


# ------------------------------------------------------------------------------------ config
def test_config_yaml_overrides_and_errors(mixture, tmp_path):
    cfg = train_config(mixture, tmp_path, "data.sources.cc.min_score=0.7", "max_iter=50")
    assert list(cfg.data.sources) == ["o365", "goldg", "cc"]
    assert cfg.data.sources["cc"].min_score == 0.7 and cfg.data.sources["cc"].kind.value == "pseudo"
    assert cfg.data.sources["o365"].annotations == str(mixture.coco_annotations)
    assert cfg.data.sources["goldg"].pack_captions.pack_random_caption_number == 4
    # round trip through plain dicts (how the config reaches Ray Train workers)
    assert typed_config.from_dict(TrainConfig, typed_config.to_dict(cfg)) == cfg

    with pytest.raises(ConfigError, match=r"data\.sources\.o365\.kind.*'coco', 'mdetr', 'pseudo'"):
        train_config(mixture, tmp_path, "data.sources.o365.kind=voc")
    with pytest.raises(ConfigError, match=r"data\.sources\.goldg in \S*tiny_mixture\.yaml.*: annotations is empty"):
        train_config(mixture, tmp_path, "data.sources.goldg.annotations=")
    with pytest.raises(ConfigError, match=r"unknown key data\.sources\.cc\.min_scor"):
        train_config(mixture, tmp_path, "data.sources.cc.min_scor=0.3")
    with pytest.raises(ConfigError, match="steps must be increasing fractions"):
        train_config(mixture, tmp_path, "steps=[0.9, 0.5]")
    with pytest.raises(ConfigError, match="precision.*'fp32', 'bf16', 'fp16'"):
        train_config(mixture, tmp_path, "precision=fp8")
    with pytest.raises(ConfigError, match="init=checkpoint needs init_checkpoint"):
        train_config(mixture, tmp_path, "init=checkpoint")
    with pytest.raises(ConfigError, match="output is empty"):
        load_train_config(None, ["data.sources.x={kind: pseudo, shards: [a.tar]}"])


# ------------------------------------------------------------------------------------ data
def test_stream_mixes_all_sources_disjointly_and_resumes_exactly(mixture, tiny_random):
    cfg = train_config(mixture, "/unused", "data.prefetch_batches=0")
    mcfg, tok = tiny_random.cfg, tiny_random.tokenizer
    streams = [TrainStream(cfg.data, mcfg, tok, batch_size=2, seed=0, rank=r, world_size=2) for r in range(2)]
    batches = [[s.next_batch() for _ in range(6)] for s in streams]
    keys = [[k for b in bs for k in b["keys"]] for bs in batches]
    assert {k.split("/")[0] for ks in keys for k in ks} == {"o365", "goldg", "cc"}
    assert len(set(keys[0]) & set(keys[1])) == 0, "the workers' parts of the sources overlap"
    # pseudo labels: screened at min_score 0.5; the sample whose boxes all score 0.3 never appears
    assert "cc/cc00001" not in keys[0] + keys[1]
    records = {f"cc/{s.key}": s.to_record()
               for s in iter_output_samples([str(p) for p in mixture.pseudo_shards])}
    for b in batches[0] + batches[1]:
        for key, target in zip(b["keys"], b["targets"]):
            if key.startswith("cc/"):
                assert target["boxes"].shape[0] == sum(s > 0.5 for s in records[key]["scores"])
            assert target["boxes"].shape[0] == target["positive_map"].shape[0] > 0
            assert (target["positive_map"].sum(1) > 0).all(), f"{key}: a box maps to no token"
    # the same seed gives the same stream; a fresh stream that loads the state continues it
    again = TrainStream(cfg.data, mcfg, tok, batch_size=2, seed=0, rank=0, world_size=2)
    for b in batches[0][:3]:
        nb = again.next_batch()
        assert nb["keys"] == b["keys"] and nb["captions"] == b["captions"]
    resumed = TrainStream(cfg.data, mcfg, tok, batch_size=2, seed=0, rank=0, world_size=2)
    resumed.load_state_dict(batches[0][2]["data_state"])
    for b in batches[0][3:]:
        nb = resumed.next_batch()
        assert nb["keys"] == b["keys"] and nb["captions"] == b["captions"]
        assert torch.equal(nb["images"], b["images"]) and torch.equal(nb["input_ids"], b["input_ids"])
    with pytest.raises(ValueError, match="worker 0 of 2, not 1 of 2"):
        streams[1].load_state_dict(batches[0][2]["data_state"])
    other_seed = TrainStream(cfg.data, mcfg, tok, batch_size=2, seed=1, rank=0, world_size=2)
    assert [k for _ in range(6) for k in other_seed.next_batch()["keys"]] != keys[0]


def test_pseudo_phrases_left_without_a_box_can_be_ignored(mixture, tiny_random):
    """unlabelled_phrases=ignore: the tokens of exactly the phrases whose boxes were screened away."""
    cfg = train_config(mixture, "/unused", "data.prefetch_batches=0", "data.sources.cc.unlabelled_phrases=ignore",
                       "data.sources.o365.weight=0", "data.sources.goldg.weight=0")
    stream = TrainStream(cfg.data, tiny_random.cfg, tiny_random.tokenizer, batch_size=4, seed=0)
    records = {f"cc/{s.key}": s.to_record()
               for s in iter_output_samples([str(p) for p in mixture.pseudo_shards])}
    seen_ignored = 0
    for _ in range(3):
        batch = stream.next_batch()
        for b, (key, target) in enumerate(zip(batch["keys"], batch["targets"])):
            record = records[key]
            low = [p["text"] for p, s in zip(record["phrases"], record["scores"]) if s <= 0.5]
            if not low:
                assert "ignore_tokens" not in target
                continue
            seen_ignored += 1
            decoded = tiny_random.tokenizer.decode(batch["input_ids"][b][target["ignore_tokens"]].tolist())
            assert decoded == " ".join(low).lower()
            assert not (target["ignore_tokens"] & (target["positive_map"].sum(0) > 0)).any()
    assert seen_ignored > 0
    # and the training step hands them to the criterion
    criterion = GLIPCriterion(tiny_random.cfg.loss)
    received = []

    def spy(outputs, targets, mask):
        received.extend(targets)
        return criterion(outputs, targets, mask)
    spy.total = criterion.total
    ignoring = next(b for b in iter(stream.next_batch, None) if any("ignore_tokens" in t for t in b["targets"]))
    optimizer = make_optimizer(param_groups(tiny_random, cfg))
    train_step(tiny_random, spy, optimizer, ignoring, step=0, cfg=cfg, device=torch.device("cpu"))
    sent = [t.get("ignore_tokens") for t in ignoring["targets"]]
    got = [t.get("ignore_tokens") for t in received]
    assert len(got) == len(sent) and all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, sent))
    with pytest.raises(ConfigError, match="unlabelled_phrases applies to pseudo sources"):
        train_config(mixture, "/unused", "data.sources.o365.unlabelled_phrases=ignore")


# ------------------------------------------------------------------------------------ one step
def test_train_step_updates_and_guards(mixture, tiny_random, tmp_path):
    torch.manual_seed(0)
    model = tiny_random
    cfg = train_config(mixture, tmp_path, "warmup_iters=0", "ema_decay=0.5")
    stream = TrainStream(cfg.data, model.cfg, model.tokenizer, batch_size=2, seed=0)
    batch = stream.next_batch()
    criterion = GLIPCriterion(model.cfg.loss)
    optimizer = make_optimizer(param_groups(model, cfg))
    cpu = torch.device("cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema = ModelEma(model, cfg.ema_decay)
    model.train()

    result = train_step(model, criterion, optimizer, batch, step=3, cfg=cfg, device=cpu, ema=ema)
    assert result.status is StepStatus.OK and math.isfinite(result.loss) and result.images == 2
    assert result.lr == pytest.approx(cfg.lr * lr_factor(3, cfg))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr * lr_factor(3, cfg))
    assert result.loss == pytest.approx(sum(v * w for k, v in result.losses.items()
                                            for kk, w in criterion.weight_dict.items() if k == kk))
    assert result.grad_norm > 0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("head.") for k in changed) and any(k.startswith("language.") for k in changed)
    key = changed[0]
    assert torch.allclose(ema.state[key], 0.5 * before[key] + 0.5 * model.state_dict()[key])

    # a non-finite loss: no update at all. (Not made with a NaN pixel: torchvision's CPU
    # deform_conv2d crashes the process on NaN offsets, see model/dyconv.py.)
    def nan_criterion(outputs, targets, mask):
        losses = criterion(outputs, targets, mask)
        return dict(losses, loss_reg=losses["loss_reg"] * float("nan"))
    nan_criterion.total = criterion.total
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_step(model, nan_criterion, optimizer, batch, step=4, cfg=cfg, device=cpu)
    assert result.status is StepStatus.SKIPPED_NONFINITE and math.isnan(result.loss)
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())

    # more than max_empty_fraction of the images without a box: skipped before the forward
    empty = dict(batch, targets=[batch["targets"][0], {"boxes": torch.zeros(0, 4),
                                                       "positive_map": torch.zeros(0, batch["input_ids"].shape[1])}])
    assert train_step(model, criterion, optimizer, empty, step=4, cfg=cfg, device=cpu).status \
        is StepStatus.SKIPPED_EMPTY
    lenient = train_config(mixture, tmp_path, "max_empty_fraction=0.5")
    assert train_step(model, criterion, optimizer, empty, step=4, cfg=lenient, device=cpu).status is StepStatus.OK

    # bf16 autocast and fp16 with a GradScaler run on CPU too (fp16's first scale may overflow: no update)
    bf16 = train_config(mixture, tmp_path, "precision=bf16")
    assert train_step(model, criterion, optimizer, batch, step=5, cfg=bf16, device=cpu).status is StepStatus.OK
    fp16 = train_config(mixture, tmp_path, "precision=fp16")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    result = train_step(model, criterion, optimizer, batch, step=6, cfg=fp16, device=cpu, scaler=scaler)
    assert result.status is StepStatus.OK and math.isfinite(result.loss)
    assert result.overflow == (scaler.get_scale() < 2.0 ** 4)


def test_train_step_with_a_loss_weighted_source(mixture, tiny_random, tmp_path):
    """data.sources.cc.loss_weight: the pseudo images are a loss group of their own (logged as
    cc/loss_*), the total = the gold images' total + 0.5 x theirs; the key needs extra_per_batch."""
    torch.manual_seed(0)
    model = tiny_random
    cfg = train_config(mixture, tmp_path, "data.sources.cc.extra_per_batch=1", "data.sources.cc.loss_weight=0.5")
    batch = TrainStream(cfg.data, model.cfg, model.tokenizer, batch_size=2, seed=0).next_batch()
    assert batch["sources"][-1] == "cc" and "cc" not in batch["sources"][:2]
    criterion = GLIPCriterion(model.cfg.loss)
    optimizer = make_optimizer(param_groups(model, cfg))
    result = train_step(model, criterion, optimizer, batch, step=3, cfg=cfg, device=torch.device("cpu"))
    assert result.status is StepStatus.OK and result.images == 3
    gold = sum(result.losses[k] * w for k, w in criterion.weight_dict.items())
    pseudo = sum(result.losses[f"cc/{k}"] * w for k, w in criterion.weight_dict.items())
    assert result.loss == pytest.approx(gold + 0.5 * pseudo, rel=1e-5)
    with pytest.raises(ConfigError, match="loss_weight applies to a source added to every batch"):
        train_config(mixture, "/unused", "data.sources.cc.loss_weight=0.5")


# ------------------------------------------------------------------------------------ the loop
def test_fit_in_process_writes_everything_and_resumes_exactly(mixture, tmp_path):
    """4 steps with a checkpoint at 2; then the step-4 checkpoint is removed (a run killed after
    step 2's checkpoint) and --resume must give the same records, bit for bit."""
    run = tmp_path / "run"
    cfg = train_config(mixture, run, "max_iter=4", "checkpoint_every=2", "log_every=1", "batch_size=2",
                       "warmup_iters=2", "lr=0.001")
    summary = fit(cfg, WorkerContext())
    assert summary["step"] == 4 and summary["checkpoint"] == "step_00000004.pt"
    records = read_metrics(str(run))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert [r["lr"] for r in records] == pytest.approx([cfg.lr * lr_factor(s, cfg) for s in range(4)])
    for name in ("model", "model_ema"):
        assert (run / name / "model.safetensors").is_file() and (run / name / "config.json").is_file()
    assert json.loads((run / "train_summary.json").read_text())["step"] == 4
    assert list((run / "tensorboard").iterdir()), "no TensorBoard events"
    ckpt = torch.load(run / "checkpoints" / "step_00000004.pt", weights_only=True)
    assert set(ckpt) >= {"model", "optimizer", "ema", "data", "rng", "step", "scaler", "config"}
    assert ckpt["step"] == 4 and ckpt["data"][0]["mixture"]["step"] >= 8

    with pytest.raises(ValueError, match=r"data\.sources\.cc\.min_score: 0\.5 in the checkpoint, 0\.6 now"):
        fit(train_config(mixture, run, "max_iter=4", "batch_size=2", "data.sources.cc.min_score=0.6",
                         "data.prefetch_batches=1"), WorkerContext(), resume=True)

    killed = tmp_path / "killed"
    # the run as a kill just after step 2's checkpoint leaves it (no step-4 files; copying less
    # keeps the test's disk use down: each checkpoint is ~0.5 GB)
    shutil.copytree(run, killed, ignore=lambda d, names: [n for n in names if n == "step_00000004.pt"])
    cfg2 = train_config(mixture, killed, "max_iter=4", "checkpoint_every=2", "log_every=1", "batch_size=2",
                        "warmup_iters=2", "lr=0.001")
    seen = []
    fit(cfg2, WorkerContext(on_log=seen.append), resume=True)
    assert [r["step"] for r in seen] == [3, 4]
    resumed = read_metrics(str(killed))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(records, resumed):
        for key in ("step", "lr", "keys", "loss", "loss_token", "loss_reg", "loss_centerness", "grad_norm"):
            assert a[key] == b[key], (a["step"], key)


def test_eval_hook_requires_configs():
    with pytest.raises(ValueError, match="eval.configs is empty"):
        EvalHookConfig(every=10).validate()


def test_workers_with_diverged_weights_are_caught(tmp_path):
    """The checkpoint-time check that every worker holds the same weights (2 gloo processes)."""
    script = tmp_path / "sync.py"
    script.write_text(textwrap.dedent("""
        import os, socket, sys
        import torch, torch.distributed as dist, torch.multiprocessing as mp
        from torch import nn

        def run(rank, port, out):
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("gloo", rank=rank, world_size=2)
            from trainer.loop import _check_in_sync
            for same in (True, False):
                torch.manual_seed(0 if same else rank)
                try:
                    _check_in_sync(nn.Linear(3, 2), 5)
                    result = "in sync"
                except RuntimeError as exc:
                    result = str(exc)
                with open(f"{out}-{same}.{rank}", "w") as fh:
                    fh.write(result)
            dist.destroy_process_group()

        if __name__ == "__main__":
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(run, args=(port, sys.argv[1]), nprocs=2, join=True)
    """))
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "r")], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"r-True.{rank}").read_text() == "in sync"
        assert "step 5: the workers' weights differ" in (tmp_path / f"r-False.{rank}").read_text()


def test_init_from_a_checkpoint_of_ours_or_official(mixture, tiny_teacher, tmp_path):
    from model.checkpoint import load_pretrained, save_official
    from trainer.loop import build_model

    teacher = load_pretrained(tiny_teacher)
    official = tmp_path / "official.pth"
    save_official(teacher, official)
    for path in (tiny_teacher, official):
        cfg = train_config(mixture, tmp_path / "run", "init=checkpoint", f"init_checkpoint={path}")
        student = build_model(cfg)
        theirs = teacher.state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in student.state_dict().items()), path
    # the teacher fixture was built with pretrained parts: its backbone and text encoder are the
    # packaged ImageNet EfficientNet-Lite0 and MiniLM weights
    backbone = next(k for k in teacher.state_dict() if k.startswith("backbone.body.") and k.endswith("weight"))
    text = "language.model.embeddings.word_embeddings.weight"
    parts = build_model(train_config(mixture, tmp_path / "run", "init=pretrained_parts")).state_dict()
    scratch = build_model(train_config(mixture, tmp_path / "run", "init=scratch")).state_dict()
    assert torch.equal(parts[backbone], teacher.state_dict()[backbone]) and torch.equal(parts[text], teacher.state_dict()[text])
    assert not torch.equal(scratch[backbone], parts[backbone]) and not torch.equal(scratch[text], parts[text])
