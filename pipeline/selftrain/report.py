"""REPORT.md of ``pipeline selftrain``: the metric table, the pseudo labels scored against the
world's truth, loss curves, gallery and stats plots. Pure formatting of what the loop measured."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.selftrain.config import SelfTrainConfig, StudentInit

__all__ = ["loss_plot", "pseudo_quality", "write_report"]


def loss_plot(runs: dict[str, Path], path: Path) -> str | None:
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


def pseudo_quality(world, pseudo: Path) -> dict | None:
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


def write_report(cfg: SelfTrainConfig, root: Path, results: dict, extras: dict) -> str:
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


