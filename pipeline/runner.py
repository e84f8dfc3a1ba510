"""The stage DAG on Ray Core: read -> the config's stages, in order -> write, one input shard at a time.

Why Ray Core and not Ray Data: the input shard is the unit of parallelism, resume and commit.
Each shard flows as one object through

    read task (+ the leading stages with resources.actors 0)
      -> one hop per further stage: its actors (set up once each) or, with actors 0, a task
      -> write task

The runner knows no stage by name: ``cfg.stages`` lists them and ``stages/registry.py`` builds
them; each stage's ``resources`` say how it is hosted.

The write task commits the shard: its data files, then its record (``NAME_stats.json``, see
``pipeline/manifest.py``). The driver adds the record to the manifest in memory (O(1)) and
compacts the new records into the manifest every ``output.compact_every_s`` seconds, every
``output.compact_every_shards`` records and at the end; what it holds per run stays bounded
(``Commits``: counts and times, not a list of every shard). Actors
restart and their calls are retried when a worker dies; a shard whose objects died with a node is
resubmitted (``ray.shard_retries``); one that still fails is reported, left uncommitted, and
redone by the next run. Output bytes depend only on the shard's content and the stage configs,
never on scheduling or retries, so a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import RunConfig
from pipeline.errors import root_cause
from pipeline.manifest import Manifest, ShardRecord, stats_name
from pipeline.resume import open_output
from pipeline.storage import OutputDir, StorageError, expand_shards, open_input, sha256_bytes, shard_name
from stages.schema import Sample

log = logging.getLogger("pipeline")


@dataclass
class ShardWork:
    """One input shard in flight: its samples and where they came from."""
    name: str
    input: str
    samples: list[Sample]
    started: float
    read_error: str | None = None


@dataclass
class RunSummary:
    output: str
    shards_total: int
    shards_skipped: int            # committed by an earlier run
    shards_done: int               # committed by this run
    shards_failed: dict[str, str] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    commits: "Commits" = field(default_factory=lambda: Commits())
    startup_s: float = 0.0         # inputs listed + output opened, before the first submission
    resume_s: float = 0.0          # of which: opening the output (listing, manifest, records)

    @property
    def ok(self) -> bool:
        return not self.shards_failed


@dataclass
class Window:
    """The first and the last ``keep`` values of a series, in bounded memory."""
    keep: int = 1000
    first: array = field(default_factory=lambda: array("d"))
    last: deque = field(default_factory=deque)

    def add(self, value: float) -> None:
        if len(self.first) < self.keep:
            self.first.append(value)
        self.last.append(value)
        if len(self.last) > self.keep:
            self.last.popleft()


@dataclass
class Commits:
    """This run's commits in bounded memory: how many, when the first and the last landed
    (seconds since the run started), the samples read after the first (steady-state throughput
    is ``read_after_first / (last_s - first_s)``), and the driver's seconds per commit for the
    first and the last 1,000 commits: ``fetch_s`` getting the result from Ray (``ray.get``),
    ``bookkeeping_s`` recording it (manifest, compaction, progress)."""
    count: int = 0
    first_s: float = 0.0
    last_s: float = 0.0
    read_after_first: int = 0
    fetch_s: Window = field(default_factory=Window)
    bookkeeping_s: Window = field(default_factory=Window)

    def add(self, at_s: float, read: int) -> None:
        if self.count == 0:
            self.first_s = at_s
        else:
            self.read_after_first += read
        self.count += 1
        self.last_s = at_s

    @property
    def steady_rate(self) -> float:
        """Samples per second between the first and the last commit (0 with fewer than two)."""
        span = self.last_s - self.first_s
        return self.read_after_first / span if self.count > 1 and span > 0 else 0.0


# --------------------------------------------------------------------------- work on one shard
# Plain functions: the Ray wrappers below call them, and tests may call them directly.

def read_and_process(url: str, name: str, cfg: RunConfig, stage_names: tuple[str, ...] = ()) -> ShardWork:
    """Read one input shard and run ``stage_names`` (task-hosted stages) over its samples."""
    from stages.shards import read_shard

    started = time.time()
    with open_input(url, cfg.input.storage_options) as fh:
        contents = read_shard(fh, name, source=cfg.input.source)
    work = ShardWork(name=name, input=url, samples=contents.samples, started=started,
                     read_error=contents.error)
    return run_in_task(work, cfg, stage_names)


def run_in_task(work: ShardWork, cfg: RunConfig, stage_names: tuple[str, ...]) -> ShardWork:
    """Task-hosted stages (``resources.actors == 0``): built and set up per shard."""
    for stage_name in stage_names:
        _maybe_inject_failure(stage_name)
        stage = build_stage(stage_name, cfg)
        stage.setup()
        stage(work.samples)
    return work


def write_shard(work: ShardWork, cfg: RunConfig) -> tuple[ShardRecord, dict[str, Any]]:
    """Encode and commit one shard's files; returns its manifest record and stats."""
    from stages.write import encode_parquet, encode_shard, shard_stats, stats_table

    out = OutputDir(cfg.output.path, cfg.output.storage_options)
    tar = encode_shard(work.samples)
    parquet = encode_parquet(stats_table(work.samples))
    labeler = next((s.labeler for s in work.samples if s.labeler is not None), None)
    stats = shard_stats(work.samples, shard=work.name, duration_s=time.time() - work.started,
                        labeler=labeler, read_error=work.read_error)
    stats["files"] = {f"{work.name}.tar": sha256_bytes(tar), f"{work.name}.parquet": sha256_bytes(parquet)}
    stats["input"] = work.input
    out.write_bytes(f"{work.name}.tar", tar)
    out.write_bytes(f"{work.name}.parquet", parquet)
    # The stats file goes last: it is the commit record, so once it is there the shard's data
    # files are complete.
    out.write_json(stats_name(work.name), stats)
    return ShardRecord.from_stats(stats), stats


