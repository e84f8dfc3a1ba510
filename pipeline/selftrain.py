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

import enum
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import from_dict, merge_overrides, read_yaml, to_dict
from stages.schema import UnlabelledPhrases

log = logging.getLogger("pipeline.selftrain")


class Device(str, enum.Enum):
    AUTO = "auto"      # CUDA when this machine has it, else CPU
    CPU = "cpu"
    CUDA = "cuda"


class StudentInit(str, enum.Enum):
    TEACHER = "teacher"                       # the student (and the control) continue from the teacher
    PRETRAINED_PARTS = "pretrained_parts"     # both start where the teacher started


@dataclass
class SelfTrainConfig:
    workdir: str = "out/selftrain"
    world: str = "configs/world/default.yaml"
    world_overrides: list[str] = field(default_factory=list)
    train: str = "configs/selftrain/train.yaml"          # base trainer config of both models
    teacher_overrides: list[str] = field(default_factory=list)
    student_overrides: list[str] = field(default_factory=list)   # the control's too
    student_init: StudentInit = StudentInit.TEACHER
    # the control: the student's recipe (init, steps, seed) without the pseudo source, so that
    # student - control is what the pseudo labels add and not what more steps add
    control: bool = True
    teacher_min_score: float = 0.3       # stages.pseudo_label.min_score: boxes stored (with their scores)
    student_min_score: float = 0.4       # the student reads pseudo boxes scoring above this
    pseudo_weight: float = 1.0           # mixture weight of the pseudo source for the student
    # a caption phrase left without a box (> student_min_score): negative everywhere (official) or
    # ignored by the token loss
    unlabelled_phrases: UnlabelledPhrases = UnlabelledPhrases.NEGATIVE
    # grounding and pseudo captions: up to this many other captions packed around each as
    # negatives (official GoldG recipe, pack_random_caption_number); 0 = the caption alone
    pack_captions: int = 0
    label_overrides: list[str] = field(default_factory=list)   # `pipeline run` key=value
    eval_batch_size: int = 8
    device: Device = Device.AUTO         # training and evaluation (pseudo-labelling: GPU actors when Ray has GPUs)
    seed: int = 0
    progress: bool = True


def load_selftrain_config(path: str | None, overrides: list[str] | None = None) -> SelfTrainConfig:
    data = read_yaml(path) if path else {}
    if overrides:
        data = merge_overrides(data, overrides)
    return from_dict(SelfTrainConfig, data, source=str(path) if path else "command line")


# ------------------------------------------------------------------------------------ steps

def _world(cfg: SelfTrainConfig, root: Path):
    from core.config import load
    from synth.config import WorldConfig
    from synth.world import ensure_world

    wcfg = load(WorldConfig, cfg.world, cfg.world_overrides + [f"seed={cfg.seed}"])
    manifest, built = ensure_world(root / "world", wcfg)
    log.info("world %s (%s)", root / "world", "built" if built else "reused")
    return manifest, built


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
                             "min_score": cfg.student_min_score, "unlabelled_phrases": cfg.unlabelled_phrases.value}
    if cfg.pack_captions:
        for name in ("grounding", "pseudo"):
            if name in sources:
                sources[name]["pack_captions"] = {"pack_random_caption_number": cfg.pack_captions}
    return sources


def _student_init(cfg: SelfTrainConfig, teacher_model: str) -> list[str]:
    if cfg.student_init is StudentInit.TEACHER:
        return ["init=checkpoint", f"init_checkpoint={teacher_model}"]
    return []


