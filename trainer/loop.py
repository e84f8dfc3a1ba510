"""The student trainer's loop, plain PyTorch (no Ray): the official solver, one step, the loop.

The solver follows the official GLIP ("Solver details" in docs/architecture.md):

- AdamW (default betas/eps). ``param_groups``: every trainable tensor gets ``lr``; tensors of the
  text encoder (``language.*``, the official ``language_backbone``) get ``lang_lr``; any tensor
  with "bias" in its name (also ``head.bias_lang`` and ``head.bias0``, as officially) gets x
  ``bias_lr_factor`` (2) and ``bias_weight_decay`` (0). Frozen tensors are left out. Tensors
  with equal (lr, weight decay) share a group (the official makes one group per tensor: same
  updates, but fused AdamW is much faster with few groups).
- ``lr_factor``: WarmupMultiStepLR, linear warmup ``warmup_factor * (1 - a) + a`` with
  ``a = step / warmup_iters``, then x ``gamma`` at ``round(f * max_iter)`` for each ``f`` in
  ``steps``; ``step`` counts the optimizer updates done before this one (the first uses
  ``warmup_factor``).
- ``train_step`` (``trainer.step``): one update, guarded.
- ``fit``: the loop of one worker. Checkpoints every ``checkpoint_every`` steps and at the end
  (``trainer.state``: model, optimizer, step, scaler, EMA, every worker's data position and
  RNG states); ``resume=True`` continues from the newest one exactly: same step, learning rate,
  data position and random streams. Rank 0 writes checkpoints, metrics and the final model
  (``OUTPUT/model``, and ``OUTPUT/model_ema`` with EMA: ``save_pretrained`` folders that
  ``pipeline eval`` / ``predict`` / the teacher stage load).

The distributed parts go through ``torch.distributed`` when it is initialised (Ray Train sets it
up; ``pipeline/train.py``), so the same ``fit`` runs in-process with one worker.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from core.device import Precision
from trainer.config import (EvalWeights, InitKind, TrainConfig, check_resumable, model_config,  # noqa: F401
                            public_config, resume_config)
from trainer.data.accounting import summarize
from trainer.data.sources import BatchPrefetcher, TrainStream
from trainer.solver import ModelEma, lr_factor, make_optimizer, milestones, param_groups  # noqa: F401
from trainer.state import CheckpointStore, MetricsLog, rng_state, set_rng_state, write_json
from trainer.step import StepResult, StepStatus, distributed as _distributed, train_step  # noqa: F401

__all__ = ["build_model", "WorkerContext", "fit"]

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


def build_model(cfg: TrainConfig, load_weights: bool = True):
    """The student as ``init`` says (``load_weights=False``: architecture only, e.g. for a resume),
    its trainable parameters as ``tuning`` says (``trainer.tuning``)."""
    from model.checkpoint import load_into
    from model.glip import build_glip
    from model.prompt_tuning import attach
    from trainer.tuning import apply_tuning

    mcfg = model_config(cfg)
    if not load_weights or cfg.init is InitKind.SCRATCH:
        return apply_tuning(build_glip(mcfg, load_weights=False), cfg.tuning)
    if cfg.init is InitKind.PRETRAINED_PARTS:
        return apply_tuning(build_glip(mcfg, load_weights=True), cfg.tuning)
    from model.load import load_glip
    source, _ = load_glip(cfg.init_checkpoint, cfg.init_checkpoint_format, model=cfg.model,
                          overrides=cfg.model_overrides)
    model = build_glip(mcfg, load_weights=False)
    if source.prompt_tuning is not None:                  # a prompt-tuned checkpoint keeps its prompt
        attach(model)
    load_into(model, source.state_dict(), strict=True)
    return apply_tuning(model, cfg.tuning)


# ------------------------------------------------------------------------------------ the loop
@dataclass
class WorkerContext:
    """What the launcher tells ``fit``: who this worker is, and its hooks."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m      # e.g. ray.train.torch.prepare_model
    on_log: Callable[[dict], None] | None = None                    # rank 0: every metrics record
    eval_fn: Callable[[nn.Module, int], dict] | None = None         # rank 0: (model, step) -> metrics
    stop_fn: Callable[[dict], bool] | None = None                   # rank 0: eval metrics -> stop now (early stopping)


