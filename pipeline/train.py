"""``pipeline train CONFIG [key=value ...] [--resume]``: the student trainer on Ray Train.

The config is ``trainer.config.TrainConfig`` (model, init, data sources, solver, output, ...) plus a
``ray`` section (``TrainRayConfig``). The loop itself is ``trainer.loop.fit``; this module decides
where it runs:

- ``ray.launcher: ray``: Ray Train V2 ``TorchTrainer`` with
  ``ScalingConfig(num_workers, use_gpu, resources_per_worker={"CPU": cpus_per_worker[, "GPU":
  gpus_per_worker]})`` and ``TorchConfig(backend=gloo | nccl)``. Each worker builds the model
  (same seed, so the same initial weights), wraps it with ``ray.train.torch.prepare_model``
  (DDP) and reads its own disjoint part of every source (``trainer.data.sources``). Rank 0 writes
  checkpoints, metrics and the final model. Ray is joined at ``ray.address`` (or
  ``RAY_ADDRESS``) or started locally in this process. The progress bar (loss, lr, img/s) runs
  here, on the driver, fed by rank 0 through a ``ray.util.queue.Queue``.
- ``ray.launcher: in_process``: the same loop in this process as the only worker, no Ray at all
  (debugging, single-GPU or CPU runs).
- ``ray.launcher: auto`` (default): ``in_process`` when ``num_workers`` is 1 and neither
  ``ray.address`` nor ``RAY_ADDRESS`` is set, else ``ray``.

On a multi-node cluster ``output`` must be storage every node reaches (``s3://``, ``gs://``, a
shared file system): rank 0 writes the checkpoints there and on ``--resume`` every worker reads
its own data position and RNG states back from it. Ray Train keeps its own run records under
``ray.storage_path`` (default ``OUTPUT/ray_train`` for local outputs).

Before anything starts, ``preflight`` (``pipeline.preflight.check_train``) checks the config: the
model config loads, every source's annotation file parses, its images are there (on a sample),
the init checkpoint loads, and the output agrees with ``--resume`` (a folder holding checkpoints is
never trained over from scratch; a resume needs the run's number of workers).
"""
from __future__ import annotations

import enum
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from core.config import ConfigError, to_dict
from trainer.config import TrainConfig, load_train_config
from trainer.loop import WorkerContext, fit

__all__ = ["TrainError", "Launcher", "TorchBackend", "TrainRayConfig", "TrainJobConfig", "load_train_job", "preflight",
           "train", "format_train_summary"]

log = logging.getLogger(__name__)


class TrainError(RuntimeError):
    """A worker failed; the message carries the worker's error."""


class Launcher(str, enum.Enum):
    AUTO = "auto"              # in_process for 1 worker without a Ray address, else ray
    RAY = "ray"                # Ray Train TorchTrainer (DDP over num_workers)
    IN_PROCESS = "in_process"  # this process is the only worker; no Ray


class TorchBackend(str, enum.Enum):
    AUTO = "auto"              # nccl with GPUs, gloo without
    GLOO = "gloo"
    NCCL = "nccl"


@dataclass
class TrainRayConfig:
    launcher: Launcher = Launcher.AUTO
    # null: start a local Ray in this process (or join RAY_ADDRESS if set); else a cluster address.
    address: str | None = None
    num_cpus: int | None = None          # local Ray only; null = all cores
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0         # fractional values let 2 workers share a 2-core machine
    gpus_per_worker: float = 1.0         # with use_gpu
    backend: TorchBackend = TorchBackend.AUTO
    storage_path: str | None = None      # Ray Train's own run records; null = OUTPUT/ray_train (local outputs)

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"ray.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ValueError("ray.cpus_per_worker and ray.gpus_per_worker must be >= 0")
        if self.launcher is Launcher.IN_PROCESS and self.num_workers != 1:
            raise ValueError("ray.launcher=in_process runs one worker; set ray.num_workers=1 or launcher=ray")