def build_stage(stage_name: str, cfg: RunConfig):
    """The stage object for ``stage_name`` from its entry in ``cfg.stages``."""
    from stages.registry import stage_spec
    return stage_spec(stage_name).stage_class(cfg.stages[stage_name])


@dataclass(frozen=True)
class Hop:
    """One step of a shard's way: stages run by the same actors (``actors >= 1``, one stage) or
    the same task (``actors == 0``: consecutive task-hosted stages fused)."""
    stages: tuple[str, ...]
    actors: int
    num_cpus: float
    num_gpus: float = 0.0


def plan(cfg: RunConfig) -> tuple[tuple[str, ...], list[Hop]]:
    """(stages fused into the read task, the hops after it), from ``cfg.stages`` in order."""
    leading: list[str] = []
    hops: list[Hop] = []
    for name, stage_cfg in cfg.stages.items():
        res = stage_cfg.resources
        if res.actors == 0:
            if not hops:
                leading.append(name)
            elif hops[-1].actors == 0:
                last = hops[-1]
                hops[-1] = Hop(last.stages + (name,), 0, max(last.num_cpus, res.num_cpus))
            else:
                hops.append(Hop((name,), 0, res.num_cpus))
        else:
            hops.append(Hop((name,), res.actors, res.num_cpus, res.num_gpus))
    return tuple(leading), hops


def _maybe_inject_failure(stage_name: str) -> None:
    """Fault injection for the retry tests: ``PIPELINE_FAIL_ONCE=<stage>:<marker path>`` makes
    the first call of that stage raise (the marker file records that it did)."""
    spec = os.environ.get("PIPELINE_FAIL_ONCE", "")
    if not spec.startswith(stage_name + ":"):
        return
    marker = spec.split(":", 1)[1]
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    raise RuntimeError(f"injected failure in stage {stage_name} (PIPELINE_FAIL_ONCE)")


class StageWorker:
    """Hosts one stage in a Ray actor: ``setup()`` once, then one call per shard."""

    def __init__(self, stage_name: str, cfg: RunConfig) -> None:
        self.stage = build_stage(stage_name, cfg)
        self.stage.setup()

    def process(self, work: ShardWork) -> ShardWork:
        _maybe_inject_failure(self.stage.name)
        self.stage(work.samples)
        return work

    def ready(self) -> bool:
        return True


# --------------------------------------------------------------------------- Ray plumbing

def init_ray(cfg: RunConfig) -> bool:
    """Join or start Ray for this run; True when this call did (and so must stop it)."""
    from pipeline.ray_session import init_ray as _init
    return _init(cfg.ray.address, cfg.ray.num_cpus)


def run(cfg: RunConfig) -> RunSummary:
    """Run the DAG over every input shard not yet committed in ``cfg.output.path``."""
    import ray

    t0 = time.time()
    inputs = expand_shards(cfg.input.shards, cfg.input.storage_options)
    names = [shard_name(u) for u in inputs]
    if len(set(names)) != len(names):
        duplicate = min(n for n, c in Counter(names).items() if c > 1)
        raise StorageError(f"input shards share the name {duplicate!r} (output files are named "
                           "after the input shard); list shards with distinct file names")
    out = OutputDir(cfg.output.path, cfg.output.storage_options)
    state = open_output(out, cfg, inputs)
    manifest = state.manifest
    pending = [(url, name) for url, name in zip(inputs, names) if name not in state.committed]
    summary = RunSummary(output=cfg.output.path, shards_total=len(inputs),
                         shards_skipped=len(inputs) - len(pending), shards_done=0,
                         startup_s=time.time() - t0, resume_s=state.seconds)
    del state, names                   # the committed names: not held while the run goes on
    if pending:
        started_ray = init_ray(cfg)
        try:
            _run_pending(cfg, pending, manifest, out, summary)
        finally:
            if started_ray:
                ray.shutdown()
    manifest.save(out)
    summary.totals = manifest.stats.result()
    out.write_json("stats.json", summary.totals)
    summary.seconds = time.time() - t0
    return summary


