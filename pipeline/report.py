"""``pipeline stats OUTPUT``: totals, drop reasons and PNG plots from a run's statistics.

Reads only what the run wrote (``stats.json`` and the per-shard ``*.parquet`` files), the same
files duckdb, pandas or Ray Data read.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import OutputDir, StorageError


@dataclass
class StatsReport:
    totals: dict[str, Any]
    table: pa.Table            # every attempted sample of every committed shard
    plots: list[str]           # written PNG paths


def load_rows(out: OutputDir) -> pa.Table:
    names = [n for n in out.list("*.parquet")]
    tables = []
    for name in names:
        data = out.read_bytes(name)
        if data is not None:
            tables.append(pq.read_table(io.BytesIO(data)))
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="default")


def format_totals(totals: dict[str, Any]) -> str:
    read, kept, dropped = totals.get("read", 0), totals.get("kept", 0), totals.get("dropped", 0)
    pct = (lambda n: f"{100.0 * n / read:5.1f}%") if read else (lambda n: "   - ")
    lines = [
        f"shards   {totals.get('shards', 0):>10}",
        f"read     {read:>10}",
        f"kept     {kept:>10}  {pct(kept)}",
        f"dropped  {dropped:>10}  {pct(dropped)}",
    ]
    reasons = {k: v for k, v in (totals.get("drops") or {}).items() if v}
    if reasons:
        lines.append("drop reasons:")
        for reason, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {reason:<22}{n:>8}  {pct(n)}")
    for key in ("phrases", "boxes"):
        if totals.get(key) is not None:
            lines.append(f"{key:<9}{totals[key]:>10}")
    return "\n".join(lines)


def _bar(ax, labels, values, title, xlabel):
    ax.barh(labels, values, color="#4C72B0")
    ax.set_title(title)
    ax.set_xlabel(xlabel)


def write_plots(table: pa.Table, totals: dict[str, Any], plot_dir: str) -> list[str]:
    import os

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    written: list[str] = []

    def save(fig, name):
        path = os.path.join(plot_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    reasons = {k: v for k, v in (totals.get("drops") or {}).items() if v}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if reasons:
        items = sorted(reasons.items(), key=lambda kv: kv[1])
        _bar(ax, [k for k, _ in items], [v for _, v in items], "Drop reasons", "samples")
    else:
        ax.text(0.5, 0.5, "no sample was dropped", ha="center", va="center")
        ax.set_axis_off()
    save(fig, "drop_reasons.png")

    if table.num_rows == 0:
        return written
    kept = table.filter(pa.compute.equal(table["status"], "kept"))
    columns = [("n_phrases", "Phrases per caption (kept)", "phrases_per_caption.png", kept),
               ("caption_chars", "Caption length in characters (all read)", "caption_length.png", table),
               ("n_boxes", "Boxes per image (kept)", "boxes_per_image.png", kept)]
    for column, title, name, source in columns:
        values = [v for v in source[column].to_pylist() if v is not None] if column in source.column_names else []
        if column == "n_boxes" and not any(values):
            continue          # no teacher in this DAG: nothing to show
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if values:
            lo, hi = min(values), max(values)
            bins = range(lo, hi + 2) if hi - lo < 60 else 40
            ax.hist(values, bins=bins, color="#55A868", edgecolor="white", align="left")
        ax.set_title(title)
        ax.set_ylabel("samples")
        save(fig, name)
    if "max_score" in table.column_names:
        scores = [v for v in kept["mean_score"].to_pylist() if v is not None]
        if scores:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.hist(scores, bins=40, range=(0, 1), color="#C44E52", edgecolor="white")
            ax.set_title("Mean box score per kept sample")
            ax.set_xlabel("score")
            save(fig, "score_histogram.png")
    return written


def stats(output: str, plot_dir: str | None = None, storage_options: dict | None = None) -> StatsReport:
    """Totals from ``OUTPUT/stats.json`` plus plots from the per-shard Parquet rows."""
    out = OutputDir(output, storage_options or {})
    totals = out.read_json("stats.json")
    if totals is None:
        raise StorageError(f"{output} has no stats.json: is it the output.path of a `pipeline run`?")
    table = load_rows(out)
    if table.num_rows and table.num_rows != totals.get("read"):
        raise StorageError(f"{output}: the Parquet files hold {table.num_rows} rows but stats.json "
                           f"counts {totals.get('read')} read samples; rerun `pipeline run` to repair")
    if plot_dir is None:
        plot_dir = out.path("plots") if out.local else "plots"
    plots = write_plots(table, totals, plot_dir)
    return StatsReport(totals=totals, table=table, plots=plots)
