"""``pipeline selftrain configs/demo.yaml``: the whole teacher–student loop in a miniature world.

    world  ->  train the teacher on detection + grounding  ->  pseudo-label the web shards
           ->  train the student on detection + grounding + pseudo shards
           ->  evaluate teacher and student on the held-out set  ->  REPORT.md

Every step is one call of the project's own API (``stages.world``, ``pipeline.train``,
``pipeline.runner``, ``pipeline.evaluation``) and is skipped when its output is already complete,
so an interrupted loop resumes where it stopped. The report states the numbers as measured,
with the seed; nothing in it is made up or tuned after the fact.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.typed_config import from_dict, merge_overrides, read_yaml, to_dict

log = logging.getLogger("pipeline.selftrain")


@dataclass
class SelfTrainConfig:
    workdir: str = "out/selftrain"
    world: str = "configs/world/default.yaml"
    world_overrides: list[str] = field(default_factory=list)
    train: str = "configs/selftrain/train.yaml"          # base trainer config of both models
    teacher_overrides: list[str] = field(default_factory=list)
    student_overrides: list[str] = field(default_factory=list)
    teacher_min_score: float = 0.3       # pseudo_label.min_score: boxes stored (with their scores)
    student_min_score: float = 0.4       # the student reads pseudo boxes scoring above this
    pseudo_weight: float = 1.0           # mixture weight of the pseudo source for the student
    label_overrides: list[str] = field(default_factory=list)   # `pipeline run` key=value
    eval_batch_size: int = 8
    seed: int = 0
    progress: bool = True


def load_selftrain_config(path: str | None, overrides: list[str] | None = None) -> SelfTrainConfig:
    data = read_yaml(path) if path else {}
    if overrides:
        data = merge_overrides(data, overrides)
    return from_dict(SelfTrainConfig, data, source=str(path) if path else "command line")


# ------------------------------------------------------------------------------------ steps

def _world(cfg: SelfTrainConfig, root: Path):
    from model.typed_config import load
    from stages.world import WorldConfig, ensure_world

    wcfg = load(WorldConfig, cfg.world, cfg.world_overrides + [f"seed={cfg.seed}"])
    manifest, built = ensure_world(root / "world", wcfg)
    log.info("world %s (%s)", root / "world", "built" if built else "reused")
    return manifest


def _sources(world, pseudo_shards: str | None, cfg: SelfTrainConfig) -> dict[str, Any]:
    """The training mixture: the world's detection and grounding sets (+ the pseudo shards)."""
    sources = {
        "detection": {"kind": "coco", "weight": 1.0, "annotations": str(world.detection_annotations),
                      "image_root": str(world.images("detection"))},
        "grounding": {"kind": "mdetr", "weight": 1.0, "annotations": str(world.grounding_annotations),
                      "image_root": str(world.images("grounding"))},
    }
    if pseudo_shards:
        sources["pseudo"] = {"kind": "pseudo", "weight": cfg.pseudo_weight, "shards": [pseudo_shards],
                             "min_score": cfg.student_min_score}
    return sources


def _train(cfg: SelfTrainConfig, name: str, out: Path, sources: dict, overrides: list[str]) -> dict:
    from pipeline.train import load_train_job, train

    done = out / "train_summary.json"
    if done.exists() and (out / "model").exists():
        log.info("%s: already trained (%s)", name, out)
        return json.loads(done.read_text())
    job = load_train_job(cfg.train, [f"output={out}", f"seed={cfg.seed}", f"progress={str(cfg.progress).lower()}",
                                     f"data.sources={json.dumps(sources)}", *overrides])
    log.info("%s: training %d steps", name, job.max_iter)
    summary = train(job)
    done.write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _label(cfg: SelfTrainConfig, world, teacher: str, out: Path):
    from pipeline import runner
    from pipeline.config import load_run_config

    run_cfg = load_run_config(None, [
        f"input.shards=[{world.root / 'web'}/*.tar]", f"output.path={out}", "input.source=web", f"seed={cfg.seed}", f"progress={str(cfg.progress).lower()}",
        f"pseudo_label.checkpoint={teacher}", f"pseudo_label.min_score={cfg.teacher_min_score}",
        *cfg.label_overrides])
    return runner.run(run_cfg)


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
                          name=f"{name}_{kind.value}", batch_size=cfg.eval_batch_size, progress=cfg.progress)
        metrics[kind.value] = run_eval(ecfg)
    return metrics


# ------------------------------------------------------------------------------------ report

