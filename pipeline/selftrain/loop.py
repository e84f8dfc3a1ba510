"""``pipeline selftrain configs/demo.yaml``: the whole teacher–student loop in a miniature world.

    world  ->  train the teacher on detection + grounding  ->  pseudo-label the web shards
           ->  train the student on detection + grounding + pseudo shards
           ->  evaluate teacher and student on the held-out set  ->  REPORT.md

with a control (the student without the pseudo source), with ``oracle: true`` an oracle (the
student on the same web images carrying the world's true boxes) and, with ``rounds=N``, the
student of round k as the teacher of round k + 1. The student's score bar is fixed or read from the
teacher's rare precision-by-score curve (``ScoreBar``); the paired bootstrap of the held-out
images (``pipeline.selftrain.noise``) gives the noise of every difference.

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
from pipeline.selftrain.config import ScoreBar, SelfTrainConfig, StudentInit
from pipeline.selftrain.report import loss_plot, pseudo_quality, write_report
from trainer.data.config import KnownPhrases, SourceKind, TrainSourceConfig
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


def _sources(world, pseudo_shards: str | None, cfg: SelfTrainConfig,
             min_score: float | None = None) -> dict[str, TrainSourceConfig]:
    """The training mixture: the world's detection and grounding sets (+ the pseudo shards; with
    ``known_phrases: ignore`` their boxes of the detection set's categories are left out)."""
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
        known = ([c["name"] for c in json.loads(Path(world.detection_annotations).read_text())["categories"]]
                 if cfg.known_phrases is not KnownPhrases.TRAIN or cfg.max_novel_phrases else [])
        sources["pseudo"] = TrainSourceConfig(kind=SourceKind.PSEUDO, weight=cfg.pseudo_weight,
                                              shards=[pseudo_shards],
                                              min_score=cfg.student_min_score if min_score is None else min_score,
                                              unlabelled_phrases=cfg.unlabelled_phrases, pack_captions=packing,
                                              known_phrases=cfg.known_phrases, known_names=known,
                                              extra_per_batch=cfg.pseudo_per_batch,
                                              loss_weight=cfg.pseudo_loss_weight,
                                              box_loss=cfg.pseudo_box_loss,
                                              max_novel_phrases=cfg.max_novel_phrases)
    return sources


