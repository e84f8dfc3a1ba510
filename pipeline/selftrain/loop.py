"""``pipeline selftrain configs/demo.yaml``: the whole teacher–student loop in a miniature world.

    world  ->  train the teacher on detection + grounding  ->  pseudo-label the web shards
           ->  train the student on detection + grounding + pseudo shards
           ->  evaluate teacher and student on the held-out set  ->  REPORT.md

Every step is one call of the project's own API (``synth.world``, ``pipeline.train``,
``pipeline.runner``, ``pipeline.evaluation``) and is skipped when its output is already complete,
so an interrupted loop resumes where it stopped. The report states the numbers as measured,
with the seed; nothing in it is made up or tuned after the fact.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from core.config import to_dict
from core.device import resolve_device
from pipeline.selftrain.config import SelfTrainConfig, StudentInit
from pipeline.selftrain.report import loss_plot, pseudo_quality, write_report
from trainer.data.config import SourceKind, TrainSourceConfig
from trainer.data.prompts import CaptionPackingConfig

__all__ = ["selftrain"]

log = logging.getLogger("pipeline.selftrain")


# ------------------------------------------------------------------------------------ steps

def _world(cfg: SelfTrainConfig, root: Path):
    from core.config import load
    from synth.config import WorldConfig
    from synth.world import ensure_world

    wcfg = load(WorldConfig, cfg.world, cfg.world_overrides + [f"seed={cfg.seed}"])
    manifest, built = ensure_world(root / "world", wcfg)
    log.info("world %s (%s)", root / "world", "built" if built else "reused")
    return manifest, built


def _sources(world, pseudo_shards: str | None, cfg: SelfTrainConfig) -> dict[str, TrainSourceConfig]:
    """The training mixture: the world's detection and grounding sets (+ the pseudo shards)."""
    packing = (CaptionPackingConfig(pack_random_caption_number=cfg.pack_captions)
               if cfg.pack_captions else None)
    sources = {
        "detection": TrainSourceConfig(kind=SourceKind.COCO, weight=1.0,
                                       annotations=str(world.detection_annotations),
                                       image_root=str(world.images("detection"))),
        "grounding": TrainSourceConfig(kind=SourceKind.MDETR, weight=1.0,
                                       annotations=str(world.grounding_annotations),
                                       image_root=str(world.images("grounding")), pack_captions=packing),
    }
    if pseudo_shards:
        sources["pseudo"] = TrainSourceConfig(kind=SourceKind.PSEUDO, weight=cfg.pseudo_weight,
                                              shards=[pseudo_shards], min_score=cfg.student_min_score,
                                              unlabelled_phrases=cfg.unlabelled_phrases, pack_captions=packing)
    return sources


def _train(cfg: SelfTrainConfig, name: str, out: Path, sources: dict[str, TrainSourceConfig],
           overrides: list[str], init_from: str | None = None) -> dict:
    """Train one model: ``cfg.train`` with the user's ``overrides``, then what the loop decides
    (output, seed, sources, device, initialisation) set on the typed config."""
    from core.config import load, validate_tree
    from pipeline.train import TrainJobConfig, train
    from trainer.config import InitKind

    done = out / "train_summary.json"
    if done.exists() and (out / "model").exists():
        log.info("%s: already trained (%s)", name, out)
        return {**json.loads(done.read_text()), "reused": True}
    job = load(TrainJobConfig, cfg.train, overrides, validate=False)   # output and sources come next
    init = {} if init_from is None else {"init": InitKind.CHECKPOINT, "init_checkpoint": init_from}
    job = dataclasses.replace(
        job, output=str(out), seed=cfg.seed, progress=cfg.progress,
        data=dataclasses.replace(job.data, sources=sources),
        ray=dataclasses.replace(job.ray, use_gpu=resolve_device(cfg.device).type == "cuda"), **init)
    validate_tree(job, source=f"{cfg.train} for the {name}")
    log.info("%s: training %d steps", name, job.max_iter)
    summary = train(job)
    done.write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _label(cfg: SelfTrainConfig, world, teacher: str, out: Path):
    """Pseudo-label the world's web shards with ``teacher``: the default DAG + the teacher, the
    user's ``label_overrides`` applied first, then what the loop decides (inputs, output, teacher)."""
    from core.config import from_dict, merge_overrides
    from pipeline import runner
    from pipeline.config import RunConfig
    from stages.registry import DEFAULT_STAGES

    data = merge_overrides({"stages": {name: {} for name in DEFAULT_STAGES}}, cfg.label_overrides)
    data["stages"].setdefault("pseudo_label", {}).update(checkpoint=teacher, min_score=cfg.teacher_min_score)
    data.setdefault("input", {}).update(shards=[f"{world.root / 'web'}/*.tar"], source="web")
    data.setdefault("output", {})["path"] = str(out)
    data.update(seed=cfg.seed, progress=cfg.progress)
    return runner.run(from_dict(RunConfig, data, source="selftrain label_overrides"))