def _device(cfg: SelfTrainConfig) -> str:
    if cfg.device is not Device.AUTO:
        return cfg.device.value
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _train(cfg: SelfTrainConfig, name: str, out: Path, sources: dict, overrides: list[str]) -> dict:
    from pipeline.train import load_train_job, train

    done = out / "train_summary.json"
    if done.exists() and (out / "model").exists():
        log.info("%s: already trained (%s)", name, out)
        return {**json.loads(done.read_text()), "reused": True}
    job = load_train_job(cfg.train, [f"output={out}", f"seed={cfg.seed}", f"progress={str(cfg.progress).lower()}",
                                     f"data.sources={json.dumps(sources)}",
                                     f"ray.use_gpu={str(_device(cfg) == 'cuda').lower()}", *overrides])
    log.info("%s: training %d steps", name, job.max_iter)
    summary = train(job)
    done.write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _label(cfg: SelfTrainConfig, world, teacher: str, out: Path):
    from pipeline import runner
    from pipeline.config import load_run_config

    run_cfg = load_run_config(None, [
        f"input.shards=[{world.root / 'web'}/*.tar]", f"output.path={out}", "input.source=web", f"seed={cfg.seed}", f"progress={str(cfg.progress).lower()}",
        f"stages.pseudo_label.checkpoint={teacher}", f"stages.pseudo_label.min_score={cfg.teacher_min_score}",
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
                          name=f"{name}_{kind.value}", batch_size=cfg.eval_batch_size, progress=cfg.progress,
                          device=_device(cfg))
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


def _pseudo_quality(world, pseudo: Path) -> dict | None:
    """Pseudo labels vs the world's true boxes (analysis only: training never sees the truth)."""
    from pipeline.storage import iter_output_samples
    from synth.truth import load_truth, pseudo_label_quality

    truth_file = Path(world.root) / "web_truth.json"
    if not truth_file.exists():
        return None
    truth, rare = load_truth(truth_file)
    return pseudo_label_quality(iter_output_samples(sorted(str(p) for p in pseudo.glob("*.tar"))), truth, rare)


def _quality_lines(quality: dict | None, min_score: float) -> list[str]:
    if not quality:
        return []
    lines = ["Scored against the world's true boxes (`web_truth.json`, which training never reads): a "
             "pseudo box is correct when it overlaps the object its phrase names with IoU ≥ 0.5.", "",
             "| classes | pseudo boxes | correct | precision | mentioned objects | recall |", "|---|---|---|---|---|---|"]
    for group in ("rare", "common"):
        q = quality[group]
        lines.append(f"| {group} | {q['boxes']} | {q['correct']} | {_fmt(q['precision'])} | {q['mentioned']} | "
                     f"{_fmt(q['recall'])} |")
    return lines + ["", f"(All stored boxes, score ≥ {min_score}; {quality['unmatched']} more ground phrases "
                        "that name no object, such as scene phrases.)", ""]


def _fmt(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _metric_rows(results: dict) -> list[tuple[str, dict]]:
    """(label, {model: value}) per reported metric."""
    rows = []
    for label, key in (("AP", "AP"), ("AP50", "AP50"), ("APr (rare)", "APr"), ("APc", "APc"), ("APf", "APf")):
        rows.append((label, {m: r["detection"].get(key) for m, r in results.items()}))
    for proto in ("any_box", "merged_box"):
        rows.append((f"R@1 {proto}", {m: _recall(r["grounding"], proto) for m, r in results.items()}))
    return rows


def _diff(a, b) -> str:
    return "n/a" if a is None or b is None else f"{100 * (a - b):+.1f}"


def _verdict(results: dict, base: str, what: str) -> str:
    s_ap, b_ap = results["student"]["detection"].get("AP"), results[base]["detection"].get("AP")
    better = s_ap is not None and b_ap is not None and s_ap > b_ap
    return f"The student's held-out AP {'exceeds' if better else 'does NOT exceed'} the {what}'s in this run."


def _report(cfg: SelfTrainConfig, root: Path, results: dict, extras: dict) -> str:
    models = list(results)
    bases = [m for m in ("teacher", "control") if m in results]
    lines = ["# Self-training in a miniature world", "",
             f"Seed {cfg.seed}. World: `{cfg.world}`; trainer: `{cfg.train}`; all numbers measured by "
             "`pipeline selftrain` in this run (held-out evaluation set, COCO-style AP ×100, "
             "grounding Recall@1 ×100).", "",
             "| metric | " + " | ".join(models) + " | " + " | ".join(f"student − {b}" for b in bases) + " |",
             "|---" * (1 + len(models) + len(bases)) + "|"]
    for label, values in _metric_rows(results):
        lines.append(f"| {label} | " + " | ".join(_fmt(values[m]) for m in models) + " | "
                     + " | ".join(_diff(values["student"], values[b]) for b in bases) + " |")
    init = ("continue from the teacher's weights" if cfg.student_init is StudentInit.TEACHER
            else "start from the pretrained parts, as the teacher did")
    lines += ["", "- teacher: trained on the detection + grounding sets.",
              f"- student: the teacher's trainer settings on detection + grounding + the pseudo-labelled web "
              f"shards (mixture weights 1 : 1 : {cfg.pseudo_weight:g}; pseudo boxes scoring > "
              f"{cfg.student_min_score:g}; phrases left without a box: {cfg.unlabelled_phrases.value}); "
              f"its steps {init}."]
    if "control" in results:
        lines.append("- control: the student exactly (same initialisation, steps, seed) but without the pseudo "
                     "source, so student − control is what the pseudo labels add, not what more steps add.")
    lines += [""] + [_verdict(results, b, {"teacher": "teacher", "control": "control"}[b]) for b in bases]
    lines += ["", "## Pseudo labels", "",
              f"Web images read {extras['label']['read']}, kept {extras['label']['kept']} "
              f"(with ≥ 1 box scoring ≥ {cfg.teacher_min_score}), boxes {extras['label']['boxes']}; "
              f"the student reads boxes scoring > {cfg.student_min_score}.", ""]
    lines += _quality_lines(extras.get("quality"), cfg.teacher_min_score)
    if extras.get("loss_plot"):
        lines += [f"![loss]({extras['loss_plot']})", ""]
    if extras.get("gallery"):
        lines += [f"Gallery of pseudo labels: [{extras['gallery']}]({extras['gallery']})", ""]
    for plot in extras.get("stats_plots", []):
        lines.append(f"![{Path(plot).stem}]({plot})")
    lines += ["", "## Steps and timings", ""]
    for step, seconds in extras["timings"].items():
        note = " (output of an earlier run, reused)" if step in extras.get("reused", ()) else ""
        lines.append(f"- {step}: {seconds:.0f} s{note}")
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

    world, built = timed("world", _world, cfg, root)
    reused = set() if built else {"world"}
    teacher = timed("train teacher", _train, cfg, "teacher", root / "teacher", _sources(world, None, cfg),
                    cfg.teacher_overrides)
    teacher_model = teacher.get("model_ema") or teacher["model"]
    label = timed("pseudo-label web shards", _label, cfg, world, teacher_model, root / "pseudo")
    if not label.commits:
        reused.add("pseudo-label web shards")
    student_overrides = _student_init(cfg, teacher_model) + cfg.student_overrides
    models = {"teacher": teacher_model}
    if cfg.control:
        control = timed("train control", _train, cfg, "control", root / "control", _sources(world, None, cfg),
                        student_overrides)
        models["control"] = control.get("model_ema") or control["model"]
    student = timed("train student", _train, cfg, "student", root / "student",
                    _sources(world, str(root / "pseudo" / "*.tar"), cfg), student_overrides)
    models["student"] = student.get("model_ema") or student["model"]
    reused |= {f"train {n}" for n, summary in (("teacher", teacher), ("student", student)) if summary.get("reused")}
    if cfg.control and control.get("reused"):
        reused.add("train control")
    for name in models:
        if all((root / "eval" / f"{name}_{kind}_metrics.json").exists() for kind in ("detection", "grounding")):
            reused.add(f"evaluate {name}")
    results = {name: timed(f"evaluate {name}", _evaluate, cfg, world, name, model, root / "eval")
               for name, model in models.items()}
    extras = {"timings": timings, "reused": reused, "label": label.totals, "quality": _pseudo_quality(world, root / "pseudo")}
    extras["loss_plot"] = _loss_plot({name: root / name for name in models}, root / "loss.png")
    gallery = api.show(str(root / "pseudo"), out=str(root / "gallery"), n=12)
    extras["gallery"] = str(Path("gallery") / "index.html") if gallery.get("shown") else None
    report = api.stats(str(root / "pseudo"), plot_dir=str(root / "plots"))
    extras["stats_plots"] = [str(Path("plots") / Path(p).name) for p in report.plots]
    (root / "REPORT.md").write_text(_report(cfg, root, results, extras))
    out = {"config": to_dict(cfg), "results": results, "timings": timings, "pseudo_quality": extras["quality"],
           "report": str(root / "REPORT.md")}
    (root / "results.json").write_text(json.dumps(out, indent=2, default=str))
    return out

