"""``pipeline finetune CONFIG [key=value ...] [--resume]``: a released GLIP on your COCO data.

    data check (label map, few-shot)  ->  zero-shot AP of the starting model on data.val
      ->  train (``tuning``: full | prompt | linear_probe | head), AP on data.val every
          ``eval_every`` steps, the best model kept, early stopping after ``patience``
          evaluations without a better AP  ->  the table: zero-shot, each evaluation, best

The starting model is an official ``.pth`` (with its model config, ``model=glip_t``) or one of
ours (a ``save_pretrained`` folder; its own config.json is its model config). The categories'
names become the prompt; ``pipeline.finetune_data`` checks the label map before any model is
built. The trainer is ``trainer.loop.fit`` in this process (one worker, CUDA when there is
one), given a child ``TrainConfig`` built here as a typed object.

OUTPUT (a local folder) holds ``data/`` (the prepared files, ``label_map.json``),
``zero_shot.json``, ``train/`` (the trainer's run: checkpoints, metrics.jsonl, ``model``),
``evals.json`` (every evaluation, the best, whether it stopped early), ``best/`` (the best
model, ``save_pretrained`` format: ``pipeline eval`` / ``predict`` load it, a learnt prompt
included, with ``prompt_names.json``: the classes it was learnt for) and ``summary.json``. ``--resume`` continues from the newest checkpoint (checkpoints
are written at every evaluation); a run that stopped early is not trained again.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from core.config import ConfigError, from_dict, merge_overrides, read_yaml
from core.device import Device, Precision, resolve_device
from model.config import CheckpointFormat
from trainer.data.prompts import PromptSampling
from trainer.tuning import Tuning

__all__ = ["SplitConfig", "FinetuneDataConfig", "FinetuneConfig", "load_finetune_config", "child_config",
           "finetune", "format_finetune"]

log = logging.getLogger("pipeline.finetune")

OFFICIAL_PROMPT_LR = 0.05           # official language_prompt_v2 BASE_LR


@dataclass
class SplitConfig:
    annotations: str = ""           # COCO-format JSON
    image_root: str = ""            # the folder its file_names are relative to


@dataclass
class FinetuneDataConfig:
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class FinetuneConfig:
    init_checkpoint: str = ""       # official .pth or our save_pretrained folder
    init_checkpoint_format: CheckpointFormat = CheckpointFormat.AUTO
    model: str = ""                 # "": ours -> its config.json, official -> glip_t; or glip_t | glip_l | YAML
    model_overrides: list[str] = field(default_factory=list)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    output: str = ""
    tuning: Tuning = Tuning.FULL
    prompt: PromptSampling | None = None   # null: fixed for tuning=prompt (required), else sampled
    max_negatives: int = 85         # sampled prompts: classes drawn as negatives (RANDOM_SAMPLE_NEG)
    shots: int = 0                  # N images per category (official few-shot protocol); 0 = all
    batch_size: int = 8
    max_iter: int = 1000
    lr: float | None = None         # null: 0.05 for tuning=prompt (official), else 1e-4
    lang_lr: float = 1e-5
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 1e-4
    warmup_iters: int = 50
    warmup_factor: float = 0.1
    steps: tuple[float, ...] = (0.67, 0.89)
    gamma: float = 0.1
    clip_grad: float = 1.0
    precision: Precision = Precision.FP32
    ema_decay: float = 0.0
    flip_prob: float = 0.5
    eval_every: int = 100           # steps between evaluations on data.val (and checkpoints)
    patience: int = 0               # evaluations without a better AP before stopping; 0 = never
    min_delta: float = 0.0          # AP gain (fraction) that counts as better
    eval_batch_size: int = 8
    max_dets: int = 100
    device: Device = Device.AUTO
    seed: int = 0                   # training and few-shot sampling
    log_every: int = 20
    progress: bool = True

    def validate(self) -> None:
        for key in ("init_checkpoint", "output", "data.train.annotations", "data.train.image_root",
                    "data.val.annotations", "data.val.image_root"):
            obj = self
            for part in key.split("."):
                obj = getattr(obj, part)
            if not obj:
                raise ValueError(f"{key} is empty (e.g. {key}=...)")
        if "://" in self.output and not self.output.startswith("file://"):
            raise ValueError(f"output={self.output}: finetune writes a local folder; give a local path")
        if self.tuning is Tuning.PROMPT and self.prompt is PromptSampling.SAMPLED:
            raise ValueError("tuning=prompt learns one tensor per prompt position, so it needs the fixed "
                             "prompt: remove prompt= or set prompt=fixed")
        for key in ("shots", "patience", "eval_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta}")
        if self.patience and not self.eval_every:
            raise ValueError("patience needs evaluations: set eval_every=N")
        from trainer.tuning import trains
        frozen = [p for p in self.lr_multipliers if trains(self.tuning, p) is False
                  and trains(self.tuning, p + ".") is False]
        if frozen:
            raise ValueError(f"lr_multipliers {frozen}: tuning={self.tuning.value} does not train these tensors "
                             "(trainer/tuning.py lists what it trains); remove them, e.g. lr_multipliers={}")


def load_finetune_config(path: str | None, overrides: list[str] | None = None) -> FinetuneConfig:
    data = read_yaml(path) if path else {}
    if overrides:
        data = merge_overrides(data, overrides)
    return from_dict(FinetuneConfig, data, source=str(path) if path else "command line")


def _model_name(cfg: FinetuneConfig) -> str:
    if cfg.model:
        return cfg.model
    path = Path(cfg.init_checkpoint.removeprefix("file://"))
    if cfg.init_checkpoint_format is not CheckpointFormat.OFFICIAL and path.is_dir():
        return str(path / "config.json")           # ours: the architecture it was saved with
    return "glip_t"


def child_config(cfg: FinetuneConfig, train_json: str, device_type: str):
    """The trainer's config for this fine-tune (a ``TrainJobConfig``, in-process, one worker)."""
    from pipeline.train import Launcher, TrainJobConfig, TrainRayConfig
    from trainer.config import EvalHookConfig, InitKind
    from trainer.data.config import SourceKind, TrainDataConfig, TrainSourceConfig
    from trainer.data.prompts import DetectionPromptConfig

    sampling = cfg.prompt or (PromptSampling.FIXED if cfg.tuning is Tuning.PROMPT else PromptSampling.SAMPLED)
    source = TrainSourceConfig(kind=SourceKind.COCO, annotations=train_json, image_root=cfg.data.train.image_root,
                               prompt=DetectionPromptConfig(sampling=sampling, max_negatives=cfg.max_negatives))
    lr = cfg.lr if cfg.lr is not None else (OFFICIAL_PROMPT_LR if cfg.tuning is Tuning.PROMPT else 1e-4)
    every = cfg.eval_every or cfg.max_iter
    return TrainJobConfig(
        model=_model_name(cfg), model_overrides=list(cfg.model_overrides), init=InitKind.CHECKPOINT,
        init_checkpoint=cfg.init_checkpoint, init_checkpoint_format=cfg.init_checkpoint_format,
        tuning=cfg.tuning, data=TrainDataConfig(sources={"train": source}, flip_prob=cfg.flip_prob),
        batch_size=cfg.batch_size, max_iter=cfg.max_iter, lr=lr, lang_lr=cfg.lang_lr,
        weight_decay=cfg.weight_decay, lr_multipliers=dict(cfg.lr_multipliers), warmup_iters=cfg.warmup_iters,
        warmup_factor=cfg.warmup_factor, steps=tuple(cfg.steps), gamma=cfg.gamma, clip_grad=cfg.clip_grad,
        precision=cfg.precision, ema_decay=cfg.ema_decay, output=str(Path(cfg.output) / "train"),
        checkpoint_every=every, keep_checkpoints=1, log_every=min(cfg.log_every, cfg.max_iter), seed=cfg.seed,
        eval=EvalHookConfig(every=cfg.eval_every), progress=cfg.progress,
        ray=TrainRayConfig(launcher=Launcher.IN_PROCESS, use_gpu=device_type == "cuda"))


