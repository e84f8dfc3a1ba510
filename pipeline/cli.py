"""The ``pipeline`` command. Each sub-command is one call of the Python API (``pipeline.api``).

    pipeline run CONFIG [key=value ...]     the stage DAG over web shards
    pipeline stats OUTPUT [--plots DIR]     totals, drop reasons and PNG plots of a run
    pipeline demo [key=value ...]           generate a small web-shard sample and run the DAG on it
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from model.typed_config import ConfigError
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline", description="glip-selftrain: GLIP and its self-training data engine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return ns.func(ns)
    except (ConfigError, StorageError) as exc:
        print(f"pipeline {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pipeline {ns.command}: interrupted; committed shards are kept, rerun to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
