"""The Python API; the CLI calls exactly these functions.

    from pipeline import api
    summary = api.run("configs/pipeline/noun_phrases.yaml", ["output.path=out/run1"])
    report = api.stats("out/run1")
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline import report as _report
from pipeline import runner
from pipeline.config import RunConfig, config_dir, load_run_config

DEMO_CONFIG = config_dir() / "pipeline" / "demo.yaml"
SELFTRAIN_CONFIG = config_dir() / "demo.yaml"


def run(config: str | os.PathLike | RunConfig | None = None, overrides: list[str] | None = None
        ) -> runner.RunSummary:
    """Run the DAG. ``config`` is a YAML path or a RunConfig; overrides are ``key=value``."""
    if isinstance(config, RunConfig):
        if overrides:
            raise ValueError("overrides apply to a YAML config; edit the RunConfig object instead")
        cfg = config
    else:
        cfg = load_run_config(config, overrides)
    from pipeline.preflight import check_run
    check_run(cfg)
    return runner.run(cfg)


def stats(output: str, plot_dir: str | None = None, storage_options: dict | None = None
          ) -> _report.StatsReport:
    return _report.stats(output, plot_dir=plot_dir, storage_options=storage_options)


def demo(overrides: list[str] | None = None, n_shards: int = 4, samples_per_shard: int = 64
         ) -> tuple[runner.RunSummary, _report.StatsReport]:
    """Generate a small img2dataset sample (with bad samples) and run the DAG on it."""
    from synth.web import write_web_shards

    cfg = load_run_config(DEMO_CONFIG, overrides)
    input_dir = Path(cfg.input.shards[0]).parent
    if not all(Path(p).exists() for p in (input_dir / f"{i:05d}.tar" for i in range(n_shards))):
        write_web_shards(input_dir, n_shards=n_shards, samples_per_shard=samples_per_shard, seed=cfg.seed)
    summary = runner.run(cfg)
    return summary, stats(cfg.output.path)


def finetune(config: str | os.PathLike | None, overrides: list[str] | None = None, resume: bool = False) -> dict:
    """Fine-tune a released GLIP on a COCO-format data set (``pipeline.finetune``); returns the
    summary (zero-shot AP, every evaluation, the best model); ``format_finetune`` prints it."""
    from pipeline.finetune import finetune as _finetune, load_finetune_config

    return _finetune(load_finetune_config(str(config) if config else None, overrides), resume=resume)


def world(config: str | os.PathLike | None, out: str | os.PathLike, overrides: list[str] | None = None):
    """Build the miniature world of ``config`` (configs/world/*.yaml) in ``out``, replacing a
    world there; returns its ``synth.world.WorldManifest``."""
    from core.config import load
    from synth.config import WorldConfig
    from synth.world import build_world

    cfg = load(WorldConfig, config, overrides)
    return build_world(out, cfg, overwrite=True)


def format_world(world) -> str:
    lines = [f"{split:10s} images {c['images']:5d}  " + "  ".join(
        f"{k} {v['instances']}" for k, v in c["per_class"].items()) for split, c in world.counts.items()]
    lines.append(f"built {world.root} in {world.build_seconds:.1f} s")
    return "\n".join(lines)


def format_summary(summary: runner.RunSummary) -> str:
    t = summary.totals or {}
    lines = [
        f"output   {summary.output}",
        f"shards   {summary.shards_total} total: {summary.shards_done} done now, "
        f"{summary.shards_skipped} already committed, {len(summary.shards_failed)} failed",
        f"samples  read {t.get('read', 0)} = kept {t.get('kept', 0)} + dropped {t.get('dropped', 0)}",
        f"time     {summary.seconds:.1f} s",
    ]
    from pipeline.errors import strip_ansi
    for name, err in sorted(summary.shards_failed.items()):
        err = " ".join(strip_ansi(err).split())
        lines.append(f"FAILED   {name}: {err} (rerun to retry; committed shards are kept)")
    return "\n".join(lines)


def format_stats(rep: _report.StatsReport) -> str:
    text = _report.format_totals(rep.totals)
    if rep.plots:
        text += "\nplots:\n" + "\n".join(f"  {p}" for p in rep.plots)
    return text


def predict(image: str, checkpoint: str, model: str = "glip_t", classes: list[str] | None = None,
            caption: str | None = None, out: str | None = None, min_score: float = 0.3,
            overrides: list[str] | None = None) -> dict:
    """One image: detect ``classes`` or ground ``caption``'s noun phrases; optionally draw them."""
    from model.load import load_glip
    from model.predictor import Predictor
    from pipeline.preflight import check_predict

    check_predict(image, checkpoint, model, overrides)
    net, _ = load_glip(checkpoint, model=model, overrides=overrides)
    predictor = Predictor(net, batch_size=1)
    data = Path(image).read_bytes()
    if classes:
        det = predictor.detect([data], classes)[0]
        text = ". ".join(classes)
        starts = [sum(len(c) + 2 for c in classes[:i]) for i in range(len(classes))]
        spans = [[s, s + len(c)] for s, c in zip(starts, classes)]
    else:
        from stages.noun_phrases import NounPhrases, NounPhraseConfig
        from stages.schema import Sample
        sample = Sample(key="image", input_shard="predict", caption=caption)
        NounPhrases(NounPhraseConfig())([sample])
        spans = [list(p.span) for p in sample.phrases]
        det = predictor.ground([data], [caption], [spans])[0]
        text = caption
    keep = det.scores >= min_score
    result = {"boxes": det.boxes[keep].tolist(), "scores": det.scores[keep].tolist(),
              "phrases": [p for p, k in zip(det.phrases, keep.tolist()) if k],
              "tokens_positive": [[spans[int(i)]] for i in det.labels[keep].tolist()]}
    if out:
        from pipeline.gallery import draw_sample
        from PIL import Image
        import io
        im = Image.open(io.BytesIO(data))
        record = {"key": Path(image).stem, "caption": text, "width": im.width, "height": im.height,
                  "boxes": result["boxes"], "scores": result["scores"],
                  "tokens_positive": result["tokens_positive"],
                  "phrases": [{"text": text[a:b], "span": [a, b]} for a, b in spans]}
        draw_sample(record, data).save(out)
        result["out"] = out
    return result


def _output_shards(output: str, storage_options: dict | None) -> list[str]:
    from pipeline.storage import expand_shards
    return expand_shards([output.rstrip("/") + "/*.tar"], storage_options)


def show(output: str, out: str | None = None, n: int = 24, seed: int = 0, min_score: float | None = None,
         storage_options: dict | None = None) -> dict:
    """An HTML gallery of ``n`` samples of a run's output shards (default ``OUTPUT/gallery``)."""
    from pipeline.gallery import gallery_from_shards
    out = out or output.rstrip("/") + "/gallery"
    return gallery_from_shards(_output_shards(output, storage_options), out, n=n, seed=seed,
                               min_score=min_score, storage_options=storage_options)


def export(output: str, out: str, fmt: str, min_score: float | None = None,
           storage_options: dict | None = None) -> dict:
    """Export a run's output shards as ODVG jsonl or MDETR JSON, images alongside."""
    from pipeline.export import export_shards
    return export_shards(_output_shards(output, storage_options), out, format=fmt,
                         storage_options=storage_options, min_score=min_score)


def train(config: str | os.PathLike | None = None, overrides: list[str] | None = None,
          resume: bool = False) -> dict:
    """Train a student (``configs/train/*.yaml`` + ``key=value`` overrides, or a TrainJobConfig);
    ``resume`` continues the run in ``output`` from its newest checkpoint. Returns the summary."""
    from pipeline.train import TrainJobConfig, load_train_job
    from pipeline.train import train as _train

    if isinstance(config, TrainJobConfig):
        if overrides:
            raise ValueError("overrides apply to a YAML config; edit the TrainJobConfig object instead")
        cfg = config
    else:
        cfg = load_train_job(config, overrides)
    return _train(cfg, resume=resume)


def selftrain(config: str | os.PathLike | None = None, overrides: list[str] | None = None) -> dict:
    """The teacher-student loop of ``configs/demo.yaml`` (see pipeline/selftrain.py)."""
    from pipeline.preflight import check_selftrain
    from pipeline.selftrain import load_selftrain_config
    from pipeline.selftrain import selftrain as _selftrain
    cfg = load_selftrain_config(config or SELFTRAIN_CONFIG, overrides)
    check_selftrain(cfg)
    return _selftrain(cfg)