# ------------------------------------------------------------------------------------ evaluation
def evaluate_model(model, cfg: FinetuneConfig, val_json: str, device) -> dict:
    """Detection metrics of an in-memory model on the prepared validation file."""
    from model.predictor import Predictor
    from pipeline.evaluation import EvalConfig, evaluate_detection

    ecfg = EvalConfig(checkpoint="(in memory)", annotations=val_json, image_root=cfg.data.val.image_root,
                      output=cfg.output, batch_size=cfg.eval_batch_size, max_dets=cfg.max_dets, progress=False)
    metrics, _ = evaluate_detection(ecfg, Predictor(model, device=device, batch_size=cfg.eval_batch_size))
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class EvalTracker:
    """The evaluations of one run (``OUTPUT/evals.json``), the best model (``OUTPUT/best``) and
    early stopping: ``stop`` after ``patience`` evaluations in a row without AP > best + min_delta."""

    def __init__(self, cfg: FinetuneConfig, val_json: str, device, categories: list[str]):
        self.cfg, self.val_json, self.device, self.categories = cfg, val_json, device, categories
        self.out = Path(cfg.output)
        self.path = self.out / "evals.json"
        self.evals: list[dict] = []
        self.best: dict | None = None
        self.stopped_at: int | None = None

    def load(self, until_step: int) -> None:
        """A resume: keep what was evaluated up to the checkpoint it continues from."""
        if not self.path.exists():
            return
        saved = json.loads(self.path.read_text())
        self.evals = [e for e in saved["evals"] if e["step"] <= until_step]
        self.stopped_at = saved.get("stopped_at") if (saved.get("stopped_at") or 0) <= until_step else None
        kept = [e for e in self.evals if e.get("best")]
        self.best = kept[-1] if kept else None

    def _since_best(self) -> int:
        return sum(1 for e in self.evals if self.best is None or e["step"] > self.best["step"])

    def __call__(self, model, step: int) -> dict:
        from model.checkpoint import save_pretrained
        from model.prompt_tuning import save_names

        metrics = evaluate_model(model, self.cfg, self.val_json, self.device)
        ap = metrics.get("AP") or 0.0
        record = {"step": step, **metrics, "best": self.best is None or ap > self.best["AP"] + self.cfg.min_delta}
        if record["best"]:
            tmp = self.out / ".best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_pretrained(model, tmp)
            if model.prompt_tuning is not None:
                save_names(tmp, self.categories)
            shutil.rmtree(self.out / "best", ignore_errors=True)
            tmp.rename(self.out / "best")
            self.best = record
        self.evals.append(record)
        self.save()
        return metrics

    def should_stop(self, _metrics: dict) -> bool:
        if self.cfg.patience and self._since_best() >= self.cfg.patience:
            self.stopped_at = self.evals[-1]["step"]
            self.save()
            log.info("early stop at step %d: %d evaluations without a better AP than %.4f (step %d)",
                     self.stopped_at, self.cfg.patience, self.best["AP"], self.best["step"])
            return True
        return False

    def save(self) -> None:
        payload = {"evals": self.evals, "best": self.best, "stopped_at": self.stopped_at}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        tmp.replace(self.path)