def _loss_plot(runs: dict[str, Path], path: Path) -> str | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    drawn = False
    for name, out in runs.items():
        metrics = out / "metrics.jsonl"
        if not metrics.exists():
            continue
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "loss" in r and "step" in r]
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("total loss")
    ax.set_title("Training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _fmt(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _report(cfg: SelfTrainConfig, root: Path, results: dict, extras: dict) -> str:
    keys = [("AP", "detection", "AP"), ("AP50", "detection", "AP50"), ("APr (rare)", "detection", "APr"),
            ("APc", "detection", "APc"), ("APf", "detection", "APf")]
    lines = ["# Self-training in a miniature world", "",
             f"Seed {cfg.seed}. World: `{cfg.world}`; trainer: `{cfg.train}`; all numbers measured by "
             "`pipeline selftrain` in this run (held-out evaluation set, COCO-style AP ×100, "
             "grounding Recall@1 ×100).", "",
             "| metric | teacher | student | student − teacher |", "|---|---|---|---|"]
    for label, kind, key in keys:
        t = results["teacher"][kind].get(key)
        s = results["student"][kind].get(key)
        diff = "n/a" if t is None or s is None else f"{100 * (s - t):+.1f}"
        lines.append(f"| {label} | {_fmt(t)} | {_fmt(s)} | {diff} |")
    for proto in ("any_box", "merged_box"):
        t = _recall(results["teacher"]["grounding"], proto)
        s = _recall(results["student"]["grounding"], proto)
        diff = "n/a" if t is None or s is None else f"{100 * (s - t):+.1f}"
        lines.append(f"| R@1 {proto} | {_fmt(t)} | {_fmt(s)} | {diff} |")
    t_ap, s_ap = results["teacher"]["detection"].get("AP"), results["student"]["detection"].get("AP")
    verdict = ("The student's held-out AP exceeds the teacher's." if (t_ap is not None and s_ap is not None and s_ap > t_ap)
               else "The student's held-out AP does NOT exceed the teacher's in this run.")
    lines += ["", verdict, "", "## Pseudo labels", "",
              f"Web shards read {extras['label']['read']}, kept {extras['label']['kept']} "
              f"(with ≥ 1 box scoring ≥ {cfg.teacher_min_score}), boxes {extras['label']['boxes']}; "
              f"the student reads boxes scoring > {cfg.student_min_score}.", ""]
    if extras.get("loss_plot"):
        lines += [f"![loss]({extras['loss_plot']})", ""]
    if extras.get("gallery"):
        lines += [f"Gallery of pseudo labels: [{extras['gallery']}]({extras['gallery']})", ""]
    for plot in extras.get("stats_plots", []):
        lines.append(f"![{Path(plot).stem}]({plot})")
    lines += ["", "## Steps and timings", ""]
    for step, seconds in extras["timings"].items():
        lines.append(f"- {step}: {seconds:.0f} s")
    return "\n".join(lines) + "\n"


def _recall(metrics: dict, protocol: str):
    for key in (protocol, f"recall_{protocol}"):
        node = metrics.get(key)
        if isinstance(node, dict):
            for k in ("R@1", "recall@1", "1"):
                if k in node:
                    return node[k]
    return metrics.get(f"{protocol}/R@1")


def selftrain(cfg: SelfTrainConfig) -> dict:
    """Run the loop; returns the results dict also written to WORKDIR/results.json."""
    from pipeline import api

    root = Path(cfg.workdir)
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(step, fn, *args):
        t = time.time()
        value = fn(*args)
        timings[step] = time.time() - t
        return value

    world = timed("world", _world, cfg, root)
    teacher = timed("train teacher", _train, cfg, "teacher", root / "teacher", _sources(world, None, cfg),
                    cfg.teacher_overrides)
    teacher_model = teacher.get("model_ema") or teacher["model"]
    label = timed("pseudo-label web shards", _label, cfg, world, teacher_model, root / "pseudo")
    student = timed("train student", _train, cfg, "student", root / "student",
                    _sources(world, str(root / "pseudo" / "*.tar"), cfg), cfg.student_overrides)
    student_model = student.get("model_ema") or student["model"]
    results = {"teacher": timed("evaluate teacher", _evaluate, cfg, world, "teacher", teacher_model, root / "eval"),
               "student": timed("evaluate student", _evaluate, cfg, world, "student", student_model, root / "eval")}
    extras = {"timings": timings, "label": label.totals}
    extras["loss_plot"] = _loss_plot({"teacher": root / "teacher", "student": root / "student"}, root / "loss.png")
    gallery = api.show(str(root / "pseudo"), out=str(root / "gallery"), n=12)
    extras["gallery"] = str(Path("gallery") / "index.html") if gallery.get("shown") else None
    report = api.stats(str(root / "pseudo"), plot_dir=str(root / "plots"))
    extras["stats_plots"] = [str(Path("plots") / Path(p).name) for p in report.plots]
    (root / "REPORT.md").write_text(_report(cfg, root, results, extras))
    out = {"config": to_dict(cfg), "results": results, "timings": timings, "report": str(root / "REPORT.md")}
    (root / "results.json").write_text(json.dumps(out, indent=2, default=str))
    return out