def _train(cfg: SelfTrainConfig, name: str, out: Path, sources: dict[str, TrainSourceConfig],
           overrides: list[str], init_from: str | None = None, seed: int | None = None) -> dict:
    """Train one model: ``cfg.train`` with the user's ``overrides``, then what the loop decides
    (output, seed, sources, device, initialisation) set on the typed config."""
    from core.config import load, validate_tree
    from pipeline.train import TrainJobConfig, train
    from trainer.config import InitKind

    done = out / "train_summary.json"
    if done.exists() and (out / "model").exists():
        log.info("%s: already trained (%s)", name, out)
        summary = json.loads(done.read_text())
        # the folders as they are now (the workdir may have moved since it was written)
        moved = {k: str(out / Path(summary[k]).name) for k in ("model", "model_ema") if summary.get(k)}
        return {**summary, **moved, "output": str(out), "reused": True}
    job = load(TrainJobConfig, cfg.train, overrides, validate=False)   # output and sources come next
    init = {} if init_from is None else {"init": InitKind.CHECKPOINT, "init_checkpoint": init_from}
    job = dataclasses.replace(
        job, output=str(out), seed=cfg.seed if seed is None else seed, progress=cfg.progress,
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


def _oracle_shards(world, here: Path) -> dict:
    """The round's pseudo shards with the world's true boxes (``synth.truth.write_oracle_shards``)
    in ``here/oracle_pseudo``; ``oracle_counts.json``, written last, marks them complete."""
    from synth.truth import write_oracle_shards

    done = here / "oracle_pseudo" / "oracle_counts.json"
    if done.exists():
        return {**json.loads(done.read_text()), "reused": True}
    counts = write_oracle_shards(here / "pseudo", Path(world.root) / "web_truth.json", here / "oracle_pseudo")
    done.write_text(json.dumps(counts, indent=2))
    return counts


def _model(summary: dict) -> str:
    return summary.get("model_ema") or summary["model"]


def _score_bar(cfg: SelfTrainConfig, quality: dict | None) -> tuple[float, str]:
    """The student's pseudo-box bar of this round, and why (see ``ScoreBar``)."""
    from synth.truth import score_bar_for_precision

    if cfg.score_bar is ScoreBar.FIXED:
        return cfg.student_min_score, "fixed by the config (score_bar: fixed)"
    if quality is None:
        return cfg.student_min_score, "no truth to score the pseudo labels against: the config's student_min_score"
    bar, why = score_bar_for_precision(quality, cfg.rare_precision_target, floor=cfg.teacher_min_score)
    if bar is None:
        return cfg.student_min_score, f"{why}: the config's student_min_score"
    return bar, why


def _round(cfg: SelfTrainConfig, world, k: int, teacher: dict, timings: dict, reused: set) -> dict:
    """Round ``k``: label the web shards with ``teacher`` ({"model", "eval_dir", "name"}), choose
    the bar, train the control, the student (and the oracle) from it, evaluate them. Round 1 lives
    in the workdir itself, round k > 1 in ``round{k}/``."""
    from model.load import sha256_path

    root = Path(cfg.workdir)
    here = root if k == 1 else root / f"round{k}"
    tag = "" if k == 1 else f" (round {k})"

    def timed(step, fn, *args):
        t = time.time()
        value = fn(*args)
        timings[step + tag] = time.time() - t
        return value

    label = timed("pseudo-label web shards", _label, cfg, world, teacher["model"], here / "pseudo")
    if not label.shards_done:
        reused.add("pseudo-label web shards" + tag)
    quality = pseudo_quality(world, here / "pseudo")
    bar, why = _score_bar(cfg, quality)
    init_from = teacher["model"] if cfg.student_init is StudentInit.TEACHER else None
    models, oracle = {}, None
    shards = {"student": here / "pseudo", "oracle": here / "oracle_pseudo"}
    for name in (["control"] if cfg.control else []) + ["student"] + (["oracle"] if cfg.oracle else []):
        if name == "oracle":
            oracle = timed("oracle shards", _oracle_shards, world, here)
            if oracle.get("reused"):
                reused.add("oracle shards" + tag)
        pseudo = str(shards[name] / "*.tar") if name in shards else None
        summary = timed(f"train {name}", _train, cfg, name, here / name, _sources(world, pseudo, cfg, bar),
                        cfg.student_overrides, init_from)
        if summary.get("reused"):
            reused.add(f"train {name}" + tag)
        models[name] = _model(summary)
    repeats = {}                                 # the control again, with other data-order seeds
    seeds = {"control": cfg.seed}
    for j in range(1, cfg.control_repeats + 1):
        name = f"control_seed{j}"
        seeds[name] = cfg.seed + 1000 * j
        summary = timed(f"train {name}", _train, cfg, name, here / name, _sources(world, None, cfg),
                        cfg.student_overrides, init_from, seeds[name])
        if summary.get("reused"):
            reused.add(f"train {name}" + tag)
        repeats[name] = _model(summary)
    if all((teacher["eval_dir"] / f"{teacher['name']}_{kind}_metrics.json").exists()
           for kind in ("detection", "grounding")):
        reused.add("evaluate teacher" + tag)     # round k > 1: the student of round k - 1, evaluated there
    results = {"teacher": timed("evaluate teacher", _evaluate, cfg, world, teacher["name"], teacher["model"],
                                teacher["eval_dir"])}
    for name, model in models.items():
        if all((here / "eval" / f"{name}_{kind}_metrics.json").exists() for kind in ("detection", "grounding")):
            reused.add(f"evaluate {name}" + tag)
        results[name] = timed(f"evaluate {name}", _evaluate, cfg, world, name, model, here / "eval")
    spread = None
    if repeats:
        from pipeline.selftrain.noise import training_spread

        controls = {"control": results["control"]}
        for name, model in repeats.items():
            if all((here / "eval" / f"{name}_{kind}_metrics.json").exists() for kind in ("detection", "grounding")):
                reused.add(f"evaluate {name}" + tag)
            controls[name] = timed(f"evaluate {name}", _evaluate, cfg, world, name, model, here / "eval")
        spread = training_spread(controls, seeds)
    predictions = {"teacher": teacher["eval_dir"] / f"{teacher['name']}_detection_predictions.json",
                   **{n: here / "eval" / f"{n}_detection_predictions.json" for n in models}}
    noise = None
    if cfg.noise_resamples:
        from pipeline.selftrain.noise import paired_bootstrap
        pairs = [("student", b) for b in ("control", "teacher") if b in results]
        pairs += [("oracle", "control")] if "oracle" in results and "control" in results else []
        noise = timed("evaluation noise", paired_bootstrap, world.eval_annotations, predictions, pairs,
                      cfg.noise_resamples, cfg.seed)
    lineage = {"teacher": {"model": teacher["model"], "sha256": sha256_path(teacher["model"])},
               **{n: {"model": m, "sha256": sha256_path(m), "init_from": init_from} for n, m in models.items()}}
    return {"round": k, "dir": str(here), "results": results, "label": label.totals, "quality": quality,
            "score_bar": bar, "score_bar_why": why, "noise": noise, "lineage": lineage, "oracle_shards": oracle,
            "training_spread": spread,
            "student_model": models["student"], "student_eval_dir": here / "eval"}


def selftrain(cfg: SelfTrainConfig) -> dict:
    """Run the loop; returns the results dict also written to WORKDIR/results.json."""
    from pipeline.gallery import gallery_from_shards
    from pipeline.report import stats
    from pipeline.storage import expand_shards

    root = Path(cfg.workdir)
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.time()
    world, built = _world(cfg, root)
    timings["world"] = time.time() - t
    reused = set() if built else {"world"}
    t = time.time()
    summary = _train(cfg, "teacher", root / "teacher", _sources(world, None, cfg), cfg.teacher_overrides)
    timings["train teacher"] = time.time() - t
    if summary.get("reused"):
        reused.add("train teacher")
    teacher = {"model": _model(summary), "eval_dir": root / "eval", "name": "teacher"}
    rounds = []
    for k in range(1, cfg.rounds + 1):
        rounds.append(_round(cfg, world, k, teacher, timings, reused))
        teacher = {"model": rounds[-1]["student_model"], "eval_dir": rounds[-1]["student_eval_dir"],
                   "name": "student"}
    # the loss curves on one step axis: round k's control and student start where their teacher stopped
    runs, offset = {"teacher": (root / "teacher", 0)}, summary.get("step", 0)
    for r in rounds:
        here = Path(r["dir"])
        runs.update({f"{n}{'' if r['round'] == 1 else ' r%d' % r['round']}": (here / n, offset)
                     for n in ("control", "student", "oracle") if (here / n).exists()})
        offset += json.loads((here / "student" / "train_summary.json").read_text()).get("step", 0)
    extras = {"timings": timings, "reused": reused, "rounds": rounds}
    extras["loss_plot"] = loss_plot(runs, root / "loss.png")
    last = Path(rounds[-1]["dir"]) / "pseudo"
    gallery = gallery_from_shards(expand_shards([str(last / "*.tar")]), str(root / "gallery"), n=12)
    extras["gallery"] = str(Path("gallery") / "index.html") if gallery.get("shown") else None
    report = stats(str(root / "pseudo"), plot_dir=str(root / "plots"))
    extras["stats_plots"] = [str(Path("plots") / Path(p).name) for p in report.plots]
    (root / "REPORT.md").write_text(write_report(cfg, root, extras))
    keep = ("round", "results", "label", "quality", "score_bar", "score_bar_why", "noise", "lineage",
            "oracle_shards", "training_spread")
    out = {"config": to_dict(cfg), "results": rounds[0]["results"], "pseudo_quality": rounds[0]["quality"],
           "rounds": [{k: r[k] for k in keep} for r in rounds], "timings": timings,
           "report": str(root / "REPORT.md")}
    (root / "results.json").write_text(json.dumps(out, indent=2, default=str))
    return out