@dataclass
class TrainJobConfig(TrainConfig):
    ray: TrainRayConfig = field(default_factory=TrainRayConfig)

    def validate(self) -> None:
        super().validate()
        self.ray.validate()
        if self.batch_size % self.ray.num_workers:
            raise ValueError(f"batch_size {self.batch_size} (global) is not divisible by ray.num_workers "
                             f"{self.ray.num_workers}")


def load_train_job(path: str | os.PathLike | None, overrides: list[str] | None = None) -> TrainJobConfig:
    return load_train_config(path, overrides, cls=TrainJobConfig)


def _launcher(cfg: TrainJobConfig) -> Launcher:
    if cfg.ray.launcher is not Launcher.AUTO:
        return cfg.ray.launcher
    if cfg.ray.num_workers == 1 and not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        return Launcher.IN_PROCESS
    return Launcher.RAY


def preflight(cfg: TrainJobConfig, resume: bool) -> dict | None:
    """Raise ConfigError for what would fail later (``pipeline.preflight.check_train``); returns
    the checkpoint pointer (or None)."""
    from pipeline.preflight import check_train
    return check_train(cfg, resume)


# ------------------------------------------------------------------------------------ progress
class _Progress:
    """The driver's tqdm bar: step / max_iter with loss, lr and img/s."""

    def __init__(self, cfg: TrainConfig, start: int):
        from tqdm import tqdm
        self.bar = tqdm(total=cfg.max_iter, initial=start, desc="train", unit="step", file=sys.stderr,
                        disable=not cfg.progress, dynamic_ncols=True)

    def __call__(self, record: dict) -> None:
        if "eval" in record:
            self.bar.write(f"eval at step {record['step']}: {record['eval']}")
            return
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             img_s=f"{record['img_per_s']:.1f}", refresh=False)
        self.bar.update(max(0, record["step"] - self.bar.n))

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------------------------ evaluation hook
def make_eval_fn(cfg: TrainConfig):
    """(model, step) -> {eval name: metrics}: the model is exported to a temporary folder and each
    ``eval.configs`` YAML runs on it (``pipeline eval``), writing into OUTPUT/eval/step_N."""
    if not cfg.eval.every:
        return None

    def evaluate(model, step: int) -> dict:
        import tempfile
        from pathlib import Path

        from model.checkpoint import save_pretrained
        from pipeline.evaluation import load_eval_config, run_eval

        results: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="glip-eval-") as tmp:
            save_pretrained(model, tmp)
            for path in cfg.eval.configs:
                name = Path(path).stem
                ecfg = load_eval_config(path, list(cfg.eval.overrides) + [
                    f"checkpoint={tmp}", f"output={cfg.output.rstrip('/')}/eval/step_{step:08d}",
                    f"name={name}", "progress=false"])
                metrics = run_eval(ecfg)
                results[name] = {k: v for k, v in metrics.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return results

    return evaluate


# ------------------------------------------------------------------------------------ launchers
def _device(cfg: TrainJobConfig):
    import torch
    if cfg.ray.use_gpu:
        if not torch.cuda.is_available():
            raise ConfigError("ray.use_gpu is true but this machine has no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def _run_in_process(cfg: TrainJobConfig, resume: bool, start: int) -> dict:
    progress = _Progress(cfg, start)
    try:
        return fit(cfg, WorkerContext(device=_device(cfg), on_log=progress, eval_fn=make_eval_fn(cfg)),
                   resume=resume)
    finally:
        progress.close()


def _worker_main(config: dict) -> None:
    """One Ray Train worker: rebuild the typed config, join DDP, run ``fit``."""
    import ray.train
    import ray.train.torch

    from core.config import from_dict

    cfg = from_dict(TrainJobConfig, config["cfg"], source="pipeline train (worker)")
    context = ray.train.get_context()
    rank = context.get_world_rank()
    progress_queue = config["queue"]

    def on_log(record: dict) -> None:
        progress_queue.put_nowait(record)

    def wrap(model):
        return ray.train.torch.prepare_model(model, move_to_device=False)

    fit(cfg, WorkerContext(rank=rank, world_size=context.get_world_size(), device=ray.train.torch.get_device(),
                           wrap_model=wrap, on_log=on_log if rank == 0 else None,
                           eval_fn=make_eval_fn(cfg) if rank == 0 else None),
        resume=config["resume"])


def _init_ray(cfg: TrainJobConfig) -> bool:
    """Join or start Ray; True when this call started it (and so must stop it)."""
    from pipeline.ray_session import init_ray
    return init_ray(cfg.ray.address, cfg.ray.num_cpus)


def _storage_path(cfg: TrainJobConfig) -> str | None:
    if cfg.ray.storage_path:
        return cfg.ray.storage_path
    if "://" not in cfg.output or cfg.output.startswith("file://"):
        return os.path.abspath(os.path.join(cfg.output.removeprefix("file://"), "ray_train"))
    return None


def _run_ray(cfg: TrainJobConfig, resume: bool, start: int) -> None:
    import ray
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue

    backend = cfg.ray.backend
    if backend is TorchBackend.AUTO:
        backend = TorchBackend.NCCL if cfg.ray.use_gpu else TorchBackend.GLOO
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    started = _init_ray(cfg)
    try:
        queue = Queue(actor_options={"num_cpus": 0})
    except BaseException:
        if started:
            ray.shutdown()
        raise
    progress = _Progress(cfg, start)
    done = threading.Event()

    def pump() -> None:
        while not done.is_set():
            try:
                progress(queue.get(timeout=0.5))
            except Empty:
                continue
            except Exception:              # noqa: BLE001 - the queue actor went away with Ray
                return

    thread = threading.Thread(target=pump, name="train-progress", daemon=True)
    thread.start()
    try:
        trainer = TorchTrainer(
            _worker_main,
            train_loop_config={"cfg": to_dict(cfg), "resume": resume, "queue": queue},
            scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend=backend.value),
            run_config=RunConfig(name=f"glip-train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                                 storage_path=_storage_path(cfg)))
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as exc:
            from pipeline.errors import root_cause
            raise TrainError(f"training failed on a worker: {root_cause(exc)} (checkpoints so far are kept; "
                             "fix the cause and rerun with --resume)") from None
    finally:
        done.set()
        thread.join(timeout=5)
        while True:                        # the last records
            try:
                progress(queue.get_nowait())
            except Exception:              # noqa: BLE001 - empty, or Ray is gone
                break
        progress.close()
        ray.kill(queue.actor)
        if started:
            ray.shutdown()


def train(cfg: TrainJobConfig, resume: bool = False) -> dict:
    """Run the trainer; returns the summary rank 0 wrote to OUTPUT/train_summary.json."""
    import json

    from fsspec.core import url_to_fs

    pointer = preflight(cfg, resume)
    start = int(pointer["step"]) if (resume and pointer) else 0
    t0 = time.time()
    launcher = _launcher(cfg)
    if launcher is Launcher.IN_PROCESS:
        summary = _run_in_process(cfg, resume, start)
    else:
        _run_ray(cfg, resume, start)
        fs, path = url_to_fs(f"{cfg.output.rstrip('/')}/train_summary.json", **cfg.storage_options)
        with fs.open(path, "r") as fh:
            summary = json.load(fh)
    summary = dict(summary, launcher=launcher.value, workers=cfg.ray.num_workers, start_step=start,
                   seconds=round(time.time() - t0, 1))
    return summary


def format_train_summary(summary: dict) -> str:
    lines = [f"output      {summary['output']}",
             f"steps       {summary['start_step']} -> {summary['step']} ({summary['launcher']}, "
             f"{summary['workers']} worker(s), {summary['seconds']} s)",
             f"last loss   {summary['loss']:.4f}",
             f"checkpoint  {summary.get('checkpoint')}",
             f"model       {summary.get('model')}"]
    if summary.get("model_ema"):
        lines.append(f"model_ema   {summary['model_ema']}")
    if summary.get("counters"):
        lines.append("skipped     " + ", ".join(f"{k} {v}" for k, v in sorted(summary["counters"].items())))
    if summary.get("data"):
        from trainer.data.accounting import format_accounting
        lines += [f"{'data' if i == 0 else '':<12}{line}" for i, line in enumerate(format_accounting(summary["data"]))]
    return "\n".join(lines)
