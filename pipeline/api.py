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


def run(config: str | os.PathLike | RunConfig | None = None, overrides: list[str] | None = None
        ) -> runner.RunSummary:
    """Run the DAG. ``config`` is a YAML path or a RunConfig; overrides are ``key=value``."""
    if isinstance(config, RunConfig):
        if overrides:
            raise ValueError("overrides apply to a YAML config; edit the RunConfig object instead")
        cfg = config
    else:
        cfg = load_run_config(config, overrides)
    return runner.run(cfg)


def stats(output: str, plot_dir: str | None = None, storage_options: dict | None = None
          ) -> _report.StatsReport:
    return _report.stats(output, plot_dir=plot_dir, storage_options=storage_options)


def demo(overrides: list[str] | None = None, n_shards: int = 4, samples_per_shard: int = 64
         ) -> tuple[runner.RunSummary, _report.StatsReport]:
    """Generate a small img2dataset sample (with bad samples) and run the DAG on it."""
    from stages.synthetic import write_web_shards

    cfg = load_run_config(DEMO_CONFIG, overrides)
    input_dir = Path(cfg.input.shards[0]).parent
    if not all(Path(p).exists() for p in (input_dir / f"{i:05d}.tar" for i in range(n_shards))):
        write_web_shards(input_dir, n_shards=n_shards, samples_per_shard=samples_per_shard, seed=cfg.seed)
    summary = runner.run(cfg)
    return summary, stats(cfg.output.path)


def format_summary(summary: runner.RunSummary) -> str:
    t = summary.totals or {}
    lines = [
        f"output   {summary.output}",
        f"shards   {summary.shards_total} total: {summary.shards_done} done now, "
        f"{summary.shards_skipped} already committed, {len(summary.shards_failed)} failed",
        f"samples  read {t.get('read', 0)} = kept {t.get('kept', 0)} + dropped {t.get('dropped', 0)}",
        f"time     {summary.seconds:.1f} s",
    ]
    for name, err in sorted(summary.shards_failed.items()):
        lines.append(f"FAILED   {name}: {err} (rerun to retry; committed shards are kept)")
    return "\n".join(lines)


def format_stats(rep: _report.StatsReport) -> str:
    text = _report.format_totals(rep.totals)
    if rep.plots:
        text += "\nplots:\n" + "\n".join(f"  {p}" for p in rep.plots)
    return text
