"""Shared test set-up: offline model hubs, one Ray session for the whole test run."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil
import tempfile
from pathlib import Path

import pytest

# The most scratch space the suite holds at once (measured: peak 4.2 GB under the base temp
# folder while a passed test's folder is removed as it ends, see pyproject's retention settings),
# plus Ray's session logs, with room to spare.
SCRATCH_NEEDED_GB = 5.0


def pytest_sessionstart(session):
    """Stop before the first test when the temp folder's disk cannot hold the suite: a full disk
    otherwise fails hundreds of tests at set-up with ENOSPC, far from the cause."""
    where = Path(session.config.option.basetemp or tempfile.gettempdir()).resolve()
    while not where.exists():
        where = where.parent
    free_gb = shutil.disk_usage(where).free / 1e9
    if free_gb < SCRATCH_NEEDED_GB:
        pytest.exit(f"the test suite needs about {SCRATCH_NEEDED_GB:g} GB of scratch space under {where} "
                    f"and only {free_gb:.1f} GB is free there: free some (old pytest-of-* folders under "
                    f"{tempfile.gettempdir()} are safe to delete) or point TMPDIR at a larger disk",
                    returncode=1)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray shared by every test that needs one (start-up costs ~5 s).

    Logical CPUs are set above the 2 physical cores so that read/write tasks and stage actors
    (fractional CPUs) can all be scheduled at once, as on a real cluster.
    """
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A `tiny` GLIP (pretrained backbone and text encoder, seeded random head) saved as ours."""
    import torch

    from model.checkpoint import save_pretrained
    from model.config import load_model_config
    from model.glip import build_glip

    torch.manual_seed(0)
    model = build_glip(load_model_config("tiny"))
    return save_pretrained(model, tmp_path_factory.mktemp("teacher") / "tiny")


# An untrained head scores every anchor ~prior_prob (0.01): let every anchor be a candidate so
# the teacher has boxes to keep, filter and check; small test sizes keep CPU time low.
TEACHER_OVERRIDES = ["inference.score_threshold=0.0", "input.min_size_test=128", "input.max_size_test=192"]


@pytest.fixture(scope="session")
def teacher_overrides():
    return list(TEACHER_OVERRIDES)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), so Ray's own processes are found too."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@pytest.fixture
def kill_tree():
    """SIGKILL a subprocess (started with start_new_session=True) and everything below it."""
    import signal

    def kill(proc) -> None:
        tree = [proc.pid] + _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    return kill


@pytest.fixture
def run_until_committed(kill_tree):
    """Start ``pipeline run`` ARGS, SIGKILL its process tree once ``count`` shards are committed
    (their commit records ``NAME_stats.json`` are in ``output``; before the run ends); returns
    how many were committed at the kill."""
    import subprocess
    import sys
    import time

    def run(args: list[str], output, count: int = 1, env=None, timeout: float = 300) -> int:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.time() + timeout
        committed = 0
        while time.time() < deadline and proc.poll() is None:
            committed = len(list(output.glob("*_stats.json")))
            if committed >= count:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        kill_tree(proc)
        return committed

    return run


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module's in-process training: on 2 shared cores two
    threads spin against the other jobs. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def noun_phrase_stage():
    """The default noun-phrase stage, set up once (loading spaCy takes seconds)."""
    from stages.noun_phrases import NounPhrases

    stage = NounPhrases()
    stage.setup()
    return stage
