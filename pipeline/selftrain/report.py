"""REPORT.md of ``pipeline selftrain``: a metric table per round with the evaluation noise beside
each difference, the checkpoint lineage, the pseudo labels scored against the world's truth (by
class group and by score bar) and the student's bar, loss curves, gallery and stats plots. Pure
formatting of what the loop measured."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.selftrain.config import ScoreBar, SelfTrainConfig, StudentInit

__all__ = ["loss_plot", "pseudo_quality", "write_report"]


def loss_plot(runs: dict[str, tuple[Path, int]], path: Path) -> str | None:
    """``runs``: {label: (training folder, step offset)}; a run continuing from another is drawn
    from the step where that one stopped."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    drawn = False
    for name, (out, offset) in runs.items():
        metrics = out / "metrics.jsonl"
        if not metrics.exists():
            continue
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "loss" in r and "step" in r]
        if rows:
            ax.plot([offset + r["step"] for r in rows], [r["loss"] for r in rows], label=name)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step (a continuing run starts where its teacher stopped)")
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


def _fmt(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _quality_lines(quality: dict | None, min_score: float, bar: float) -> list[str]:
    if not quality:
        return []
    lines = ["Scored against the world's true boxes (`web_truth.json`, which training never reads): a "
             "pseudo box is correct when it overlaps the object its phrase names with IoU ≥ 0.5.", "",
             "| classes | pseudo boxes | correct | precision | mentioned objects | recall |", "|---|---|---|---|---|---|"]
    for group in ("rare", "common"):
        q = quality[group]
        lines.append(f"| {group} | {q['boxes']} | {q['correct']} | {_fmt(q['precision'])} | {q['mentioned']} | "
                     f"{_fmt(q['recall'])} |")
    lines += ["", f"(All stored boxes, score ≥ {min_score}; {quality['unmatched']} more ground phrases "
                  "that name no object, such as scene phrases.)", "",
              "By score: *above* = the boxes a student with that bar reads (score > bar; recall against "
              "every mentioned object), *bin* = those scoring between this bar and the next.", "",
              "| bar | rare above | rare precision | rare recall | rare bin precision | common above | "
              "common precision | common recall | common bin precision |", "|---" * 9 + "|"]
    for row in quality.get("by_score", []):
        if row["bar"] < min_score or not (row["above"]["rare"]["boxes"] or row["above"]["common"]["boxes"]):
            continue
        cells = []
        for group in ("rare", "common"):
            above, inside = row["above"][group], row["bin"][group]
            cells += [str(above["boxes"]), _fmt(above["precision"]), _fmt(above["recall"]),
                      f"{_fmt(inside['precision'])} ({inside['boxes']})"]
        mark = " **(student's bar)**" if abs(row["bar"] - bar) < 1e-9 else ""
        lines.append(f"| {row['bar']:g}{mark} | " + " | ".join(cells) + " |")
    return lines + [""]


def _metric_rows(results: dict) -> list[tuple[str, str | None, dict]]:
    """(label, bootstrap metric key or None, {model: value}) per reported metric."""
    rows = []
    for label, key in (("AP", "AP"), ("AP50", "AP50"), ("APr (rare)", "APr"), ("APc", "APc"), ("APf", "APf")):
        rows.append((label, key if key != "AP50" else None, {m: r["detection"].get(key) for m, r in results.items()}))
    for proto in ("any_box", "merged_box"):
        rows.append((f"R@1 {proto}", None, {m: _recall(r["grounding"], proto) for m, r in results.items()}))
    return rows


def _diff(a, b, noise: dict | None = None) -> str:
    if a is None or b is None:
        return "n/a"
    text = f"{100 * (a - b):+.1f}"
    return text + (f" (± {100 * noise['sd']:.1f})" if noise else "")


def _verdict(results: dict, base: str) -> str:
    s_ap, b_ap = results["student"]["detection"].get("AP"), results[base]["detection"].get("AP")
    better = s_ap is not None and b_ap is not None and s_ap > b_ap
    return f"The student's held-out AP {'exceeds' if better else 'does NOT exceed'} the {base}'s in this round."


def _round_lines(cfg: SelfTrainConfig, r: dict) -> list[str]:
    results, noise = r["results"], (r.get("noise") or {})
    models = list(results)
    # the differences shown: student − teacher, student − control (and oracle − control)
    diffs = [("student", m) for m in ("teacher", "control") if m in results]
    diffs += [("oracle", "control")] if "oracle" in results and "control" in results else []
    bases = [b for a, b in diffs if a == "student"]
    lines = [f"## Round {r['round']}", "",
             "| metric | " + " | ".join(models) + " | " + " | ".join(f"{a} − {b}" for a, b in diffs) + " |",
             "|---" * (1 + len(models) + len(diffs)) + "|"]
    for label, key, values in _metric_rows(results):
        cells = [_diff(values[a], values[b], (noise.get("pairs", {}).get(f"{a} - {b}") or {}).get(key)
                       if key else None) for a, b in diffs]
        lines.append(f"| {label} | " + " | ".join(_fmt(values[m]) for m in models) + " | " + " | ".join(cells) + " |")
    if noise:
        lines += ["", f"(± x: the standard deviation of that difference over {noise['resamples']} paired bootstrap "
                      f"resamples of the {noise['images']} held-out images, every model scored on the same draw: "
                      "the evaluation noise to read the difference against.)"]
    spread = r.get("training_spread")
    if spread:
        seeds = ", ".join(str(v) for v in spread["seeds"].values())

        def row(key):
            values = ", ".join(_fmt(v) for v in spread[key]["values"])
            return f"{key} {values} (SD {_fmt(spread[key]['sd'])})"

        lines += ["", f"Training spread: the control trained {len(spread['seeds'])} times, with data-order seeds "
                      f"{seeds} (same initialisation and steps): {'; '.join(row(k) for k in ('AP', 'APr', 'APf'))}. "
                      "That is how far a single training moves when only its sample stream changes, which the "
                      "± above does not include: read student − control against both."]
    lines += [""] + [_verdict(results, b) for b in bases] + [""]
    if r.get("oracle_shards"):
        o = r["oracle_shards"]
        lines += [f"Oracle shards: the {o['samples']} pseudo-labelled web images of this round with "
                  f"{o['boxes']} true boxes (the teacher stored {o['teacher_boxes']} boxes scoring ≥ "
                  f"{cfg.teacher_min_score} on them).", ""]
    lines += ["Lineage (sha256 of each checkpoint folder):", "", "| model | checkpoint | sha256 |", "|---|---|---|"]
    lines += [f"| {name} | `{node['model']}` | `{node['sha256'][:16]}` |" for name, node in r["lineage"].items()]
    label = r["label"]
    lines += ["", f"Pseudo labels of this round's teacher: web images read {label['read']}, kept {label['kept']} "
                  f"(with ≥ 1 box scoring ≥ {cfg.teacher_min_score}), boxes {label['boxes']}.", ""]
    lines += _quality_lines(r.get("quality"), cfg.teacher_min_score, r["score_bar"])
    lines += [f"**The student's score bar: {r['score_bar']:g}** ({r['score_bar_why']})."]
    if cfg.score_bar is ScoreBar.RARE_PRECISION:
        lines += ["", "Said plainly: this bar was chosen from the curve above, i.e. with the world's true boxes of "
                      "the web images. Training never reads those boxes, but the choice of the bar does (a "
                      "hyper-parameter picked on analysis data, once per round, by the rule in "
                      "`synth.truth.score_bar_for_precision`)."]
    return lines + [""]


def write_report(cfg: SelfTrainConfig, root: Path, extras: dict) -> str:
    rounds = extras["rounds"]
    lines = ["# Self-training in a miniature world", "",
             f"Seed {cfg.seed}. World: `{cfg.world}` {cfg.world_overrides or ''}; trainer: `{cfg.train}`; "
             f"{len(rounds)} round(s). All numbers measured by `pipeline selftrain` in this run (held-out "
             "evaluation set, COCO-style AP ×100, grounding Recall@1 ×100).", ""]
    init = ("continue from the teacher's weights" if cfg.student_init is StudentInit.TEACHER
            else "start from the pretrained parts, as the teacher did")
    mix = (f"{cfg.pseudo_per_batch} pseudo samples added to every batch of the control's gold samples"
           if cfg.pseudo_per_batch else f"mixture weights 1 : 1 : {cfg.pseudo_weight:g}")
    if cfg.pseudo_loss_weight is not None:
        mix += (f", their loss divided by their own positives and weighted {cfg.pseudo_loss_weight:g} "
                "(the gold samples' loss is the control's)")
    if not cfg.pseudo_box_loss:
        mix += "; the pseudo boxes teach the token loss only (no box regression or centerness loss)"
    if cfg.max_novel_phrases:
        mix += (f"; the boxes of an image grounding more than {cfg.max_novel_phrases} phrase(s) naming no "
                "detection-set class left out")
    lines += ["- teacher: round 1, trained on the detection + grounding sets; round k > 1, the student of round k − 1.",
              f"- student: the trainer settings on detection + grounding + the round teacher's pseudo-labelled web "
              f"shards ({mix}; pseudo boxes scoring above the round's bar; "
              f"phrases left without a box: {cfg.unlabelled_phrases.value}; boxes of phrases naming a "
              f"detection-set class: {cfg.known_phrases.value}); its steps {init}."]
    if cfg.control:
        lines.append("- control: the student exactly (same initialisation, steps, seed) but without the pseudo "
                     "source, so student − control is what the pseudo labels add, not what more steps add.")
    if cfg.oracle:
        lines.append("- oracle: the student trained on the world's true boxes of the same web images instead of "
                     "the teacher's pseudo labels (same steps, mixture and bar): what perfect pseudo labels add "
                     "in this budget.")
    lines.append("")
    if len(rounds) > 1:
        models = ("teacher", "control", "student") + (("oracle",) if cfg.oracle else ())
        lines += ["| round | " + " | ".join(f"{m} {k}" for k in ("AP", "APr") for m in models) + " |",
                  "|---" * (1 + 2 * len(models)) + "|"]
        for r in rounds:
            res = r["results"]
            cells = [_fmt(res[m]["detection"].get(k)) if m in res else "n/a"
                     for k in ("AP", "APr") for m in models]
            lines.append(f"| {r['round']} | " + " | ".join(cells) + " |")
        lines.append("")
    for r in rounds:
        lines += _round_lines(cfg, r)
    if extras.get("loss_plot"):
        lines += [f"![loss]({extras['loss_plot']})", ""]
    if extras.get("gallery"):
        lines += [f"Gallery of the last round's pseudo labels: [{extras['gallery']}]({extras['gallery']})", ""]
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