def _gather(obj: Any) -> list:
    if not _distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _mean_over_workers(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not _distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fit(cfg: TrainConfig, ctx: WorkerContext | None = None, resume: bool = False) -> dict:
    """Train on this worker until ``max_iter``; returns the summary (rank 0 writes it too)."""
    from model.checkpoint import save_pretrained
    from model.criterion import GLIPCriterion

    ctx = ctx or WorkerContext()
    cfg.validate()
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {ctx.world_size} workers")
    if cfg.eval.every and ctx.rank == 0 and ctx.eval_fn is None:
        raise ValueError("eval.every is set but no evaluation hook was given (pipeline train provides one)")
    lead = ctx.rank == 0
    store = CheckpointStore(cfg.output, cfg.storage_options, keep=cfg.keep_checkpoints)
    if lead:
        store.remove_stale_temporaries()
    state = store.load() if resume else None
    if resume and state is None and lead:
        log.warning("--resume: %s has no checkpoint yet; starting from step 0", cfg.output)

    _seed_all(cfg.seed)                                   # same initial weights on every worker
    model = build_model(cfg, load_weights=state is None).to(ctx.device)
    criterion = GLIPCriterion(model.cfg.loss)
    groups = param_groups(model, cfg)
    optimizer = make_optimizer(groups)
    scaler = torch.amp.GradScaler(ctx.device.type) if cfg.precision is Precision.FP16 else None
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    step = 0
    stream = TrainStream(cfg.data, model.cfg, model.tokenizer, cfg.batch_size // ctx.world_size,
                         seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size)
    if state is not None:
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {state.get('version')!r}, expected {CHECKPOINT_VERSION}")
        check_resumable(state["config"], state["world_size"], cfg, ctx.world_size)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        step = int(state["step"])
        stream.load_state_dict(state["data"][ctx.rank])
    wrapped = ctx.wrap_model(model)
    if state is not None:
        set_rng_state(state["rng"][ctx.rank])
    else:
        _seed_all(cfg.seed * 1000 + ctx.rank)             # dropout / DropBlock differ per worker
    counters = dict(state.get("counters", {})) if state is not None else {}
    del state

    metrics = MetricsLog(cfg.output, cfg.storage_options, resume_step=step if resume else None) if lead else None
    if lead:
        write_json(cfg.output, "train_config.json", public_config(cfg), cfg.storage_options)
    batches = BatchPrefetcher(stream, cfg.data.prefetch_batches)
    data_state = stream.state_dict()
    window: dict[str, float] = {}
    window_steps, window_images, window_start = 0, 0, time.time()
    last = StepResult(StepStatus.OK)
    last_loss = float("nan")                              # the workers' mean at the last log
    stopped_early = False
    model.train()
    try:
        while step < cfg.max_iter:
            batch = next(batches)
            data_state = batch["data_state"]
            last = train_step(wrapped, criterion, optimizer, batch, step=step, cfg=cfg, device=ctx.device,
                              scaler=scaler, ema=ema, ema_source=model)
            if last.status is not StepStatus.OK:
                counters[last.status.value] = counters.get(last.status.value, 0) + 1
                if lead and counters[last.status.value] <= 10:
                    log.warning("step %d: batch %s (%s)", step + 1, last.status.value, batch["keys"])
                continue
            step += 1
            if last.overflow:
                counters["fp16_overflow"] = counters.get("fp16_overflow", 0) + 1
            for key, value in {"loss": last.loss, "grad_norm": last.grad_norm, **last.losses}.items():
                window[key] = window.get(key, 0.0) + value
            window_steps += 1
            window_images += last.images
            if step % cfg.log_every == 0 or step == cfg.max_iter:
                means = _mean_over_workers({k: v / window_steps for k, v in window.items()}, ctx.device)
                images = _mean_over_workers({"n": float(window_images)}, ctx.device)["n"] * ctx.world_size
                keys = _gather(batch["keys"])
                data = summarize(_gather(data_state.get("counts", {})))
                elapsed = time.time() - window_start
                record = {"step": step, "lr": last.lr, "lang_lr": cfg.lang_lr * lr_factor(step - 1, cfg),
                          **means, "img_per_s": images / max(elapsed, 1e-9), "keys": keys,
                          **{k: v for k, v in counters.items()}, "data": data}
                last_loss = record["loss"]
                if lead:
                    metrics.write(record)
                    if ctx.on_log is not None:
                        ctx.on_log(record)
                window, window_steps, window_images, window_start = {}, 0, 0, time.time()
            if step % cfg.checkpoint_every == 0 or step == cfg.max_iter:
                _save(store, metrics, model, optimizer, scaler, ema, step, data_state, counters, cfg, ctx)
            if cfg.eval.every and step % cfg.eval.every == 0 and _evaluate(model, ema, cfg, ctx, metrics, step):
                if step % cfg.checkpoint_every:           # the stopping step is where a resume starts
                    _save(store, metrics, model, optimizer, scaler, ema, step, data_state, counters, cfg, ctx)
                stopped_early = True
                break
    finally:
        batches.close()
    data = summarize(_gather(data_state.get("counts", {})))     # collective: every worker's counts
    summary = {"step": step, "output": cfg.output, "loss": last_loss, "counters": counters, "data": data,
               "checkpoint": store.latest() if lead else None, "stopped_early": stopped_early}
    if lead:
        summary["model"] = _export(model.state_dict(), model, cfg, "model", save_pretrained)
        if ema is not None:
            summary["model_ema"] = _export(ema.state, model, cfg, "model_ema", save_pretrained)
        write_json(cfg.output, "train_summary.json", summary, cfg.storage_options)
        metrics.close()
    return summary


def _check_in_sync(model: nn.Module, step: int) -> None:
    """Every worker must hold the same weights (DDP keeps them bit-identical); a launcher that did
    not wrap the model for data parallelism would let them drift apart silently."""
    with torch.no_grad():
        checksum = sum(float(p.double().sum()) for p in model.parameters())
    sums = _gather(checksum)
    if len(set(sums)) > 1:
        raise RuntimeError(f"step {step}: the workers' weights differ (parameter checksums {sums}); the model "
                           "was not wrapped for data parallelism (WorkerContext.wrap_model)")


def _save(store, metrics, model, optimizer, scaler, ema, step, data_state, counters, cfg, ctx) -> None:
    """Collective: every worker sends its data position and RNG states; rank 0 writes."""
    _check_in_sync(model, step)
    data_states = _gather(data_state)
    rngs = _gather(rng_state())
    if ctx.rank == 0:
        payload = {"version": CHECKPOINT_VERSION, "step": step, "world_size": ctx.world_size,
                   "config": public_config(cfg),
                   "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                   "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                   "ema": ema.state_dict() if ema else None, "data": data_states, "rng": rngs,
                   "counters": dict(counters)}
        store.save(step, payload, info={"world_size": ctx.world_size, "resume_config": resume_config(cfg)})
        metrics.sync()
    if _distributed():
        dist.barrier()


def _evaluate(model, ema, cfg, ctx, metrics, step) -> bool:
    """Rank 0 runs the hook on the EMA (or the model's) weights; the others wait. The EMA weights
    are swapped in and out of the model (no deep copy: the data thread is using its tokenizer).
    Returns whether to stop now (rank 0's ``stop_fn``, told to every worker)."""
    stop = False
    if ctx.rank == 0:
        backup = None
        if ema is not None and cfg.eval.weights is EvalWeights.EMA:
            backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(ema.state)
        model.eval()
        try:
            result = ctx.eval_fn(model, step)
        finally:
            if backup is not None:
                model.load_state_dict(backup)
            model.train()
        record = {"step": step, "eval": result}
        metrics.write(record)
        metrics.sync()
        if ctx.on_log is not None:
            ctx.on_log(record)
        stop = bool(ctx.stop_fn is not None and ctx.stop_fn(result))
    return bool(_gather(stop)[0])


def _export(state: dict, model, cfg: TrainConfig, name: str, save_pretrained) -> str:
    """``state`` as a save_pretrained folder ``OUTPUT/name`` (through a local temporary for URLs)."""
    import tempfile

    from fsspec.core import url_to_fs

    target = copy.deepcopy(model).cpu()
    target.load_state_dict(state)
    url = f"{cfg.output.rstrip('/')}/{name}"
    fs, path = url_to_fs(url, **cfg.storage_options)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        save_pretrained(target, path)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(target, tmp)
            fs.put(tmp.rstrip("/") + "/", path, recursive=True)
    return url
