"""Run the DAG on a Ray cluster of a head and two worker nodes on loopback, and remove a worker
node (SIGKILL of its raylet and workers) while shards are in flight.

    python tests/pipeline/cluster_job.py SHARD_GLOB OUTPUT  -> one JSON line on stdout

Used by ``tests/pipeline/test_cluster.py`` in its own process (the test session has its own Ray).
The head has no CPUs, so every task and actor runs on the worker nodes; the node removed is one
that hosts a stage actor.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _stage_actor_nodes() -> set[str]:
    """The nodes hosting a live stage actor (from the GCS: the state API needs a dashboard)."""
    from ray._private import state

    return {info["Address"]["NodeID"] for info in state.actors().values()
            if info.get("State") == "ALIVE" and "StageWorker" in info.get("ActorClassName", "")}


def main(shard_glob: str, output: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.config import load_run_config

    t0 = time.time()
    # a dead node is noticed after ~5 s of missed health checks (Ray's default waits longer)
    system = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "_system_config": system})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    started_s = time.time() - t0
    cfg = load_run_config(None, [f"input.shards=[{shard_glob}]", f"output.path={output}", "progress=false",
                                 "input.source=test", "ray.max_shards_in_flight=4",
                                 "stages.noun_phrases.resources.actors=2",
                                 "stages.noun_phrases.resources.num_cpus=0.25",
                                 "ray.task_num_cpus=0.25", "output.compact_every_s=0"])
    try:
        return {"cluster_start_s": round(started_s, 1),
                **_run_and_remove_a_node(cluster, workers, cfg, Path(output))}
    finally:
        ray.shutdown()
        cluster.shutdown()


def _run_and_remove_a_node(cluster, workers, cfg, out: Path) -> dict:
    import ray

    from pipeline import runner

    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = runner.run(cfg)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            result["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 240
    while not list(out.glob("*_stats.json")) and time.time() < deadline and thread.is_alive():
        time.sleep(0.05)
    actor_nodes = _stage_actor_nodes()
    victim = next((w for w in workers if w.node_id in actor_nodes), workers[0])
    committed_before = len(list(out.glob("*_stats.json")))
    cluster.remove_node(victim, allow_graceful=False)
    thread.join(timeout=300)
    report = {"committed_before_removal": committed_before, "victim_had_actor": victim.node_id in actor_nodes,
              "alive_nodes": len([n for n in ray.nodes() if n["Alive"]])}
    if "summary" in result:
        s = result["summary"]
        report.update(ok=s.ok, failed=s.shards_failed, done=s.shards_done, skipped=s.shards_skipped,
                      commits=s.commits.count, totals_read=s.totals.get("read"))
    else:
        report["error"] = result.get("error", "the run did not finish in 300 s")
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