def _evaluate(cfg: SelfTrainConfig, world, name: str, checkpoint: str, out: Path) -> dict:
    from pipeline.evaluation import EvalConfig, EvalKind, run_eval

    metrics = {}
    for kind, gt_file in ((EvalKind.DETECTION, world.eval_annotations),
                              (EvalKind.GROUNDING, world.eval_grounding)):
        path = out / f"{name}_{kind.value}_metrics.json"
        if path.exists():
            metrics[kind.value] = json.loads(path.read_text())
            continue
        ecfg = EvalConfig(kind=kind, checkpoint=checkpoint, annotations=str(gt_file),
                          image_root=str(world.images("eval")), output=str(out),
                          name=f"{name}_{kind.value}", batch_size=cfg.eval_batch_size, progress=cfg.progress,
                          device=cfg.device)
        metrics[kind.value] = run_eval(ecfg)
    return metrics


def selftrain(cfg: SelfTrainConfig) -> dict:
    """Run the loop; returns the results dict also written to WORKDIR/results.json."""
    from pipeline.gallery import gallery_from_shards
    from pipeline.report import stats
    from pipeline.storage import expand_shards

    root = Path(cfg.workdir)
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(step, fn, *args):
        t = time.time()
        value = fn(*args)
        timings[step] = time.time() - t
        return value

    world, built = timed("world", _world, cfg, root)
    reused = set() if built else {"world"}
    teacher = timed("train teacher", _train, cfg, "teacher", root / "teacher", _sources(world, None, cfg),
                    cfg.teacher_overrides)
    teacher_model = teacher.get("model_ema") or teacher["model"]
    label = timed("pseudo-label web shards", _label, cfg, world, teacher_model, root / "pseudo")
    if not label.commits:
        reused.add("pseudo-label web shards")
    init_from = teacher_model if cfg.student_init is StudentInit.TEACHER else None
    models = {"teacher": teacher_model}
    if cfg.control:
        control = timed("train control", _train, cfg, "control", root / "control", _sources(world, None, cfg),
                        cfg.student_overrides, init_from)
        models["control"] = control.get("model_ema") or control["model"]
    student = timed("train student", _train, cfg, "student", root / "student",
                    _sources(world, str(root / "pseudo" / "*.tar"), cfg), cfg.student_overrides, init_from)
    models["student"] = student.get("model_ema") or student["model"]
    reused |= {f"train {n}" for n, summary in (("teacher", teacher), ("student", student)) if summary.get("reused")}
    if cfg.control and control.get("reused"):
        reused.add("train control")
    for name in models:
        if all((root / "eval" / f"{name}_{kind}_metrics.json").exists() for kind in ("detection", "grounding")):
            reused.add(f"evaluate {name}")
    results = {name: timed(f"evaluate {name}", _evaluate, cfg, world, name, model, root / "eval")
               for name, model in models.items()}
    extras = {"timings": timings, "reused": reused, "label": label.totals, "quality": pseudo_quality(world, root / "pseudo")}
    extras["loss_plot"] = loss_plot({name: root / name for name in models}, root / "loss.png")
    pseudo_shards = expand_shards([str(root / "pseudo" / "*.tar")])
    gallery = gallery_from_shards(pseudo_shards, str(root / "gallery"), n=12)
    extras["gallery"] = str(Path("gallery") / "index.html") if gallery.get("shown") else None
    report = stats(str(root / "pseudo"), plot_dir=str(root / "plots"))
    extras["stats_plots"] = [str(Path("plots") / Path(p).name) for p in report.plots]
    (root / "REPORT.md").write_text(write_report(cfg, root, results, extras))
    out = {"config": to_dict(cfg), "results": results, "timings": timings, "pseudo_quality": extras["quality"],
           "report": str(root / "REPORT.md")}
    (root / "results.json").write_text(json.dumps(out, indent=2, default=str))
    return out