def _run_pending(cfg: RunConfig, pending: list[tuple[str, str]], manifest: Manifest, out: OutputDir,
                 summary: RunSummary) -> None:
    import ray
    from tqdm import tqdm

    leading, hops = plan(cfg)
    lead_cpus = max([cfg.ray.task_num_cpus] + [cfg.stages[n].resources.num_cpus for n in leading])
    read_task = ray.remote(num_cpus=lead_cpus, max_retries=3)(read_and_process)
    write_task = ray.remote(num_cpus=cfg.ray.task_num_cpus, max_retries=3)(write_shard)
    pools = [_actor_pool(hop, cfg) if hop.actors else
             ray.remote(num_cpus=hop.num_cpus, max_retries=3, retry_exceptions=True)(run_in_task)
             for hop in hops]
    cfg_ref = ray.put(cfg)
    inflight: dict[Any, tuple[str, str, list[tuple[ActorPool, int]]]] = {}
    queue = deque(pending)
    attempts: Counter = Counter()
    bar = tqdm(total=len(pending), unit="shard", desc="pipeline run", disable=not cfg.progress,
               file=sys.stderr, dynamic_ncols=True)
    kept = read = 0
    t_start = last_compaction = time.time()
    try:
        while queue or inflight:
            while queue and len(inflight) < cfg.ray.max_shards_in_flight:
                url, name = queue.popleft()
                work = read_task.remote(url, name, cfg_ref, leading)
                used = []
                for hop, pool in zip(hops, pools):
                    if not isinstance(pool, ActorPool):
                        work = pool.remote(work, cfg_ref, hop.stages)
                        continue
                    slot = pool.pick()
                    # retry_exceptions: a batch that raised (OOM, a flaky device) is tried again
                    work = pool.actors[slot].process.options(retry_exceptions=True).remote(work)
                    used.append((pool, slot))
                ref = write_task.remote(work, cfg_ref)
                inflight[ref] = (url, name, used)
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                url, name, used = inflight.pop(ref)
                for pool, slot in used:
                    pool.load[slot] -= 1
                t_fetch = time.perf_counter()
                try:
                    record, stats = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a failed shard must not stop the others
                    attempts[name] += 1
                    if attempts[name] <= cfg.ray.shard_retries:
                        # a node (and the shard's objects or actors on it) died, or a retried
                        # stage still raised: the whole shard again, same bytes
                        log.warning("shard %s: %s; resubmitting (%d/%d)", name, root_cause(exc),
                                    attempts[name], cfg.ray.shard_retries)
                        queue.append((url, name))
                        continue
                    summary.shards_failed[name] = root_cause(exc)     # one line, no ANSI codes
                    log.error("shard %s failed and stays uncommitted: %s", name, summary.shards_failed[name])
                    bar.update(1)
                    continue
                t_commit = time.perf_counter()
                summary.commits.fetch_s.add(t_commit - t_fetch)
                manifest.add(record, stats)
                if (manifest.uncompacted >= cfg.output.compact_every_shards
                        or time.time() - last_compaction >= cfg.output.compact_every_s):
                    manifest.save(out)
                    last_compaction = time.time()
                summary.shards_done += 1
                summary.commits.add(time.time() - t_start, record.read)
                read += record.read
                kept += record.kept
                bar.set_postfix(read=read, kept=kept, refresh=False)
                bar.update(1)
                summary.commits.bookkeeping_s.add(time.perf_counter() - t_commit)
    finally:
        bar.close()
        for pool in pools:
            for actor in getattr(pool, "actors", ()):
                ray.kill(actor)


@dataclass
class ActorPool:
    """The actors of one stage and how many shards each has queued (least-loaded first)."""
    actors: list
    load: list[int]

    def pick(self) -> int:
        slot = min(range(len(self.actors)), key=self.load.__getitem__)
        self.load[slot] += 1
        return slot


def _actor_pool(hop: Hop, cfg: RunConfig) -> ActorPool:
    """Start the actors of a stage; ``num_gpus`` applies when the cluster has GPUs, else the
    stage runs on CPU actors."""
    import ray

    (stage_name,) = hop.stages
    options: dict[str, Any] = {"num_cpus": hop.num_cpus, "max_restarts": -1, "max_task_retries": 3}
    if hop.num_gpus:
        if ray.cluster_resources().get("GPU", 0) > 0:
            options["num_gpus"] = hop.num_gpus
        else:
            log.info("no GPU in the Ray cluster: stage %s runs on CPU actors", stage_name)
    actor_cls = ray.remote(**options)(StageWorker)
    actors = [actor_cls.remote(stage_name, cfg) for _ in range(hop.actors)]
    return ActorPool(actors=actors, load=[0] * hop.actors)