# ------------------------------------------------------------------------------------ the command
def _check_prompt(cfg: FinetuneConfig, mcfg, tokenizer, names: list[str], train_json: str) -> None:
    """tuning=prompt: the whole fixed prompt must be one prompt at training and at evaluation."""
    from model.prompts import build_prompt

    if cfg.tuning is not Tuning.PROMPT:
        return
    if len(names) > mcfg.inference.chunk_size:
        raise ConfigError(f"{train_json}: categories: {len(names)} classes, but evaluation splits prompts of more "
                          f"than inference.chunk_size={mcfg.inference.chunk_size} names; a learnt prompt must "
                          f"stay whole. Fix: model_overrides=[inference.chunk_size={len(names)}]")
    tokens = len(tokenizer(build_prompt(names).caption)["input_ids"])
    if tokens > mcfg.language.max_query_len:
        raise ConfigError(f"{train_json}: categories: the prompt of {len(names)} names takes {tokens} tokens, more "
                          f"than language.max_query_len={mcfg.language.max_query_len}. Fix: shorter names, or "
                          "tuning=full|head|linear_probe (their prompts are sampled)")


def finetune(cfg: FinetuneConfig, resume: bool = False, echo: Callable[[str], None] | None = None) -> dict:
    """Run the fine-tune; returns the summary (also written to OUTPUT/summary.json)."""
    from model.config import load_model_config
    from model.language import build_tokenizer
    from pipeline.finetune_data import prepare
    from pipeline.train import _Progress, preflight
    from trainer.loop import WorkerContext, build_model, fit

    echo = echo or (lambda text: print(text, file=sys.stderr))
    try:
        cfg.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    device = resolve_device(cfg.device)
    mcfg = load_model_config(_model_name(cfg), cfg.model_overrides)
    tokenizer = build_tokenizer(mcfg.language.tokenizer)
    data = prepare(cfg.data.train.annotations, cfg.data.val.annotations, cfg.output, tokenizer,
                   shots=cfg.shots, seed=cfg.seed)
    for note in data.notes:
        echo(note)
    _check_prompt(cfg, mcfg, tokenizer, data.names, cfg.data.train.annotations)
    child = child_config(cfg, data.train, device.type)
    pointer = preflight(child, resume)
    start = int(pointer["step"]) if (resume and pointer) else 0
    out = Path(cfg.output)

    zero_path = out / "zero_shot.json"
    if zero_path.exists():
        zero_shot = json.loads(zero_path.read_text())
    else:
        echo(f"zero-shot evaluation of {cfg.init_checkpoint} on {data.val_images} validation images")
        zero_shot = evaluate_model(build_model(child).to(device), cfg, data.val, device)
        zero_path.write_text(json.dumps(zero_shot, indent=2))

    tracker = EvalTracker(cfg, data.val, device, data.names)
    if resume:
        tracker.load(start)
    summary: dict[str, Any] = {}
    if tracker.stopped_at is None and (start < cfg.max_iter or not resume):
        progress = _Progress(child, start)
        try:
            summary = fit(child, WorkerContext(device=device, on_log=progress, eval_fn=tracker,
                                               stop_fn=tracker.should_stop), resume=resume)
        finally:
            progress.close()
        if cfg.tuning is Tuning.PROMPT:                 # the exported models' prompt belongs to these names
            from model.prompt_tuning import save_names
            for key in ("model", "model_ema"):
                if summary.get(key):
                    save_names(summary[key], data.names)
    result = {"output": cfg.output, "tuning": cfg.tuning.value, "shots": cfg.shots,
              "train_images": data.train_images, "val_images": data.val_images, "categories": data.names,
              "zero_shot": zero_shot, "evals": tracker.evals, "best": tracker.best,
              "stopped_at": tracker.stopped_at, "best_model": str(out / "best") if tracker.best else None,
              "final_model": summary.get("model") or str(out / "train" / "model"), "notes": data.notes}
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_finetune(result: dict) -> str:
    """The evaluation table: zero-shot, every evaluation, the best one marked."""
    lines = [f"fine-tune ({result['tuning']}{', %d-shot' % result['shots'] if result['shots'] else ''}) "
             f"on {result['train_images']} images, evaluated on {result['val_images']}: AP x100",
             "", "| model | AP | AP50 | AP75 |", "|---|---|---|---|"]
    rows = [("zero-shot", result["zero_shot"])] + [
        (f"step {e['step']}" + (" (best)" if result["best"] and e["step"] == result["best"]["step"] else ""), e)
        for e in result["evals"]]
    lines += [f"| {name} | {_pct(m.get('AP'))} | {_pct(m.get('AP50'))} | {_pct(m.get('AP75'))} |" for name, m in rows]
    if result["best"]:
        gain = (result["best"].get("AP") or 0) - (result["zero_shot"].get("AP") or 0)
        lines += ["", f"best: step {result['best']['step']}, AP {_pct(result['best'].get('AP'))} "
                  f"({'+' if gain >= 0 else ''}{100 * gain:.1f} over zero-shot): {result['best_model']}"]
    if result["stopped_at"] is not None:
        lines.append(f"stopped early at step {result['stopped_at']} (patience)")
    return "\n".join(lines)
