"""The ``pipeline`` command. Each sub-command is one call of the Python API (``pipeline.api``).

    pipeline run CONFIG [key=value ...]     the stage DAG over web shards
    pipeline stats OUTPUT [--plots DIR]     totals, drop reasons and PNG plots of a run
    pipeline demo [key=value ...]           generate a small web-shard sample and run the DAG on it
    pipeline eval [CONFIG] [key=value ...]  detection AP / grounding recall of a checkpoint
    pipeline predict IMAGE --checkpoint C (--classes A B ... | --caption TEXT) [--out PNG]
    pipeline show OUTPUT [--out DIR] [-n 24]  an HTML gallery of pseudo-labelled samples
    pipeline export OUTPUT --format odvg|mdetr --out DIR   for other grounding trainers
    pipeline train CONFIG [key=value ...] [--resume]   the student trainer (Ray Train)
    pipeline finetune CONFIG [key=value ...] [--resume]   a released GLIP on your COCO data
    pipeline world CONFIG OUT [key=value ...]   build the miniature world (configs/world/*.yaml)
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from core.config import ConfigError
from pipeline.storage import StorageError


def _split_config(args: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] key=value ...``: the first argument is the config file unless it has a '='."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _cmd_run(ns: argparse.Namespace) -> int:
    from pipeline import api
    config, overrides = _split_config(ns.args)
    summary = api.run(config, overrides)
    print(api.format_summary(summary))
    return 0 if summary.ok else 1


def _cmd_stats(ns: argparse.Namespace) -> int:
    from pipeline import api
    report = api.stats(ns.output, plot_dir=ns.plots)
    print(api.format_stats(report))
    return 0


def _cmd_demo(ns: argparse.Namespace) -> int:
    from pipeline import api
    summary, report = api.demo(ns.args)
    print(api.format_summary(summary))
    print()
    print(api.format_stats(report))
    return 0 if summary.ok else 1


def _cmd_eval(ns: argparse.Namespace) -> int:
    from pipeline.evaluation import load_eval_config, run_eval
    from evaluation.detection import format_metrics_table
    config, overrides = _split_config(ns.args)
    metrics = run_eval(load_eval_config(config, overrides))
    print(format_metrics_table(metrics, title=f"{metrics['kind']}: {metrics['checkpoint']}"))
    print("written: " + ", ".join(metrics["written"]))
    return 0


def _cmd_predict(ns: argparse.Namespace) -> int:
    from pipeline import api
    result = api.predict(ns.image, checkpoint=ns.checkpoint, model=ns.model, classes=ns.classes,
                         caption=ns.caption, out=ns.out, min_score=ns.min_score,
                         overrides=ns.override or [])
    for box, score, phrase in zip(result["boxes"], result["scores"], result["phrases"]):
        print(f"{score:6.3f}  {phrase:<30} [{', '.join(f'{v:.1f}' for v in box)}]")
    if result.get("out"):
        print(f"drawn: {result['out']}")
    return 0


def _cmd_show(ns: argparse.Namespace) -> int:
    from pipeline import api
    summary = api.show(ns.output, out=ns.out, n=ns.n, seed=ns.seed, min_score=ns.min_score)
    print(f"gallery: {summary['index']} ({summary['shown']} of {summary['eligible']} samples)")
    return 0


def _cmd_export(ns: argparse.Namespace) -> int:
    from pipeline import api
    summary = api.export(ns.output, out=ns.out, fmt=ns.format, min_score=ns.min_score)
    print(f"{summary['format']}: {summary['annotations']} ({summary['images']} images, "
          f"{summary['boxes']} boxes; {summary['skipped_no_boxes']} images without a box skipped)")
    return 0


def _cmd_train(ns: argparse.Namespace) -> int:
    from pipeline import api
    from pipeline.train import TrainError, format_train_summary
    config, overrides = _split_config(ns.args)
    try:
        summary = api.train(config, overrides, resume=ns.resume)
    except TrainError as exc:
        if ns.debug:
            raise
        print(f"pipeline train: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    print(format_train_summary(summary))
    return 0


def _cmd_finetune(ns: argparse.Namespace) -> int:
    from pipeline import api
    from pipeline.finetune import format_finetune
    config, overrides = _split_config(ns.args)
    print(format_finetune(api.finetune(config, overrides, resume=ns.resume)))
    return 0


def _cmd_selftrain(ns: argparse.Namespace) -> int:
    from pipeline import api
    config, overrides = _split_config(ns.args)
    out = api.selftrain(config or str(api.SELFTRAIN_CONFIG), overrides)
    print((Path(out["report"])).read_text())
    print(f"report: {out['report']}")
    return 0


def _cmd_world(ns: argparse.Namespace) -> int:
    from pipeline import api
    print(api.format_world(api.world(ns.config, ns.out, ns.overrides)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline", description="glip-selftrain: GLIP and its self-training data engine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one-line message")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the stage DAG (ingest -> noun phrases -> write) over web shards",
                       description="Run the stage DAG. CONFIG is a YAML file (configs/pipeline/*.yaml); "
                       "any key can be overridden as key=value, dotted for nested keys, e.g. "
                       "output.path=out/run1 ray.num_cpus=2 'input.shards=[data/{00000..00009}.tar]'. "
                       "A rerun into the same output skips committed shards.")
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("stats", help="print a run's totals and drop reasons, write PNG plots",
                       description="Summarise OUTPUT/stats.json and the per-shard Parquet rows; "
                       "plots go to OUTPUT/plots unless --plots says otherwise.")
    p.add_argument("output", help="the output.path of a run (local folder or fsspec URL)")
    p.add_argument("--plots", default=None, help="folder for the PNG plots (default OUTPUT/plots)")
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser("demo", help="generate a small web-shard sample and run the DAG on it",
                       description="Writes synthetic img2dataset shards (with bad samples) to "
                       "out/demo/input, runs configs/pipeline/demo.yaml into out/demo/output and "
                       "prints the statistics. key=value overrides apply to the run config.")
    p.add_argument("args", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("selftrain", help="the whole teacher-student loop in a miniature world (README's main command)",
                       description="world -> train the teacher (detection + grounding) -> pseudo-label the "
                       "web shards -> train the student (+ pseudo shards) -> evaluate both -> "
                       "WORKDIR/REPORT.md. CONFIG defaults to configs/demo.yaml; finished steps are "
                       "skipped on a rerun.")
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value")
    p.set_defaults(func=_cmd_selftrain)

    p = sub.add_parser("eval", help="zero-shot detection AP or phrase-grounding recall of a checkpoint",
                       description="Evaluate a checkpoint (ours or an official GLIP .pth) on COCO-format "
                       "detection or MDETR-format grounding ground truth. Keys: kind=detection|grounding "
                       "checkpoint=... model=glip_t annotations=... image_root=... output=DIR "
                       "batch_size=4 max_dets=100 (300 for LVIS) model_overrides=[...].")
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="detect class names or ground a caption's phrases in one image")
    p.add_argument("image", help="image file")
    p.add_argument("--checkpoint", required=True, help="our checkpoint folder or an official GLIP .pth")
    p.add_argument("--model", default="glip_t", help="config of an official checkpoint (glip_t, glip_l)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--classes", nargs="+", help="class names (detection)")
    group.add_argument("--caption", help="a caption; its noun phrases (spaCy) are grounded")
    p.add_argument("--min-score", type=float, default=0.3, help="drop boxes below this score")
    p.add_argument("--out", default=None, help="write the image with boxes drawn to this PNG")
    p.add_argument("--override", action="append", help="model config key=value (repeatable)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("show", help="an HTML gallery (and PNGs) of samples with their boxes and phrases")
    p.add_argument("output", help="the output.path of a run")
    p.add_argument("--out", default=None, help="gallery folder (default OUTPUT/gallery)")
    p.add_argument("-n", type=int, default=24, help="number of samples (default 24)")
    p.add_argument("--seed", type=int, default=0, help="sample selection seed")
    p.add_argument("--min-score", type=float, default=None, help="hide boxes below this score")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("export", help="export output shards as ODVG jsonl or MDETR JSON + images")
    p.add_argument("output", help="the output.path of a run")
    p.add_argument("--format", required=True, choices=["odvg", "mdetr"])
    p.add_argument("--out", required=True, help="export folder (annotations + images/)")
    p.add_argument("--min-score", type=float, default=None, help="drop boxes below this score")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("train", help="train a GLIP student on a weighted mixture of sources (Ray Train)",
                       description="Train with configs/train/*.yaml (model, init, data.sources, solver, output, "
                       "ray). Any key can be overridden as key=value, e.g. output=out/t1 max_iter=100 "
                       "ray.num_workers=2 data.sources.o365.annotations=/data/o365.json. Checkpoints go to "
                       "OUTPUT/checkpoints, metrics to OUTPUT/metrics.jsonl and OUTPUT/tensorboard, the "
                       "trained model to OUTPUT/model (and OUTPUT/model_ema).")
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUTPUT from its newest checkpoint (same step, lr and data position)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("finetune", help="fine-tune or prompt-tune a GLIP on a COCO-format data set, evaluated as it goes",
                       description="Zero-shot AP of init_checkpoint on data.val, then training with tuning=full|prompt|"
                       "linear_probe|head, AP on data.val every eval_every steps, the best model kept in OUTPUT/best, "
                       "early stopping after `patience` evaluations without a better AP, and the table at the end. "
                       "E.g. pipeline finetune configs/finetune/coco.yaml init_checkpoint=glip_tiny.pth model=glip_t "
                       "data.train.annotations=train.json data.train.image_root=images/ data.val.annotations=val.json "
                       "data.val.image_root=images/ output=out/ft shots=5.")
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value")
    p.add_argument("--resume", action="store_true", help="continue the run in OUTPUT from its newest checkpoint")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("world", help="build the seeded miniature world (detection, grounding, web shards, held-out set)",
                       description="Builds the world of CONFIG (configs/world/*.yaml) in OUT, replacing a world "
                       "there; key=value overrides apply to the world config, e.g. seed=1 web_images=1200.")
    p.add_argument("config", help="world YAML, e.g. configs/world/default.yaml")
    p.add_argument("out", help="folder to build the world in")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_world)
    return parser


_USER_ERRORS = (("stages.readers.common", "DatasetFormatError"), ("model.checkpoint", "CheckpointError"),
                ("trainer.data.accounting", "MissingImagesError"), ("evaluation.grounding", "EvaluationInputError"))


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user fixes (config, data, checkpoint, storage): one line and exit 2, no traceback.
    A class can only have been raised if its module was imported, so only those are looked up
    (a config error does not import torch to be printed)."""
    found = [getattr(sys.modules[m], name) for m, name in _USER_ERRORS if m in sys.modules]
    return (ConfigError, StorageError, *found)


def _one_line(exc: BaseException) -> str:
    from pipeline.errors import strip_ansi
    return " ".join(strip_ansi(str(exc)).split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv                         # accepted after the sub-command too
    ns = parser.parse_args([a for a in argv if a != "--debug"])
    ns.debug = debug
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return ns.func(ns)
    except _user_errors() as exc:
        if ns.debug:
            raise
        print(f"pipeline {ns.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pipeline {ns.command}: interrupted; committed shards are kept, rerun to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
